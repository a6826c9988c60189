"""Run every benchmark in turn (``make bench``) and print one summary table.

Each benchmark runs in its own process with its default settings, prints its
own report, and saves ``bench/out/NAME.json``; this script then gathers the
summary rows. It reports, it does not judge: the exit status is non-zero only
if a benchmark failed to run. About five minutes on 2 cores.

    .venv/bin/python bench/run_all.py [NAME ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import BENCH, OUT, machine, table

BENCHMARKS = ["throughput", "memory", "webhooks", "drain", "ledger_scale"]
TIMEOUT = 600  # seconds, for any one benchmark


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"some of: {', '.join(BENCHMARKS)} (default: all)")
    args = parser.parse_args()
    unknown = set(args.names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}; choose from {', '.join(BENCHMARKS)}")
    started = time.time()
    rows, failed = [], []
    for name in args.names or BENCHMARKS:
        began = time.time()
        try:
            code = subprocess.run([sys.executable, str(BENCH / f"{name}.py")], timeout=TIMEOUT).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        result = OUT / f"{name}.json"
        if code != 0 or not result.exists() or result.stat().st_mtime < began:
            failed.append(name)
            rows.append([name, "did not finish", f"exit {code}", "", ""])
            continue
        for figure, measured, target, verdict in json.loads(result.read_text())["summary"]:
            rows.append([name, figure, measured, target, verdict])
            name = ""

    print(f"\n== all benchmarks: {time.strftime('%Y-%m-%d %H:%M')}, {machine()}, "
          f"{(time.time() - started) / 60:.1f} min")
    print(table(rows, ["benchmark", "figure", "measured", "target", ""]))
    OUT.mkdir(exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(),
                                                  "rows": rows, "failed": failed}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
