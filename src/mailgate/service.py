"""What the init system and ``mailgate status`` see of the daemon: the pid file, the state
file, systemd's notifications, and the wait of ``serve --daemon``'s caller.

`Lifecycle` belongs to the one process that owns the pid file: the gateway itself with one
worker, the master with several (it sums what its workers report, `master.WorkerReports`).
A gateway process tells its `ServiceEvents` when it listens, reloads, counts and stops, and
never knows which of the two is listening.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import replace
from typing import Any, Protocol

from mailgate import maillog, runstate
from mailgate.config import Config
from mailgate.pidfile import PidFile
from mailgate.runstate import Activity, RunState
from mailgate.sdnotify import Notifier

# `mailgate drain`: TTIN is sent by a terminal only to a background process that reads it,
# which the daemon never does (WINCH, Apache's graceful-stop, comes with every resize of the
# terminal a foreground `mailgate serve` runs in).
DRAIN_SIGNAL = signal.SIGTTIN


class ServiceEvents(Protocol):
    """What a gateway process says about itself."""

    def listening(self) -> None:
        """Every listener accepts: the daemon is ready."""

    def reloading(self) -> None: ...

    def reloaded(self, error: str | None, generation: str | None = None) -> None:
        """A reload was answered: ``error`` (``file:line: …``) if it was refused, else the
        new snapshot's ``generation``."""

    def activity(self, counts: Activity) -> None:
        """This process's counts, every `runstate.REPORT_INTERVAL`."""

    def draining(self) -> None:
        """`mailgate drain`: new sessions get 421, the queue is being delivered."""

    def stopping(self) -> None: ...


class Unobserved:
    """`ServiceEvents` for a gateway nobody watches (built directly, in tests)."""

    def listening(self) -> None:
        pass

    def reloading(self) -> None:
        pass

    def reloaded(self, error: str | None, generation: str | None = None) -> None:
        pass

    def activity(self, counts: Activity) -> None:
        pass

    def draining(self) -> None:
        pass

    def stopping(self) -> None:
        pass


def listen_text(config: Config) -> list[str]:
    return [listener.label for listener in config.listeners]


def metrics_text(config: Config) -> str:
    """``[metrics] listen`` as the state file keeps it: ``ip:port``, or "" when off."""
    if config.metrics.listen is None:
        return ""
    host, port = config.metrics.listen
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def restart_only_changes(state: RunState, config: Config) -> list[str]:
    """What ``config`` changes that the running daemon (``state``) keeps until a restart:
    its listening sockets, its spool, its metrics socket, its number of processes (as the
    daemon's own reload warns in the maillog)."""
    changes = []
    known = bool(state.spool_dir)  # the state file of a daemon that records them
    if state.listeners != listen_text(config):
        changes.append(f"listen {', '.join(state.listeners)} → {', '.join(listen_text(config))}")
    if known and state.spool_dir != str(config.spool_dir):
        changes.append(f"spool_dir {state.spool_dir} → {config.spool_dir}")
    new_metrics = metrics_text(config)
    if known and state.metrics != new_metrics:
        changes.append(f"[metrics] listen {state.metrics or 'off'} → {new_metrics or 'off'}")
    if state.workers != config.worker_processes:  # the processes forked at the start
        changes.append(f"workers {state.workers} → {config.worker_processes}")
    return changes


def status_line(state: RunState) -> str:
    """systemd's STATUS: one line, what ``systemctl status`` shows under the unit."""
    if state.phase == "starting":
        return "Starting"
    if state.phase == "reloading":
        return "Reloading the configuration"
    if state.phase == "stopping":
        return "Stopping: finishing the sessions and deliveries in progress"
    if state.phase == "draining":
        return (
            "Draining: new sessions get 421, sessions in progress finish, the queue is "
            f"delivered; {state.activity.queued} queued, {state.activity.delivering} delivering"
        )
    a = state.activity
    workers = f" ({state.workers} workers)" if state.workers > 1 else ""
    line = (
        f"SMTP on {', '.join(state.listeners)}{workers}; {a.sessions} sessions, "
        f"{a.queued} queued, {a.delivering} delivering, {a.received} received"
    )
    if state.reload_error is not None:
        line += f"; last reload refused, previous configuration in force: {state.reload_error}"
    return line


class Lifecycle(ServiceEvents):
    """The daemon's side of service control: claim the pid file before anything else, then
    keep the pid file, the state file and systemd in step with the daemon's life."""

    def __init__(
        self,
        config: Config,
        *,
        report_fd: int | None = None,
        notifier: Notifier | None = None,
        generation: str | None = None,
    ) -> None:
        self.notifier = notifier if notifier is not None else Notifier.from_environ()
        self.pid_file = PidFile(config.pid_file) if config.pid_file else None
        self.state_file = runstate.state_path(config.pid_file) if config.pid_file else None
        self.report_fd = report_fd  # `serve --daemon`'s caller waits on it: `detach`
        now = time.time()
        self.state = RunState(
            pid=os.getpid(),
            started=now,
            config=config.source,
            listeners=listen_text(config),
            workers=config.worker_processes,
            phase="starting",
            updated=now,
            generation=generation,
            spool_dir=str(config.spool_dir),
            metrics=metrics_text(config),
        )

    def claim(self) -> None:
        """Before binding or touching the spool; raises `pidfile.AlreadyRunning`."""
        if self.pid_file is None:
            return
        self.pid_file.claim()
        if self.pid_file.stale_pid is not None:
            maillog.stale_pid_file(self.pid_file.path, self.pid_file.stale_pid)

    # -- ServiceEvents ---------------------------------------------------------------------
    def listening(self) -> None:
        pid = os.getpid()
        if self.pid_file is not None:
            self.pid_file.write(pid)
        self._update(pid=pid, phase="ready")
        self.notifier.ready(status_line(self.state))
        self._report(f"ready {pid}")

    def reloading(self) -> None:
        if self.state.phase == "ready":  # a HUP while starting or stopping changes no phase
            self._update(phase="reloading")
        self.notifier.reloading(status_line(self.state))

    def reloaded(self, error: str | None, generation: str | None = None) -> None:
        phase = "ready" if self.state.phase == "reloading" else self.state.phase
        self._update(
            phase=phase,
            reloads=self.state.reloads + 1,
            reloaded=time.time(),
            reload_error=error,
            generation=generation if error is None and generation else self.state.generation,
        )
        if phase == "ready":
            self.notifier.ready(status_line(self.state))

    def activity(self, counts: Activity) -> None:
        self._update(activity=counts)
        self.notifier.status(status_line(self.state))

    def draining(self) -> None:
        self._update(phase="draining")
        self.notifier.status(status_line(self.state))

    def stopping(self) -> None:
        self._update(phase="stopping")
        self.notifier.stopping(status_line(self.state))

    # -- the end -----------------------------------------------------------------------------
    def failed(self, why: str) -> None:
        """The daemon could not start: tell `serve --daemon`'s caller."""
        self._report(f"error {why}")

    def stopped(self) -> None:
        if self.state_file is not None:
            runstate.remove(self.state_file)
        if self.pid_file is not None:
            self.pid_file.release()

    def forget(self) -> None:
        """In a forked worker: the master keeps the pid file, the state and the report pipe."""
        if self.pid_file is not None:
            self.pid_file.forget()
        if self.report_fd is not None:
            os.close(self.report_fd)
            self.report_fd = None

    def _update(self, **changes: Any) -> None:
        self.state = replace(self.state, updated=time.time(), **changes)
        if self.state_file is not None and self.state.phase != "starting":
            with contextlib.suppress(OSError):  # a full /run must not stop the mail
                runstate.write(self.state_file, self.state)

    def _report(self, line: str) -> None:
        if self.report_fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.report_fd, (" ".join(line.splitlines()) + "\n").encode())
        os.close(self.report_fd)
        self.report_fd = None


def detach(*, chdir: bool) -> int:
    """``serve --daemon``: leave the terminal and the caller's session, as SysV and AIX init
    scripts expect (fork, setsid, fork again, stdio on /dev/null). Returns, in the daemon, the
    descriptor it reports on (`Lifecycle.failed`, or ready at `Lifecycle.listening`). The
    calling process does not return: it waits for that report and exits 0 when the daemon
    listens, or 1 with the daemon's reason, so ``mailgate serve --daemon && …`` means it runs.

    ``chdir``: move to ``/`` (the daemon must not hold a mount busy). The embedded default
    config names folders relative to the working directory, so without a config file the
    daemon stays where it was started."""
    read_end, write_end = os.pipe()
    first = os.fork()
    if first:
        os.close(write_end)
        os.waitpid(first, 0)
        sys.exit(_await_report(read_end))
    os.close(read_end)
    os.setsid()
    if os.fork():
        os._exit(0)
    if chdir:
        os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    return write_end


def _await_report(fd: int) -> int:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    os.close(fd)
    word, _, rest = data.decode("utf-8", "replace").strip().partition(" ")
    if word == "ready":
        print(f"mailgate: started, pid {rest}")
        return 0
    if word == "error":
        print(f"mailgate: {rest}", file=sys.stderr)
    else:
        print("mailgate: the daemon exited before it was ready (see its log)", file=sys.stderr)
    return 1
