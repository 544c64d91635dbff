"""aliases(5) (semantics §8)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate.tables.aliases import AliasTable, AliasTarget, parse_targets, read_include
from mailgate.tables.maps import TableError


def table(tmp_path: Path, text: str) -> AliasTable:
    p = tmp_path / "aliases"
    p.write_text(text)
    return AliasTable.load(p)


def A(v: str) -> AliasTarget:
    return AliasTarget("address", v)


def test_formats(tmp_path: Path) -> None:
    t = table(
        tmp_path,
        "# aliases\n"
        "postmaster: root\n"
        "MAILER-DAEMON:postmaster\n"
        "staff: alice, bob@example.net,\n"
        "\tcarol,\n"
        "  # a comment inside the list\n"
        "    dave\n"
        'prog: "|/usr/bin/prog arg", |/bin/true\n'
        "log: /var/log/mail.archive\n"
        'qlog: "/var/log/with space"\n'
        "list: :include:/etc/mail/list.txt\n"
        "fancy: Alice Example <alice@example.org>, bob (Bob B)\n"
        "noalias: \\root\n"
        '"quoted": "john doe"@example.org\n',
    )
    assert t.lookup("postmaster") == (A("root"),)
    assert t.lookup("mailer-daemon") == (A("postmaster"),)
    assert t.lookup("STAFF") == (A("alice"), A("bob@example.net"), A("carol"), A("dave"))
    assert t.lookup("prog") == (
        AliasTarget("program", "/usr/bin/prog arg"),
        AliasTarget("program", "/bin/true"),
    )
    assert t.lookup("log") == (AliasTarget("file", "/var/log/mail.archive"),)
    assert t.lookup("qlog") == (AliasTarget("file", "/var/log/with space"),)
    assert t.lookup("list") == (AliasTarget("include", "/etc/mail/list.txt"),)
    assert t.lookup("fancy") == (A("alice@example.org"), A("bob"))
    assert t.lookup("noalias") == (A("\\root"),)
    assert t.lookup("quoted") == (A('"john doe"@example.org'),)
    assert "Staff" in t and "nobody" not in t
    assert t.lookup("nobody") is None
    assert t.line_of("staff") == 4
    assert len(t) == 10


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("a: b\nno colon here\n", 2, "missing ':'"),
        ("a: b\nempty:\n", 2, "no addresses"),
        ("a: b\nempty:  ,  ,\n", 2, "no addresses"),
        ("  leading: continuation\n", 1, "continuation line without"),
        ("a: b\nbad name: x\n", 2, "illegal alias name"),
        ('a: b\nc: "|unterminated\n', 2, "unbalanced"),
        ("a: b\nc: |\n", 2, "needs a program"),
        ("a: b\nc: :include:\n", 2, "needs a file"),
        ("a: b\nc: x y\n", 2, "missing comma"),
    ],
)
def test_errors(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    with pytest.raises(TableError) as info:
        table(tmp_path, text)
    assert info.value.line == line
    assert fragment in info.value.message


def test_duplicate_last_wins(tmp_path: Path) -> None:
    t = table(tmp_path, "a: one\nA: two\n")
    assert t.lookup("a") == (A("two"),)
    assert [w.line for w in t.warnings] == [2]


def test_missing_file() -> None:
    assert len(AliasTable.load(None)) == 0
    assert AliasTable.load(Path("/nonexistent/aliases")).lookup("root") is None


def test_from_text() -> None:
    t = AliasTable.from_text("root: admin@example.org\n", "mem")
    assert t.lookup("ROOT") == (A("admin@example.org"),)


def test_parse_targets() -> None:
    assert parse_targets('a, "b, c"@x.example') == (A("a"), A('"b, c"@x.example'))


def test_read_include(tmp_path: Path) -> None:
    p = tmp_path / "list.txt"
    p.write_text("# members\nalice, bob@example.net\n\ncarol\n|/usr/bin/logger\n")
    assert read_include(p) == (
        A("alice"),
        A("bob@example.net"),
        A("carol"),
        AliasTarget("program", "/usr/bin/logger"),
    )
    with pytest.raises(TableError):
        read_include(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("ok\n<unbalanced\n")
    with pytest.raises(TableError) as info:
        read_include(bad)
    assert info.value.line == 2
