"""Recipient routing over real table files (semantics §1, §2, §5–§8, §12, §18.1, §18.3).

Every test writes Sendmail-format tables into ``tmp_path``, builds the snapshot the daemon would
build (``build_snapshot``) and resolves normalised recipients. Local users are folders under the
maildir root (``alice``, ``bob``) or system accounts (``root``).
"""

from __future__ import annotations

import os
import pwd
import textwrap
from pathlib import Path

import pytest

from mailgate.address import Mailbox, normalize
from mailgate.routing import MAX_DEPTH, Route, resolve
from mailgate.snapshot import Snapshot
from mailgate.tables import load_tables
from mailgate.tables.mailertable import NextHop
from mailgate.tables.maps import ErrorValue
from tests.support.world import World

HOST = "gateway.example.com"
LISTEN_IP = "192.0.2.1"


def snapshot(
    tmp_path: Path,
    tables: dict[str, str] | None = None,
    *,
    users: tuple[str, ...] = ("alice", "bob"),
    relay_hosts_only: bool = True,
) -> Snapshot:
    """Tables in ``tmp_path/tables``, maildirs in ``tmp_path/maildir``; the daemon's snapshot."""
    snap = World(
        hostname=HOST,
        tables={name: textwrap.dedent(text).lstrip("\n") for name, text in (tables or {}).items()},
        settings=f"relay_hosts_only = {str(relay_hosts_only).lower()}\n",  # listens on LISTEN_IP
        users=users,
    ).snapshot(tmp_path)
    # The snapshot holds exactly what load_tables reads from the directory.
    direct = load_tables(tmp_path / "tables")
    assert snap.tables.local_names == direct.local_names
    assert len(snap.tables.mailertable) == len(direct.mailertable)
    return snap


def route(snap: Snapshot, addr: str, *, expand: bool = True) -> list[Route]:
    ctx = snap.routing
    return resolve(normalize(addr, ctx.is_local), ctx, expand=expand)


def brief(routes: list[Route]) -> list[tuple[str, str, str]]:
    """(mailer, address, host) of each route: the ``-bt`` triple."""
    return [(r.mailer, r.address, r.host) for r in routes]


def one(snap: Snapshot, addr: str, *, expand: bool = True) -> Route:
    routes = route(snap, addr, expand=expand)
    assert len(routes) == 1, brief(routes)
    return routes[0]


def error_of(snap: Snapshot, addr: str) -> ErrorValue:
    r = one(snap, addr)
    assert r.mailer == "error", brief([r])
    assert r.error is not None
    return r.error


USER_UNKNOWN = ErrorValue(550, "5.1.1", "User unknown")


# -- no mailertable entry: esmtp to the domain's MX (§5) --------------------------------------


def test_no_tables_routes_remote_domain_by_mx(tmp_path: Path) -> None:
    r = one(snapshot(tmp_path), "carol@example.net")
    assert (r.mailer, r.address, r.host) == ("esmtp", "carol@example.net", "example.net")
    assert r.hops == (NextHop("example.net", None, True),)
    assert r.is_smtp


def test_recipient_domain_case_and_trailing_dot_are_canonical(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, {"mailertable": "targetdomain1.com smtp:targethost1.example.com\n"})
    r = one(snap, "u@TargetDomain1.COM.")
    assert brief([r]) == [("smtp", "u@targetdomain1.com", "targethost1.example.com")]


# -- mailertable keys (§5) -------------------------------------------------------------------

MAILERTABLE = """
    targetdomain1.com        smtp:targethost1.example.com
    targetdomain2.com        esmtp:targethost2.test.net
    targetdomain3.com        smtp:[192.168.0.1]
    .example.org             relay:[192.0.2.11]
    .deep.example.org        smtp:[192.0.2.12]
"""


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("u@targetdomain1.com", ("smtp", "u@targetdomain1.com", "targethost1.example.com")),
        ("u@targetdomain2.com", ("esmtp", "u@targetdomain2.com", "targethost2.test.net")),
        ("u@targetdomain3.com", ("smtp", "u@targetdomain3.com", "[192.168.0.1]")),
        # Exact keys do not cover subdomains: no "." entry, so MX of the subdomain.
        ("u@sub.targetdomain3.com", ("esmtp", "u@sub.targetdomain3.com", "sub.targetdomain3.com")),
        # A leading-dot key matches proper subdomains only.
        ("x@a.example.org", ("relay", "x@a.example.org", "[192.0.2.11]")),
        ("x@b.a.example.org", ("relay", "x@b.a.example.org", "[192.0.2.11]")),
        ("x@example.org", ("esmtp", "x@example.org", "example.org")),
        # The longest leading-dot key wins; its own apex falls back to the shorter one.
        ("x@a.deep.example.org", ("smtp", "x@a.deep.example.org", "[192.0.2.12]")),
        ("x@deep.example.org", ("relay", "x@deep.example.org", "[192.0.2.11]")),
        # Not a subdomain, merely a longer name.
        ("x@notexample.org", ("esmtp", "x@notexample.org", "notexample.org")),
        ("x@xtargetdomain1.com", ("esmtp", "x@xtargetdomain1.com", "xtargetdomain1.com")),
    ],
)
def test_mailertable_lookup_order(tmp_path: Path, addr: str, expected: tuple[str, ...]) -> None:
    snap = snapshot(tmp_path, {"mailertable": MAILERTABLE})
    assert brief(route(snap, addr)) == [expected]


def test_mailertable_default_dot_catches_the_rest(tmp_path: Path) -> None:
    snap = snapshot(
        tmp_path,
        {
            "mailertable": """
                targetdomain3.com   smtp:[192.168.0.1]
                .                   relay:[192.0.2.99]
            """
        },
    )
    assert brief(route(snap, "u@targetdomain3.com")) == [
        ("smtp", "u@targetdomain3.com", "[192.168.0.1]")
    ]
    assert brief(route(snap, "u@sub.targetdomain3.com")) == [
        ("relay", "u@sub.targetdomain3.com", "[192.0.2.99]")
    ]
    assert brief(route(snap, "u@example.net")) == [("relay", "u@example.net", "[192.0.2.99]")]


def test_mailertable_keys_case_and_trailing_dot_ignored(tmp_path: Path) -> None:
    snap = snapshot(
        tmp_path,
        {
            "mailertable": """
                TargetDomain1.COM.     smtp:TargetHost1.Example.COM
                .Sub.Example.NET.      smtp:[192.0.2.40]
            """
        },
    )
    assert brief(route(snap, "u@targetdomain1.com")) == [
        ("smtp", "u@targetdomain1.com", "targethost1.example.com")
    ]
    assert brief(route(snap, "u@a.sub.example.net")) == [
        ("smtp", "u@a.sub.example.net", "[192.0.2.40]")
    ]
    assert brief(route(snap, "u@sub.example.net")) == [
        ("esmtp", "u@sub.example.net", "sub.example.net")
    ]


def test_mailertable_pct1_is_the_uncovered_host_part(tmp_path: Path) -> None:
    snap = snapshot(
        tmp_path,
        {
            "mailertable": """
                .my.example.com     smtp:%1.my.example.com
                pct.example.com     smtp:%1.relay.example.com
            """
        },
    )
    assert one(snap, "u@a.my.example.com").host == "a.my.example.com"
    assert one(snap, "u@b.a.my.example.com").host == "b.a.my.example.com"
    # An exact match leaves %1 empty.
    assert one(snap, "u@pct.example.com").host == ".relay.example.com"
    assert one(snap, "u@pct.example.com").address == "u@pct.example.com"


def test_mailertable_bracketed_hosts_skip_mx(tmp_path: Path) -> None:
    snap = snapshot(
        tmp_path,
        {
            "mailertable": """
                v4.example          smtp:[192.0.2.33]
                v6.example          smtp:[IPv6:2001:DB8::25]
                name.example        smtp:[mx.name.example]
                plain.example       smtp:mx.plain.example
            """
        },
    )
    assert one(snap, "u@v4.example").hops == (NextHop("192.0.2.33", None, False),)
    assert one(snap, "u@v6.example").hops == (NextHop("2001:db8::25", None, False),)
    assert one(snap, "u@name.example").hops == (NextHop("mx.name.example", None, False),)
    assert one(snap, "u@name.example").host == "[mx.name.example]"
    assert one(snap, "u@plain.example").hops == (NextHop("mx.plain.example", None, True),)


def test_mailertable_port_extension(tmp_path: Path) -> None:
    """§18.1: a purely numeric item after a host is that host's port."""
    snap = snapshot(
        tmp_path,
        {
            "mailertable": """
                port.example        smtp:[192.0.2.33]:2525
                named.example       esmtp:mx.named.example:2526
                mixed.example       smtp:[192.0.2.33]:2525:backup.example.com
            """
        },
    )
    r = one(snap, "u@port.example")
    assert r.hops == (NextHop("192.0.2.33", 2525, False),)
    assert r.host == "[192.0.2.33]:2525"
    assert one(snap, "u@named.example").hops == (NextHop("mx.named.example", 2526, True),)
    assert one(snap, "u@mixed.example").hops == (
        NextHop("192.0.2.33", 2525, False),
        NextHop("backup.example.com", None, True),
    )


def test_mailertable_fallback_host_list(tmp_path: Path) -> None:
    snap = snapshot(
        tmp_path,
        {"mailertable": "fb.example smtp:hosta.example.com:hostb.example.com:[192.0.2.7]\n"},
    )
    r = one(snap, "u@fb.example")
    assert r.hops == (
        NextHop("hosta.example.com", None, True),
        NextHop("hostb.example.com", None, True),
        NextHop("192.0.2.7", None, False),
    )
    assert r.host == "hosta.example.com:hostb.example.com:[192.0.2.7]"
    assert r.address == "u@fb.example"


def test_mailertable_local_user(tmp_path: Path) -> None:
    snap = snapshot(
        tmp_path,
        {
            "mailertable": """
                example.org         local:alice
                nobody.example      local:ghost
            """
        },
    )
    r = one(snap, "x@example.org")
    assert (r.mailer, r.address) == ("local", "alice")
    assert error_of(snap, "x@nobody.example") == USER_UNKNOWN


def test_mailertable_local_keeps_local_part(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, {"mailertable": "example.org local:\n"})
    r = one(snap, "bob@example.org")
    assert (r.mailer, r.address) == ("local", "bob")
    assert error_of(snap, "x@example.org") == USER_UNKNOWN


def test_mailertable_local_goes_through_aliases(tmp_path: Path) -> None:
    snap = snapshot(
        tmp_path,
        {
            "mailertable": """
                example.org         local:
                list.example.org    local:staff
            """,
            "aliases": "info: alice\nstaff: alice, bob\n",
        },
    )
    assert brief(route(snap, "info@example.org")) == [("local", "alice", "")]
    assert brief(route(snap, "x@list.example.org")) == [
        ("local", "alice", ""),
        ("local", "bob", ""),
    ]


@pytest.mark.parametrize(
    ("value", "addr", "expected"),
    [
        (
            "error:5.7.1:550 Mail for this domain is refused",
            "x@example.org",
            ErrorValue(550, "5.7.1", "Mail for this domain is refused"),
        ),
        (
            "error:4.3.0:451 Try again later",
            "x@example.org",
            ErrorValue(451, "4.3.0", "Try again later"),
        ),
        (
            "error:nouser No such domain here",
            "x@example.org",
            ErrorValue(553, "5.3.0", "nouser No such domain here", exit=69),
        ),
    ],
)
def test_mailertable_error_values(
    tmp_path: Path, value: str, addr: str, expected: ErrorValue
) -> None:
    snap = snapshot(tmp_path, {"mailertable": f"example.org {value}\n"})
    r = one(snap, addr)
    assert r.mailer == "error"
    assert r.error == expected
    assert not r.is_smtp


# -- address literals (§1) ----------------------------------------------------------------------


def test_address_literals_bypass_mailertable_even_dot(tmp_path: Path) -> None:
    snap = snapshot(
        tmp_path,
        {
            "mailertable": """
                .           relay:[192.0.2.99]
            """
        },
    )
    r = one(snap, "u@[192.0.2.98]")
    assert (r.mailer, r.address, r.host) == ("esmtp", "u@[192.0.2.98]", "[192.0.2.98]")
    assert r.hops == (NextHop("192.0.2.98", None, False),)
    r6 = one(snap, "u@[IPv6:2001:DB8::1]")
    assert r6.mailer == "esmtp"
    assert r6.address == "u@[ipv6:2001:db8::1]"
    assert r6.hops == (NextHop("2001:db8::1", None, False),)
    # And a host name still takes the "." default.
    assert one(snap, "u@example.net").mailer == "relay"


def test_ipv6_literal_route_host_keeps_tag(tmp_path: Path) -> None:
    snap = snapshot(tmp_path)
    assert one(snap, "u@[IPv6:2001:db8::1]").host == "[ipv6:2001:db8::1]"


def test_our_own_address_literals_are_local(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, {"mailertable": ". relay:[192.0.2.99]\n"})
    assert brief(route(snap, f"alice@[{LISTEN_IP}]")) == [("local", "alice", "")]
    assert brief(route(snap, "alice@[127.0.0.1]")) == [("local", "alice", "")]
    assert brief(route(snap, "u@[192.0.2.2]")) == [("esmtp", "u@[192.0.2.2]", "[192.0.2.2]")]


# -- local domains never consult the mailertable (§2, §18.3) --------------------------------


LOCAL_AND_MAILERTABLE = {
    "local-host-names": """
        # the guide's set-up: these names are both local and in mailertable
        targetdomain1.com
        Virt.Example.COM.
    """,
    "mailertable": f"""
        targetdomain1.com       smtp:targethost1.example.com
        virt.example.com        error:5.7.1:550 never used
        {HOST}                  error:5.7.1:550 never used
        localhost               error:5.7.1:550 never used
        .example.com            relay:[192.0.2.50]
        .                       relay:[192.0.2.99]
    """,
}


@pytest.mark.parametrize(
    "domain",
    ["targetdomain1.com", "virt.example.com", HOST, "gateway", "localhost", "LOCALHOST"],
)
def test_local_domains_ignore_mailertable(tmp_path: Path, domain: str) -> None:
    snap = snapshot(tmp_path, LOCAL_AND_MAILERTABLE)
    assert brief(route(snap, f"alice@{domain}")) == [("local", "alice", "")]
    assert error_of(snap, f"ghost@{domain}") == USER_UNKNOWN


def test_class_w_is_exact_names_only(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, LOCAL_AND_MAILERTABLE)
    # A subdomain of a local name is not local; here ".example.com" routes it.
    assert brief(route(snap, "alice@sub.virt.example.com")) == [
        ("relay", "alice@sub.virt.example.com", "[192.0.2.50]")
    ]
    assert brief(route(snap, "alice@sub.targetdomain1.com")) == [
        ("relay", "alice@sub.targetdomain1.com", "[192.0.2.99]")
    ]


def test_unqualified_recipient_is_local(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, {"mailertable": ". relay:[192.0.2.99]\n"})
    assert brief(route(snap, "alice")) == [("local", "alice", "")]
    assert brief(route(snap, "postmaster")) == [("local", "root", "")]


def test_quoted_local_parts(tmp_path: Path) -> None:
    snap = snapshot(tmp_path)
    assert error_of(snap, f'"john doe"@{HOST}') == USER_UNKNOWN
    assert brief(route(snap, f'"root"@{HOST}')) == [("local", "root", "")]
    assert brief(route(snap, '"john doe"@targetdomain1.com')) == [
        ("esmtp", '"john doe"@targetdomain1.com', "targetdomain1.com")
    ]


# -- %-hack, UUCP and source routes reach routing normalised (§1) -----------------------------


@pytest.mark.parametrize(
    ("written", "address"),
    [
        (f"user%targetdomain1.com@{HOST}", "user@targetdomain1.com"),
        ("targetdomain1.com!user", "user@targetdomain1.com"),
        ("@example.net:user@targetdomain1.com", "user@targetdomain1.com"),
        ("@a.example,@b.example:user@targetdomain1.com", "user@targetdomain1.com"),
    ],
)
def test_routing_forms_normalised(tmp_path: Path, written: str, address: str) -> None:
    snap = snapshot(tmp_path, {"mailertable": "targetdomain1.com smtp:targethost1.example.com\n"})
    assert brief(route(snap, written)) == [("smtp", address, "targethost1.example.com")]


# -- domaintable (§7) ------------------------------------------------------------------------


def test_domaintable_rewrites_before_mailertable(tmp_path: Path) -> None:
    snap = snapshot(
        tmp_path,
        {
            "domaintable": """
                OldDomain.Example.COM   targetdomain1.com
                oldlocal.example        gateway.example.com
            """,
            "mailertable": """
                targetdomain1.com       smtp:targethost1.example.com
                olddomain.example.com   error:5.7.1:550 never used
            """,
        },
    )
    assert brief(route(snap, "u@olddomain.example.com")) == [
        ("smtp", "u@targetdomain1.com", "targethost1.example.com")
    ]
    assert brief(route(snap, "u@OLDDOMAIN.example.com.")) == [
        ("smtp", "u@targetdomain1.com", "targethost1.example.com")
    ]
    # Rewritten into a local domain: local delivery.
    assert brief(route(snap, "alice@oldlocal.example")) == [("local", "alice", "")]
    # Only the whole host part is replaced: no parent matching.
    assert brief(route(snap, "u@sub.olddomain.example.com")) == [
        ("esmtp", "u@sub.olddomain.example.com", "sub.olddomain.example.com")
    ]


def test_domaintable_applies_once(tmp_path: Path) -> None:
    snap = snapshot(
        tmp_path,
        {"domaintable": "a.example b.example\nb.example c.example\n"},
    )
    assert one(snap, "u@a.example").address == "u@b.example"


# -- virtusertable (§6) -----------------------------------------------------------------------

VIRT_LHN = {"local-host-names": "virt.example.com\n"}


def virt(tmp_path: Path, lines: str, **extra: str) -> Snapshot:
    return snapshot(tmp_path, {**VIRT_LHN, "virtusertable": lines, **extra})


ALL_KEYS = """
    user+detail@virt.example.com    k1@targetdomain1.com
    user++@virt.example.com         k2@targetdomain1.com
    user+*@virt.example.com         k3@targetdomain1.com
    user@virt.example.com           k4@targetdomain1.com
    +*@virt.example.com             k5@targetdomain1.com
    @virt.example.com               k6@targetdomain1.com
"""


def _drop(text: str, *prefixes: str) -> str:
    return "\n".join(
        line for line in textwrap.dedent(text).splitlines() if not line.startswith(prefixes)
    )


@pytest.mark.parametrize(
    ("dropped", "addr", "target"),
    [
        ((), "user+detail@virt.example.com", "k1"),
        (("user+detail@",), "user+detail@virt.example.com", "k2"),
        (("user+detail@", "user++@"), "user+detail@virt.example.com", "k3"),
        (("user+detail@", "user++@", "user+*@"), "user+detail@virt.example.com", "k4"),
        (("user+detail@", "user++@", "user+*@", "user@"), "user+detail@virt.example.com", "k5"),
        (
            ("user+detail@", "user++@", "user+*@", "user@", "+*@"),
            "user+detail@virt.example.com",
            "k6",
        ),
        # "user++" only for a non-empty detail.
        ((), "user+@virt.example.com", "k3"),
        # Without detail: user@dom, then @dom.
        ((), "user@virt.example.com", "k4"),
        (("user@",), "user@virt.example.com", "k6"),
        ((), "other@virt.example.com", "k6"),
        # Keys are case-insensitive.
        ((), "USER+Detail@Virt.Example.COM", "k1"),
    ],
)
def test_virtusertable_order(
    tmp_path: Path, dropped: tuple[str, ...], addr: str, target: str
) -> None:
    snap = virt(tmp_path, _drop(ALL_KEYS, *dropped))
    r = one(snap, addr)
    assert (r.mailer, r.address) == ("esmtp", f"{target}@targetdomain1.com")


def test_virtusertable_percent_arguments(tmp_path: Path) -> None:
    snap = virt(
        tmp_path,
        """
        user+*@virt.example.com     %1@targetdomain1.com
        det+*@virt.example.com      %1-%2@targetdomain1.com
        @virt.example.com           %1@targetdomain2.com
        @keep.example.com           %1%3@targetdomain2.com
        """,
        **{"local-host-names": "virt.example.com\nkeep.example.com\n"},
    )
    assert one(snap, "user+tag@virt.example.com").address == "user@targetdomain1.com"
    assert one(snap, "det+tag@virt.example.com").address == "det-tag@targetdomain1.com"
    # No own entry: the catch-all, losing the detail.
    assert one(snap, "bob+tag@virt.example.com").address == "bob@targetdomain2.com"
    assert one(snap, "anyone@virt.example.com").address == "anyone@targetdomain2.com"
    # %1%3 keeps it.
    assert one(snap, "bob+tag@keep.example.com").address == "bob+tag@targetdomain2.com"
    assert one(snap, "bob@keep.example.com").address == "bob@targetdomain2.com"


def test_virtusertable_remote_value_is_mailertable_routed(tmp_path: Path) -> None:
    snap = virt(
        tmp_path,
        "@virt.example.com %1@targetdomain2.com\n",
        mailertable="targetdomain2.com smtp:targethost2.test.net\n",
    )
    assert brief(route(snap, "anyone@virt.example.com")) == [
        ("smtp", "anyone@targetdomain2.com", "targethost2.test.net")
    ]


def test_virtusertable_local_user_and_alias(tmp_path: Path) -> None:
    snap = virt(
        tmp_path,
        """
        info@virt.example.com       root
        staff@virt.example.com      team
        me@virt.example.com         alice@gateway.example.com
        """,
        aliases="team: alice, bob\n",
    )
    assert brief(route(snap, "info@virt.example.com")) == [("local", "root", "")]
    assert brief(route(snap, "staff@virt.example.com")) == [
        ("local", "alice", ""),
        ("local", "bob", ""),
    ]
    assert brief(route(snap, "me@virt.example.com")) == [("local", "alice", "")]
    # No entry and no catch-all: aliases, then local users of that name.
    assert brief(route(snap, "bob@virt.example.com")) == [("local", "bob", "")]
    assert error_of(snap, "ghost@virt.example.com") == USER_UNKNOWN


def test_virtusertable_value_without_domain_is_a_local_user(tmp_path: Path) -> None:
    snap = virt(tmp_path, "@virt.example.com %1\n")
    assert brief(route(snap, "alice@virt.example.com")) == [("local", "alice", "")]
    assert error_of(snap, "ghost@virt.example.com") == USER_UNKNOWN


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("error:nouser 550 No such user here", ErrorValue(550, "5.0.0", "No such user here", 67)),
        ("error:5.1.1:550 Gone away", ErrorValue(550, "5.1.1", "Gone away")),
        ("error:4.2.1:450 Mailbox busy", ErrorValue(450, "4.2.1", "Mailbox busy")),
    ],
)
def test_virtusertable_error(tmp_path: Path, value: str, expected: ErrorValue) -> None:
    snap = virt(tmp_path, f"sales@virt.example.com {value}\n")
    assert error_of(snap, "sales@virt.example.com") == expected


def test_virtusertable_only_for_local_domains(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, {"virtusertable": "@notlocal.example.com alice\n"})
    assert brief(route(snap, "x@notlocal.example.com")) == [
        ("esmtp", "x@notlocal.example.com", "notlocal.example.com")
    ]


def test_virtusertable_loop_is_bounded(tmp_path: Path) -> None:
    snap = snapshot(
        tmp_path,
        {
            "local-host-names": "a.example\nb.example\n",
            "virtusertable": "@a.example %1@b.example\n@b.example %1@a.example\n",
        },
    )
    routes = route(snap, "u@a.example")
    assert routes
    assert all(r.mailer == "error" for r in routes), brief(routes)
    assert routes[0].error is not None
    assert (routes[0].error.code, routes[0].error.dsn) == (554, "5.4.6")  # too many levels


# -- aliases (§8) -----------------------------------------------------------------------------


def test_aliases_fan_out(tmp_path: Path) -> None:
    snap = snapshot(
        tmp_path,
        {
            "aliases": """
                # staff list
                Staff:      alice,
                            bob, carol@example.net
                fwd:        Carol Remote <carol@targetdomain1.com> (comment)
            """,
            "mailertable": "targetdomain1.com smtp:targethost1.example.com\n",
        },
    )
    assert brief(route(snap, f"staff@{HOST}")) == [
        ("local", "alice", ""),
        ("local", "bob", ""),
        ("esmtp", "carol@example.net", "example.net"),
    ]
    # The left-hand side is case-insensitive.
    assert brief(route(snap, f"STAFF@{HOST}")) == brief(route(snap, f"staff@{HOST}"))
    assert brief(route(snap, f"fwd@{HOST}")) == [
        ("smtp", "carol@targetdomain1.com", "targethost1.example.com")
    ]


def test_alias_quoted_phrase_name_addr(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, {"aliases": 'fwd: "Carol Remote" <carol@example.net>\n'})
    assert brief(route(snap, f"fwd@{HOST}")) == [("esmtp", "carol@example.net", "example.net")]


def test_aliases_programs_and_files(tmp_path: Path) -> None:
    snap = snapshot(
        tmp_path,
        {"aliases": 'pipe: "|/usr/bin/procmail -a list", /var/log/mail.archive, alice\n'},
    )
    assert brief(route(snap, f"pipe@{HOST}")) == [
        ("prog", "/usr/bin/procmail -a list", ""),
        ("*file*", "/var/log/mail.archive", ""),
        ("local", "alice", ""),
    ]


def test_aliases_include(tmp_path: Path) -> None:
    members = tmp_path / "members.list"
    members.write_text("# members\nalice, dave@example.net\nbob\n")
    snap = snapshot(tmp_path, {"aliases": f"list: :include:{members}\n"})
    assert brief(route(snap, f"list@{HOST}")) == [
        ("local", "alice", ""),
        ("esmtp", "dave@example.net", "example.net"),
        ("local", "bob", ""),
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file away")
def test_include_owned_by_unsafe_user_cannot_run_programs(tmp_path: Path) -> None:
    members = tmp_path / "members.list"
    members.write_text('alice, "|/bin/sh -c evil", /tmp/evil.mbox\n')
    nobody = pwd.getpwnam("nobody")
    os.chown(members, nobody.pw_uid, nobody.pw_gid)
    snap = snapshot(tmp_path, {"aliases": f"list: :include:{members}\n"})
    routes = route(snap, f"list@{HOST}")
    assert ("local", "alice", "") in brief(routes)
    assert not [r for r in routes if r.mailer in ("prog", "*file*")], brief(routes)


def test_aliases_missing_include_is_an_error_not_silence(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, {"aliases": f"list: :include:{tmp_path / 'nope.list'}, alice\n"})
    routes = route(snap, f"list@{HOST}")
    assert [r.mailer for r in routes] == ["error", "local"]


def test_aliases_duplicates_suppressed(tmp_path: Path) -> None:
    snap = snapshot(
        tmp_path,
        {
            "aliases": """
                all:    alice, bob, team, alice@gateway.example.com, carol@example.net
                team:   bob, alice, carol@example.net, carol@EXAMPLE.NET
            """
        },
    )
    assert brief(route(snap, f"all@{HOST}")) == [
        ("local", "alice", ""),
        ("local", "bob", ""),
        ("esmtp", "carol@example.net", "example.net"),
    ]


def test_local_users_compare_case_insensitively(tmp_path: Path) -> None:
    snap = snapshot(tmp_path)
    first = one(snap, f"root@{HOST}")
    second = one(snap, "Root@LOCALHOST")
    assert second.target == first.target
    assert brief(route(snap, f"ALICE@{HOST}")) == [("local", "alice", "")]


def test_alias_self_reference_delivers_to_the_account(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, {"aliases": "alice: alice, bob\n"})
    assert brief(route(snap, f"alice@{HOST}")) == [("local", "alice", ""), ("local", "bob", "")]


def test_alias_backslash_user(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, {"aliases": "alice: \\alice, bob\n"})
    assert brief(route(snap, f"alice@{HOST}")) == [("local", "alice", ""), ("local", "bob", "")]


def test_alias_cycle_terminates(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, {"aliases": "a: b, alice\nb: a, bob\n"})
    # a → b → (a: already being expanded), bob; then alice.
    assert brief(route(snap, f"a@{HOST}")) == [("local", "bob", ""), ("local", "alice", "")]
    pure = snapshot(tmp_path / "pure", {"aliases": "a: b\nb: a\n"})
    assert all(r.mailer == "error" for r in route(pure, f"a@{HOST}"))


def test_alias_depth_limit(tmp_path: Path) -> None:
    deep = MAX_DEPTH + 5
    chain = "".join(f"a{i}: a{i + 1}\n" for i in range(deep)) + f"a{deep}: alice\n"
    snap = snapshot(tmp_path, {"aliases": chain})
    routes = route(snap, f"a0@{HOST}")
    assert [r.mailer for r in routes] == ["error"]
    assert routes[0].error is not None
    assert routes[0].error.code == 554
    # A short chain is fine.
    assert brief(route(snap, f"a{deep - 3}@{HOST}")) == [("local", "alice", "")]


def test_unknown_local_user(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, {"aliases": "list: ghost, alice\n"})
    assert error_of(snap, f"ghost@{HOST}") == USER_UNKNOWN
    # Expanded: the bad member is an error route, the good one still delivers.
    routes = route(snap, f"list@{HOST}")
    assert [r.mailer for r in routes] == ["error", "local"]
    assert routes[0].error == USER_UNKNOWN


def test_postmaster_falls_back_to_root(tmp_path: Path) -> None:
    snap = snapshot(tmp_path)
    assert brief(route(snap, f"postmaster@{HOST}")) == [("local", "root", "")]
    assert brief(route(snap, "PostMaster@localhost")) == [("local", "root", "")]
    aliased = snapshot(tmp_path / "b", {"aliases": "postmaster: bob\n"})
    assert brief(route(aliased, f"postmaster@{HOST}")) == [("local", "bob", "")]


def test_postmaster_fallback_follows_root_alias(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, {"aliases": "root: alice\n"})
    assert brief(route(snap, f"postmaster@{HOST}")) == [("local", "alice", "")]


def test_expand_false_returns_alias_route(tmp_path: Path) -> None:
    snap = snapshot(
        tmp_path,
        {
            "aliases": 'list: ghost, "|/bin/true", carol@example.net\n',
            **VIRT_LHN,
            "virtusertable": "staff@virt.example.com list\n",
        },
    )
    for addr in (f"list@{HOST}", "staff@virt.example.com", "LIST"):
        r = one(snap, addr, expand=False)
        assert (r.mailer, r.address.lower()) == ("alias", "list")
    # Plain users and unknown users do not change with expand=False.
    assert brief(route(snap, f"alice@{HOST}", expand=False)) == [("local", "alice", "")]
    assert route(snap, f"ghost@{HOST}", expand=False)[0].error == USER_UNKNOWN


def test_resolve_takes_a_mailbox_directly(tmp_path: Path) -> None:
    snap = snapshot(tmp_path, {"mailertable": ".example.org relay:[192.0.2.11]\n"})
    routes = resolve(Mailbox("x", "a.example.org"), snap.routing)
    assert brief(routes) == [("relay", "x@a.example.org", "[192.0.2.11]")]
    assert routes[0].target == "relay:[192.0.2.11]:x@a.example.org"


# -- remote routes remembered per snapshot ---------------------------------------------------


def test_remote_route_is_worked_out_once_per_snapshot(tmp_path: Path) -> None:
    tables = {
        "mailertable": ".example.org relay:[192.0.2.11]\nlocalish.example local:bob\n",
        "domaintable": "old.example.org new.example.org\n",
    }
    snap = snapshot(tmp_path, tables)
    first = resolve(Mailbox("x", "old.example.org"), snap.routing, expand=False)
    again = resolve(Mailbox("x", "old.example.org"), snap.routing)
    # The RCPT check and the delivery plan share one route object (and its cached target)...
    assert again[0] is first[0]
    assert brief(again) == [("relay", "x@new.example.org", "[192.0.2.11]")]
    # ...and a caller's list is its own.
    again.append(first[0])
    assert len(resolve(Mailbox("x", "old.example.org"), snap.routing)) == 1
    # Local and mailertable-local recipients go through aliases and passwd every time.
    for mb in (Mailbox("alice", HOST), Mailbox("y", "localish.example")):
        assert brief(resolve(mb, snap.routing)) == brief(resolve(mb, snap.routing))
        assert resolve(mb, snap.routing)[0] is not resolve(mb, snap.routing)[0]
    assert set(snap.routing.remote_routes) == {("x", "old.example.org")}
    # A new snapshot (a reload with a changed mailertable) starts afresh.
    (tmp_path / "tables" / "mailertable").write_text(".example.org relay:[192.0.2.12]\n")
    reloaded = snapshot(tmp_path)
    assert brief(resolve(Mailbox("x", "new.example.org"), reloaded.routing))[0][2] == (
        "[192.0.2.12]"
    )


def test_remembered_remote_routes_are_bounded(tmp_path: Path) -> None:
    from mailgate.routing import REMOTE_ROUTES_KEPT

    snap = snapshot(tmp_path)
    for i in range(REMOTE_ROUTES_KEPT + 10):
        resolve(Mailbox(f"u{i}", "far.example.net"), snap.routing)
    assert 0 < len(snap.routing.remote_routes) <= REMOTE_ROUTES_KEPT


def test_plussed_local_users_and_aliases(tmp_path: Path) -> None:
    """Sendmail's plussed users: user+detail is looked up in aliases as itself, then
    user+*, then user; not aliased, it is the account's (a real Sendmail accepts
    root+detail@its name, and virtusertable misses fall to the same)."""
    snap = snapshot(
        tmp_path,
        {
            "aliases": "staff: alice, bob\nbob+*: carol@example.net\nbob+list: alice\n",
            "mailertable": "keep.example local:\n",
        },
    )
    assert brief(route(snap, f"alice+detail@{HOST}")) == [("local", "alice", "")]
    assert brief(route(snap, f"alice+@{HOST}")) == [("local", "alice", "")]
    assert brief(route(snap, "alice+x")) == [("local", "alice", "")]
    assert brief(route(snap, f"staff+x@{HOST}")) == [("local", "alice", ""), ("local", "bob", "")]
    assert brief(route(snap, f"bob+x@{HOST}")) == [("esmtp", "carol@example.net", "example.net")]
    assert brief(route(snap, f"bob+list@{HOST}")) == [("local", "alice", "")]
    assert brief(route(snap, f"postmaster+x@{HOST}")) == brief(route(snap, f"postmaster@{HOST}"))
    assert brief(route(snap, "alice+x@keep.example")) == [("local", "alice", "")]
    [unknown] = route(snap, f"nosuchuser+x@{HOST}")
    assert unknown.mailer == "error" and unknown.error is not None
    assert unknown.error.dsn == "5.1.1"
    [odd] = route(snap, f"+x@{HOST}")  # no user before the +: the name as it is
    assert odd.mailer == "error"
