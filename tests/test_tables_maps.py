"""The makemap text format and error values (semantics §4-§6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate.tables.maps import (
    ErrorValue,
    MapEntry,
    TableError,
    TableWarning,
    parse_error_value,
    read_map,
)


def test_read_map(tmp_path: Path) -> None:
    p = tmp_path / "m"
    p.write_text("# head\n\nkey1 value one  \n   \n\tkey2\t\tv2\n  # indented comment\nk3 a # b\n")
    assert read_map(p) == [
        MapEntry("key1", "value one", 3),
        MapEntry("key2", "v2", 5),
        MapEntry("k3", "a # b", 7),
    ]


def test_missing_and_none(tmp_path: Path) -> None:
    assert read_map(None) == []
    assert read_map(tmp_path / "absent") == []


def test_key_without_value(tmp_path: Path) -> None:
    p = tmp_path / "m"
    p.write_text("a b\nlonely\n")
    with pytest.raises(TableError) as info:
        read_map(p)
    assert (info.value.path, info.value.line) == (str(p), 2)
    assert str(info.value) == f"{p}:2: key 'lonely' has no value"


def test_bad_utf8(tmp_path: Path) -> None:
    p = tmp_path / "m"
    p.write_bytes(b"a b\nc d\ne \xc3\x28\n")
    with pytest.raises(TableError) as info:
        read_map(p)
    assert info.value.line == 3
    assert "UTF-8" in info.value.message


def test_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TableError):
        read_map(tmp_path)


def test_utf8_ok(tmp_path: Path) -> None:
    p = tmp_path / "m"
    p.write_text("bücher.example smtp:mx.example\n", encoding="utf-8")
    assert read_map(p) == [MapEntry("bücher.example", "smtp:mx.example", 1)]


def test_warning_str() -> None:
    assert str(TableWarning("/etc/mail/access", 4, "x")) == "/etc/mail/access:4: x"
    assert str(TableWarning("relay-domains", None, "y")) == "relay-domains: y"
    assert str(TableError("f", None, "z")) == "f: z"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5.7.1:550 Mail for this domain is refused",
         ErrorValue(550, "5.7.1", "Mail for this domain is refused")),
        ("4.3.0:451 Try again later", ErrorValue(451, "4.3.0", "Try again later")),
        ("5.7.0:550 Sender blocked here", ErrorValue(550, "5.7.0", "Sender blocked here")),
        ('"550 Go away"', ErrorValue(550, "5.0.0", "Go away")),
        ('"550 5.7.1 Go away"', ErrorValue(550, "5.7.1", "Go away")),
        ('5.7.1:"550 Quoted text"', ErrorValue(550, "5.7.1", "Quoted text")),
        ("nouser No such domain here", ErrorValue(553, "5.3.0", "nouser No such domain here")),
        ("nouser 550 No such user here", ErrorValue(550, "5.0.0", "No such user here", 67)),
        ("tempfail 451 Later", ErrorValue(451, "4.0.0", "Later", 75)),
        ("550 Plain", ErrorValue(550, "5.0.0", "Plain")),
        ("451 Later", ErrorValue(451, "4.0.0", "Later")),
        ("550 5.1.1 Enhanced inline", ErrorValue(550, "5.1.1", "Enhanced inline")),
        ("  5.1.1:550   spaced  ", ErrorValue(550, "5.1.1", "spaced")),
    ],
)  # fmt: skip
def test_parse_error_value(text: str, expected: ErrorValue) -> None:
    assert parse_error_value(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "5.7.1:450 mismatch",
        "4.7.1:550 mismatch",
        "5.7.1:",
        "5.7.1:text without code",
        "9.1.1:550 bad class",
        "250 not an error",
        "550Glued",
        '"550 unbalanced',
        "5.7.1:550 4.7.1 two codes",
    ],
)
def test_parse_error_value_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_error_value(text)
