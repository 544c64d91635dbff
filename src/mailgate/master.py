"""The multi-process daemon (``workers > 1``) and the process start: the master binds the
listening sockets, clears ``incoming/``, forks the workers that share them and the spool,
forwards signals, and restarts a worker that dies, with the newest config that passed its
check and a clean slate in the shared connection counts."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import resource
import signal
import socket
import time
from pathlib import Path

from mailgate import maillog
from mailgate.daemon import install_event_loop, serve, setup_log
from mailgate.queue.spool import PICKUP_SIGNAL, Spool
from mailgate.smtp.limits import SharedCounts
from mailgate.smtp.listener import bind_socket
from mailgate.snapshot import Snapshot, try_reload


def _die_with_parent() -> None:
    """A worker must not outlive its master (kill -9 of the master ends the whole daemon)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _run_worker(
    config_path: str | Path | None,
    snapshot: Snapshot,
    sockets: list[socket.socket],
    index: int,
    workers: int,
    adopt: tuple[int, ...],
    counts: SharedCounts,
) -> None:
    _die_with_parent()
    counts.row = index
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    # Until serve() installs its handlers: a HUP or USR1 the master forwards while this worker
    # starts must not kill it (SIG_DFL would). It starts with the newest checked snapshot and
    # runs its share of the queue anyway, so nothing is missed by ignoring them.
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, PICKUP_SIGNAL):
        signal.signal(sig, signal.SIG_IGN)
    install_event_loop()
    asyncio.run(
        serve(
            config_path,
            snapshot,
            sockets=sockets,
            worker=index,
            workers=workers,
            adopt=adopt,
            counts=counts,
        )
    )


def run_workers(config_path: str | Path | None, snapshot: Snapshot, workers: int) -> None:
    """The master: bind, clear incoming/, fork ``workers`` children sharing the listening
    sockets and the spool, forward signals, restart a worker that dies."""
    cfg = snapshot.config
    sockets = [bind_socket(host, port) for host, port in cfg.listen]
    spool = Spool(cfg.spool_dir)
    moved = spool.recover_incoming()
    spool.close()
    if moved:
        maillog.recovered_incoming(moved, cfg.spool_dir)
    running = snapshot  # the newest config that passed its check: what a new worker starts with
    counts = SharedCounts(workers)  # connection counts for the whole daemon
    children: dict[int, int] = {}  # pid → worker index
    dead: dict[int, list[int]] = {i: [] for i in range(workers)}  # index → pids it had
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _run_worker(
                    config_path, running, sockets, index, workers, tuple(dead[index]), counts
                )
            except BaseException as exc:
                maillog.worker_failed(index, exc)
                code = 1
            finally:
                os._exit(code)
        children[pid] = index

    def on_signal(sig: int, _frame: object) -> None:
        nonlocal stopping, running
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        elif sig == signal.SIGHUP:
            # Check first, so that a bad config is refused once, here, with a clear message;
            # keep it, so that a worker restarted later does not bring back the old tables
            # (a relay grant the admin removed, say). The master's own lines (a worker that
            # died) go to the log file under its name again, as the workers' do.
            maillog.reopen()
            checked = try_reload(config_path)
            if checked is None:
                return
            running = checked
            setup_log(checked.config)
        # Forward at once: the main loop sits in waitpid(), which PEP 475 restarts after a
        # handler, so it would only see a queued signal when a worker exits.
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    for sig in (
        signal.SIGHUP,
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGUSR1,
        signal.SIGUSR2,
        PICKUP_SIGNAL,
    ):
        signal.signal(sig, on_signal)
    for i in range(workers):
        spawn(i)
    if cfg.pid_file:
        cfg.pid_file.write_text(f"{os.getpid()}\n")
    maillog.master_started(os.getpid(), workers)
    try:
        while children:
            try:
                pid, status = os.waitpid(-1, 0)
            except InterruptedError:
                continue
            except ChildProcessError:
                break
            index = children.pop(pid, None)
            if index is not None and not stopping:
                maillog.worker_exited(index, pid, status)
                counts.clear_row(index)  # its sessions died with it
                time.sleep(1)
                dead[index].append(pid)
                spawn(index)
    finally:
        if cfg.pid_file:
            with contextlib.suppress(OSError):
                cfg.pid_file.unlink()


def raise_open_file_limit() -> None:
    """A session is a descriptor: raise the soft limit to the hard one, as Postfix's master
    does, or max_connections is a number the first thousand clients never let us reach."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(config_path: str | Path | None, snapshot: Snapshot) -> None:
    raise_open_file_limit()
    workers = snapshot.config.workers or (os.cpu_count() or 1)
    if workers > 1:
        run_workers(config_path, snapshot, workers)
        return
    install_event_loop()
    asyncio.run(serve(config_path, snapshot))
