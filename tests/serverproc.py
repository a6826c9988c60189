"""The bot as a real separate process (python app.py or gunicorn), for crash and shutdown tests."""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import requests

from tests.conftest import SECRET, sign, wait_until

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python app.py`` in its own process, configured through its environment."""

    def __init__(self, tmp_path: Path, fake, workers: int = 4, gunicorn: bool = False):
        self.port = free_port()
        self.env = {**os.environ, "WEBEX_BOT_TOKEN": fake.token, "WEBEX_WEBHOOK_SECRET": SECRET,
                    "WEBEX_API_URL": fake.api_url, "DOWNLOAD_DIR": str(tmp_path / "downloads"),
                    "DATABASE_URL": f"sqlite:///{tmp_path / 'bot.sqlite3'}", "PORT": str(self.port),
                    "DOWNLOAD_WORKERS": str(workers), "REPLY_ON_SAVE": "false", "LOG_LEVEL": "WARNING"}
        self.cwd = tmp_path
        self.gunicorn = gunicorn
        self.log = open(tmp_path / "server.log", "ab")
        self.env["PYTHONPATH"] = str(ROOT)
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        command = [sys.executable, str(ROOT / "app.py")]
        if self.gunicorn:
            command = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), "app:create_app()"]
        self.proc = subprocess.Popen(command, env=self.env, cwd=self.cwd, stdout=subprocess.DEVNULL,
                                     stderr=self.log)
        wait_until(self._healthy, timeout=20, message="server up")

    def _healthy(self):
        assert self.proc.poll() is None, "server exited"
        try:
            return requests.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    def post(self, payload) -> bool:
        """True if the webhook was acknowledged with 2xx."""
        body = json.dumps(payload).encode()
        try:
            r = requests.post(f"{self.url}/webhook", data=body, timeout=5,
                              headers={"X-Spark-Signature": sign(body), "Content-Type": "application/json"})
        except requests.RequestException:
            return False
        return 200 <= r.status_code < 300

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, as systemd or docker stop sends it; returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)



def in_flight(tmp_path: Path) -> int:
    db = sqlite3.connect(tmp_path / "bot.sqlite3", timeout=10)
    try:
        return db.execute("SELECT count(*) FROM files WHERE state = 'active'").fetchone()[0]
    finally:
        db.close()


def server_idle(tmp_path: Path) -> bool:
    db = sqlite3.connect(tmp_path / "bot.sqlite3", timeout=10)
    try:
        pending = db.execute("SELECT count(*) FROM files WHERE next_at IS NOT NULL").fetchone()[0]
        pending += db.execute("SELECT count(*) FROM messages WHERE next_at IS NOT NULL").fetchone()[0]
        return pending == 0
    finally:
        db.close()
