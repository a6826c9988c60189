"""A fake Webex API served for real on 127.0.0.1, for tests, benchmarks and the demo.

It speaks the parts of https://webexapis.com/v1 the bot uses: ``people/me``,
``messages`` (get, post), ``webhooks`` (paged list, create, get, update,
delete) and ``contents/{id}`` with scripted statuses, headers, delays,
stalls and cut connections. Every request it receives is recorded, so a
test can assert what was sent where (e.g. that no token reached a host).

Run it alone: ``python -m tests.fakewebex --port 9001`` (see ``demo.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlsplit

TOKEN = "fake-bot-token-0123456789"
BOT_ID = "Y2lzY29zcGFyazovL3VzL1BFT1BMRS9ib3Q"


class PatternBody:
    """``size`` deterministic bytes generated on the fly (no memory for large files)."""

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
        self.block = block

    def chunks(self, chunk: int = 256 * 1024):
        left = self.size
        big = self.block * max(1, chunk // len(self.block))
        while left > 0:
            piece = big[: min(left, len(big))]
            left -= len(piece)
            yield piece

    def sha256(self) -> str:
        h = hashlib.sha256()
        for piece in self.chunks():
            h.update(piece)
        return h.hexdigest()


@dataclass
class Reply:
    """One scripted answer from ``contents/{id}``.

    ``body`` is bytes or a :class:`PatternBody`; ``length`` overrides the
    ``Content-Length`` sent (a lying server); ``cut_after`` closes the
    connection after that many body bytes; ``delay`` waits before the status
    line; ``stall`` waits after the headers; ``trickle`` waits between 64 KiB pieces.
    """
    status: int = 200
    headers: dict = field(default_factory=dict)
    body: bytes | PatternBody = b""
    length: int | None = None
    cut_after: int | None = None
    delay: float = 0.0
    stall: float = 0.0
    trickle: float = 0.0


@dataclass
class Recorded:
    method: str
    path: str
    query: dict
    headers: dict
    body: bytes
    server: str  # host:port of the fake that received it

    @property
    def authorization(self) -> str | None:
        return {k.lower(): v for k, v in self.headers.items()}.get("authorization")


class FakeWebex:
    """A threaded HTTP server playing Webex. Use as a context manager or start()/stop()."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str = TOKEN, page_size: int = 2):
        self.token = token
        self.page_size = page_size
        self.lock = threading.Lock()
        self.requests: list[Recorded] = []
        self.bot = {"id": BOT_ID, "emails": ["filebot@webex.bot"], "displayName": "File Bot", "type": "bot"}
        self.messages: dict[str, dict] = {}
        self.posted: list[dict] = []
        self.webhooks: dict[str, dict] = {}
        self.files: dict[str, Reply] = {}
        self.scripts: dict[str, list[Reply]] = {}
        self.api_delay = 0.0
        self.bytes_sent = 0  # file body bytes written, all requests
        self.fail_api: dict[str, list[int]] = {}  # path prefix -> statuses to answer first
        self.on_request: Callable[[Recorded], None] | None = None
        handler = type("Handler", (_Handler,), {"fake": self})
        self.server = _QuietServer((host, port), handler)
        self.server.daemon_threads = True
        self.thread: threading.Thread | None = None

    # -- lifecycle
    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/v1"

    def start(self) -> "FakeWebex":
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True, name="fakewebex")
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FakeWebex":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- scripting
    def add_file(self, body: bytes | PatternBody = b"hello", name: str | None = "hello.txt",
                 content_type: str = "text/plain", headers: dict | None = None,
                 content_id: str | None = None) -> str:
        """Serve ``body`` at a new content URL; returns the URL."""
        content_id = content_id or "Y2lzY29zcGFyazovL3VzL0NPTlRFTlQv" + uuid.uuid4().hex
        hdrs = {"Content-Type": content_type}
        if name is not None:
            hdrs["Content-Disposition"] = f'attachment; filename="{name}"'
        hdrs.update(headers or {})
        self.files[content_id] = Reply(200, hdrs, body)
        return f"{self.api_url}/contents/{content_id}"

    def script(self, url: str, *replies: Reply) -> None:
        """Answer the next requests for ``url`` with ``replies``, in order, then the file."""
        self.scripts.setdefault(url.rsplit("/", 1)[-1], []).extend(replies)

    def add_message(self, message_id: str, files: list[str], *, room_id: str = "ROOM1",
                    person_id: str = "PERSON1", person_email: str = "alice@example.com",
                    room_type: str = "direct") -> dict:
        msg = {"id": message_id, "roomId": room_id, "roomType": room_type, "personId": person_id,
               "personEmail": person_email, "created": "2026-12-04T12:27:22.459Z", "text": "here",
               "files": files}
        self.messages[message_id] = msg
        return msg

    def requests_for(self, path_part: str) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if path_part in r.path]

    def _record(self, rec: Recorded) -> None:
        with self.lock:
            self.requests.append(rec)
        if self.on_request:
            self.on_request(rec)

    def _next_reply(self, content_id: str) -> Reply | None:
        with self.lock:
            queue = self.scripts.get(content_id)
            if queue:
                return queue.pop(0)
            return self.files.get(content_id)


def webhook_payload(message_id: str, files: list[str] | None, *, person_id: str = "PERSON1",
                    person_email: str = "alice@example.com", room_id: str = "ROOM1",
                    room_type: str = "direct", resource: str = "messages", event: str = "created") -> dict:
    """A ``messages/created`` webhook body as Webex sends it."""
    data = {"id": message_id, "roomId": room_id, "roomType": room_type, "personId": person_id,
            "personEmail": person_email, "created": "2026-12-04T12:27:22.459Z"}
    if files is not None:
        data["files"] = files
    return {"id": "Y2lzY29zcGFyazovL3VzL1dFQkhPT0svMQ", "name": "file bot", "resource": resource,
            "event": event, "filter": "", "orgId": "ORG", "createdBy": BOT_ID, "appId": "APP",
            "ownedBy": "creator", "status": "active", "actorId": person_id, "data": data}


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client hanging up (the bot closing an unread error body) is normal here."""
        import sys
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeWebex
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stalls

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        host, port = self.server.server_address[:2]
        rec = Recorded(self.command, parts.path, parse_qs(parts.query), dict(self.headers.items()),
                       body, f"{host}:{port}")
        fake = self.fake
        fake._record(rec)
        if rec.authorization != f"Bearer {fake.token}":
            return self._json(401, {"message": "The request requires a valid access token set in the "
                                               "Authorization request header."})
        path = parts.path
        for prefix, statuses in fake.fail_api.items():
            if path.startswith(prefix) and statuses:
                return self._json(statuses.pop(0), {"message": "scripted failure"}, {"Retry-After": "0"})
        if path.startswith("/v1/contents/"):
            return self._content(path.rsplit("/", 1)[-1])
        if fake.api_delay:
            time.sleep(fake.api_delay)
        if path == "/v1/people/me" and self.command == "GET":
            return self._json(200, fake.bot)
        if path == "/v1/messages" and self.command == "POST":
            msg = json.loads(body or b"{}")
            msg.setdefault("id", "MSG-" + uuid.uuid4().hex)
            with fake.lock:
                fake.posted.append(msg)
            return self._json(200, msg)
        if path.startswith("/v1/messages/") and self.command == "GET":
            msg = fake.messages.get(path.rsplit("/", 1)[-1])
            return self._json(200, msg) if msg else self._json(404, {"message": "not found"})
        if path.startswith("/v1/webhooks"):
            return self._webhooks(path, rec)
        return self._json(404, {"message": "no such endpoint in the fake"})

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

    def _webhooks(self, path: str, rec: Recorded) -> None:
        fake = self.fake
        hook_id = path[len("/v1/webhooks/"):] if path.startswith("/v1/webhooks/") else ""
        if not hook_id and self.command == "GET":
            items = sorted(fake.webhooks.values(), key=lambda w: w["created"])
            start = int(rec.query.get("cursor", ["0"])[0])
            page = items[start:start + fake.page_size]
            headers = {}
            if start + fake.page_size < len(items):
                headers["Link"] = f'<{fake.api_url}/webhooks?cursor={start + fake.page_size}>; rel="next"'
            return self._json(200, {"items": page}, headers)
        if not hook_id and self.command == "POST":
            data = json.loads(rec.body or b"{}")
            missing = [k for k in ("name", "targetUrl", "resource", "event") if not data.get(k)]
            if missing:
                return self._json(400, {"message": f"missing {missing}"})
            hook = {"id": "WH-" + uuid.uuid4().hex[:12], "status": "active", "created": time.time(),
                    "orgId": "ORG", "createdBy": fake.bot["id"], "ownedBy": "creator", **data}
            hook.setdefault("filter", "")
            fake.webhooks[hook["id"]] = hook
            return self._json(200, _public(hook))
        hook = fake.webhooks.get(hook_id)
        if hook is None:
            return self._json(404, {"message": "webhook not found"})
        if self.command == "GET":
            return self._json(200, _public(hook))
        if self.command == "PUT":
            hook.update(json.loads(rec.body or b"{}"))
            return self._json(200, _public(hook))
        if self.command == "DELETE":
            del fake.webhooks[hook_id]
            return self._send(204, {}, b"")
        return self._json(405, {"message": "method not allowed"})

    def _content(self, content_id: str) -> None:
        reply = self.fake._next_reply(content_id)
        if reply is None:
            return self._json(404, {"message": "content not found"})
        if reply.delay:
            time.sleep(reply.delay)
        if reply.status != 200:
            return self._send(reply.status, reply.headers, b'{"message": "scripted"}',
                              content_type="application/json")
        body = reply.body
        size = body.size if isinstance(body, PatternBody) else len(body)
        headers = dict(reply.headers)
        headers["Content-Length"] = str(reply.length if reply.length is not None else size)
        self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        if reply.stall:
            time.sleep(reply.stall)
        piece_size = 64 * 1024 if reply.trickle else 256 * 1024
        if isinstance(body, PatternBody):
            chunks = body.chunks(piece_size)
        else:
            chunks = [body[i:i + piece_size] for i in range(0, len(body), piece_size)] or [b""]
        sent = 0
        try:
            for piece in chunks:
                if reply.cut_after is not None and sent + len(piece) >= reply.cut_after:
                    self.wfile.write(piece[: reply.cut_after - sent])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(piece)
                sent += len(piece)
                with self.fake.lock:
                    self.fake.bytes_sent += len(piece)
                if reply.trickle:
                    self.wfile.flush()
                    time.sleep(reply.trickle)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if reply.length is not None and reply.length != size:
            self.close_connection = True

    def _json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        self._send(status, headers or {}, json.dumps(payload).encode(), content_type="application/json")

    def _send(self, status: int, headers: dict, body: bytes, content_type: str | None = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _public(hook: dict) -> dict:
    hook = {k: v for k, v in hook.items() if k != "secret"}
    hook["created"] = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(hook["created"]))
    return hook


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a fake Webex API on loopback.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    args = parser.parse_args()
    with FakeWebex(args.host, args.port) as fake:
        print(f"fake Webex API on {fake.api_url} (token {fake.token!r}); Ctrl-C stops it", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
