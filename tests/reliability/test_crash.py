"""The crash suite in the normal run: the real daemon SIGKILLed ten times at arranged moments
(mid-DATA, right after a 250, deliveries in flight, a queue run, at random after a restart)
while ten sessions send 2,500 messages; see tests/reliability/crash.py for what is checked.
Long runs: ``python -m tests.reliability.crash --kills 50 --messages 20000``."""

from __future__ import annotations

import os
import re
import signal
import zlib
from pathlib import Path

import pytest

from tests.reliability import crash
from tests.support.crash import children_of
from tests.support.world import HOP1 as HOP
from tests.support.world import GatewayFactory, SinkFactory, World, wait_until


@pytest.mark.timeout(200)
def test_no_acknowledged_message_is_lost_across_kills(tmp_path: Path) -> None:
    figures = crash.run(
        crash.Options(
            workdir=tmp_path, kills=10, messages=2500, sessions=10, seed=1, time_limit=150
        )
    )
    print(figures.summary())
    assert not figures.problems, figures.summary()
    assert figures.lost == []
    assert figures.duplicates <= figures.dup_bound
    assert len(figures.kills) == 10
    assert {k.kind for k in figures.kills} == set(crash.KINDS)


def test_mail_of_a_killed_worker_is_delivered_by_its_successor(
    make_gateway: GatewayFactory, make_sink: SinkFactory
) -> None:
    """workers = 2: a worker SIGKILLed while mail it received waits for a retry. Each worker
    retries its share of the queue (by a hash of the qid) and what it received itself; the
    restarted worker must also take over what its predecessor received for the other share,
    which no other worker knows of."""
    sink = make_sink(HOP)
    world = World(
        tables={
            "mailertable": f"crash.test smtp:[{HOP}]:{sink.port}\n",
            "access": "To:crash.test RELAY\n",
        },
        settings=(
            'workers = 2\n[smtp]\ngreet_pause = "0s"\ncheck_sender_domain = false\n'
            '[queue]\nretry_min = "1s"\nrun_interval = "2s"\n'
        ),
    )
    gw = make_gateway(world)
    assert gw.proc is not None
    master = gw.proc.pid
    wait_until(lambda: len(children_of(master)) == 2, "both workers", 30)
    victim = min(children_of(master))
    sink.data_reply = "451 4.3.0 Try again later"
    received: dict[str, int] = {}  # qid → the worker's pid
    n = 0
    # Until the victim holds mail of both shares (so whichever index it has, some of its
    # mail belongs to the other worker's share).
    while len({zlib.crc32(q.encode()) % 2 for q, p in received.items() if p == victim}) < 2:
        assert n < 200
        with gw.smtp("127.0.0.2") as s:
            s.sendmail(
                "alice@example.org",
                [f"m{n}@crash.test"],
                f"Message-ID: <w{n}@example.org>\r\n\r\nbody {n}\r\n".encode(),
            )
        n += 1
        received = {
            q: int(p) for p, q in re.findall(r"mailgate\[(\d+)\]: (\w{14}): from=", gw.log())
        }
    wait_until(lambda: gw.log().count("stat=Deferred") >= n, f"{n} deferrals", 30)
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: len(children := children_of(master)) == 2 and victim not in children,
        "the killed worker's successor",
        30,
    )
    sink.data_reply = None
    try:
        sink.wait_for(n, timeout=30)
    except TimeoutError:
        raise AssertionError(
            f"{len(sink.messages)} of {n} delivered; still queued: {gw.queued()}, the dead "
            f"worker received {sorted(q for q, p in received.items() if p == victim)}"
        ) from None
    wait_until(lambda: gw.queued() == [], "an empty queue", 30)
