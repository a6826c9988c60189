"""Shared fixtures: a real fake Webex on 127.0.0.1 and settings built from a dict."""

import hashlib
import hmac
import json
import threading
import time

import pytest
import requests
from werkzeug.serving import make_server

from app import create_app
from config import load_settings
from tests.fakewebex import FakeWebex

SECRET = "webhook-secret-for-tests"


@pytest.fixture
def fake():
    with FakeWebex() as server:
        yield server


@pytest.fixture
def stranger():
    """A second server on another loopback address: not Webex, must never see the token."""
    with FakeWebex(host="127.0.0.2") as server:
        yield server


@pytest.fixture
def make_settings(tmp_path, fake):
    def make(**overrides):
        env = {
            "WEBEX_BOT_TOKEN": fake.token,
            "WEBEX_WEBHOOK_SECRET": SECRET,
            "WEBEX_API_URL": fake.api_url,
            "DOWNLOAD_DIR": str(tmp_path / "downloads"),
            "DATABASE_URL": f"sqlite:///{tmp_path / 'data' / 'bot.sqlite3'}",
            "DOWNLOAD_WORKERS": "2",
        }
        env.update({k: str(v) for k, v in overrides.items()})
        return load_settings(env)
    return make


def wait_until(predicate, timeout=15.0, interval=0.01, message="condition"):
    """Poll ``predicate`` until it is truthy or the deadline passes (then fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def sign(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


class RunningBot:
    """The real app served by werkzeug on 127.0.0.1 in a thread, optionally with workers."""

    def __init__(self, settings, clock=time.time, **worker_options):
        self.app = create_app(settings, clock=clock)
        self.bot = self.app.extensions["filebot"]
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.worker_options = worker_options

    def start_workers(self):
        return self.bot.start_workers(**self.worker_options)

    def post(self, payload, *, signature=None, secret=SECRET, headers=None):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        hdrs = {"Content-Type": "application/json",
                "X-Spark-Signature": signature if signature is not None else sign(body, secret)}
        hdrs.update(headers or {})
        return requests.post(f"{self.url}/webhook", data=body, headers=hdrs, timeout=10)

    def files(self, state=None):
        return self.bot.ledger.history(state, limit=10_000)

    def close(self):
        self.bot.stop_workers(timeout=10)
        self.server.shutdown()
        self.server.server_close()


class FakeClock:
    """Real time plus an offset the test moves forward (to skip a Retry-After)."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self):
        return time.time() + self.offset

    def advance(self, seconds):
        self.offset += seconds


@pytest.fixture
def run_bot():
    bots = []

    def start(settings, workers=True, clock=time.time, **worker_options):
        running = RunningBot(settings, clock, **worker_options)
        bots.append(running)
        if workers:
            running.start_workers()
        return running
    yield start
    for running in bots:
        running.close()
