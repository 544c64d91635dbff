"""The crash suite in the normal run: the real daemon SIGKILLed ten times at arranged moments
(mid-DATA, right after a 250, deliveries in flight, a queue run, at random after a restart)
while ten sessions send 2,500 messages; see tests/reliability/crash.py for what is checked.
Long runs: ``python -m tests.reliability.crash --kills 50 --messages 20000``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability import crash


@pytest.mark.timeout(200)
def test_no_acknowledged_message_is_lost_across_kills(tmp_path: Path) -> None:
    figures = crash.run(crash.Options(workdir=tmp_path, kills=10, messages=2500, sessions=10,
                                      seed=1, time_limit=150))
    print(figures.summary())
    assert not figures.problems, figures.summary()
    assert figures.lost == []
    assert figures.duplicates <= figures.dup_bound
    assert len(figures.kills) == 10
    assert {k.kind for k in figures.kills} == set(crash.KINDS)
