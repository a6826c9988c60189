"""config: defaults, parsing of every variable, one error naming every bad one, secrets kept out of repr."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from config import DEFAULT_API_URL, ConfigError, Settings, format_size, load_settings, parse_size

ROOT = Path(__file__).resolve().parent.parent
TOKEN, SECRET = "tok-0123456789-secret", "hook-secret-9876543210"
REQUIRED = {"WEBEX_BOT_TOKEN": TOKEN, "WEBEX_WEBHOOK_SECRET": SECRET}


def settings(**env: str) -> Settings:
    return load_settings({**REQUIRED, **env})


def problems(**env: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    return info.value.problems


def xfail_bug(reason: str):
    return pytest.mark.xfail(reason=f"BUG: {reason}", strict=True)


def test_defaults():
    s = settings()
    assert (s.bot_token, s.webhook_secret) == (TOKEN, SECRET)
    assert s.api_url == DEFAULT_API_URL == "https://webexapis.com/v1"
    assert s.download_dir == Path("downloads")
    assert s.database_url == "sqlite:///data/bot.sqlite3" and s.database_path == Path("data/bot.sqlite3")
    assert (s.host, s.port) == ("127.0.0.1", 8080)
    assert s.download_workers == 4
    assert s.max_file_size == 150_000_000
    assert s.allow_unscannable is False and s.reply_on_save is True
    assert s.allowed_senders == ()
    assert (s.log_level, s.log_format, s.download_subdir) == ("INFO", "text", "")


@pytest.mark.parametrize("var, raw, attr, expected", [
    ("WEBEX_BOT_TOKEN", "  padded-token  ", "bot_token", "padded-token"),
    ("WEBEX_API_URL", "https://proxy.example.com/v1/", "api_url", "https://proxy.example.com/v1"),
    ("WEBEX_API_URL", "http://127.0.0.1:9/v1", "api_url", "http://127.0.0.1:9/v1"),
    ("DOWNLOAD_DIR", "/srv/files", "download_dir", Path("/srv/files")),
    ("DATABASE_URL", "sqlite:////var/lib/bot/ledger.db", "database_path", Path("/var/lib/bot/ledger.db")),
    ("DATABASE_URL", "sqlite:///rel/ledger.db", "database_path", Path("rel/ledger.db")),
    ("HOST", "0.0.0.0", "host", "0.0.0.0"),
    ("PORT", "1", "port", 1),
    ("PORT", " 65535 ", "port", 65535),
    ("DOWNLOAD_WORKERS", "64", "download_workers", 64),
    ("MAX_FILE_SIZE", "150MB", "max_file_size", 150_000_000),
    ("MAX_FILE_SIZE", "1GiB", "max_file_size", 1024**3),
    ("MAX_FILE_SIZE", "42", "max_file_size", 42),
    ("MAX_FILE_SIZE", "1.5GB", "max_file_size", 1_500_000_000),
    ("MAX_FILE_SIZE", " 10 kb ", "max_file_size", 10_000),
    ("ALLOW_UNSCANNABLE", "TRUE", "allow_unscannable", True),
    ("ALLOW_UNSCANNABLE", "on", "allow_unscannable", True),
    ("ALLOW_UNSCANNABLE", "0", "allow_unscannable", False),
    ("REPLY_ON_SAVE", "no", "reply_on_save", False),
    ("REPLY_ON_SAVE", "Yes", "reply_on_save", True),
    ("REPLY_ON_SAVE", "", "reply_on_save", False),
    ("ALLOWED_SENDERS", "alice@x.com,@example.com", "allowed_senders", ("alice@x.com", "@example.com")),
    ("ALLOWED_SENDERS", " Alice@X.com , @Example.COM ,", "allowed_senders", ("alice@x.com", "@example.com")),
    ("LOG_LEVEL", "debug", "log_level", "DEBUG"),
    ("LOG_FORMAT", "JSON", "log_format", "json"),
    ("DOWNLOAD_SUBDIR", "{sender_email}/{date}", "download_subdir", "{sender_email}/{date}"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 40 and v.strip() == v and v else None)
def test_every_variable_is_parsed(var, raw, attr, expected):
    assert getattr(settings(**{var: raw}), attr) == expected


@pytest.mark.parametrize("text, expected", [
    ("150MB", 150_000_000), ("1GiB", 1_073_741_824), ("42", 42), ("1.5GB", 1_500_000_000),
    ("1KiB", 1024), ("2mib", 2 * 1024**2), ("3k", 3000), ("1TB", 10**12), ("7b", 7), ("1.5 MB", 1_500_000),
    ("1.005KB", 1005),
], ids=lambda v: v if isinstance(v, str) else None)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "", "-1", "1e3", "10XB", "1,000", "MB", "1.2.3MB"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("n, expected", [
    (0, "0 B"), (999, "999 B"), (1000, "1 KB"), (1_234_567, "1.2 MB"), (5 * 10**9, "5 GB"),
    (150_000_000, "150 MB"), (5 * 10**12, "5000 GB"),
])
def test_format_size(n, expected):
    assert format_size(n) == expected


BAD = [
    ("WEBEX_API_URL", "http://example.com", "an https URL (plain http only to a loopback address)"),
    ("DOWNLOAD_DIR", " ", "a folder path"),
    ("DATABASE_URL", "postgres://db/bot", "sqlite:///relative/path or sqlite:////absolute/path"),
    ("HOST", "", "an address to listen on"),
    ("PORT", "99999", "a port number 1-65535"),
    ("DOWNLOAD_WORKERS", "0", "a whole number 1-64"),
    ("MAX_FILE_SIZE", "lots", "expected bytes or a size like 150MB"),
    ("ALLOW_UNSCANNABLE", "maybe", "true or false"),
    ("ALLOWED_SENDERS", "bob", "comma-separated emails or @domains"),
    ("REPLY_ON_SAVE", "sure", "true or false"),
    ("LOG_LEVEL", "LOUD", "one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("LOG_FORMAT", "xml", "text or json"),
    ("DOWNLOAD_SUBDIR", "{nope}", "a template using only {sender_email}"),
]


def test_one_error_names_every_bad_variable():
    with pytest.raises(ConfigError) as info:
        load_settings({var: raw for var, raw, _ in BAD})
    err = info.value
    assert isinstance(err, ValueError)
    assert len(err.problems) == len(BAD) + 2
    assert "WEBEX_BOT_TOKEN is missing" in str(err) and "WEBEX_WEBHOOK_SECRET is missing" in str(err)
    for var, raw, expected in BAD:
        assert any(p.startswith(f"{var}={raw.strip()!r}") and expected in p for p in err.problems), var
    assert f"invalid settings ({len(BAD) + 2})" in str(err) and ".env" in str(err)


@pytest.mark.parametrize("var, raw", [
    ("MAX_FILE_SIZE", "0"), ("MAX_FILE_SIZE", "0.5"), ("MAX_FILE_SIZE", "-1"), ("MAX_FILE_SIZE", "1e3"),
    ("PORT", "0"), ("PORT", "65536"), ("PORT", "80.0"), ("PORT", "http"),
    ("DOWNLOAD_WORKERS", "65"), ("DOWNLOAD_WORKERS", "four"),
    ("ALLOW_UNSCANNABLE", "2"), ("REPLY_ON_SAVE", "nope"),
    ("ALLOWED_SENDERS", "x.com"), ("ALLOWED_SENDERS", "@"), ("ALLOWED_SENDERS", "alice@"),
    ("ALLOWED_SENDERS", "a b@x.com"), ("ALLOWED_SENDERS", "@localhost"),
    ("DATABASE_URL", "sqlite:///"), ("DATABASE_URL", "sqlite://relative.db"),
    ("DOWNLOAD_SUBDIR", "/abs"), ("DOWNLOAD_SUBDIR", "../x"), ("DOWNLOAD_SUBDIR", "a/../b"),
    ("DOWNLOAD_SUBDIR", "{0}"), ("DOWNLOAD_SUBDIR", "{date:%Y}"),
], ids=lambda v: v)
def test_bad_value_is_named(var, raw):
    assert [p.split("=", 1)[0] for p in problems(**REQUIRED, **{var: raw})] == [var]


@pytest.mark.parametrize("token, secret, missing", [
    ("", "", ["WEBEX_BOT_TOKEN", "WEBEX_WEBHOOK_SECRET"]),
    ("   ", SECRET, ["WEBEX_BOT_TOKEN"]),
    (TOKEN, None, ["WEBEX_WEBHOOK_SECRET"]),
], ids=["both-empty", "blank-token", "no-secret"])
def test_missing_secrets_are_named(token, secret, missing):
    env = {"WEBEX_BOT_TOKEN": token} | ({"WEBEX_WEBHOOK_SECRET": secret} if secret is not None else {})
    assert problems(**env) == [f"{name} is missing: it is required" for name in missing]


@pytest.mark.parametrize("url, ok", [
    ("https://webexapis.com/v1", True),
    ("https://proxy.example.com:8443/v1", True),
    ("http://127.0.0.1:9/v1", True),
    ("http://127.0.0.2/v1", True),
    ("http://[::1]:9/v1", True),
    ("http://localhost:9/v1", True),
    ("http://example.com", False),
    ("http://webexapis.com/v1", False),
    ("http://0.0.0.0/v1", False),
    ("http://127.0.0.1.evil.com/v1", False),
    ("http://localhost.evil.com/v1", False),
    ("ftp://webexapis.com/v1", False),
    ("https://", False),
    ("webexapis.com/v1", False),
    ("https://webexapis.com/v1?x=1", False),
    ("https://webexapis.com/v1#frag", False),
    ("https://user:pw@webexapis.com/v1", False),
], ids=lambda v: v if isinstance(v, str) else None)
def test_api_url_must_be_https_or_loopback_http(url, ok):
    if ok:
        assert settings(WEBEX_API_URL=url).api_url == url
    else:
        assert [p.split("=", 1)[0] for p in problems(**REQUIRED, WEBEX_API_URL=url)] == ["WEBEX_API_URL"]


def test_secrets_stay_out_of_repr():
    s = settings()
    for text in (repr(s), str(s)):
        assert TOKEN not in text and SECRET not in text
        assert "api_url=" in text  # the rest is still shown


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings().port = 1


def test_config_error_does_not_echo_secrets():
    with pytest.raises(ConfigError) as info:
        load_settings({**REQUIRED, "PORT": "x"})
    assert TOKEN not in str(info.value) and SECRET not in str(info.value)


DOTENV = f"""\
# a comment
WEBEX_BOT_TOKEN="{TOKEN}"
WEBEX_WEBHOOK_SECRET={SECRET}
MAX_FILE_SIZE=2MB
LOG_LEVEL=error
"""


def test_load_settings_without_a_dict_reads_dotenv_in_cwd(tmp_path, monkeypatch):
    already = [v for v in ("WEBEX_BOT_TOKEN", "WEBEX_WEBHOOK_SECRET", "MAX_FILE_SIZE", "LOG_LEVEL") if v in os.environ]
    if already:
        pytest.skip(f"the environment already sets {already}, which would win over .env")
    (tmp_path / ".env").write_text(DOTENV)
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert (s.bot_token, s.webhook_secret, s.max_file_size, s.log_level) == (TOKEN, SECRET, 2_000_000, "ERROR")


def test_environment_wins_over_dotenv(tmp_path):
    """In a child process, so the test controls the whole environment without touching ours."""
    (tmp_path / ".env").write_text(DOTENV)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from config import load_settings; "
            "s = load_settings(); print(s.log_level, s.max_file_size, s.bot_token == sys.argv[2])")
    env = {"PATH": os.environ.get("PATH", ""), "LOG_LEVEL": "DEBUG"}
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), TOKEN], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["DEBUG", "2000000", "True"]


def test_dict_ignores_dotenv_in_cwd(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text(DOTENV)
    monkeypatch.chdir(tmp_path)
    assert settings().max_file_size == 150_000_000
    assert problems(WEBEX_BOT_TOKEN=TOKEN) == ["WEBEX_WEBHOOK_SECRET is missing: it is required"]


@pytest.mark.parametrize("name,value", [
    ("DATABASE_URL", "sqlite:///:memory:"),
    ("DATABASE_URL", "sqlite:///data/"),
    ("WEBEX_API_URL", "https://webexapis.com:99999/v1"),
    ("WEBEX_API_URL", "https://webexapis.com:abc/v1"),
    ("WEBEX_API_URL", "https://webexapis.com:0/v1"),
])
def test_settings_that_would_break_the_bot_at_run_time_are_refused(name, value):
    env = {"WEBEX_BOT_TOKEN": "t", "WEBEX_WEBHOOK_SECRET": "s", name: value}
    with pytest.raises(ConfigError) as error:
        load_settings(env)
    assert f"{name}={value!r}" in str(error.value)
