"""Resolver tests against the loopback DnsServer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
from dns.message import make_query
from dns.query import tcp as tcp_query

from mailgate.dns import (
    DnsNotFound,
    DnsTempError,
    NullMx,
    PtrResult,
    Resolver,
    parse_nameserver,
)
from tests.support.dnsserver import DnsServer, Records

T = TypeVar("T")
Runner = Callable[[Coroutine[Any, Any, T]], T]  # tests/conftest.py's run: asyncio and uvloop

RECORDS: Records = {
    "example.com": [
        ("MX", "20 mx3.example.com."),
        ("MX", "10 mx1.example.com."),
        ("MX", "10 mx2.example.com."),
    ],
    "mx1.example.com": [("A", "127.0.0.11")],
    "mx2.example.com": [("A", "127.0.0.12"), ("AAAA", "::1")],
    "mx3.example.com": [("AAAA", "::1")],
    "implicit.example.com": [("A", "127.0.0.20")],
    "txtonly.example.com": [("TXT", "v=spf1 -all")],
    "null.example.com": [("MX", "0 .")],
    "alias.example.com": [("CNAME", "mx1.example.com.")],
    "servfail.example.com": [("SERVFAIL", "")],
    "slow.example.com": [("TIMEOUT", "")],
}


@pytest.fixture
def dns(make_dns: Callable[[Records], DnsServer]) -> DnsServer:
    """A server of each test's own: tests count its queries and add records."""
    return make_dns(RECORDS)


def resolver(dns: DnsServer, timeout: float = 2.0) -> Resolver:
    return Resolver([dns.address], timeout=timeout)


def test_mx_sorted_by_preference(dns: DnsServer, run: Runner[Any]) -> None:
    got = run(resolver(dns).mx("Example.COM."))
    assert got == [(10, "mx1.example.com"), (10, "mx2.example.com"), (20, "mx3.example.com")]


def test_mail_exchangers_groups_and_shuffles_equal_preference(
    dns: DnsServer, run: Runner[Any]
) -> None:
    async def many() -> list[list[list[str]]]:
        r = resolver(dns)
        return [await r.mail_exchangers("example.com") for _ in range(200)]

    results = run(many())
    firsts = set()
    for groups in results:
        assert len(groups) == 2
        assert sorted(groups[0]) == ["mx1.example.com", "mx2.example.com"]
        assert groups[1] == ["mx3.example.com"]
        firsts.add(groups[0][0])
    # 200 fair coin flips all landing the same way has probability 2**-199.
    assert firsts == {"mx1.example.com", "mx2.example.com"}
    assert dns.query_count("example.com", "MX") == 1  # the rest came from the cache


def test_implicit_mx(dns: DnsServer, run: Runner[Any]) -> None:
    r = resolver(dns)
    assert run(r.mx("implicit.example.com")) == []
    assert run(r.mail_exchangers("implicit.example.com")) == [["implicit.example.com"]]


def test_no_mx_and_no_address_is_not_found(dns: DnsServer, run: Runner[Any]) -> None:
    with pytest.raises(DnsNotFound):
        run(resolver(dns).mail_exchangers("txtonly.example.com"))
    with pytest.raises(DnsNotFound):
        run(resolver(dns).mail_exchangers("nowhere.example.com"))


def test_null_mx(dns: DnsServer, run: Runner[Any]) -> None:
    r = resolver(dns)
    assert run(r.mx("null.example.com")) == [(0, ".")]
    with pytest.raises(NullMx):
        run(r.mail_exchangers("null.example.com"))


def test_nxdomain_nodata_servfail_timeout(dns: DnsServer, run: Runner[Any]) -> None:
    r = resolver(dns, timeout=0.3)
    with pytest.raises(DnsNotFound):
        run(r.mx("nowhere.example.com"))
    assert run(r.mx("implicit.example.com")) == []  # NODATA
    assert run(r.addresses("txtonly.example.com")) == []
    with pytest.raises(DnsNotFound):
        run(r.addresses("nowhere.example.com"))
    start = time.monotonic()
    with pytest.raises(DnsTempError):
        run(r.mx("servfail.example.com"))
    with pytest.raises(DnsTempError):
        run(r.addresses("servfail.example.com"))
    assert time.monotonic() - start < 1.0  # SERVFAIL is an answer, no waiting
    start = time.monotonic()
    with pytest.raises(DnsTempError):
        run(r.mx("slow.example.com"))
    elapsed = time.monotonic() - start
    assert 0.25 <= elapsed < 1.5  # the configured timeout bounds the whole lookup


def test_temp_errors_are_not_cached(dns: DnsServer, run: Runner[Any]) -> None:
    r = resolver(dns)
    with pytest.raises(DnsTempError):
        run(r.mx("servfail.example.com"))
    with pytest.raises(DnsTempError):
        run(r.mx("servfail.example.com"))
    assert dns.query_count("servfail.example.com", "MX") == 2


def test_addresses(dns: DnsServer, run: Runner[Any]) -> None:
    r = resolver(dns)
    assert run(r.addresses("mx2.example.com")) == ["127.0.0.12", "::1"]  # A first
    assert run(r.addresses("mx3.example.com")) == ["::1"]
    assert run(r.addresses("alias.example.com")) == ["127.0.0.11"]  # CNAME followed


def test_ip_literal_needs_no_dns(dns: DnsServer, run: Runner[Any]) -> None:
    r = resolver(dns)
    assert run(r.addresses("192.0.2.1")) == ["192.0.2.1"]
    assert run(r.addresses("::1")) == ["::1"]
    assert run(r.addresses("[IPv6:2001:db8::25]")) == ["2001:db8::25"]
    assert dns.queries == []


def test_cache_hit_makes_no_new_query(dns: DnsServer, run: Runner[Any]) -> None:
    async def twice() -> None:
        r = resolver(dns)
        for _ in range(2):
            await r.mx("example.com")
            await r.addresses("mx1.example.com")
            with pytest.raises(DnsNotFound):
                await r.mx("nowhere.example.com")
            assert await r.mx("implicit.example.com") == []

    run(twice())
    assert dns.query_count("example.com", "MX") == 1
    assert dns.query_count("mx1.example.com", "A") == 1
    assert dns.query_count("nowhere.example.com", "MX") == 1  # NXDOMAIN cached
    assert dns.query_count("implicit.example.com", "MX") == 1  # NODATA cached


def test_concurrent_lookups_share_one_query(dns: DnsServer, run: Runner[Any]) -> None:
    async def burst() -> list[list[tuple[int, str]]]:
        r = resolver(dns)
        return await asyncio.gather(*(r.mx("example.com") for _ in range(50)))

    results = run(burst())
    assert all(res == results[0] for res in results) and len(results[0]) == 3
    assert dns.query_count("example.com", "MX") == 1


def test_cache_expires_with_ttl(dns: DnsServer, run: Runner[Any]) -> None:
    dns.add("short.example.com", "A", "127.0.0.30", ttl=1)

    async def lookups() -> None:
        r = resolver(dns)
        assert await r.addresses("short.example.com") == ["127.0.0.30"]
        assert await r.addresses("short.example.com") == ["127.0.0.30"]
        assert dns.query_count("short.example.com", "A") == 1
        await asyncio.sleep(1.1)
        assert await r.addresses("short.example.com") == ["127.0.0.30"]

    run(lookups())
    assert dns.query_count("short.example.com", "A") == 2


def test_cache_is_bounded(dns: DnsServer, run: Runner[Any]) -> None:
    for i in range(10):
        dns.add(f"h{i}.example.com", "A", f"127.0.1.{i}")

    async def fill() -> Resolver:
        r = Resolver([dns.address], timeout=2.0, cache_size=4)
        for i in range(10):
            await r.addresses(f"h{i}.example.com")
        return r

    r = run(fill())
    assert len(r._cache) == 4


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("ok", PtrResult("OK", "client.example.com")),
        ("none", PtrResult("FAIL", None)),
        ("forged", PtrResult("FORGED", "client.example.com")),
        ("ptr-servfail", PtrResult("TEMP", None)),
        ("forward-timeout", PtrResult("TEMP", "client.example.com")),
    ],
)
def test_ptr(dns: DnsServer, run: Runner[Any], setup: str, expected: PtrResult) -> None:
    ip = "127.0.0.2"
    if setup != "none" and setup != "ptr-servfail":
        dns.add_ptr(ip, "Client.Example.com")
    if setup == "ok":
        dns.add("client.example.com", "A", "127.0.0.99")
        dns.add("client.example.com", "A", ip)
    elif setup == "forged":
        dns.add("client.example.com", "A", "127.0.0.3")
    elif setup == "ptr-servfail":
        dns.servfail("2.0.0.127.in-addr.arpa")
    elif setup == "forward-timeout":
        dns.timeout("client.example.com")
    start = time.monotonic()
    assert run(resolver(dns, timeout=0.5).ptr(ip)) == expected
    assert time.monotonic() - start < 1.5


def test_ptr_ipv6_forward_confirms_with_aaaa(dns: DnsServer, run: Runner[Any]) -> None:
    dns.add_ptr("::1", "v6.example.com")
    dns.add("v6.example.com", "AAAA", "0:0::1")
    assert run(resolver(dns).ptr("::1")) == PtrResult("OK", "v6.example.com")
    assert ("v6.example.com", "A") not in dns.queries


def test_ptr_of_garbage_is_fail(dns: DnsServer, run: Runner[Any]) -> None:
    assert run(resolver(dns).ptr("not-an-ip")) == PtrResult("FAIL", None)


def test_domain_resolves(dns: DnsServer, run: Runner[Any]) -> None:
    r = resolver(dns, timeout=0.3)
    assert run(r.domain_resolves("example.com")) == "yes"
    assert run(r.domain_resolves("implicit.example.com")) == "yes"
    assert run(r.domain_resolves("mx3.example.com")) == "yes"  # AAAA only
    assert run(r.domain_resolves("txtonly.example.com")) == "no"
    assert run(r.domain_resolves("nowhere.example.com")) == "no"
    assert run(r.domain_resolves("servfail.example.com")) == "temp"
    assert run(r.domain_resolves("slow.example.com")) == "temp"
    # An address literal: its PTR, as Sendmail's canonify asks
    dns.add_ptr("192.0.2.1", "named.example.com")
    assert run(r.domain_resolves("[192.0.2.1]")) == "yes"
    assert run(r.domain_resolves("[192.0.2.77]")) == "no"
    dns.add_ptr("2001:db8::1", "v6.example.com")
    assert run(r.domain_resolves("[IPv6:2001:db8::1]")) == "yes"
    assert run(r.domain_resolves("[IPv6:2001:db8::2]")) == "no"


def test_invalid_names_do_not_exist(dns: DnsServer, run: Runner[Any]) -> None:
    r = resolver(dns)
    for bad in ["", "a..b", "x" * 64 + ".example.com"]:
        with pytest.raises(DnsNotFound):
            run(r.mx(bad))


def test_parse_nameserver() -> None:
    assert parse_nameserver("127.0.0.1") == ("127.0.0.1", 53)
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("::1") == ("::1", 53)
    assert parse_nameserver("[::1]:5353") == ("::1", 5353)
    with pytest.raises(ValueError):
        parse_nameserver("ns.example.com")
    with pytest.raises(ValueError):
        parse_nameserver("127.0.0.1:0")


def test_dns_server_answers_over_tcp_too(dns: DnsServer) -> None:
    query = make_query("example.com", "MX")
    answer = tcp_query(query, "127.0.0.1", port=dns.port, timeout=2)
    assert len(answer.answer[0]) == 3
