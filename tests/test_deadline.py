"""smtp/deadline.py: one timer for a connection's waits, on the event loop the daemon runs."""

from __future__ import annotations

import asyncio

import uvloop

from mailgate.smtp.deadline import TIMER_SLACK, DeadlineWaits
from tests.support.wait import wait_until_async


class Waits(DeadlineWaits):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.event_loop = loop
        self.expired_at: list[float] = []

    def deadline_expired(self) -> None:
        self.expired_at.append(self.event_loop.time())


def run(test: object) -> None:
    uvloop.run(test())  # type: ignore[operator]


def test_a_wait_that_outlives_the_armed_timer_expires_at_its_own_deadline() -> None:
    async def test() -> None:
        loop = asyncio.get_running_loop()
        waits = Waits(loop)
        waits.arm(loop.time() + 0.05)  # the first wait ends at once: its timer stays armed
        waits.disarm()
        second = loop.time() + 0.3
        waits.arm(second)
        armed = waits._timer
        await wait_until_async(lambda: waits.expired_at, "the second wait to expire")
        assert waits._timer is not armed  # the first timer fired early and was armed again
        assert waits.expired_at[0] + TIMER_SLACK >= second
        assert len(waits.expired_at) == 1

    run(test)


def test_an_earlier_deadline_replaces_the_armed_timer() -> None:
    async def test() -> None:
        loop = asyncio.get_running_loop()
        waits = Waits(loop)
        waits.arm(loop.time() + 60)
        waits.disarm()
        waits.arm(loop.time() + 0.05)
        await wait_until_async(lambda: waits.expired_at, "the shorter wait to expire")
        assert len(waits.expired_at) == 1

    run(test)


def test_a_timer_firing_between_waits_expires_nothing_and_stop_cancels() -> None:
    async def test() -> None:
        loop = asyncio.get_running_loop()
        waits = Waits(loop)
        waits.arm(loop.time() + 0.02)
        waits.disarm()
        await wait_until_async(lambda: waits._timer is None, "the idle timer to fire")
        assert waits.expired_at == []
        waits.arm(loop.time() + 0.02)
        armed = waits._timer
        waits.stop_timer()
        assert armed is not None and armed.cancelled()

    run(test)
