"""Sendmail class files: local-host-names (class w) and relay-domains (class R)."""

from __future__ import annotations

from pathlib import Path

from mailgate.address import canon_domain
from mailgate.tables.maps import TableError, iter_lines

__all__ = ["read_names"]


def read_names(path: Path | None) -> frozenset[str]:
    """Every white-space separated name in the file, canonical; missing file = empty set.

    Address literals (``[192.0.2.1]``) are valid class-w members, as in Sendmail.
    """
    names: set[str] = set()
    for no, line in iter_lines(path):
        for token in line.split():
            if token.startswith("#"):
                # A comment after the names on the same line.
                break
            canon = canon_domain(token)
            if canon is None:
                raise TableError(path or "", no, f"{token!r} is not a valid host name")
            names.add(canon)
    return frozenset(names)
