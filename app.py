"""The Flask app: the webhook route, health, metrics, operator commands, serving.

``create_app(settings)`` builds a fresh app and opens the ledger; it starts no
thread. The download workers are started by whoever serves: ``python app.py``
(:func:`main`) or gunicorn (``gunicorn.conf.py``). Operator commands
(``flask --app app ...``) never start them.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import tempfile
import time

from flask import Flask, Response, request

import metrics
from config import ConfigError, Settings, load_settings
from jobs import Ledger, Message, Workers, allowed_sender
from webex import verify_signature

log = logging.getLogger("filebot.app")

MAX_WEBHOOK_BYTES = 64 * 1024  # a webhook is a few KB


class Bot:
    """What the routes and commands share: settings, ledger, metrics and (when serving) workers."""

    def __init__(self, settings: Settings, clock=time.time):
        self.settings = settings
        self.ledger = Ledger(settings.database_path, clock=clock, replies=settings.reply_on_save)
        self.metrics = metrics.Metrics(self.ledger)
        self.workers: Workers | None = None
        self._bot_id: str | None = None

    def start_workers(self, **options) -> Workers:
        if self.workers is None:
            self.workers = Workers(self.settings, self.ledger, metrics=self.metrics, **options).start()
            log.info("%d download worker(s) started, saving into %s", self.settings.download_workers,
                     self.workers.download_dir)
        return self.workers

    def stop_workers(self, timeout: float = 30.0) -> None:
        if self.workers is not None:
            self.workers.stop(timeout)
            self.workers = None
            log.info("download workers stopped")

    def bot_id(self) -> str | None:
        """The bot's person id once a worker has looked it up (never fetched on the request path)."""
        if self._bot_id is None:
            self._bot_id = self.ledger.meta("bot_id")
        return self._bot_id


def create_app(settings: Settings | None = None, *, clock=time.time) -> Flask:
    """Build the app. Without ``settings`` they are loaded from the environment and ``.env``.

    ``clock`` (seconds since the epoch) is for tests that fast-forward retries.
    """
    if settings is None:
        try:
            settings = load_settings()
        except ConfigError as exc:
            sys.exit(f"webex-file-bot: {exc}")
    configure_logging(settings)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_WEBHOOK_BYTES
    bot = Bot(settings, clock)
    app.extensions["filebot"] = bot

    @app.post("/webhook")
    def webhook():
        return receive_webhook(bot, request.get_data(cache=False), request.headers.get("X-Spark-Signature"),
                               request.remote_addr)

    @app.get("/healthz")
    def healthz():
        report, healthy = health(bot)
        return report, 200 if healthy else 503

    @app.get("/metrics")
    def metrics_page():
        body, content_type = bot.metrics.render()
        return Response(body, content_type=content_type)

    register_commands(app)
    return app


def receive_webhook(bot: Bot, body: bytes, signature: str | None, remote: str | None):
    """Verify, filter, record, answer. Never waits on Webex or on a download."""
    started = time.perf_counter()
    m = bot.metrics
    if not verify_signature(bot.settings.webhook_secret, body, signature):
        m.webhooks.labels("rejected").inc()
        log.warning("webhook rejected: %s X-Spark-Signature from %s",
                    "wrong" if signature else "missing", remote)
        return {"error": "invalid signature"}, 401
    try:
        event = json.loads(body)
        data = event["data"]
        message = Message.from_webhook(data)
        if not isinstance(message.id, str) or not message.id:
            raise ValueError("data.id")
    except (ValueError, TypeError, KeyError, AttributeError):
        m.webhooks.labels("invalid").inc()
        log.warning("webhook rejected: signed but not a Webex webhook (%d bytes) from %s", len(body), remote)
        return {"error": "not a Webex webhook"}, 400

    reason = _ignore_reason(bot, event, message)
    if reason:
        m.webhooks.labels("ignored").inc()
        log.info("event ignored message=%s sender=%s reason=%s", message.id, message.person_email, reason)
        return {"status": "ignored", "reason": reason}, 200

    files = data.get("files")
    if not (isinstance(files, list) and all(isinstance(f, str) for f in files)):
        files = None  # a worker looks the files up
    try:
        new = bot.ledger.record(message, files, resolve=bot.bot_id() is None)
    except Exception as exc:  # the ledger is down: make Webex try again rather than lose it
        m.webhooks.labels("error").inc()
        log.error("webhook not recorded message=%s error=%s", message.id, exc)
        return {"error": "could not record the event"}, 503
    if not new:
        m.webhooks.labels("duplicate").inc()
        log.info("event duplicate message=%s sender=%s (already recorded)", message.id, message.person_email)
        return {"status": "duplicate"}, 200
    m.webhooks.labels("queued").inc()
    if bot.workers is not None:
        bot.workers.wake()
    log.info("event queued message=%s sender=%s room=%s files=%s in=%.1fms", message.id, message.person_email,
             message.room_type, len(files) if files is not None else "lookup",
             (time.perf_counter() - started) * 1000)
    return {"status": "queued"}, 202


def _ignore_reason(bot: Bot, event: dict, message: Message) -> str | None:
    if event.get("resource") != "messages" or event.get("event") != "created":
        return f"not handled: {event.get('resource')}/{event.get('event')}"
    bot_id = bot.bot_id()
    if bot_id and message.person_id == bot_id:
        return "own message"
    if not allowed_sender(message.person_email, bot.settings.allowed_senders):
        return "sender not in ALLOWED_SENDERS"
    return None


def health(bot: Bot) -> tuple[dict, bool]:
    report: dict = {}
    healthy = True
    try:
        report["queue"] = bot.ledger.queue_counts()
        report["ledger"] = "ok"
    except Exception as exc:
        report["ledger"] = f"error: {exc}"
        healthy = False
    folder = bot.settings.download_dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        report["download_dir"] = "ok"
    except OSError as exc:
        report["download_dir"] = f"error: {exc.strerror or exc}"
        healthy = False
    if bot.workers is not None:
        report["workers"] = "running" if bot.workers.running else "stopped"
        healthy = healthy and bot.workers.running
    else:
        report["workers"] = "not started in this process"
    report["status"] = "ok" if healthy else "unhealthy"
    return report, healthy


class RedactingFilter(logging.Filter):
    """Last line of defence: the token never reaches a log line, even inside an exception."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = [s for s in secrets if len(s) >= 8]  # shorter ones would mangle every line

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if any(s in text or s in (record.exc_text or "") for s in self.secrets):
            for s in self.secrets:
                text = text.replace(s, "[redacted]")
                if record.exc_text:
                    record.exc_text = record.exc_text.replace(s, "[redacted]")
            record.msg, record.args = text, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info or record.exc_text:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(settings: Settings) -> None:
    """One handler on the ``filebot`` logger, text or JSON, with secrets redacted."""
    logger = logging.getLogger("filebot")
    logger.setLevel(settings.log_level)
    logger.propagate = False
    for old in list(logger.handlers):
        logger.removeHandler(old)
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter([settings.bot_token, settings.webhook_secret]))
    logger.addHandler(handler)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def register_commands(app: Flask) -> None:
    """The operator CLI: ``flask --app app COMMAND`` (never starts workers)."""


def main() -> None:
    """``python app.py``: serve on HOST:PORT with the download workers in this process."""
    from werkzeug.serving import make_server

    app = create_app()
    bot: Bot = app.extensions["filebot"]
    settings = bot.settings
    server = make_server(settings.host, settings.port, app, threaded=True)
    signal.signal(signal.SIGTERM, _interrupt)
    bot.start_workers()
    log.info("listening on http://%s:%d (POST /webhook, GET /healthz, GET /metrics)",
             settings.host, server.server_port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        bot.stop_workers()
        server.server_close()


if __name__ == "__main__":
    main()
