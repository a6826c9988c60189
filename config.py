"""Settings: read the environment (and a `.env` file) once, validate, freeze.

This is the only module that looks at ``os.environ``. Everything else receives
a :class:`Settings`. Tests build one with ``load_settings({...})`` from a plain
dict, which ignores both the real environment and any `.env` file.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

from dotenv import dotenv_values

DEFAULT_API_URL = "https://webexapis.com/v1"

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")
_SUBDIR_FIELDS = ("sender_email", "sender_domain", "room_id", "room_type", "date", "message_id")


class ConfigError(ValueError):
    """One or more settings are missing or malformed; ``problems`` lists each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"invalid settings ({len(problems)}):\n{lines}\n"
            "Set them in the environment or in a .env file (see .env.example)."
        )


@dataclass(frozen=True)
class Settings:
    """The bot's validated settings. Secrets are kept out of ``repr()``."""

    bot_token: str = field(repr=False)
    webhook_secret: str = field(repr=False)
    api_url: str = DEFAULT_API_URL
    download_dir: Path = Path("downloads")
    database_url: str = "sqlite:///data/bot.sqlite3"
    host: str = "127.0.0.1"
    port: int = 8080
    download_workers: int = 4
    max_file_size: int = 150 * 1000**2
    allow_unscannable: bool = False
    allowed_senders: tuple[str, ...] = ()
    reply_on_save: bool = True
    log_level: str = "INFO"
    log_format: str = "text"
    download_subdir: str = ""
    proxy_hops: int = 0

    @property
    def database_path(self) -> Path:
        """The SQLite file named by ``database_url`` (``sqlite:///rel`` or ``sqlite:////abs``)."""
        return Path(self.database_url[len("sqlite:///"):])


def parse_size(text: str) -> int:
    """``'150MB'`` → 150_000_000, ``'1GiB'`` → 1_073_741_824, ``'42'`` → 42."""
    m = _SIZE_RE.match(text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(text)
    return int(Decimal(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    """Bytes for people: ``1234567`` → ``'1.2 MB'``, ``150000000`` → ``'150 MB'`` (decimal units)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{n:.1f}".removesuffix(".0") + f" {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``env``.

    With ``env=None`` the source is ``.env`` in the working directory overlaid
    by the process environment (the environment wins). Raises
    :class:`ConfigError` naming every bad variable at once.
    """
    if env is None:
        env = {**{k: v for k, v in dotenv_values(".env").items() if v is not None}, **os.environ}
    problems: list[str] = []
    values: dict = {}

    def get(name: str, default: str = "") -> str:
        return env.get(name, default).strip()

    def check(name: str, key: str, parse, expected: str, default: str) -> None:
        raw = get(name, default)
        try:
            values[key] = parse(raw)
        except (ValueError, TypeError):
            problems.append(f"{name}={raw!r}: expected {expected}")

    for name, key in (("WEBEX_BOT_TOKEN", "bot_token"), ("WEBEX_WEBHOOK_SECRET", "webhook_secret")):
        if not get(name):
            problems.append(f"{name} is missing: it is required")
        else:
            values[key] = get(name)

    check("WEBEX_API_URL", "api_url", _api_url,
          "an https URL (plain http only to a loopback address)", DEFAULT_API_URL)
    check("DOWNLOAD_DIR", "download_dir", _nonempty_path, "a folder path", "./downloads")
    check("DATABASE_URL", "database_url", _sqlite_url,
          "sqlite:///relative/path or sqlite:////absolute/path", "sqlite:///data/bot.sqlite3")
    check("HOST", "host", _nonempty, "an address to listen on", "127.0.0.1")
    check("PORT", "port", lambda s: _int_in(s, 1, 65535), "a port number 1-65535", "8080")
    check("DOWNLOAD_WORKERS", "download_workers", lambda s: _int_in(s, 1, 64),
          "a whole number 1-64", "4")
    check("MAX_FILE_SIZE", "max_file_size", _positive_size,
          "bytes or a size like 150MB", "150MB")
    check("ALLOW_UNSCANNABLE", "allow_unscannable", _bool, "true or false", "false")
    check("ALLOWED_SENDERS", "allowed_senders", _senders,
          "comma-separated emails or @domains, e.g. alice@x.com,@example.com", "")
    check("REPLY_ON_SAVE", "reply_on_save", _bool, "true or false", "true")
    check("LOG_LEVEL", "log_level", _log_level, "one of " + ", ".join(_LOG_LEVELS), "INFO")
    check("LOG_FORMAT", "log_format", _log_format, "text or json", "text")
    check("PROXY_HOPS", "proxy_hops", lambda s: _int_in(s, 0, 5),
          "the number of reverse proxies in front (0-5)", "0")
    check("DOWNLOAD_SUBDIR", "download_subdir", _subdir,
          "a template using only {" + "}, {".join(_SUBDIR_FIELDS) + "}", "")

    if problems:
        raise ConfigError(problems)
    return Settings(**values)


def _nonempty(s: str) -> str:
    if not s:
        raise ValueError(s)
    return s


def _nonempty_path(s: str) -> Path:
    return Path(_nonempty(s))


def _int_in(s: str, lo: int, hi: int) -> int:
    if not (s.isascii() and s.isdigit()):
        raise ValueError(s)
    n = int(s)
    if not lo <= n <= hi:
        raise ValueError(s)
    return n


def _positive_size(s: str) -> int:
    n = parse_size(s)
    if n <= 0:
        raise ValueError(s)
    return n


def _bool(s: str) -> bool:
    if s.lower() in _TRUE:
        return True
    if s.lower() in _FALSE:
        return False
    raise ValueError(s)


def _api_url(s: str) -> str:
    parts = urlsplit(s)
    if not parts.hostname or parts.query or parts.fragment or parts.username is not None:
        raise ValueError(s)
    if parts.scheme != "https" and not (parts.scheme == "http" and is_loopback_host(parts.hostname)):
        raise ValueError(s)
    if parts.port == 0:  # reading .port also raises ValueError for a non-number or one above 65535
        raise ValueError(s)
    return s.rstrip("/")


def _sqlite_url(s: str) -> str:
    path = s[len("sqlite:///"):]
    if not s.startswith("sqlite:///") or not path or path.endswith("/") or ":memory:" in path:
        raise ValueError(s)  # in-memory would give every thread its own empty ledger
    return s


def _senders(s: str) -> tuple[str, ...]:
    items = tuple(p.strip().lower() for p in s.split(",") if p.strip())
    for item in items:
        local, at, domain = item.rpartition("@")
        if not at or not domain or "." not in domain or " " in item:
            raise ValueError(s)
    return items


def _log_level(s: str) -> str:
    if s.upper() not in _LOG_LEVELS:
        raise ValueError(s)
    return s.upper()


def _log_format(s: str) -> str:
    if s.lower() not in ("text", "json"):
        raise ValueError(s)
    return s.lower()


def _subdir(s: str) -> str:
    if not s:
        return s
    try:
        s.format(**{k: "x" for k in _SUBDIR_FIELDS})
    except (KeyError, IndexError, ValueError, AttributeError):
        raise ValueError(s) from None
    if s.startswith("/") or ".." in s.split("/"):
        raise ValueError(s)
    return s
