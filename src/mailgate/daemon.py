"""The running gateway: listeners, the delivery scheduler, signals (HUP reload, TERM drain).

``Gateway`` is what sessions see: the current snapshot, the spool, DNS, and the counters. It
owns no policy: decisions are in ``policy``/``routing``, durability in ``queue.spool``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import signal
import socket
import time
import zlib
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

from mailgate import maillog
from mailgate.config import Config
from mailgate.delivery.attempt import DeliveryContext, attempt
from mailgate.delivery.smtp import ConnectionCache
from mailgate.dns import Resolver
from mailgate.policy import Client
from mailgate.queue.scheduler import Scheduler
from mailgate.queue.spool import CorruptEntry, QueuedMessage, Spool
from mailgate.reply import Reply
from mailgate.smtp.limits import Admission, Counts
from mailgate.smtp.listener import Listener, bind_socket
from mailgate.smtp.server import SmtpServerProtocol
from mailgate.snapshot import Snapshot, try_reload

STATISTICS_INTERVAL = 3600.0  # seconds between maillog statistics lines


def make_resolver(config: Config) -> Resolver:
    return Resolver(
        list(config.dns.nameservers) if config.dns.nameservers else None, timeout=config.dns.timeout
    )


class Gateway:
    def __init__(
        self,
        config_path: str | Path | None,
        snapshot: Snapshot,
        *,
        sockets: list[socket.socket] | None = None,
        worker: int = 0,
        workers: int = 1,
        adopt: tuple[int, ...] = (),
        counts: Counts | None = None,
    ) -> None:
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
            spool=self.spool,
            resolver=self.resolver,
            snapshot=lambda: self.snapshot,
            queued=self._report_queued,
            connections=ConnectionCache(),
        )
        self.scheduler = Scheduler(partial(attempt, self.delivery), cfg.queue.max_deliveries)
        self.sessions: set[SmtpServerProtocol] = set()  # this process's connections
        # Open sessions for the whole daemon (shared by the workers: smtp/limits.py).
        self.admission = Admission(counts)
        self.counters: Counter[str] = Counter()
        self.stressed = False  # Postfix's stress mode: most of max_connections in use
        self.timeouts = self._timeouts_now()
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
            recovered = [q for q in self.spool.qids() if self._my_share(q) or q[-6:] in self.adopt]
        self.scheduler.start()
        for qid in recovered:
            status = self.spool.load_status(qid)
            # Spread recovered mail over a few seconds so a restart does not stampede.
            due = status.next_attempt or now
            self.scheduler.submit(
                qid, max(due, now) + random.uniform(0, min(5.0, len(recovered) * 0.001))
            )
        if recovered:
            maillog.recovered(len(recovered), cfg.spool_dir)
        socks = (
            self.sockets
            if self.sockets is not None
            else [bind_socket(host, port) for host, port in cfg.listen]
        )
        for sock in socks:
            listener = Listener(
                sock,
                self._new_session,
                # Sendmail's rate is per daemon: each of N workers takes its share.
                rate=lambda: -(-self.snapshot.config.smtp.connection_rate_throttle // self.workers),
                has_room=lambda: self.admission.has_room(self.snapshot.config.smtp.max_connections),
            )
            listener.start()
            self.listeners.append(listener)
        if cfg.pid_file and self.workers == 1:
            cfg.pid_file.write_text(f"{os.getpid()}\n")
        self._stats_task = asyncio.get_running_loop().create_task(
            self._statistics_every(STATISTICS_INTERVAL)
        )
        self._scan_task = asyncio.get_running_loop().create_task(self._queue_runs())
        listen = ", ".join(f"{h}:{p}" for h, p in cfg.listen)
        maillog.daemon_started(listen, cfg.source, cfg.spool_dir)

    def _new_session(self) -> SmtpServerProtocol:
        return SmtpServerProtocol(self)

    async def stop(self) -> None:
        maillog.stopping()
        for listener in self.listeners:
            await listener.close()
        for s in list(self.sessions):
            with contextlib.suppress(Exception):
                s.shut_down(Reply(421, "4.3.2", f"{self.snapshot.config.hostname} Shutting down"))
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
        snapshot = try_reload(self.config_path)
        if snapshot is None:
            return False
        config = snapshot.config
        old = self.snapshot.config
        if config.listen != old.listen or config.spool_dir != old.spool_dir:
            maillog.restart_needed()
        if config.dns != old.dns:
            self.resolver = make_resolver(config)
            self.delivery.resolver = self.resolver
        maillog.setup(config.hostname, config.log.file, config.log.level)
        self.snapshot = snapshot
        self.timeouts = self._timeouts_now()
        for w in snapshot.warnings():
            maillog.config_warning(w)
        maillog.reloaded(config.source)
        return True

    # -- what sessions call --------------------------------------------------------------------
    def session_started(self, session: SmtpServerProtocol) -> None:
        self.sessions.add(session)
        self.admission.open(session.client.ip)
        self.counters["connections"] += 1
        self._check_stress()

    def session_ended(self, session: SmtpServerProtocol) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.admission.close(session.client.ip)
            self._check_stress()

    def _check_stress(self) -> None:
        """Postfix's stress mode: once open sessions reach ``stress_threshold`` of
        ``max_connections``, clients that hold a session without using it (slowloris) get
        ``stress_timeout`` instead of the RFC's minutes, until the load falls back below 90 %
        of that mark (the margin keeps one connection coming and going from flapping it).
        The count is the whole daemon's; each worker looks at it when its own sessions come
        and go, and changes the timeouts of its own."""
        smtp = self.snapshot.config.smtp
        mark = max(1, math.ceil(smtp.max_connections * smtp.stress_threshold))
        open_now = self.admission.open_sessions
        if not self.stressed and open_now >= mark:
            self.stressed = True
            self.timeouts = self._timeouts_now()
            self.counters["stress"] += 1
            maillog.stress_started(open_now, smtp.max_connections, smtp.stress_timeout)
            for session in list(self.sessions):
                session.timeouts_changed()
        elif self.stressed and open_now < mark * 0.9:
            self.stressed = False
            self.timeouts = self._timeouts_now()
            maillog.stress_ended(
                open_now, smtp.max_connections, smtp.command_timeout, smtp.data_timeout
            )

    def _timeouts_now(self) -> tuple[float, float]:
        """The command and DATA timeouts in force (shorter under stress): kept in
        ``self.timeouts``, set again when the stress mode or the config changes, because
        every session reads them each time it waits for input."""
        smtp = self.snapshot.config.smtp
        if self.stressed:
            return (
                min(smtp.command_timeout, smtp.stress_timeout),
                min(smtp.data_timeout, smtp.stress_timeout),
            )
        return smtp.command_timeout, smtp.data_timeout

    def connection_limit_reply(self, ip: str) -> Reply | None:
        """The per-IP limit, over this daemon's sessions (this one already counted)."""
        cfg = self.snapshot.config
        refusal = Admission.refusal(
            ip, self.admission.count(ip), cfg.smtp.max_connections_per_ip, cfg.hostname
        )
        if refusal is not None:
            self.counters["per_ip_limit"] += 1
        return refusal

    async def lookup_client(self, client: Client) -> Client:
        """The client with its PTR status (semantics §18.4), within the resolver's one
        timeout."""
        if client.is_loopback:
            return Client(client.ip, "OK", "localhost")
        result = await self.resolver.ptr(client.ip)
        return Client(client.ip, result.status, result.name)

    async def domain_resolves(self, domain: str) -> str:
        """Does the sender's domain resolve, within the resolver's one timeout."""
        return await self.resolver.domain_resolves(domain)

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
        task = asyncio.get_running_loop().create_task(self._flush_domain(node, domain, subdomains))
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
            if msg and any(
                (d := r.mailbox.domain) == domain or (subdomains and d.endswith(suffix))
                for r in msg.envelope.recipients
            ):
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
            maillog.queue_scan(len(found), self.snapshot.config.spool_dir)
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
        names = (
            "connections",
            "messages_received",
            "early_talkers",
            "rcpt_throttled",
            "bad_rcpt_disconnects",
            "per_ip_limit",
            "connect_refused",
            "bare_newline",
            "improper_pipelining",
            "stress",
        )
        maillog.statistics(
            {n: c[n] for n in names},
            len(self.sessions),
            self.scheduler.queued,
            self.scheduler.active,
        )

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


def pid_tag(pid: int) -> str:
    """The end of every queue id made by process ``pid`` (``Spool.new_qid``)."""
    return f"{pid % 1_000_000:06d}"
