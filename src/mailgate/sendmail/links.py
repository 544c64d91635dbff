"""``mailgate install-sendmail-link``: Sendmail's program names, linked to the mailgate command
(which acts on the name it is called by: ``cli.main``).

The plan comes first and changes nothing: each name is created, kept (it leads to mailgate
already, itself or through another of the names, as Debian's ``/usr/lib/sendmail ->
../sbin/sendmail``), or found to be another MTA's. The command carries it out only when no
name is another MTA's, or with ``--force``, which keeps each such file as
``NAME.pre-mailgate`` (a second name for it, made before the new link replaces it in one
rename: there is no moment without a ``sendmail``).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# Where programs look for Sendmail (LSB: /usr/sbin/sendmail; /usr/lib/sendmail is older).
NAMES = ("usr/sbin/sendmail", "usr/lib/sendmail", "usr/bin/mailq", "usr/bin/newaliases")
BACKUP_SUFFIX = ".pre-mailgate"

Action = Literal["create", "keep", "other"]


class LinkError(Exception):
    pass


@dataclass(frozen=True)
class Step:
    path: Path  # the name
    target: Path  # the mailgate program it is to lead to
    action: Action
    found: str = ""  # what is there now, for "other"

    def describe(self) -> str:
        if self.action == "keep":
            return f"{self.path}: leads to mailgate already"
        if self.action == "create":
            return f"{self.path}: to be linked to {self.target}"
        return f"{self.path}: refusing: {self.found} (another MTA's; --force replaces it)"


def mailgate_program(given: str | None) -> Path:
    """The mailgate program to link to: ``given``, the one running, or the one on PATH."""
    if given is not None:
        path = Path(given).absolute()
    elif Path(sys.argv[0]).name == "mailgate" and Path(sys.argv[0]).is_file():
        path = Path(sys.argv[0]).absolute()
    else:
        found = shutil.which("mailgate")
        if found is None:
            raise LinkError("cannot find the mailgate program; give it with --target")
        path = Path(found).absolute()
    if not path.is_file() or not os.access(path, os.X_OK):
        raise LinkError(f"{path} is not an executable file")
    return path


def _one_hop(path: Path, root: Path) -> Path:
    """Where the symbolic link ``path`` points, read inside ``root``."""
    text = os.readlink(path)
    if text.startswith("/"):
        return root / text.lstrip("/")
    return Path(os.path.normpath(path.parent / text))


def plan(root: str | Path, target: Path) -> list[Step]:
    root = Path(root)
    names = [root / name for name in NAMES]
    steps = []
    for path in names:
        if not os.path.lexists(path):
            steps.append(Step(path, target, "create"))
            continue
        if path.is_symlink():
            hop = _one_hop(path, root)
            same_program = hop in names and hop.name == path.name
            if same_program or os.path.realpath(path) == os.path.realpath(target):
                steps.append(Step(path, target, "keep"))
                continue
            steps.append(Step(path, target, "other", f"a link to {os.readlink(path)}"))
        elif path.is_dir():
            raise LinkError(f"{path} is a directory")
        else:
            steps.append(Step(path, target, "other", "a file"))
    return steps


def _free_name(path: Path) -> Path:
    backup = path.with_name(path.name + BACKUP_SUFFIX)
    n = 1
    while os.path.lexists(backup):
        backup = path.with_name(f"{path.name}{BACKUP_SUFFIX}.{n}")
        n += 1
    return backup


def carry_out(step: Step) -> str:
    """Make ``step`` so; what was done, as a line. Raises OSError."""
    if step.action == "keep":
        return step.describe()
    path = step.path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.mailgate-{os.getpid()}")
    os.symlink(step.target, tmp)
    try:
        backup = None
        if step.action == "other":
            backup = _free_name(path)
            os.link(path, backup, follow_symlinks=False)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    if backup is not None:
        return f"{path}: linked to {step.target} (what was there is {backup})"
    return f"{path}: linked to {step.target}"
