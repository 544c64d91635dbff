"""FEATURE(domaintable): old domain → new domain, for every address (semantics §7).

Sendmail's rule is ``R$* < @ $+ > $*  $: $1 < @ $(domaintable $2 $) > $3`` in ruleset 3: one
lookup of the whole host part, case-insensitive, applied once (the result is not looked up
again), and only after address literals have been set aside. There is no parent-domain
matching; a leading-dot key would never match, so it is refused.
"""

from __future__ import annotations

from mailgate.address import is_valid_domain
from mailgate.tables.maps import EntryTable, MapEntry, TableError

__all__ = ["DomainTable"]


def _canon(name: str) -> str:
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


class DomainTable(EntryTable):
    def __init__(self, path: str = "") -> None:
        super().__init__(path)
        self._map: dict[str, str] = {}
        self._lines: dict[str, int] = {}

    def _add(self, e: MapEntry) -> None:
        for what, name in (("key", e.key), ("value", e.value)):
            if name.startswith("[") or not is_valid_domain(name):
                raise TableError(self.path, e.line, f"{what} {name!r} is not a domain name")
        key = _canon(e.key)
        if self._is_duplicate(e, self._lines.get(key)):
            return
        self._map[key] = _canon(e.value)
        self._lines[key] = e.line

    def __len__(self) -> int:
        return len(self._map)

    def items(self) -> list[tuple[str, str, int]]:
        """(old, new, line) for lint."""
        return [(k, v, self._lines[k]) for k, v in self._map.items()]

    def rewrite(self, domain: str) -> str:
        """The replacement domain, or ``domain`` lower-cased (no trailing dot) if none."""
        d = _canon(domain)
        if d.startswith("["):
            return d
        return self._map.get(d, d)
