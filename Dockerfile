# The Webex file bot under gunicorn, as a non-root user. Build and run: deploy/README.md.
#
#   docker build -t webex-file-bot .
#   docker run -d --name webex-file-bot --env-file .env -v webex-file-bot-data:/data \
#       -p 127.0.0.1:8080:8080 --stop-timeout 40 --restart unless-stopped webex-file-bot
#
# Settings come from the environment (--env-file .env): WEBEX_BOT_TOKEN and
# WEBEX_WEBHOOK_SECRET are required. The file locations and HOST below are
# the image's; leave DOWNLOAD_DIR, DATABASE_URL, HOST and PORT out of that file.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A fixed uid/gid, so a host folder mounted on /data can be given to it:
# chown -R 10001:10001 /path/on/host
RUN groupadd --gid 10001 webexbot \
 && useradd --uid 10001 --gid webexbot --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin webexbot

WORKDIR /app

# Runtime dependencies only (no test tools), in their own layer for caching.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

# The app: its top-level modules (gunicorn.conf.py included). Owned by root,
# read-only for the bot.
COPY *.py ./

# Files and the ledger live in the volume, writable by the bot. A new named
# volume starts as a copy of this folder, ownership included.
RUN mkdir -p /data/downloads /data/db && chown -R webexbot:webexbot /data
ENV DOWNLOAD_DIR=/data/downloads \
    DATABASE_URL=sqlite:////data/db/bot.sqlite3 \
    HOST=0.0.0.0 \
    PORT=8080
VOLUME /data

USER webexbot
EXPOSE 8080

# No curl in the slim image: Python's urllib. 200 = healthy; 503 or no answer
# (urlopen raises) = unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=4)"]

# SIGTERM (docker stop) lets gunicorn hand unfinished downloads back to the
# queue within its graceful_timeout (30 s): give it time with
# `docker run --stop-timeout 40` (Docker's default is 10 s; nothing is lost
# either way, an interrupted download starts over after the restart).
STOPSIGNAL SIGTERM
# gunicorn's worker heartbeat files go to /dev/shm (a tmpfs) rather than the
# container's overlay file system.
CMD ["gunicorn", "-c", "gunicorn.conf.py", "--worker-tmp-dir", "/dev/shm", "app:create_app()"]
