"""The daemon's state file: what ``mailgate status`` shows, and what a health check or a
metrics exporter can read, without a control socket or a question to the daemon.

One small JSON object next to the pid file (``mailgate.pid`` → ``mailgate.state.json``),
written by the process that owns the pid file (the master, with workers) when it is ready,
around each reload, at stop, every ``REPORT_INTERVAL`` seconds and on SIGUSR2, always in one
rename, so a reader never sees half of it. It says what the daemon last knew; whether the
daemon is alive at all is the pid file's lock (``pidfile.inspect``): a state file left by a
daemon that was killed is stale, and readers must check the lock first.

Fields are only ever added; ``read`` ignores the ones it does not know.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from mailgate import __version__

REPORT_INTERVAL = 10.0  # seconds between refreshes of the counts (and systemd's STATUS line)

Phase = Literal["starting", "ready", "reloading", "draining", "stopping"]


@dataclass(frozen=True)
class Activity:
    """Counts of the whole daemon (the workers' summed; the queue, which each counts whole, is
    not), as of ``RunState.updated``."""

    sessions: int = 0  # open SMTP sessions
    received: int = 0  # messages accepted since start
    queued: int = 0  # messages in the queue, as mailq counts them (delivering ones too)
    delivering: int = 0  # attempts in progress
    # ``queued`` is the queue's count (a census of the folder is in): what ``mailq`` and
    # ``mailgate status`` may print instead of counting the folder themselves.
    counted: bool = False

    def __add__(self, other: Activity) -> Activity:
        return Activity(
            self.sessions + other.sessions,
            self.received + other.received,
            self.queued + other.queued,
            self.delivering + other.delivering,
        )


@dataclass(frozen=True)
class RunState:
    pid: int  # the pid in the pid file: the one process to signal
    started: float  # time.time() at start
    config: str  # the TOML file, or "<embedded default config>"
    listeners: list[str]  # "ip:port", as the listen setting gives them
    workers: int
    phase: Phase
    updated: float  # time.time() of this write
    # Reload requests answered so far, taking effect or refused: `mailgate reload` signals,
    # then waits for this to move, and reports ``reload_error``.
    reloads: int = 0
    reloaded: float | None = None  # when the last one was answered
    reload_error: str | None = None  # file:line: why it was refused; None: it took effect
    activity: Activity = field(default_factory=Activity)
    version: str = __version__
    # `Snapshot.generation` of the config in force: what `mailgate check` printed for it.
    generation: str | None = None
    # Settings a reload cannot change (bound or opened at the start): `mailgate reload`
    # says when the new file changes them. "" for none (metrics) or not known (an old file).
    spool_dir: str = ""
    metrics: str = ""


def state_path(pid_file: Path) -> Path:
    return pid_file.with_suffix(".state.json")


def write(path: Path, state: RunState) -> None:
    """Replace the file at ``path`` in one rename; a failure is the caller's to ignore."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            json.dump(asdict(state), out, indent=1)
            out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _known(cls: type[Any], data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def read(path: Path) -> RunState | None:
    """The state at ``path``; None when there is none or it cannot be read as one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data = _known(RunState, data)
        data["activity"] = Activity(**_known(Activity, data.get("activity") or {}))
        return RunState(**data)
    except (OSError, ValueError, TypeError):
        return None


def remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
