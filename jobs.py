"""The durable ledger (SQLite) and the worker pool that drains it.

The ledger holds every acknowledged message and each of its files with a
state. Work is found by one indexed column, ``next_at``: the time a queued
item is due, or the time an active item's lease runs out; NULL once nothing
more is to be done. Claiming sets ``next_at`` to the lease expiry in one
``BEGIN IMMEDIATE`` transaction, so two threads or processes never hold the
same item, and a crashed holder's item comes back when its lease runs out.

Exactly once: a file is streamed to ``DOWNLOAD_DIR/.partial/``; before the
hard link that gives it its final name, the chosen name is recorded (the
*intent*). After a crash the next holder reconciles: if the link happened
(same inode, or the part file is gone and the final file is there) the file
is saved; otherwise the commit resumes from the complete part file.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import downloader
from metrics import Metrics
from config import Settings, format_size
from webex import WebexClient, WebexError, new_session

log = logging.getLogger("filebot.jobs")

TERMINAL = ("saved", "failed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,             -- the Webex message id: redeliveries collide here
    room_id TEXT, room_type TEXT, person_id TEXT, person_email TEXT, created TEXT,
    received_at REAL NOT NULL,
    state TEXT NOT NULL,             -- resolving | ready | ignored | failed
    webhook_files TEXT,              -- JSON list from the webhook, NULL when it had none
    next_at REAL,                    -- due (or lease expiry) while resolving or replying
    lease_owner TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    reply_state TEXT,                -- NULL | pending | sending | sent | failed
    reply_error TEXT
);
CREATE INDEX IF NOT EXISTS messages_next ON messages(next_at) WHERE next_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL REFERENCES messages(id),
    position INTEGER NOT NULL,
    url TEXT NOT NULL,
    state TEXT NOT NULL,             -- queued | active | saved | failed
    next_at REAL,                    -- due (queued) or lease expiry (active); NULL when done
    lease_owner TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    first_try_at REAL,
    part_path TEXT,                  -- the holder's temporary file
    final_path TEXT,                 -- the commit intent, then the saved file
    name TEXT, size INTEGER, sha256 TEXT, content_type TEXT,
    reason TEXT, detail TEXT,        -- last retry reason, or the failure
    duration REAL,
    updated_at REAL NOT NULL,
    UNIQUE (message_id, position)
);
CREATE INDEX IF NOT EXISTS files_next ON files(next_at) WHERE next_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS files_updated ON files(updated_at);
"""


_FILE_WITH_MESSAGE = ("SELECT f.*, m.person_email, m.room_id, m.room_type, m.received_at"
                      " FROM files f JOIN messages m ON m.id = f.message_id")


class LostLease(Exception):
    """Another holder took this item over (our lease ran out); stop touching it."""


@dataclass(frozen=True)
class Message:
    id: str
    room_id: str | None = None
    room_type: str | None = None
    person_id: str | None = None
    person_email: str | None = None
    created: str | None = None

    @classmethod
    def from_webhook(cls, data: dict) -> "Message":
        return cls(data["id"], data.get("roomId"), data.get("roomType"), data.get("personId"),
                   data.get("personEmail"), data.get("created"))


@dataclass
class _Pending:
    """A record waiting for a commit (see :meth:`Ledger.record`)."""
    message: Message
    files: list[str] | None
    resolve: bool
    new: bool | None = None
    error: Exception | None = None


class Ledger:
    """The SQLite ledger. Thread-safe: each thread gets its own connection."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time, replies: bool = True):
        self.path = Path(path)
        self.clock = clock
        self.replies = replies
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue: list[_Pending] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db().executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}\nCOMMIT;")

    # -- plumbing
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # an acknowledged event survives power loss too
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. Threads of this process queue on a lock first: SQLite's own
        busy handler sleeps in steps of up to 100 ms, which showed as 300-500 ms p99 under load."""
        with self._write_lock, self._transaction() as db:
            yield db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    def meta(self, key: str) -> str | None:
        row = self._db().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                       "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))

    # -- recording (the webhook's only write)
    def record(self, message: Message, files: list[str] | None, *, resolve: bool) -> bool:
        """Record a message; False if it was already recorded (a redelivery). Committed on return.

        With ``resolve`` (or no ``files``) a worker first checks the sender and
        looks the files up; otherwise the files are queued at once.

        Group commit: a caller that gets the write lock commits every record
        waiting at that moment in one transaction, so concurrent webhooks share
        one fsync; a caller whose record was committed that way just returns.
        """
        pending = _Pending(message, files, resolve)
        with self._queue_lock:
            self._queue.append(pending)
        with self._write_lock:
            if pending.new is None and pending.error is None:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                try:
                    with self._transaction() as db:
                        results = [self._insert(db, p) for p in batch]
                except Exception as exc:
                    for p in batch:
                        p.error = exc
                else:
                    for p, new in zip(batch, results):
                        p.new = new
        if pending.error is not None:
            raise pending.error
        return pending.new

    def _insert(self, db: sqlite3.Connection, p: "_Pending") -> bool:
        now = self.clock()
        needs_work = p.resolve or p.files is None
        m = p.message
        cur = db.execute(
            "INSERT OR IGNORE INTO messages (id, room_id, room_type, person_id, person_email, created,"
            " received_at, state, webhook_files, next_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (m.id, m.room_id, m.room_type, m.person_id, m.person_email, m.created, now,
             "resolving" if needs_work else "ready", json.dumps(p.files) if p.files is not None else None,
             now if needs_work else None))
        if cur.rowcount == 0:
            return False
        if not needs_work:
            self._add_files(db, m.id, p.files, now)
        return True

    def _add_files(self, db: sqlite3.Connection, message_id: str, files: list[str], now: float) -> None:
        db.executemany(
            "INSERT OR IGNORE INTO files (message_id, position, url, state, next_at, updated_at)"
            " VALUES (?, ?, ?, 'queued', ?, ?)",
            [(message_id, i, url, now, now) for i, url in enumerate(files)])

    # -- claiming
    def claim(self, owner: str, lease: float) -> tuple[str, sqlite3.Row] | None:
        """Take the next due item: ``('message', row)``, ``('file', row)`` or None.

        Each claim gets its own token, ``owner/random``, in ``lease_owner``: every
        later update must present it, so a thread whose lease was taken over
        (even by a sibling thread of the same process) changes nothing, and
        each claim streams into its own part file.
        """
        now = self.clock()
        claim = f"{owner}/{uuid.uuid4().hex[:8]}"
        with self._tx() as db:
            row = db.execute("SELECT id FROM messages WHERE next_at <= ? ORDER BY next_at LIMIT 1",
                             (now,)).fetchone()
            if row is not None:
                return "message", db.execute(
                    "UPDATE messages SET next_at = ?, lease_owner = ?, attempts = attempts + 1"
                    " WHERE id = ? RETURNING *", (now + lease, claim, row["id"])).fetchone()
            row = db.execute("SELECT id FROM files WHERE next_at <= ? ORDER BY next_at LIMIT 1",
                             (now,)).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE files SET state = 'active', next_at = ?, lease_owner = ?, attempts = attempts + 1,"
                " first_try_at = coalesce(first_try_at, ?),"
                " part_path = CASE WHEN final_path IS NULL THEN ? ELSE part_path END, updated_at = ?"
                " WHERE id = ?", (now + lease, claim, now, part_name(row["id"], claim), now, row["id"]))
            return "file", db.execute(_FILE_WITH_MESSAGE + " WHERE f.id = ?", (row["id"],)).fetchone()

    def next_due(self) -> float | None:
        db = self._db()
        times = [db.execute(f"SELECT next_at FROM {t} WHERE next_at IS NOT NULL ORDER BY next_at LIMIT 1")
                 .fetchone() for t in ("messages", "files")]  # the partial index, never a table scan
        times = [t[0] for t in times if t is not None]
        return min(times) if times else None

    def renew(self, owner: str, lease: float) -> None:
        """Extend every lease the claims of ``owner`` hold (the heartbeat)."""
        until = self.clock() + lease
        prefix = owner + "/"
        with self._tx() as db:
            db.execute("UPDATE files SET next_at = ? WHERE next_at IS NOT NULL AND state = 'active'"
                       " AND substr(lease_owner, 1, ?) = ?", (until, len(prefix), prefix))
            db.execute("UPDATE messages SET next_at = ? WHERE next_at IS NOT NULL"
                       " AND substr(lease_owner, 1, ?) = ?", (until, len(prefix), prefix))

    def release_owners(self, is_dead: Callable[[str], bool]) -> int:
        """Make the items of dead holders due now (after a crash, instead of waiting for the lease)."""
        now = self.clock()
        n = 0
        with self._tx() as db:
            for table, cond in (("files", "next_at IS NOT NULL AND state = 'active'"),
                                ("messages", "next_at IS NOT NULL")):
                owners = [r[0] for r in db.execute(
                    f"SELECT DISTINCT lease_owner FROM {table} WHERE {cond} AND lease_owner IS NOT NULL")]
                for owner in filter(is_dead, owners):
                    n += db.execute(f"UPDATE {table} SET next_at = ?, lease_owner = NULL"
                                    f" WHERE lease_owner = ? AND {cond}", (now, owner)).rowcount
        return n

    def live_part_paths(self) -> set[str]:
        rows = self._db().execute("SELECT part_path FROM files WHERE next_at IS NOT NULL AND part_path IS NOT NULL")
        return {r[0] for r in rows}

    # -- file outcomes (each checks the lease: a holder that lost it changes nothing)
    def _update_file(self, db, file_id: int, owner: str, sql: str, params: tuple) -> None:
        cur = db.execute(f"UPDATE files SET {sql}, updated_at = ? WHERE id = ? AND lease_owner = ?",
                         (*params, self.clock(), file_id, owner))
        if cur.rowcount == 0:
            raise LostLease(file_id)

    def set_intent(self, file_id: int, owner: str, final_path: Path, fetched: downloader.Fetched) -> None:
        with self._tx() as db:
            self._update_file(db, file_id, owner,
                              "final_path = ?, part_path = ?, name = ?, size = ?, sha256 = ?, content_type = ?",
                              (str(final_path), str(fetched.part_path.name), fetched.name, fetched.size,
                               fetched.sha256, fetched.content_type))

    def clear_intent(self, file_id: int, owner: str, part_path: str) -> None:
        with self._tx() as db:
            self._update_file(db, file_id, owner, "final_path = NULL, part_path = ?", (part_path,))

    def saved(self, file_id: int, owner: str, final_path: Path, duration: float | None) -> None:
        with self._tx() as db:
            self._update_file(db, file_id, owner,
                              "state = 'saved', next_at = NULL, lease_owner = NULL, final_path = ?, name = ?,"
                              " part_path = NULL, reason = NULL, detail = NULL, duration = ?",
                              (str(final_path), final_path.name, duration))
            self._maybe_reply(db, file_id)

    def failed(self, file_id: int, owner: str, reason: str, detail: str, size: int | None = None) -> None:
        with self._tx() as db:
            self._update_file(db, file_id, owner,
                              "state = 'failed', next_at = NULL, lease_owner = NULL, part_path = NULL,"
                              " reason = ?, detail = ?, size = ?", (reason, detail, size))
            self._maybe_reply(db, file_id)

    def retry(self, file_id: int, owner: str, when: float, reason: str, detail: str) -> None:
        with self._tx() as db:
            self._update_file(db, file_id, owner,
                              "state = 'queued', next_at = ?, lease_owner = NULL, reason = ?, detail = ?",
                              (when, reason, detail))

    def release(self, file_id: int, owner: str) -> None:
        """Hand an interrupted file back to the queue; the interruption is not an attempt."""
        with self._tx() as db:
            self._update_file(db, file_id, owner,
                              "state = 'queued', next_at = ?, lease_owner = NULL, attempts = max(attempts - 1, 0)",
                              (self.clock(),))

    def _maybe_reply(self, db, file_id: int) -> None:
        """When the last file of a message is done, queue its reply (at most once)."""
        if not self.replies:
            return
        db.execute(
            "UPDATE messages SET reply_state = 'pending', next_at = ?, lease_owner = NULL, attempts = 0"
            " WHERE id = (SELECT message_id FROM files WHERE id = ?) AND reply_state IS NULL"
            " AND NOT EXISTS (SELECT 1 FROM files f WHERE f.message_id = messages.id"
            "                 AND f.state NOT IN ('saved', 'failed'))", (self.clock(), file_id))

    # -- message outcomes
    def _update_message(self, db, message_id: str, owner: str, sql: str, params: tuple) -> None:
        cur = db.execute(f"UPDATE messages SET {sql} WHERE id = ? AND lease_owner = ?",
                         (*params, message_id, owner))
        if cur.rowcount == 0:
            raise LostLease(message_id)

    def resolved(self, message_id: str, owner: str, files: list[str]) -> None:
        with self._tx() as db:
            self._update_message(db, message_id, owner,
                                 "state = 'ready', next_at = NULL, lease_owner = NULL, error = NULL", ())
            self._add_files(db, message_id, files, self.clock())

    def message_done(self, message_id: str, owner: str, state: str, error: str | None = None) -> None:
        with self._tx() as db:
            self._update_message(db, message_id, owner,
                                 "state = ?, next_at = NULL, lease_owner = NULL, error = ?", (state, error))

    def message_retry(self, message_id: str, owner: str, when: float, error: str) -> None:
        with self._tx() as db:
            self._update_message(db, message_id, owner, "next_at = ?, lease_owner = NULL, error = ?",
                                 (when, error))

    def message(self, message_id: str) -> sqlite3.Row | None:
        return self._db().execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()

    def start_reply(self, message_id: str, owner: str) -> list[sqlite3.Row]:
        """Mark the reply as being sent (so a crash never sends it twice); return the files."""
        with self._tx() as db:
            self._update_message(db, message_id, owner, "reply_state = 'sending'", ())
            return db.execute("SELECT * FROM files WHERE message_id = ? ORDER BY position",
                              (message_id,)).fetchall()

    def reply_done(self, message_id: str, owner: str, state: str, error: str | None = None,
                   when: float | None = None) -> None:
        with self._tx() as db:
            self._update_message(db, message_id, owner,
                                 "reply_state = ?, reply_error = ?, next_at = ?, lease_owner = NULL",
                                 (state, error, when))

    # -- reading (health, history)
    def queue_counts(self) -> dict[str, int]:
        db = self._db()
        counts = {"queued": 0, "active": 0}
        for state, n in db.execute("SELECT state, count(*) FROM files WHERE next_at IS NOT NULL GROUP BY state"):
            counts[state] = n
        counts["messages_pending"] = db.execute(
            "SELECT count(*) FROM messages WHERE next_at IS NOT NULL").fetchone()[0]
        return counts

    def history(self, state: str | None = None, limit: int = 50) -> list[sqlite3.Row]:
        sql = _FILE_WITH_MESSAGE
        params: tuple = ()
        if state:
            sql += " WHERE f.state = ?"
            params = (state,)
        sql += " ORDER BY f.updated_at DESC, f.id DESC LIMIT ?"
        return self._db().execute(sql, (*params, limit)).fetchall()

    def requeue(self, file_id: int) -> bool:
        """Put a failed file back in the queue (operator's ``downloads retry``)."""
        now = self.clock()
        with self._tx() as db:
            cur = db.execute("UPDATE files SET state = 'queued', next_at = ?, attempts = 0, first_try_at = NULL,"
                             " lease_owner = NULL, final_path = NULL, part_path = NULL, updated_at = ?"
                             " WHERE id = ? AND state = 'failed'", (now, now, file_id))
            return cur.rowcount == 1


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded in attempts and in time."""
    base: float = 2.0
    cap: float = 600.0
    max_attempts: int = 20
    max_age: float = 24 * 3600.0

    def delay(self, attempts: int, retry_after: float | None, rand: Callable[[], float]) -> float:
        if retry_after is not None:
            return retry_after + rand() * min(1.0, retry_after * 0.1)  # honour it, spread a little
        ceiling = min(self.cap, self.base * 2 ** max(attempts - 1, 0))
        return ceiling / 2 + rand() * ceiling / 2

    def gives_up(self, attempts: int, first_try_at: float, when: float) -> bool:
        return attempts >= self.max_attempts or when - first_try_at > self.max_age


def part_name(file_id: int, claim: str) -> str:
    """The temporary file of one claim of one file, in ``DOWNLOAD_DIR/.partial/``."""
    return f"{file_id}-{claim.rsplit('/', 1)[-1]}.part"


def new_owner() -> str:
    """A holder id, ``host/pid/random``: the host and pid let a restart spot dead holders."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def owner_is_dead(owner: str) -> bool:
    """True if ``owner`` ran on this host in a process that no longer exists."""
    host, _, rest = owner.partition("/")
    pid = rest.split("/", 1)[0]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def allowed_sender(email: str | None, allowed: tuple[str, ...]) -> bool:
    """``ALLOWED_SENDERS``: empty allows everyone; ``@example.com`` allows a domain."""
    if not allowed:
        return True
    if not email:
        return False
    email = email.strip().lower()
    return any(email == a or (a.startswith("@") and email.endswith(a)) for a in allowed)


def subdir_for(template: str, row) -> Path:
    """``DOWNLOAD_SUBDIR`` filled in for a file's message, each value made a safe single folder name.

    ``row`` has the file's ``message_id`` and its message's ``person_email``,
    ``room_id``, ``room_type`` and ``received_at`` (as :meth:`Ledger.claim` returns).
    """
    if not template:
        return Path()
    email = row["person_email"] or "unknown"
    values = {"sender_email": email, "sender_domain": email.rpartition("@")[2] or "unknown",
              "room_id": row["room_id"] or "unknown", "room_type": row["room_type"] or "unknown",
              "message_id": row["message_id"],
              "date": datetime.fromtimestamp(row["received_at"], timezone.utc).strftime("%Y-%m-%d")}
    safe = {k: downloader.safe_filename(v.replace("/", "_").replace("\\", "_"), "unknown")
            for k, v in values.items()}
    parts = [downloader.safe_filename(p, "_") for p in template.format(**safe).split("/") if p]
    return Path(*parts) if parts else Path()


def _about(row) -> str:
    return f"message={row['message_id']} sender={row['person_email']} file_id={row['id']}"


def reply_text(files: list[sqlite3.Row], max_size: int) -> str:
    """The confirmation posted to the room once every file of a message is done."""
    lines = []
    for f in files:
        if f["state"] == "saved":
            lines.append(f"Saved **{f['name']}** ({format_size(f['size'])})")
        else:
            lines.append(f"Not saved: {failure_text(f['reason'], f['detail'], max_size, f['size'])}")
    return "\n".join(lines)


_FAILURE_TEXT = {
    "infected": "blocked: Webex flagged it as infected",
    "unscannable": "blocked: Webex could not scan it for malware",
    "unauthorized": "the bot's token was rejected",
    "forbidden": "the bot may not read this file",
    "not_found": "the file is gone",
    "untrusted_host": "the file is not on a Webex host",
}


def failure_text(reason: str | None, detail: str | None, max_size: int, size: int | None = None) -> str:
    """A failure in plain words, for replies and the history."""
    if reason == "too_large":
        actual = f"{'more than ' if detail and 'read' in detail else ''}{format_size(size)}, " if size else ""
        return f"too large: {actual}limit {format_size(max_size)}"
    if reason == "gave_up":
        return f"gave up after repeated errors ({detail})"
    return _FAILURE_TEXT.get(reason or "", f"{reason}: {detail}")


class Workers:
    """``DOWNLOAD_WORKERS`` threads draining the ledger, plus a lease heartbeat.

    The ledger's clock and ``rand`` are injectable so retry tests run in milliseconds;
    waiting is done on an event that :meth:`wake` and :meth:`stop` set.
    """

    def __init__(self, settings: Settings, ledger: Ledger, *,
                 rand: Callable[[], float] = random.random, policy: RetryPolicy = RetryPolicy(),
                 lease: float = 60.0, poll: float = 1.0, chunk_size: int = downloader.CHUNK_SIZE,
                 metrics: Metrics | None = None):
        self.settings = settings
        self.ledger = ledger
        self.clock = ledger.clock  # one clock for due times and for waiting
        self.rand = rand
        self.policy = policy
        self.lease = lease
        self.poll = poll
        self.chunk_size = chunk_size
        self.metrics = metrics or Metrics()
        self.owner = new_owner()
        self.download_dir = settings.download_dir.resolve()
        self.partial_dir = self.download_dir / downloader.PARTIAL_DIR
        self._stop = threading.Event()
        self._wakeup = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._bot_id: str | None = None
        self._me_lock = threading.Lock()

    # -- lifecycle
    def start(self) -> "Workers":
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        released = self.ledger.release_owners(owner_is_dead)
        if released:
            log.info("recovered %d item(s) left in progress by a stopped process", released)
        self._sweep_partials()
        self._spawn(self._introduce, "whoami")
        for i in range(self.settings.download_workers):
            self._spawn(self._run, f"download-{i}")
        self._spawn(self._heartbeat, "lease-heartbeat")
        return self

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop claiming; in-flight downloads are interrupted and handed back to the queue."""
        self._stop.set()
        self.wake()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads = []

    def wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify_all()

    @property
    def running(self) -> bool:
        """Every download thread is alive (what /healthz reports)."""
        downloads = [t for t in self._threads if t.name.startswith("download-")]
        return bool(downloads) and all(t.is_alive() for t in downloads)

    def _introduce(self) -> None:
        """Look the bot up once at start: its id filters its own messages; the log says who it is."""
        client = WebexClient(self.settings.api_url, self.settings.bot_token)
        attempt = 0
        while not self._stop.is_set():
            attempt += 1
            try:
                self.bot_id(client, refresh=True)
                break
            except WebexError as exc:
                if exc.status == 401:
                    log.error("the token was rejected by %s (HTTP 401): check WEBEX_BOT_TOKEN",
                              self.settings.api_url)
                    break
                if not exc.temporary:
                    log.error("could not look the bot up: %s", exc)
                    break
                log.warning("could not look the bot up yet (%s); trying again", exc)
                self._stop.wait(self.policy.delay(attempt, exc.retry_after, self.rand))
        client.close()

    def _sweep_partials(self) -> None:
        """Delete part files no claim refers to. Only old ones: another process may have
        claimed a file and created its part between our two reads."""
        live = self.ledger.live_part_paths()
        for path in self.partial_dir.glob("*.part"):
            try:
                if path.name not in live and path.stat().st_mtime < time.time() - self.lease:
                    path.unlink()
            except FileNotFoundError:  # another process got there first
                pass

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease / 4):
            try:
                self.ledger.renew(self.owner, self.lease)
            except sqlite3.Error as exc:
                log.error("could not renew leases: %s", exc)

    def _idle(self) -> None:
        due = self.ledger.next_due()
        wait = self.poll if due is None else max(0.0, min(self.poll, due - self.clock()))
        with self._wakeup:
            if not self._stop.is_set():
                self._wakeup.wait(wait)

    # -- the loop
    def _run(self) -> None:
        session = new_session(self.settings.api_url, self.settings.bot_token)
        client = WebexClient(self.settings.api_url, self.settings.bot_token)
        while not self._stop.is_set():
            try:
                claimed = self.ledger.claim(self.owner, self.lease)
                if claimed is None:
                    self._idle()
                    continue
                kind, row = claimed
                try:
                    self._work(kind, row, session, client)
                except (LostLease, sqlite3.Error):
                    raise
                except Exception as exc:  # a bug or the local disk: retry within the bound, then fail
                    log.exception("unexpected error on %s %s", kind, row["id"])
                    self._unexpected(kind, row, exc)
            except LostLease as exc:
                log.warning("lease on %s ran out while working on it; another worker has it", exc)
            except sqlite3.Error as exc:
                log.error("ledger error: %s", exc)
                self._stop.wait(1.0)
        session.close()
        client.close()

    def _work(self, kind: str, row: sqlite3.Row, session, client: WebexClient) -> None:
        if kind == "file":
            self._file(row, session)
        elif row["state"] == "resolving":
            self._resolve(row, client)
        else:
            self._reply(row, client)

    def _unexpected(self, kind: str, row: sqlite3.Row, exc: Exception) -> None:
        """Never leave an item leased forever: treat the error as temporary, within the bound."""
        detail = f"{type(exc).__name__}: {exc}"
        if kind == "file":
            self._retry_or_give_up(row, downloader.Retry("internal", detail))
            return
        now = self.clock()
        if self.policy.gives_up(row["attempts"], row["received_at"], now):
            self.ledger.message_done(row["id"], row["lease_owner"], "failed", detail)
        else:
            when = now + self.policy.delay(row["attempts"], None, self.rand)
            self.ledger.message_retry(row["id"], row["lease_owner"], when, detail)

    # -- messages
    def bot_id(self, client: WebexClient, refresh: bool = False) -> str:
        """The bot's person id: from memory, the ledger, or (once) ``people/me``."""
        with self._me_lock:
            if self._bot_id is None and not refresh:
                self._bot_id = self.ledger.meta("bot_id")
            if self._bot_id is None or refresh:
                me = client.me()
                self._bot_id = me["id"]
                self.ledger.set_meta("bot_id", me["id"])
                log.info("signed in as %s (%s)", me.get("displayName"), ", ".join(me.get("emails", [])))
            return self._bot_id

    def _resolve(self, row: sqlite3.Row, client: WebexClient) -> None:
        mid, claim = row["id"], row["lease_owner"]
        try:
            if row["person_id"] and row["person_id"] == self.bot_id(client):
                self.ledger.message_done(mid, claim, "ignored", "sent by the bot itself")
                log.info("event ignored message=%s reason=own-message", mid)
                return
            files = json.loads(row["webhook_files"]) if row["webhook_files"] else None
            if files is None:
                files = client.message(mid).get("files") or []
        except WebexError as exc:
            if exc.temporary and not self.policy.gives_up(row["attempts"], row["received_at"], self.clock()):
                when = self.clock() + self.policy.delay(row["attempts"], exc.retry_after, self.rand)
                self.ledger.message_retry(mid, claim, when, str(exc))
                log.warning("message lookup will be retried message=%s error=%s", mid, exc)
            else:
                self.ledger.message_done(mid, claim, "failed", str(exc))
                log.error("message lookup failed for good message=%s error=%s", mid, exc)
            return
        self.ledger.resolved(mid, claim, [f for f in files if isinstance(f, str)])
        log.info("message resolved message=%s files=%d", mid, len(files))
        self.wake()

    def _reply(self, row: sqlite3.Row, client: WebexClient) -> None:
        mid, claim = row["id"], row["lease_owner"]
        if row["reply_state"] == "sending":  # a holder stopped mid-send: it may have gone out
            self.ledger.reply_done(mid, claim, "failed", "interrupted while sending; not sent twice")
            return
        files = self.ledger.start_reply(mid, claim)
        if not files or not row["room_id"]:
            self.ledger.reply_done(mid, claim, "failed", "nothing to reply to")
            return
        parent = mid if row["room_type"] == "group" else None
        try:
            client.post_message(row["room_id"], reply_text(files, self.settings.max_file_size), parent)
        except WebexError as exc:
            if exc.status == 429 and row["attempts"] < 5:  # not posted: safe to try again
                when = self.clock() + self.policy.delay(row["attempts"], exc.retry_after, self.rand)
                self.ledger.reply_done(mid, claim, "pending", str(exc), when)
            else:
                self.ledger.reply_done(mid, claim, "failed", str(exc))
            log.warning("reply not sent message=%s error=%s", mid, exc)
            return
        self.ledger.reply_done(mid, claim, "sent")
        log.info("reply sent message=%s room=%s", mid, row["room_id"])

    # -- files
    def _dest_dir(self, row: sqlite3.Row) -> Path:
        return self.download_dir / subdir_for(self.settings.download_subdir, row)

    def _file(self, row: sqlite3.Row, session) -> None:
        fid, claim = row["id"], row["lease_owner"]
        part_path = row["part_path"]
        if row["final_path"]:
            part_path = self._reconcile(row)
            if part_path is None:
                return
        for stale in self.partial_dir.glob(f"{fid}-*.part"):  # from holders that stopped
            if stale.name != part_path:
                stale.unlink(missing_ok=True)
        part = self.partial_dir / part_path
        started = time.monotonic()
        try:
            result = downloader.fetch(
                row["url"], session=session, api_url=self.settings.api_url, part_path=part,
                max_size=self.settings.max_file_size, allow_unscannable=self.settings.allow_unscannable,
                should_stop=self._stop.is_set, chunk_size=self.chunk_size)
        except downloader.Interrupted:
            self.ledger.release(fid, claim)
            log.info("file interrupted by shutdown, back in the queue %s", _about(row))
            return
        duration = time.monotonic() - started
        self.metrics.duration.observe(duration)
        if isinstance(result, downloader.Fetched):
            self._commit(row, result, duration)
        elif isinstance(result, downloader.Retry):
            self._retry_or_give_up(row, result)
        else:
            self.ledger.failed(fid, claim, result.reason, result.detail, result.size)
            self.metrics.files.labels("failed", result.reason).inc()
            log.error("file failed %s url=%s reason=%s detail=%s duration=%.3fs",
                      _about(row), row["url"], result.reason, result.detail, duration)

    def _commit(self, row: sqlite3.Row, fetched: downloader.Fetched, duration: float | None) -> None:
        fid, claim = row["id"], row["lease_owner"]
        final = downloader.commit(fetched.part_path, self._dest_dir(row), fetched.name,
                                  before_link=lambda path: self.ledger.set_intent(fid, claim, path, fetched))
        self.ledger.saved(fid, claim, final, duration)
        self.metrics.files.labels("saved", "").inc()
        self.metrics.bytes.inc(fetched.size)
        log.info("file saved %s name=%r bytes=%d sha256=%s duration=%.3fs",
                 _about(row), str(final.relative_to(self.download_dir)), fetched.size, fetched.sha256,
                 duration or 0.0)

    def _reconcile(self, row: sqlite3.Row) -> str | None:
        """Finish a commit a stopped holder began: None if the file is now saved, else the
        name of the part file to download into afresh."""
        fid, claim, final = row["id"], row["lease_owner"], Path(row["final_path"])
        part = self.partial_dir / row["part_path"]
        linked = final.exists() and (not part.exists() or os.path.samefile(part, final))
        if linked and final.stat().st_size == row["size"]:
            part.unlink(missing_ok=True)
            self.ledger.saved(fid, claim, final, row["duration"])
            log.info("file saved (commit recovered after a restart) %s name=%r bytes=%d",
                     _about(row), final.name, row["size"])
            return None
        if part.exists() and part.stat().st_size == row["size"]:
            fetched = downloader.Fetched(part, row["name"], row["size"], row["sha256"], row["content_type"])
            self._commit(row, fetched, row["duration"])
            return None
        fresh = part_name(fid, claim)
        self.ledger.clear_intent(fid, claim, fresh)
        return fresh

    def _retry_or_give_up(self, row: sqlite3.Row, result: downloader.Retry) -> None:
        fid, claim, now = row["id"], row["lease_owner"], self.clock()
        delay = self.policy.delay(row["attempts"], result.delay, self.rand)
        if self.policy.gives_up(row["attempts"], row["first_try_at"] or now, now + delay):
            detail = f"{row['attempts']} attempts; last: {result.reason} ({result.detail})"
            self.ledger.failed(fid, claim, "gave_up", detail)
            self.metrics.files.labels("failed", "gave_up").inc()
            log.error("file failed %s url=%s reason=gave_up detail=%s", _about(row), row["url"], detail)
            return
        self.ledger.retry(fid, claim, now + delay, result.reason, result.detail)
        self.metrics.retries.labels(result.reason).inc()
        log.warning("file will be retried %s reason=%s detail=%s in=%.1fs attempt=%d",
                    _about(row), result.reason, result.detail, delay, row["attempts"])
