"""The fixtures of the test world (tests/support/world.py): DNS servers, next-hop sinks and
gateways, each stopped when its scope ends.

- ``dns``: one DNS server for the test module, serving the module's ``DNS_RECORDS`` (a
  tests/support/dnsserver.py ``Records`` mapping; none when the module has none).
- ``make_dns(records)``: a DNS server of the test's own (for tests that count queries or
  change records).
- ``hop1``: targetdomain1.com's internal server (a sink at HOP1), shared by the module's
  tests; ``make_sink(host, ...)``: a sink of the test's own, started unless ``start=False``.
- ``mx_port``: the port the gateways deliver to by MX (nothing listens unless a test starts
  a sink there).
- ``run(coro)``: runs a coroutine to its end, once on asyncio's own loop and once on uvloop
  (the daemon's loop): tests that take it run twice.
- ``make_gateway(world, host=..., port=None, start=True, ipv6=False)``: the world's daemon,
  started, in a folder of the test's own, asking the module's ``dns``, stopped after the test;
  ``module_gateway`` the same for module-scoped fixtures (stopped at the module's end).

Tests import the world itself, the message builder and the waits (``wait_until``, ``stays``,
``poll``) from tests/support/world.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from tests.support.dnsserver import DnsServer, Records
from tests.support.gateway import GatewayProcess, free_port
from tests.support.sink import SinkServer
from tests.support.world import HOP1, MXHOST, GatewayFactory, SinkFactory, World


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    factory = uvloop.new_event_loop if request.param == "uvloop" else None

    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(coro)

    return runner


@pytest.fixture(scope="module")
def dns(request: pytest.FixtureRequest) -> Iterator[DnsServer]:
    with DnsServer(getattr(request.module, "DNS_RECORDS", None)) as server:
        yield server


@pytest.fixture
def make_dns() -> Iterator[Callable[[Records], DnsServer]]:
    servers: list[DnsServer] = []

    def make(records: Records) -> DnsServer:
        servers.append(DnsServer(records))
        servers[-1].start()
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def hop1() -> Iterator[SinkServer]:
    with SinkServer(HOP1, free_port(HOP1)) as sink:
        yield sink


@pytest.fixture(scope="module")
def mx_port() -> int:
    return free_port(MXHOST)


@pytest.fixture
def make_sink() -> Iterator[SinkFactory]:
    sinks: list[SinkServer] = []

    def make(
        host: str = HOP1,
        port: int | None = None,
        *,
        hostname: str = "sink.test",
        start: bool = True,
    ) -> SinkServer:
        sink = SinkServer(host, port or free_port(host), hostname=hostname)
        sinks.append(sink)
        if start:
            sink.start()
        return sink

    yield make
    for sink in sinks:
        sink.stop()


def _gateways(
    folder: Callable[[int], Path], dns: DnsServer
) -> tuple[GatewayFactory, list[GatewayProcess]]:
    started: list[GatewayProcess] = []

    def make(
        world: World,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        start: bool = True,
        ipv6: bool = False,
    ) -> GatewayProcess:
        gw = world.gateway(folder(len(started)), dns, host=host, port=port, ipv6=ipv6)
        started.append(gw)
        return gw.start() if start else gw

    return make, started


@pytest.fixture
def make_gateway(tmp_path: Path, dns: DnsServer) -> Iterator[GatewayFactory]:
    make, started = _gateways(lambda n: tmp_path / f"gw{n}", dns)
    yield make
    for gw in started:
        gw.stop()


@pytest.fixture(scope="module")
def module_gateway(
    tmp_path_factory: pytest.TempPathFactory, dns: DnsServer
) -> Iterator[GatewayFactory]:
    make, started = _gateways(lambda n: tmp_path_factory.mktemp("gw"), dns)
    yield make
    for gw in started:
        gw.stop()
