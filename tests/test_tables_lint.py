"""load_tables and `mailgate check` warnings (semantics §18)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mailgate.tables import TABLE_FILES, Tables, load_tables
from mailgate.tables.lint import lint
from mailgate.tables.maps import TableError

EXAMPLES = Path(__file__).parent / "data" / "sendmail-examples"


def write(d: Path, **files: str) -> Path:
    for name, text in files.items():
        (d / name.replace("_", "-")).write_text(text)
    return d


def messages(tables: Tables, blocklist: bool = False) -> list[str]:
    return [str(w) for w in lint(tables, blocklist_recipients=blocklist)]


def test_load_examples() -> None:
    t = load_tables(EXAMPLES)
    assert t.local_names == {"targetdomain1.com", "targetdomain2.com", "targetdomain3.com"}
    assert t.relay_domains == frozenset()
    assert len(t.mailertable) == 3
    assert len(t.access) == 6
    assert len(t.virtusers) == 0 and len(t.aliases) == 0 and len(t.domaintable) == 0
    assert [w.line for w in t.warnings] == [4]


def test_lint_examples() -> None:
    t = load_tables(EXAMPLES)
    got = messages(t)
    access = EXAMPLES / "access"
    mt = EXAMPLES / "mailertable"
    assert any(m.startswith(f"{access}:4: ") and "write 192.168.0 " in m for m in got)
    for n in (1, 2, 3):
        assert (
            f"{mt}:{n}: targetdomain{n}.com: local-host-names lists it, so mailertable line {n}"
            " is never used, as in Sendmail (mail for it is delivered locally)"
        ) in got
        assert any(
            m.startswith(f"{access}:{n}: To:targetdomain{n}.com RELAY is pointless") for m in got
        )
    assert len(got) == 7
    assert len(set(got)) == len(got)


def test_load_tables_overrides_and_missing(tmp_path: Path) -> None:
    d = write(tmp_path, local_host_names="a.example\n", relay_domains="b.example\n")
    other = tmp_path / "elsewhere"
    other.write_text("c.example smtp:[192.0.2.1]\n")
    t = load_tables(d, {"mailertable": other, "local-host-names": None})
    assert t.local_names == frozenset()
    assert t.relay_domains == {"b.example"}
    r = t.mailertable.lookup("c.example")
    assert r is not None and r.hops[0].host == "192.0.2.1"
    with pytest.raises(ValueError):
        load_tables(d, {"acces": other})


def test_load_tables_error_names_file(tmp_path: Path) -> None:
    write(tmp_path, virtusertable="a@b.example root\nbroken\n")
    with pytest.raises(TableError) as info:
        load_tables(tmp_path)
    assert info.value.path == str(tmp_path / "virtusertable")
    assert info.value.line == 2


def test_empty() -> None:
    t = Tables.empty()
    assert t.mailertable.lookup("x.example") is None
    assert t.access.connect("192.0.2.1", None) is None
    assert t.warnings == ()
    assert lint(t, blocklist_recipients=False) == []
    assert set(TABLE_FILES) >= {"access", "mailertable", "aliases"}


def test_lint_rules(tmp_path: Path) -> None:
    write(
        tmp_path,
        local_host_names="gw.example\nvirt.example\n",
        relay_domains="gw.example\nrelay.example\n",
        access=(
            "To:victim@gw.example REJECT\n"
            "To:spam.example DISCARD\n"
            "To:err.example ERROR:5.7.1:550 no\n"
            "From:friend.example RELAY\n"
            "To:ok.example OK\n"
            "Spam:abuse@x.example FRIEND\n"
            "Connect:user@x.example REJECT\n"
            "gw.example RELAY\n"
            "To:fine.example RELAY\n"
            "From:bad.example REJECT\n"
            "Connect:10 RELAY\n"
        ),
        mailertable=(
            "a.example error:nouser No such domain here\n"
            "b.example error:5.1.2:550 Fine\n"
            ".gw.example smtp:inner.example\n"
        ),
        virtusertable=(
            "x@virt.example error:nouser Nobody\n"
            "y@virt.example error:nouser 550 Fine\n"
            "@elsewhere.example root\n"
        ),
    )
    t = load_tables(tmp_path)
    got = messages(t)
    a = tmp_path / "access"
    mt = tmp_path / "mailertable"
    vt = tmp_path / "virtusertable"

    def has(prefix: str, fragment: str) -> bool:
        return any(m.startswith(prefix) and fragment in m for m in got)

    assert has(f"{a}:1: ", "blocklist_recipients")
    assert has(f"{a}:2: ", "blocklist_recipients")
    assert has(f"{a}:3: ", "blocklist_recipients")
    assert has(f"{a}:4: ", "no effect for From:")
    assert has(f"{a}:5: ", "no effect for To:")
    assert has(f"{a}:6: ", "delay_checks")
    assert has(f"{a}:7: ", "never matches")
    assert has(f"{a}:8: ", "pointless")
    assert has(f"{mt}:1: ", "'553 5.3.0 nouser No such domain here'")
    assert has(f"{vt}:1: ", "553 5.3.0 nouser Nobody")
    assert has(f"{vt}:3: ", "not in local-host-names")
    assert has("relay-domains: ", "gw.example is also in local-host-names")
    # Lines that are fine get no warning.
    for clean in (f"{a}:9: ", f"{a}:10: ", f"{a}:11: ", f"{mt}:2: ", f"{mt}:3: ", f"{vt}:2: "):
        assert not any(m.startswith(clean) for m in got), clean
    assert not any("relay.example" in m for m in got)
    # With blocklist_recipients the To: rejections are meaningful.
    with_bl = messages(t, blocklist=True)
    assert not any("blocklist_recipients" in m for m in with_bl)
    assert len(with_bl) == len(got) - 3


def test_examples_copy_fixed_has_no_warnings(tmp_path: Path) -> None:
    # The admin's fixes for every warning on the example set leave lint silent.
    for name in TABLE_FILES:
        if (EXAMPLES / name).exists():
            shutil.copy(EXAMPLES / name, tmp_path / name)
    (tmp_path / "access").write_text("192.168.0 RELAY\n192.168.1.1 RELAY\n192.168.1.2 RELAY\n")
    (tmp_path / "local-host-names").write_text("")
    (tmp_path / "access").write_text(
        (tmp_path / "access").read_text() + "To:targetdomain1.com RELAY\n"
    )
    assert messages(load_tables(tmp_path)) == []
