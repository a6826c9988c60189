"""Chaos suite: a real bot process, a fake Webex that misbehaves, SIGKILL at random moments.

    .venv/bin/python bench/chaos.py [--rounds 50] [--seed N] [--workdir DIR] [--keep]

Each round posts a few signed ``messages/created`` webhooks to a real ``python
app.py`` process (redelivered, shuffled, some held back and delivered after
newer ones, some concurrently) whose files are served by a :class:`FakeWebex`
in this process with scripted faults: 429 and 423 storms with a short
``Retry-After``, 5xx, connections cut mid-body, stalls, lying
``Content-Length``, failed message look-ups; plus files that must fail for good
(410 infected, 404, 428, too large, a URL on a second "stranger" server on
127.0.0.2 that must never see the token, a redirect to another host, the bot's
own messages). Most rounds end with SIGKILL of the server: when a random number
of body bytes has been streamed, the instant a new final name appears (inside a
commit), at a random time, in the middle of webhook deliveries, or right after a
restart. After the last round the server is killed and started once more,
the ledger is drained (polled with a deadline), and the outcome is checked:

* every file of every acknowledged message is on disk exactly once with the
  right SHA-256 (files are counted by hash); unacknowledged ones at most once;
* every file on disk is a complete expected file, and ``.partial/`` is empty;
* the stranger received nothing, and no redirected request carried the token;
* every file meant to fail is recorded as failed with the right reason;
* the token and the webhook secret are in no log line, no traceback was logged,
  ``/healthz`` answers 200 and SIGTERM stops the server cleanly.

It prints the seed and a summary table. ``--seed`` replays the same plan
(messages, fault scripts, kill moments); thread timing is not replayed. It exits
1 if any check fails: it is a check, not a benchmark. The core is
:func:`run`, which ``tests/test_chaos.py`` calls with fewer rounds.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from tests.conftest import SECRET  # noqa: E402
from tests.fakewebex import BOT_ID, FakeWebex, PatternBody, Reply, webhook_payload  # noqa: E402
from tests.serverproc import ServerProcess, in_flight, server_idle  # noqa: E402

MAX_FILE_SIZE = 3_000_000  # the server's MAX_FILE_SIZE; "too large" files are a little bigger
MIN_SIZE, MAX_SIZE = 50_000, 2_000_000
DRAIN_TIMEOUT = 240.0  # seconds for the ledger to drain after the final restart
KILL_WAIT = 5.0  # longest wait for the byte count that triggers a kill
NAMES = ["report.pdf", "report.pdf", "photo.jpg", "notes.txt", "Résumé 2026.docx", "../../etc/passwd",
         "CON.txt", "archive.tar.gz", "\u202egnp.exe", None, "data.csv", "slides.pptx"]
PERMANENT_KINDS = {  # kind -> the reasons the ledger may record for it
    "infected": {"infected"}, "not_found": {"not_found"}, "unscannable": {"unscannable"},
    "too_large": {"too_large"}, "untrusted_host": {"untrusted_host"},
    "redirect_out": {"unauthorized", "untrusted_host", "redirect"},
}
FAULT_LABELS = {  # counter key -> label in the summary, in display order
    "429": "429 with Retry-After (replies)", "429_storm": "429 storms (every file of a round)",
    "423": "423 scanning with Retry-After (replies)", "5xx": "5xx (replies)", "cut": "connection cut mid-body",
    "stall": "stall after headers / slow headers", "lying_length": "lying Content-Length (too big)",
    "api_fault": "429/503 on message look-up", "lookup": "files looked up (not in the webhook)",
    "redelivery": "redelivered webhooks", "late_redelivery": "old webhooks redelivered after newer",
    "held_back": "first delivery after newer messages", "concurrent": "batches delivered concurrently",
    "infected": "410 infected (permanent)", "not_found": "404 not found (permanent)",
    "unscannable": "428 unscannable (permanent)", "too_large": "too large (permanent)",
    "untrusted_host": "file URL on the stranger host", "redirect_out": "redirect to another host",
    "own_message": "bot's own message (ignored)",
    "kill_bytes": "SIGKILL after N body bytes", "kill_time": "SIGKILL at a random time",
    "kill_post": "SIGKILL during webhook delivery", "kill_commit": "SIGKILL as a final name appears",
    "kill_startup": "SIGKILL right after a restart", "kill_final": "SIGKILL before the final restart",
}


@dataclass
class File:
    url: str
    content_id: str
    sha256: str | None  # of the body, None if there is none
    expect: str  # "saved", or a PERMANENT_KINDS key
    faults: list[str] = field(default_factory=list)


@dataclass
class Msg:
    id: str
    files: list[File]
    in_webhook: bool  # data.files in the payload, else looked up with GET /messages/{id}
    own: bool = False  # sent by the bot itself: must be ignored
    acked: bool = False
    deliveries: int = 0

    def payload(self) -> dict:
        return webhook_payload(self.id, [f.url for f in self.files] if self.in_webhook else None,
                               person_id=BOT_ID if self.own else "PERSON1",
                               person_email="filebot@webex.bot" if self.own else "alice@example.com")


@dataclass
class Summary:
    seed: int
    rounds: int
    workdir: Path
    duration: float = 0.0
    drain: float = 0.0  # seconds from the final restart to an empty queue
    faults: Counter = field(default_factory=Counter)
    kills: int = 0
    kills_in_flight: int = 0  # kills that hit at least one download in flight
    downloads_interrupted: int = 0
    kills_in_commit: int = 0  # kills that left a commit intent unfinished
    messages: int = 0
    acked: int = 0
    deliveries: int = 0
    files_expected: int = 0  # files of acked messages that must be saved
    saved: int = 0  # of those, on disk exactly once with the right hash
    duplicates: int = 0  # extra copies of any file on disk
    lost: int = 0
    unacked_saved: int = 0  # files of unacknowledged messages saved (at most once each)
    expected_failures: int = 0
    failed_as_expected: int = 0
    unknown_files: int = 0  # on disk but matching no expected file (partial, corrupt, forbidden)
    token_leaks: int = 0
    checks: dict[str, bool] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(self.checks.values())

    def check(self, name: str, passed: bool, *problems: str) -> None:
        self.checks[name] = self.checks.get(name, True) and passed
        if not passed:
            self.problems.extend(problems)

    def table(self) -> str:
        lines = [f"chaos: seed {self.seed}, {self.rounds} rounds, {self.duration:.1f} s, workdir {self.workdir}",
                 "", f"  {'faults injected':<52}{'count':>7}"]
        for key, label in FAULT_LABELS.items():
            if self.faults.get(key):
                lines.append(f"  {label:<52}{self.faults[key]:>7}")
        rows = [
            ("messages (acknowledged / never acknowledged)", f"{self.acked} / {self.messages - self.acked}"),
            ("webhook deliveries", self.deliveries),
            ("drain after the final restart (s)", f"{self.drain:.1f}"),
            ("SIGKILLs (with downloads in flight)", f"{self.kills} ({self.kills_in_flight})"),
            ("downloads interrupted by a kill", self.downloads_interrupted),
            ("kills inside a commit (intent recorded, not saved)", self.kills_in_commit),
            ("files expected (acknowledged messages)", self.files_expected),
            ("saved exactly once, right SHA-256", self.saved),
            ("duplicates", self.duplicates),
            ("lost", self.lost),
            ("files of unacknowledged messages saved", self.unacked_saved),
            ("expected permanent failures", self.expected_failures),
            ("failed as expected (right reason)", self.failed_as_expected),
            ("unexpected files on disk", self.unknown_files),
            ("token leaks", self.token_leaks),
        ]
        lines += ["", f"  {'outcome':<52}{'':>7}"] + [f"  {k:<52}{v!s:>7}" for k, v in rows]
        lines += ["", "  checks"] + [f"  {'ok  ' if v else 'FAIL'}  {k}" for k, v in self.checks.items()]
        if self.problems:
            lines += ["", "  problems"] + [f"  - {p}" for p in self.problems[:40]]
            if len(self.problems) > 40:
                lines.append(f"  ... and {len(self.problems) - 40} more")
        lines += ["", f"  RESULT: {'PASS' if self.ok else 'FAIL'} (replay: bench/chaos.py --rounds {self.rounds}"
                      f" --seed {self.seed})"]
        return "\n".join(lines)


class Chaos:
    """One run: the fakes, the server process, the plan of messages, and the final checks."""

    def __init__(self, rounds: int, seed: int, workdir: Path, out: Callable[[str], None]):
        self.rounds = rounds
        self.rng = random.Random(seed)
        self.workdir = workdir
        self.out = out
        self.summary = Summary(seed, rounds, workdir)
        self.summary.check("the server never exits on its own", True)
        self.faults = self.summary.faults
        self.messages: list[Msg] = []
        self.held: dict[int, list[Msg]] = {}  # round -> messages whose first delivery waits until then
        self.n_files = 0
        self.fake = FakeWebex()
        self.stranger = FakeWebex(host="127.0.0.2")  # serves untrusted file URLs: must see nothing
        self.elsewhere = FakeWebex(host="127.0.0.2")  # redirect target: must never see the token
        self.server: ServerProcess | None = None
        self.expected_exit = True  # False while the server should be running

    # -- the plan
    def _body(self, size: int) -> PatternBody:
        self.n_files += 1
        return PatternBody(size, seed=f"{self.summary.seed}:{self.n_files}")

    def _size(self) -> int:
        return int(math.exp(self.rng.uniform(math.log(MIN_SIZE), math.log(MAX_SIZE))))

    def _headers(self, name: str | None) -> dict:
        headers = {"Content-Type": "application/octet-stream"}
        if name is not None:  # raw UTF-8 on the wire, as http.server sends str headers as Latin-1
            headers["Content-Disposition"] = f'attachment; filename="{name}"'.encode().decode("latin-1")
        return headers

    def _retry_after(self) -> dict:
        return {"Retry-After": self.rng.choice(["0", "0", "1"])}

    def ok_file(self, storm: bool) -> File:
        """A file that must be saved, behind a script of temporary faults."""
        rng = self.rng
        body = self._body(self._size())
        name = rng.choice(NAMES)
        headers = self._headers(name)
        url = self.fake.add_file(body, name=None, headers=headers)
        cid = url.rsplit("/", 1)[-1]
        script: list[Reply] = []
        faults: list[str] = []
        # Faults retried with exponential backoff first, while the attempt count (and so the
        # backoff) is still small; at most two of them keep a round within seconds.
        for _ in range(rng.choices([0, 1, 2], weights=[5, 4, 1])[0]):
            kind = rng.choice(["cut", "lying_length", "5xx"])
            if kind == "cut":
                script.append(Reply(200, headers, body, cut_after=rng.randrange(0, body.size)))
            elif kind == "lying_length":
                script.append(Reply(200, headers, body, length=body.size + rng.randrange(1, 100_000)))
            else:
                script.append(Reply(rng.choice([500, 502, 504]), {}))
            faults.append(kind)
        # Faults with a Retry-After of 0 or 1 s, in storms.
        storms: list[Reply] = []
        n429 = rng.randint(1, 3) if storm else (rng.randint(1, 4) if rng.random() < 0.3 else 0)
        storms += [Reply(429, self._retry_after()) for _ in range(n429)]
        n423 = rng.randint(1, 4) if rng.random() < 0.25 else 0
        storms += [Reply(423, self._retry_after()) for _ in range(n423)]
        if rng.random() < 0.15:
            storms.append(Reply(503, self._retry_after()))
        rng.shuffle(storms)
        script += storms
        faults += [str(r.status) if r.status != 503 else "5xx" for r in storms]
        # The good answer, sometimes slow to start, often trickled (so kills land mid-stream).
        final = Reply(200, headers, body)
        if rng.random() < 0.15:
            final.stall = rng.uniform(1.0, 2.0)
            faults.append("stall")
        elif rng.random() < 0.1:
            final.delay = rng.uniform(0.5, 1.5)
            faults.append("stall")
        if rng.random() < 0.6:
            final.trickle = rng.uniform(0.002, 0.01)
        script.append(final)
        self.fake.script(url, *script)
        self.faults.update(faults)
        return File(url, cid, body.sha256(), "saved", faults)

    def failing_file(self, kind: str) -> File:
        """A file whose expected outcome is a permanent failure of ``kind``."""
        rng = self.rng
        self.faults[kind] += 1
        if kind == "untrusted_host":
            body = self._body(self._size())
            url = self.stranger.add_file(body, name="stranger.bin")
            return File(url, url.rsplit("/", 1)[-1], body.sha256(), kind, [kind])
        if kind == "too_large":
            body = self._body(MAX_FILE_SIZE + rng.randrange(1, 500_000))
            url = self.fake.add_file(body, name="big.iso")
            return File(url, url.rsplit("/", 1)[-1], body.sha256(), kind, [kind])
        url = self.fake.add_file(b"", name="x.bin")
        cid = url.rsplit("/", 1)[-1]
        sha = None
        if kind == "redirect_out":
            body = self._body(self._size())
            target = self.elsewhere.add_file(body, name="elsewhere.bin")
            self.fake.files[cid] = Reply(302, {"Location": target})
            sha = body.sha256()
        else:
            status = {"infected": 410, "not_found": 404, "unscannable": 428}[kind]
            self.fake.files[cid] = Reply(status, {})
            if kind == "infected" and rng.random() < 0.5:  # scanned for a while, then found infected
                n = rng.randint(1, 3)
                self.fake.script(url, *[Reply(423, self._retry_after()) for _ in range(n)])
                self.faults["423"] += n
        return File(url, cid, sha, kind, [kind])

    def new_message(self, round_no: int, index: int, storm: bool) -> Msg:
        rng = self.rng
        own = rng.random() < 0.05
        files = []
        for _ in range(rng.choices([1, 2, 3], weights=[5, 3, 2])[0]):
            if own:  # plain files: they must never be fetched at all
                body = self._body(self._size())
                url = self.fake.add_file(body, name="mine.bin")
                files.append(File(url, url.rsplit("/", 1)[-1], body.sha256(), "saved"))
            elif rng.random() < 0.15:
                files.append(self.failing_file(rng.choice(list(PERMANENT_KINDS))))
            else:
                files.append(self.ok_file(storm))
        msg = Msg(f"CHAOS-{self.summary.seed}-R{round_no:03d}-{index}", files, in_webhook=rng.random() < 0.7,
                  own=own)
        self.faults["own_message"] += own
        if not msg.in_webhook:
            self.faults["lookup"] += 1
            self.fake.add_message(msg.id, [f.url for f in files],
                                  person_id=BOT_ID if msg.own else "PERSON1")
            if rng.random() < 0.3:
                statuses = [rng.choice([429, 503]) for _ in range(rng.randint(1, 3))]
                self.fake.fail_api.setdefault("/v1/messages/", []).extend(statuses)
                self.faults["api_fault"] += len(statuses)
        self.messages.append(msg)
        return msg

    def deliveries(self, round_no: int) -> list[Msg]:
        """This round's webhook deliveries: new messages, redeliveries, late ones, shuffled."""
        rng = self.rng
        storm = rng.random() < 0.15
        if storm:
            self.faults["429_storm"] += 1
        old = list(self.messages)
        batch: list[Msg] = list(self.held.pop(round_no, []))
        for i in range(rng.randint(1, 3)):
            msg = self.new_message(round_no, i, storm)
            if rng.random() < 0.12 and round_no + 1 < self.rounds:
                self.held.setdefault(rng.randint(round_no + 1, min(self.rounds - 1, round_no + 3)), []).append(msg)
                self.faults["held_back"] += 1
                continue
            batch.append(msg)
            if rng.random() < 0.3:
                extra = rng.choice([1, 1, 2, 3, 8])
                batch += [msg] * extra
                self.faults["redelivery"] += extra
        if old and rng.random() < 0.4:
            for msg in rng.sample(old, min(len(old), rng.randint(1, 3))):
                batch.append(msg)
                self.faults["late_redelivery"] += 1
        rng.shuffle(batch)
        return batch

    # -- driving the server
    def start(self) -> None:
        self.server.start()
        self.expected_exit = False

    def kill(self) -> None:
        """SIGKILL now; then see in the ledger what the dead process held (rows stay 'active')."""
        self.server.kill()
        self.expected_exit = True
        self.summary.kills += 1
        try:
            n = in_flight(self.workdir)
            db = self._db()
            try:  # a commit intent recorded and not finished: the kill landed inside a commit
                commits = db.execute("SELECT count(*) FROM files WHERE state = 'active'"
                                     " AND final_path IS NOT NULL").fetchone()[0]
            finally:
                db.close()
        except sqlite3.Error:
            n = commits = 0
        self.summary.kills_in_flight += n > 0
        self.summary.downloads_interrupted += n
        self.summary.kills_in_commit += commits > 0

    def _final_names(self) -> int:
        try:
            return sum(1 for e in os.scandir(self.workdir / "downloads") if e.name != ".partial")
        except FileNotFoundError:
            return 0

    def running(self) -> bool:
        proc = self.server.proc
        if proc is None or proc.poll() is not None:
            if proc is not None and not self.expected_exit:
                self.summary.check("the server never exits on its own", False,
                                   f"server exited by itself with code {proc.returncode}")
                self.expected_exit = True
            return False
        return True

    def post(self, batch: list[Msg], concurrent: bool) -> None:
        def one(msg: Msg) -> None:
            ok = self.server.post(msg.payload())
            msg.deliveries += 1
            msg.acked = msg.acked or ok
        if concurrent:
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(one, batch))
        else:
            for msg in batch:
                one(msg)
        self.summary.deliveries += len(batch)

    def round(self, round_no: int) -> None:
        rng = self.rng
        if not self.running():
            self.start()
            if rng.random() < 0.1:  # kill it again while it recovers what the last kill left
                self.kill()
                self.faults["kill_startup"] += 1
                self.start()
        batch = self.deliveries(round_no)
        concurrent = rng.random() < 0.4
        self.faults["concurrent"] += concurrent
        mode = rng.choices(["bytes", "commit", "time", "post", "none"], weights=[35, 15, 10, 10, 30])[0]
        if mode == "post":  # kill while webhooks are being delivered
            poster = threading.Thread(target=self.post, args=(batch, concurrent))
            poster.start()
            time.sleep(rng.uniform(0, 0.05))
            self.kill()
            poster.join()
            self.faults["kill_post"] += 1
        else:
            self.post(batch, concurrent)
            if mode == "bytes":
                target = self.fake.bytes_sent + rng.randrange(0, 3_000_000)
                self._poll(lambda: self.fake.bytes_sent >= target or server_idle(self.workdir), KILL_WAIT)
                self.kill()
                self.faults["kill_bytes"] += 1
            elif mode == "commit":  # the instant a new final name appears, before the ledger says saved
                names = self._final_names()
                self._poll(lambda: self._final_names() > names, KILL_WAIT, interval=0.0005)
                self.kill()
                self.faults["kill_commit"] += 1
            elif mode == "time":
                time.sleep(rng.uniform(0, 1.0))
                self.kill()
                self.faults["kill_time"] += 1
            else:
                time.sleep(rng.uniform(0, 0.5))
        acked = sum(m.acked for m in self.messages)
        self.out(f"round {round_no + 1:3d}/{self.rounds}: {len(batch)} deliveries, "
                 f"{len(self.messages)} messages ({acked} acked), {self.fake.bytes_sent / 1e6:.0f} MB sent, "
                 f"end: {'SIGKILL ' + mode if mode != 'none' else 'keep running'}")

    @staticmethod
    def _poll(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(interval)

    # -- the run
    def run(self) -> Summary:
        started = time.monotonic()
        self.fake.start()
        self.stranger.start()
        self.elsewhere.start()
        self.server = ServerProcess(self.workdir, self.fake, workers=4)
        self.server.env.update({"LOG_LEVEL": "INFO", "MAX_FILE_SIZE": str(MAX_FILE_SIZE)})
        if self.rng.random() < 0.5:  # the first look-up of the bot's own id hits a rate limit
            self.fake.fail_api["/v1/people/me"] = [429]
            self.faults["api_fault"] += 1
        try:
            for round_no in range(self.rounds):
                self.round(round_no)
            if self.running():
                self.kill()
                self.faults["kill_final"] += 1
            self.start()
            late = [m for r in sorted(self.held) for m in self.held[r]]
            self.held.clear()
            if late:
                self.post(late, concurrent=False)
            self.out("final restart: waiting for the ledger to drain ...")
            drain_started = time.monotonic()
            drained = self._poll(lambda: server_idle(self.workdir), DRAIN_TIMEOUT, interval=0.1)
            self.summary.drain = time.monotonic() - drain_started
            self.summary.check(f"the ledger drains within {DRAIN_TIMEOUT:.0f} s after the final restart",
                               drained, *([] if drained else self._pending()))
            self.verify()
        except Exception as exc:  # a server that will not start is a finding, not a crash of this script
            self.summary.check("the chaos run completes", False, f"{type(exc).__name__}: {exc}",
                               *self._log_tail(15))
        finally:
            if self.server is not None and self.server.proc is not None and self.server.proc.poll() is None:
                self.server.kill()
            if self.server is not None:
                self.server.log.close()
            for fake in (self.fake, self.stranger, self.elsewhere):
                fake.stop()
        self.summary.messages = len(self.messages)
        self.summary.acked = sum(m.acked for m in self.messages)
        self.summary.duration = time.monotonic() - started
        return self.summary

    # -- the checks
    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.workdir / "bot.sqlite3", timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def _pending(self) -> list[str]:
        db = self._db()
        try:
            rows = db.execute("SELECT id, message_id, state, attempts, reason, detail, next_at - ? AS due"
                              " FROM files WHERE next_at IS NOT NULL", (time.time(),)).fetchall()
            rows += db.execute("SELECT id, state, attempts, error, next_at - ? AS due FROM messages"
                               " WHERE next_at IS NOT NULL", (time.time(),)).fetchall()
        finally:
            db.close()
        return [f"still pending: {dict(r)}" for r in rows]

    def _log(self) -> str:
        path = self.workdir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _log_tail(self, n: int) -> list[str]:
        return ["log: " + line for line in self._log().splitlines()[-n:]]

    def _log_about(self, *needles: str, limit: int = 12) -> list[str]:
        lines = [line for line in self._log().splitlines() if any(n in line for n in needles)]
        return ["log: " + line for line in lines[-limit:]]

    def verify(self) -> None:
        s = self.summary
        downloads = self.workdir / "downloads"
        on_disk: dict[str, list[Path]] = {}
        for path in sorted(downloads.rglob("*")):
            if path.is_file() and ".partial" not in path.relative_to(downloads).parts:
                on_disk.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), []).append(path)
        db = self._db()
        try:
            ledger = {(r["message_id"], r["position"]): r for r in db.execute("SELECT * FROM files")}
            recorded = {r["id"] for r in db.execute("SELECT id FROM messages")}
        finally:
            db.close()

        allowed: set[str] = set()
        forbidden: dict[str, str] = {}
        lost, dups, wrong_outcome, not_ignored = [], [], [], []
        for msg in self.messages:
            for pos, f in enumerate(msg.files):
                copies = on_disk.get(f.sha256, []) if f.sha256 else []
                where = f"message {msg.id} file {pos} ({f.expect}; faults {f.faults or 'none'})"
                if msg.own:
                    if f.sha256:
                        forbidden[f.sha256] = f"file of the bot's own {where}"
                    if self.fake.requests_for(f.content_id):
                        not_ignored.append(f"the bot's own {where} was downloaded")
                    continue
                if f.expect != "saved":
                    if f.sha256:
                        forbidden[f.sha256] = f"must-fail {where}"
                    if msg.acked:
                        s.expected_failures += 1
                        row = ledger.get((msg.id, pos))
                        if row is not None and row["state"] == "failed" and row["reason"] in PERMANENT_KINDS[f.expect]:
                            s.failed_as_expected += 1
                        else:
                            state = f"{row['state']}/{row['reason']}" if row is not None else "not in the ledger"
                            wrong_outcome.append(f"{where}: expected failed/{f.expect}, ledger says {state}")
                    continue
                allowed.add(f.sha256)
                if len(copies) > 1:
                    dups.append(f"{where}: {len(copies)} copies: {[p.name for p in copies]}")
                    s.duplicates += len(copies) - 1
                if not msg.acked:
                    s.unacked_saved += len(copies) == 1
                    continue
                s.files_expected += 1
                row = ledger.get((msg.id, pos))
                if len(copies) == 1:
                    s.saved += 1
                    if row is None or row["state"] != "saved" or row["sha256"] != f.sha256 \
                            or Path(row["final_path"]).resolve() != copies[0].resolve():
                        state = dict(row) if row is not None else "not in the ledger"
                        wrong_outcome.append(f"{where}: on disk as {copies[0].name} but the ledger says {state}")
                elif not copies:
                    s.lost += 1
                    state = f"{row['state']} {row['reason']} {row['detail']} attempts={row['attempts']}" \
                        if row is not None else ("message recorded, file not" if msg.id in recorded
                                                 else "message not in the ledger")
                    lost.append(f"LOST {where}; ledger: {state}")
                    lost += self._log_about(msg.id, limit=8)
        unknown = []
        for sha, paths in on_disk.items():
            if sha not in allowed:
                s.unknown_files += len(paths)
                what = forbidden.get(sha, "no file that was sent (partial or corrupt?)")
                unknown.append(f"{[str(p.relative_to(downloads)) for p in paths]} matches {what}")
        partial = downloads / ".partial"
        leftovers = sorted(p.name for p in partial.iterdir()) if partial.exists() else []

        s.check("every file of every acknowledged message saved, right SHA-256", not lost, *lost)
        s.check("no file saved twice (acknowledged or not)", not dups, *dups)
        s.check("every file on disk is a complete expected file", not unknown, *unknown)
        s.check(".partial/ is empty", not leftovers, *[f".partial/{n} left behind" for n in leftovers])
        s.check("the ledger agrees; must-fail files failed with the right reason", not wrong_outcome,
                *wrong_outcome)
        s.check("the bot's own messages are ignored", not not_ignored, *not_ignored)

        leaks = [f"stranger got {r.method} {r.path} (Authorization: {'yes' if r.authorization else 'no'})"
                 for r in self.stranger.requests]
        leaks += [f"redirect target got the token: {r.method} {r.path}"
                  for r in self.elsewhere.requests if r.authorization]
        s.token_leaks = len(leaks)
        s.check("nothing sent to the untrusted host; no token after a redirect", not leaks, *leaks)
        log = self._log()
        secrets = [name for name, value in (("token", self.fake.token), ("webhook secret", SECRET)) if value in log]
        s.check("no token or secret in the server log", not secrets, *[f"the {n} is in server.log" for n in secrets])
        crashes = [line for line in log.splitlines() if "Traceback" in line or "unexpected error" in line]
        s.check("no traceback or unexpected error logged", not crashes, *crashes[:5], *self._log_about("Error", limit=5))

        try:
            health = requests.get(f"{self.server.url}/healthz", timeout=5)
            healthy, detail = health.status_code == 200, f"/healthz {health.status_code}: {health.text.strip()}"
        except requests.RequestException as exc:
            healthy, detail = False, f"/healthz unreachable: {type(exc).__name__}"
        s.check("the process is healthy (/healthz 200)", healthy and self.running(), detail)
        try:
            code = self.server.terminate(timeout=30)
        except Exception as exc:  # subprocess.TimeoutExpired
            code = f"{type(exc).__name__}"
        self.expected_exit = True
        s.check("SIGTERM stops it cleanly (exit 0)", code == 0, f"exit code after SIGTERM: {code}")


def run(rounds: int = 50, seed: int | None = None, workdir: Path | None = None, keep: bool = False,
        out: Callable[[str], None] | None = None) -> Summary:
    """Run the chaos suite and return its :class:`Summary` (``summary.ok`` is the verdict).

    Without ``workdir`` a temporary folder is used and removed after a passing
    run unless ``keep``; after a failing run it is kept for the evidence
    (``server.log``, ``bot.sqlite3``, ``downloads/``).
    """
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "big")
    own_dir = workdir is None
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out = out or (lambda line: None)
    out(f"chaos: seed {seed}, {rounds} rounds, workdir {workdir}")
    summary = Chaos(rounds, seed, workdir, out).run()
    if own_dir and summary.ok and not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50, help="rounds of webhooks, faults and kills (50)")
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: a random seed, printed)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the ledger, files and log here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workdir after a passing run")
    parser.add_argument("--quiet", action="store_true", help="only the summary table")
    args = parser.parse_args(argv)
    summary = run(args.rounds, args.seed, args.workdir, args.keep,
                  out=None if args.quiet else (lambda line: print(line, flush=True)))
    print(summary.table(), flush=True)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
