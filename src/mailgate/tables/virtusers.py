"""FEATURE(virtusertable): virtual addresses of local domains → addresses (semantics §6).

For ``user+detail@dom`` the keys tried are ``user+detail@dom``, ``user++@dom`` (non-empty
detail), ``user+*@dom``, ``user@dom``, ``+*@dom``, ``@dom``; without detail ``user@dom``,
``@dom``. In the value ``%1`` is the user without detail, ``%2`` the detail and ``%3``
``+detail`` (empty when the address has no ``+``).
"""

from __future__ import annotations

from mailgate.tables.maps import (
    EntryTable,
    ErrorValue,
    MapEntry,
    TableError,
    parse_error_value,
)

__all__ = ["VirtUserTable", "parse_virt_value", "substitute"]

DETAIL_SEP = "+"


def parse_virt_value(value: str) -> ErrorValue | str:
    """An ``error:`` value as ErrorValue; anything else (user or address) as the string."""
    if value[:6].lower() == "error:":
        return parse_error_value(value[6:])
    return value


def substitute(value: str, args: tuple[str, ...]) -> str:
    """Sendmail's map_rewrite: ``%n`` → ``args[n-1]`` (empty if absent), ``%%`` → ``%``."""
    if "%" not in value:
        return value
    out: list[str] = []
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if c == "%" and i + 1 < n:
            nxt = value[i + 1]
            if nxt.isdigit():
                idx = int(nxt)
                out.append(args[idx - 1] if 1 <= idx <= len(args) else "")
                i += 2
                continue
            if nxt == "%":
                out.append("%")
                i += 2
                continue
        out.append(c)
        i += 1
    return "".join(out)


class VirtUserTable(EntryTable):
    """Parsed virtusertable: lower-case key → entry."""

    def __init__(self, path: str = "") -> None:
        super().__init__(path)
        self._map: dict[str, MapEntry] = {}

    def _add(self, e: MapEntry) -> None:
        key = e.key.lower()
        local, at, domain = key.rpartition("@")
        if not at or not domain:
            raise TableError(self.path, e.line, f"{e.key!r}: key must be user@domain or @domain")
        if domain.endswith("."):
            key = f"{local}@{domain[:-1]}"
        try:
            parsed = parse_virt_value(e.value)
        except ValueError as exc:
            raise TableError(self.path, e.line, f"{e.key}: {exc}") from None
        if isinstance(parsed, str) and (any(c.isspace() for c in parsed) or "," in parsed):
            raise TableError(
                self.path,
                e.line,
                f"{e.key}: the value must be one address or user; for a list, point it at an alias",
            )
        first = self._map.get(key)
        if self._is_duplicate(e, first.line if first is not None else None):
            return
        self._map[key] = e

    def __len__(self) -> int:
        return len(self._map)

    def entries(self) -> list[MapEntry]:
        return list(self._map.values())

    def domains(self) -> frozenset[str]:
        """Every domain named in a key (Sendmail's ``{VirtHost}`` candidates)."""
        return frozenset(k.rpartition("@")[2] for k in self._map)

    def lookup(self, local: str, domain: str) -> tuple[str, MapEntry] | None:
        """The substituted value and the entry that matched, or None."""
        d = domain.lower()
        if d.endswith("."):
            d = d[:-1]
        lc = local.lower()
        m = self._map
        plus = lc.find(DETAIL_SEP)
        if plus > 0:
            user, detail = lc[:plus], lc[plus + 1 :]
            # %n keep the case the sender used; only the keys are folded.
            args = (local[:plus], local[plus + 1 :], local[plus:])
            keys = [f"{lc}@{d}"]
            if detail:
                keys.append(f"{user}++@{d}")
            keys += [f"{user}+*@{d}", f"{user}@{d}", f"+*@{d}", f"@{d}"]
        else:
            args = (local, "", "")
            keys = [f"{lc}@{d}", f"@{d}"]
        for k in keys:
            e = m.get(k)
            if e is not None:
                return substitute(e.value, args), e
        return None
