"""Operator commands (flask --app app ...) against the fake Webex over real HTTP."""

import json
import re
from pathlib import Path

import pytest

from app import create_app
from tests.conftest import wait_until
from tests.fakewebex import PatternBody, Reply, webhook_payload

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cli(make_settings):
    def run(*args, settings=None, input=None):
        app = create_app(settings or make_settings())
        return app.test_cli_runner().invoke(args=list(args), input=input)
    return run


def test_check_reports_the_bot_and_warns_without_a_webhook(fake, cli):
    result = cli("check")
    assert result.exit_code == 0, result.output
    assert "bot: File Bot (filebot@webex.bot)" in result.output
    assert "warning: no active messages webhook" in result.output


def test_check_fails_clearly_on_a_rejected_token(fake, make_settings, cli):
    result = cli("check", settings=make_settings(WEBEX_BOT_TOKEN="wrong-token"))
    assert result.exit_code == 1
    assert "the token was rejected: check WEBEX_BOT_TOKEN" in result.output


def test_check_json(fake, cli):
    cli("webhooks", "create", "https://bot.example.com/webhook")
    result = cli("check", "--json")
    report = json.loads(result.output)
    assert report["webhooks"] == {"total": 1, "active": 1} and report["problems"] == []


def test_webhooks_create_twice_updates_instead_of_duplicating(fake, cli):
    first = cli("webhooks", "create", "https://one.ngrok.app/webhook")
    assert first.exit_code == 0 and first.output.startswith("created webhook")
    [hook] = fake.webhooks.values()
    hook["status"] = "inactive"  # Webex disabled it while the laptop slept

    second = cli("webhooks", "create", "https://two.ngrok.app/webhook")

    assert second.exit_code == 0 and second.output.startswith("updated webhook")
    [hook] = fake.webhooks.values()
    assert hook["targetUrl"] == "https://two.ngrok.app/webhook"
    assert hook["status"] == "active"
    assert hook["secret"] == "webhook-secret-for-tests"
    assert (hook["resource"], hook["event"]) == ("messages", "created")


def test_webhooks_create_with_files_only_and_a_new_filter_replaces_the_webhook(fake, cli):
    cli("webhooks", "create", "https://bot.example.com/webhook")
    result = cli("webhooks", "create", "https://bot.example.com/webhook", "--filter", "roomType=direct",
                 "--files-only")
    assert result.output.startswith("replaced webhook")
    [hook] = fake.webhooks.values()
    assert hook["filter"] == "roomType=direct&hasFiles=true"


def test_webhooks_list_shows_all_pages_and_flags_problems(fake, cli):
    for i in range(5):  # the fake pages by 2
        fake.webhooks[f"WH{i}"] = {"id": f"WH{i}", "name": f"hook{i}", "targetUrl": f"https://old{i}.example/webhook",
                                   "resource": "messages", "event": "created", "filter": "",
                                   "status": "inactive" if i == 3 else "active", "created": i}
    cli("webhooks", "create", "https://current.example/webhook", "--name", "hook4")
    result = cli("webhooks", "list")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split() == ["ID", "NAME", "TARGET", "FILTER", "STATUS", "NOTES"]
    assert len(lines) == 6
    assert "INACTIVE" in next(line for line in lines if line.startswith("WH3"))
    assert "points elsewhere" in next(line for line in lines if line.startswith("WH0"))
    assert "points elsewhere" not in next(line for line in lines if " hook4 " in line)
    assert len(json.loads(cli("webhooks", "list", "--json").output)) == 5


def test_webhooks_delete_one_and_all(fake, cli):
    for name in ("a", "b", "c"):
        cli("webhooks", "create", f"https://{name}.example/webhook", "--name", name)
    one = next(iter(fake.webhooks))
    assert cli("webhooks", "delete", one).exit_code == 0
    assert len(fake.webhooks) == 2
    assert cli("webhooks", "delete", "--all", input="n\n").exit_code == 1
    assert len(fake.webhooks) == 2
    assert cli("webhooks", "delete", "--all", input="y\n").exit_code == 0
    assert fake.webhooks == {}
    assert cli("webhooks", "delete").exit_code != 0


def test_downloads_history_and_retry(fake, make_settings, run_bot, cli):
    settings = make_settings()
    ok = fake.add_file(PatternBody(2_500_000), name="report.pdf")
    bad = fake.add_file(b"nope", name="virus.exe")
    fake.script(bad, Reply(410))
    running = run_bot(settings)
    running.post(webhook_payload("M1", [ok, bad]))
    wait_until(lambda: len(running.files("saved")) + len(running.files("failed")) == 2, message="both done")

    result = cli("downloads", settings=settings)
    assert result.exit_code == 0
    assert re.search(r"alice@example.com\s+report.pdf\s+2.5 MB\s+saved", result.output)
    assert "failed: blocked: Webex flagged it as infected" in result.output
    failed_only = cli("downloads", "--state", "failed", "--json", settings=settings)
    [item] = json.loads(failed_only.output)
    assert item["reason"] == "infected"

    assert cli("downloads", "retry", str(item["id"]), settings=settings).exit_code == 0
    running.bot.workers.wake()
    wait_until(lambda: len(running.files("saved")) == 2, message="retried file saved")
    assert cli("downloads", "retry", str(item["id"]), settings=settings).exit_code == 1


def test_commands_never_start_workers(fake, make_settings):
    app = create_app(make_settings())
    app.test_cli_runner().invoke(args=["check"])
    assert app.extensions["filebot"].workers is None


def test_every_command_is_documented_in_the_readme(make_settings):
    readme = (ROOT / "README.md").read_text()
    app = create_app(make_settings())
    commands = []
    for name, command in app.cli.commands.items():
        if name in ("run", "shell", "routes"):
            continue
        subs = getattr(command, "commands", {})
        commands.append(name)
        commands += [f"{name} {sub}" for sub in subs]
    missing = [c for c in commands if f"flask --app app {c}" not in readme]
    assert commands and missing == []
