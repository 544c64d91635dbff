"""``mailgate stop``, ``reload``, ``drain`` and ``status``: find the daemon through the
config's pid file, signal it, and read its answer in the state file (`runstate`). Exit codes
are the LSB init-script ones, so an init script can pass them on: ``status`` 0 running, 1 dead
with its pid file left, 3 not running, 4 unknown; ``stop`` (and ``drain``) of a daemon that is
not running succeeds, and ``reload`` of one is 7.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from mailgate import pidfile, runstate
from mailgate.config import Config
from mailgate.pidfile import Holder
from mailgate.queue.spool import queue_ids
from mailgate.runstate import RunState
from mailgate.service import DRAIN_SIGNAL, restart_only_changes

RUNNING = 0
FAILED = 1  # for status: dead, its pid file left behind
NOT_RUNNING = 3  # status
UNKNOWN = 4  # status: no pid file configured
NOT_RUNNING_ACTION = 7  # stop / reload: nothing to act on

POLL = 0.1  # seconds between looks at the state file while waiting for the daemon's answer


@dataclass(frozen=True)
class Outcome:
    code: int
    text: str

    @property
    def error(self) -> bool:
        """Printed on stderr."""
        return self.code not in (RUNNING, NOT_RUNNING)


@dataclass(frozen=True)
class Found:
    """A daemon that holds its pid file and has written its pid in it."""

    pid: int
    pid_file: Path
    state: RunState | None  # None: no state file, or one another daemon left


def _state_of(pid_file: Path, pid: int | None) -> RunState | None:
    state = runstate.read(runstate.state_path(pid_file))
    return state if state is not None and state.pid == pid else None


def locate(config: Config, action: str) -> Found | Outcome:
    """The running daemon, or the outcome to report when there is none."""
    path = config.pid_file
    if path is None:
        return Outcome(UNKNOWN, f"cannot {action}: the configuration has no pid_file")
    holder = pidfile.inspect(path)
    if not holder.running:
        code = RUNNING if action in ("stop", "drain") else NOT_RUNNING_ACTION
        return Outcome(code, f"not running ({_absence(path, holder)})")
    if holder.pid is None:
        return Outcome(FAILED, f"the daemon is still starting (pid file {path}); try again")
    return Found(holder.pid, path, _state_of(path, holder.pid))


def _absence(path: Path, holder: Holder) -> str:
    if not holder.exists:
        return f"no pid file {path}"
    return f"the stale pid file {path}" + (f" (pid {holder.pid})" if holder.pid else "")


def _signal(found: Found, sig: signal.Signals) -> Outcome | None:
    try:
        os.kill(found.pid, sig)
    except ProcessLookupError:
        return Outcome(NOT_RUNNING_ACTION, f"pid {found.pid} exited before it got {sig.name}")
    except PermissionError:
        return Outcome(FAILED, f"not allowed to signal pid {found.pid} (run as its user)")
    return None


def stop(config: Config, timeout: float) -> Outcome:
    """TERM, then wait until the daemon has let go of its pid file (it has exited)."""
    found = locate(config, "stop")
    if isinstance(found, Outcome):
        return found
    failed = _signal(found, signal.SIGTERM)
    if failed is not None:
        return failed if failed.code != NOT_RUNNING_ACTION else Outcome(RUNNING, failed.text)
    if not pidfile.wait_released(found.pid_file, timeout, POLL):
        return Outcome(FAILED, f"pid {found.pid} still running after {timeout:g} s")
    return Outcome(RUNNING, f"stopped (pid {found.pid})")


def drain(config: Config, deadline: float, stop_timeout: float) -> Outcome:
    """DRAIN_SIGNAL, then wait until the daemon exits by itself (no session in a
    transaction, the queue delivered) or ``deadline`` seconds have passed; then TERM, and
    wait ``stop_timeout`` more for it to exit. Undelivered mail stays queued."""
    found = locate(config, "drain")
    if isinstance(found, Outcome):
        return found
    failed = _signal(found, DRAIN_SIGNAL)
    if failed is not None:
        return failed if failed.code != NOT_RUNNING_ACTION else Outcome(RUNNING, failed.text)
    if pidfile.wait_released(found.pid_file, deadline, POLL):
        return Outcome(RUNNING, f"drained: queue delivered, daemon stopped (pid {found.pid})")
    failed = _signal(found, signal.SIGTERM)
    if failed is None and not pidfile.wait_released(found.pid_file, stop_timeout, POLL):
        return Outcome(FAILED, f"pid {found.pid} still running {stop_timeout:g} s after TERM")
    return Outcome(RUNNING, f"deadline of {deadline:g} s reached: daemon stopped (pid {found.pid})")


def reload(config: Config, timeout: float) -> Outcome:
    """HUP, then wait for the daemon to answer in its state file: done, or refused and why."""
    found = locate(config, "reload")
    if isinstance(found, Outcome):
        return found
    before = found.state.reloads if found.state is not None else None
    failed = _signal(found, signal.SIGHUP)
    if failed is not None:
        return failed
    if before is None:
        return Outcome(RUNNING, f"signalled pid {found.pid} (no state file to confirm it)")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _state_of(found.pid_file, found.pid)
        if state is not None and state.reloads > before:
            if state.reload_error is not None:
                return Outcome(
                    FAILED,
                    f"the daemon refused the new configuration and keeps the running one: "
                    f"{state.reload_error}",
                )
            done = f"reloaded (pid {found.pid})"
            changes = restart_only_changes(state, config)
            if changes:
                done += (
                    "\nmailgate: warning: these take effect only after a restart (the daemon "
                    f"keeps them): {'; '.join(changes)}"
                )
            return Outcome(RUNNING, done)
        if not pidfile.inspect(found.pid_file).running:
            return Outcome(FAILED, f"pid {found.pid} exited during the reload (see the log)")
        time.sleep(POLL)
    return Outcome(FAILED, f"signalled pid {found.pid}: no answer within {timeout:g} s")


def format_uptime(seconds: float) -> str:
    s = int(max(0, seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {s:02d}s"


def queue_size(spool_dir: Path, state: RunState | None = None) -> str:
    """Messages in the queue folder (``queue_count``), for ``mailgate status``."""
    queue = spool_dir / "queue"
    try:
        n, by_daemon = queue_count(spool_dir, state)
    except FileNotFoundError:
        return f"empty (no {queue} yet)"
    except PermissionError:
        return f"{queue} cannot be read by this user"
    text = f"{n} message{'s' if n != 1 else ''} in {queue}"
    if by_daemon and state is not None:
        text += f" (the daemon's count, {format_uptime(time.time() - state.updated)} ago)"
    return text


# A state file older than this says nothing about the queue now (it is written every
# REPORT_INTERVAL seconds while the daemon runs).
STATE_FRESH = 3 * runstate.REPORT_INTERVAL
# A smaller queue is counted by whoever asks: exact, and its names are listed in a few
# milliseconds; a deep one's listing takes seconds from a cold disk (a million: ~6 s).
COUNT_BELOW = 2000


def queue_count(spool_dir: Path, state: RunState | None) -> tuple[int, bool]:
    """The messages in the queue (``mailq``'s header, ``mailgate status``), and whether the
    count is the running daemon's: its last report (``daemon_queue_count``) for a queue of
    ``COUNT_BELOW`` or more, else a pass over the folder's names (OSError if it cannot be
    read)."""
    n = daemon_queue_count(state)
    if n is not None and n >= COUNT_BELOW:
        return n, True
    return sum(1 for _ in queue_ids(spool_dir / "queue")), False


def daemon_queue_count(state: RunState | None) -> int | None:
    """The queue's count as the running daemon last reported it (``Activity.queued``: a census
    now and then plus what entered and left since; at most ``REPORT_INTERVAL`` old), or None
    when there is no recent one."""
    if state is None or not state.activity.counted:
        return None
    if state.phase not in ("ready", "draining", "reloading"):
        return None
    if time.time() - state.updated > STATE_FRESH:
        return None
    return state.activity.queued


def running_state(config: Config) -> RunState | None:
    """The state file of the daemon running now on ``config``'s pid file, if any."""
    if config.pid_file is None:
        return None
    holder = pidfile.inspect(config.pid_file)
    if not holder.running or holder.pid is None:
        return None
    return _state_of(config.pid_file, holder.pid)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def status(config: Config) -> Outcome:
    """Running or not, pid, listeners, queue size, uptime."""
    path = config.pid_file
    if path is None:
        return Outcome(UNKNOWN, "unknown: the configuration has no pid_file")
    holder = pidfile.inspect(path)
    if not holder.running:
        if holder.exists:
            return Outcome(FAILED, f"not running, but {_absence(path, holder)} is left")
        return Outcome(NOT_RUNNING, "not running")
    if holder.pid is None:
        return Outcome(RUNNING, f"starting (pid file {path})")
    state = _state_of(path, holder.pid)
    queue = queue_size(config.spool_dir, state)
    if state is None:
        return Outcome(RUNNING, f"running (pid {holder.pid}; no state file)\n  queue      {queue}")
    now = time.time()
    workers = f", {state.workers} workers" if state.workers > 1 else ""
    phase = "" if state.phase == "ready" else f", {state.phase}"
    a = state.activity
    lines = [
        f"running (pid {state.pid}{workers}, up {format_uptime(now - state.started)}{phase})",
        f"  config     {state.config}"
        + (f" (generation {state.generation})" if state.generation else ""),
        f"  listening  {', '.join(state.listeners)}",
        f"  queue      {queue}",
        f"  sessions   {a.sessions} open; {a.received} messages received since start "
        f"(as of {format_uptime(now - state.updated)} ago)",
    ]
    if state.reloaded is not None:
        result = "took effect" if state.reload_error is None else f"refused: {state.reload_error}"
        lines.append(f"  reload     {_when(state.reloaded)}, {result}")
    return Outcome(RUNNING, "\n".join(lines))
