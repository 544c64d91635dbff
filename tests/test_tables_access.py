"""The access db (semantics §3, §4, §10, §18.2)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mailgate.tables.access import AccessTable, Verdict
from mailgate.tables.maps import ErrorValue, MapEntry, TableError

EXAMPLES = Path(__file__).parent / "data" / "sendmail-examples"


def table(tmp_path: Path, text: str) -> AccessTable:
    p = tmp_path / "access"
    p.write_text(text)
    return AccessTable.load(p)


def action(v: Verdict | None) -> str | None:
    return None if v is None else v.action


# -- loading ----------------------------------------------------------------------------


def test_missing_or_none_is_empty(tmp_path: Path) -> None:
    assert len(AccessTable.load(None)) == 0
    t = AccessTable.load(tmp_path / "nope")
    assert len(t) == 0
    assert t.connect("192.0.2.1", None) is None
    assert t.sender("a", "b.example") is None
    assert not t.client_relay("192.0.2.1", "x.example", False)


def test_values_and_case(tmp_path: Path) -> None:
    t = table(
        tmp_path,
        "# comment\n"
        "\n"
        "Connect:192.0.2.1   ok\n"
        "CONNECT:192.0.2.2\tRelay\n"
        "connect:192.0.2.3 REJECT\n"
        "Connect:192.0.2.4 DISCARD\n"
        "Connect:192.0.2.5 ERROR:4.7.1:451 Come back later\n"
        'Connect:192.0.2.6 ERROR:"550 Go away"\n'
        "Connect:192.0.2.7 error:550 Plain code\n"
        "Connect:192.0.2.8 550 5.7.1 Generic error\n",
    )
    assert action(t.connect("192.0.2.1", None)) == "OK"
    assert action(t.connect("192.0.2.2", None)) == "RELAY"
    assert action(t.connect("192.0.2.3", None)) == "REJECT"
    assert action(t.connect("192.0.2.4", None)) == "DISCARD"
    v = t.connect("192.0.2.5", None)
    assert v == Verdict(
        "ERROR", ErrorValue(451, "4.7.1", "Come back later"), "Connect:192.0.2.5", 7
    )
    v = t.connect("192.0.2.6", None)
    assert v is not None and v.error == ErrorValue(550, "5.0.0", "Go away")
    v = t.connect("192.0.2.7", None)
    assert v is not None and v.error == ErrorValue(550, "5.0.0", "Plain code")
    v = t.connect("192.0.2.8", None)
    assert v is not None and v.error == ErrorValue(550, "5.7.1", "Generic error")


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("192.0.2.1 MAYBE", "unknown value 'MAYBE'"),
        ("192.0.2.1 RELAY # office", "unknown value"),
        ("192.0.2.1", "has no value"),
        ("From: REJECT", "empty key"),
        ("GreetPause:192.0.2.1 fast", "milliseconds"),
        ("Connect:IPv6:zz99::1 REJECT", "not an IPv6"),
        ("192.0.2.1 ERROR:5.7.1:450 mismatch", "does not match"),
        ("192.0.2.1 ERROR:", "needs a reply code"),
        ("192.0.2.1 QUARANTINE:look", "not supported"),
        ("From:a@b FRIEND", "unknown value"),
    ],
)
def test_bad_lines_name_path_and_line(tmp_path: Path, line: str, fragment: str) -> None:
    with pytest.raises(TableError) as info:
        table(tmp_path, f"# first\n10 OK\n{line}\n")
    err = info.value
    assert err.line == 3
    assert err.path == str(tmp_path / "access")
    assert fragment in err.message
    assert str(err).startswith(f"{tmp_path / 'access'}:3: ")


def test_undecodable_bytes(tmp_path: Path) -> None:
    p = tmp_path / "access"
    p.write_bytes(b"10 OK\n11 \xff\xfeRELAY\n")
    with pytest.raises(TableError) as info:
        AccessTable.load(p)
    assert info.value.line == 2


def test_duplicate_first_wins_with_warning(tmp_path: Path) -> None:
    t = table(tmp_path, "192.0.2.1 REJECT\n192.0.2.1 RELAY\n")
    v = t.connect("192.0.2.1", None)
    assert v is not None and v.action == "REJECT" and v.line == 1
    assert [str(w) for w in t.warnings] == [
        f"{tmp_path / 'access'}:2: duplicate key 192.0.2.1: line 1 is used (as makemap does)"
    ]


def test_from_entries() -> None:
    t = AccessTable.from_entries([MapEntry("To:example.com", "RELAY", 4)], "mem")
    assert t.recipient_domain_relay("example.com", True)
    assert t.path == "mem"


# -- IPv4 -------------------------------------------------------------------------------


def test_ipv4_octet_climbing_and_tag_order(tmp_path: Path) -> None:
    t = table(
        tmp_path,
        "Connect:192.0.2 REJECT\n192.0.2 OK\n198.51.100 RELAY\n10 DISCARD\nConnect:10.1.2.3 OK\n",
    )
    # Tagged beats untagged at the same level.
    assert action(t.connect("192.0.2.5", None)) == "REJECT"
    assert action(t.connect("198.51.100.7", None)) == "RELAY"
    assert action(t.connect("10.9.9.9", None)) == "DISCARD"
    # The more specific level wins even though it is tagged and the other is not.
    assert action(t.connect("10.1.2.3", None)) == "OK"
    assert t.connect("203.0.113.1", None) is None
    # A prefix matches whole octets only.
    assert t.connect("192.0.20.1", None) is None
    assert t.connect("100.1.1.1", None) is None


def test_trailing_dot_ipv4_never_matches_and_warns(tmp_path: Path) -> None:
    # §18.2: "192.0.2. RELAY" does not let 192.0.2.5 relay; "198.51.100 RELAY" does.
    t = table(tmp_path, "192.0.2.    RELAY\n198.51.100 RELAY\n")
    assert not t.client_relay("192.0.2.5", None, True)
    assert t.connect("192.0.2.5", None) is None
    assert t.client_relay("198.51.100.7", None, True)
    assert len(t.warnings) == 1
    w = t.warnings[0]
    assert w.line == 1
    assert "192.0.2." in w.message and "write 192.0.2 " in w.message


def test_example_access_file() -> None:
    t = AccessTable.load(EXAMPLES / "access")
    assert not t.client_relay("192.168.0.5", None, True)  # "192.168.0." never matches
    assert t.client_relay("192.168.1.1", None, True)
    assert t.client_relay("192.168.1.2", None, True)
    assert not t.client_relay("192.168.1.3", None, True)
    for n in (1, 2, 3):
        assert t.recipient_domain_relay(f"targetdomain{n}.com", True)
        assert t.recipient_domain_relay(f"TargetDomain{n}.COM.", True)
        # relay_hosts_only: exact name only.
        assert not t.recipient_domain_relay(f"sub.targetdomain{n}.com", True)
        assert t.recipient_domain_relay(f"sub.targetdomain{n}.com", False)
    assert not t.recipient_domain_relay("example.net", False)
    assert [w.line for w in t.warnings] == [4]
    assert "192.168.0" in t.warnings[0].message


# -- IPv6 -------------------------------------------------------------------------------


def test_ipv6_full_and_prefix_keys(tmp_path: Path) -> None:
    t = table(
        tmp_path,
        "Connect:IPv6:2001:DB8::25 REJECT\n"
        "IPv6:2001:db8:0:0:0:0:0:26 DISCARD\n"
        "Connect:IPv6:2001:db8:1 RELAY\n"
        "IPv6:2001:0db8:0002 OK\n"
        "IPv6:2001:db8:3:: RELAY\n",
    )
    assert action(t.connect("2001:db8::25", None)) == "REJECT"
    assert action(t.connect("2001:0db8:0:0::25", None)) == "REJECT"
    assert action(t.connect("2001:db8::26", None)) == "DISCARD"
    assert action(t.connect("2001:db8:1::7", None)) == "RELAY"
    assert action(t.connect("2001:db8:1:ffff::7", None)) == "RELAY"
    assert action(t.connect("2001:db8:2::1", None)) == "OK"
    # "IPv6:2001:db8:3::" is one address (as in Sendmail), with a warning naming the fix.
    assert t.connect("2001:db8:3:4::1", None) is None
    assert action(t.connect("2001:db8:3::", None)) == "RELAY"
    assert [w.line for w in t.warnings] == [5]
    assert "write IPv6:2001:db8:3" in t.warnings[0].message
    assert t.connect("2001:db8:4::1", None) is None
    assert t.connect("2001:db8::27", None) is None
    assert t.client_relay("2001:db8:1::9", None, True)
    assert not t.client_relay("2001:db8:2::9", None, True)


def test_ipv4_mapped_client_uses_ipv4_keys(tmp_path: Path) -> None:
    t = table(tmp_path, "192.0.2 RELAY\n")
    assert t.client_relay("::ffff:192.0.2.9", None, True)


def test_garbage_ip_is_no_match(tmp_path: Path) -> None:
    t = table(tmp_path, "10 REJECT\nexample.com REJECT\n")
    assert t.connect("", None) is None
    assert t.connect("not-an-ip", None) is None
    assert t.connect("zz::1", None) is None


# -- host names -------------------------------------------------------------------------


def test_connect_host_name_and_parents(tmp_path: Path) -> None:
    t = table(tmp_path, "Connect:bad.example REJECT\ngood.example OK\n192.0.2.1 DISCARD\n")
    assert action(t.connect("198.51.100.1", "bad.example")) == "REJECT"
    assert action(t.connect("198.51.100.1", "host.sub.bad.example")) == "REJECT"
    assert action(t.connect("198.51.100.1", "GOOD.example.")) == "OK"
    assert t.connect("198.51.100.1", "notbad.example") is None
    # Sendmail's check_relay looks up the name (D) before the address (A).
    assert action(t.connect("192.0.2.1", "good.example")) == "OK"
    assert action(t.connect("192.0.2.1", "other.example")) == "DISCARD"


def test_client_relay_by_name(tmp_path: Path) -> None:
    t = table(tmp_path, "Connect:trusted.example.com RELAY\nfriend.example RELAY\n")
    # relay_hosts_only: PTR trusted.example.com relays, client20.trusted.example.com does not.
    assert t.client_relay("192.0.2.20", "trusted.example.com", True)
    assert not t.client_relay("192.0.2.20", "client20.trusted.example.com", True)
    assert t.client_relay("192.0.2.20", "client20.trusted.example.com", False)
    assert t.client_relay("192.0.2.20", "friend.example", True)
    assert not t.client_relay("192.0.2.20", None, False)


def test_connect_ok_is_not_relay_and_shadows_untagged(tmp_path: Path) -> None:
    t = table(tmp_path, "Connect:10.1 OK\n10 RELAY\n192.0.2.1 OK\n")
    assert not t.client_relay("192.0.2.1", None, False)
    # The first entry found (10.1 OK) ends the search; the broader RELAY is not reached.
    assert not t.client_relay("10.1.0.1", None, False)
    assert t.client_relay("10.2.0.1", None, False)


def test_skip_stops_climbing(tmp_path: Path) -> None:
    t = table(
        tmp_path,
        "10 REJECT\n10.1 SKIP\nexample.org REJECT\nFrom:sub.example.org SKIP\n"
        "Connect:ok.example.org SKIP\n",
    )
    assert action(t.connect("10.2.3.4", None)) == "REJECT"
    assert t.connect("10.1.3.4", None) is None
    assert t.sender("x", "sub.example.org") is None
    assert t.sender("x", "a.sub.example.org") is None
    assert action(t.sender("x", "other.example.org")) == "REJECT"
    # A SKIP for the name still lets the IP be looked up (a separate search).
    assert action(t.connect("10.2.3.4", "ok.example.org")) == "REJECT"
    assert t.connect("192.0.2.1", "ok.example.org") is None


# -- senders and recipients ---------------------------------------------------------------


def test_sender_lookup_order(tmp_path: Path) -> None:
    t = table(
        tmp_path,
        "From:example.org REJECT\n"
        "From:okuser@example.org OK\n"
        "From:baduser@ REJECT\n"
        "From:blocked@example.net ERROR:5.7.0:550 Sender blocked here\n"
        "spammer.example DISCARD\n"
        "From:<> ERROR:5.7.1:550 No bounces here\n",
    )
    assert action(t.sender("x", "example.org")) == "REJECT"
    assert action(t.sender("x", "sub.example.org")) == "REJECT"
    assert action(t.sender("OkUser", "Example.ORG")) == "OK"
    assert action(t.sender("baduser", "example.net")) == "REJECT"
    v = t.sender("blocked", "example.net")
    assert v is not None and v.error == ErrorValue(550, "5.7.0", "Sender blocked here")
    assert action(t.sender("x", "mx.spammer.example")) == "DISCARD"
    assert t.sender("x", "example.net") is None
    v = t.sender("", "")
    assert v is not None and v.error is not None and v.error.text == "No bounces here"


def test_sender_with_literal_domain(tmp_path: Path) -> None:
    t = table(tmp_path, "From:[192.0.2.1] REJECT\n198.51.100 DISCARD\n")
    assert action(t.sender("a", "[192.0.2.1]")) == "REJECT"
    assert action(t.sender("a", "[198.51.100.4]")) == "DISCARD"
    assert t.sender("a", "[203.0.113.1]") is None


def test_recipient_lookup(tmp_path: Path) -> None:
    t = table(
        tmp_path, "To:victim@targetdomain1.com REJECT\nTo:spam.example DISCARD\nTo:gone@ REJECT\n"
    )
    assert action(t.recipient("victim", "targetdomain1.com", is_local=False)) == "REJECT"
    assert action(t.recipient("x", "a.spam.example", is_local=False)) == "DISCARD"
    assert t.recipient("other", "targetdomain1.com", is_local=False) is None
    # user@ only for our own domains and unqualified recipients, as Sendmail's rules ask it
    assert t.recipient("gone", "targetdomain1.com", is_local=False) is None
    assert action(t.recipient("gone", "gateway.example.com", is_local=True)) == "REJECT"
    assert action(t.recipient("gone", "", is_local=True)) == "REJECT"
    # A To: REJECT is not relay permission.
    assert not t.recipient_domain_relay("spam.example", False)


def test_tags_do_not_leak(tmp_path: Path) -> None:
    t = table(tmp_path, "From:example.com REJECT\nTo:example.net RELAY\nConnect:10 REJECT\n")
    assert t.connect("198.51.100.1", "example.com") is None
    assert t.sender("a", "example.net") is None
    assert t.recipient("a", "example.com", is_local=False) is None
    assert t.sender("a", "[10.0.0.1]") is None
    assert not t.client_relay("198.51.100.1", "example.net", False)


def test_untagged_serves_every_check(tmp_path: Path) -> None:
    t = table(tmp_path, "example.com RELAY\n")
    assert t.recipient_domain_relay("example.com", True)
    assert t.client_relay("192.0.2.1", "example.com", True)
    assert action(t.sender("a", "example.com")) == "RELAY"


# -- GreetPause -------------------------------------------------------------------------


def test_greet_pause(tmp_path: Path) -> None:
    t = table(
        tmp_path,
        "GreetPause:192.0.2.7 0\nGreetPause:192.0.2.8 1500\nGreetPause:10 250\n"
        "GreetPause:slow.example 9000\n192.0.2.9 OK\n",
    )
    assert t.greet_pause("192.0.2.7", None) == 0
    assert t.greet_pause("192.0.2.8", None) == 1500
    assert t.greet_pause("10.4.4.4", None) == 250
    assert t.greet_pause("198.51.100.1", "mx.slow.example") == 9000
    assert t.greet_pause("192.0.2.9", None) is None  # untagged entries do not apply
    assert t.greet_pause("198.51.100.1", None) is None
    v = next(v for _, _, v in t.entries("greetpause") if v.key == "GreetPause:192.0.2.8")
    assert v.value == 1500 and v.action == "PAUSE"


def test_entries_by_tag(tmp_path: Path) -> None:
    t = table(tmp_path, "To:a.example RELAY\nTo:b.example REJECT\nc.example RELAY\n")
    assert [(k, v.action) for _, k, v in t.entries("to")] == [
        ("a.example", "RELAY"),
        ("b.example", "REJECT"),
    ]
    assert [(k, v.action) for _, k, v in t.entries("")] == [("c.example", "RELAY")]
    # What the relay check makes of them.
    assert t.recipient_domain_relay("a.example", exact_names=True)
    assert not t.recipient_domain_relay("b.example", exact_names=True)
    assert t.recipient_domain_relay("c.example", exact_names=True)


# -- size -------------------------------------------------------------------------------


def test_big_table_loads(tmp_path: Path) -> None:
    rng = random.Random(7)
    p = tmp_path / "access"
    expected: dict[str, str] = {}
    with p.open("w") as f:
        for i in range(200_000):
            ip = ".".join(str(rng.randrange(256)) for _ in range(4))
            act = ("REJECT", "RELAY", "OK", "DISCARD")[i % 4]
            if ip not in expected:
                expected[ip] = act
            f.write(f"Connect:{ip}\t{act}\n")
            if i % 10 == 0:
                f.write(f"From:user{i}@example{i}.com ERROR:5.7.1:550 Go away\n")
    t = AccessTable.load(p)
    assert len(t) == len(expected) + 20_000
    sample = rng.sample(sorted(expected), 2000)
    for ip in sample:
        assert action(t.connect(ip, None)) == expected[ip]
    v = t.sender("user190", "example190.com")
    assert v is not None and v.error == ErrorValue(550, "5.7.1", "Go away")
