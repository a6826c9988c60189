"""Benchmark 2: flat memory, peak RSS of a fresh process downloading 16 MiB vs 1 GiB.

Each download runs in its own new Python process (the bot's downloader with
its default chunk size, from a loopback nginx); the process reports its peak
resident set (``ru_maxrss``) after importing everything and after the download.

    .venv/bin/python bench/memory.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from common import GiB, MiB, make_file, save, static_server, table, title, verdict

SIZES = {"16 MiB": 16 * MiB, "1 GiB": GiB}


def child(url: str, dest: str) -> None:
    """Runs in the measured process: download once, print peak RSS in KiB as JSON."""
    import downloader
    import webex
    api_url = url.split("/contents/")[0]
    session = webex.new_session(api_url, "bench-token")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = downloader.download(url, Path(dest), session=session, api_url=api_url, max_size=1 << 40)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(result.part_path).unlink()
    print(json.dumps({"ok": isinstance(result, downloader.Fetched), "size": result.size,
                      "before_kib": before, "peak_kib": peak}))


def measure(url: str, dest: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", url, str(dest)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("URL", "DEST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    title("memory", f"peak RSS of a fresh process downloading {' vs '.join(SIZES)}, {args.rounds} rounds")

    peaks: dict[str, list[dict]] = {label: [] for label in SIZES}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        served, dest = Path(tmp) / "served", Path(tmp) / "downloads"
        served.mkdir()
        for label, size in SIZES.items():
            make_file(served / f"{size}.bin", size)
        with static_server(served) as (origin, kind):
            print(f"   server: {kind} on {origin}", flush=True)
            for i in range(args.rounds):
                for label, size in (SIZES.items() if i % 2 == 0 else reversed(SIZES.items())):
                    peaks[label].append(measure(f"{origin}/v1/contents/{size}.bin", dest))
                    if not peaks[label][-1]["ok"]:
                        print(f"   warning: the {label} download did not succeed")

    small, large = (max(r["peak_kib"] for r in peaks[label]) / 1024 for label in SIZES)
    rows = [[label, *(f"{max(r[key] for r in runs) / 1024:.1f}" for key in ("before_kib", "peak_kib"))]
            for label, runs in peaks.items()]
    print("\n" + table(rows, ["download", "RSS before, MiB", "peak RSS, MiB"]))
    diff = round(large - small, 1) or 0.0
    print(f"\n   difference: {diff:.1f} MiB (1 GiB is {GiB // (16 * MiB)}x the small file)")
    save("memory", {"runs": peaks, "peak_mib": {"16 MiB": small, "1 GiB": large}, "difference_mib": diff},
         [["peak RSS, 1 GiB minus 16 MiB", f"{diff:.1f} MiB ({large:.1f} vs {small:.1f} MiB)", "< 64 MiB",
           verdict(diff < 64)]])


if __name__ == "__main__":
    main()
