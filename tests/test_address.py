"""Address parsing and normalisation (semantics §1, §12)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mailgate.address import (
    AddressError,
    Mailbox,
    canon_domain,
    is_valid_domain,
    normalize,
    parse_path_arg,
    unquote_local,
)

LOCAL = {"gateway.example.com", "localhost", ""}


def is_local(domain: str) -> bool:
    return domain in LOCAL


def reply_of(fn, *args) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(AddressError) as info:
        fn(*args)
    return str(info.value.reply)


# -- parse_path_arg ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "keyword", "addr", "params"),
    [
        ("FROM:<a@b>", "FROM", "a@b", {}),
        ("FROM:<a@b> SIZE=10 BODY=8BITMIME", "FROM", "a@b", {"SIZE": "10", "BODY": "8BITMIME"}),
        ("from:<a@b> size=10 smtputf8", "FROM", "a@b", {"SIZE": "10", "SMTPUTF8": None}),
        ("FROM: <a@b>", "FROM", "a@b", {}),
        ("FROM :<a@b>", "FROM", "a@b", {}),
        ("TO:user@targetdomain1.com", "TO", "user@targetdomain1.com", {}),
        ("TO:user@x NOTIFY=NEVER", "to", "user@x", {"NOTIFY": "NEVER"}),
        ("FROM:<>", "FROM", "", {}),
        ("FROM:<> BODY=7BIT", "FROM", "", {"BODY": "7BIT"}),
        ('TO:<"john doe"@x>', "TO", '"john doe"@x', {}),
        ('TO:<"a>b"@x> ORCPT=rfc822;a@x', "TO", '"a>b"@x', {"ORCPT": "rfc822;a@x"}),
        ("TO:<@a,@b:u@c>", "TO", "@a,@b:u@c", {}),
        ("TO:<<u@c>>", "TO", "u@c", {}),
        ("TO:<postmaster>", "TO", "postmaster", {}),
        ("TO:<üser@bücher.example>", "TO", "üser@bücher.example", {}),
        ("FROM:<a@b> RET=HDRS ENVID=x+2By", "FROM", "a@b", {"RET": "HDRS", "ENVID": "x+2By"}),
    ],
)
def test_parse_path_arg(arg: str, keyword: str, addr: str, params: dict[str, str | None]) -> None:
    assert parse_path_arg(arg, keyword) == (addr, params)


@pytest.mark.parametrize(
    ("arg", "keyword", "reply"),
    [
        ("TO:<user@targetdomain1.com", "TO", "553 5.0.0 <user@targetdomain1.com... Unbalanced '<'"),
        ("FROM:", "FROM", '501 5.5.2 Syntax error in parameters scanning "FROM"'),
        ("FROM:   ", "FROM", '501 5.5.2 Syntax error in parameters scanning "FROM"'),
        ("TO:", "TO", '501 5.5.2 Syntax error in parameters scanning "TO"'),
        # Sendmail shows the word it scanned, as the client wrote it.
        ("FROM <a@b>", "FROM", '501 5.5.2 Syntax error in parameters scanning "FROM"'),
        ("FRM:<a@b>", "FROM", '501 5.5.2 Syntax error in parameters scanning "FRM"'),
        ("<a@b>", "FROM", '501 5.5.2 Syntax error in parameters scanning "<a@b>"'),
        ("", "FROM", '501 5.5.2 Syntax error in parameters scanning ""'),
        ("FROM:<a@b>", "TO", '501 5.5.2 Syntax error in parameters scanning "FROM"'),
        ('TO:<"abc@x>', "TO", "553 5.0.0 <\"abc@x>... Unbalanced '\"'"),
        ("TO:a>b@x", "TO", "553 5.0.0 a>b@x... Unbalanced '>'"),
        ("TO:<a@b>junk", "TO", "553 5.0.0 <a@b>junk... Junk after '>'"),
        (
            "TO:<a\x01@b>",
            "TO",
            "553 5.1.1 <a\x01@b>... Address contained invalid control characters",
        ),
    ],
)
def test_parse_path_arg_errors(arg: str, keyword: str, reply: str) -> None:
    assert reply_of(parse_path_arg, arg, keyword) == reply


def test_parse_path_arg_bad_param() -> None:
    with pytest.raises(AddressError) as info:
        parse_path_arg("FROM:<a@b> =x", "FROM")
    assert info.value.reply.code == 501
    assert info.value.reply.enhanced == "5.5.4"


# -- normalize --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("user@targetdomain1.com", Mailbox("user", "targetdomain1.com")),
        ("User@TargetDomain1.COM.", Mailbox("User", "targetdomain1.com")),
        # §1: the %-hack on a local host.
        ("user%targetdomain1.com@gateway.example.com", Mailbox("user", "targetdomain1.com")),
        ("user%example.net@gateway.example.com", Mailbox("user", "example.net")),
        ("u%a.example%b.example@gateway.example.com", Mailbox("u%a.example", "b.example")),
        # Repeated while the new host is local too.
        ("u%a.example%localhost@gateway.example.com", Mailbox("u", "a.example")),
        # Not on a remote host.
        (
            "user%other.example@targetdomain1.com",
            Mailbox("user%other.example", "targetdomain1.com"),
        ),
        # UUCP bang paths without "@".
        ("targetdomain1.com!user", Mailbox("user", "targetdomain1.com")),
        ("example.net!user", Mailbox("user", "example.net")),
        ("uuhost!user", Mailbox("user", "uuhost")),
        ("a!b!u", Mailbox("b!u", "a")),
        # With "@" the bang stays in the local part.
        ("a!b@targetdomain1.com", Mailbox("a!b", "targetdomain1.com")),
        # Source routes are dropped.
        ("@example.net:user@targetdomain1.com", Mailbox("user", "targetdomain1.com")),
        ("@a.example,@b.example:u@X.Example.", Mailbox("u", "x.example")),
        # Address literals, lower-cased and canonical.
        ("u@[192.0.2.98]", Mailbox("u", "[192.0.2.98]")),
        ("u@[IPv6:2001:DB8::1]", Mailbox("u", "[ipv6:2001:db8::1]")),
        ("u@[IPv6:2001:db8:0:0:0:0:0:1]", Mailbox("u", "[ipv6:2001:db8::1]")),
        # Quoted local parts kept as written.
        ('"john doe"@gateway.example.com', Mailbox('"john doe"', "gateway.example.com")),
        ('"root"@gateway.example.com', Mailbox('"root"', "gateway.example.com")),
        ('"john doe"@targetdomain1.com', Mailbox('"john doe"', "targetdomain1.com")),
        # Quotes and escapes do not hide routing behind a local name (§1).
        ('"a%b"@gateway.example.com', Mailbox("a", "b")),
        ('"u@other.example"@gateway.example.com', Mailbox("u", "other.example")),
        ('"u@other.example"', Mailbox("u", "other.example")),
        ('"u%other.example"', Mailbox("u", "other.example")),
        ("u\\@other.example@gateway.example.com", Mailbox("u", "other.example")),
        ("other.example!u@gateway.example.com", Mailbox("u", "other.example")),
        ('"u@a.example@b.example"@localhost', Mailbox('"u@a.example"', "b.example")),
        ('"u@a.example@localhost"@gateway.example.com', Mailbox("u", "a.example")),
        # An empty side is a user name, not a route.
        ("!u@gateway.example.com", Mailbox("!u", "gateway.example.com")),
        ("u%@gateway.example.com", Mailbox("u%", "gateway.example.com")),
        ('"a@b"@x.example', Mailbox('"a@b"', "x.example")),
        ("postmaster", Mailbox("postmaster", "")),
        ("üser@bücher.example", Mailbox("üser", "bücher.example")),
        ("first.last+tag@x.example", Mailbox("first.last+tag", "x.example")),
        ("", Mailbox("", "")),
    ],
)
def test_normalize(raw: str, expected: Mailbox) -> None:
    assert normalize(raw, is_local) == expected


def test_percent_hack_unqualified_uses_is_local() -> None:
    assert normalize("user%targetdomain1.com", is_local) == Mailbox("user", "targetdomain1.com")
    assert normalize("user%targetdomain1.com", lambda d: False) == Mailbox(
        "user%targetdomain1.com", ""
    )


@pytest.mark.parametrize(
    ("raw", "reply"),
    [
        ("user@", "553 5.1.3 <user@>... Hostname required"),
        ("@", "553 5.1.3 <@>... List:; syntax illegal for recipient addresses"),
        ("@example.com", "553 5.1.3 <@example.com>... User address required"),
        ("@a:", "553 5.1.3 <@a:>... User address required"),
        ("u@a..b", "553 5.1.2 <u@a..b>... Invalid host name"),
        ("u@-a.example", "553 5.1.2 <u@-a.example>... Invalid host name"),
        ("u@[300.1.1.1]", "553 5.1.2 <u@[300.1.1.1]>... Invalid host name"),
        ("u@[IPv6:zz::1]", "553 5.1.2 <u@[IPv6:zz::1]>... Invalid host name"),
        # A scope id is no part of RFC 5321's IPv6-addr (ipaddress takes one).
        ("u@[IPv6:fe80::1%lo]", "553 5.1.2 <u@[IPv6:fe80::1%lo]>... Invalid host name"),
        ("u@[IPv6:::1%25lo]", "553 5.1.2 <u@[IPv6:::1%25lo]>... Invalid host name"),
        ("a b@x.example", "553 5.1.3 <a b@x.example>... Invalid local part"),
        ("a,b@x.example", "553 5.1.3 <a,b@x.example>... Invalid local part"),
        ("a@b@x.example", "553 5.1.3 <a@b@x.example>... Invalid route address"),
        ('"open@x.example', "553 5.0.0 <\"open@x.example>... Unbalanced '\"'"),
        ("a\x7f@x", "553 5.1.1 <a\x7f@x>... Address contained invalid control characters"),
        (
            "a" * 250 + "@x.example",
            f"553 5.1.0 <{'a' * 250}@x.example>... Address too long (255 bytes max)",
        ),
    ],
)
def test_normalize_errors(raw: str, reply: str) -> None:
    assert reply_of(normalize, raw, is_local) == reply


def test_normalize_written_form_in_error() -> None:
    with pytest.raises(AddressError) as info:
        normalize("user@", is_local, written="user@")
    assert str(info.value.reply) == "553 5.1.3 user@... Hostname required"
    assert info.value.reply.is_permanent


def test_mailbox_properties() -> None:
    assert str(Mailbox("u", "x.example")) == "u@x.example"
    assert str(Mailbox("postmaster", "")) == "postmaster"
    assert Mailbox("u", "[192.0.2.1]").is_literal
    assert not Mailbox("u", "x.example").is_literal
    assert Mailbox("", "").is_null
    assert not Mailbox("u", "").is_null


def test_helpers() -> None:
    assert is_valid_domain("example.com.")
    assert is_valid_domain("xn--bcher-kva.example")
    assert is_valid_domain("[192.0.2.1]")
    assert not is_valid_domain("")
    assert not is_valid_domain(".example.com")
    assert not is_valid_domain("a_b c.example")
    assert not is_valid_domain("a" * 64 + ".example")
    assert canon_domain("Example.COM.") == "example.com"
    assert canon_domain("[IPv6:2001:DB8:0::1]") == "[ipv6:2001:db8::1]"
    assert canon_domain("a..b") is None
    assert unquote_local('"john doe"') == "john doe"
    assert unquote_local('"a\\"b"') == 'a"b'
    assert unquote_local("plain") == "plain"


_atom = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_+=", min_size=1, max_size=12)
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


@given(local=_atom, labels=st.lists(_label, min_size=1, max_size=4))
def test_roundtrip_simple_addresses(local: str, labels: list[str]) -> None:
    domain = ".".join(labels)
    addr, params = parse_path_arg(f"TO:<{local}@{domain.upper()}> NOTIFY=NEVER", "TO")
    assert params == {"NOTIFY": "NEVER"}
    mb = normalize(addr, is_local)
    assert mb == Mailbox(local, domain)
    assert str(mb) == f"{local}@{domain}"


@given(st.text(max_size=40))
def test_parse_never_crashes(text: str) -> None:
    # Any input either parses or raises AddressError with an SMTP reply, never anything else.
    try:
        addr, _ = parse_path_arg("TO:" + text, "TO")
        normalize(addr, is_local)
    except AddressError as exc:
        assert exc.reply.code in (501, 553)


# -- the fast paths against the character loops they short-cut ------------------------------
# The loops as they were before the fast paths (docs/design.md, "CPU per message"): the
# scanners must give the same answer, error included, for any text.


def _ref_skipword(arg: str, keyword: str) -> str:
    p = arg.lstrip()
    i = 0
    while i < len(p) and p[i] != ":" and not p[i].isspace():
        i += 1
    word = p[:i]
    j = i
    while j < len(p) and p[j].isspace():
        j += 1
    if j >= len(p) or p[j] != ":":
        return "syntax"
    rest = p[j + 1 :].lstrip()
    if not rest or word.lower() != keyword.lower():
        return "syntax"
    return rest


def _ref_scan_angle(rest: str) -> tuple[str, str] | str:
    depth = 0
    quoted = False
    i = 0
    while i < len(rest):
        c = rest[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == "\\":
            i += 1
        elif c == '"':
            quoted = True
        elif c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
            if depth == 0:
                return rest[1:i], rest[i + 1 :]
        i += 1
    return "unbalanced quote" if quoted else "unbalanced <"


def _ref_split_unquoted(s: str, sep: str, last: bool) -> int:
    found = -1
    quoted = False
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif not quoted and c == sep:
            if not last:
                return i
            found = i
        i += 1
    return found


def _ref_quotes_balanced(s: str) -> bool:
    quoted = False
    i = 0
    while i < len(s):
        if s[i] == "\\":
            i += 1
        elif s[i] == '"':
            quoted = not quoted
        i += 1
    return not quoted


_ATEXT = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~.")


def _ref_valid_local(local: str) -> bool:
    if any("\ud800" <= c <= "\udfff" for c in local):
        return False
    quoted = False
    i = 0
    while i < len(local):
        c = local[i]
        if c == "\\":
            if i + 1 >= len(local):
                return False
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif not quoted and c not in _ATEXT and ord(c) < 0x80:
            return False
        i += 1
    return not quoted


def _ref_valid_host(d: str) -> bool:
    """is_valid_domain for a name that is no literal, without its trailing dot."""
    if not d or len(d) > 255 or any("\ud800" <= c <= "\udfff" for c in d):
        return False
    for label in d.split("."):
        if not label or len(label.encode("utf-8")) > 63:
            return False
        if label[0] == "-" or label[-1] == "-":
            return False
        if not all((c.isascii() and (c.isalnum() or c in "-_")) or ord(c) >= 0x80 for c in label):
            return False
    return True


# Mostly the characters the scanners look at, and some of any kind (UTF-8, controls, surrogates,
# Unicode white space).
_scanned = st.text(
    alphabet=st.one_of(
        st.sampled_from('<>"\\@:%!.-_ \tabcAZ09\u00a0\u2003ü'),
        st.characters(exclude_categories=("Cs",)),
        # The only surrogates wire text can hold: bytes decoded with surrogateescape.
        st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF, exclude_categories=()),
    ),
    max_size=30,
)


def _outcome(fn, *args):  # type: ignore[no-untyped-def]
    try:
        return fn(*args)
    except AddressError as exc:
        return str(exc.reply)


@given(_scanned, st.sampled_from(["FROM", "TO", "from"]), st.booleans())
def test_skipword_fast_path_as_the_loop(text: str, keyword: str, prefixed: bool) -> None:
    from mailgate.address import _skipword

    arg = f"{keyword.upper()}:{text}" if prefixed else text
    got = _outcome(_skipword, arg, keyword)
    want = _ref_skipword(arg, keyword)
    if want == "syntax":
        assert got.startswith("501 5.5.2 Syntax error in parameters scanning")
    else:
        assert got == want


@given(_scanned)
def test_scan_angle_fast_path_as_the_loop(text: str) -> None:
    from mailgate.address import _scan_angle

    rest = "<" + text
    got = _outcome(_scan_angle, rest)
    want = _ref_scan_angle(rest)
    if want == "unbalanced quote":
        assert got.endswith("Unbalanced '\"'")
    elif want == "unbalanced <":
        assert got.endswith("Unbalanced '<'")
    else:
        assert got == want


@given(_scanned, st.sampled_from(["@", ":"]), st.booleans())
def test_split_unquoted_fast_path_as_the_loop(text: str, sep: str, last: bool) -> None:
    from mailgate.address import _split_unquoted

    assert _split_unquoted(text, sep, last=last) == _ref_split_unquoted(text, sep, last)


@given(_scanned)
def test_local_part_checks_as_the_loops(text: str) -> None:
    from mailgate.address import _quotes_balanced, _valid_local

    assert _quotes_balanced(text) == _ref_quotes_balanced(text)
    assert _valid_local(text) == _ref_valid_local(text)


@given(
    st.one_of(
        _scanned,
        st.lists(st.from_regex(r"[a-z0-9_-]{0,70}", fullmatch=True), min_size=1, max_size=4).map(
            ".".join
        ),
    )
)
@example("a" * 63 + ".b")
@example("a" * 64 + ".b")
@example("b." + "a" * 64 + ".")
def test_host_name_check_as_the_loop(text: str) -> None:
    if text.startswith("["):
        return  # address literals: ipaddress decides, unchanged
    d = text[:-1] if text.endswith(".") else text
    assert is_valid_domain(text) == _ref_valid_host(d)


# The usual forms the fast paths of parse_path_arg and normalize take (and near misses: "!",
# "%", a long label, upper case, a final dot), among any text.
_plain_label = st.from_regex(r"[A-Za-z0-9_-]{1,66}", fullmatch=True)
_plain_address = st.builds(
    lambda local, labels, dot: f"{local}@{'.'.join(labels)}{dot}",
    st.text(alphabet="abcZ09#$&'*+-/=?^_`{|}~.!%", min_size=1, max_size=12),
    st.lists(_plain_label, min_size=1, max_size=5),
    st.sampled_from(["", ".", ".."]),
)
_addresses = st.one_of(_plain_address, _scanned)


@settings(max_examples=500)
@given(
    _addresses,
    st.sampled_from(["FROM", "TO"]),
    st.sampled_from(["{k}:<{a}>", "{k}:<{a}> SIZE=10", "{k}:<{a}>{a}", "{k}: <{a}>", "to:<{a}"]),
)
def test_parse_path_arg_fast_path_as_the_general_one(addr: str, keyword: str, form: str) -> None:
    from mailgate.address import _parse_path_arg_general

    arg = form.format(k=keyword, a=addr)
    assert _outcome(parse_path_arg, arg, keyword) == _outcome(_parse_path_arg_general, arg, keyword)


@settings(max_examples=500)
@given(_addresses, st.sampled_from([is_local, lambda d: True, lambda d: False]))
@example("u%h@x", lambda d: True)
@example("h!u@x", lambda d: True)
@example("u@" + "a" * 64, lambda d: False)
@example("u@a-.b", lambda d: False)
@example("u@A.B.", lambda d: False)
def test_normalize_fast_path_as_the_general_one(raw: str, local: Callable[[str], bool]) -> None:
    from mailgate.address import _normalize_general

    got, want = _outcome(normalize, raw, local), _outcome(_normalize_general, raw, local, None)
    assert got == want
    if isinstance(got, Mailbox):  # the same fields, not only equal
        assert (got.local, got.domain) == (want.local, want.domain)


@given(st.text(alphabet=st.sampled_from("aZ09-_=é١ \t"), max_size=12))
def test_parameter_keywords_as_the_loop(text: str) -> None:
    key = text.strip().partition("=")[0]
    ok = bool(key) and key[0].isalnum()
    ok = ok and all(c.isascii() and (c.isalnum() or c == "-") for c in key)
    got = _outcome(parse_path_arg, f"FROM:<a@b> {text}", "FROM")
    if not text.strip():
        assert got == ("a@b", {})
    elif " " in text.strip() or "\t" in text.strip():
        return  # several parameters: each is checked alone
    elif ok:
        assert isinstance(got, tuple)
    else:
        assert got == f"501 5.5.4 Syntax error in parameters: {text.strip()}"
