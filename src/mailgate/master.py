"""The process start and, with ``workers > 1``, the master: it binds the listening sockets,
clears ``incoming/``, forks the workers that share them and the spool, forwards signals,
restarts a worker that dies (with the newest config that passed its check and a clean slate in
the shared connection counts), and speaks for the daemon to the init system: it is ready when
every worker listens, and a reload is done when every worker has answered it. It also makes the
shared metrics table (one row per worker) and binds ``[metrics] listen``, which worker 0
serves."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import resource
import select
import signal
import socket
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mailgate import maillog, metrics, monitor
from mailgate.daemon import STATISTICS_INTERVAL, install_event_loop, log_reload, serve, setup_log
from mailgate.queue.spool import DUE_SIGNAL, Spool
from mailgate.runstate import Activity
from mailgate.service import DRAIN_SIGNAL, Lifecycle
from mailgate.smtp.limits import SharedCounts
from mailgate.smtp.listener import bind_socket
from mailgate.snapshot import Snapshot, try_reload

RESTART_DELAY = 1.0  # seconds before a dead worker is replaced (no fork loop on a crash)
# Seconds past stop_grace before a worker still there is killed: its own stop cancels what is
# left at stop_grace, so one later is hung (stopped, blocked in the kernel). `mailgate stop`
# waits stop_grace + STOP_MARGIN (20 s): the master must be gone by then.
KILL_AFTER_GRACE = 5.0
FORWARDED = (
    signal.SIGHUP,
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    DUE_SIGNAL,
    DRAIN_SIGNAL,
)


def _die_with_parent() -> None:
    """A worker must not outlive its master (kill -9 of the master ends the whole daemon)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class WorkerReports:
    """A worker's `service.ServiceEvents`: one JSON line per event on the pipe the master
    reads (a write under PIPE_BUF is atomic, so the workers' lines never mix)."""

    MAX_ERROR = 2000  # characters of a refused reload's reason: the line stays under PIPE_BUF

    def __init__(self, fd: int, index: int) -> None:
        self.fd = fd
        self.index = index

    def _send(self, event: str, **data: Any) -> None:
        line = json.dumps({"worker": self.index, "event": event, **data}) + "\n"
        with contextlib.suppress(OSError):  # BlockingIOError: a master that hangs; it is
            os.write(self.fd, line.encode())  # ours to restart, not the worker's to wait for

    def listening(self) -> None:
        self._send("listening")

    def reloading(self) -> None:
        pass  # the master said so when it got the HUP

    def reloaded(self, error: str | None, generation: str | None = None) -> None:
        self._send("reloaded", error=error[: self.MAX_ERROR] if error else None)

    def activity(self, counts: Activity) -> None:
        # With the log lines it could not write: the master's statistics line sums them.
        self._send("activity", **asdict(counts), log_lines_lost=maillog.lost_lines())

    def draining(self) -> None:
        pass  # the master said so when it got the signal

    def stopping(self) -> None:
        pass


@dataclass
class Worker:
    index: int
    generation: int  # of the master's checked config it was forked with
    listening: bool = False
    activity: Activity = field(default_factory=Activity)
    log_lines_lost: int = 0


class Master:
    def __init__(
        self,
        config_path: str | Path | None,
        snapshot: Snapshot,
        workers: int,
        lifecycle: Lifecycle,
    ) -> None:
        self.config_path = config_path
        self.lifecycle = lifecycle
        self.workers = workers
        cfg = snapshot.config
        self.sockets: list[socket.socket] = [
            bind_socket(*listener.address) for listener in cfg.listeners
        ]
        # Bound here, so that it outlives worker 0 (a scrape waits in the backlog while it
        # restarts).
        self.metrics_socket = monitor.bind(cfg.metrics.listen) if cfg.metrics.listen else None
        spool = Spool(cfg.spool_dir)
        moved = spool.recover_incoming()
        spool.close()
        if moved:
            maillog.recovered_incoming(moved, cfg.spool_dir)
        self.running = snapshot  # the newest config that passed its check: a new worker's
        self.generation = 0  # of ``running``: a worker forked before a reload needs a HUP
        # Connection counts and rates for the whole daemon (listeners change only at a restart).
        self.counts = SharedCounts(workers, len(cfg.listeners))
        self.table = metrics.Table(workers)  # the daemon's metrics, one row per worker
        self.children: dict[int, Worker] = {}  # pid → worker
        self.dead: dict[int, list[int]] = {i: [] for i in range(workers)}  # index → its pids
        self.restart_at: dict[int, float] = {}  # index → when to fork its replacement
        self.ready = False
        self.reload_pending = False  # a HUP the master checked and forwarded, not yet answered
        self.awaiting_reload: set[int] = set()  # pids that have not answered it
        self.reload_error: str | None = None
        self.reloaded_from = snapshot.config  # what the reload's lines compare the new one with
        self.stopping = False
        self.kill_at = 0.0  # stopping: when a worker still there gets SIGKILL
        self.draining = False  # `mailgate drain`: a worker that ends is not replaced
        self.signals: list[int] = []
        # The daemon's statistics line: hourly, and on USR2 once every worker asked has
        # reported its counts since (None: no USR2 pending).
        self.statistics_at = time.monotonic() + STATISTICS_INTERVAL
        self.statistics_awaited: set[int] | None = None
        self.lines_lost_by_dead = 0  # the log lines the dead workers could not write
        self.last_queued = 0  # the queue's count in the last report (the last line's)
        self.events_r, self.events_w = os.pipe()  # the workers' WorkerReports lines
        self.wake_r, self.wake_w = os.pipe()  # signal.set_wakeup_fd: a signal ends the select
        for fd in (self.events_r, self.events_w, self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        self.buffer = b""

    # -- workers ---------------------------------------------------------------------------
    def spawn(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                self._become_worker(index)
            except BaseException as exc:
                maillog.worker_failed(index, exc)
                code = 1
            finally:
                os._exit(code)
        self.children[pid] = Worker(index, self.generation)

    def _become_worker(self, index: int) -> None:
        _die_with_parent()
        signal.set_wakeup_fd(-1)
        for fd in (self.events_r, self.wake_r, self.wake_w):
            os.close(fd)
        self.lifecycle.forget()
        self.counts.row = index
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        # Until serve() installs its handlers: a HUP or USR1 the master forwards while this
        # worker starts must not kill it (SIG_DFL would). The master sends the HUP again once
        # the worker listens if its config is older than the master's, and the worker runs its
        # share of the queue anyway, so nothing is missed by ignoring them.
        for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, DUE_SIGNAL, DRAIN_SIGNAL):
            signal.signal(sig, signal.SIG_IGN)
        install_event_loop()
        asyncio.run(
            serve(
                self.config_path,
                self.running,
                sockets=self.sockets,
                worker=index,
                workers=self.workers,
                adopt=tuple(self.dead[index]),
                counts=self.counts,
                table=self.table,
                metrics_socket=self.metrics_socket,
                events=WorkerReports(self.events_w, index),
            )
        )

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> None:
        for sig in FORWARDED:
            signal.signal(sig, self._on_signal)
        signal.set_wakeup_fd(self.wake_w)
        for i in range(self.workers):
            self.spawn(i)
        while self.children or (self.restart_at and not self.stopping and not self.draining):
            # A second at most: a worker's exit is seen by polling waitpid (a SIGCHLD
            # handler would be inherited by every worker and its delivery programs).
            now = time.monotonic()
            soonest = min([now + 1.0, *self.restart_at.values()])
            with contextlib.suppress(InterruptedError):
                select.select([self.events_r, self.wake_r], [], [], max(0.0, soonest - now))
            self._drain(self.wake_r)
            self._handle_signals()
            self._read_reports()
            self._reap()
            self._restart_due()
            if self.stopping and self.children and time.monotonic() >= self.kill_at:
                self._kill_the_hung()
            if time.monotonic() >= self.statistics_at and not self.stopping:
                self.log_statistics()
        self.log_statistics()  # the last one, once every worker is gone
        signal.set_wakeup_fd(-1)

    def _on_signal(self, sig: int, _frame: object) -> None:
        self.signals.append(sig)  # the loop acts on it: the wakeup fd ends its select

    @staticmethod
    def _drain(fd: int) -> bytes:
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(fd, 65536):
                data += chunk
        return data

    def _handle_signals(self) -> None:
        while self.signals:
            sig = self.signals.pop(0)
            if sig in (signal.SIGTERM, signal.SIGINT):
                self._stop(sig)
            elif sig == signal.SIGHUP:
                self._reload()
            elif sig == DRAIN_SIGNAL:
                self._start_drain()
            elif sig == signal.SIGUSR2:
                # Each worker reports its counts on USR2: the line waits for their reports.
                self.statistics_awaited = {p for p, w in self.children.items() if w.listening}
                self._forward(sig)
                self._statistics_answered()
            else:
                self._forward(sig)

    def _forward(self, sig: int, pids: list[int] | None = None) -> None:
        for pid in list(self.children) if pids is None else pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _stop(self, sig: int) -> None:
        if not self.stopping:
            maillog.stopping(self.running.config.stop_grace)
            self.stopping = True
            self.kill_at = time.monotonic() + self.running.config.stop_grace + KILL_AFTER_GRACE
            self.lifecycle.stopping()
            self.restart_at.clear()
            # Our copies of the listening sockets: with the workers' closed, the kernel
            # refuses new connections instead of queueing them for nobody.
            for sock in self.sockets:
                sock.close()
            if self.metrics_socket is not None:
                self.metrics_socket.close()  # worker 0's copy serves until it stops
        self._forward(sig)

    def _kill_the_hung(self) -> None:
        """Workers that outlived their stop: what they acknowledged is on disk, what they were
        delivering stays queued, so a kill loses nothing; waiting would keep the old daemon
        (and its listening sockets' port) for ever."""
        grace = self.running.config.stop_grace + KILL_AFTER_GRACE
        for pid, worker in list(self.children.items()):
            maillog.worker_hung(worker.index, pid, grace)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.kill_at = float("inf")  # once: the loop reaps them next

    def _start_drain(self) -> None:
        """Each worker drains and exits when its work is done; the master ends with the last.
        A worker that dies meanwhile is not replaced (a new one would take mail again): its
        queued mail stays in the spool, where `mailgate drain` reports or hands it over."""
        if self.stopping or self.draining:
            return
        self.draining = True
        self.lifecycle.draining()
        self.restart_at.clear()
        self._forward(DRAIN_SIGNAL)

    def _reload(self) -> None:
        # The master's own lines (a worker that died) go to the log file under its name
        # again, as the workers' do: first, whatever becomes of the reload (logrotate's HUP).
        maillog.reopen()
        if self.stopping:
            return
        self.lifecycle.reloading()
        # Check first, so that a bad config is refused once, here, with a clear message;
        # keep it, so that a worker restarted later does not bring back the old tables (a
        # relay grant the admin removed, say).
        checked = try_reload(self.config_path)
        if not isinstance(checked, Snapshot):
            self.lifecycle.reloaded(str(checked))
            return
        if not self.reload_pending:  # the config the lines compare with: the one in force
            self.reloaded_from = self.running.config
        self.running = checked
        setup_log(checked.config)
        self.generation += 1
        self.reload_error = None
        # A worker still starting ignores the HUP; it gets one when it listens.
        listening = [pid for pid, w in self.children.items() if w.listening]
        for pid in listening:
            self.children[pid].generation = self.generation
        self.awaiting_reload = set(listening)
        self.reload_pending = True
        self._forward(signal.SIGHUP, listening)
        self._reload_answered()

    def _reload_answered(self) -> None:
        """Every worker that was asked has answered (or died, and restarts with the new
        config): the reload is done."""
        if self.reload_pending and not self.awaiting_reload:
            self.reload_pending = False
            if self.reload_error is None and not self.stopping:  # a worker reaped at a stop
                log_reload(self.reloaded_from, self.running)
            self.lifecycle.reloaded(self.reload_error, self.running.generation)

    def _read_reports(self) -> None:
        self.buffer += self._drain(self.events_r)
        *lines, self.buffer = self.buffer.split(b"\n")
        by_index = {w.index: pid for pid, w in self.children.items()}
        for line in lines:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                report = json.loads(line)
                pid = by_index[report["worker"]]
                self._report(pid, self.children[pid], report)

    def _report(self, pid: int, worker: Worker, report: dict[str, Any]) -> None:
        event = report["event"]
        if event == "listening":
            worker.listening = True
            if worker.generation < self.generation:  # forked before the last reload
                worker.generation = self.generation
                self.awaiting_reload.add(pid)
                self._forward(signal.SIGHUP, [pid])
            everyone = len(self.children) == self.workers
            if not self.ready and everyone and all(w.listening for w in self.children.values()):
                self.ready = True
                cfg = self.running.config
                maillog.daemon_started(cfg.listening_on, cfg.source, cfg.spool_dir, self.workers)
                self.lifecycle.listening()
        elif event == "reloaded":
            if pid in self.awaiting_reload:
                self.awaiting_reload.discard(pid)
                self.reload_error = self.reload_error or report["error"]
                self._reload_answered()
        elif event == "activity":
            # Each worker reports every REPORT_INTERVAL and on USR2: the sum goes out each time.
            worker.activity = Activity(
                report["sessions"],
                report["received"],
                report["queued"],
                report["delivering"],
                report.get("counted", False),
            )
            worker.log_lines_lost = report.get("log_lines_lost", 0)
            activity = self._activity()
            self.last_queued = activity.queued
            if self.ready and not self.stopping:
                self.lifecycle.activity(activity)
            if self.statistics_awaited is not None:
                self.statistics_awaited.discard(pid)
                self._statistics_answered()

    def _activity(self) -> Activity:
        total = Activity()
        for w in self.children.values():
            total += w.activity
        # Received is the metrics table's: it keeps a dead worker's count, which its report
        # left with it, so the daemon's total never goes back. The queue is not a sum: each
        # worker counts all of it (monitor.QueueCount), and their counts differ only by
        # what moved while each listed the folder.
        reports = [w.activity for w in self.children.values()]
        return replace(
            total,
            received=self.table.value(metrics.MESSAGES_RECEIVED),
            queued=max((a.queued for a in reports), default=0),
            counted=bool(reports) and all(a.counted for a in reports),
        )

    def _statistics_answered(self) -> None:
        if self.statistics_awaited is not None and not self.statistics_awaited:
            self.statistics_awaited = None
            self.log_statistics()

    def log_statistics(self) -> None:
        """The daemon's ``statistics:`` line (Postfix's anvil writes one for the service): the
        metrics summed over the workers' rows (a dead worker's counts stay in its row), the
        open sessions of the shared admission counts, the rest from the workers' reports."""
        self.statistics_at = time.monotonic() + STATISTICS_INTERVAL
        activity = self._activity()
        lost = self.lines_lost_by_dead + maillog.lost_lines()
        lost += sum(w.log_lines_lost for w in self.children.values())
        maillog.statistics(
            metrics.statistics_counts(self.table.value) | {"log_lines_lost": lost},
            self.counts.total(),
            activity.queued if self.children else self.last_queued,
            activity.delivering,
        )

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.children.pop(pid, None)
            if worker is None:
                continue
            self.lines_lost_by_dead += worker.log_lines_lost
            if self.statistics_awaited is not None:
                self.statistics_awaited.discard(pid)
                self._statistics_answered()
            if pid in self.awaiting_reload:
                self.awaiting_reload.discard(pid)
                self._reload_answered()
            self.table.process_gone(worker.index)  # its counts stay: the daemon's never go back
            if self.draining and os.waitstatus_to_exitcode(status) == 0:
                continue  # drained: its work is done
            if self.stopping:
                if os.waitstatus_to_exitcode(status) == -signal.SIGKILL:
                    maillog.worker_exited(worker.index, pid, status, restart=False)
            else:
                maillog.worker_exited(worker.index, pid, status)
                self.counts.clear_row(worker.index)  # its sessions died with it
                self.dead[worker.index].append(pid)
                self.restart_at[worker.index] = time.monotonic() + RESTART_DELAY

    def _restart_due(self) -> None:
        now = time.monotonic()
        for index, when in list(self.restart_at.items()):
            if when <= now and not self.stopping and not self.draining:
                del self.restart_at[index]
                self.spawn(index)


def raise_open_file_limit() -> None:
    """A session is a descriptor: raise the soft limit to the hard one, as Postfix's master
    does, or max_connections is a number the first thousand clients never let us reach."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(config_path: str | Path | None, snapshot: Snapshot, lifecycle: Lifecycle) -> None:
    """The daemon, until it is stopped: the pid file is claimed before anything is bound or
    recovered (a second daemon on the same spool would move the first one's mail in
    ``incoming/``), and released at the end."""
    raise_open_file_limit()
    lifecycle.claim()
    try:
        workers = snapshot.config.worker_processes
        if workers > 1:
            Master(config_path, snapshot, workers, lifecycle).run()
            return
        install_event_loop()
        asyncio.run(serve(config_path, snapshot, events=lifecycle))
    finally:
        lifecycle.stopped()
