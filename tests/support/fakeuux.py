"""A stand-in for ``uux`` (the one program the UUCP mailers run) that records each call.

:class:`FakeUux` writes ``<dir>/bin/uux``, a shell script that saves its arguments (argv after
argv[0], which a ``#!`` script cannot see) and its stdin under ``<dir>/calls``, writes the
text :meth:`FakeUux.answer` gave to stderr and exits with its status (0 unless told). Its
folder can go first in PATH (the mailer looks a bare ``uux`` up there) or be named in
``[uucp] uux``. The mailer gives the program an environment of its own, so the script's
settings are files, not variables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Call", "FakeUux"]

_SCRIPT = """#!/bin/sh
# One call: <ns>.<pid>.argv (NUL-terminated words) and <ns>.<pid>.stdin, named by time so that
# they sort in call order; the .argv file last, so a complete call is one with an .argv.
calls={calls}
name="$calls/$(date +%s%N).$$"
cat > "$name.stdin"
for word in "$@"; do printf '%s\\0' "$word"; done > "$name.tmp"
mv "$name.tmp" "$name.argv"
[ -f {answer}/stderr ] && cat {answer}/stderr >&2
exit "$(cat {answer}/status 2>/dev/null || echo 0)"
"""


@dataclass(frozen=True)
class Call:
    argv: list[str]  # argv[1:]
    stdin: bytes


class FakeUux:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.calls_dir = directory / "calls"
        self.answer_dir = directory / "answer"
        for d in (directory / "bin", self.calls_dir, self.answer_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.path = directory / "bin" / "uux"
        self.path.write_text(_SCRIPT.format(calls=self.calls_dir, answer=self.answer_dir))
        self.path.chmod(0o755)

    @property
    def bin_dir(self) -> Path:
        return self.path.parent

    def answer(self, status: int, stderr: str = "") -> None:
        """From now on, exit with ``status`` after writing ``stderr`` (a line) to stderr."""
        (self.answer_dir / "status").write_text(f"{status}\n")
        (self.answer_dir / "stderr").write_text(stderr)

    def calls(self) -> list[Call]:
        """The completed calls so far, in the order they were made."""
        out = []
        for argv_file in sorted(self.calls_dir.glob("*.argv")):
            words = argv_file.read_bytes().split(b"\0")[:-1]
            stdin = argv_file.with_suffix(".stdin").read_bytes()
            out.append(Call([w.decode() for w in words], stdin))
        return out

    def path_with_bin(self) -> str:
        """PATH with this fake's folder first."""
        return f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
