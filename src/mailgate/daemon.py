"""The running gateway: listeners, the delivery scheduler, signals (HUP reload, TERM drain).

``Gateway`` is what sessions see: the current snapshot, the spool, DNS, and the counters. It
owns no policy: decisions are in ``policy``/``routing``, durability in ``queue.spool``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import os
import random
import resource
import signal
import socket
import time
import zlib
from collections import Counter
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailgate import maillog
from mailgate.config import Config, ConfigError, load_config
from mailgate.delivery.attempt import DeliveryContext, attempt
from mailgate.delivery.smtp import ConnectionCache
from mailgate.dns import DnsError, DnsTempError, Resolver
from mailgate.policy import Client
from mailgate.queue.scheduler import Scheduler
from mailgate.queue.spool import CorruptEntry, QueuedMessage, Spool
from mailgate.reply import Reply
from mailgate.smtp.listener import Listener, bind_socket
from mailgate.snapshot import Snapshot, build_snapshot
from mailgate.tables.maps import TableError

if TYPE_CHECKING:
    from mailgate.smtp.session import SmtpSession


STATISTICS_INTERVAL = 3600.0  # seconds between maillog statistics lines


def make_resolver(config: Config) -> Resolver:
    return Resolver(list(config.dns.nameservers) if config.dns.nameservers else None,
                    timeout=config.dns.timeout)


class Gateway:
    def __init__(self, config_path: str | Path | None, snapshot: Snapshot, *,
                 sockets: list[socket.socket] | None = None, worker: int = 0,
                 workers: int = 1, adopt: tuple[int, ...] = ()) -> None:
        self.config_path = config_path
        self.snapshot = snapshot
        self.sockets = sockets  # inherited from the master when there are several workers
        self.worker = worker
        self.workers = workers
        # Pids of this worker's dead predecessors: the mail they received is ours to retry.
        self.adopt = {pid_tag(pid) for pid in adopt}
        cfg = snapshot.config
        self.spool = Spool(cfg.spool_dir, fsync=cfg.queue.fsync)
        self.resolver = make_resolver(cfg)
        self.delivery = DeliveryContext(
            spool=self.spool, resolver=self.resolver, snapshot=lambda: self.snapshot,
            queued=self._report_queued, connections=ConnectionCache())
        self.scheduler = Scheduler(partial(attempt, self.delivery), cfg.queue.max_deliveries)
        self.sessions: set[SmtpSession] = set()
        self.per_ip: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        self.stressed = False  # Postfix's stress mode: most of max_connections in use
        self._flushing: set[str] = set()  # domains an ETRN scan is under way for
        self._background: set[asyncio.Task[Any]] = set()
        self.listeners: list[Listener] = []

    # -- life cycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.snapshot.config
        now = time.time()
        if self.workers == 1:
            recovered = self.spool.recover()
        else:
            # The master cleared incoming/ before forking; each worker retries its share, and
            # a restarted one also what its predecessors received (each worker retries the
            # mail it received itself, whatever its share: no other one knows of it).
            recovered = [q for q in self.spool.qids() if self._my_share(q)
                         or q[-6:] in self.adopt]
        self.scheduler.start()
        for qid in recovered:
            status = self.spool.load_status(qid)
            # Spread recovered mail over a few seconds so a restart does not stampede.
            due = status.next_attempt or now
            self.scheduler.submit(qid, max(due, now) + random.uniform(0, min(5.0, len(recovered)
                                                                             * 0.001)))
        if recovered:
            maillog.info(f"recovered {len(recovered)} queued message(s) from {cfg.spool_dir}")
        socks = self.sockets if self.sockets is not None else [
            bind_socket(host, port) for host, port in cfg.listen]
        for sock in socks:
            listener = Listener(
                sock, self._new_session,
                # Sendmail's rate is per daemon: each of N workers takes its share.
                rate=lambda: -(-self.snapshot.config.smtp.connection_rate_throttle
                               // self.workers),
                has_room=lambda: len(self.sessions) < self.snapshot.config.smtp.max_connections)
            listener.start()
            self.listeners.append(listener)
        if cfg.pid_file and self.workers == 1:
            cfg.pid_file.write_text(f"{os.getpid()}\n")
        self._stats_task = asyncio.get_running_loop().create_task(
            self._statistics_every(STATISTICS_INTERVAL))
        self._scan_task = asyncio.get_running_loop().create_task(self._queue_runs())
        listen = ", ".join(f"{h}:{p}" for h, p in cfg.listen)
        maillog.info(f"starting daemon (mailgate): SMTP on {listen}, "
                     f"config {cfg.source}, queue {cfg.spool_dir}")

    def _new_session(self) -> SmtpSession:
        from mailgate.smtp.session import SmtpSession

        return SmtpSession(self)

    async def stop(self) -> None:
        maillog.info("stopping: no new connections, finishing deliveries in progress")
        for listener in self.listeners:
            await listener.close()
        for s in list(self.sessions):
            with contextlib.suppress(Exception):
                s.shut_down(Reply(421, "4.3.2", f"{self.snapshot.config.hostname} "
                                                "Shutting down"))
        self._stats_task.cancel()
        self._scan_task.cancel()
        self.log_statistics()
        await self.scheduler.stop()
        if self.delivery.connections is not None:
            await self.delivery.connections.close_all()
        self.spool.close()
        cfg = self.snapshot.config
        if cfg.pid_file and self.workers == 1:
            with contextlib.suppress(OSError):
                cfg.pid_file.unlink()

    def reload(self) -> bool:
        """SIGHUP: re-read config and tables; a bad new config is refused, the old one stays."""
        try:
            config = load_config(self.config_path)
            snapshot = build_snapshot(config)
        except (ConfigError, TableError) as exc:
            maillog.error(f"reload refused, keeping the running configuration: {exc}")
            return False
        old = self.snapshot.config
        if config.listen != old.listen or config.spool_dir != old.spool_dir:
            maillog.warning("listen and spool_dir changes take effect only after a restart")
        if config.dns != old.dns:
            self.resolver = make_resolver(config)
            self.delivery.resolver = self.resolver
        maillog.setup(config.hostname, config.log.file, config.log.level)
        self.snapshot = snapshot
        for w in snapshot.warnings():
            maillog.warning(f"warning: {w}")
        maillog.info(f"configuration reloaded from {config.source}")
        return True

    # -- what sessions call --------------------------------------------------------------------
    def session_started(self, session: SmtpSession) -> None:
        self.sessions.add(session)
        self.per_ip[session.client.ip] += 1
        self.counters["connections"] += 1
        self._check_stress()

    def session_ended(self, session: SmtpSession) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.per_ip[session.client.ip] -= 1
            if self.per_ip[session.client.ip] <= 0:
                del self.per_ip[session.client.ip]
            self._check_stress()

    def _check_stress(self) -> None:
        """Postfix's stress mode: once open sessions reach ``stress_threshold`` of
        ``max_connections``, clients that hold a session without using it (slowloris) get
        ``stress_timeout`` instead of the RFC's minutes, until the load falls back below 90 %
        of that mark (the margin keeps one connection coming and going from flapping it)."""
        smtp = self.snapshot.config.smtp
        mark = max(1, math.ceil(smtp.max_connections * smtp.stress_threshold))
        open_now = len(self.sessions)
        if not self.stressed and open_now >= mark:
            self.stressed = True
            self.counters["stress"] += 1
            maillog.warning(f"stress: {open_now} of {smtp.max_connections} sessions open; "
                            f"command and DATA timeouts now {smtp.stress_timeout:g}s")
            for session in list(self.sessions):
                session.timeouts_changed()
        elif self.stressed and open_now < mark * 0.9:
            self.stressed = False
            maillog.info(f"stress over: {open_now} of {smtp.max_connections} sessions open; "
                         f"timeouts back to {smtp.command_timeout:g}s / {smtp.data_timeout:g}s")

    def timeouts(self) -> tuple[float, float]:
        """The command and DATA timeouts in force now (shorter under stress)."""
        smtp = self.snapshot.config.smtp
        if self.stressed:
            return (min(smtp.command_timeout, smtp.stress_timeout),
                    min(smtp.data_timeout, smtp.stress_timeout))
        return smtp.command_timeout, smtp.data_timeout

    def connection_limit_reply(self, session: SmtpSession) -> Reply | None:
        smtp = self.snapshot.config.smtp
        host = self.snapshot.config.hostname
        if smtp.max_connections_per_ip and self.per_ip[session.client.ip] > \
                smtp.max_connections_per_ip and not Client(session.client.ip).is_loopback:
            self.counters["per_ip_limit"] += 1
            return Reply(421, "4.7.0", f"{host} Too many concurrent connections from "
                                       f"{session.client.ip}; try again later")
        return None

    async def lookup_client(self, ip: str) -> Client:
        """The client's PTR status, bounded by the DNS timeout (semantics §18.4)."""
        client = Client(ip)
        if client.is_loopback:
            return Client(ip, "OK", "localhost")
        try:
            result = await asyncio.wait_for(self.resolver.ptr(ip),
                                            self.snapshot.config.dns.timeout + 1)
        except (TimeoutError, DnsTempError):
            return Client(ip, "TEMP", None)
        except DnsError:
            return Client(ip, "FAIL", None)
        return Client(ip, result.status, result.name)

    async def domain_resolves(self, domain: str) -> str:
        try:
            return await asyncio.wait_for(self.resolver.domain_resolves(domain),
                                          self.snapshot.config.dns.timeout + 1)
        except (TimeoutError, DnsError):
            return "temp"

    def message_queued(self, queued: QueuedMessage) -> None:
        """A session committed a message (and sent its 250): its first attempt gets it with
        its file still open and locked."""
        self.counters["messages_received"] += 1
        self.scheduler.submit(queued.qid, message=queued)

    def _report_queued(self, queued: QueuedMessage) -> None:
        """A bounce, delay warning or return receipt was queued: not received mail."""
        self.scheduler.submit(queued.qid, message=queued)

    def flush_domain(self, domain: str, *, subdomains: bool = False) -> None:
        """ETRN: retry now what waits for ``domain`` (and its subdomains for ``ETRN @domain``).
        The queue is read in a thread (it may be large) and the reply does not wait for it, as
        Sendmail's forked queue run; a second ETRN for a node whose scan is under way joins it."""
        node = ("@" if subdomains else "") + domain
        if node in self._flushing:
            return
        self._flushing.add(node)
        task = asyncio.get_running_loop().create_task(self._flush_domain(node, domain,
                                                                         subdomains))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _flush_domain(self, node: str, domain: str, subdomains: bool) -> None:
        try:
            chosen = await asyncio.to_thread(self._queued_for, domain, subdomains)
        finally:
            self._flushing.discard(node)
        self.scheduler.run_now(chosen)

    def _queued_for(self, domain: str, subdomains: bool) -> list[str]:
        """The queued messages with a recipient in ``domain``: read only (an unreadable entry
        is left for its attempt to quarantine)."""
        suffix = "." + domain
        chosen = []
        for qid in list(self.spool.qids()):
            try:
                msg = self.spool.load(qid, with_status=False)
            except CorruptEntry:
                continue
            if msg and any((d := r.mailbox.domain) == domain
                           or (subdomains and d.endswith(suffix))
                           for r in msg.envelope.recipients):
                chosen.append(qid)
        return chosen

    def _my_share(self, qid: str) -> bool:
        return self.workers == 1 or zlib.crc32(qid.encode()) % self.workers == self.worker

    def run_queue(self) -> None:
        """SIGUSR1, Sendmail's ``-q``: everything waiting is due now, and the queue folder is
        read for entries this process does not know (queued by ``mailgate flush``, say)."""
        self.scheduler.run_now()
        task = asyncio.get_running_loop().create_task(self.scan_queue(now=True))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def scan_queue(self, *, now: bool = False) -> int:
        """Take on queue entries of our share that no runner here knows: a bounce that
        ``mailgate flush`` queued, mail of a process that died. The listing and the status
        reads run in a thread (the queue may be large); returns how many were taken on."""
        def unknown() -> list[tuple[str, float | None]]:
            found = []
            for qid in list(self.spool.qids()):
                if self._my_share(qid) and not self.scheduler.knows(qid):
                    found.append((qid, self.spool.load_status(qid).next_attempt))
            return found

        found = await asyncio.to_thread(unknown)
        clock = time.time()
        for qid, due in found:
            if not self.scheduler.knows(qid) and (self.spool.queue / qid).exists():
                self.scheduler.submit(qid, clock if now or due is None else max(due, clock))
        if found:
            maillog.info(f"queue run: {len(found)} message(s) found in "
                         f"{self.snapshot.config.spool_dir} that no runner here had")
        return len(found)

    async def _queue_runs(self) -> None:
        """Sendmail's ``-q30m``: every ``run_interval`` the queue folder is read again."""
        while True:
            await asyncio.sleep(self.snapshot.config.queue.run_interval)
            with contextlib.suppress(OSError):
                await self.scan_queue()

    def count(self, name: str) -> None:
        self.counters[name] += 1

    def log_statistics(self) -> None:
        """One maillog line of counters, like Postfix's anvil statistics (also on SIGUSR2)."""
        c = self.counters
        names = ("connections", "messages_received", "early_talkers", "rcpt_throttled",
                 "bad_rcpt_disconnects", "per_ip_limit", "connect_refused", "bare_newline",
                 "improper_pipelining", "stress")
        text = ", ".join(f"{n}={c[n]}" for n in names)
        maillog.info(f"statistics: {text}, sessions_now={len(self.sessions)}, "
                     f"queued={self.scheduler.queued}, delivering={self.scheduler.active}")

    async def _statistics_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.log_statistics()


def install_event_loop() -> None:
    """uvloop where it is installed: the gateway's work is sockets and timers."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(config_path: str | Path | None, snapshot: Snapshot, **worker: Any) -> None:
    gateway = Gateway(config_path, snapshot, **worker)
    await gateway.start()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, gateway.reload)
    loop.add_signal_handler(signal.SIGUSR1, gateway.run_queue)
    loop.add_signal_handler(signal.SIGUSR2, gateway.log_statistics)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await gateway.stop()


def _die_with_parent() -> None:
    """A worker must not outlive its master (kill -9 of the master ends the whole daemon)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def pid_tag(pid: int) -> str:
    """The end of every queue id made by process ``pid`` (``Spool.new_qid``)."""
    return f"{pid % 1_000_000:06d}"


def _run_worker(config_path: str | Path | None, snapshot: Snapshot,
                sockets: list[socket.socket], index: int, workers: int,
                adopt: tuple[int, ...]) -> None:
    _die_with_parent()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    # Until serve() installs its handlers: a HUP or USR1 the master forwards while this worker
    # starts must not kill it (SIG_DFL would). It starts with the newest checked snapshot and
    # runs its share of the queue anyway, so nothing is missed by ignoring them.
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    install_event_loop()
    asyncio.run(serve(config_path, snapshot, sockets=sockets, worker=index, workers=workers,
                      adopt=adopt))


def run_workers(config_path: str | Path | None, snapshot: Snapshot, workers: int) -> None:
    """The master: bind, clear incoming/, fork ``workers`` children sharing the listening
    sockets and the spool, forward signals, restart a worker that dies."""
    cfg = snapshot.config
    sockets = [bind_socket(host, port) for host, port in cfg.listen]
    spool = Spool(cfg.spool_dir)
    moved = spool.recover_incoming()
    spool.close()
    if moved:
        maillog.info(f"recovered {moved} acknowledged message(s) from {cfg.spool_dir}/incoming")
    running = snapshot  # the newest config that passed its check: what a new worker starts with
    children: dict[int, int] = {}  # pid → worker index
    dead: dict[int, list[int]] = {i: [] for i in range(workers)}  # index → pids it had
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _run_worker(config_path, running, sockets, index, workers,
                            tuple(dead[index]))
            except BaseException as exc:
                maillog.error(f"worker {index} failed: {exc!r}")
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
            # (a relay grant the admin removed, say).
            try:
                running = build_snapshot(load_config(config_path))
            except (ConfigError, TableError) as exc:
                maillog.error(f"reload refused, keeping the running configuration: {exc}")
                return
        # Forward at once: the main loop sits in waitpid(), which PEP 475 restarts after a
        # handler, so it would only see a queued signal when a worker exits.
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, on_signal)
    for i in range(workers):
        spawn(i)
    if cfg.pid_file:
        cfg.pid_file.write_text(f"{os.getpid()}\n")
    maillog.info(f"master {os.getpid()}: {workers} workers")
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
                maillog.error(f"worker {index} (pid {pid}) exited with status {status}; "
                              "restarting it")
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
