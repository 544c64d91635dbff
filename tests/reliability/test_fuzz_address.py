"""Fuzzing MAIL/RCPT argument parsing and address normalisation (issue 9 item 4.4).

- ``parse_path_arg`` and ``normalize`` raise nothing but ``AddressError``, whose reply is a
  permanent (5xx, enhanced 5.x.x) reply that goes on the wire as exactly one reply line;
- a returned ``Mailbox`` is well formed: its domain is empty (unqualified) or valid and
  canonical (lower-case, no trailing dot, literals canonical), its local part non-empty
  (unless the null path), without control characters, and never holding an unquoted ``@``;
- normalising a result's own text gives the result back (idempotence), for any set of
  local domains.

``MAILGATE_FUZZ_SCALE=N`` multiplies every example count (long runs by hand).
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import example, given
from hypothesis import strategies as st

from mailgate.address import (
    AddressError,
    Mailbox,
    RouteError,
    canon_domain,
    is_valid_domain,
    normalize,
    parse_path_arg,
    routed_hosts,
)
from mailgate.reply import Reply
from tests.reliability.fuzz_settings import fuzz_settings
from tests.reliability.fuzz_support import CONTROL, check_address_error, check_mailbox

DOMAINS = [
    "gateway.example",
    "targetdomain1.com",
    "targetdomain2.com",
    "foreign.example",
    "Foreign.Example.",
    "[192.0.2.1]",
    "[IPv6:2001:db8::1]",
    "[ipv6:2001:DB8:0::1]",
    "[300.1.1.1]",
    "localhost",
    "bücher.example",
    "a-.example",
    "x..y",
]
TOKENS = [
    *DOMAINS,
    "u",
    "user",
    "first.last",
    "+tag",
    "%",
    "!",
    "@",
    '"',
    "\\",
    ".",
    ":",
    ",",
    "<",
    ">",
    " ",
    "\t",
    "[",
    "]",
    "IPv6:",
    "@a,@b:",
    '"u@foreign.example"',
    '"u%foreign.example"',
    "é",
    "\x1b",
    "\r",
    "\x00",
    "\x7f",
    "\udcff",  # a byte that is not UTF-8, as the protocol decodes it (surrogateescape)
    "\udc80",
    "SIZE=10",
    " NOTIFY=NEVER",
    " BODY=8BITMIME",
    "=",
    "x" * 60,
]
ROUTE_ATOMS = ["u", "user", "foreign.example", "targetdomain2.com", "gateway.example", "localhost",
               "a.b", "", "[192.0.2.1]", "x\udcff"]  # fmt: skip
ROUTE_SEPS = ["%", "!", "@", "\\@", "\\%", "%%", "!!", ".", "@@"]


def _local(first: str, rest: list[tuple[str, str]], quote: int) -> str:
    text = first + "".join(sep + atom for sep, atom in rest)
    if quote == 1:
        return '"' + text.replace('"', "") + '"'
    if quote == 2 and rest:
        sep, atom = rest[0]
        return '"' + first + sep + atom + '"' + "".join(s + a for s, a in rest[1:])
    return text


# Sender-specified routing in every combination: u%a@b, a!u@b, "u@a"@b, u\@a@b, nested.
route_address = st.builds(
    lambda local, domain: f"{local}@{domain}" if domain is not None else local,
    st.builds(
        _local,
        st.sampled_from(ROUTE_ATOMS),
        st.lists(st.tuples(st.sampled_from(ROUTE_SEPS), st.sampled_from(ROUTE_ATOMS)), max_size=3),
        st.integers(0, 2),
    ),
    st.one_of(st.none(), st.sampled_from(DOMAINS)),
)
# Near the 255-byte limit, where quoting added by route resolution can push a result over it.
long_address = st.builds(
    lambda a, n, b: a + "u" * n + b,
    st.sampled_from(["h.example!", "gateway.example!h.example!", "", "u%h.example@"]),
    st.integers(200, 256),
    st.sampled_from(["", "\\", '"', "@gateway.example", "%h.example", '\\"@gateway.example']),
)
raw_address = st.one_of(
    st.lists(st.sampled_from(TOKENS), max_size=14).map("".join),
    st.text(max_size=40),
    route_address,
    route_address,
    long_address,
)
local_sets = st.sets(
    st.sampled_from(["", "gateway.example", "localhost", "targetdomain1.com", "foreign.example"]),
    max_size=4,
)


def membership(domains: set[str]) -> Callable[[str], bool]:
    return domains.__contains__


@fuzz_settings(1000)
@given(raw=raw_address, local=local_sets)
@example(raw='"u@foreign.example"@targetdomain1.com', local={"gateway.example"})
@example(raw="u%foreign.example@gateway.example", local={"gateway.example"})
@example(raw="gateway.example!foreign.example!u", local={"gateway.example"})
@example(raw="@a,@b:u%v@gateway.example", local={"gateway.example", "v"})
@example(raw="a\rb@x.example", local=set())  # regression: the reply held a bare CR
@example(raw="u@\udcff.example", local=set())  # regression: UnicodeEncodeError
@example(raw="u%\udcff.example@gateway.example", local={"gateway.example"})  # the same
def test_normalize(raw: str, local: set[str]) -> None:
    is_local = membership(local)
    try:
        mb = normalize(raw, is_local)
    except AddressError as exc:
        check_address_error(exc)
        return
    check_mailbox(mb, raw)
    # Idempotent on its own output: the normalised text names the same mailbox.
    assert normalize(str(mb), is_local) == mb
    check_routed_hosts(mb)


def check_routed_hosts(mb: Mailbox) -> None:
    """What the relay check reads from a local part: canonical valid hosts, or RouteError."""
    try:
        hosts = routed_hosts(mb.local)
    except RouteError:
        return
    assert len(hosts) <= len(mb.local), (mb, hosts)
    for host in hosts:
        assert is_valid_domain(host) and canon_domain(host) == host, (mb, hosts)


@fuzz_settings(700)
@given(
    keyword=st.sampled_from(["FROM", "TO"]),
    head=st.sampled_from(["", " ", "FROM:", "TO:", "to :", "From: ", "TO:<", "FROM:<<", ":"]),
    body=raw_address,
    tail=st.sampled_from(["", ">", "> SIZE=10", ">>", "> X", ">junk", "> =1", " A=b c"]),
    local=local_sets,
)
def test_parse_path_arg_then_normalize(
    keyword: str, head: str, body: str, tail: str, local: set[str]
) -> None:
    """What the session does with a MAIL/RCPT argument: split, then normalise."""
    arg = head + body + tail
    try:
        addr, params = parse_path_arg(arg, keyword)
    except AddressError as exc:
        check_address_error(exc)
        return
    assert not CONTROL.search(addr), addr
    for key in params:
        assert key == key.upper() and key[0].isalnum(), params
        assert all(c.isascii() and (c.isalnum() or c == "-") for c in key), params
    try:
        mb = normalize(addr, membership(local))
    except AddressError as exc:
        check_address_error(exc)
        return
    check_mailbox(mb, addr)
    check_routed_hosts(mb)


def test_regression_no_reply_holds_a_bare_cr() -> None:
    """Found by test_normalize: the 553 for an address with a CR echoed it, so the reply put a
    bare CR on the wire (reachable while a command line may hold a bare CR: "RCPT TO:<a\\rb>";
    the session's 'Command unrecognized: "NO\\rOP"' did the same)."""
    try:
        normalize("a\rb@x.example", lambda d: False)
    except AddressError as exc:
        assert exc.reply.to_bytes() == (
            b"553 5.1.1 <a?b@x.example>... Address contained invalid control characters\r\n"
        )
    else:
        raise AssertionError("no AddressError")
    assert Reply(500, "5.5.1", 'Command unrecognized: "NO\rOP"').to_bytes() == (
        b'500 5.5.1 Command unrecognized: "NO?OP"\r\n'
    )
    assert Reply(250, None, "a\nb").to_bytes() == b"250-a\r\n250 b\r\n"


def test_regression_bytes_that_are_not_utf8() -> None:
    """Found by fuzz/fuzz_address.py: a byte that is not UTF-8 in a domain (the protocol keeps
    it as a lone surrogate) made is_valid_domain raise UnicodeEncodeError, and the session
    answered "RCPT TO:<u@\\xff.example>" with 421 4.3.0 Internal error; in a local part it
    was accepted (250) and the session failed with 421 after the final dot. Both are 553 now."""
    for raw, reply in [
        ("u@\udcff.example", "553 5.1.2 <u@\udcff.example>... Invalid host name"),
        (
            "u%\udcd7x.example@gw.example",
            "553 5.1.2 <u%\udcd7x.example@gw.example>... Invalid host name",
        ),
        ("u\udcff@x.example", "553 5.1.3 <u\udcff@x.example>... Invalid local part"),
        ('"u\\\udcff"@x.example', '553 5.1.3 <"u\\\udcff"@x.example>... Invalid local part'),
    ]:
        try:
            normalize(raw, lambda d: d == "gw.example")
        except AddressError as exc:
            assert str(exc.reply) == reply
            check_address_error(exc)
        else:
            raise AssertionError(raw)


def test_regression_a_resolved_route_keeps_the_length_limit() -> None:
    """Found by fuzz/fuzz_address.py: resolving a route re-quotes what is left, so a 255-byte
    "h.example!uuu...u\\" (unqualified, so behind a local name) gave a 258-byte mailbox that
    normalize() refused as "Address too long" when it was normalised again."""
    raw = "h.example!" + "u" * 244 + "\\"
    assert len(raw) == 255
    unqualified_is_local = "".__eq__
    try:
        mb = normalize(raw, unqualified_is_local)
    except AddressError as exc:
        assert str(exc.reply).startswith("553 5.1.0 ") and "Address too long" in str(exc.reply)
    else:
        raise AssertionError(f"accepted as {mb} ({len(str(mb))} bytes)")
    mb = normalize("h.example!u\\", unqualified_is_local)
    assert (mb.local, mb.domain) == ('"u\\\\"', "h.example")
    assert normalize(str(mb), unqualified_is_local) == mb
