"""SMTP-stage policy over real table files (semantics §1, §3, §4, §5, §6, §12, §18.2, §18.4).

Each test writes Sendmail-format tables into ``tmp_path``, builds the daemon's snapshot and asks
the pure policy functions what MAIL and RCPT get, comparing whole reply lines.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mailgate.address import AddressError, Mailbox, normalize
from mailgate.config import parse_config
from mailgate.policy import (
    Client,
    Decision,
    check_recipient,
    check_sender,
    client_may_relay,
    connect_refusal,
    relay_denied,
    sender_domain_reply,
)
from mailgate.routing import Route, resolve
from mailgate.snapshot import Snapshot, build_snapshot

HOST = "gateway.example.com"

# An outside client without PTR (the usual test client of the semantics file).
OUTSIDE = Client("192.0.2.10", "FAIL")
NAMED = Client("192.0.2.10", "OK", "client.example.net")


def snapshot(
    tmp_path: Path,
    tables: dict[str, str] | None = None,
    *,
    relay_hosts_only: bool = True,
    blocklist_recipients: bool = False,
    users: tuple[str, ...] = ("alice", "bob"),
) -> Snapshot:
    tdir = tmp_path / "tables"
    tdir.mkdir(parents=True)
    for name, text in (tables or {}).items():
        (tdir / name).write_text(textwrap.dedent(text).lstrip("\n"))
    mdir = tmp_path / "maildir"
    mdir.mkdir()
    for user in users:
        (mdir / user).mkdir()
    toml = (
        f'hostname = "{HOST}"\n'
        'listen = ["192.0.2.1:25"]\n'
        f'tables_dir = "{tdir}"\n'
        f"relay_hosts_only = {str(relay_hosts_only).lower()}\n"
        "[local]\n"
        f'maildir_root = "{mdir}"\n'
        "[access]\n"
        f"blocklist_recipients = {str(blocklist_recipients).lower()}\n"
    )
    return build_snapshot(parse_config(toml, tmp_path / "mailgate.toml", tmp_path))


def may_relay(snap: Snapshot, client: Client) -> bool:
    return client_may_relay(client, snap.tables, snap.config.relay_hosts_only)


def rcpt(snap: Snapshot, raw: str, client: Client = OUTSIDE) -> Decision:
    """What ``RCPT TO:<raw>`` gets, the way the session asks."""
    mailbox = normalize(raw, snap.routing.is_local)
    return check_recipient(raw, mailbox, client, may_relay(snap, client), snap.routing, snap.config)


def rcpt_reply(snap: Snapshot, raw: str, client: Client = OUTSIDE) -> str:
    return str(rcpt(snap, raw, client).reply)


def routes(snap: Snapshot, raw: str) -> list[Route]:
    """Where an accepted ``RCPT TO:<raw>`` goes: what delivery's ``routing.resolve`` makes of
    it (aliases not expanded, as at RCPT time)."""
    return resolve(normalize(raw, snap.routing.is_local), snap.routing, expand=False)


def ok(raw: str) -> str:
    return f"250 2.1.5 <{raw}>... Recipient ok"


def denied(raw: str, client: Client = OUTSIDE) -> str:
    """The relay-denied reply of §3 for ``client``, written out from the semantics table."""
    if client.ptr_status == "OK":
        return f"550 5.7.1 <{raw}>... Relaying denied"
    if client.ptr_status == "FAIL":
        return f"550 5.7.1 <{raw}>... Relaying denied. IP name lookup failed [{client.ip}]"
    if client.ptr_status == "TEMP":
        return (
            f"450 4.4.0 <{raw}>... Relaying temporarily denied. "
            f"Cannot resolve PTR record for {client.ip}"
        )
    # FORGED: §18.4 keeps only the code; the function's own text is taken as is.
    reply = relay_denied(f"<{raw}>", client)
    assert (reply.code, reply.enhanced) == (550, "5.7.1")
    return str(reply)


def mail(snap: Snapshot, raw: str) -> Decision | None:
    mailbox = normalize(raw, snap.routing.is_local) if raw else Mailbox("", "")
    return check_sender(raw, mailbox, snap.tables, snap.config)


def mail_reply(snap: Snapshot, raw: str) -> str | None:
    d = mail(snap, raw)
    return None if d is None else str(d.reply)


# The example gateway: target domains routed by mailertable, relayed by access To: RELAY.
GATEWAY = {
    "access": """
        To:targetdomain1.com    RELAY
        To:targetdomain2.com    RELAY
        targetdomain3.com       RELAY
        192.168.0               RELAY
        192.168.9.              RELAY
        Connect:198.51.100      RELAY
        192.168.1.1             RELAY
        Connect:192.0.2.5       OK
        trusted.example.com     RELAY
        Connect:IPv6:2001:db8:1 RELAY
    """,
    "mailertable": """
        targetdomain1.com       smtp:targethost1.example.com
        .targetdomain1.com      smtp:targethost1.example.com
        targetdomain2.com       smtp:targethost2.test.net
        targetdomain3.com       smtp:[192.168.0.1]
    """,
    "relay-domains": "relaydom.example.com\ntrusted2.example.com\n",
    "local-host-names": "virt.example.com\n",
}


# -- relay-denied replies by PTR status (§3, §18.4) --------------------------------------------


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        (
            Client("192.0.2.10", "OK", "client.example.net"),
            "550 5.7.1 <user@example.net>... Relaying denied",
        ),
        (
            Client("192.0.2.10", "FAIL"),
            "550 5.7.1 <user@example.net>... Relaying denied. IP name lookup failed [192.0.2.10]",
        ),
        (
            Client("192.0.2.10", "TEMP"),
            "450 4.4.0 <user@example.net>... Relaying temporarily denied. "
            "Cannot resolve PTR record for 192.0.2.10",
        ),
    ],
)
def test_relay_denied_reply_by_ptr_status(tmp_path: Path, client: Client, expected: str) -> None:
    snap = snapshot(tmp_path, GATEWAY)
    d = rcpt(snap, "user@example.net", client)
    assert str(d.reply) == expected
    assert not d.accepted
    assert d.logged_reject


def test_relay_denied_forged_ptr(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, GATEWAY)
    client = Client("192.0.2.10", "FORGED", "trusted.example.com")
    reply = rcpt(snap, "user@example.net", client).reply
    # §18.4: one text may do, but the code and enhanced code are kept.
    assert (reply.code, reply.enhanced) == (550, "5.7.1")
    assert reply.text.startswith("<user@example.net>... Relaying denied")
    # A forged name never grants relaying, even one with a RELAY entry.
    assert not may_relay(snap, client)


def test_relay_denied_for_address_literal(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, GATEWAY)
    assert rcpt_reply(snap, "u@[IPv6:2001:db8::1]") == (
        "550 5.7.1 <u@[IPv6:2001:db8::1]>... Relaying denied. IP name lookup failed [192.0.2.10]"
    )
    assert rcpt_reply(snap, "u@[192.0.2.98]").startswith("550 5.7.1 <u@[192.0.2.98]>... ")
    # A relaying client may use literals.
    assert rcpt_reply(snap, "u@[192.0.2.98]", Client("192.168.0.5")) == ok("u@[192.0.2.98]")


# -- recipient domains that may be relayed to (§3.1, §3.2) -------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "user@targetdomain1.com",  # To: RELAY
        "user@TargetDomain2.COM",  # case-insensitive
        "user@targetdomain3.com",  # untagged RELAY
        "user@targetdomain1.com.",  # trailing dot
        "user@relaydom.example.com",  # class R
        "user@trusted.example.com",  # untagged RELAY serves the recipient domain too
    ],
)
def test_relay_to_permitted_domains_from_anyone(tmp_path: Path, raw: str) -> None:
    snap = snapshot(tmp_path, GATEWAY)
    d = rcpt(snap, raw)
    assert str(d.reply) == ok(raw)
    assert [r.is_smtp for r in routes(snap, raw)] == [True]
    assert not d.logged_reject


def test_relay_routes_come_from_mailertable(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, GATEWAY)
    assert rcpt_reply(snap, "user@targetdomain3.com") == ok("user@targetdomain3.com")
    assert [(r.mailer, r.address, r.host) for r in routes(snap, "user@targetdomain3.com")] == [
        ("smtp", "user@targetdomain3.com", "[192.168.0.1]")
    ]


@pytest.mark.parametrize(
    "raw",
    [
        # relay_hosts_only: exact names only, even when mailertable routes the subdomain.
        "u@sub.targetdomain1.com",
        "u@sub.targetdomain3.com",
        "u@sub.relaydom.example.com",
        "user@example.net",
        "user@nottargetdomain1.com",
    ],
)
def test_relay_hosts_only_exact_names(tmp_path: Path, raw: str) -> None:
    snap = snapshot(tmp_path, GATEWAY)
    assert rcpt_reply(snap, raw) == denied(raw)


@pytest.mark.parametrize(
    "raw", ["u@sub.targetdomain1.com", "u@sub.targetdomain3.com", "u@a.sub.relaydom.example.com"]
)
def test_without_relay_hosts_only_subdomains_relay(tmp_path: Path, raw: str) -> None:
    snap = snapshot(tmp_path, GATEWAY, relay_hosts_only=False)
    assert rcpt_reply(snap, raw) == ok(raw)
    assert rcpt_reply(snap, "user@example.net") == denied("user@example.net")
    assert rcpt_reply(snap, "user@nottargetdomain1.com") == denied("user@nottargetdomain1.com")


@pytest.mark.parametrize(
    "raw",
    [
        "alice@gateway.example.com",
        "alice@GATEWAY",
        "alice@localhost",
        "alice",
        "alice@virt.example.com",
        "alice@[192.0.2.1]",
        "postmaster",
    ],
)
def test_local_domains_need_no_relay_permission(tmp_path: Path, raw: str) -> None:
    snap = snapshot(tmp_path, GATEWAY)
    assert rcpt_reply(snap, raw, OUTSIDE) == ok(raw)


def test_local_unknown_user(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, GATEWAY)
    d = rcpt(snap, "ghost@gateway.example.com")
    assert str(d.reply) == "550 5.1.1 <ghost@gateway.example.com>... User unknown"
    assert d.logged_reject
    assert rcpt_reply(snap, "ghost") == "550 5.1.1 <ghost>... User unknown"


def test_local_domain_in_mailertable_stays_local(tmp_path: Path) -> None:
    """§18.3 with the example set-up: listed in local-host-names and mailertable."""
    snap = snapshot(
        tmp_path,
        {**GATEWAY, "local-host-names": "targetdomain1.com\ntargetdomain2.com\n"},
    )
    assert rcpt_reply(snap, "ghost@targetdomain1.com") == (
        "550 5.1.1 <ghost@targetdomain1.com>... User unknown"
    )
    d = rcpt(snap, "alice@targetdomain2.com")
    assert str(d.reply) == ok("alice@targetdomain2.com")
    assert [(r.mailer, r.address) for r in routes(snap, "alice@targetdomain2.com")] == [
        ("local", "alice")
    ]


# -- client relay permission (§3.3, §4, §18.2) -------------------------------------------------


@pytest.mark.parametrize(
    ("client", "relays"),
    [
        (Client("192.168.0.5"), True),  # untagged "192.168.0"
        (Client("192.168.0.255"), True),
        (Client("192.168.1.1"), True),  # full address
        (Client("192.168.1.10"), False),  # "192.168.1.1" is not a prefix of .10
        (Client("192.168.1.2"), False),
        (Client("192.168.00.5"), False),
        (Client("192.168.9.5"), False),  # "192.168.9." never matches
        (Client("198.51.100.7"), True),  # Connect:198.51.100
        (Client("198.51.10.7"), False),
        (Client("192.0.2.5"), False),  # Connect: OK is not relay permission
        (Client("2001:db8:1::5"), True),  # Connect:IPv6:2001:db8:1
        (Client("2001:db8:2::5"), False),
        (Client("127.0.0.1"), True),  # the local host
        (Client("::1"), True),
        (Client("127.0.0.2"), False),
        (Client("192.0.2.20", "OK", "trusted.example.com"), True),
        (Client("192.0.2.20", "OK", "TRUSTED.example.com."), True),
        (Client("192.0.2.20", "OK", "client20.trusted.example.com"), False),
        (Client("192.0.2.20", "OK", "trusted2.example.com"), True),  # class R
        (Client("192.0.2.20", "OK", "a.trusted2.example.com"), False),
        (Client("192.0.2.20", "FAIL", "trusted.example.com"), False),
        (Client("192.0.2.20", "TEMP", "trusted.example.com"), False),
        (Client("192.0.2.20", "FORGED", "trusted.example.com"), False),
        (Client("192.0.2.20", "OK", "client.example.net"), False),
        # The IP entry decides before the PTR status is looked at.
        (Client("192.168.0.5", "TEMP"), True),
        (Client("192.168.0.5", "FORGED", "forged.example.net"), True),
        # A PROXY LOCAL / UNKNOWN session: the proxy's own address grants nothing.
        (Client("127.0.0.1", unidentified=True), False),
        (Client("192.168.0.5", unidentified=True), False),
        (Client("192.0.2.20", "OK", "trusted.example.com", unidentified=True), False),
    ],
)
def test_client_may_relay(tmp_path: Path, client: Client, relays: bool) -> None:
    snap = snapshot(tmp_path, GATEWAY)
    assert may_relay(snap, client) is relays
    expected = ok("user@example.net") if relays else denied("user@example.net", client)
    assert rcpt_reply(snap, "user@example.net", client) == expected


@pytest.mark.parametrize(
    ("name", "relays"),
    [
        ("trusted.example.com", True),
        ("client20.trusted.example.com", True),
        ("a.trusted2.example.com", True),
        ("client.example.net", False),
    ],
)
def test_client_name_parents_without_relay_hosts_only(
    tmp_path: Path, name: str, relays: bool
) -> None:
    snap = snapshot(tmp_path, GATEWAY, relay_hosts_only=False)
    assert may_relay(snap, Client("192.0.2.20", "OK", name)) is relays


def test_connect_tagged_name_relay_and_skip(tmp_path: Path) -> None:
    snap = snapshot(
        tmp_path,
        {
            "access": """
                Connect:relayhost.example.com   RELAY
                10                              RELAY
                10.1                            SKIP
            """
        },
    )
    assert may_relay(snap, Client("192.0.2.30", "OK", "relayhost.example.com"))
    assert may_relay(snap, Client("10.2.3.4"))
    # SKIP exempts the subnet from the broader entry.
    assert not may_relay(snap, Client("10.1.3.4"))


def test_tagged_ip_entry_before_untagged_at_same_level(tmp_path: Path) -> None:
    snap = snapshot(
        tmp_path,
        {
            "access": """
                Connect:192.168.5.5     OK
                192.168.5.5             RELAY
                192.168.6               RELAY
                Connect:192.168.6.6     OK
            """
        },
    )
    assert not may_relay(snap, Client("192.168.5.5"))
    # The most specific level wins whatever its tag.
    assert not may_relay(snap, Client("192.168.6.6"))
    assert may_relay(snap, Client("192.168.6.7"))


def test_local_recipient_from_temp_ptr_client(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, GATEWAY)
    temp = Client("192.0.2.10", "TEMP")
    assert rcpt_reply(snap, "alice@gateway.example.com", temp) == ok("alice@gateway.example.com")
    assert rcpt_reply(snap, "u@targetdomain1.com", temp) == ok("u@targetdomain1.com")


# -- things that are not relay permission (§3) ------------------------------------------------


def test_mailertable_local_route_is_not_relay_permission(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, {"mailertable": "example.org local:\n"})
    assert rcpt_reply(snap, "alice@example.org") == denied("alice@example.org")
    assert rcpt_reply(snap, "alice@example.org", Client("::1")) == ok("alice@example.org")
    assert rcpt_reply(snap, "ghost@example.org", Client("::1")) == (
        "550 5.1.1 <ghost@example.org>... User unknown"
    )


def test_recipient_reject_entries_are_not_relay_permission(tmp_path: Path) -> None:
    snap = snapshot(
        tmp_path,
        {
            "access": """
                To:blocked.example.com      REJECT
                To:err.example.com          ERROR:5.7.1:550 No thanks
                discard.example.com         DISCARD
                From:fromrelay.example.com  RELAY
                Connect:conn.example.com    RELAY
            """
        },
    )
    for raw in (
        "u@blocked.example.com",
        "u@err.example.com",
        "u@discard.example.com",
        "u@fromrelay.example.com",
        "u@conn.example.com",
    ):
        assert rcpt_reply(snap, raw) == denied(raw)


# -- To: entries need blocklist_recipients (§4) -----------------------------------------------

TO_ENTRIES = {
    "access": """
        To:targetdomain1.com            RELAY
        To:victim@targetdomain1.com     REJECT
        To:gone@targetdomain1.com       ERROR:5.1.1:550 Gone
        To:later@targetdomain1.com      ERROR:4.2.1:450 Busy
        To:sink@targetdomain1.com       DISCARD
    """
}


@pytest.mark.parametrize("local", ["victim", "gone", "later", "sink", "anyone"])
def test_to_reject_ignored_without_blocklist_recipients(tmp_path: Path, local: str) -> None:
    snap = snapshot(tmp_path, TO_ENTRIES)
    d = rcpt(snap, f"{local}@targetdomain1.com")
    assert str(d.reply) == ok(f"{local}@targetdomain1.com")
    assert not d.discard


def test_to_entries_with_blocklist_recipients(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, TO_ENTRIES, blocklist_recipients=True)
    victim = rcpt(snap, "victim@targetdomain1.com")
    assert (victim.reply.code, victim.accepted, victim.logged_reject) == (550, False, True)
    assert victim.reply.text.startswith("<victim@targetdomain1.com>... ")
    assert rcpt_reply(snap, "gone@targetdomain1.com") == (
        "550 5.1.1 <gone@targetdomain1.com>... Gone"
    )
    assert rcpt_reply(snap, "later@targetdomain1.com") == "450 4.2.1 Busy"
    sink = rcpt(snap, "sink@targetdomain1.com")
    assert sink.accepted and sink.discard
    assert rcpt_reply(snap, "anyone@targetdomain1.com") == ok("anyone@targetdomain1.com")


def test_localhost_is_our_name_for_the_access_lookups(tmp_path: Path) -> None:
    """Sendmail's canonify makes ``localhost`` $j (sendmail -bt: ``root@localhost`` is
    ``root<@gateway.example.com.>``), so an entry for root@$j covers root@localhost too."""
    entries = {"access": f"To:root@{HOST} REJECT\nFrom:bad@{HOST} REJECT\n"}
    snap = snapshot(tmp_path, entries, blocklist_recipients=True)
    assert rcpt_reply(snap, "root@localhost") == (
        "550 5.2.1 <root@localhost>... Mailbox disabled for this recipient"
    )
    assert mail_reply(snap, "bad@localhost") == "550 5.7.1 <bad@localhost>... Access denied"
    assert mail(snap, "good@localhost") is None


# -- mailertable error: at RCPT (§5) -----------------------------------------------------------

ERRORS = {
    "access": """
        To:refused.example.org      RELAY
        To:later.example.org        RELAY
    """,
    "mailertable": """
        refused.example.org     error:5.7.1:550 Mail for this domain is refused
        later.example.org       error:4.3.0:451 Try again later
        .nouser.example.org     error:nouser No such domain here
    """,
}


def test_mailertable_error_permanent_has_address_prefix(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, ERRORS)
    d = rcpt(snap, "x@refused.example.org")
    assert str(d.reply) == "550 5.7.1 <x@refused.example.org>... Mail for this domain is refused"
    assert d.logged_reject


def test_mailertable_error_temporary_has_no_prefix(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, ERRORS)
    assert rcpt_reply(snap, "x@later.example.org") == "451 4.3.0 Try again later"


def test_mailertable_error_nouser_misparse(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, ERRORS)
    relay_client = Client("127.0.0.1")
    assert rcpt_reply(snap, "x@a.nouser.example.org", relay_client) == (
        "553 5.3.0 <x@a.nouser.example.org>... nouser No such domain here"
    )
    # Without relay permission too: Sendmail parses the address (ruleset 0, the mailertable)
    # before check_rcpt, so the entry answers, not the relay check (real Sendmail 8.17 does).
    assert rcpt_reply(snap, "x@a.nouser.example.org") == (
        "553 5.3.0 <x@a.nouser.example.org>... nouser No such domain here"
    )


def test_a_mailertable_error_answers_before_the_relay_check(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, {"mailertable": ERRORS["mailertable"]})  # no To: RELAY at all
    assert rcpt_reply(snap, "x@later.example.org") == "451 4.3.0 Try again later"
    assert rcpt_reply(snap, "x@refused.example.org") == (
        "550 5.7.1 <x@refused.example.org>... Mail for this domain is refused"
    )
    assert rcpt_reply(snap, "x@other.example.org") == denied("x@other.example.org")


# -- virtusertable at RCPT (§6) ----------------------------------------------------------------

VIRT = {
    "local-host-names": "virt.example.com\n",
    "virtusertable": """
        info@virt.example.com       root
        sales@virt.example.com      error:nouser 550 No such user here
        closed@virt.example.com     error:4.2.1:450 Mailbox closed
        @virt.example.com           %1@targetdomain2.com
    """,
    "mailertable": "targetdomain2.com smtp:targethost2.test.net\n",
}


def test_virtuser_remote_value_needs_no_relay_check(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, VIRT)
    d = rcpt(snap, "anyone@virt.example.com")
    assert str(d.reply) == ok("anyone@virt.example.com")
    assert [(r.mailer, r.address, r.host) for r in routes(snap, "anyone@virt.example.com")] == [
        ("smtp", "anyone@targetdomain2.com", "targethost2.test.net")
    ]
    # Written directly, the target domain is not relayed to.
    assert rcpt_reply(snap, "anyone@targetdomain2.com") == denied("anyone@targetdomain2.com")


def test_virtuser_local_and_error_values(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, VIRT)
    d = rcpt(snap, "info@virt.example.com")
    assert str(d.reply) == ok("info@virt.example.com")
    assert [(r.mailer, r.address) for r in routes(snap, "info@virt.example.com")] == [
        ("local", "root")
    ]
    assert rcpt_reply(snap, "sales@virt.example.com") == (
        "550 5.0.0 <sales@virt.example.com>... No such user here"
    )
    assert rcpt_reply(snap, "closed@virt.example.com") == "450 4.2.1 Mailbox closed"


# -- aliases at RCPT: existence only, expansion later (§8) -------------------------------------


def test_aliases_are_not_expanded_at_rcpt(tmp_path: Path) -> None:
    snap = snapshot(
        tmp_path,
        {"aliases": 'list: ghost, carol@example.net, "|/usr/bin/true"\nprog: "|/bin/cat"\n'},
    )
    for raw in ("list@gateway.example.com", "prog@gateway.example.com", "LIST"):
        d = rcpt(snap, raw)
        assert str(d.reply) == ok(raw)
        assert [r.mailer for r in routes(snap, raw)] == ["alias"]


def test_postmaster_accepted_when_root_is_an_alias(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, {"aliases": "root: alice\n"})
    assert rcpt_reply(snap, "postmaster@gateway.example.com") == (
        ok("postmaster@gateway.example.com")
    )


# -- normalised forms (§1) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "address"),
    [
        ("user%targetdomain1.com@gateway.example.com", "user@targetdomain1.com"),
        ("targetdomain1.com!user", "user@targetdomain1.com"),
        ("@example.net:user@targetdomain1.com", "user@targetdomain1.com"),
        ('"john doe"@targetdomain1.com', '"john doe"@targetdomain1.com'),
    ],
)
def test_routing_forms_accepted(tmp_path: Path, raw: str, address: str) -> None:
    snap = snapshot(tmp_path, GATEWAY)
    d = rcpt(snap, raw)
    assert str(d.reply) == ok(raw)
    assert [(r.mailer, r.address, r.host) for r in routes(snap, raw)] == [
        ("smtp", address, "targethost1.example.com")
    ]


@pytest.mark.parametrize(
    "raw",
    [
        "user%example.net@gateway.example.com",
        "example.net!user",
        "uuhost!user",
        "@targetdomain1.com:user@example.net",
    ],
)
def test_routing_forms_denied(tmp_path: Path, raw: str) -> None:
    snap = snapshot(tmp_path, GATEWAY)
    assert rcpt_reply(snap, raw) == denied(raw)


# -- sender-specified routing inside a relayed domain (§1, no loose_relay_check) --------------
# The rule, not a list: a recipient is relayed for a client without relay permission only if
# its domain and every host its local part routes to (``%``, ``!``, ``@`` in quotes or escaped,
# nested and combined) are relayed. The table is generated: each way of writing "user at
# <inner>" inside each kind of relayed domain, with a foreign, a relayed and a local inner.

RELAY_CLIENT = Client("192.168.1.1", "FAIL")  # access 192.168.1.1 RELAY
RELAY_NAME = Client("192.0.2.77", "OK", "trusted.example.com")  # PTR name RELAY
LOCALHOST = Client("127.0.0.1", "OK", "localhost")

# "user" routed to "inner", as text; the quoted forms then quote the whole local part.
ROUTED_LOCAL_FORMS = {
    "percent": (lambda u, inner: f"{u}%{inner}", False),
    "bang": (lambda u, inner: f"{inner}!{u}", False),
    "quoted at": (lambda u, inner: f"{u}@{inner}", True),
    "quoted percent": (lambda u, inner: f"{u}%{inner}", True),
    "quoted bang": (lambda u, inner: f"{inner}!{u}", True),
    "escaped at": (lambda u, inner: f"{u}\\@{inner}", False),
}
# Each kind of relay grant for the outer domain (§3.2).
OUTER_DOMAINS = {
    "To: RELAY": "targetdomain1.com",
    "untagged RELAY": "targetdomain3.com",
    "class R": "relaydom.example.com",
}


def _routed(form: str, inner: str, outer: str, depth: int = 1) -> str:
    route, quoted = ROUTED_LOCAL_FORMS[form]
    local = "u"
    for _ in range(depth):
        local = route(local, inner)
    return f'"{local}"@{outer}' if quoted else f"{local}@{outer}"


ROUTING_CASES = [
    pytest.param(form, kind, depth, id=f"{form}-{kind}-depth{depth}")
    for form in ROUTED_LOCAL_FORMS
    for kind in OUTER_DOMAINS
    for depth in (1, 2)
]


@pytest.mark.parametrize(("form", "kind", "depth"), ROUTING_CASES)
def test_routing_to_a_foreign_host_inside_a_relayed_domain_is_denied(
    tmp_path: Path, form: str, kind: str, depth: int
) -> None:
    snap = snapshot(tmp_path, GATEWAY)
    raw = _routed(form, "foreign.example", OUTER_DOMAINS[kind], depth)
    for client in (OUTSIDE, NAMED, Client("192.0.2.10", "TEMP")):
        assert rcpt_reply(snap, raw, client) == denied(raw, client), (raw, client)
    # Clients that may relay are not affected: accepted, passed on to the outer domain's hop.
    for client in (RELAY_CLIENT, RELAY_NAME, LOCALHOST):
        d = rcpt(snap, raw, client)
        assert str(d.reply) == ok(raw), (raw, client)


@pytest.mark.parametrize(("form", "kind", "depth"), ROUTING_CASES)
def test_routing_to_a_relayed_or_local_host_is_accepted(
    tmp_path: Path, form: str, kind: str, depth: int
) -> None:
    snap = snapshot(tmp_path, GATEWAY)
    for inner in ("targetdomain2.com", "relaydom.example.com", HOST, "virt.example.com"):
        raw = _routed(form, inner, OUTER_DOMAINS[kind], depth)
        assert rcpt_reply(snap, raw) == ok(raw), raw


@pytest.mark.parametrize(
    "raw",
    [
        # The five forms, then combined and nested ones.
        "u%foreign.example@targetdomain1.com",
        "foreign.example!u@targetdomain1.com",
        "targetdomain1.com!foreign.example!u",
        '"u@foreign.example"@targetdomain1.com',
        '"u%foreign.example"@targetdomain1.com',
        "u%foreign.example%targetdomain2.com@targetdomain1.com",
        "targetdomain2.com!u%foreign.example@targetdomain1.com",
        "foreign.example!u%targetdomain2.com@targetdomain1.com",
        '"foreign.example!u"%targetdomain2.com@targetdomain1.com',
        '"u%foreign.example@targetdomain2.com"@targetdomain1.com',
        '"u%[192.0.2.99]"@targetdomain1.com',
        "u%FOREIGN.Example.@targetdomain1.com",
        # A route that names no valid host: nobody can tell where a next hop takes it.
        "u%bad..host@targetdomain1.com",
        "u%@targetdomain1.com",
        "!u@targetdomain1.com",
        # Behind a local name: routing, not a user name (semantics §1).
        "other.example!u@gateway.example.com",
        '"u@other.example"@gateway.example.com',
        '"u@other.example"',
        '"u%other.example"',
        "u\\@other.example@virt.example.com",
    ],
)
def test_sender_specified_routing_forms_denied_from_outside(tmp_path: Path, raw: str) -> None:
    snap = snapshot(tmp_path, GATEWAY)
    assert rcpt_reply(snap, raw) == denied(raw)


@pytest.mark.parametrize(
    ("raw", "address", "host"),
    [
        ('"u@other.example"@gateway.example.com', "u@other.example", "other.example"),
        ("other.example!u@gateway.example.com", "u@other.example", "other.example"),
        ('"u@other.example"', "u@other.example", "other.example"),
        ('"u%other.example"', "u@other.example", "other.example"),
        (
            "u%foreign.example@targetdomain1.com",
            "u%foreign.example@targetdomain1.com",
            "targethost1.example.com",
        ),
        (
            '"u@foreign.example"@targetdomain1.com',
            '"u@foreign.example"@targetdomain1.com',
            "targethost1.example.com",
        ),
    ],
)
def test_relay_client_routing_goes_where_the_route_names(
    tmp_path: Path, raw: str, address: str, host: str
) -> None:
    """Behind a local name the route is resolved (the mail goes to the host it names); inside
    a relayed domain it is passed on unchanged to that domain's next hop, as Sendmail does."""
    snap = snapshot(tmp_path, GATEWAY)
    for client in (RELAY_CLIENT, RELAY_NAME, LOCALHOST):
        d = rcpt(snap, raw, client)
        assert str(d.reply) == ok(raw)
        assert [(r.address, r.host) for r in routes(snap, raw)] == [(address, host)]


def test_routing_between_relayed_domains_is_accepted(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, GATEWAY)
    raw = "u%targetdomain2.com@targetdomain1.com"
    d = rcpt(snap, raw)
    assert str(d.reply) == ok(raw)
    assert [(r.address, r.host) for r in routes(snap, raw)] == [(raw, "targethost1.example.com")]


@pytest.mark.parametrize(
    "raw",
    [
        "u@foreign.example@targetdomain1.com",
        "u@foreign.example@gateway.example.com",
        "u@gateway.example.com@gateway.example.com",
    ],
)
def test_unquoted_double_at_is_an_invalid_route(tmp_path: Path, raw: str) -> None:
    """Behind a relayed or a local name alike: only a quoted or escaped @ is a route."""
    snap = snapshot(tmp_path, GATEWAY)
    with pytest.raises(AddressError) as exc:
        normalize(raw, snap.routing.is_local)
    assert str(exc.value.reply) == f"553 5.1.3 <{raw}>... Invalid route address"


def test_quoted_local_parts_at_rcpt(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, GATEWAY)
    assert rcpt_reply(snap, '"john doe"@gateway.example.com') == (
        '550 5.1.1 <"john doe"@gateway.example.com>... User unknown'
    )
    d = rcpt(snap, '"root"@gateway.example.com')
    assert str(d.reply) == ok('"root"@gateway.example.com')
    assert [(r.mailer, r.address) for r in routes(snap, '"root"@gateway.example.com')] == [
        ("local", "root")
    ]


def test_domaintable_rewrite_passes_relay_check(tmp_path: Path) -> None:
    domaintable = "olddomain.example.com targetdomain1.com\n"
    snap = snapshot(tmp_path, {**GATEWAY, "domaintable": domaintable})
    d = rcpt(snap, "u@olddomain.example.com")
    assert str(d.reply) == ok("u@olddomain.example.com")
    assert [(r.mailer, r.address, r.host) for r in routes(snap, "u@olddomain.example.com")] == [
        ("smtp", "u@targetdomain1.com", "targethost1.example.com")
    ]


# -- MAIL FROM (§4, §12) -----------------------------------------------------------------------

SENDERS = {
    "access": """
        From:spammer@example.net        REJECT
        From:example.org                REJECT
        From:okuser@example.org         OK
        From:baduser@                   REJECT
        From:blocked.example            ERROR:5.7.0:550 Sender blocked here
        From:later.example              ERROR:4.7.1:451 Come back later
        From:quoted.example             ERROR:"550 Go away"
        From:sink.example               DISCARD
        From:good.example               OK
        From:skip.example.org           SKIP
        From:localuser@                 OK
        relayonly.example               RELAY
        untagged.example                REJECT
        To:toonly.example               REJECT
    """
}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("spammer@example.net", "550 5.7.1 <spammer@example.net>... Access denied"),
        ("x@example.org", "550 5.7.1 <x@example.org>... Access denied"),
        ("x@sub.example.org", "550 5.7.1 <x@sub.example.org>... Access denied"),
        ("X@Deep.Sub.EXAMPLE.org", "550 5.7.1 <X@Deep.Sub.EXAMPLE.org>... Access denied"),
        ("baduser@example.net", "550 5.7.1 <baduser@example.net>... Access denied"),
        ("a@blocked.example", "550 5.7.0 <a@blocked.example>... Sender blocked here"),
        ("a@later.example", "451 4.7.1 Come back later"),
        ("a@quoted.example", "550 5.0.0 <a@quoted.example>... Go away"),
        ("a@untagged.example", "550 5.7.1 <a@untagged.example>... Access denied"),
    ],
)
def test_sender_refused(tmp_path: Path, raw: str, expected: str) -> None:
    snap = snapshot(tmp_path, SENDERS)
    d = mail(snap, raw)
    assert d is not None
    assert str(d.reply) == expected
    assert d.logged_reject
    assert not d.accepted


def test_sender_ok_beats_domain_reject(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, SENDERS)
    d = mail(snap, "okuser@example.org")
    assert d is not None
    assert str(d.reply) == "250 2.1.0 <okuser@example.org>... Sender ok"
    assert not d.discard
    assert mail_reply(snap, "a@good.example") == "250 2.1.0 <a@good.example>... Sender ok"


def test_sender_relay_entry_accepts_without_the_dns_check(tmp_path: Path) -> None:
    """Sendmail's check_mail takes RELAY as OK ($={Accept}, checked with sendmail -bt): an
    internal domain listed RELAY need not resolve. It lends no relaying."""
    snap = snapshot(tmp_path, SENDERS)
    d = mail(snap, "a@relayonly.example")
    assert d is not None and str(d.reply) == "250 2.1.0 <a@relayonly.example>... Sender ok"
    assert not d.discard


def test_sender_discard(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, SENDERS)
    d = mail(snap, "a@sink.example")
    assert d is not None
    assert str(d.reply) == "250 2.1.0 <a@sink.example>... Sender ok"
    assert d.discard and d.accepted


def test_sender_without_verdict_goes_on(tmp_path: Path) -> None:
    """No entry, SKIP or a To:-only entry: no verdict, the DNS checks decide."""
    snap = snapshot(tmp_path, SENDERS)
    for raw in (
        "a@example.net",
        "a@skip.example.org",
        "a@toonly.example",
        "a@notexample.org",
    ):
        assert mail(snap, raw) is None, raw


def test_sender_from_reject_climbs_under_relay_hosts_only(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, SENDERS, relay_hosts_only=True)
    assert mail_reply(snap, "x@a.b.example.org") == (
        "550 5.7.1 <x@a.b.example.org>... Access denied"
    )


def test_spam_tag_is_ignored(tmp_path: Path) -> None:
    """Spam: FRIEND/HATER need delay_checks, which the gateway does not use."""
    snap = snapshot(
        tmp_path,
        {
            "access": """
                From:example.net            REJECT
                Spam:abuse@example.net      FRIEND
                Spam:victim@example.org     HATER
                To:example.org              RELAY
            """
        },
    )
    assert mail_reply(snap, "abuse@example.net") == (
        "550 5.7.1 <abuse@example.net>... Access denied"
    )
    assert rcpt_reply(snap, "victim@example.org") == ok("victim@example.org")


def test_null_sender(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, SENDERS)
    assert mail_reply(snap, "") == "250 2.1.0 <>... Sender ok"


def test_unqualified_sender(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, SENDERS)
    d = mail(snap, "sender")
    assert d is not None
    assert str(d.reply) == "553 5.5.4 <sender>... Domain name required for sender address sender"
    assert d.logged_reject
    # An OK entry accepts it anyway (§4: OK accepts even if other checks fail).
    assert mail_reply(snap, "localuser") == "250 2.1.0 <localuser>... Sender ok"


def test_sender_domain_dns_replies(tmp_path: Path) -> None:
    mb = Mailbox("a", "nx.example.com")
    assert str(sender_domain_reply("a@nx.example.com", mb, "no")) == (
        "553 5.1.8 <a@nx.example.com>... Domain of sender address a@nx.example.com does not exist"
    )
    assert str(sender_domain_reply("a@nx.example.com", mb, "temp")) == (
        "451 4.1.8 Domain of sender address a@nx.example.com does not resolve"
    )
    assert str(sender_domain_reply("a@nx.example.com", mb, "yes")) == (
        "250 2.1.0 <a@nx.example.com>... Sender ok"
    )


# -- Connect: refusals (§4) --------------------------------------------------------------------


def test_connect_refusals(tmp_path: Path) -> None:
    snap = snapshot(
        tmp_path,
        {
            "access": """
                Connect:192.0.2.3   REJECT
                Connect:192.0.2.4   DISCARD
                Connect:192.0.2.5   OK
                Connect:192.0.2.6   ERROR:"550 Go away"
                Connect:192.0.2.7   ERROR:4.7.1:451 Come back later
                192.0.2.8           RELAY
            """
        },
    )

    def refusal(ip: str) -> str | None:
        reply = connect_refusal(snap.tables.access.connect(ip, None))
        return None if reply is None else str(reply)

    assert refusal("192.0.2.3") == "550 5.7.1 Access denied"
    assert refusal("192.0.2.4") is None
    assert refusal("192.0.2.5") is None
    assert refusal("192.0.2.6") == "550 5.0.0 Go away"
    assert refusal("192.0.2.7") == "451 4.7.1 Come back later"
    assert refusal("192.0.2.8") is None
    assert refusal("192.0.2.9") is None
