"""Benchmark 3: webhook acknowledgement under load, the bot under gunicorn vs a bare 204 endpoint.

Both run as documented: ``gunicorn -c gunicorn.conf.py APP`` (one process,
gthread, 8 threads), configured through the environment. The bot's download
workers are busy with slow downloads from a fake Webex on loopback (files
trickling at ~1.3 MB/s) and every webhook queues one more such file. Each
server gets two phases:

* fixed rate: an open-loop generator (Python threads, keep-alive connections)
  sends signed webhooks on a schedule; latency runs from the *scheduled* time,
  so a stalled server is not hidden by a generator that waits for it;
* saturation: ``wrk`` (or, without it, the same generator as fast as it can).

Every webhook has its own message id, so each one is recorded in the ledger.

    .venv/bin/python bench/webhooks.py [--rate 200] [--seconds 10]
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import re
import resource
import sqlite3
import subprocess
import tempfile
import threading
import time
from pathlib import Path

# common first: it puts the project root on sys.path
from common import (BENCH, MiB, SECRET, bot_env, find_tool, free_port, gunicorn, save, stats_ms, table, title,
                    verdict)

from tests.fakewebex import FakeWebex, PatternBody, webhook_payload
from webex import signature

TRICKLE = 0.05  # seconds between 64 KiB pieces: ~1.3 MB/s per download
SLOW_FILE = 16 * MiB


def signed_bodies(n: int, prefix: str, file_url: str) -> list[tuple[bytes, dict]]:
    out = []
    for i in range(n):
        body = json.dumps(webhook_payload(f"{prefix}-{i}", [file_url])).encode()
        out.append((body, {"Content-Type": "application/json", "X-Spark-Signature": signature(SECRET, body)}))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (gunicorn's master and its worker)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for p in [str(pid), *children]:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    except OSError:
        pass
    return total


def drive(port: int, bodies: list[tuple[bytes, dict]], seconds: float, rate: float | None,
          connections: int = 32) -> dict:
    """Send ``bodies`` to POST /webhook: on a schedule of ``rate``/s (open loop), or as fast as possible.

    Latency is measured from the scheduled send time (open loop) or the actual
    send time (as fast as possible). Bounded by ``seconds`` plus the timeouts.
    """
    total = int(rate * seconds) if rate else len(bodies)
    counter = itertools.count()
    results: list[tuple[float, float, float, bool]] = []  # due, sent, done, ok
    start = time.perf_counter() + 0.1
    end = start + seconds

    def client() -> None:
        conn = None
        while True:
            i = next(counter)
            if i >= total:
                return
            due = start + i / rate if rate else time.perf_counter()
            if not rate and due >= end:
                return
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            sent = time.perf_counter()
            body, headers = bodies[i % len(bodies)]
            try:
                conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("POST", "/webhook", body, headers)
                response = conn.getresponse()
                response.read()
                ok = 200 <= response.status < 300
                if response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                ok = False
                if conn:
                    conn.close()
                conn = None
            results.append((due, sent, time.perf_counter(), ok))

    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    threads = [threading.Thread(target=client, daemon=True) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    elapsed = max(r[2] for r in results) - start
    sends = sorted(r[1] for r in results)
    ok = sum(r[3] for r in results)
    return {"generator": f"python open loop, {connections} connections" if rate else
            f"python closed loop, {connections} connections",
            "sent": len(results), "ok": ok, "errors": len(results) - ok, "seconds": elapsed,
            "throughput": ok / elapsed, "send_rate": (len(sends) - 1) / max(sends[-1] - sends[0], 1e-9),
            "send_lag_p99_ms": stats_ms([r[1] - r[0] for r in results])["p99"] if rate else 0.0,
            "generator_cores": (cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime
                                - cpu_before.ru_stime) / elapsed,
            **stats_ms([r[2] - r[0] for r in results])}


def saturate(port: int, bodies: list[tuple[bytes, dict]], seconds: float, tmp: Path) -> dict:
    """As many webhooks as the server takes: wrk with pre-signed bodies, else the Python generator."""
    wrk = find_tool("wrk", "wrk")
    if not wrk:
        return drive(port, bodies, seconds, rate=None, connections=16)
    path = tmp / "bodies.tsv"
    with open(path, "wb") as f:
        for body, headers in bodies:
            f.write(headers["X-Spark-Signature"].encode() + b"\t" + body + b"\n")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([wrk, "-t1", "-c16", f"-d{seconds:.0f}s", "--timeout", "10s", "-s",
                          str(BENCH / "webhook.lua"), f"http://127.0.0.1:{port}/webhook", "--", str(path)],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = json.loads(re.search(r"^JSON (.*)$", out, re.MULTILINE).group(1))
    elapsed = r["duration_us"] / 1e6
    ok = r["requests"] - r["non_2xx_3xx"] - r["errors"]
    return {"generator": "wrk -t1 -c16", "sent": r["requests"], "ok": ok, "errors": r["requests"] - ok,
            "seconds": elapsed, "throughput": ok / elapsed, "send_rate": r["requests"] / elapsed,
            "send_lag_p99_ms": 0.0, "unique_bodies": min(r["requests"], len(bodies)),
            "generator_cores": (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / elapsed,
            "n": r["requests"], "p50": r["p50_us"] / 1000, "p99": r["p99_us"] / 1000, "max": r["max_us"] / 1000}


def healthz(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/healthz")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def measure(label: str, app_spec: str, env: dict, tmp: Path, args, bodies, warm_up) -> dict:
    phases = {}
    port = int(env["PORT"])
    with gunicorn(app_spec, env, tmp, tmp / f"{label}.log") as proc:
        warm_up(port)
        for phase, rate in (("fixed", args.rate), ("saturation", None)):
            cpu = cpu_seconds(proc.pid)
            start = time.perf_counter()
            if rate:
                result = drive(port, bodies[phase], args.seconds, rate)
            else:
                result = saturate(port, bodies[phase], args.seconds, tmp)
            cpu = cpu_seconds(proc.pid) - cpu
            result["server_cores"] = cpu / (time.perf_counter() - start)
            result["server_cpu_ms_per_ack"] = cpu / max(result["ok"], 1) * 1000
            if label == "bot":
                queue = healthz(port).get("queue", {})
                result["downloads_in_flight"] = queue.get("active")
            phases[phase] = result
            print(f"   {label:4} {phase:10}: {result['throughput']:6.0f}/s  p50 {result['p50']:6.1f} ms"
                  f"  p99 {result['p99']:6.1f} ms  max {result['max']:6.1f} ms  errors {result['errors']}",
                  flush=True)
            time.sleep(1)
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="webhooks per second in the fixed phase")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    args = parser.parse_args()
    title("webhooks", f"signed webhooks at {args.rate:.0f}/s and at saturation, {args.seconds:.0f} s each, "
                      "bot (with slow downloads) vs bare 204 endpoint")

    with FakeWebex() as fake, tempfile.TemporaryDirectory(prefix="bench-webhooks-") as tmp_name:
        tmp = Path(tmp_name)
        slow_url = fake.add_file(PatternBody(SLOW_FILE), name="slow.bin", content_type="application/octet-stream")
        fake.files[slow_url.rsplit("/", 1)[-1]].trickle = TRICKLE
        n_fixed = int(args.rate * args.seconds)
        results = {}
        for label, app_spec in (("bare", "bare_app:create_app()"), ("bot", "app:create_app()")):
            bodies = {"fixed": signed_bodies(n_fixed, f"{label}-fixed", slow_url),
                      "saturation": signed_bodies(int(6000 * args.seconds), f"{label}-sat", slow_url)}
            env = bot_env(tmp / label, fake.api_url, fake.token, free_port())
            (tmp / label).mkdir()
            results[label] = measure(label, app_spec, env, tmp / label, args, bodies,
                                     (lambda port: warm_up_bot(port, slow_url)) if label == "bot" else warm_up_bare)
        recorded = count_messages(tmp / "bot" / "bot.sqlite3")

    fixed_bot, fixed_bare = results["bot"]["fixed"], results["bare"]["fixed"]
    sat_bot, sat_bare = results["bot"]["saturation"], results["bare"]["saturation"]
    rows = []
    for phase in ("fixed", "saturation"):
        for label in ("bare", "bot"):
            r = results[label][phase]
            rows.append([f"{label}, {phase}", f"{r['ok']}/{r['sent']}", f"{r['throughput']:.0f}",
                         f"{r['p50']:.1f}", f"{r['p99']:.1f}", f"{r['max']:.1f}", f"{r['server_cores']:.2f}",
                         f"{r['server_cpu_ms_per_ack']:.2f}",
                         f"{r['send_rate']:.0f}", f"{r['generator_cores']:.2f}"])
    print("\n" + table(rows, ["server, phase", "2xx/sent", "acks/s", "p50 ms", "p99 ms", "max ms",
                              "server cores", "CPU ms/ack", "gen sends/s", "gen cores"]))
    print(f"\n   fixed phase: generator send lag p99 {fixed_bot['send_lag_p99_ms']:.1f} ms (bot), "
          f"{fixed_bare['send_lag_p99_ms']:.1f} ms (bare); saturation generator: {sat_bot['generator']}")
    print(f"   downloads in flight at the end of each bot phase: {fixed_bot.get('downloads_in_flight')}, "
          f"{sat_bot.get('downloads_in_flight')}; webhooks recorded in the bot's ledger: {recorded}")
    ratio = sat_bot["throughput"] / sat_bare["throughput"]
    save("webhooks", {**results, "recorded_in_ledger": recorded, "saturation_ratio": ratio},
         [[f"bot p99 at {args.rate:.0f}/s (bare: {fixed_bare['p99']:.1f} ms)", f"{fixed_bot['p99']:.1f} ms",
           "< 25 ms", verdict(fixed_bot["p99"] < 25 and fixed_bot["errors"] == 0)],
          ["saturation, bot / bare", f"{ratio:.2f} ({sat_bot['throughput']:.0f} vs {sat_bare['throughput']:.0f}/s)",
           ">= 0.5", verdict(ratio >= 0.5)]])


def post(port: int, body: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/webhook", body, {"Content-Type": "application/json",
                                                 "X-Spark-Signature": signature(SECRET, body)})
        return conn.getresponse().status
    finally:
        conn.close()


def warm_up_bare(port: int) -> None:
    for _ in range(100):
        post(port, b"{}")


def warm_up_bot(port: int, file_url: str) -> None:
    """A few webhooks, then wait until the bot knows its own id and all 4 workers are downloading."""
    for i in range(8):
        post(port, json.dumps(webhook_payload(f"warm-up-{i}", [file_url])).encode())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        queue = healthz(port).get("queue", {})
        if queue.get("active", 0) >= 4 and queue.get("messages_pending", 1) == 0:
            return
        time.sleep(0.1)
    print("   warning: the bot's workers were not all downloading after the warm-up")


def count_messages(db_path: Path) -> int:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT count(*) FROM messages").fetchone()[0]
    finally:
        db.close()


if __name__ == "__main__":
    main()
