"""The text format ``makemap`` reads: one ``key value`` pair a line, ``#`` comments.

Shared by access, mailertable, virtusertable and domaintable. Errors carry the file and line so
``mailgate check`` can point at the exact spot, as the admin would edit it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Self

from mailgate.errors import SourceError, where
from mailgate.reply import Reply, split_enhanced

__all__ = [
    "ErrorValue",
    "MapEntry",
    "TableError",
    "TableWarning",
    "iter_lines",
    "iter_map",
    "parse_error_value",
    "read_map",
    "read_text",
    "text_lines",
]


class TableError(SourceError):
    """A table line mailgate cannot use; ``str()`` is ``path:line: message``."""


@dataclass(frozen=True)
class TableWarning:
    """A legal line that is probably not what the admin meant."""

    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        return f"{where(self.path, self.line)}: {self.message}"


@dataclass(frozen=True)
class MapEntry:
    key: str
    value: str
    line: int


@dataclass(frozen=True)
class ErrorValue:
    """The reply an ``error:`` entry asks for."""

    code: int
    dsn: str | None
    text: str
    # The sysexits status a keyword names (``error:nouser 550 …``: 67), which Sendmail's
    # command line exits with; None: the one its enhanced code gives (``dsn_exit_status``).
    exit: int | None = None

    def reply(self, addr: str | None) -> Reply:
        """Sendmail prefixes permanent errors with ``<addr>...``, temporary ones not (§4, §5)."""
        if self.code >= 500 and addr is not None:
            return Reply(self.code, self.dsn, f"{addr}... {self.text}")
        return Reply(self.code, self.dsn, self.text)


def read_text(path: Path | None) -> str:
    """The file's text, ``""`` when ``path`` is None or missing; bad UTF-8 → TableError."""
    if path is None:
        return ""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ""
    except IsADirectoryError:
        raise TableError(path, None, "is a directory, not a table file") from None
    except OSError as exc:
        raise TableError(path, None, f"cannot read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TableError(path, line, f"not valid UTF-8 (byte {exc.start})") from None


def text_lines(text: str) -> list[str]:
    """The file's lines as an editor and Sendmail (fgets) count them: split at LF only.

    Not ``str.splitlines()``, which also breaks at CR, FF, VT, FS/GS/RS, NEL, U+2028 and
    U+2029: a line holding one of those became two, and every error after it named the wrong
    line. A CR before the LF (a CRLF file) is trailing white space, stripped like the rest.
    """
    return text.split("\n")


def iter_lines(path: Path | None) -> Iterator[tuple[int, str]]:
    """(line number, line) for each line that is neither blank nor a ``#`` comment."""
    text = read_text(path)
    for no, line in enumerate(text_lines(text), 1):
        # Cheap first test: most lines start with a key character.
        if not line or line[0] == "#":
            continue
        s = line.strip()
        if s and s[0] != "#":
            yield no, s


def iter_map(path: Path | None, text: str | None = None) -> Iterator[tuple[int, str, str]]:
    """(line, key, value) for each map line; a key without value → TableError. ``text`` is
    the file's content when it was read already (``makemap``'s standard input)."""
    # One pass without iter_lines(): this loop is most of the load time of a big access db.
    for no, line in enumerate(text_lines(read_text(path) if text is None else text), 1):
        parts = line.split(None, 1)
        if not parts or parts[0][0] == "#":
            continue
        if len(parts) == 1:
            raise TableError(path or "", no, f"key {parts[0]!r} has no value")
        yield no, parts[0], parts[1].rstrip()


def read_map(path: Path | None, text: str | None = None) -> list[MapEntry]:
    """All entries of a makemap-format file; a missing file or None is an empty map."""
    return [MapEntry(key, value, no) for no, key, value in iter_map(path, text)]


def _check_dsn(dsn: str, code: int) -> str:
    parts = dsn.split(".")
    if (
        len(parts) != 3
        or not all(p.isdigit() for p in parts)
        or parts[0] not in ("4", "5")
        or len(parts[1]) > 3
        or len(parts[2]) > 3
    ):
        raise ValueError(f"invalid enhanced status code {dsn!r}")
    if parts[0] != str(code)[0]:
        raise ValueError(f"enhanced status code {dsn} does not match reply code {code}")
    return dsn


def _code(word: str) -> int | None:
    if len(word) == 3 and word.isdigit() and word[0] in "45":
        return int(word)
    return None


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        return text[1:-1].strip()
    if text.startswith('"') or (text.endswith('"') and text.count('"') == 1):
        raise ValueError("unbalanced '\"'")
    return text


def _code_text(text: str, dsn: str | None) -> ErrorValue | None:
    """``NNN [D.S.N] text`` → ErrorValue, or None when ``text`` does not start with a code."""
    head, _, rest = text.partition(" ")
    code = _code(head)
    if code is None:
        return None
    rest = rest.strip()
    enh, rest2 = split_enhanced(rest)
    if enh is not None:
        if dsn is not None and enh != dsn:
            raise ValueError(f"two enhanced status codes: {dsn} and {enh}")
        dsn, rest = enh, rest2.strip()
    if dsn is None:
        dsn = f"{str(code)[0]}.0.0"
    return ErrorValue(code, _check_dsn(dsn, code), rest)


# sysexits names Sendmail's error mailer takes as its "host" (e.g. "error:nouser 550 text"),
# and the status each names (os.EX_NOUSER: 67).
_SYSEXITS = {
    name: getattr(os, f"EX_{name.upper()}")
    for name in (
        "usage", "dataerr", "noinput", "nouser", "nohost", "unavailable", "software", "oserr",
        "osfile", "cantcreat", "ioerr", "tempfail", "protocol", "noperm", "config",
    )
}  # fmt: skip


def parse_error_value(
    text: str, *, keyword: bool = True, default_exit: int | None = None
) -> ErrorValue:
    """Parse what follows ``error:`` in an access, mailertable or virtusertable value.

    Forms: ``D.S.N:NNN text``, ``"NNN text"``, ``NNN text`` and (``keyword``) ``nouser
    [NNN] text``, whose sysexits name is the status Sendmail's command line exits with. A
    text with no reply code at all is what Sendmail sends as ``553 5.3.0 <text>`` (its
    misparse of ``error:nouser text``). The mailertable takes no keyword (Sendmail's
    MailerToTriple gives the error mailer ``$@`` only for a DSN: ``error:nouser 550 x`` is
    the text ``nouser 550 x``) and, without a DSN, exits EX_UNAVAILABLE (``default_exit``).
    Raises ValueError on a malformed value.
    """
    text = text.strip()
    if not text:
        raise ValueError("error: needs a reply code and text, e.g. error:5.7.1:550 Refused")
    head, colon, rest = text.partition(":")
    if colon and head.count(".") == 2 and " " not in head and head[:1].isdigit():
        # D.S.N:NNN text (the text may be quoted).
        body = _unquote(rest)
        ev = _code_text(body, head)
        if ev is None:
            raise ValueError(f"expected a reply code after {head}:, got {body!r}")
        return ev
    body = _unquote(text)
    ev = _code_text(body, None)
    if ev is not None:
        return replace(ev, exit=default_exit)
    word, _, after = body.partition(" ")
    if keyword and word.lower() in _SYSEXITS:
        ev = _code_text(after.strip(), None)
        if ev is not None:
            return replace(ev, exit=_SYSEXITS[word.lower()])
    if word[:3].isdigit():
        # "250 ok", "550Text", "55 text": a code was meant but is not a usable error code.
        raise ValueError(f"expected a 4xx or 5xx reply code, got {word!r}")
    return ErrorValue(553, "5.3.0", body, default_exit)


class EntryTable:
    """A table built entry by entry from a makemap-format file (mailertable, virtusertable,
    domaintable): the shared ``load`` / ``from_entries``; subclasses define ``_add``."""

    def __init__(self, path: str = "") -> None:
        self.path = path
        self.warnings: list[TableWarning] = []

    @classmethod
    def load(cls, path: Path | None) -> Self:
        return cls.from_entries(read_map(path), path if path is not None else "")

    @classmethod
    def from_entries(cls, entries: Iterable[MapEntry], path: Path | str = "") -> Self:
        table = cls(str(path))
        for e in entries:
            table._add(e)
        return table

    def _add(self, e: MapEntry) -> None:
        raise NotImplementedError

    def _is_duplicate(self, e: MapEntry, first_line: int | None) -> bool:
        """True (with a warning) when the key was already on ``first_line``: as makemap does,
        the first line wins."""
        if first_line is None:
            return False
        text = f"duplicate key {e.key}: line {first_line} is used (as makemap does)"
        self.warnings.append(TableWarning(self.path, e.line, text))
        return True
