"""Everything Webex-specific: the trusted-host rule, signatures, Retry-After, the API client.

Plain functions of plain values and a small ``requests``-based client; no Flask,
no files on disk.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import re
import time
from datetime import timezone
from typing import Any, Callable, Iterator
from urllib.parse import urljoin, urlsplit

import requests

from config import is_loopback_host

# The documented Webex API hosts (current, legacy, FedRAMP).
WEBEX_API_HOSTS = frozenset({"webexapis.com", "api.ciscospark.com", "api-usgov.webex.com"})

DEFAULT_TIMEOUT = (10, 30)  # (connect, read) seconds, on every call
RETRY_AFTER_DEFAULT = 60.0
RETRY_AFTER_CAP = 3600.0

_NEXT_LINK = re.compile(r'<([^>]*)>\s*;[^,]*\brel="?next"?', re.IGNORECASE)


class WebexError(Exception):
    """A Webex API call failed. ``status`` is the HTTP status, or None for a transport error."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None,
                 permanent: bool = False):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.permanent = permanent

    @property
    def temporary(self) -> bool:
        if self.permanent:
            return False
        return self.status is None or self.status in (408, 423, 429) or self.status >= 500


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def is_trusted_url(url: str, api_url: str) -> bool:
    """May the bot token be sent to ``url``?

    Yes for the origin of ``api_url`` (which config only allows as https, or http
    to loopback) and for the documented Webex API hosts over https on port 443.
    No for everything else, including userinfo tricks and other ports.
    """
    try:
        parts = urlsplit(url)
        scheme, host, port = _origin(url)
    except ValueError:
        return False
    if parts.username is not None or parts.password is not None or not host:
        return False
    if (scheme, host, port) == _origin(api_url):
        return scheme == "https" or (scheme == "http" and is_loopback_host(host))
    return scheme == "https" and host in WEBEX_API_HOSTS and port == 443


def signature(secret: str | bytes, body: bytes) -> str:
    """The ``X-Spark-Signature`` Webex sends: hex HMAC-SHA1 of the raw body."""
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, body, hashlib.sha1).hexdigest()


def verify_signature(secret: str | bytes, body: bytes, header: str | None) -> bool:
    """Constant-time check of ``header`` against the raw ``body``."""
    if not header:
        return False
    return hmac.compare_digest(signature(secret, body), header.strip().lower().encode("ascii", "replace").decode())


def parse_retry_after(value: str | None, *, now: Callable[[], float] = time.time,
                      default: float = RETRY_AFTER_DEFAULT, cap: float = RETRY_AFTER_CAP) -> float:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date.

    Never raises: a missing or unparseable value (``'rand(30),add(30)'``) gives
    ``default``; a date in the past gives 0; anything above ``cap`` is capped.
    """
    if value is None:
        return min(default, cap)
    text = value.strip()
    seconds: float | None = None
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):
        seconds = float(text)
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
            if when.tzinfo is None:  # the asctime form has no zone and means GMT
                when = when.replace(tzinfo=timezone.utc)
            seconds = when.timestamp() - now()
        except (TypeError, ValueError, IndexError, OverflowError):
            seconds = None
    if seconds is None:
        seconds = default
    return max(0.0, min(seconds, cap))


class TrustedSession(requests.Session):
    """A session that drops ``Authorization`` on any redirect to an untrusted URL.

    requests already strips it on a change of host; this also covers a change of
    scheme or port and keeps it only where :func:`is_trusted_url` says so.
    """

    def __init__(self, api_url: str):
        super().__init__()
        self.api_url = api_url

    def rebuild_auth(self, prepared_request, response):
        if not is_trusted_url(prepared_request.url, self.api_url):
            prepared_request.headers.pop("Authorization", None)


def new_session(api_url: str, token: str) -> TrustedSession:
    session = TrustedSession(api_url)
    session.headers["Authorization"] = f"Bearer {token}"
    session.headers["User-Agent"] = "webex-file-bot/1.0"
    return session


class WebexClient:
    """A small client for the management API under ``api_url``.

    Every call has a timeout; failures raise :class:`WebexError` with the status
    and, for 429/423/503, the parsed ``Retry-After``.
    """

    def __init__(self, api_url: str, token: str, *, timeout=DEFAULT_TIMEOUT):
        self.api_url = api_url.rstrip("/")
        self.session = new_session(self.api_url, token)
        self.timeout = timeout

    def close(self) -> None:
        self.session.close()

    def _request(self, method: str, url: str, **kwargs) -> requests.Response:
        if not url.startswith(("http://", "https://")):
            url = f"{self.api_url}/{url.lstrip('/')}"
        if not is_trusted_url(url, self.api_url):
            raise WebexError(f"refusing to send the token to untrusted URL {url!r}", permanent=True)
        try:
            response = self.session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise WebexError(f"{method} {url}: {type(exc).__name__}") from None
        if response.status_code >= 400:
            retry_after = None
            if response.status_code in (423, 429, 503):
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
            detail = _error_message(response)
            raise WebexError(f"{method} {url}: HTTP {response.status_code}{detail}",
                             status=response.status_code, retry_after=retry_after)
        return response

    def _json(self, method: str, path: str, **kwargs) -> Any:
        response = self._request(method, path, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise WebexError(f"{method} {path}: response is not JSON", status=response.status_code) from None

    def me(self) -> dict:
        return self._json("GET", "people/me")

    def message(self, message_id: str) -> dict:
        return self._json("GET", f"messages/{message_id}")

    def post_message(self, room_id: str, markdown: str, parent_id: str | None = None) -> dict:
        body = {"roomId": room_id, "markdown": markdown}
        if parent_id:
            body["parentId"] = parent_id
        return self._json("POST", "messages", json=body)

    def webhooks(self) -> Iterator[dict]:
        """Every webhook of the bot, following ``Link: <...>; rel="next"`` pages."""
        url: str | None = f"{self.api_url}/webhooks?max=100"
        seen = set()
        while url and url not in seen:
            seen.add(url)
            response = self._request("GET", url)
            try:
                items = response.json()["items"]
            except (ValueError, KeyError, TypeError):
                raise WebexError(f"GET {url}: not a list of webhooks", status=response.status_code) from None
            yield from items
            match = _NEXT_LINK.search(response.headers.get("Link", ""))
            url = urljoin(response.url, match.group(1)) if match else None

    def create_webhook(self, *, name: str, target_url: str, secret: str,
                       resource: str = "messages", event: str = "created", filter: str | None = None) -> dict:
        body = {"name": name, "targetUrl": target_url, "resource": resource, "event": event, "secret": secret}
        if filter:
            body["filter"] = filter
        return self._json("POST", "webhooks", json=body)

    def update_webhook(self, webhook_id: str, *, name: str, target_url: str, secret: str,
                       status: str = "active") -> dict:
        body = {"name": name, "targetUrl": target_url, "secret": secret, "status": status}
        return self._json("PUT", f"webhooks/{webhook_id}", json=body)

    def delete_webhook(self, webhook_id: str) -> None:
        self._json("DELETE", f"webhooks/{webhook_id}")


def _error_message(response: requests.Response) -> str:
    try:
        message = response.json().get("message")
    except (ValueError, AttributeError):
        return ""
    return f" ({message})" if isinstance(message, str) and message else ""
