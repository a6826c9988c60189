"""Benchmark 4: draining the queue, 500 small files behind a server that adds 100 ms per request.

The ledger is filled with 500 acknowledged messages of one small file each,
then the bot's real worker pool (``jobs.Workers`` on a ``jobs.Ledger``, in
this process) downloads them all from a fake Webex on loopback that waits
100 ms before each answer. Timed from the start of the workers until nothing
is queued or active, for 1, 4 and 16 workers.

    .venv/bin/python bench/drain.py [--files 500] [--delay 0.1] [--workers 1 4 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

# common first: it puts the project root on sys.path
from common import save, table, title, verdict

from config import load_settings
from jobs import Ledger, Message, Workers
from tests.fakewebex import BOT_ID, FakeWebex


def drain(fake: FakeWebex, urls: list[str], workers: int, delay: float, tmp: Path) -> dict:
    settings = load_settings({"WEBEX_BOT_TOKEN": fake.token, "WEBEX_WEBHOOK_SECRET": "bench",
                              "WEBEX_API_URL": fake.api_url, "DOWNLOAD_DIR": str(tmp / "downloads"),
                              "DATABASE_URL": f"sqlite:///{tmp / 'bot.sqlite3'}", "REPLY_ON_SAVE": "false",
                              "DOWNLOAD_WORKERS": str(workers)})
    ledger = Ledger(settings.database_path, replies=False)
    ledger.set_meta("bot_id", BOT_ID)
    for i, url in enumerate(urls):
        ledger.record(Message(f"drain-{workers}-{i}", "ROOM", "direct", "PERSON", "alice@example.com"), [url],
                      resolve=False)
    pool = Workers(settings, ledger)
    timeout = len(urls) * delay / workers * 3 + 60  # bounded even if something goes wrong
    started = time.perf_counter()
    pool.start()
    while time.perf_counter() - started < timeout:
        counts = ledger.queue_counts()
        if counts.get("queued", 0) + counts.get("active", 0) == 0:
            break
        time.sleep(0.02)
    seconds = time.perf_counter() - started
    pool.stop(timeout=10)
    saved = len(ledger.history("saved", limit=len(urls) + 1))
    ledger.close()
    return {"workers": workers, "seconds": seconds, "saved": saved}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--delay", type=float, default=0.1, help="seconds the server waits per request")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    title("drain", f"{args.files} small files, {args.delay * 1000:.0f} ms per request, "
                   f"{', '.join(map(str, args.workers))} workers")

    runs = []
    with FakeWebex() as fake, tempfile.TemporaryDirectory(prefix="bench-drain-") as tmp:
        # Without TCP_NODELAY the fake's separate header and body writes meet the client's
        # delayed ACK: +40 ms per keep-alive request that a real server would not add.
        fake.server.RequestHandlerClass.disable_nagle_algorithm = True
        urls = []
        for i in range(args.files):
            urls.append(fake.add_file(b"%d\n" % i * 400, name=f"file-{i}.txt"))
            fake.files[urls[-1].rsplit("/", 1)[-1]].delay = args.delay
        for workers in args.workers:
            (Path(tmp) / str(workers)).mkdir()
            runs.append(drain(fake, urls, workers, args.delay, Path(tmp) / str(workers)))
            print(f"   {workers:2} worker(s): {runs[-1]['seconds']:.1f} s, {runs[-1]['saved']} saved", flush=True)

    base = runs[0]["seconds"] * runs[0]["workers"]  # one worker's time, scaled if the first run is not 1
    rows = []
    for r in runs:
        r["speedup"] = base / r["seconds"]
        r["efficiency"] = r["speedup"] / r["workers"]
        r["ideal_seconds"] = args.files * args.delay / r["workers"]
        r["overhead_ms_per_file"] = (r["seconds"] * r["workers"] / args.files - args.delay) * 1000
        rows.append([r["workers"], f"{r['saved']}/{args.files}", f"{r['seconds']:.1f}", f"{r['ideal_seconds']:.1f}",
                     f"{r['speedup']:.1f}x", f"{r['efficiency']:.2f}", f"{r['overhead_ms_per_file']:.0f}"])
    print("\n" + table(rows, ["workers", "saved", "seconds", "ideal s", "speed-up", "efficiency",
                              "overhead ms/file"]))
    save("drain", {"files": args.files, "delay": args.delay, "runs": runs},
         [[f"speed-up with {r['workers']} workers", f"{r['speedup']:.1f}x ({r['seconds']:.1f} s)",
           f">= {0.8 * r['workers']:.1f}x (near-linear)", verdict(r["efficiency"] >= 0.8)]
          for r in runs if r["workers"] > 1])


if __name__ == "__main__":
    main()
