"""Sendmail-format tables, parsed once into one immutable snapshot.

Files keep their Sendmail names in the tables directory: ``access``, ``mailertable``,
``local-host-names``, ``relay-domains``, ``virtusertable``, ``domaintable``, ``aliases``.
A missing file is an empty table, as with Sendmail's optional maps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mailgate.tables.access import AccessTable
from mailgate.tables.aliases import AliasTable
from mailgate.tables.domaintable import DomainTable
from mailgate.tables.localnames import read_names
from mailgate.tables.mailertable import MailerTable
from mailgate.tables.maps import TableError, TableWarning
from mailgate.tables.virtusers import VirtUserTable

__all__ = ["TABLE_FILES", "TableError", "TableWarning", "Tables", "load_tables", "table_errors"]

TABLE_FILES = (
    "access",
    "mailertable",
    "local-host-names",
    "relay-domains",
    "virtusertable",
    "domaintable",
    "aliases",
)


@dataclass(frozen=True)
class Tables:
    access: AccessTable
    mailertable: MailerTable
    virtusers: VirtUserTable
    domaintable: DomainTable
    aliases: AliasTable
    local_names: frozenset[str]
    relay_domains: frozenset[str]
    warnings: tuple[TableWarning, ...]

    @classmethod
    def empty(cls) -> Tables:
        return cls(
            access=AccessTable.load(None),
            mailertable=MailerTable.load(None),
            virtusers=VirtUserTable.load(None),
            domaintable=DomainTable.load(None),
            aliases=AliasTable.load(None),
            local_names=frozenset(),
            relay_domains=frozenset(),
            warnings=(),
        )


def load_tables(directory: Path, files: Mapping[str, Path | None] | None = None) -> Tables:
    """Load every table from ``directory``; ``files`` may override a path by Sendmail name.

    An override of None means "no such table". Raises TableError naming file and line.
    """
    overrides = dict(files or {})
    unknown = set(overrides) - set(TABLE_FILES)
    if unknown:
        raise ValueError(f"unknown table name(s): {', '.join(sorted(unknown))}")

    def path(name: str) -> Path | None:
        if name in overrides:
            return overrides[name]
        return Path(directory) / name

    access = AccessTable.load(path("access"))
    mailertable = MailerTable.load(path("mailertable"))
    virtusers = VirtUserTable.load(path("virtusertable"))
    domaintable = DomainTable.load(path("domaintable"))
    aliases = AliasTable.load(path("aliases"))
    warnings = (
        *access.warnings,
        *mailertable.warnings,
        *virtusers.warnings,
        *domaintable.warnings,
        *aliases.warnings,
    )
    return Tables(
        access=access,
        mailertable=mailertable,
        virtusers=virtusers,
        domaintable=domaintable,
        aliases=aliases,
        local_names=read_names(path("local-host-names")),
        relay_domains=read_names(path("relay-domains")),
        warnings=tuple(warnings),
    )


def table_errors(directory: Path) -> list[TableError]:
    """Each table's first error, every table tried (``load_tables`` stops at the first):
    what ``mailgate check`` prints, so that one run shows every file to fix."""
    loaders = (
        ("access", AccessTable.load),
        ("mailertable", MailerTable.load),
        ("virtusertable", VirtUserTable.load),
        ("domaintable", DomainTable.load),
        ("aliases", AliasTable.load),
        ("local-host-names", read_names),
        ("relay-domains", read_names),
    )
    errors = []
    for name, load in loaders:
        try:
            load(Path(directory) / name)
        except TableError as exc:
            errors.append(exc)
    return errors
