"""Production serving: gunicorn -c gunicorn.conf.py 'app:create_app()'

Each gunicorn worker process serves webhooks on a few threads and runs its own
DOWNLOAD_WORKERS download threads; they share the SQLite ledger safely. One
process is the default (WEB_CONCURRENCY raises it). HOST and PORT come from the
same settings as everything else (environment or .env).
"""

import sys

from config import ConfigError, load_settings

try:
    _settings = load_settings()
except ConfigError as exc:
    sys.exit(f"webex-file-bot: {exc}")

bind = f"{_settings.host}:{_settings.port}"
worker_class = "gthread"
threads = 8
timeout = 30
graceful_timeout = 30  # SIGTERM: stop claiming, hand in-flight downloads back, exit
keepalive = 5
control_socket_disable = True  # gunicorn 27's control socket would need a writable $HOME
accesslog = None
errorlog = "-"


def post_worker_init(worker):
    """The app is loaded in this worker process: start its download threads."""
    worker.wsgi.extensions["filebot"].start_workers()


def worker_exit(server, worker):
    """After the last request: stop claiming and hand unfinished downloads back to the queue."""
    bot = getattr(worker, "wsgi", None) and worker.wsgi.extensions.get("filebot")
    if bot:
        bot.stop_workers(timeout=graceful_timeout - 5)
