"""webex: the trusted-host rule, signatures, Retry-After, and the API client against a real fake Webex."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.fakewebex import FakeWebex
from webex import (RETRY_AFTER_CAP, RETRY_AFTER_DEFAULT, WebexClient, WebexError, is_trusted_url,
                   parse_retry_after, signature, verify_signature)

ROOT = Path(__file__).resolve().parent.parent
API = "http://127.0.0.1:5000/v1"


def xfail_bug(reason: str):
    return pytest.mark.xfail(reason=f"BUG: {reason}", strict=True)


# --- is_trusted_url ----------------------------------------------------------------------------

@pytest.mark.parametrize("url, trusted", [
    # the configured API origin (http allowed because it is loopback)
    ("http://127.0.0.1:5000/v1/contents/X", True),
    ("http://127.0.0.1:5000/other/path?q=1", True),
    ("http://127.0.0.1:5001/v1/contents/X", False),
    ("http://127.0.0.2:5000/v1/contents/X", False),
    ("http://localhost:5000/v1/contents/X", False),
    ("https://127.0.0.1:5000/v1/contents/X", False),
    ("http://127.0.0.1:5000@evil.com/", False),
    # the documented Webex hosts, https on 443 only
    ("https://webexapis.com/v1/contents/X", True),
    ("https://api.ciscospark.com/v1/contents/X", True),
    ("https://api-usgov.webex.com/v1/contents/X", True),
    ("https://webexapis.com:443/v1/contents/X", True),
    ("https://WEBEXAPIS.COM/v1/contents/X", True),
    ("HTTPS://webexapis.com/v1/contents/X", True),
    ("http://webexapis.com/v1/contents/X", False),
    ("https://webexapis.com:8443/v1/contents/X", False),
    ("wss://webexapis.com/v1", False),
    # lookalikes and tricks
    ("https://webexapis.com.evil.com/v1", False),
    ("https://evil.com/webexapis.com", False),
    ("https://evil.com/?u=https://webexapis.com", False),
    ("https://sub.webexapis.com/v1", False),
    ("https://webexapis.com./v1", False),
    ("https://webexapis.com@evil.com/", False),
    ("https://user@webexapis.com/v1", False),
    ("https://user:pw@webexapis.com/v1", False),
    ("https://webexapis.com\\@evil.com/", False),
    ("https://webexapis.com%2f@evil.com/", False),
    ("https://webexapis.com\t.evil.com/", False),
    ("https://webexapis.com:99999/", False),
    ("//webexapis.com/v1", False),
    ("webexapis.com/v1", False),
    ("", False),
], ids=lambda v: repr(v)[1:-1] if isinstance(v, str) else None)
def test_is_trusted_url(url, trusted):
    assert is_trusted_url(url, API) is trusted


@pytest.mark.parametrize("url, api_url, trusted", [
    ("http://[::1]:9/v1/x", "http://[::1]:9/v1", True),
    ("http://127.0.0.1/v1/x", "http://127.0.0.1:80/v1", True),
    ("https://proxy.example.com/v1/x", "https://proxy.example.com/v1", True),
    ("https://proxy.example.com:444/v1/x", "https://proxy.example.com/v1", False),
    ("http://example.com/v1/x", "http://example.com/v1", False),  # even if config were bypassed
], ids=["ipv6-loopback", "default-port", "https-origin", "https-origin-other-port", "http-non-loopback"])
def test_is_trusted_url_for_other_api_origins(url, api_url, trusted):
    assert is_trusted_url(url, api_url) is trusted


# --- signatures --------------------------------------------------------------------------------

BODY = b'{"id":"Y2lz","resource":"messages","event":"created","data":{"id":"MSG"}}'
SECRET = "webhook-secret"


def test_signature_is_hex_hmac_sha1_of_the_raw_body():
    # RFC 2104 / Wikipedia test vector
    assert signature("key", b"The quick brown fox jumps over the lazy dog") == \
        "de7c9b85b8b78aa6bc8a7a36f70a90701c9db4d9"
    assert signature(b"key", b"") == signature("key", b"") == "f42bb0eeb018ebbd4597ae7213711ec60760843f"


@pytest.mark.parametrize("secret, body, header, ok", [
    (SECRET, BODY, signature(SECRET, BODY), True),
    (SECRET, BODY, signature(SECRET, BODY).upper(), True),
    (SECRET, BODY, f"  {signature(SECRET, BODY)} ", True),
    (SECRET.encode(), BODY, signature(SECRET, BODY), True),
    ("other-secret", BODY, signature(SECRET, BODY), False),
    (SECRET, BODY + b" ", signature(SECRET, BODY), False),
    (SECRET, BODY.replace(b":", b": "), signature(SECRET, BODY), False),  # re-serialised JSON
    (SECRET, BODY, signature(SECRET, BODY)[:-1], False),
    (SECRET, BODY, "sha1=" + signature(SECRET, BODY), False),
    (SECRET, BODY, "0" * 40, False),
    (SECRET, BODY, None, False),
    (SECRET, BODY, "", False),
    (SECRET, BODY, "é" * 40, False),
    (SECRET, BODY, "\u0130" + signature(SECRET, BODY)[1:], False),
], ids=["right", "uppercase-hex", "whitespace", "bytes-secret", "wrong-secret", "tampered-body",
        "reserialised-body", "truncated", "prefixed", "zeros", "missing", "empty", "non-ascii",
        "dotted-capital-i"])
def test_verify_signature(secret, body, header, ok):
    assert verify_signature(secret, body, header) is ok


# --- parse_retry_after -------------------------------------------------------------------------

NOW = 1_000_000_000.0  # Sun, 09 Sep 2001 01:46:40 GMT


@pytest.mark.parametrize("value, expected", [
    ("120", 120.0),
    ("0", 0.0),
    ("1.5", 1.5),
    (" 30 ", 30.0),
    ("3600", 3600.0),
    ("99999", RETRY_AFTER_CAP),
    ("Sun, 09 Sep 2001 01:48:40 GMT", 120.0),
    ("Sun, 09 Sep 2001 03:48:40 +0200", 120.0),
    ("Sunday, 09-Sep-01 01:48:40 GMT", 120.0),
    ("Sun, 09 Sep 2001 01:46:40 GMT", 0.0),
    ("Sat, 01 Jan 2000 00:00:00 GMT", 0.0),
    ("Fri, 31 Dec 9999 23:59:59 GMT", RETRY_AFTER_CAP),
    ("rand(30),add(30)", RETRY_AFTER_DEFAULT),
    ("-5", RETRY_AFTER_DEFAULT),
    ("1e3", RETRY_AFTER_DEFAULT),
    ("inf", RETRY_AFTER_DEFAULT),
    ("nan", RETRY_AFTER_DEFAULT),
    ("10 seconds", RETRY_AFTER_DEFAULT),
    ("Mon, 99 Foo 2001", RETRY_AFTER_DEFAULT),
    ("", RETRY_AFTER_DEFAULT),
    (None, RETRY_AFTER_DEFAULT),
], ids=lambda v: repr(v) if not isinstance(v, float) else None)
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value, now=lambda: NOW) == expected


@pytest.mark.parametrize("value, kwargs, expected", [
    (None, {"default": 5}, 5),
    ("garbage", {"default": 5}, 5),
    ("100", {"cap": 10}, 10),
    (None, {"default": 100, "cap": 10}, 10),
], ids=["default", "garbage-default", "cap", "default-capped"])
def test_parse_retry_after_default_and_cap(value, kwargs, expected):
    assert parse_retry_after(value, **kwargs) == expected


def test_retry_after_asctime_date_is_gmt_in_any_local_zone():
    """In a child process with TZ set, so this process's environment is left alone."""
    code = "import webex; print(webex.parse_retry_after('Sun Sep  9 01:48:40 2001', now=lambda: 1e9))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "TZ": "XXX+05"},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == 120.0


# --- WebexError --------------------------------------------------------------------------------

@pytest.mark.parametrize("status, temporary", [
    (None, True), (408, True), (423, True), (429, True), (500, True), (502, True), (503, True), (504, True),
    (400, False), (401, False), (403, False), (404, False), (409, False), (410, False),
])
def test_webex_error_temporary(status, temporary):
    assert WebexError("x", status=status).temporary is temporary


# --- WebexClient against the fake --------------------------------------------------------------

class WebexClientClosing(WebexClient):
    """A WebexClient usable in ``with``, for tests that build their own."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture
def client(fake):
    c = WebexClient(fake.api_url, fake.token, timeout=(2, 5))
    yield c
    c.close()


def test_me_sends_the_token(fake, client):
    assert client.me()["id"] == fake.bot["id"]
    (req,) = fake.requests
    assert (req.method, req.path) == ("GET", "/v1/people/me")
    assert req.authorization == f"Bearer {fake.token}"


def test_message(fake, client):
    fake.add_message("MSG1", ["https://webexapis.com/v1/contents/C1"])
    assert client.message("MSG1")["files"] == ["https://webexapis.com/v1/contents/C1"]


@pytest.mark.parametrize("parent_id, expected", [
    (None, {"roomId": "ROOM1", "markdown": "Saved **a.pdf**"}),
    ("PARENT", {"roomId": "ROOM1", "markdown": "Saved **a.pdf**", "parentId": "PARENT"}),
], ids=["top-level", "in-thread"])
def test_post_message(fake, client, parent_id, expected):
    sent = client.post_message("ROOM1", "Saved **a.pdf**", parent_id=parent_id)
    (posted,) = fake.posted
    assert {k: posted[k] for k in posted if k != "id"} == expected
    assert sent["id"] == posted["id"]


def test_webhooks_follows_every_page(fake, client):
    fake.page_size = 2
    created = [client.create_webhook(name=f"hook {i}", target_url=f"https://bot.example.com/{i}", secret="s")
               for i in range(5)]

    listed = list(client.webhooks())

    assert [w["id"] for w in listed] == [w["id"] for w in created]
    pages = [r for r in fake.requests_for("/v1/webhooks") if r.method == "GET"]
    assert len(pages) == 3
    assert [r.query.get("cursor") for r in pages] == [None, ["2"], ["4"]]
    assert all(r.authorization == f"Bearer {fake.token}" for r in pages)


def test_webhooks_empty(client):
    assert list(client.webhooks()) == []


def test_create_update_delete_webhook(fake, client):
    hook = client.create_webhook(name="file bot", target_url="https://bot.example.com/webhook", secret="s1",
                                 filter="hasFiles=true")
    stored = fake.webhooks[hook["id"]]
    assert (stored["resource"], stored["event"], stored["filter"], stored["secret"]) == \
        ("messages", "created", "hasFiles=true", "s1")
    assert "secret" not in hook

    updated = client.update_webhook(hook["id"], name="renamed", target_url="https://new.example.com/webhook",
                                    secret="s2", status="inactive")
    assert (updated["name"], updated["targetUrl"], updated["status"]) == \
        ("renamed", "https://new.example.com/webhook", "inactive")
    assert fake.webhooks[hook["id"]]["secret"] == "s2"

    assert client.delete_webhook(hook["id"]) is None
    assert fake.webhooks == {}
    with pytest.raises(WebexError) as info:
        client.delete_webhook(hook["id"])
    assert info.value.status == 404


def test_not_found_raises_with_status_and_message(fake, client):
    with pytest.raises(WebexError) as info:
        client.message("NO-SUCH-MESSAGE")
    err = info.value
    assert (err.status, err.temporary, err.retry_after) == (404, False, None)
    assert "HTTP 404" in str(err) and "(not found)" in str(err) and "NO-SUCH-MESSAGE" in str(err)


def test_wrong_token_raises_401_without_echoing_it(fake):
    with WebexClientClosing(fake.api_url, "wrong-token-42") as bad, pytest.raises(WebexError) as info:
        bad.me()
    assert (info.value.status, info.value.temporary) == (401, False)
    assert "valid access token" in str(info.value)
    assert "wrong-token-42" not in str(info.value) and fake.token not in str(info.value)


@pytest.mark.parametrize("status, temporary, retry_after", [
    (429, True, 0.0), (423, True, 0.0), (503, True, 0.0), (500, True, None), (502, True, None),
    (400, False, None), (403, False, None),
])
def test_api_errors_carry_status_and_retry_after(fake, client, status, temporary, retry_after):
    fake.fail_api["/v1/people/me"] = [status]  # the fake answers with Retry-After: 0
    with pytest.raises(WebexError) as info:
        client.me()
    assert (info.value.status, info.value.temporary, info.value.retry_after) == (status, temporary, retry_after)
    assert client.me()["id"] == fake.bot["id"]  # the next call goes through


def test_transport_error_is_temporary_without_status():
    with socket.socket() as closed:  # bound but not listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        with WebexClientClosing(f"http://127.0.0.1:{port}/v1", "tok-secret") as c, \
                pytest.raises(WebexError) as info:
            c.me()
    assert (info.value.status, info.value.temporary) == (None, True)
    assert "tok-secret" not in str(info.value)


@pytest.fixture
def slow_fake(fake):
    """The fake answers API calls after 0.3 s; teardown waits until its late answer is written (or fails)."""
    done = threading.Event()

    class Handler(fake.server.RequestHandlerClass):
        def handle(self):
            try:
                super().handle()
            except OSError:  # the client gave up and closed the connection: expected here
                pass
            finally:
                done.set()

    fake.server.RequestHandlerClass = Handler
    fake.api_delay = 0.3
    yield fake
    done.wait(5)


def test_timeout_is_a_temporary_error(slow_fake):
    with WebexClientClosing(slow_fake.api_url, slow_fake.token, timeout=(2, 0.05)) as c, \
            pytest.raises(WebexError) as info:
        c.me()
    assert (info.value.status, info.value.temporary) == (None, True)
    assert "Timeout" in str(info.value)


class FakeWithForeignNextLink(FakeWebex):
    """A fake whose webhook pages say ``Link: <{next_api_url}/webhooks?cursor=N>; rel="next"``."""

    def __init__(self, next_api_url: str):
        super().__init__(page_size=1)
        self.next_api_url = next_api_url

    @property
    def api_url(self) -> str:
        return self.next_api_url


def test_next_link_to_another_host_is_not_followed(stranger):
    with FakeWithForeignNextLink(stranger.api_url) as fake, \
            WebexClientClosing(f"{fake.url}/v1", fake.token) as c:
        for i in range(2):
            c.create_webhook(name=f"hook {i}", target_url="https://bot.example.com/", secret="s")
        pages = c.webhooks()
        first = next(pages)
        with pytest.raises(WebexError) as info:
            next(pages)
    assert first["name"] == "hook 0"
    assert "untrusted" in str(info.value)
    assert stranger.requests == []
