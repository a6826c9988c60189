"""Benchmark 5: scale of the ledger, webhook acknowledgement and claim time at 10,000 vs 1,000,000 rows.

Each ledger is created by ``jobs.Ledger`` (the real schema), then filled
directly with SQLite ``executemany`` in big transactions: N messages with one
file each, all saved except 1,000 still queued. Then, on the real code:

* webhook acknowledgement: ``app.receive_webhook`` (verify, parse, record:
  one committed transaction) for 1,000 new messages with one file each;
* ``Ledger.claim`` 1,000 times (each takes the next due file);
* the ledger's other recurring queries: ``next_due`` (each idle worker, every
  poll), ``renew`` (the lease heartbeat), ``queue_counts`` (/healthz,
  /metrics) and ``release_owners`` (each start of the workers).

It also prints ``EXPLAIN QUERY PLAN`` for every statement these calls ran
(captured with a trace callback, so it is the code's SQL, not a copy).

    .venv/bin/python bench/ledger_scale.py [--sizes 10000 1000000]
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path

# common first: it puts the project root on sys.path
from common import SECRET, save, stats_ms, table, title, verdict

from app import create_app, receive_webhook
from config import load_settings
from jobs import Ledger, new_owner
from tests.fakewebex import BOT_ID, webhook_payload
from webex import signature

QUEUED = 1000  # files still waiting, the same at every size
SAMPLES = 1000
BATCH = 50_000


def webex_id(kind: str) -> str:
    return base64.b64encode(f"ciscospark://us/{kind}/{uuid.uuid4()}".encode()).decode().rstrip("=")


def fill(path: Path, rows: int) -> float:
    """``rows`` messages with one file each, the newest QUEUED of them still queued."""
    Ledger(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")  # the filling is not what is measured
    db.execute("INSERT INTO meta (key, value) VALUES ('bot_id', ?)", (BOT_ID,))
    started, now = time.perf_counter(), time.time()
    for first in range(0, rows, BATCH):
        messages, files = [], []
        for i in range(first, min(first + BATCH, rows)):
            when = now - (rows - i)  # one a second, oldest first
            mid, content = webex_id("MESSAGE"), webex_id("CONTENT")
            url = f"https://webexapis.com/v1/contents/{content}/0"
            messages.append((mid, webex_id("ROOM"), "direct", webex_id("PEOPLE"), f"user{i % 500}@example.com",
                             when, json.dumps([url])))
            if i < rows - QUEUED:
                files.append((mid, url, "saved", None, when, f"/srv/filebot/downloads/report-{i}.pdf",
                              f"report-{i}.pdf", 1_234_567, uuid.uuid4().hex * 2, "application/pdf", 0.4, when))
            else:
                files.append((mid, url, "queued", when, None, None, None, None, None, None, None, when))
        db.execute("BEGIN")
        db.executemany("INSERT INTO messages (id, room_id, room_type, person_id, person_email, received_at,"
                       " state, webhook_files, attempts) VALUES (?, ?, ?, ?, ?, ?, 'ready', ?, 1)", messages)
        db.executemany("INSERT INTO files (message_id, position, url, state, next_at, attempts, first_try_at,"
                       " final_path, name, size, sha256, content_type, duration, updated_at)"
                       " VALUES (?, 0, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?)", files)
        db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return time.perf_counter() - started


def timed(call, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        out.append(time.perf_counter() - started)
    return out


class Statements:
    """The SQL a block of code runs on the ledger's connection, via sqlite3's trace callback."""

    def __init__(self, db: sqlite3.Connection):
        self.db, self.seen = db, []

    def __enter__(self) -> list[str]:
        self.db.set_trace_callback(self.seen.append)
        return self.seen

    def __exit__(self, *exc) -> None:
        self.db.set_trace_callback(None)


def plans(db: sqlite3.Connection, calls: dict) -> dict[str, list[tuple[str, list[str]]]]:
    """``{call: [(statement, plan lines)]}`` for each data statement each call ran."""
    out = {}
    for name, call in calls.items():
        with Statements(db) as seen:
            call()
        statements = [s for s in seen if re.match(r"\s*(SELECT|INSERT|UPDATE|DELETE)", s, re.I)]
        out[name] = [(s, [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {s}")]) for s in statements]
    return out


def unindexed(plan_lines: list[str]) -> list[str]:
    """Plan lines that read a table without any index (``SCAN files``, or a bare ``SEARCH files``)."""
    return [line for line in plan_lines if re.fullmatch(r"(SCAN|SEARCH) \w+", line.strip())]


class Subject:
    """One filled ledger and the real code working on it."""

    def __init__(self, rows: int, tmp: Path):
        self.rows = rows
        path = tmp / f"ledger-{rows}.sqlite3"
        self.fill_seconds = fill(path, rows)
        self.file_mib = path.stat().st_size / 2**20
        settings = load_settings({"WEBEX_BOT_TOKEN": "bench-token", "WEBEX_WEBHOOK_SECRET": SECRET,
                                  "DOWNLOAD_DIR": str(tmp / "downloads"), "DATABASE_URL": f"sqlite:///{path}",
                                  "LOG_LEVEL": "WARNING", "REPLY_ON_SAVE": "false"})
        self.bot = create_app(settings).extensions["filebot"]
        self.ledger, self.owner = self.bot.ledger, new_owner()
        self.bodies = iter([json.dumps(webhook_payload(f"{rows}-{i}", [f"https://webexapis.com/v1/contents/{i}"]))
                            .encode() for i in range(SAMPLES + 50)])
        self.calls = {"webhook": self.webhook, "claim": self.claim, "next_due": self.ledger.next_due,
                      "renew": lambda: self.ledger.renew(self.owner, 60.0), "queue_counts": self.ledger.queue_counts,
                      "release_owners": lambda: self.ledger.release_owners(lambda owner: False)}
        self.times: dict[str, list[float]] = {name: [] for name in self.calls}

    def webhook(self) -> None:
        body = next(self.bodies)
        status = receive_webhook(self.bot, body, signature(SECRET, body), "127.0.0.1")[1]
        if status != 202:
            raise RuntimeError(f"webhook answered {status}")

    def claim(self) -> None:
        if self.ledger.claim(self.owner, 60.0) is None:
            raise RuntimeError("nothing to claim")

    def run(self, name: str, n: int) -> None:
        self.times[name] += timed(self.calls[name], n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[10_000, 1_000_000])
    args = parser.parse_args()
    small_n, large_n = args.sizes
    title("ledger_scale", f"webhook and claim time with {small_n:,} vs {large_n:,} rows in the ledger")

    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        subjects = []
        for rows in args.sizes:
            subjects.append(Subject(rows, Path(tmp)))
            print(f"   {rows:>9,} rows: filled in {subjects[-1].fill_seconds:.1f} s "
                  f"({subjects[-1].file_mib:.0f} MiB)", flush=True)
        captured = plans(subjects[-1].ledger._db(), subjects[-1].calls)
        for s in subjects:  # warm up, then forget
            s.run("webhook", 10)
            s.run("claim", 10)
            s.times = {name: [] for name in s.times}
        for _ in range(10):  # alternate in small batches, so both sizes see the same noise
            for name, n in (("webhook", SAMPLES // 10), ("claim", SAMPLES // 10), ("next_due", 1), ("renew", 1),
                            ("queue_counts", 1), ("release_owners", 1)):
                for s in subjects:
                    s.run(name, n)
        results = [{"rows": s.rows, "fill_seconds": s.fill_seconds, "file_mib": s.file_mib,
                    **{name: stats_ms(t) for name, t in s.times.items()}} for s in subjects]
        for s in subjects:
            s.ledger.close()
    small, large = results

    print(f"\n   EXPLAIN QUERY PLAN of each statement these calls ran, at {large_n:,} rows:")
    scans: dict[str, list[str]] = {}
    for call, statements in captured.items():
        for statement, lines in statements:
            print(f"\n   {call}: {' '.join(statement.split())[:110]}")
            for line in lines or ["(no table read)"]:
                print(f"      {line}{'   <-- no index: reads the whole table' if unindexed([line]) else ''}")
            if unindexed(lines):
                scans.setdefault(call, []).append(" ".join(statement.split())[:90])

    rows, summary = [], []
    for what in ("webhook", "claim", "next_due", "renew", "queue_counts", "release_owners"):
        a, b = small[what], large[what]
        rows.append([what, f"{a['p50']:.2f}", f"{b['p50']:.2f}", f"{b['p50'] / a['p50']:.2f}",
                     f"{a['p99']:.2f}", f"{b['p99']:.2f}", f"{b['p99'] / a['p99']:.2f}"])
        if what in ("webhook", "claim"):
            ratio = b["p50"] / a["p50"]
            summary.append([f"{what} p50, {large_n:,} / {small_n:,} rows",
                            f"{ratio:.2f} ({b['p50']:.2f} vs {a['p50']:.2f} ms)", "< 1.5 (no growth)",
                            verdict(ratio < 1.5)])
    print("\n" + table(rows, ["ms", f"p50 {small_n:,}", f"p50 {large_n:,}", "ratio", f"p99 {small_n:,}",
                              f"p99 {large_n:,}", "ratio"]))
    summary.append(["calls reading a whole table", ", ".join(scans) or "none", "none", verdict(not scans)])
    plans_json = {k: [{"sql": sql, "plan": p} for sql, p in v] for k, v in captured.items()}
    save("ledger_scale", {"sizes": args.sizes, "queued": QUEUED, "results": results, "plans": plans_json,
                          "unindexed": scans}, summary)


if __name__ == "__main__":
    main()
