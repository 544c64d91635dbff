"""The running gateway: listeners, the delivery scheduler, signals (HUP reload, TERM stop with
the sessions drained, TTIN drain the node (`mailgate drain`), USR1 queue run, URG take on what
the queue tools marked due).

``Gateway`` is what sessions see: the current snapshot, the spool, DNS, and the counters. It
owns no policy: decisions are in ``policy``/``routing``, durability in ``queue.spool``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import socket
import time
import zlib
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

from mailgate import maillog, metrics
from mailgate.config import Config, ListenerSettings
from mailgate.delivery.attempt import DeliveryContext, attempt
from mailgate.delivery.smtp import ConnectionCache
from mailgate.dns import Resolver
from mailgate.monitor import Gauges, Identity, MonitorServer, QueueCount, bind
from mailgate.policy import Client
from mailgate.queue.feeder import QueueFeeder
from mailgate.queue.scheduler import Scheduler
from mailgate.queue.spool import DUE_SIGNAL, CorruptEntry, QueuedMessage, Spool
from mailgate.reply import Reply
from mailgate.runstate import REPORT_INTERVAL, Activity
from mailgate.service import DRAIN_SIGNAL, ServiceEvents, Unobserved
from mailgate.smtp.limits import Admission, ConnectionRate, Counts
from mailgate.smtp.listener import Arrival, Listener, bind_socket
from mailgate.smtp.server import SmtpServerProtocol
from mailgate.snapshot import Snapshot, try_reload

STATISTICS_INTERVAL = 3600.0  # seconds between maillog statistics lines
STRESS_LOOK = 1.0  # seconds, with workers: how often each looks at the daemon's sessions
DRAIN_POLL = 0.2  # seconds between looks, while draining, at whether the work is done


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
        table: metrics.Table | None = None,
        metrics_socket: socket.socket | None = None,
        events: ServiceEvents | None = None,
    ) -> None:
        self.config_path = config_path
        self.events: ServiceEvents = events if events is not None else Unobserved()
        self.snapshot = snapshot
        self.sockets = sockets  # inherited from the master when there are several workers
        self.worker = worker
        self.workers = workers
        # Pids of this worker's dead predecessors: the mail they received is ours to retry.
        self.adopt = {pid_tag(pid) for pid in adopt}
        cfg = snapshot.config
        # The daemon's counts (metrics.py): our row of the master's table, or a table of our own.
        self.table = table if table is not None else metrics.Table(1)
        self.metrics = self.table.row(worker if table is not None else 0)
        self.metrics_socket = metrics_socket  # bound by the master; only worker 0 serves it
        # Each [[milter]]'s counts, entered in the row's filter table at every config load.
        self._milter_counts: dict[str, metrics.MilterCounts] = {}
        self._enter_milters(cfg)
        self.monitor: MonitorServer | None = None
        self.spool = Spool(cfg.spool_dir, fsync=cfg.queue.fsync)
        # What this process puts into queue/ and takes out, in its row: with a census now
        # and then, the queue's count for every report (monitor.QueueCount).
        self.spool.count_moves_in(self.metrics.queue_moves())
        self.queue_count = QueueCount(self.spool, self.table)
        self.resolver = make_resolver(cfg)
        self.delivery = DeliveryContext(
            spool=self.spool,
            resolver=self.resolver,
            snapshot=lambda: self.snapshot,
            queued=self._report_queued,
            connections=ConnectionCache(),
            metrics=self.metrics,
        )
        self.tag = pid_tag(os.getpid())
        self.feeder = QueueFeeder(
            self.spool,
            self._mine,
            lambda: self.snapshot.config.queue.run_interval,
            where=cfg.spool_dir,
        )
        self.scheduler = Scheduler(
            partial(attempt, self.delivery),
            cfg.queue.max_deliveries,
            limit=cfg.queue.active_limit,
            outside=self.feeder,
        )
        self.feeder.attach(self.scheduler)
        self.delivery.elsewhere = partial(self.feeder.outside, now=False)
        self.sessions: set[SmtpServerProtocol] = set()  # this process's connections
        # Open sessions for the whole daemon (shared by the workers: smtp/limits.py).
        self.admission = Admission(counts)
        self.stressed = False  # Postfix's stress mode: most of max_connections in use
        self.timeouts = self._timeouts_now()
        self._stats_task: asyncio.Task[None] | None = None  # the hourly statistics line
        self._stress_task: asyncio.Task[None] | None = None  # with workers: stress mode
        self._flushing: set[str] = set()  # domains an ETRN scan is under way for
        self._background: set[asyncio.Task[Any]] = set()
        self.listeners: list[Listener] = []
        self._drained: asyncio.Event | None = None  # stopping: set when the last session ends
        # `mailgate drain`: new sessions get 421, the rest finish, the queue is delivered; then
        # ``finished`` (serve's stop) is called. None: not draining.
        self.draining: Reply | None = None
        self.finished: Callable[[], None] = lambda: None
        self._started = False

    # -- life cycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.snapshot.config
        if self.workers == 1:
            # Only incoming/ and spare/ (the messages in flight at a crash): the queue itself
            # is taken on by the feeder's first pass, after the listeners are open.
            moved = self.spool.recover_incoming()
            if moved:
                maillog.recovered_incoming(moved, cfg.spool_dir)
        # (With workers, the master cleared incoming/ before forking.)
        # Delivered files are freed by a thread of this process (after the fork).
        self.spool.start_cleaner()
        self.scheduler.start()
        # Before the SMTP listeners: a metrics port in use stops the start before any client
        # is served (with workers, the master bound it already).
        await self._start_monitor()
        socks = (
            self.sockets
            if self.sockets is not None
            else [bind_socket(*listener.address) for listener in cfg.listeners]
        )
        for index, (sock, settings) in enumerate(zip(socks, cfg.listeners, strict=True)):
            listener = Listener(
                sock,
                self._new_session,
                rate=lambda: self.snapshot.config.smtp.connection_rate_throttle,
                admission=self.admission,
                max_connections=lambda: self.snapshot.config.smtp.max_connections,
                settings=partial(self._listener_settings, settings),
                # Sendmail's rate is per listening socket, counted over every worker.
                throttle=ConnectionRate(self.admission.counts, index),
            )
            listener.start()
            assert listener.task is not None
            listener.task.add_done_callback(lambda _task: self.metrics.set_listening(False))
            self.listeners.append(listener)
        self.metrics.started(os.getpid(), listening=True)
        loop = asyncio.get_running_loop()
        if self.workers == 1:  # else the master writes the daemon's line
            self._stats_task = loop.create_task(self._statistics_every(STATISTICS_INTERVAL))
        else:  # the other workers' sessions move the count too
            self._stress_task = loop.create_task(self._stress_every(STRESS_LOOK))
        # The queue is taken on once we greet: its first pass is start-up's recovery.
        self.feeder.start()
        self._report_task = loop.create_task(self._report_every(REPORT_INTERVAL))
        if self.workers == 1:
            maillog.daemon_started(cfg.listening_on, cfg.source, cfg.spool_dir)
        else:  # the master writes the daemon's line once all of them listen
            maillog.worker_started(self.worker)
        self.events.listening()
        self._started = True
        if self.draining is not None:  # asked for while starting
            self.draining = None
            self.drain()

    async def _start_monitor(self) -> None:
        """``[metrics] listen``: worker 0 answers for the whole daemon (monitor.py)."""
        listen = self.snapshot.config.metrics.listen
        sock = self.metrics_socket
        if self.worker != 0:
            if sock is not None:
                sock.close()  # the master's, inherited: worker 0's to serve
            return
        if sock is None and listen is not None:
            sock = bind(listen)
        if sock is None:
            return
        self.monitor = MonitorServer(
            sock,
            self.table,
            self.gauges,
            self.queue_count,
            self.health_problems,
            lambda: Identity(self.snapshot.config.hostname, self.snapshot.config.metrics.token),
        )
        await self.monitor.start()

    def gauges(self) -> Gauges:
        """What /metrics says is true now (the queue is filled in by its census)."""
        return Gauges(
            sessions_open=self.admission.open_sessions,
            queue_messages=0,
            queue_oldest=None,
            spool_free_bytes=self.spool.free_space(),
            stress=self.stressed,
        )

    def health_problems(self) -> list[str]:
        """Why /health answers 503 (none: 200): a drain under way (the node takes no new mail:
        a balancer's or Kubernetes' readiness check must move on), a worker not running or not
        listening, a spool that cannot take a file or is below ``min_free``."""
        problems = []
        if self.draining is not None:  # worker 0's, which answers: every worker drains
            problems.append("the daemon is draining (mailgate drain)")
        table = self.table
        for row in range(table.rows):
            name = f"worker {row}" if table.rows > 1 else "the daemon"
            if not table.value(metrics.PID, row):
                problems.append(f"{name} is not running")
            elif not table.value(metrics.LISTENING, row):
                problems.append(f"{name} is not listening")
        probe = self.spool.incoming / f".health.{os.getpid()}"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
            os.unlink(probe)
        except OSError as exc:
            problems.append(f"spool {self.spool.incoming} is not writable: {exc.strerror or exc}")
        min_free = self.snapshot.config.queue.min_free
        if not self.spool.room_for(0, min_free):
            problems.append(
                f"spool {self.spool.root} has {self.spool.free_space()} bytes free, "
                f"below min_free ({min_free})"
            )
        return problems

    def _new_session(self, arrival: Arrival) -> SmtpServerProtocol:
        session = SmtpServerProtocol(self, arrival)
        if self.draining is not None:
            session.drain(self.draining)  # said before anything else: try the other MX
        return session

    def drain(self) -> None:
        """DRAIN_SIGNAL (`mailgate drain`): take this node out of service without losing or
        refusing mail. The listeners stay open and every new session gets ``421 4.3.2``
        (a sender tries the next MX at once; a closed port could look like a network
        fault), sessions finish the transaction they are in and then get it too, and every
        queued message is due now. Once no transaction is open and nothing is queued, the
        daemon stops as on TERM. What cannot be delivered stays queued: `mailgate drain`
        stops the daemon at its deadline and reports (or hands over) what is left."""
        if self.draining is not None or self._drained is not None:
            return  # draining already, or stopping
        self.draining = Reply(
            421, "4.3.2", f"{self.snapshot.config.hostname} Service shutting down"
        )
        if not self._started:
            return  # start() drains once it has taken on the queue
        self.events.draining()
        maillog.draining()
        for s in list(self.sessions):
            s.drain(self.draining)
        self.feeder.run_all()
        self._in_background(self._drain_until_done())

    async def _drain_until_done(self) -> None:
        while not self._drain_done():
            await asyncio.sleep(DRAIN_POLL)
        maillog.drained()
        self.finished()

    def _drain_done(self) -> bool:
        """No session has a transaction open (those left are saying 421), the scheduler
        has nothing waiting or under way, and a pass over the queue found nothing more."""
        busy = any(s.session is not None and s.session.tx is not None for s in self.sessions)
        if busy or self.scheduler.queued:
            return False
        if not self.feeder.settled:
            self.feeder.request_pass()
            return False
        return True

    def _listener_settings(self, started: ListenerSettings) -> ListenerSettings:
        """A listener's settings in the config in force (a reload may change its PROXY
        trust); its address cannot change without a restart."""
        for listener in self.snapshot.config.listeners:
            if listener.address == started.address:
                return listener
        return started

    async def stop(self) -> None:
        """SIGTERM: accept nothing more; sessions finish the transaction they are in (then get
        421) and deliveries in progress go on, until ``stop_grace``; what is left then is
        closed (a session) or cancelled (a delivery, whose message stays queued). Nothing
        acknowledged is lost either way: the spool is consistent at every step."""
        self.events.stopping()
        if self.workers == 1:  # else the master's line says it for the daemon
            maillog.stopping(self.snapshot.config.stop_grace)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.snapshot.config.stop_grace
        for listener in self.listeners:
            await listener.close()
        bye = Reply(421, "4.3.2", f"{self.snapshot.config.hostname} Shutting down")
        self._drained = asyncio.Event()
        for s in list(self.sessions):
            s.drain(bye)
        if self.sessions:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._drained.wait()
        if self.sessions:
            maillog.stop_deadline(len(self.sessions))
        for s in list(self.sessions):
            with contextlib.suppress(Exception):
                s.shut_down(bye)
        # Scrapes went on during the drain (/health said "not listening" since the listeners
        # closed): the last ones see it through.
        if self.monitor is not None:
            await self.monitor.close()
        await self.feeder.stop()
        self._report_task.cancel()
        for task in (self._stress_task, self._stats_task):
            if task is not None:
                task.cancel()
        if self.workers == 1:
            self.log_statistics()
        await self.scheduler.stop(grace=max(0.0, deadline - loop.time()))
        if self.workers > 1:  # for the master's last statistics line
            self.events.activity(self.activity())
        if self.delivery.connections is not None:
            await self.delivery.connections.close_all()
        self.spool.close()

    def reload(self) -> bool:
        """SIGHUP: re-read config and tables; a bad new config is refused, the old one stays.
        Sessions keep the snapshot they started with; only new ones see the new one. The log
        file is opened again first, whatever the outcome (logrotate's HUP)."""
        maillog.reopen()
        self.events.reloading()
        snapshot = try_reload(self.config_path)
        if not isinstance(snapshot, Snapshot):
            self.events.reloaded(str(snapshot))
            return False
        config = snapshot.config
        old = self.snapshot.config
        if config.dns != old.dns:
            self.resolver = make_resolver(config)
            self.delivery.resolver = self.resolver
        setup_log(config)
        self.snapshot = snapshot
        self._enter_milters(config)
        self.timeouts = self._timeouts_now()
        if self.workers == 1:  # else the master, which checked it first, says it once
            log_reload(old, snapshot)
        self.events.reloaded(None, snapshot.generation)
        return True

    # -- what sessions call --------------------------------------------------------------------
    def session_started(self, session: SmtpServerProtocol) -> None:
        """A connection was accepted (admitted or not: ``smtp/limits.py`` counts those)."""
        self.sessions.add(session)
        self._check_stress()

    @property
    def quiet(self) -> bool:
        """Only one session in this process (the one asking): see ``SessionHost.quiet``."""
        return len(self.sessions) <= 1

    def session_ended(self, session: SmtpServerProtocol) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self._check_stress()
        if not self.sessions and self._drained is not None:
            self._drained.set()

    def _check_stress(self) -> None:
        """Postfix's stress mode: once open sessions reach ``stress_threshold`` of
        ``max_connections``, clients that hold a session without using it (slowloris) get
        ``stress_timeout`` instead of the RFC's minutes, until the load falls back below 90 %
        of that mark (the margin keeps one connection coming and going from flapping it).
        The count is the whole daemon's; each worker looks at it when its own sessions come
        and go, and every ``STRESS_LOOK`` seconds (the others' sessions move it too), and
        changes the timeouts of its own."""
        smtp = self.snapshot.config.smtp
        mark = max(1, math.ceil(smtp.max_connections * smtp.stress_threshold))
        open_now = self.admission.open_sessions
        if not self.stressed and open_now >= mark:
            self.stressed = True
            self.timeouts = self._timeouts_now()
            self.metrics.inc(metrics.STRESS_EPISODES)
            maillog.stress_started(open_now, smtp.max_connections, smtp.stress_timeout)
            for session in list(self.sessions):
                session.timeouts_changed()
        elif self.stressed and open_now < mark * 0.9:
            self.stressed = False
            self.timeouts = self._timeouts_now()
            maillog.stress_ended(
                open_now, smtp.max_connections, smtp.command_timeout, smtp.data_timeout
            )

    async def _stress_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self._check_stress()

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

    async def lookup_client(self, client: Client) -> Client:
        """The client with its PTR status (semantics §18.4), within the resolver's one
        timeout."""
        known = self.known_client(client)
        if known is not None:
            return known
        result = await self.resolver.ptr(client.ip)
        return Client(client.ip, result.status, result.name)

    def known_client(self, client: Client) -> Client | None:
        if client.unidentified:
            return client  # the proxy's own address: its name would grant nothing
        return Client(client.ip, "OK", "localhost") if client.is_loopback else None

    async def domain_resolves(self, domain: str) -> str:
        """Does the sender's domain resolve, within the resolver's one timeout."""
        return await self.resolver.domain_resolves(domain)

    def message_queued(self, queued: QueuedMessage) -> None:
        """A session committed a message (and sent its 250): its first attempt gets it with
        its file still open and locked."""
        self.metrics.counts[metrics.MESSAGES_RECEIVED] += 1
        self._first_attempt(queued)

    def _report_queued(self, queued: QueuedMessage) -> None:
        """A bounce, delay warning or return receipt was queued: not received mail."""
        self._first_attempt(queued)

    def _first_attempt(self, queued: QueuedMessage) -> None:
        self.scheduler.submit(queued.qid, message=queued)
        if queued.fd is None and self.spool.has_spare_name(queued.qid):
            # Not taken (no room in the window): a queue pass, maybe another worker's, will
            # deliver it, so its spare/ name must not outlive this moment (queue/spool.py).
            self._in_background(asyncio.to_thread(self.spool.settle_spare_name, queued.qid))

    def flush_domain(self, domain: str, *, subdomains: bool = False) -> None:
        """ETRN: retry now what waits for ``domain`` (and its subdomains for ``ETRN @domain``).
        The queue is read in a thread (it may be large) and the reply does not wait for it, as
        Sendmail's forked queue run; a second ETRN for a node whose scan is under way joins it."""
        node = ("@" if subdomains else "") + domain
        if node in self._flushing:
            return
        self._flushing.add(node)
        self._in_background(self._flush_domain(node, domain, subdomains))

    def _in_background(self, work: Coroutine[Any, Any, object]) -> None:
        """Run ``work`` as a task the daemon keeps a reference to until it ends."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _flush_domain(self, node: str, domain: str, subdomains: bool) -> None:
        try:
            chosen, spilled = await asyncio.to_thread(
                self._queued_for, domain, subdomains, self.scheduler.room
            )
        finally:
            self._flushing.discard(node)
        await self.feeder.submit_now(chosen)
        if spilled:
            self.feeder.request_pass()

    def _queued_for(self, domain: str, subdomains: bool, room: int) -> tuple[list[str], int]:
        """The queued messages with a recipient in ``domain``: read only (an unreadable entry
        is left for its attempt to quarantine). At most ``room``; the others are made due
        now on disk (``Spool.set_due``), for a pass to take on: (those, how many others)."""
        suffix = "." + domain
        chosen: list[str] = []
        spilled = 0
        for qid in self.spool.qids():
            try:
                msg = self.spool.load(qid, with_status=False)
            except CorruptEntry:
                continue
            if msg and any(
                (d := r.mailbox.domain) == domain or (subdomains and d.endswith(suffix))
                for r in msg.envelope.recipients
            ):
                if len(chosen) < room:
                    chosen.append(qid)
                else:
                    self.spool.set_due(qid, time.time())  # none: never attempted, due now
                    spilled += 1
        return chosen, spilled

    def _my_share(self, qid: str) -> bool:
        return self.workers == 1 or zlib.crc32(qid.encode()) % self.workers == self.worker

    def _mine(self, qid: str) -> bool:
        """The queued messages this process delivers: its share, and (whatever the share)
        what it and its dead predecessors received, which no other worker knows of."""
        return self._my_share(qid) or qid[-6:] == self.tag or qid[-6:] in self.adopt

    def run_queue(self) -> None:
        """SIGUSR1, Sendmail's ``-q``: everything queued is due now: what the window holds,
        and what a pass over the queue folder finds (``mailgate flush``'s bounces too)."""
        self.feeder.run_all()

    def wake(self) -> None:
        """The wake-up signal (``DUE_SIGNAL``): what ``mailgate release`` or ``requeue``
        marked due is attempted now; the rest of the queue keeps its times."""
        self.feeder.due_marked()

    def count(self, slot: int) -> None:
        self.metrics.counts[slot] += 1

    def _enter_milters(self, config: Config) -> None:
        for m in config.milter:
            if m.name not in self._milter_counts:
                self._milter_counts[m.name] = self.metrics.milter(m.name)

    def milter_counts(self, name: str) -> metrics.MilterCounts:
        counts = self._milter_counts.get(name)
        if counts is None:  # a session older than the reload that dropped its filter
            counts = self._milter_counts[name] = self.metrics.milter(name)
        return counts

    def log_statistics(self) -> None:
        """One maillog line of counters, like Postfix's anvil statistics (also on SIGUSR2):
        this process's row of the metrics (a restarted worker's includes its predecessors').
        With workers the master writes the daemon's line instead (master.py)."""
        counts = metrics.statistics_counts(self.metrics.value)
        maillog.statistics(
            counts | {"log_lines_lost": maillog.lost_lines()},
            len(self.sessions),
            self.queued(),
            self.scheduler.active,
        )

    def queued(self) -> int:
        """The messages in the queue, as ``mailq`` counts them (the whole daemon's, whatever
        the window holds): the last census and what entered and left since
        (monitor.QueueCount). Before the first census is in (at start, for as long as a
        listing of the queue's names takes), the window's: what is known so far."""
        known = self.queue_count.known()
        if known is None:
            return self.scheduler.queued + self.scheduler.active
        return known[0]

    async def _statistics_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.queue_count.current()
            self.log_statistics()

    def activity(self) -> Activity:
        return Activity(
            sessions=len(self.sessions),
            # The row's count: a restarted worker's includes its predecessors', so the
            # daemon's total (the master sums the rows) never goes back.
            received=self.metrics.value(metrics.MESSAGES_RECEIVED),
            queued=self.queued(),
            delivering=self.scheduler.active,
            counted=self.queue_count.known() is not None,
        )

    async def _report_every(self, interval: float) -> None:
        """The counts for systemd's STATUS and the state file (the master sums the workers',
        but for the queue, which each counts whole). Each report comes after a census if the
        last one is old (a thread, ``QueueCount``): the first one too."""
        while True:
            await self.queue_count.current()
            self.events.activity(self.activity())
            await asyncio.sleep(interval)

    def statistics_now(self) -> None:
        """SIGUSR2: the statistics line in the log, and the counts in the state file and
        systemd's STATUS brought up to date (with workers, the master writes the line once
        every worker's report is in)."""
        if self.workers == 1:
            self.log_statistics()
        self.events.activity(self.activity())


def log_reload(old: Config, new: Snapshot) -> None:
    """The lines of a reload that passed its check: what only a restart applies, the new
    config's warnings, and that it is in force."""
    config = new.config
    moved = [ls.address for ls in config.listeners] != [ls.address for ls in old.listeners]
    if (
        moved
        or config.spool_dir != old.spool_dir
        or config.metrics.listen != old.metrics.listen
        or config.worker_processes != old.worker_processes
    ):
        maillog.restart_needed()
    for w in new.warnings():
        maillog.config_warning(w)
    maillog.reloaded(config.source)


def setup_log(config: Config) -> None:
    """A reloaded ``[log]``: a destination that cannot be opened leaves the lines where they
    went (logged), the rest of the reload goes on."""
    try:
        maillog.setup(config.hostname, config.log)
    except OSError as exc:
        maillog.log_open_failed(exc)


def install_event_loop() -> None:
    """uvloop where it is installed: the gateway's work is sockets and timers."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(config_path: str | Path | None, snapshot: Snapshot, **worker: Any) -> None:
    gateway = Gateway(config_path, snapshot, **worker)
    loop = asyncio.get_running_loop()
    # HUP and TERM are taken from the start (their default would kill the process while it
    # binds); a HUP then reloads at once, a TERM stops once the start is done.
    loop.add_signal_handler(signal.SIGHUP, gateway.reload)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    # USR2 too: its default would kill a daemon that has logged "starting daemon" but not yet
    # come back here, and its statistics need nothing the start makes. USR1 needs the
    # scheduler running: ignored until then (the start takes on the queue anyway).
    loop.add_signal_handler(signal.SIGUSR2, gateway.statistics_now)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    gateway.finished = stop.set
    loop.add_signal_handler(DRAIN_SIGNAL, gateway.drain)  # its default would suspend us
    await gateway.start()
    loop.add_signal_handler(signal.SIGUSR1, gateway.run_queue)
    # Ignored until here (its default), and start() has read due/ already.
    loop.add_signal_handler(DUE_SIGNAL, gateway.wake)
    await stop.wait()
    await gateway.stop()


def pid_tag(pid: int) -> str:
    """The end of every queue id made by process ``pid`` (``Spool.new_qid``)."""
    return f"{pid % 1_000_000:06d}"
