"""domaintable (semantics §7)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate.tables.domaintable import DomainTable
from mailgate.tables.maps import TableError

EXAMPLES = Path(__file__).parent / "data" / "sendmail-examples"


def table(tmp_path: Path, text: str) -> DomainTable:
    p = tmp_path / "domaintable"
    p.write_text(text)
    return DomainTable.load(p)


def test_rewrite(tmp_path: Path) -> None:
    t = table(tmp_path, "olddomain.example.com targetdomain1.com\nOld2.Example. New2.Example.\n")
    assert t.rewrite("olddomain.example.com") == "targetdomain1.com"
    assert t.rewrite("OldDomain.Example.COM.") == "targetdomain1.com"
    assert t.rewrite("old2.example") == "new2.example"
    # No entry: the input, canonical.
    assert t.rewrite("Other.Example.") == "other.example"
    # Exact host only, no parents; applied once (the result is not looked up again).
    assert t.rewrite("sub.olddomain.example.com") == "sub.olddomain.example.com"
    assert t.rewrite("[192.0.2.1]") == "[192.0.2.1]"


def test_single_pass(tmp_path: Path) -> None:
    t = table(tmp_path, "a.example b.example\nb.example c.example\n")
    assert t.rewrite("a.example") == "b.example"


def test_examples_file_is_empty() -> None:
    t = DomainTable.load(EXAMPLES / "domaintable")
    assert len(t) == 0
    assert t.rewrite("TargetDomain1.com") == "targetdomain1.com"


@pytest.mark.parametrize(
    "line", [".old.example new.example", "old.example [192.0.2.1]", "a..b new.example", "x"]
)
def test_bad_lines(tmp_path: Path, line: str) -> None:
    with pytest.raises(TableError) as info:
        table(tmp_path, f"# c\n{line}\n")
    assert info.value.line == 2


def test_duplicates(tmp_path: Path) -> None:
    t = table(tmp_path, "a.example b.example\nA.example c.example\n")
    assert t.rewrite("a.example") == "b.example"
    assert [w.line for w in t.warnings] == [2]
    assert t.items() == [("a.example", "b.example", 1)]
