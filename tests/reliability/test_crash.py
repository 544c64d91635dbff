"""The crash suite in the normal run: the real daemon SIGKILLed ten times at arranged moments
(mid-DATA, right after a 250, deliveries in flight, a queue run, at random after a restart)
while ten sessions send 2,500 messages; see tests/reliability/crash.py for what is checked.
Long runs: ``python -m tests.reliability.crash --kills 50 --messages 20000``."""

from __future__ import annotations

import os
import re
import signal
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.reliability import crash
from tests.support.crash import children_of
from tests.support.dnsserver import DnsServer
from tests.support.gateway import GatewayProcess, free_port
from tests.support.sink import SinkServer

HOP = "127.0.0.5"


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


def test_mail_of_a_killed_worker_is_delivered_by_its_successor(tmp_path: Path) -> None:
    """workers = 2: a worker SIGKILLed while mail it received waits for a retry. Each worker
    retries its share of the queue (by a hash of the qid) and what it received itself; the
    restarted worker must also take over what its predecessor received for the other share,
    which no other worker knows of."""
    port = free_port(HOP)
    with (
        DnsServer() as dns,
        SinkServer(HOP, port) as sink,
        GatewayProcess(
            tmp_path / "gw",
            dns=dns.address,
            tables={
                "mailertable": f"crash.test smtp:[{HOP}]:{port}\n",
                "access": "To:crash.test RELAY\n",
            },
            settings=(
                'workers = 2\n[smtp]\ngreet_pause = "0s"\ncheck_sender_domain = false\n'
                '[queue]\nretry_min = "1s"\nrun_interval = "2s"\n'
            ),
        ) as gw,
    ):
        assert gw.proc is not None
        assert _wait(lambda: len(children_of(gw.proc.pid)) == 2)  # type: ignore[union-attr]
        victim = min(children_of(gw.proc.pid))
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
        assert _wait(lambda: gw.log().count("stat=Deferred") >= n)
        os.kill(victim, signal.SIGKILL)
        assert _wait(
            lambda: (
                len(children_of(gw.proc.pid)) == 2  # type: ignore[union-attr]
                and victim not in children_of(gw.proc.pid)
            )
        )  # type: ignore[union-attr]
        sink.data_reply = None
        try:
            sink.wait_for(n, timeout=30)
        except TimeoutError:
            raise AssertionError(
                f"{len(sink.messages)} of {n} delivered; still queued: {gw.queued()}, the dead "
                f"worker received {sorted(q for q, p in received.items() if p == victim)}"
            ) from None
        assert _wait(lambda: gw.queued() == [])


def _wait(cond: Callable[[], bool], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()
