"""``makemap`` and ``newaliases`` for a gateway whose tables are read as text.

Sendmail compiles ``access`` into ``access.db``; mailgate reads ``access`` itself, so there is
nothing to build. What the old ``/etc/mail/Makefile`` still gets from these commands is the
check: the table is parsed by the same code the daemon uses (`mailgate.tables`), every bad line
is reported as ``file:line: message``, and the exit status is the one Sendmail's programs give
(makemap: 65 for bad lines, 64 for usage, 73 for an unknown map type; newaliases: 70 for bad
lines, as ``sendmail -bi`` exits).

All errors of a table are reported, not only the first: the loaders stop at the first bad
line, so that line is blanked out and the table parsed again, as often as there are errors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mailgate.tables.access import AccessTable
from mailgate.tables.aliases import AliasTable
from mailgate.tables.domaintable import DomainTable
from mailgate.tables.mailertable import MailerTable
from mailgate.tables.maps import MapEntry, TableError, TableWarning, read_map, text_lines
from mailgate.tables.virtusers import VirtUserTable

__all__ = [
    "EX_CANTCREAT",
    "EX_DATAERR",
    "EX_SOFTWARE",
    "EX_USAGE",
    "MAP_TYPES",
    "Report",
    "check_aliases",
    "check_map",
    "table_kind",
]

EX_USAGE = 64
EX_DATAERR = 65
EX_SOFTWARE = 70
EX_CANTCREAT = 73

# The map types Sendmail's makemap builds. mailgate reads the text whatever the type was.
MAP_TYPES = ("hash", "btree", "dbm", "cdb", "implicit")

MAX_ERRORS = 100  # then the report stops, as a compiler does

_LOADERS: dict[str, Callable[[list[MapEntry], str], object]] = {
    "access": AccessTable.from_entries,
    "mailertable": MailerTable.from_entries,
    "virtusertable": VirtUserTable.from_entries,
    "domaintable": DomainTable.from_entries,
}


@dataclass
class Report:
    """What a check found: errors make the command fail, warnings do not."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    entries: int = 0


def table_kind(mapname: str) -> str:
    """``/etc/mail/access.db`` → ``access``: the file name without a map file suffix."""
    name = Path(mapname).name
    for suffix in (".db", ".dir", ".pag", ".cdb"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _all_errors(
    text: str, load: Callable[[str], list[TableWarning]], report: Report
) -> list[TableWarning]:
    """Load ``text`` again and again, blanking each bad line, until it loads; the warnings
    of the last load."""
    lines = text_lines(text)
    errors: list[TableError] = []
    try:
        while True:
            try:
                return load("\n".join(lines))
            except TableError as exc:
                errors.append(exc)
                if exc.line is None or not 0 < exc.line <= len(lines) or not lines[exc.line - 1]:
                    return []
                if len(errors) >= MAX_ERRORS:
                    report.errors.append(f"{exc.path}: too many errors, giving up")
                    return []
                lines[exc.line - 1] = ""
    finally:
        # In the order of the file, whichever parsing step found them.
        report.errors[:0] = [str(e) for e in sorted(errors, key=lambda e: e.line or 0)]


def check_map(mapname: str, text: str, *, fold: bool = True, replace: bool = False) -> Report:
    """Check ``text`` (makemap's standard input) as the table ``mapname`` names.

    Duplicate keys are errors, as makemap makes them (without ``-r``); with ``-r`` Sendmail's
    map kept the last line while mailgate, reading the text, uses the first: an error too.
    ``fold`` is makemap's key folding (off with ``-f``).
    """
    kind = table_kind(mapname)
    shown = Path(mapname).with_name(kind)
    if kind == "aliases":  # makemap's -a form of newaliases: the aliases format
        return _check_alias_text(text, shown)
    report = Report()
    first: dict[str, int] = {}  # key (folded) → the line mailgate uses
    duplicates: dict[int, str] = {}  # line → key as written there

    def load(body: str) -> list[TableWarning]:
        entries = read_map(shown, body)
        first.clear()
        duplicates.clear()
        for e in entries:
            key = e.key.lower() if fold else e.key
            if key in first:
                duplicates[e.line] = e.key
            else:
                first[key] = e.line
        report.entries = len(first)
        loader = _LOADERS.get(kind)
        if loader is None:
            return []
        table = loader(entries, str(shown))
        found: list[TableWarning] = getattr(table, "warnings", [])
        return found

    warnings = _all_errors(text, load, report)
    if kind not in _LOADERS:
        report.warnings.append(
            f"{shown}: mailgate does not read a table named {kind}; only its format was checked"
        )
    for line, key in sorted(duplicates.items()):
        if replace:
            report.errors.append(
                f"{shown}:{line}: key {key}: duplicate key; with -r Sendmail used this line,"
                f" mailgate reads the text and uses line {first[key.lower() if fold else key]}:"
                " remove one of them"
            )
        else:
            report.errors.append(f"{shown}:{line}: key {key}: duplicate key")
    report.warnings += [str(w) for w in warnings if w.line not in duplicates]
    if not fold:
        report.warnings.append(
            f"{shown}: -f keeps the case of keys, but mailgate's lookups ignore case"
        )
    return report


def check_aliases(path: Path) -> Report:
    """``newaliases``: the aliases file as the daemon reads it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Report(warnings=[f"cannot open {path}: No such file or directory"])
    except (OSError, UnicodeDecodeError) as exc:
        return Report(errors=[f"{path}: cannot read: {exc}"])
    return _check_alias_text(text, path)


def _check_alias_text(text: str, path: Path) -> Report:
    report = Report()
    table: list[AliasTable] = []

    def load(body: str) -> list[TableWarning]:
        table[:] = [AliasTable.from_text(body, path)]
        return table[0].warnings

    report.warnings += [str(w) for w in _all_errors(text, load, report)]
    report.entries = len(table[0]) if table else 0
    return report
