"""virtusertable (semantics §6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate.tables.maps import ErrorValue, TableError
from mailgate.tables.virtusers import VirtUserTable, parse_virt_value, substitute


def table(tmp_path: Path, text: str) -> VirtUserTable:
    p = tmp_path / "virtusertable"
    p.write_text(text)
    return VirtUserTable.load(p)


def value(t: VirtUserTable, local: str, domain: str) -> str | None:
    hit = t.lookup(local, domain)
    return None if hit is None else hit[0]


SEMANTICS_TABLE = (
    "info@virt.example.com root\n"
    "sales@virt.example.com error:nouser 550 No such user here\n"
    "user+*@virt.example.com %1@targetdomain1.com\n"
    "@virt.example.com %1@targetdomain2.com\n"
)


def test_semantics_examples(tmp_path: Path) -> None:
    t = table(tmp_path, SEMANTICS_TABLE)
    assert value(t, "info", "virt.example.com") == "root"
    assert value(t, "INFO", "Virt.Example.COM.") == "root"
    v = value(t, "sales", "virt.example.com")
    assert v is not None
    assert parse_virt_value(v) == ErrorValue(550, "5.0.0", "No such user here", exit=67)
    assert value(t, "anyone", "virt.example.com") == "anyone@targetdomain2.com"
    assert value(t, "user+tag", "virt.example.com") == "user@targetdomain1.com"
    # No own entry: falls to the catch-all and loses the detail.
    assert value(t, "bob+tag", "virt.example.com") == "bob@targetdomain2.com"
    assert t.lookup("x", "other.example") is None
    hit = t.lookup("info", "virt.example.com")
    assert hit is not None and hit[1].line == 1


def test_full_order(tmp_path: Path) -> None:
    t = table(
        tmp_path,
        "u+exact@d.example exact\n"
        "u++@d.example plusplus-%2\n"
        "u+*@d.example plusstar-%1-%2-%3\n"
        "u@d.example plain-%1-%2\n"
        "+*@d.example anyplus-%1%3\n"
        "@d.example catchall-%1%3\n",
    )
    assert value(t, "u+exact", "d.example") == "exact"
    assert value(t, "u+other", "d.example") == "plusplus-other"
    # Empty detail: user++ is not tried, user+* is.
    assert value(t, "u+", "d.example") == "plusstar-u--+"
    assert value(t, "u", "d.example") == "plain-u-"
    assert value(t, "v+x", "d.example") == "anyplus-v+x"
    assert value(t, "v", "d.example") == "catchall-v"
    # Detail split at the first "+".
    assert value(t, "u+a+b", "d.example") == "plusplus-a+b"


def test_order_without_plus_entries(tmp_path: Path) -> None:
    t = table(tmp_path, "u@d.example plain-%1[%2][%3]\n@d.example all-%1%3\n")
    assert value(t, "u+x", "d.example") == "plain-u[x][+x]"
    assert value(t, "w+x", "d.example") == "all-w+x"
    # A leading "+" is not a detail separator.
    assert value(t, "+x", "d.example") == "all-+x"


def test_substitution_keeps_case_of_the_address(tmp_path: Path) -> None:
    t = table(tmp_path, "@d.example %1@elsewhere.example\n")
    assert value(t, "John.Doe", "d.example") == "John.Doe@elsewhere.example"


def test_substitute() -> None:
    assert substitute("%1@x", ("a", "b", "+b")) == "a@x"
    assert substitute("%2-%3-%9-%%", ("a", "b", "+b")) == "b-+b--%"
    assert substitute("no-percent", ()) == "no-percent"
    assert substitute("trailing%", ("a",)) == "trailing%"


def test_parse_virt_value() -> None:
    assert parse_virt_value("root") == "root"
    assert parse_virt_value("a@b.example") == "a@b.example"
    assert parse_virt_value("error:5.1.1:550 User unknown") == ErrorValue(
        550, "5.1.1", "User unknown"
    )
    assert parse_virt_value("ERROR:nouser 550 No") == ErrorValue(550, "5.0.0", "No", exit=67)


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("nodomain root", "user@domain"),
        ("user@ root", "user@domain"),
        ("a@d.example error:5.1.1:450 x", "does not match"),
        ("a@d.example root, bob", "one address"),
        ("a@d.example", "no value"),
    ],
)
def test_bad_lines(tmp_path: Path, line: str, fragment: str) -> None:
    with pytest.raises(TableError) as info:
        table(tmp_path, f"ok@d.example root\n{line}\n")
    assert info.value.line == 2
    assert fragment in info.value.message


def test_duplicates_and_domains(tmp_path: Path) -> None:
    t = table(tmp_path, "a@D.example first\nA@d.example. second\n@e.example x\n")
    assert value(t, "a", "d.example") == "first"
    assert [w.line for w in t.warnings] == [2]
    assert t.domains() == frozenset({"d.example", "e.example"})
    assert len(t) == 2


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "virtusertable").write_text("")
    t = VirtUserTable.load(tmp_path / "virtusertable")
    assert t.lookup("a", "b.example") is None
    assert len(VirtUserTable.load(None)) == 0
