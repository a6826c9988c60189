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
import sqlite3
import sys
import tempfile
import time

import click
from flask import Flask, Response, current_app, request
from flask.cli import with_appcontext
from werkzeug.middleware.proxy_fix import ProxyFix

import metrics
from config import ConfigError, Settings, format_size, load_settings
from jobs import Ledger, Message, Workers, allowed_sender, failure_text
from webex import WebexClient, WebexError, verify_signature

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
            try:
                self._bot_id = self.ledger.meta("bot_id")
            except sqlite3.Error:  # the record that follows fails too, with a 503
                return None
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
    if settings.proxy_hops:  # log the sender's address, not the reverse proxy's
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.proxy_hops, x_proto=settings.proxy_hops)
    try:
        bot = Bot(settings, clock)
    except sqlite3.Error as exc:
        sys.exit(f"webex-file-bot: cannot open the ledger {settings.database_path}: {exc} "
                 "(is it owned by another user? run commands as the service user)")
    app.extensions["filebot"] = bot

    @app.post("/webhook")
    def webhook():
        body = read_body(request, MAX_WEBHOOK_BYTES)
        if body is None:
            bot.metrics.webhooks.labels("too_large").inc()
            log.warning("webhook rejected: body over %d bytes from %s", MAX_WEBHOOK_BYTES, request.remote_addr)
            return {"error": "body too large"}, 413
        return receive_webhook(bot, body, request.headers.get("X-Spark-Signature"), request.remote_addr)

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


def read_body(req, limit: int) -> bytes | None:
    """The raw body, or None if it is longer than ``limit`` (announced or, when chunked, read)."""
    if req.content_length is not None and req.content_length > limit:
        return None
    body = req.stream.read(limit + 1)
    return None if len(body) > limit else body


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
        if not all(v is None or isinstance(v, str) for v in vars(message).values()):
            raise ValueError("data fields must be strings")
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
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
    """The operator CLI: ``flask --app app COMMAND`` (never starts workers).

    Every command prints a readable table or sentence, ``--json`` for scripts,
    and exits non-zero with a plain message when something is wrong.
    """
    app.cli.add_command(check_command)
    app.cli.add_command(webhooks_group)
    app.cli.add_command(downloads_group)


DEFAULT_WEBHOOK_NAME = "webex-file-bot"


def _bot() -> Bot:
    return current_app.extensions["filebot"]


def _client() -> WebexClient:
    settings = _bot().settings
    return WebexClient(settings.api_url, settings.bot_token)


def _emit(as_json: bool, data, text: str) -> None:
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text)


def _fail(message: str) -> None:
    raise click.ClickException(message)


def _explain(exc: WebexError) -> str:
    if exc.status == 401:
        return "the token was rejected: check WEBEX_BOT_TOKEN"
    if exc.status is None:
        return f"cannot reach the Webex API ({exc}): check WEBEX_API_URL and the network"
    return str(exc)


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [headers, *rows]]
    return "\n".join(lines)


@click.command("check")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@with_appcontext
def check_command(as_json: bool) -> None:
    """Check settings, token, download folder, ledger and webhooks."""
    bot = _bot()
    report: dict = {"settings": "ok"}
    problems: list[str] = []
    warnings: list[str] = []
    client = _client()
    try:
        me = client.me()
        report["bot"] = {"id": me.get("id"), "name": me.get("displayName"), "emails": me.get("emails", [])}
        hooks = list(client.webhooks())
        active = [h for h in hooks if h.get("status") == "active" and h.get("resource") == "messages"]
        report["webhooks"] = {"total": len(hooks), "active": len(active)}
        if not active:
            warnings.append("no active messages webhook: run `flask --app app webhooks create https://YOUR-HOST/webhook`")
    except WebexError as exc:
        problems.append(_explain(exc))
    health_report, _ = health(bot)
    report["download_dir"] = health_report["download_dir"]
    report["ledger"] = health_report["ledger"]
    if health_report["download_dir"] != "ok":
        problems.append(f"download folder {bot.settings.download_dir}: {health_report['download_dir']}")
    if health_report["ledger"] != "ok":
        problems.append(f"ledger {bot.settings.database_path}: {health_report['ledger']}")
    report["problems"], report["warnings"] = problems, warnings
    lines = ["settings: ok"]
    if "bot" in report:
        lines.append(f"bot: {report['bot']['name']} ({', '.join(report['bot']['emails'])})")
        lines.append(f"webhooks: {report['webhooks']['active']} active of {report['webhooks']['total']}")
    lines.append(f"download folder: {bot.settings.download_dir.resolve()} ({report['download_dir']})")
    lines.append(f"ledger: {bot.settings.database_path.resolve()} ({report['ledger']})")
    lines += [f"warning: {w}" for w in warnings] + [f"problem: {p}" for p in problems]
    _emit(as_json, report, "\n".join(lines))
    if problems:
        raise SystemExit(1)


@click.group("webhooks")
def webhooks_group() -> None:
    """Create, list and delete the bot's Webex webhooks."""


@webhooks_group.command("create")
@click.argument("target_url")
@click.option("--name", default=DEFAULT_WEBHOOK_NAME, show_default=True, help="Webhook name; reused to update.")
@click.option("--filter", "filter_", default="", help="Webex filter, e.g. roomType=direct.")
@click.option("--files-only", is_flag=True, help="Only messages with files (adds hasFiles=true).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@with_appcontext
def webhooks_create(target_url: str, name: str, filter_: str, files_only: bool, as_json: bool) -> None:
    """Register TARGET_URL for messages/created, or update the webhook of that name.

    Run it again with a new URL (ngrok) to update target and secret and
    re-activate the webhook instead of adding another.
    """
    if not target_url.startswith(("https://", "http://")):
        _fail(f"TARGET_URL {target_url!r} must be an https:// URL (e.g. https://abc.ngrok.app/webhook)")
    filters = [f for f in filter_.split("&") if f]
    if files_only and "hasFiles=true" not in filters:
        filters.append("hasFiles=true")
    wanted_filter = "&".join(filters)
    settings = _bot().settings
    client = _client()
    try:
        same = [h for h in client.webhooks() if h.get("name") == name and h.get("resource") == "messages"
                and h.get("event") == "created"]
        if same and (same[0].get("filter") or "") == wanted_filter:
            hook = client.update_webhook(same[0]["id"], name=name, target_url=target_url,
                                         secret=settings.webhook_secret, status="active")
            action, stale = "updated", same[1:]
        else:  # new, or the filter changed (it cannot be changed in place): create, then delete the old
            hook = client.create_webhook(name=name, target_url=target_url, secret=settings.webhook_secret,
                                         filter=wanted_filter or None)
            action, stale = ("replaced" if same else "created"), same
        for old in stale:
            client.delete_webhook(old["id"])
    except WebexError as exc:
        _fail(_explain(exc))
    _bot().ledger.set_meta("webhook_target", target_url)
    _emit(as_json, {"action": action, "webhook": hook},
          f"{action} webhook {hook.get('id')} {name!r} -> {target_url}"
          + (f" (filter {wanted_filter})" if wanted_filter else ""))
    if not target_url.startswith("https://"):
        click.echo("warning: Webex expects an https:// target URL", err=True)


@webhooks_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@with_appcontext
def webhooks_list(as_json: bool) -> None:
    """Show every webhook of the bot (all pages), flagging inactive ones and other targets."""
    try:
        hooks = list(_client().webhooks())
    except WebexError as exc:
        _fail(_explain(exc))
    expected = _bot().ledger.meta("webhook_target")
    for hook in hooks:
        notes = []
        if hook.get("status") != "active":
            notes.append("INACTIVE: run `webhooks create URL` to re-activate")
        if expected and hook.get("targetUrl") != expected:
            notes.append(f"points elsewhere (last created: {expected})")
        hook["notes"] = notes
    rows = [[h.get("id", ""), h.get("name", ""), h.get("targetUrl", ""), h.get("filter") or "-",
             h.get("status", ""), "; ".join(h["notes"])] for h in hooks]
    _emit(as_json, hooks, _table(rows, ["ID", "NAME", "TARGET", "FILTER", "STATUS", "NOTES"])
          if hooks else "no webhooks: run `flask --app app webhooks create https://YOUR-HOST/webhook`")


@webhooks_group.command("delete")
@click.argument("webhook_id", required=False)
@click.option("--all", "delete_all", is_flag=True, help="Delete every webhook of the bot.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (with --all).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@with_appcontext
def webhooks_delete(webhook_id: str | None, delete_all: bool, yes: bool, as_json: bool) -> None:
    """Delete webhook WEBHOOK_ID, or --all of them."""
    if bool(webhook_id) == delete_all:
        _fail("give either a WEBHOOK_ID or --all")
    client = _client()
    try:
        ids = [h["id"] for h in client.webhooks()] if delete_all else [webhook_id]
        if delete_all and ids and not yes:
            click.confirm(f"Delete all {len(ids)} webhook(s) of this bot?", abort=True)
        for hook_id in ids:
            client.delete_webhook(hook_id)
    except WebexError as exc:
        _fail(_explain(exc))
    _emit(as_json, {"deleted": ids}, f"deleted {len(ids)} webhook(s)" + (f": {', '.join(ids)}" if ids else ""))


@click.group("downloads", invoke_without_command=True)
@click.option("--state", type=click.Choice(["queued", "active", "saved", "failed"]), help="Only this state.")
@click.option("--limit", default=50, show_default=True, help="How many rows, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@with_appcontext
def downloads_group(ctx: click.Context, state: str | None, limit: int, as_json: bool) -> None:
    """The download history from the ledger, newest first."""
    if ctx.invoked_subcommand is not None:
        return
    settings = _bot().settings
    rows = _bot().ledger.history(state, limit)
    items = [{"id": r["id"], "time": _when(r["updated_at"]), "sender": r["person_email"],
              "name": r["name"] or "", "size": r["size"], "state": r["state"],
              "reason": r["reason"], "detail": r["detail"], "path": r["final_path"] if r["state"] == "saved" else None,
              "url": r["url"], "message_id": r["message_id"]} for r in rows]
    table = [[i["id"], i["time"], i["sender"] or "-", i["name"] or "-",
              format_size(i["size"]) if i["size"] is not None else "-", _state_text(i, settings.max_file_size)]
             for i in items]
    _emit(as_json, items, _table(table, ["ID", "TIME", "SENDER", "FILE", "SIZE", "STATE"]) if items
          else "no downloads yet")


@downloads_group.command("retry")
@click.argument("file_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@with_appcontext
def downloads_retry(file_id: int, as_json: bool) -> None:
    """Put failed download FILE_ID back in the queue."""
    if not _bot().ledger.requeue(file_id):
        _fail(f"no failed download with id {file_id} (see `flask --app app downloads --state failed`)")
    _emit(as_json, {"requeued": file_id}, f"download {file_id} is queued again; a running bot picks it up")


def _state_text(item: dict, max_size: int) -> str:
    if item["state"] == "failed":
        return "failed: " + failure_text(item["reason"], item["detail"], max_size, item["size"])
    if item["reason"]:  # queued again after a temporary failure
        return f"{item['state']} (last try: {item['reason']})"
    return item["state"]


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


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
