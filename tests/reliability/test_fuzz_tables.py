"""Fuzzing every table parser in mailgate.tables (issue 9 item 4.4).

- Arbitrary text (and arbitrary bytes) in any table file gives a table or a ``TableError``
  whose message starts ``path:line: `` with a line that exists in the file, as an editor
  counts it, and is neither blank nor a comment; never another exception. The same holds
  for the whole directory (``load_tables``) followed by ``mailgate check``'s lint and for
  lookups on whatever parsed.
- Round trips: a file written from generated valid entries parses to the lookups those
  entries mean (first line wins in makemap maps, last in aliases).

``MAILGATE_FUZZ_SCALE=N`` multiplies every example count (long runs by hand).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.tables import TABLE_FILES, Tables, load_tables
from mailgate.tables.access import AccessTable
from mailgate.tables.aliases import AliasTable, AliasTarget, parse_targets, read_include
from mailgate.tables.domaintable import DomainTable
from mailgate.tables.lint import lint
from mailgate.tables.localnames import read_names
from mailgate.tables.mailertable import MailerTable, NextHop, parse_mailer_value
from mailgate.tables.maps import ErrorValue, TableError, parse_error_value
from mailgate.tables.virtusers import VirtUserTable, parse_virt_value
from tests.reliability.fuzz_settings import fuzz_settings
from tests.reliability.fuzz_support import check_table_error

Loader = Callable[[Path], object]
LOADERS: dict[str, Loader] = {
    "access": AccessTable.load,
    "mailertable": MailerTable.load,
    "virtusertable": VirtUserTable.load,
    "domaintable": DomainTable.load,
    "aliases": AliasTable.load,
    "local-host-names": read_names,
    "relay-domains": read_names,
}
assert set(LOADERS) == set(TABLE_FILES)


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("fuzz-tables")


# -- arbitrary input --------------------------------------------------------------------------

# Table syntax, a few whole words, and the characters Python's str.splitlines() also breaks
# lines at (a file's lines are what "\n" ends, as for Sendmail's fgets and an editor).
TOKENS = [
    *'abcxyz019.:@[]"# \t\n%,|/<>()\\+*-_!=',
    "\r\n",
    "\r",
    "\x0c",
    "\x1c",
    "\x85",
    "\u2028",
    "é",
    "IPv6:",
    "2001:db8::",
    "Connect:",
    "To:",
    "From:",
    "Spam:",
    "GreetPause:",
    "error:",
    "ERROR:",
    "QUARANTINE:",
    "smtp:",
    "relay:",
    "local:",
    "uucp:",
    "5.7.1:550 ",
    "550 ",
    "4.2.0",
    "nouser ",
    ":include:",
    "RELAY",
    "REJECT",
    "OK",
    "SKIP",
    "FRIEND",
    "%1",
    "192.0.2.1",
    "example.com",
    " RELAY\n",
    "\n  ",
]
table_text = st.one_of(
    st.lists(st.sampled_from(TOKENS), max_size=40).map("".join),
    st.text(max_size=60),
)


@fuzz_settings(600)
@given(name=st.sampled_from(sorted(LOADERS)), text=table_text)
def test_any_text_parses_or_names_file_and_line(table_dir: Path, name: str, text: str) -> None:
    path = table_dir / name
    data = text.encode("utf-8", "surrogatepass")
    path.write_bytes(data)
    try:
        LOADERS[name](path)
    except TableError as exc:
        check_table_error(exc, path, data)


@pytest.mark.parametrize("brk", ["\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028"])
@pytest.mark.parametrize("name", sorted(LOADERS))
def test_regression_lines_end_at_lf_only(table_dir: Path, name: str, brk: str) -> None:
    """Found by test_any_text_parses_or_names_file_and_line: str.splitlines() also broke lines
    at CR, VT, FF, FS/GS/RS, NEL, U+2028, so one line became two and errors named a line past
    the end of the file ("domaintable:2" for the one-line ``0 0<NEL>0``)."""
    path = table_dir / name
    data = f"# a comment{brk}not a new line\n!bad\n".encode()
    path.write_bytes(data)
    with pytest.raises(TableError) as info:
        LOADERS[name](path)
    check_table_error(info.value, path, data)
    assert info.value.line == 2 and "!bad" in info.value.message
    # A CRLF file reads as its LF twin.
    good = {"access": "Connect:192.0.2.1 RELAY", "mailertable": ". smtp:[192.0.2.25]",
            "virtusertable": "@virt.example alice", "domaintable": "old.example new.example",
            "aliases": "postmaster: alice", "local-host-names": "a.example",
            "relay-domains": "a.example"}[name]  # fmt: skip
    path.write_bytes(f"# c\r\n{good}\r\n\r\n".encode())
    crlf = LOADERS[name](path)
    path.write_bytes(f"# c\n{good}\n\n".encode())
    assert repr_of(crlf) == repr_of(LOADERS[name](path))


def repr_of(table: object) -> object:
    if isinstance(table, frozenset):
        return table
    if isinstance(table, AccessTable):
        return sorted((t, k, v) for t, k, v in table.entries())
    if isinstance(table, MailerTable):
        return [table.route_for_key(k) for k in table.domain_keys()]
    if isinstance(table, VirtUserTable):
        return table.entries()
    if isinstance(table, DomainTable):
        return table.items()
    assert isinstance(table, AliasTable)
    return [(n, table.lookup(n), table.line_of(n)) for n in table.names()]


@fuzz_settings(200)
@given(name=st.sampled_from(sorted(LOADERS)), data=st.binary(max_size=60))
def test_any_bytes_parse_or_name_file_and_line(table_dir: Path, name: str, data: bytes) -> None:
    path = table_dir / name
    path.write_bytes(data)
    try:
        LOADERS[name](path)
    except TableError as exc:
        check_table_error(exc, path, data)


@fuzz_settings(200)
@given(text=table_text)
def test_include_file(table_dir: Path, text: str) -> None:
    path = table_dir / "include.txt"
    data = text.encode("utf-8", "surrogatepass")
    path.write_bytes(data)
    try:
        targets = read_include(path)
    except TableError as exc:
        check_table_error(exc, path, data)
    else:
        assert all(t.kind in ("address", "program", "file", "include") for t in targets)


@fuzz_settings(400)
@given(text=table_text)
def test_value_parsers_raise_only_value_error(text: str) -> None:
    """The value parsers the table classes share document ValueError for a bad value."""
    for parse in (parse_error_value, parse_mailer_value, parse_targets, parse_virt_value):
        with contextlib.suppress(ValueError):
            parse(text)


# Lookups on whatever parsed: a client, a sender, a recipient, as the session asks.
queries = st.tuples(
    st.sampled_from(["192.0.2.1", "10.1.2.3", "::1", "2001:db8::5", "", "not-an-ip", "1.2.3.4"]),
    st.sampled_from([None, "host.example.com", "example.com", "", ".", "a..b", "é.example"]),
    st.sampled_from(["", "user", "User+tag", "+", "a@b", "%1"]),
)


@fuzz_settings(150)
@given(
    texts=st.fixed_dictionaries({n: table_text for n in TABLE_FILES}),
    q=st.lists(queries, min_size=1, max_size=3),
    blocklist=st.booleans(),
)
def test_directory_load_lint_and_lookups(
    table_dir: Path, texts: dict[str, str], q: list[tuple[str, str | None, str]], blocklist: bool
) -> None:
    directory = table_dir / "all"
    directory.mkdir(exist_ok=True)
    for n, text in texts.items():
        (directory / n).write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        tables = load_tables(directory)
    except TableError as exc:
        path = Path(exc.path)
        check_table_error(exc, path, path.read_bytes())
        return
    for w in lint(tables, blocklist_recipients=blocklist):
        assert str(w).startswith(w.path + (f":{w.line}: " if w.line is not None else ": "))
    _lookups(tables, q)


def _lookups(tables: Tables, q: list[tuple[str, str | None, str]]) -> None:
    for ip, name, local in q:
        domain = name or ""
        tables.access.connect(ip, name)
        tables.access.client_relay(ip, name, exact_names=True)
        tables.access.client_relay(ip, name, exact_names=False)
        tables.access.sender(local, domain)
        tables.access.recipient(local, domain, is_local=False)
        tables.access.recipient(local, domain, is_local=True)
        tables.access.recipient_domain_relay(domain, exact_names=False)
        tables.access.greet_pause(ip, name)
        tables.mailertable.lookup(domain)
        tables.virtusers.lookup(local, domain)
        tables.domaintable.rewrite(domain)
        tables.aliases.lookup(local)


# -- round trips ------------------------------------------------------------------------------

ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
# Few draws per name: generating data is most of these tests' time.
label = st.one_of(
    st.sampled_from(["a", "mx", "relay", "x-1", "b2b", "0", "mail", "targetdomain1", "z9"]),
    st.text(ALNUM, min_size=1, max_size=6),
)
domain = st.lists(label, min_size=1, max_size=2).map(lambda ls: ".".join(ls) + ".example")
user = st.one_of(
    st.sampled_from(["alice", "bob", "u", "info", "first.last", "a_b", "x-y", "9"]),
    st.text(ALNUM, min_size=1, max_size=6),
)
ipv4 = st.lists(st.integers(0, 255), min_size=1, max_size=4).map(
    lambda parts: ".".join(map(str, parts))
)
text_words = st.lists(st.sampled_from(["Go", "away", "no", "such", "user", "relay"]), max_size=4)
error_value = st.builds(
    lambda code, subject, detail, words: ErrorValue(
        code, f"{str(code)[0]}.{subject}.{detail}", " ".join(words)
    ),
    st.sampled_from([421, 450, 451, 550, 551, 553, 554]),
    st.integers(0, 7),
    st.integers(0, 9),
    text_words,
)


def error_text(ev: ErrorValue) -> str:
    return f"{ev.dsn}:{ev.code} {ev.text}".rstrip()


@fuzz_settings(100)
@given(ev=error_value, quoted=st.booleans())
def test_error_value_round_trip(ev: ErrorValue, quoted: bool) -> None:
    text = f'{ev.dsn}:"{ev.code} {ev.text}"' if quoted else error_text(ev)
    assert parse_error_value(text) == ev


def case(s: str, flip: int) -> str:
    """``s`` with the letters whose position bit is set in ``flip`` upper-cased."""
    return "".join(c.upper() if flip >> (i % 30) & 1 else c for i, c in enumerate(s))


def sep(i: int) -> str:
    return ("\t", " ", "  \t ")[i % 3]


noise = st.sampled_from(["", "# comment\n", "\n", "   \n", "#Connect:1.2.3.4 REJECT\n"])

access_tag = st.sampled_from(["", "Connect:", "From:", "To:"])
access_action = st.one_of(
    st.sampled_from(["OK", "RELAY", "REJECT", "DISCARD"]),
    error_value.map(lambda ev: "ERROR:" + error_text(ev)),
)


def access_key(tag: str) -> st.SearchStrategy[str]:
    kinds = [ipv4, domain]
    if tag in ("From:", "To:", ""):
        kinds += [st.builds(lambda u, d: f"{u}@{d}", user, domain), user.map(lambda u: u + "@")]
    return st.one_of(*kinds)


access_entry = access_tag.flatmap(
    lambda tag: st.tuples(st.just(tag), access_key(tag), access_action)
)


@fuzz_settings(100)
@given(
    entries=st.lists(access_entry, max_size=12),
    flips=st.integers(0, 2**30),
    noises=st.lists(noise, min_size=13, max_size=13),
)
def test_access_round_trip(
    table_dir: Path, entries: list[tuple[str, str, str]], flips: int, noises: list[str]
) -> None:
    lines: list[str] = []
    want: dict[tuple[str, str], tuple[str, int]] = {}
    for i, (tag, key, action) in enumerate(entries):
        lines.append(noises[i])
        no = sum(s.count("\n") for s in lines) + 1
        lines.append(f"{case(tag, flips)}{case(key, flips >> 3)}{sep(i)}{action}\n")
        want.setdefault((tag[:-1].lower(), key.lower()), (action.split(":")[0].upper(), no))
    path = table_dir / "access"
    path.write_text("".join(lines) + noises[-1])
    t = AccessTable.load(path)
    got = {(tag, key): (v.action, v.line) for tag, key, v in t.entries()}
    assert got == want
    assert len(t) == len(want)
    for (tag, key), (action, no) in want.items():
        if tag == "connect" and key.count(".") == 3 and "@" not in key:
            v = t.connect(key, None)
            assert v is not None and (v.action, v.line) == (action, no)
        if tag == "from" and "@" in key:
            local, _, dom = key.partition("@")
            v = t.sender(local.upper(), dom.upper())
            assert v is not None and (v.action, v.line) == (action, no)


def hop_text(h: NextHop) -> str:
    text = h.host if h.mx else f"[{h.host}]"
    return f"{text}:{h.port}" if h.port is not None else text


hop = st.builds(
    NextHop,
    st.one_of(domain, st.ip_addresses(v=4).map(str)),
    st.one_of(st.none(), st.integers(1, 65535)),
    st.booleans(),
).filter(lambda h: h.mx is False or not h.host[0].isdigit())


@st.composite
def mailer_value(draw: st.DrawFn) -> tuple[str, tuple[str, tuple[NextHop, ...], str | None]]:
    kind = draw(st.sampled_from(["smtp", "esmtp", "relay", "local", "error"]))
    if kind == "local":
        u = draw(st.one_of(st.none(), user))
        return f"local:{u or ''}", ("local", (), u)
    if kind == "error":
        ev = draw(error_value)
        return "error:" + error_text(ev), ("error", (), None)
    hops = tuple(draw(st.lists(hop, min_size=1, max_size=3)))
    return f"{kind}:" + ":".join(hop_text(h) for h in hops), (kind, hops, None)


mailer_key = st.one_of(domain, domain.map(lambda d: "." + d), st.just("."))


@fuzz_settings(100)
@given(
    entries=st.lists(st.tuples(mailer_key, mailer_value()), max_size=10),
    flips=st.integers(0, 2**30),
    noises=st.lists(noise, min_size=11, max_size=11),
)
def test_mailertable_round_trip(
    table_dir: Path,
    entries: list[tuple[str, tuple[str, tuple[str, tuple[NextHop, ...], str | None]]]],
    flips: int,
    noises: list[str],
) -> None:
    lines: list[str] = []
    want: dict[str, tuple[tuple[str, tuple[NextHop, ...], str | None], int]] = {}
    for i, (key, (value, expect)) in enumerate(entries):
        lines.append(noises[i])
        no = sum(s.count("\n") for s in lines) + 1
        written = case(key, flips) + ("." if key != "." and flips & 1 else "")
        lines.append(f"{written}{sep(i)}{value}\n")
        want.setdefault(key, (expect, no))
    path = table_dir / "mailertable"
    path.write_text("".join(lines) + noises[-1])
    t = MailerTable.load(path)
    assert sorted(t.domain_keys()) == sorted(want)
    for key, (expect, no) in want.items():
        if key == ".":
            probe = "zz-none.invalid-tld"
            if any(k != "." and probe.endswith(k.lstrip(".")) for k in want):
                continue
        elif key.startswith("."):
            probe = "zz-sub" + key
            if any(k != key and k != "." and ("zz-sub" + key).endswith(k) for k in want):
                continue
        else:
            probe = key
        r = t.lookup(probe.upper())
        assert r is not None and (r.mailer, r.hops, r.user, r.line) == (*expect, no)


virt_value = st.one_of(
    user,
    st.builds(lambda u, d: f"{u}@{d}", user, domain),
    domain.map(lambda d: "%1@" + d),
    error_value.map(lambda ev: "error:" + error_text(ev)),
)


@fuzz_settings(100)
@given(
    entries=st.lists(
        st.tuples(
            st.one_of(
                st.builds(lambda u, d: f"{u}@{d}", user, domain), domain.map(lambda d: "@" + d)
            ),
            virt_value,
        ),
        max_size=10,
    ),
    noises=st.lists(noise, min_size=11, max_size=11),
)
def test_virtusertable_round_trip(
    table_dir: Path, entries: list[tuple[str, str]], noises: list[str]
) -> None:
    lines: list[str] = []
    want: dict[str, tuple[str, int]] = {}
    for i, (key, value) in enumerate(entries):
        lines.append(noises[i])
        no = sum(s.count("\n") for s in lines) + 1
        lines.append(f"{key.upper() if i % 2 else key}{sep(i)}{value}\n")
        want.setdefault(key, (value, no))
    path = table_dir / "virtusertable"
    path.write_text("".join(lines) + noises[-1])
    t = VirtUserTable.load(path)
    assert len(t) == len(want)
    for key, (value, no) in want.items():
        local, _, dom = key.partition("@")
        probe = local or "zz-nobody"
        if not local and f"{probe}@{dom}" in want:
            continue
        hit = t.lookup(probe, dom)
        assert hit is not None
        assert hit == (value.replace("%1", probe), hit[1]) and hit[1].line == no


@fuzz_settings(100)
@given(
    pairs=st.lists(st.tuples(domain, domain), max_size=10),
    noises=st.lists(noise, min_size=11, max_size=11),
)
def test_domaintable_round_trip(
    table_dir: Path, pairs: list[tuple[str, str]], noises: list[str]
) -> None:
    want: dict[str, str] = {}
    lines: list[str] = []
    for i, (old, new) in enumerate(pairs):
        lines += [noises[i], f"{old.upper() if i % 2 else old + '.'}{sep(i)}{new.upper()}\n"]
        want.setdefault(old, new)
    path = table_dir / "domaintable"
    path.write_text("".join(lines) + noises[-1])
    t = DomainTable.load(path)
    assert len(t) == len(want)
    for old, new in want.items():
        assert t.rewrite(old.upper() + ".") == new


@fuzz_settings(100)
@given(
    names=st.lists(st.one_of(domain, st.ip_addresses(v=4).map(lambda a: f"[{a}]")), max_size=12),
    flips=st.integers(0, 2**30),
)
def test_local_names_round_trip(table_dir: Path, names: list[str], flips: int) -> None:
    text = ""
    for i, n in enumerate(names):
        written = case(n, flips >> i) + ("." if (flips >> i) & 2 and not n.startswith("[") else "")
        text += written + ("\n" if i % 3 == 0 else " ") + ("# c\n" if i % 5 == 4 else "")
    path = table_dir / "local-host-names"
    path.write_text(text)
    assert read_names(path) == frozenset(names)


alias_target = st.one_of(
    user.map(lambda u: AliasTarget("address", u)),
    st.builds(lambda u, d: AliasTarget("address", f"{u}@{d}"), user, domain),
    user.map(lambda u: AliasTarget("address", "\\" + u)),
    user.map(lambda u: AliasTarget("program", f"/usr/bin/{u} -x")),
    user.map(lambda u: AliasTarget("file", f"/var/mail/{u}")),
    user.map(lambda u: AliasTarget("include", f"/etc/mail/{u}.list")),
)


def target_text(t: AliasTarget) -> str:
    if t.kind == "program":
        return f'"|{t.value}"'
    if t.kind == "include":
        return f":include:{t.value}"
    return t.value


@fuzz_settings(100)
@given(
    entries=st.lists(st.tuples(user, st.lists(alias_target, min_size=1, max_size=4)), max_size=8),
    wrap=st.integers(0, 2**16),
    noises=st.lists(noise, min_size=9, max_size=9),
)
def test_aliases_round_trip(
    entries: list[tuple[str, list[AliasTarget]]], wrap: int, noises: list[str]
) -> None:
    text = ""
    want: dict[str, tuple[tuple[AliasTarget, ...], int]] = {}
    for i, (name, targets) in enumerate(entries):
        text += noises[i]
        no = text.count("\n") + 1
        text += f"{name.upper() if i % 2 else name}:"
        for j, t in enumerate(targets):
            # Continuation lines (leading white space) wherever a bit of ``wrap`` says so.
            glue = ",\n\t" if (wrap >> (i + j)) & 1 else ", "
            text += (" " if j == 0 else glue) + target_text(t)
        text += "\n"
        want[name] = (tuple(targets), no)  # newaliases: the later line replaces
    table = AliasTable.from_text(text + noises[-1], "aliases")
    assert sorted(table.names()) == sorted(want)
    for name, (expect, no) in want.items():
        assert table.lookup(name.upper()) == expect
        assert table.line_of(name) == no
