"""Production serving: a real gunicorn, SIGTERM while a download streams."""

import hashlib
import sqlite3

import requests

from tests.conftest import wait_until
from tests.fakewebex import PatternBody, Reply, webhook_payload
from tests.serverproc import ServerProcess, in_flight, server_idle


def test_gunicorn_serves_and_shuts_down_gracefully_on_sigterm(fake, tmp_path):
    body = PatternBody(20_000_000, seed=3)
    url = fake.add_file(body, name="big.bin")
    fake.script(url, Reply(200, {"Content-Disposition": 'attachment; filename="big.bin"'}, body, trickle=0.01))
    server = ServerProcess(tmp_path, fake, workers=2, gunicorn=True)
    server.start()
    assert requests.get(f"{server.url}/healthz", timeout=5).json()["workers"] == "running"
    assert server.post(webhook_payload("M1", [url]))
    wait_until(lambda: in_flight(tmp_path) == 1 and fake.bytes_sent > 0, message="download streaming")

    assert server.terminate(timeout=30) == 0

    db = sqlite3.connect(tmp_path / "bot.sqlite3")
    assert db.execute("SELECT state, lease_owner FROM files").fetchall() == [("queued", None)]
    assert list((tmp_path / "downloads" / ".partial").iterdir()) == []
    assert not (tmp_path / "downloads" / "big.bin").exists()

    server.start()
    wait_until(lambda: server_idle(tmp_path), timeout=60, message="finished after restart")
    saved = tmp_path / "downloads" / "big.bin"
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == body.sha256()
    assert server.terminate(timeout=30) == 0
