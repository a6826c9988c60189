"""The chaos suite (bench/chaos.py) in fewer rounds: a real server process, a fake Webex
injecting faults, SIGKILL at random moments; nothing lost, nothing twice, no token leak.

Slow (about a minute): CI deselects it with ``-m "not slow"``; ``make test-all`` runs it.
Replay a failure with ``CHAOS_SEED=N CHAOS_ROUNDS=M pytest -m slow tests/test_chaos.py``
or ``bench/chaos.py --rounds M --seed N``.
"""

import os

import pytest

from bench import chaos


@pytest.mark.slow
def test_chaos_rounds_lose_nothing_duplicate_nothing_leak_nothing(tmp_path):
    seed = int(os.environ.get("CHAOS_SEED", "20261204"))
    rounds = int(os.environ.get("CHAOS_ROUNDS", "10"))
    summary = chaos.run(rounds=rounds, seed=seed, workdir=tmp_path)
    report = summary.table()
    assert summary.kills > 0 and summary.files_expected > 0, report
    assert summary.lost == 0, report
    assert summary.duplicates == 0, report
    assert summary.token_leaks == 0, report
    assert summary.ok, report
