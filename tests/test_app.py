"""The webhook server end to end: real signed requests through the real app over HTTP,
workers downloading from the fake Webex on 127.0.0.1."""

import hashlib
import json

import pytest
import requests

from jobs import RetryPolicy
from tests.conftest import FakeClock, sign, wait_until
from tests.fakewebex import BOT_ID, PatternBody, Reply, webhook_payload


def saved_names(running):
    return sorted(row["name"] for row in running.files("saved"))


def message_row(running, message_id):
    return running.bot.ledger.message(message_id)


def content_gets(fake):
    return [r for r in fake.requests_for("/contents/") if r.method == "GET"]


# --- receiving ----------------------------------------------------------------

def test_signed_webhook_is_acknowledged_and_every_file_saved(fake, make_settings, run_bot):
    first = fake.add_file(b"alpha", name="a.txt")
    second = fake.add_file(PatternBody(3_000_000, seed=1), name="b.bin", content_type="application/octet-stream")
    running = run_bot(make_settings())

    response = running.post(webhook_payload("M1", [first, second]))

    assert response.status_code == 202
    wait_until(lambda: len(running.files("saved")) == 2, message="both files saved")
    folder = running.bot.settings.download_dir
    assert (folder / "a.txt").read_bytes() == b"alpha"
    assert hashlib.sha256((folder / "b.bin").read_bytes()).hexdigest() == PatternBody(3_000_000, 1).sha256()
    assert all(r.authorization == f"Bearer {fake.token}" for r in content_gets(fake))
    assert sorted(p.name for p in folder.iterdir()) == [".partial", "a.txt", "b.bin"]


@pytest.mark.parametrize("signature", [None, "", "0" * 40, "not-hex", sign(b"another body")],
                         ids=["missing", "empty", "zeros", "garbage", "other-body"])
def test_forged_or_missing_signature_is_401_and_nothing_happens(fake, make_settings, run_bot, signature):
    url = fake.add_file(b"x")
    running = run_bot(make_settings())
    body = json.dumps(webhook_payload("M1", [url])).encode()
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["X-Spark-Signature"] = signature

    response = requests.post(f"{running.url}/webhook", data=body, headers=headers, timeout=10)

    assert response.status_code == 401
    assert running.bot.ledger.message("M1") is None
    assert running.files() == []
    assert content_gets(fake) == []


def test_signature_with_the_wrong_secret_is_401(fake, make_settings, run_bot):
    running = run_bot(make_settings(), workers=False)
    response = running.post(webhook_payload("M1", []), secret="not-the-secret")
    assert response.status_code == 401


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"data": "x"}', b'{"resource": "messages"}',
                                  b'{"data": {"id": 42}}', b'{"data": {"id": ""}}', b"\xff\xfe",
                                  b'{"data": {"id": "M1", "personEmail": ["a@b.c"]}}',
                                  b'{"data": {"id": "M1", "roomId": {"x": 1}}}', b"[" * 30_000 + b"]" * 30_000],
                         ids=["text", "list", "data-not-object", "no-data", "id-not-string", "id-empty",
                              "binary", "email-not-string", "room-not-string", "deeply-nested"])
def test_signed_body_that_is_not_a_webhook_is_400(make_settings, run_bot, body):
    running = run_bot(make_settings(), workers=False)
    assert running.post(body).status_code == 400
    assert running.files() == []


def test_oversized_chunked_body_is_413_not_401(make_settings, run_bot):
    running = run_bot(make_settings(), workers=False)
    body = json.dumps({"data": {"id": "M1", "pad": "x" * 100_000}}).encode()
    chunks = (body[i:i + 8192] for i in range(0, len(body), 8192))  # no Content-Length: chunked
    response = requests.post(f"{running.url}/webhook", data=chunks, timeout=10,
                             headers={"X-Spark-Signature": sign(body), "Content-Type": "application/json"})
    assert response.status_code == 413
    assert running.bot.ledger.message("M1") is None


def test_chunked_webhook_within_the_limit_is_accepted(make_settings, run_bot):
    running = run_bot(make_settings(), workers=False)
    body = json.dumps(webhook_payload("M1", [])).encode()
    response = requests.post(f"{running.url}/webhook", data=iter([body[:100], body[100:]]), timeout=10,
                             headers={"X-Spark-Signature": sign(body), "Content-Type": "application/json"})
    assert response.status_code == 202


def test_oversized_body_is_413(make_settings, run_bot):
    running = run_bot(make_settings(), workers=False)
    body = json.dumps({"data": {"id": "M1", "pad": "x" * 100_000}}).encode()
    assert running.post(body).status_code == 413
    assert running.bot.ledger.message("M1") is None


@pytest.mark.parametrize("payload,env,reason", [
    (webhook_payload("M1", ["u"], resource="rooms"), {}, "not handled"),
    (webhook_payload("M1", ["u"], event="deleted"), {}, "not handled"),
    (webhook_payload("M1", ["u"], person_email="mallory@evil.com"),
     {"ALLOWED_SENDERS": "alice@example.com,@corp.example"}, "ALLOWED_SENDERS"),
    (webhook_payload("M1", ["u"], person_email="bob@other.example"),
     {"ALLOWED_SENDERS": "@corp.example"}, "ALLOWED_SENDERS"),
], ids=["other-resource", "other-event", "sender-not-listed", "domain-not-listed"])
def test_authentic_events_we_do_not_handle_get_200_and_are_not_recorded(make_settings, run_bot, payload, env,
                                                                        reason):
    running = run_bot(make_settings(**env), workers=False)
    response = running.post(payload)
    assert response.status_code == 200
    assert reason in response.json()["reason"]
    assert running.bot.ledger.message("M1") is None


def test_allowed_senders_accepts_listed_address_and_domain(fake, make_settings, run_bot):
    running = run_bot(make_settings(ALLOWED_SENDERS="alice@example.com,@corp.example"), workers=False)
    assert running.post(webhook_payload("M1", [], person_email="Alice@Example.com")).status_code == 202
    assert running.post(webhook_payload("M2", [], person_email="bob@corp.example")).status_code == 202


def test_own_message_is_ignored_once_the_bot_id_is_known(fake, make_settings, run_bot):
    url = fake.add_file(b"mine")
    running = run_bot(make_settings())
    running.bot.ledger.set_meta("bot_id", BOT_ID)
    response = running.post(webhook_payload("M1", [url], person_id=BOT_ID))
    assert response.status_code == 200 and response.json()["reason"] == "own message"
    assert running.bot.ledger.message("M1") is None


def test_own_message_before_the_bot_id_is_known_is_dropped_by_the_worker(fake, make_settings, run_bot):
    url = fake.add_file(b"mine")
    running = run_bot(make_settings(), workers=False)
    assert running.post(webhook_payload("M1", [url], person_id=BOT_ID)).status_code == 202
    running.start_workers()
    wait_until(lambda: message_row(running, "M1")["state"] == "ignored", message="own message dropped")
    assert content_gets(fake) == []
    assert running.bot.ledger.meta("bot_id") == BOT_ID
    assert len(fake.requests_for("/people/me")) == 1


def test_webhook_never_calls_webex_on_the_request_path(fake, make_settings, run_bot):
    running = run_bot(make_settings(), workers=False)
    assert running.post(webhook_payload("M1", [fake.add_file(b"x")])).status_code == 202
    assert running.post(webhook_payload("M2", None)).status_code == 202
    assert fake.requests == []


def test_redelivered_event_is_acknowledged_and_downloaded_once(fake, make_settings, run_bot):
    url = fake.add_file(b"once", name="once.txt")
    running = run_bot(make_settings())
    payload = webhook_payload("M1", [url])
    assert running.post(payload).status_code == 202
    wait_until(lambda: running.files("saved"), message="first delivery saved")
    for _ in range(3):
        again = running.post(payload)
        assert again.status_code == 200 and again.json()["status"] == "duplicate"
    assert len(content_gets(fake)) == 1
    assert sorted(p.name for p in running.bot.settings.download_dir.iterdir()) == [".partial", "once.txt"]


def test_files_are_looked_up_when_the_webhook_has_none(fake, make_settings, run_bot):
    url = fake.add_file(b"looked up", name="lookup.txt")
    fake.add_message("M1", [url])
    running = run_bot(make_settings())
    assert running.post(webhook_payload("M1", None)).status_code == 202
    wait_until(lambda: saved_names(running) == ["lookup.txt"], message="looked-up file saved")
    assert len(fake.requests_for("/messages/M1")) == 1


def test_message_lookup_is_retried_after_a_server_error(fake, make_settings, run_bot):
    url = fake.add_file(b"eventually", name="later.txt")
    fake.add_message("M1", [url])
    fake.fail_api["/v1/messages/M1"] = [503, 502]
    running = run_bot(make_settings(), policy=RetryPolicy(base=0.01))
    running.post(webhook_payload("M1", None))
    wait_until(lambda: saved_names(running) == ["later.txt"], message="file saved after lookup retries")
    assert len(fake.requests_for("/messages/M1")) == 3


# --- retries and failures ----------------------------------------------------------

def test_scanning_file_is_retried_after_retry_after(fake, make_settings, run_bot):
    url = fake.add_file(b"clean", name="scanned.txt")
    fake.script(url, Reply(423, {"Retry-After": "30"}), Reply(429, {"Retry-After": "120"}))
    clock = FakeClock()
    running = run_bot(make_settings(), clock=clock, rand=lambda: 0.0)
    running.post(webhook_payload("M1", [url]))

    row = wait_until(lambda: [r for r in running.files("queued") if r["reason"] == "scanning"],
                     message="retry scheduled")[0]
    assert 29.9 < row["next_at"] - row["updated_at"] < 30.1
    assert len(content_gets(fake)) == 1

    clock.advance(30)
    running.bot.workers.wake()
    row = wait_until(lambda: [r for r in running.files("queued") if r["reason"] == "rate_limited"],
                     message="second retry scheduled")[0]
    assert 119.9 < row["next_at"] - row["updated_at"] < 120.1

    clock.advance(120)
    running.bot.workers.wake()
    wait_until(lambda: saved_names(running) == ["scanned.txt"], message="saved after the scan")
    assert len(content_gets(fake)) == 3


@pytest.mark.parametrize("status,reason", [(410, "infected"), (428, "unscannable"), (401, "unauthorized"),
                                           (403, "forbidden"), (404, "not_found")])
def test_permanent_failures_are_recorded_and_never_retried(fake, make_settings, run_bot, status, reason):
    url = fake.add_file(b"bad")
    fake.script(url, *[Reply(status)] * 3)
    running = run_bot(make_settings(), policy=RetryPolicy(base=0.001))
    running.post(webhook_payload("M1", [url]))
    row = wait_until(lambda: running.files("failed"), message="failure recorded")[0]
    assert (row["reason"], row["detail"]) == (reason, f"HTTP {status} from {fake.url[7:]}")
    assert len(content_gets(fake)) == 1
    assert list(running.bot.settings.download_dir.iterdir()) == [running.bot.settings.download_dir / ".partial"]


def test_unscannable_file_is_fetched_with_allow_when_the_operator_opts_in(fake, make_settings, run_bot):
    url = fake.add_file(b"encrypted zip", name="secret.zip")
    fake.script(url, Reply(428))
    running = run_bot(make_settings(ALLOW_UNSCANNABLE="true"))
    running.post(webhook_payload("M1", [url]))
    wait_until(lambda: saved_names(running) == ["secret.zip"], message="unscannable file saved")
    assert [r.query for r in content_gets(fake)] == [{}, {"allow": ["unscannable"]}]


def test_temporary_failures_give_up_after_the_bound(fake, make_settings, run_bot):
    url = fake.add_file(b"never")
    fake.script(url, *[Reply(503)] * 10)
    running = run_bot(make_settings(), policy=RetryPolicy(base=0.001, max_attempts=3))
    running.post(webhook_payload("M1", [url]))
    row = wait_until(lambda: running.files("failed"), message="gave up")[0]
    assert row["reason"] == "gave_up" and "server_error" in row["detail"]
    assert len(content_gets(fake)) == 3


def test_file_on_an_untrusted_host_is_refused_without_sending_the_token(fake, stranger, make_settings, run_bot):
    url = stranger.add_file(b"phish", name="phish.txt")
    running = run_bot(make_settings())
    running.post(webhook_payload("M1", [url]))
    row = wait_until(lambda: running.files("failed"), message="refused")[0]
    assert row["reason"] == "untrusted_host"
    assert stranger.requests == []


def test_file_too_large_fails_for_good(fake, make_settings, run_bot):
    url = fake.add_file(PatternBody(2_000_000), name="big.bin")
    running = run_bot(make_settings(MAX_FILE_SIZE="1MB"))
    running.post(webhook_payload("M1", [url]))
    row = wait_until(lambda: running.files("failed"), message="refused")[0]
    assert row["reason"] == "too_large"
    assert list((running.bot.settings.download_dir / ".partial").iterdir()) == []


# --- concurrency and shutdown ------------------------------------------------------

def test_two_worker_pools_on_one_ledger_never_download_a_file_twice(fake, make_settings, run_bot):
    settings = make_settings(DOWNLOAD_WORKERS="4")
    urls = [fake.add_file(f"file {i}".encode(), name="same.txt") for i in range(40)]
    first = run_bot(settings, workers=False)
    second = run_bot(settings, workers=False)
    for i, url in enumerate(urls):
        assert (first if i % 2 else second).post(webhook_payload(f"M{i}", [url])).status_code == 202
    first.start_workers()
    second.start_workers()
    wait_until(lambda: len(first.files("saved")) == 40, message="all 40 saved")
    assert len(content_gets(fake)) == 40
    on_disk = [p for p in settings.download_dir.iterdir() if p.is_file()]
    assert sorted(p.read_bytes() for p in on_disk) == sorted(f"file {i}".encode() for i in range(40))


def test_stopping_hands_an_in_flight_download_back_and_a_restart_finishes_it(fake, make_settings, run_bot):
    body = PatternBody(8_000_000, seed=7)
    url = fake.add_file(body, name="slow.bin")
    fake.script(url, Reply(200, {"Content-Disposition": 'attachment; filename="slow.bin"'}, body, trickle=0.05))
    settings = make_settings(DOWNLOAD_WORKERS="1")
    running = run_bot(settings)
    running.post(webhook_payload("M1", [url]))
    wait_until(lambda: running.files("active"), message="download in flight")
    wait_until(lambda: list((settings.download_dir / ".partial").iterdir()), message="part file open")

    running.bot.stop_workers(timeout=60)

    assert [r["state"] for r in running.files()] == ["queued"]
    again = run_bot(settings)
    wait_until(lambda: again.files("saved"), timeout=30, message="saved after restart")
    saved = settings.download_dir / "slow.bin"
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == body.sha256()
    assert list((settings.download_dir / ".partial").iterdir()) == []


# --- replies, health, logs ----------------------------------------------------------

def test_one_reply_per_message_in_the_thread_for_group_rooms(fake, make_settings, run_bot):
    ok = fake.add_file(b"x" * 1500, name="report.pdf")
    bad = fake.add_file(b"virus")
    fake.script(bad, Reply(410))
    running = run_bot(make_settings())
    running.post(webhook_payload("M1", [ok, bad], room_type="group", room_id="ROOM9"))
    wait_until(lambda: fake.posted, message="reply posted")
    wait_until(lambda: message_row(running, "M1")["reply_state"] == "sent", message="reply recorded")
    [reply] = fake.posted
    assert reply["roomId"] == "ROOM9" and reply["parentId"] == "M1"
    assert "report.pdf" in reply["markdown"] and "1.5 KB" in reply["markdown"]
    assert "infected" in reply["markdown"]


def test_no_reply_when_reply_on_save_is_off(fake, make_settings, run_bot):
    running = run_bot(make_settings(REPLY_ON_SAVE="false"))
    running.post(webhook_payload("M1", [fake.add_file(b"x")]))
    wait_until(lambda: running.files("saved"), message="saved")
    assert message_row(running, "M1")["reply_state"] is None
    assert fake.posted == []


def test_healthz_reports_ok_and_queue_counts(make_settings, run_bot):
    running = run_bot(make_settings(), workers=False)
    running.post(webhook_payload("M1", ["https://webexapis.com/v1/contents/X"]))
    running.bot.ledger.set_meta("bot_id", BOT_ID)
    running.post(webhook_payload("M2", ["https://webexapis.com/v1/contents/Y", "https://webexapis.com/v1/contents/Z"]))
    response = requests.get(f"{running.url}/healthz", timeout=5)
    assert response.status_code == 200
    assert response.json()["queue"] == {"queued": 2, "active": 0, "messages_pending": 1}
    assert response.json()["ledger"] == "ok" and response.json()["download_dir"] == "ok"


def test_healthz_is_503_when_the_download_folder_is_not_writable(tmp_path, make_settings, run_bot):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    running = run_bot(make_settings(DOWNLOAD_DIR=str(blocker / "downloads")), workers=False)
    response = requests.get(f"{running.url}/healthz", timeout=5)
    assert response.status_code == 503
    assert response.json()["download_dir"].startswith("error")


def test_the_token_never_reaches_the_log(fake, stranger, make_settings, run_bot, capfd):
    running = run_bot(make_settings(LOG_LEVEL="DEBUG"))
    running.post(webhook_payload("M1", [fake.add_file(b"x"), stranger.add_file(b"y")]))
    running.post(webhook_payload("M2", ["not a url"]), signature="bad")
    wait_until(lambda: len(running.files("saved")) + len(running.files("failed")) == 2, message="done")
    err = capfd.readouterr().err
    assert "file saved" in err and "untrusted_host" in err and "webhook rejected" in err
    assert fake.token not in err


def test_download_subdir_sorts_files_into_safe_folders(fake, make_settings, run_bot):
    url = fake.add_file(b"sorted", name="a.txt")
    running = run_bot(make_settings(DOWNLOAD_SUBDIR="{sender_domain}/{room_type}"))
    running.post(webhook_payload("M1", [url], person_email="alice@corp.example", room_type="../../group"))
    wait_until(lambda: running.files("saved"), message="saved")
    folder = running.bot.settings.download_dir
    assert (folder / "corp.example" / "_.._group" / "a.txt").read_bytes() == b"sorted"


def test_json_logs_one_object_per_line(fake, make_settings, run_bot, capfd):
    running = run_bot(make_settings(LOG_FORMAT="json"))
    running.post(webhook_payload("M1", [fake.add_file(b"x", name="x.txt")]))
    wait_until(lambda: running.files("saved"), message="saved")
    running.bot.stop_workers()
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    saved = [entry for entry in lines if entry["message"].startswith("file saved")]
    assert saved and "sender=alice@example.com" in saved[0]["message"] and "bytes=1" in saved[0]["message"]
    assert {"time", "level", "logger", "message"} <= set(saved[0])


def test_metrics_count_webhooks_files_and_queue(fake, make_settings, run_bot):
    ok = fake.add_file(b"12345", name="ok.txt")
    bad = fake.add_file(b"x")
    fake.script(bad, Reply(410))
    running = run_bot(make_settings())
    running.post(webhook_payload("M1", [ok, bad]))
    running.post(webhook_payload("M1", [ok, bad]))
    running.post(webhook_payload("M2", [ok]), signature="forged")
    wait_until(lambda: len(running.files("saved")) + len(running.files("failed")) == 2, message="done")
    text = requests.get(f"{running.url}/metrics", timeout=5).text
    assert 'filebot_webhooks_total{outcome="queued"} 1.0' in text
    assert 'filebot_webhooks_total{outcome="duplicate"} 1.0' in text
    assert 'filebot_webhooks_total{outcome="rejected"} 1.0' in text
    assert 'filebot_files_total{reason="",state="saved"} 1.0' in text
    assert 'filebot_files_total{reason="infected",state="failed"} 1.0' in text
    assert "filebot_saved_bytes_total 5.0" in text
    assert 'filebot_queue_depth{kind="queued"} 0.0' in text
    assert "filebot_download_seconds_count 2.0" in text


def test_reply_names_the_size_and_limit_of_a_file_too_large(fake, make_settings, run_bot):
    url = fake.add_file(PatternBody(2_100_000), name="huge.mov")
    running = run_bot(make_settings(MAX_FILE_SIZE="1.5MB"))
    running.post(webhook_payload("M1", [url]))
    wait_until(lambda: fake.posted, message="reply posted")
    assert fake.posted[0]["markdown"] == "Not saved: too large: 2.1 MB, limit 1.5 MB"


def test_a_failing_reply_is_recorded_and_repeats_nothing(fake, make_settings, run_bot):
    url = fake.add_file(b"data", name="d.txt")
    fake.fail_api["/v1/messages"] = [500]
    running = run_bot(make_settings())
    running.post(webhook_payload("M1", [url]))
    wait_until(lambda: message_row(running, "M1")["reply_state"] == "failed", message="reply failed")
    assert "HTTP 500" in message_row(running, "M1")["reply_error"]
    assert len(content_gets(fake)) == 1 and len(running.files("saved")) == 1
    assert len([r for r in fake.requests_for("/v1/messages") if r.method == "POST"]) == 1


def test_reply_uses_the_final_name_when_the_name_was_taken(fake, make_settings, run_bot):
    settings = make_settings()
    settings.download_dir.mkdir(parents=True)
    (settings.download_dir / "report.pdf").write_bytes(b"someone else's")
    running = run_bot(settings)
    running.post(webhook_payload("M1", [fake.add_file(b"new", name="report.pdf")]))
    wait_until(lambda: fake.posted, message="reply posted")
    assert fake.posted[0]["markdown"] == "Saved **report (1).pdf** (3 B)"
    assert [r["name"] for r in running.files("saved")] == ["report (1).pdf"]


def test_an_unwritable_ledger_stops_start_up_with_a_clear_message(tmp_path, make_settings):
    from app import create_app
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bot.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(SystemExit) as stopped:
        create_app(make_settings())
    assert "cannot open the ledger" in str(stopped.value) and "bot.sqlite3" in str(stopped.value)


def test_healthz_is_503_when_the_download_threads_are_gone(make_settings, run_bot):
    running = run_bot(make_settings())
    assert requests.get(f"{running.url}/healthz", timeout=5).json()["workers"] == "running"
    running.bot.workers.stop(timeout=10)
    response = requests.get(f"{running.url}/healthz", timeout=5)
    assert response.status_code == 503 and response.json()["workers"] == "stopped"


@pytest.mark.parametrize("hops,logged", [("0", "from 127.0.0.1"), ("1", "from 203.0.113.9")])
def test_rejections_log_the_senders_address_behind_a_proxy(make_settings, run_bot, capfd, hops, logged):
    running = run_bot(make_settings(PROXY_HOPS=hops), workers=False)
    response = running.post(webhook_payload("M1", []), signature="forged",
                            headers={"X-Forwarded-For": "203.0.113.9"})
    assert response.status_code == 401
    assert f"wrong X-Spark-Signature {logged}" in capfd.readouterr().err
