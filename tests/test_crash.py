"""Kill a real server process with SIGKILL at random moments while files stream,
restart it, and check that every file of every acknowledged message is saved
exactly once, complete, with nothing partial left behind."""

import hashlib
import os
import random
from pathlib import Path


from tests.conftest import wait_until
from tests.fakewebex import BOT_ID, PatternBody, Reply, webhook_payload
from tests.serverproc import ServerProcess, in_flight, server_idle

def check_exactly_once(download_dir: Path, expected: dict[str, str], acked: set[str], maybe: set[str]):
    """Every acked message's file is on disk once with the right hash; nothing else but maybe-ones."""
    on_disk = [p for p in download_dir.iterdir() if p.is_file()]
    hashes = [hashlib.sha256(p.read_bytes()).hexdigest() for p in on_disk]
    by_hash = {h: hashes.count(h) for h in hashes}
    for mid in acked:
        assert by_hash.get(expected[mid]) == 1, f"{mid}: found {by_hash.get(expected[mid], 0)} copies"
    allowed = {expected[m] for m in acked | maybe}
    assert set(by_hash) <= allowed, "a file on disk matches no sent file (partial or corrupt)"
    assert all(n == 1 for n in by_hash.values()), "a file was saved twice"
    assert list((download_dir / ".partial").iterdir()) == [], "temporary files left behind"


def test_sigkill_at_random_moments_loses_nothing_and_duplicates_nothing(fake, tmp_path):
    rng = random.Random(int(os.environ.get("CRASH_SEED", "1234")))
    fake.bot["id"] = BOT_ID
    server = ServerProcess(tmp_path, fake)
    expected, acked, maybe = {}, set(), set()
    n = 0
    interrupted = 0
    for round_no in range(10):
        server.start()
        for _ in range(3):
            n += 1
            mid = f"M{n}"
            body = PatternBody(rng.randrange(1_000_000, 4_000_000), seed=n)
            headers = {"Content-Disposition": 'attachment; filename="report.pdf"'}
            url = fake.add_file(body, name="report.pdf")
            fake.script(url, Reply(200, headers, body, trickle=0.004))
            expected[mid] = body.sha256()
            (acked if server.post(webhook_payload(mid, [url])) else maybe).add(mid)
        target = fake.bytes_sent + rng.randrange(0, 6_000_000)
        wait_until(lambda: fake.bytes_sent >= target or server_idle(tmp_path), timeout=30,
                   message="bytes streamed before the kill")
        server.kill()
        interrupted += in_flight(tmp_path)

    assert interrupted >= 5, "the kills did not hit downloads in flight: the test proves nothing"
    server.start()
    wait_until(lambda: server_idle(tmp_path), timeout=120, message="queue drained after restart")
    check_exactly_once(tmp_path / "downloads", expected, acked, maybe)
    names = sorted(p.name for p in (tmp_path / "downloads").iterdir() if p.is_file())
    assert names[0] == "report (1).pdf" and "report.pdf" in names
    server.kill()


