"""milter/pool.py against our test filter, without the daemon: what is kept, for how long, and
what is not kept (the daemon's side is in test_milter.py, the real filters' in
test_milter_peers.py)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
import uvloop

from mailgate.config import MilterSettings, parse_milter_socket
from mailgate.milter import codec, pool
from mailgate.milter.client import FilterClient, MilterFailure
from mailgate.milter.session import Stage
from tests.support.milter import TestMilter
from tests.support.wait import wait_until, wait_until_async


@pytest.fixture
def filt() -> Iterator[TestMilter]:
    with TestMilter() as m:
        yield m


def names(m: TestMilter, connection: int) -> list[str]:
    with m.lock:
        return [type(e).__name__ for e in m.connections[connection] if type(e).__name__ != "Macro"]


async def connected(settings: MilterSettings) -> FilterClient:
    """A new client that negotiated and sent CONNECT (answered: the test filter continues)."""
    client = FilterClient(settings)
    await client.open()
    out = client.session.connect({}, "client.example.net", codec.FAMILY_INET, 1, "192.0.2.1")
    await client.event(out, Stage.CONNECT)
    return client


def test_kept_for_idle_seconds_then_closed(
    filt: TestMilter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool, "IDLE_SECONDS", 0.2)
    settings = MilterSettings(
        name="pooled", socket=parse_milter_socket(filt.socket), reuse_connections=1
    )

    async def run() -> None:
        client = await connected(settings)
        pool.release(client)
        assert pool.idle(settings) == 1
        assert pool.take(settings) is client and client.reused
        assert pool.idle(settings) == 0
        out = client.session.connect({}, "next.example.net", codec.FAMILY_INET, 2, "192.0.2.2")
        await client.event(out, Stage.CONNECT)  # the next session, on the same connection
        pool.release(client)
        await wait_until_async(lambda: pool.idle(settings) == 0, "the idle timeout")
        assert pool.take(settings) is None

    asyncio.run(run())
    wait_until(lambda: names(filt, 0)[-1:] == ["Close"], "QUIT after the idle time")
    assert names(filt, 0) == [
        "Negotiate",
        "Connect",
        "QuitNewConnection",  # kept
        "Connect",  # taken by the next session
        "QuitNewConnection",  # kept again
        "Close",  # unused for IDLE_SECONDS
    ]


def test_not_kept_without_the_setting_or_inside_a_transaction(filt: TestMilter) -> None:
    off = MilterSettings(name="off", socket=parse_milter_socket(filt.socket))
    on = MilterSettings(name="on", socket=parse_milter_socket(filt.socket), reuse_connections=4)

    async def run() -> None:
        pool.release(await connected(off))  # reuse_connections = 0: QUIT
        busy = await connected(on)
        await busy.event(busy.session.mail({}, ["<a@example.org>"]), Stage.MAIL)
        pool.release(busy)  # in a transaction (no end of message, no ABORT): QUIT
        assert pool.idle(off) == pool.idle(on) == 0

    asyncio.run(run())
    wait_until(lambda: len(filt.connections) == 2 and names(filt, 1)[-1:] == ["Close"], "QUITs")
    assert names(filt, 0) == ["Negotiate", "Connect", "Close"]
    assert names(filt, 1) == ["Negotiate", "Connect", "EnvelopeFrom", "Close"]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_refused_connection_reads_the_same_on_either_loop(loop: str) -> None:
    """The daemon runs on uvloop, the sendmail command on asyncio's own loop, whose error
    text is "Connect call failed (…)": the failure line says the system's words on both."""
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        settings = MilterSettings(name="down", socket=parse_milter_socket(f"inet:{port}@127.0.0.1"))

        async def run() -> MilterFailure:
            with pytest.raises(MilterFailure) as failed:
                await FilterClient(settings).open()
            return failed.value

        runner = uvloop.run if loop == "uvloop" else asyncio.run
        failure = runner(run())
    assert failure.problem == "error connecting to filter: Connection refused"
    assert (failure.stage, failure.reason) == (Stage.CONNECT, "connect")
