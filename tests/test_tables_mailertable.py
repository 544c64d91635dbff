"""mailertable (semantics §5, §18.1, §18.3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate.tables.mailertable import MailerRoute, MailerTable, NextHop, parse_mailer_value
from mailgate.tables.maps import ErrorValue, TableError

EXAMPLES = Path(__file__).parent / "data" / "sendmail-examples"


def table(tmp_path: Path, text: str) -> MailerTable:
    p = tmp_path / "mailertable"
    p.write_text(text)
    return MailerTable.load(p)


def hops(route: MailerRoute | None) -> list[str]:
    assert route is not None
    return [str(h) for h in route.hops]


def test_examples_file() -> None:
    t = MailerTable.load(EXAMPLES / "mailertable")
    r = t.lookup("targetdomain1.com")
    assert r == MailerRoute(
        "smtp", (NextHop("targethost1.example.com", None, True),), None, None,
        "targetdomain1.com", 1,
    )  # fmt: skip
    r = t.lookup("targetdomain2.com")
    assert r is not None and r.hops == (NextHop("targethost2.test.net", None, True),)
    r = t.lookup("TargetDomain3.COM.")
    assert r is not None and r.hops == (NextHop("192.168.0.1", None, False),)
    # Only exact keys: subdomains fall through to MX delivery.
    assert t.lookup("sub.targetdomain3.com") is None
    assert t.lookup("example.net") is None


def test_order_exact_leading_dot_default(tmp_path: Path) -> None:
    t = table(
        tmp_path,
        ".example.org relay:[192.0.2.11]\n"
        "a.example.org esmtp:a-host.example\n"
        ".deep.example.org smtp:deep.example\n"
        ". smtp:[smarthost.example]\n",
    )
    r = t.lookup("x.example.org")
    assert r is not None and r.mailer == "relay" and hops(r) == ["[192.0.2.11]"]
    assert hops(t.lookup("a.example.org")) == ["a-host.example"]
    assert hops(t.lookup("b.a.example.org")) == ["[192.0.2.11]"]
    assert hops(t.lookup("x.deep.example.org")) == ["deep.example"]
    # A leading-dot key matches proper subdomains only: example.org itself goes to ".".
    assert hops(t.lookup("example.org")) == ["[smarthost.example]"]
    assert hops(t.lookup("anything.example")) == ["[smarthost.example]"]


def test_no_default(tmp_path: Path) -> None:
    t = table(tmp_path, ".example.org relay:[192.0.2.11]\ntargetdomain3.com smtp:h.example\n")
    assert t.lookup("example.org") is None
    assert t.lookup("sub.targetdomain3.com") is None
    assert t.lookup("") is None


def test_case_and_trailing_dot_of_keys(tmp_path: Path) -> None:
    t = table(tmp_path, "TargetDomain1.COM. smtp:Host.Example.\n.Sub.Example. esmtp:h2.example\n")
    r = t.lookup("targetdomain1.com")
    assert r is not None and r.hops == (NextHop("host.example", None, True),)
    assert hops(t.lookup("x.SUB.example.")) == ["h2.example"]


def test_percent_one(tmp_path: Path) -> None:
    t = table(
        tmp_path,
        ".my.example.com smtp:%1.my.example.com\n"
        "pct.example.com smtp:%1.relay.example.com\n"
        ". smtp:[%1.fallback.example]\n",
    )
    assert hops(t.lookup("a.my.example.com")) == ["a.my.example.com"]
    assert hops(t.lookup("b.a.my.example.com")) == ["b.a.my.example.com"]
    # Exact match: %1 is empty, as Sendmail gives ".relay.example.com".
    assert hops(t.lookup("pct.example.com")) == [".relay.example.com"]
    assert hops(t.lookup("z.example")) == ["[z.example.fallback.example]"]


@pytest.mark.parametrize(
    ("value", "mailer", "expected"),
    [
        ("smtp:hosta.example.com:hostb.example.com", "smtp",
         [NextHop("hosta.example.com", None, True), NextHop("hostb.example.com", None, True)]),
        ("smtp:[192.0.2.33]:2525", "smtp", [NextHop("192.0.2.33", 2525, False)]),
        ("esmtp:mx.example:2525:[backup.example]", "esmtp",
         [NextHop("mx.example", 2525, True), NextHop("backup.example", None, False)]),
        ("smtp8:[IPv6:2001:DB8::25]", "smtp8", [NextHop("2001:db8::25", None, False)]),
        ("dsmtp:[IPv6:2001:db8::25]:587", "dsmtp", [NextHop("2001:db8::25", 587, False)]),
        ("RELAY:[smart.example]", "relay", [NextHop("smart.example", None, False)]),
    ],
)  # fmt: skip
def test_smtp_values(value: str, mailer: str, expected: list[NextHop]) -> None:
    r = parse_mailer_value(value)
    assert r.mailer == mailer
    assert list(r.hops) == expected
    assert r.user is None and r.error is None


def test_nexthop_str() -> None:
    assert str(NextHop("2001:db8::25", 587, False)) == "[IPv6:2001:db8::25]:587"
    assert str(NextHop("mx.example", None, True)) == "mx.example"


def test_local_and_error_values() -> None:
    assert parse_mailer_value("local:bob").user == "bob"
    r = parse_mailer_value("local:")
    assert r.mailer == "local" and r.user is None and r.hops == ()
    r = parse_mailer_value("error:5.7.1:550 Mail for this domain is refused")
    assert r.error == ErrorValue(550, "5.7.1", "Mail for this domain is refused")
    r = parse_mailer_value("error:4.3.0:451 Try again later")
    assert r.error == ErrorValue(451, "4.3.0", "Try again later")
    # The misparse Sendmail shows: 553 5.3.0 with the whole text, and no keyword in a
    # mailertable (sendmail -bv exits 69, EX_UNAVAILABLE, for both of these).
    r = parse_mailer_value("error:nouser No such domain here")
    assert r.error == ErrorValue(553, "5.3.0", "nouser No such domain here", exit=69)
    r = parse_mailer_value("error:unavailable 550 Not here")
    assert r.error == ErrorValue(553, "5.3.0", "unavailable 550 Not here", exit=69)
    # A DSN given: the status is dsntoexitstat's, none set here.
    assert parse_mailer_value("error:5.1.1:550 Gone").error == ErrorValue(550, "5.1.1", "Gone")


@pytest.mark.parametrize(
    "mailer", ["uucp", "uucp-old", "suucp", "uucp-new", "uucp-dom", "UUCP-Dom", "uucp-uudom"]
)
def test_uucp_mailers(tmp_path: Path, mailer: str) -> None:
    # MAILER(uucp) of the sendmail.mc we replace: the UUCP neighbour as written (F=h keeps
    # its case), no MX, no port; %1 as in any host.
    t = table(tmp_path, f"uucpdomain.example {mailer}:UUhost\n.uucp.example {mailer}:%1\n")
    assert t.lookup("uucpdomain.example") == MailerRoute(
        mailer.lower(), (NextHop("UUhost", None, True),), None, None, "uucpdomain.example", 1
    )
    r = t.lookup("neighbour.uucp.example")
    assert r is not None and r.hops == (NextHop("neighbour", None, True),)


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("example.com smtp:", "needs a host"),
        ("example.com smtp:a.example::b.example", "empty host"),
        ("example.com smtp:a.example:70000", "out of range"),
        ("example.com smtp:a.example:0", "out of range"),
        ("example.com smtp:25:a.example", "does not follow a host"),
        ("example.com smtp:a.example:25:26", "does not follow a host"),
        ("example.com smtp:[192.0.2.1", "unbalanced"),
        ("example.com smtp:[IPv6:zz::1]", "not a valid IPv6"),
        ("example.com smtp:[300.1.1.1]", "not a valid IPv4"),
        ("example.com smtp:bad_host!.example", "not a valid host"),
        ("example.com uucp-dom:", "uucp-dom: needs a host"),
        ("example.com uucp:[192.0.2.1]", "a UUCP host is a node name, not an address"),
        ("example.com uucp-new:hosta:hostb", "takes one UUCP host, not a list or a port"),
        ("example.com suucp:-oops", "'-oops' is not a UUCP node name"),
        ("example.com uucp-uudom:a!b", "'a!b' is not a UUCP node name"),
        ("example.com procmail:/etc/procmailrc", "unknown mailer"),
        ("example.com targethost.example", "has no mailer"),
        ("example.com error:5.7.1:450 mismatch", "does not match"),
        ("exa mple", "has no mailer"),
        ("a..b smtp:x.example", "not a domain"),
        ("user@example.com smtp:x.example", "not a domain"),
        ("example.com", "no value"),
    ],
)
def test_bad_lines(tmp_path: Path, line: str, fragment: str) -> None:
    with pytest.raises(TableError) as info:
        table(tmp_path, f"ok.example smtp:h.example\n\n{line}\n")
    assert info.value.line == 3
    assert fragment in info.value.message
    assert str(info.value).startswith(f"{tmp_path / 'mailertable'}:3: ")


def test_duplicates_and_literal_keys_warn(tmp_path: Path) -> None:
    t = table(
        tmp_path,
        "a.example smtp:one.example\nA.Example. smtp:two.example\n[192.0.2.1] smtp:x.example\n",
    )
    assert hops(t.lookup("a.example")) == ["one.example"]
    assert [w.line for w in t.warnings] == [2, 3]
    assert "duplicate" in t.warnings[0].message
    assert "address literals bypass" in t.warnings[1].message
    assert len(t) == 1
    assert [e.line for e in t.entries] == [1]


def test_missing_file(tmp_path: Path) -> None:
    assert len(MailerTable.load(tmp_path / "none")) == 0
    assert MailerTable.load(None).lookup("x.example") is None
