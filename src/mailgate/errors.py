"""The one error shape for files the admin edits: ``path:line: message``, as a compiler prints it.

`config.ConfigError` (the TOML file) and `tables.maps.TableError` (the Sendmail tables) are its
two kinds; callers catch either name, or `SourceError` for both. `mailgate check` and a refused
reload print ``str(exc)``, so the admin's editor can jump to the line.
"""

from __future__ import annotations

import os

__all__ = ["SourceError", "where"]


def where(path: str, line: int | None) -> str:
    """``path:line``, or ``path`` alone when no line applies (a missing or unreadable file)."""
    return f"{path}:{line}" if line is not None else path


class SourceError(Exception):
    """A mistake at ``line`` of ``path`` (None: the file as a whole); ``str()`` is
    ``path:line: message``. ``args`` are the three parts, so the error pickles whole."""

    def __init__(self, path: str | os.PathLike[str], line: int | None, message: str) -> None:
        self.path = os.fspath(path)
        self.line = line
        self.message = message
        super().__init__(self.path, line, message)

    def __str__(self) -> str:
        return f"{where(self.path, self.line)}: {self.message}"
