"""The ceiling for bench/webhooks.py: a Flask app whose ``POST /webhook`` only answers 204.

Served by the same command and the same ``gunicorn.conf.py`` as the bot
(``gunicorn -c gunicorn.conf.py 'bare_app:create_app()'`` with ``bench/`` on
PYTHONPATH). The config's hooks start and stop the bot's download workers;
here a stub stands in for the bot, so nothing else runs.
"""

from flask import Flask


class _NoBot:
    def start_workers(self) -> None:
        pass

    def stop_workers(self, timeout: float = 0) -> None:
        pass


def create_app() -> Flask:
    app = Flask(__name__)
    app.extensions["filebot"] = _NoBot()

    @app.post("/webhook")
    def webhook():
        return "", 204

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    return app
