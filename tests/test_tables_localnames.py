"""local-host-names and relay-domains (semantics §2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate.tables.localnames import read_names
from mailgate.tables.maps import TableError

EXAMPLES = Path(__file__).parent / "data" / "sendmail-examples"


def test_examples() -> None:
    assert read_names(EXAMPLES / "local-host-names") == frozenset(
        {"targetdomain1.com", "targetdomain2.com", "targetdomain3.com"}
    )


def test_tokens_case_dots_literals(tmp_path: Path) -> None:
    p = tmp_path / "local-host-names"
    p.write_text("# me\nGateway.Example.COM.  alias.example\n\n[192.0.2.1]\n[IPv6:2001:DB8::1]\n")
    assert read_names(p) == frozenset(
        {"gateway.example.com", "alias.example", "[192.0.2.1]", "[ipv6:2001:db8::1]"}
    )


def test_missing() -> None:
    assert read_names(None) == frozenset()
    assert read_names(Path("/nonexistent/relay-domains")) == frozenset()


@pytest.mark.parametrize("bad", ["user@example.com", "a..b", "[300.0.0.1]", "-x.example"])
def test_invalid(tmp_path: Path, bad: str) -> None:
    p = tmp_path / "relay-domains"
    p.write_text(f"ok.example\n{bad}\n")
    with pytest.raises(TableError) as info:
        read_names(p)
    assert info.value.line == 2
