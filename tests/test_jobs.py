"""The ledger and workers: crash windows around the commit, leases, retry policy."""

import hashlib
import os
import time
from pathlib import Path

import pytest

import downloader
from jobs import Ledger, Message, RetryPolicy, Workers, allowed_sender, owner_is_dead, subdir_for
from tests.conftest import FakeClock, wait_until

DEAD = "some-other-host/4242/deadbeef"


@pytest.fixture
def setup(fake, make_settings):
    """A ledger holding one file claimed by a holder that died mid-commit."""
    settings = make_settings()
    clock = FakeClock()
    ledger = Ledger(settings.database_path, clock=clock, replies=False)
    content = b"the complete file"
    url = fake.add_file(content, name="report.pdf")
    ledger.record(Message("M1"), [url], resolve=False)
    kind, row = ledger.claim(DEAD, lease=60)
    claim = row["lease_owner"]
    partial = settings.download_dir.resolve() / downloader.PARTIAL_DIR
    partial.mkdir(parents=True)
    part = partial / row["part_path"]
    part.write_bytes(content)
    fetched = downloader.Fetched(part, "report.pdf", len(content), hashlib.sha256(content).hexdigest(), "text/plain")
    final = settings.download_dir.resolve() / "report.pdf"
    ledger.set_intent(row["id"], claim, final, fetched)
    yield settings, ledger, clock, part, final, content
    ledger.close()


def take_over(settings, ledger, clock):
    clock.advance(61)  # the dead holder's lease runs out
    workers = Workers(settings, ledger).start()
    try:
        wait_until(lambda: ledger.history("saved"), message="file saved by the new holder")
    finally:
        workers.stop()
    return [p.name for p in sorted(settings.download_dir.iterdir()) if p.is_file()]


def test_crash_after_intent_before_link_commits_under_the_intended_name(fake, setup):
    settings, ledger, clock, part, final, content = setup
    assert take_over(settings, ledger, clock) == ["report.pdf"]
    assert final.read_bytes() == content and not part.exists()
    assert [r.method for r in fake.requests_for("/contents/")] == []  # no second download


def test_crash_after_link_before_cleanup_is_saved_once(fake, setup):
    settings, ledger, clock, part, final, content = setup
    os.link(part, final)
    assert take_over(settings, ledger, clock) == ["report.pdf"]
    assert not part.exists()
    assert fake.requests_for("/contents/") == []


def test_crash_after_link_and_cleanup_is_saved_once(fake, setup):
    settings, ledger, clock, part, final, content = setup
    os.link(part, final)
    part.unlink()
    assert take_over(settings, ledger, clock) == ["report.pdf"]
    assert ledger.history("saved")[0]["final_path"] == str(final)
    assert fake.requests_for("/contents/") == []


def test_intended_name_taken_by_someone_else_meanwhile_gets_the_next_name(fake, setup):
    settings, ledger, clock, part, final, content = setup
    final.write_bytes(b"a person's own file")
    assert take_over(settings, ledger, clock) == ["report (1).pdf", "report.pdf"]
    assert final.read_bytes() == b"a person's own file"
    assert (final.parent / "report (1).pdf").read_bytes() == content


def test_part_file_lost_means_a_fresh_download(fake, setup):
    settings, ledger, clock, part, final, content = setup
    part.unlink()
    assert take_over(settings, ledger, clock) == ["report.pdf"]
    assert final.read_bytes() == content
    assert len(fake.requests_for("/contents/")) == 1


def test_leftover_part_files_of_finished_work_are_swept_at_start(make_settings):
    settings = make_settings()
    ledger = Ledger(settings.database_path)
    partial = settings.download_dir.resolve() / downloader.PARTIAL_DIR
    partial.mkdir(parents=True)
    old, fresh = partial / "99-cafebabe.part", partial / "98-0badf00d.part"
    old.write_bytes(b"junk from a crash an hour ago")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    fresh.write_bytes(b"another process may have just claimed file 98")
    workers = Workers(settings, ledger).start()
    workers.stop()
    assert list(partial.iterdir()) == [fresh]


def test_a_live_holder_keeps_its_claim_until_the_lease_runs_out(make_settings):
    settings = make_settings()
    clock = FakeClock()
    ledger = Ledger(settings.database_path, clock=clock)
    ledger.record(Message("M1"), ["https://webexapis.com/v1/contents/A"], resolve=False)
    assert ledger.claim("holder-1", lease=60)[0] == "file"
    assert ledger.claim("holder-2", lease=60) is None
    clock.advance(59)
    assert ledger.claim("holder-2", lease=60) is None
    clock.advance(2)
    kind, row = ledger.claim("holder-2", lease=60)
    assert row["lease_owner"].startswith("holder-2/") and row["attempts"] == 2


def test_owner_liveness():
    import socket
    assert not owner_is_dead(f"{socket.gethostname()}/{os.getpid()}/abc")
    assert not owner_is_dead("another-host/1/abc")
    assert owner_is_dead(f"{socket.gethostname()}/999999999/abc")


def test_backoff_grows_with_jitter_and_honours_retry_after():
    policy = RetryPolicy(base=2, cap=600)
    assert [policy.delay(n, None, lambda: 0.0) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert [policy.delay(n, None, lambda: 1.0) for n in (1, 2, 3, 4)] == [2, 4, 8, 16]
    assert policy.delay(30, None, lambda: 1.0) == 600
    assert policy.delay(1, 30.0, lambda: 0.0) == 30.0
    assert 30.0 <= policy.delay(1, 30.0, lambda: 1.0) <= 31.0
    assert policy.gives_up(20, 0, 1) and not policy.gives_up(19, 0, 1)
    assert policy.gives_up(1, 0, 24 * 3600 + 1)


@pytest.mark.parametrize("email,allowed,ok", [
    ("alice@example.com", (), True),
    (None, (), True),
    (None, ("@example.com",), False),
    ("Alice@Example.COM", ("alice@example.com",), True),
    ("bob@example.com", ("alice@example.com",), False),
    ("bob@example.com", ("@example.com",), True),
    ("bob@notexample.com", ("@example.com",), False),
    ("bob@sub.example.com", ("@example.com",), False),
])
def test_allowed_sender(email, allowed, ok):
    assert allowed_sender(email, allowed) is ok


@pytest.mark.parametrize("template,expected", [
    ("", ""),
    ("{sender_domain}/{date}", "example.com/2026-12-04"),
    ("{sender_email}", "alice@example.com"),
    ("{room_type}/{room_id}", "group/ROOM_1"),
])
def test_subdir_template_values_are_made_safe(template, expected):
    row = {"person_email": "alice@example.com", "room_id": "ROOM/1", "room_type": "group",
           "message_id": "M1", "received_at": 1796385600.0}
    assert subdir_for(template, row) == Path(expected)


def test_hostile_subdir_values_cannot_escape(make_settings):
    row = {"person_email": "../../etc@..", "room_id": "..", "room_type": "/abs", "message_id": "M1",
           "received_at": 0.0}
    path = subdir_for("{sender_email}/{room_id}/{room_type}", row)
    assert ".." not in path.parts and not path.is_absolute()


def test_concurrent_records_are_all_committed_once_each(make_settings):
    """Group commit: many threads at once, with redeliveries among them."""
    import threading
    settings = make_settings()
    ledger = Ledger(settings.database_path)
    ids = [f"M{i % 25}" for i in range(100)]  # each id delivered 4 times
    barrier = threading.Barrier(20)
    results: dict[str, list[bool]] = {}
    lock = threading.Lock()

    def deliver(chunk):
        barrier.wait()
        for mid in chunk:
            new = ledger.record(Message(mid), [f"https://webexapis.com/v1/contents/{mid}"], resolve=False)
            with lock:
                results.setdefault(mid, []).append(new)

    threads = [threading.Thread(target=deliver, args=(ids[i::20],)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {mid: sorted(r) for mid, r in results.items()} == {f"M{i}": [False, False, False, True]
                                                              for i in range(25)}
    assert len(ledger.history(limit=1000)) == 25


def test_a_failed_record_is_rolled_back_and_raised(make_settings):
    ledger = Ledger(make_settings().database_path)
    with pytest.raises(Exception):
        ledger.record(Message("M1"), [object()], resolve=False)  # a value SQLite cannot store
    assert ledger.message("M1") is None
    assert ledger.record(Message("M1"), ["https://webexapis.com/v1/contents/A"], resolve=False) is True


def test_a_claim_taken_over_by_a_sibling_thread_changes_nothing(make_settings):
    from jobs import LostLease
    clock = FakeClock()
    ledger = Ledger(make_settings().database_path, clock=clock)
    ledger.record(Message("M1"), ["https://webexapis.com/v1/contents/A"], resolve=False)
    _, first = ledger.claim("host/1/same-process", lease=60)
    clock.advance(61)  # e.g. the wall clock jumped, or a heartbeat failed
    _, second = ledger.claim("host/1/same-process", lease=60)

    assert first["lease_owner"] != second["lease_owner"]
    assert first["part_path"] != second["part_path"]
    fetched = downloader.Fetched(Path("/nowhere/x.part"), "x.txt", 1, "0" * 64, "text/plain")
    with pytest.raises(LostLease):
        ledger.set_intent(first["id"], first["lease_owner"], Path("/nowhere/x.txt"), fetched)
    with pytest.raises(LostLease):
        ledger.saved(first["id"], first["lease_owner"], Path("/nowhere/x.txt"), 1.0)
    ledger.renew("host/1/same-process", lease=600)
    assert ledger.history()[0]["next_at"] >= clock() + 599


def test_an_unexpected_error_is_retried_within_the_bound_then_recorded(fake, make_settings, run_bot):
    from tests.fakewebex import webhook_payload as payload
    settings = make_settings(DOWNLOAD_SUBDIR="{sender_domain}")
    settings.download_dir.mkdir(parents=True)
    (settings.download_dir / "example.com").write_text("a file where the sub-folder should go")
    running = run_bot(settings, policy=RetryPolicy(base=0.001, max_attempts=3))
    running.post(payload("M1", [fake.add_file(b"x", name="x.txt")]))
    row = wait_until(lambda: running.files("failed"), message="gave up")[0]
    assert row["reason"] == "gave_up" and "internal" in row["detail"] and "FileExistsError" in row["detail"]
    assert row["attempts"] == 3 and row["lease_owner"] is None
