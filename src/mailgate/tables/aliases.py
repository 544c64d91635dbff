"""aliases(5): local names → addresses, programs, files and :include: lists (semantics §8).

``name: value, value`` with continuation lines that start with white space, ``#`` comments,
quoted values (``"|/usr/bin/prog arg"``). Left-hand sides are case-insensitive.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mailgate.tables.maps import TableError, TableWarning, read_text, text_lines

__all__ = ["AliasTable", "AliasTarget", "parse_targets", "read_include"]


@dataclass(frozen=True)
class AliasTarget:
    """One expansion: ``address`` (``\\user`` = no further aliasing), ``program`` (command
    without the ``|``), ``file`` (absolute path) or ``include`` (path of the list)."""

    kind: Literal["address", "program", "file", "include"]
    value: str


def _split_list(text: str) -> list[str]:
    """Split at commas outside quotes, angle brackets and comments."""
    items: list[str] = []
    buf: list[str] = []
    quoted = False
    angle = 0
    paren = 0
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            buf.append(text[i : i + 2])
            i += 2
            continue
        if quoted:
            if c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "(":
            paren += 1
        elif c == ")" and paren:
            paren -= 1
        elif c == "<" and not paren:
            angle += 1
        elif c == ">" and angle and not paren:
            angle -= 1
        elif c == "," and not angle and not paren:
            items.append("".join(buf))
            buf = []
            i += 1
            continue
        buf.append(c)
        i += 1
    if quoted:
        raise ValueError("unbalanced '\"'")
    if angle or paren:
        raise ValueError("unbalanced '<' or '('")
    items.append("".join(buf))
    return items


def _strip_comments(item: str) -> str:
    """Remove RFC 822 ``(comments)`` outside quotes."""
    out: list[str] = []
    depth = 0
    quoted = False
    for c in item:
        if quoted:
            out.append(c)
            if c == '"':
                quoted = False
        elif c == '"' and not depth:
            quoted = True
            out.append(c)
        elif c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif not depth:
            out.append(c)
    return "".join(out).strip()


def _target(item: str) -> AliasTarget:
    raw = item.strip()
    if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
        inner = raw[1:-1].strip()
        if inner.startswith("|"):
            return _program(inner)
        if inner.startswith("/"):
            return AliasTarget("file", inner)
        # A quoted local part such as "john doe" stays an address as written.
    if raw.startswith("|"):
        return _program(raw)
    if raw[:9].lower() == ":include:":
        path = raw[9:].strip()
        if not path:
            raise ValueError(":include: needs a file name")
        return AliasTarget("include", path)
    if raw.startswith("/"):
        return AliasTarget("file", raw)
    addr = _strip_comments(raw)
    lt = addr.rfind("<")
    if lt >= 0 and addr.endswith(">") and addr[:lt].count('"') % 2 == 0:
        # "Full Name <user@example.com>": the route-addr is the address.
        addr = addr[lt + 1 : -1].strip()
    if not addr:
        raise ValueError(f"empty address in {item.strip()!r}")
    if any(c.isspace() for c in addr) and not (addr.startswith('"') or '"@' in addr):
        raise ValueError(f"{addr!r} is not one address (missing comma?)")
    return AliasTarget("address", addr)


def _program(text: str) -> AliasTarget:
    cmd = text[1:].strip()
    if not cmd:
        raise ValueError("'|' needs a program")
    return AliasTarget("program", cmd)


def parse_targets(text: str) -> tuple[AliasTarget, ...]:
    """The targets of one right-hand side; raises ValueError if malformed or empty."""
    targets = tuple(_target(item) for item in _split_list(text) if item.strip())
    if not targets:
        raise ValueError("no addresses on the right-hand side")
    return targets


class AliasTable:
    """Parsed aliases file: lower-case name → targets."""

    def __init__(self, path: str = "") -> None:
        self.path = path
        self._map: dict[str, tuple[AliasTarget, ...]] = {}
        self._lines: dict[str, int] = {}
        self.warnings: list[TableWarning] = []

    @classmethod
    def load(cls, path: Path | None) -> AliasTable:
        table = cls(str(path) if path is not None else "")
        table._parse(read_text(path))
        return table

    @classmethod
    def from_text(cls, text: str, path: Path | str = "") -> AliasTable:
        table = cls(str(path))
        table._parse(text)
        return table

    def _parse(self, text: str) -> None:
        # Group physical lines into logical ones: continuation lines start with white space.
        logical: list[tuple[int, list[str]]] = []
        for no, line in enumerate(text_lines(text), 1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            if line[0] in " \t":
                if not logical:
                    raise TableError(self.path, no, "continuation line without an alias before it")
                logical[-1][1].append(line.strip())
                continue
            logical.append((no, [line.rstrip()]))
        for no, parts in logical:
            self._add(no, " ".join(parts))

    def _add(self, no: int, line: str) -> None:
        name, colon, rhs = line.partition(":")
        name = name.strip()
        if not colon:
            raise TableError(self.path, no, f"{line!r}: missing ':' after the alias name")
        if len(name) >= 2 and name[0] == '"' and name[-1] == '"':
            name = name[1:-1]
        if not name or any(c.isspace() for c in name):
            raise TableError(self.path, no, f"illegal alias name {name!r}")
        try:
            targets = parse_targets(rhs)
        except ValueError as exc:
            raise TableError(self.path, no, f"{name}: {exc}") from None
        key = name.lower()
        if key in self._map:
            # newaliases warns and the later line replaces the earlier one.
            self.warnings.append(
                TableWarning(
                    self.path,
                    no,
                    f"duplicate alias name {name}: replaces line {self._lines[key]}",
                )
            )
        self._map[key] = targets
        self._lines[key] = no

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._map

    def __len__(self) -> int:
        return len(self._map)

    def names(self) -> list[str]:
        return list(self._map)

    def line_of(self, name: str) -> int | None:
        return self._lines.get(name.lower())

    def lookup(self, name: str) -> tuple[AliasTarget, ...] | None:
        return self._map.get(name.lower())


def read_include(path: Path | str) -> tuple[AliasTarget, ...]:
    """The targets listed in an ``:include:`` file (comma- or line-separated, ``#`` comments).

    A missing file is an error here (unlike tables): the alias points at it explicitly.
    """
    p = Path(path)
    if not p.exists():
        raise TableError(p, None, "included file does not exist")
    targets: list[AliasTarget] = []
    for no, line in enumerate(text_lines(read_text(p)), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        try:
            targets.extend(_target(item) for item in _split_list(s) if item.strip())
        except ValueError as exc:
            raise TableError(p, no, str(exc)) from None
    return tuple(targets)
