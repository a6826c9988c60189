"""Benchmark 1: download throughput, the bot's downloader vs ``curl -o``, one 1 GiB file from nginx.

Each round fetches the same file from the same loopback nginx (sendfile) into
the same folder three ways, in rotating order: ``curl -o``, ``curl -o`` then
fsync of the file, and the bot's downloader (``downloader.download``), which
also hashes (SHA-256) and fsyncs the file and its folder before giving it its
final name. ``sync`` runs before each transfer so none starts while the disk
still writes back the previous one. The variants show where the time goes:
the wire alone, no hashing, other chunk sizes, hashing alone.

    .venv/bin/python bench/throughput.py [--size-mib 1024] [--rounds 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

# common first: it puts the project root on sys.path
from common import MiB, make_file, save, static_server, table, title, verdict

import downloader
import webex


def mb_per_s(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def fresh_disk() -> None:
    os.sync()  # start every transfer with nothing dirty left by the previous one


def with_bot(url: str, api_url: str, dest: Path, session, chunk_size: int = downloader.CHUNK_SIZE) -> float:
    fresh_disk()
    started = time.perf_counter()
    result = downloader.download(url, dest, session=session, api_url=api_url, max_size=1 << 40,
                                 chunk_size=chunk_size)
    seconds = time.perf_counter() - started
    if not isinstance(result, downloader.Fetched):
        raise RuntimeError(f"download failed: {result}")
    os.unlink(result.part_path)
    return seconds


def with_curl(url: str, dest: Path, fsync: bool = False) -> float:
    target = dest / "curl.bin"
    fresh_disk()
    started = time.perf_counter()
    subprocess.run(["curl", "-sS", "-o", str(target), url], check=True)
    if fsync:
        subprocess.run(["sync", str(target)], check=True)  # fsync(2) of that one file
    seconds = time.perf_counter() - started
    os.unlink(target)
    return seconds


class NoHash:
    """Stands in for hashlib.sha256 in one variant, to show what hashing costs."""
    def update(self, data: bytes) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


def without_hash(url: str, api_url: str, dest: Path, session) -> float:
    real = downloader.hashlib
    downloader.hashlib = type("hashlib", (), {"sha256": NoHash})
    try:
        return with_bot(url, api_url, dest, session)
    finally:
        downloader.hashlib = real


def wire_only(url: str, session, chunk_size: int) -> float:
    """requests reading the body and dropping it: no hash, no disk."""
    started = time.perf_counter()
    with session.get(url, stream=True, timeout=(10, 60), headers={"Accept-Encoding": "identity"}) as r:
        for _ in r.iter_content(chunk_size):
            pass
    return time.perf_counter() - started


def curl_null(url: str) -> float:
    started = time.perf_counter()
    subprocess.run(["curl", "-sS", "-o", "/dev/null", url], check=True)
    return time.perf_counter() - started


def hash_only(size: int) -> float:
    block = os.urandom(MiB)
    sha = hashlib.sha256()
    started = time.perf_counter()
    for _ in range(size // MiB):
        sha.update(block)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    size = args.size_mib * MiB
    title("throughput", f"one {args.size_mib} MiB file, downloader vs curl -o, {args.rounds} rounds")

    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        served, dest = Path(tmp) / "served", Path(tmp) / "downloads"
        served.mkdir()
        dest.mkdir()
        make_file(served / "big.bin", size)
        with static_server(served) as (origin, kind):
            api_url = f"{origin}/v1"
            url = f"{api_url}/contents/big.bin"
            session = webex.new_session(api_url, "bench-token")
            print(f"   server: {kind} on {origin}; files written to {dest}", flush=True)
            contestants = {"curl": lambda: with_curl(url, dest),
                           "bot": lambda: with_bot(url, api_url, dest, session),
                           "curl+fsync": lambda: with_curl(url, dest, fsync=True)}
            rounds = []
            for i in range(args.rounds):
                names = list(contestants)
                order = names[i % 3:] + names[:i % 3]  # each goes first, second and last in turn
                rounds.append({name: mb_per_s(size, contestants[name]()) for name in order})
                print(f"   round {i + 1}: " + ", ".join(f"{n} {rounds[-1][n]:.0f} MB/s" for n in order), flush=True)
            median = {name: statistics.median(r[name] for r in rounds) for name in contestants}
            ratio = statistics.median(r["bot"] / r["curl"] for r in rounds)
            ratio_fsync = statistics.median(r["bot"] / r["curl+fsync"] for r in rounds)
            print("   variants (best of two transfers each) ...", flush=True)
            variants = [(name, min(run() for _ in range(2))) for name, run in [
                ("curl -o /dev/null (wire only)", lambda: curl_null(url)),
                ("downloader's requests loop, no hash, no disk",
                 lambda: wire_only(url, session, downloader.CHUNK_SIZE)),
                ("downloader, SHA-256 replaced by a no-op", lambda: without_hash(url, api_url, dest, session)),
                ("downloader, chunk 64 KiB", lambda: with_bot(url, api_url, dest, session, 64 * 1024)),
                ("downloader, chunk 1 MiB", lambda: with_bot(url, api_url, dest, session, MiB)),
                ("SHA-256 alone, in memory", lambda: hash_only(size)),
            ]]
            session.close()

    rows = [[i + 1, *(f"{r[n]:.0f}" for n in ("curl", "curl+fsync", "bot")), f"{r['bot'] / r['curl']:.2f}",
             f"{r['bot'] / r['curl+fsync']:.2f}"] for i, r in enumerate(rounds)]
    rows.append(["median", *(f"{median[n]:.0f}" for n in ("curl", "curl+fsync", "bot")), f"{ratio:.2f}",
                 f"{ratio_fsync:.2f}"])
    print("\n" + table(rows, ["round", "curl -o MB/s", "curl -o + fsync", "downloader", "ratio to curl -o",
                              "to curl + fsync"]))
    print("   (ratios: median of the per-round ratios)")
    variant_rows = [[name, f"{mb_per_s(size, s):.0f}", f"{mb_per_s(size, s) / median['curl']:.2f}"]
                    for name, s in variants]
    print("\n" + table(variant_rows, ["variant (best of 2)", "MB/s", "vs curl -o median"]))
    save("throughput",
         {"size_bytes": size, "server": kind, "rounds": rounds, "median_mb_s": median, "ratio": ratio,
          "ratio_to_curl_fsync": ratio_fsync, "variants": {name: mb_per_s(size, s) for name, s in variants}},
         [[f"downloader / curl -o, {args.size_mib} MiB",
           f"{ratio:.2f} ({median['bot']:.0f} vs {median['curl']:.0f} MB/s)", ">= 0.8", verdict(ratio >= 0.8)],
          ["downloader / (curl -o + fsync)", f"{ratio_fsync:.2f} (vs {median['curl+fsync']:.0f} MB/s)",
           "(information)", ""]])


if __name__ == "__main__":
    main()
