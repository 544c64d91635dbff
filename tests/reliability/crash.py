"""The crash suite: many sessions send thousands of messages to the real daemon while it is
killed with SIGKILL at arranged moments and restarted; the sink next hop then accounts for
every message by its Message-ID.

Kills, in turn:

- ``data``: a client has sent part of a message's content and not its end (mid-DATA);
- ``ack``: a client has just read the ``250`` after its content (the client kills it);
- ``delivery``: the sink holds its reply after the content (``sink.delays["data_end"]``), so
  that deliveries are in flight at the kill;
- ``queue``: the sink refuses after the content (4xx) until some messages are deferred, then
  accepts (slowly again), the queue run is started with USR1, and the kill lands in it;
- ``random``: at a random moment soon after the previous restart (whose start-up queue run
  is then under way, started by the recovery and USR1).

After each kill the daemon is restarted on the same spool and sent USR1 (deferred mail waits
an hour otherwise). What must hold at the end:

- every message that got a ``250`` arrived at the sink, unaltered (zero lost);
- duplicates ≤ the messages in flight at the kills, counted, not assumed: at each kill, the
  messages still in ``queue/`` whose delivery the sink had begun since the previous restart
  and not refused (only those can be delivered twice), and every duplicate is one of them;
- no message refused by the gateway arrived, no copy is unknown;
- once all is delivered, ``queue/``, ``incoming/`` and ``corrupt/`` are empty and ``spare/``
  holds no sealed file; after the final stop (TERM) ``spare/`` is empty too (README).

Messages cut by a kill (no ``250``) may or may not arrive: they are counted.

    python -m tests.reliability.crash --kills 50 --messages 20000 --sessions 10 --seed 7
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.crash import (
    SENDER,
    CrashSink,
    alive,
    children_of,
    make_message,
    message_number,
    read_spool,
    recipient,
    sealed_spares,
    spool_files,
    stuffed,
)
from tests.support.dnsserver import DnsServer
from tests.support.gateway import GatewayProcess, free_port
from tests.support.rawsmtp import ConnectionClosedByPeer, RawSmtp
from tests.support.wait import poll

SINK_IP = "127.0.0.9"
KINDS = ("data", "ack", "delivery", "queue", "random")
NET_ERRORS = (OSError, ConnectionClosedByPeer)


@dataclass
class Options:
    workdir: Path
    kills: int = 10
    messages: int = 2500
    sessions: int = 10
    seed: int = 1
    workers: int = 1  # the daemon's setting; the master is killed and takes the workers along
    delivery_delay: float = 0.3  # the sink's pause after the content, in the delivery kills
    deferred: int = 30  # messages refused by the sink before a queue-run kill
    time_limit: float | None = None  # hang guard for the whole run; None: from the sizes

    def limit(self) -> float:
        if self.time_limit is not None:
            return self.time_limit
        return 120.0 + 10.0 * self.kills + self.messages / 20


@dataclass
class KillRecord:
    kind: str
    arranged: bool  # the arranged moment was reached (False: killed anyway after a wait)
    acknowledged: int  # messages acknowledged when it struck
    queued: int  # queue/ entries left by the dead daemon
    in_flight: list[int]  # of those: deliveries begun and not refused (may arrive twice)
    sealed_incoming: int  # acknowledged-or-not files start-up will move into the queue
    cut: int = 0  # client messages cut by it (content sent, no final reply)


@dataclass
class Figures:
    options: Options
    sent: int = 0  # content sent (DATA accepted with 354)
    acknowledged: int = 0
    refused: int = 0  # a final reply other than 250 from the gateway
    cut: int = 0
    cut_arrived: int = 0
    delivered: int = 0  # distinct messages at the sink
    copies: int = 0
    duplicates: int = 0
    dup_bound: int = 0
    kills: list[KillRecord] = field(default_factory=list)
    elapsed: float = 0.0
    problems: list[str] = field(default_factory=list)
    lost: list[tuple[int, str]] = field(default_factory=list)  # (message, qid of its 250)

    def summary(self) -> str:
        kinds = Counter(k.kind for k in self.kills)
        arranged = sum(k.arranged for k in self.kills)
        o = self.options
        lines = [
            f"crash: {len(self.kills)} kills ({', '.join(f'{k} {kinds[k]}' for k in KINDS)}; "
            f"{arranged} at the arranged moment), {o.sessions} sessions, "
            f"{o.workers} worker{'s' if o.workers > 1 else ''}, seed {o.seed}",
            f"  messages: sent {self.sent}, acknowledged {self.acknowledged}, "
            f"refused {self.refused}, cut by a kill {self.cut} (of which arrived "
            f"{self.cut_arrived})",
            f"  sink: delivered {self.delivered} distinct, {self.copies} copies, duplicates "
            f"{self.duplicates} (bound: {self.dup_bound} in flight at the kills, at most "
            f"{max((len(k.in_flight) for k in self.kills), default=0)} at one)",
            f"  lost: {len(self.lost)}; time {self.elapsed:.1f} s",
        ]
        for i, k in enumerate(self.kills):
            lines.append(
                f"  kill {i + 1:2d} {k.kind:8s} {'' if k.arranged else '(not arranged) '}"
                f"after {k.acknowledged} acks: queue {k.queued}, in flight "
                f"{len(k.in_flight)}, sealed in incoming {k.sealed_incoming}, cut {k.cut}"
            )
        lines += [f"  PROBLEM: {p}" for p in self.problems]
        return "\n".join(lines)


class Traffic:
    """The client side: ``sessions`` threads sending messages 0 … messages-1 over raw SMTP."""

    def __init__(self, opts: Options, host: str, port: int, deadline: float) -> None:
        self.opts = opts
        self.host = host
        self.port = port
        self.deadline = deadline
        self.lock = threading.Lock()
        self.next = 0
        self.retry: list[int] = []  # numbers whose content was never sent: send them again
        self.sent: set[int] = set()
        self.acked: dict[int, str] = {}  # message → the qid in its 250
        self.refused: dict[int, str] = {}
        self.cut: set[int] = set()
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.armed: str | None = None
        self.pid = 0
        self.killed = threading.Event()
        self.threads: list[threading.Thread] = []

    # -- kills from a client ---------------------------------------------------------------------
    def arm(self, kind: str, pid: int) -> None:
        with self.lock:
            self.pid = pid
            self.killed.clear()
            self.armed = kind

    def disarm(self) -> None:
        with self.lock:
            self.armed = None

    def _trigger(self, kind: str) -> None:
        if self.armed != kind:
            return
        with self.lock:
            if self.armed != kind:
                return
            self.armed = None
            os.kill(self.pid, signal.SIGKILL)
            self.killed.set()

    # -- sessions --------------------------------------------------------------------------------
    def start(self) -> None:
        for i in range(self.opts.sessions):
            t = threading.Thread(
                target=self._session, args=(i,), name=f"crash-client-{i}", daemon=True
            )
            t.start()
            self.threads.append(t)

    def join(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)

    def _take(self) -> int | None:
        with self.lock:
            if self.retry:
                return self.retry.pop()
            if self.next >= self.opts.messages:
                return None
            self.next += 1
            return self.next - 1

    def _give_back(self, n: int) -> None:
        with self.lock:
            self.retry.append(n)

    def _connect(self, source: str) -> RawSmtp | None:
        conn: RawSmtp | None = None
        try:
            conn = RawSmtp(self.host, self.port, source=source, timeout=15)
            if conn.read_reply().code == 220 and conn.cmd("EHLO client.example.net").code == 250:
                return conn
        except NET_ERRORS:
            pass
        if conn is not None:
            conn.close()
        time.sleep(0.05)  # the daemon is down: try again shortly
        return None

    def _session(self, index: int) -> None:
        try:
            self._session_loop(index)
        except Exception as exc:  # reported as a problem, not lost in a thread
            with self.lock:
                self.errors.append(f"client {index}: {exc!r}")

    def _session_loop(self, index: int) -> None:
        source = f"127.0.0.{2 + index % 4}"
        conn: RawSmtp | None = None
        used = 0
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            if conn is None:
                conn = self._connect(source)
                used = 0
                continue
            n = self._take()
            if n is None:
                break
            if not self._send(conn, n):
                conn.close()
                conn = None
                continue
            used += 1
            if used >= 100:  # a new connection now and then
                with contextlib.suppress(*NET_ERRORS):
                    conn.cmd("QUIT")
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def _send(self, conn: RawSmtp, n: int) -> bool:
        """One transaction; False if the connection is no longer usable."""
        rng = random.Random(f"{self.opts.seed}:{n}")
        content = stuffed(make_message(n, self.opts.seed, rng)) + b".\r\n"
        try:
            ok = (
                conn.cmd(f"MAIL FROM:<{SENDER}>").code == 250
                and conn.cmd(f"RCPT TO:<{recipient(n)}>").code == 250
                and conn.cmd("DATA").code == 354
            )
        except NET_ERRORS:
            ok = False
        if not ok:
            self._give_back(n)  # no content went out: it cannot arrive, send it again
            return False
        with self.lock:
            self.sent.add(n)
        half = rng.randrange(1, len(content) - 3)
        try:
            conn.send(content[:half])
            self._trigger("data")
            conn.send(content[half:])
            reply = conn.read_reply()
        except NET_ERRORS:
            with self.lock:
                self.cut.add(n)
            return False
        if reply.code == 250:
            with self.lock:
                self.acked[n] = reply.text.split()[1]
            self._trigger("ack")
            return True
        with self.lock:
            self.refused[n] = reply.first
        return False


class Run:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.figures = Figures(opts)

    def problem(self, text: str) -> None:
        self.figures.problems.append(text)

    def start_gateway(self, gw: GatewayProcess) -> None:
        started = gw.log().count("starting daemon")
        gw.start()

        # Listening is not enough: USR1 before the signal handlers are in place would end the
        # daemon (or a worker). A process logs "starting daemon" (the master: once all its
        # workers have) just before installing them; a greeting shows an event loop running.
        def ready() -> bool:
            if gw.log().count("starting daemon") < started + 1:
                return False
            try:
                with RawSmtp(gw.host, gw.port, timeout=5) as c:
                    return c.read_reply().code == 220
            except NET_ERRORS:
                return False

        if not poll(ready, 30, 0.05):
            raise RuntimeError("the restarted daemon does not greet")
        gw.signal(signal.SIGUSR1)  # deferred mail would wait an hour otherwise

    def kill_at(self, kind: str, gw: GatewayProcess, sink: CrashSink, traffic: Traffic) -> bool:
        """Arrange ``kind``'s moment and kill there; False if it was not reached in time."""
        assert gw.proc is not None
        pid = gw.proc.pid
        arranged = True
        delay = self.opts.delivery_delay
        if kind in ("data", "ack"):
            traffic.arm(kind, pid)
            arranged = traffic.killed.wait(20)
            traffic.disarm()
        elif kind == "random":
            time.sleep(self.rng.uniform(0.0, 0.6))
        elif kind == "delivery":
            sink.delays["data_end"] = delay
            mark = sink.mark()
            arranged = bool(poll(lambda: sink.since(mark).data_commands >= 5, 20, 0.02))
            time.sleep(self.rng.uniform(0.0, delay * 0.8))
        elif kind == "queue":
            sink.data_reply = "451 4.3.0 Try again later"
            mark = sink.mark()
            arranged = bool(
                poll(lambda: sum(sink.since(mark).refused.values()) >= self.opts.deferred, 20, 0.02)
            )
            deferred = set(sink.since(mark).refused)
            sink.delays["data_end"] = delay
            run_mark = sink.mark()
            sink.data_reply = None
            time.sleep(0.1)  # the last refusals' deferrals recorded
            gw.signal(signal.SIGUSR1)
            arranged = (
                bool(poll(lambda: len(deferred & set(sink.since(run_mark).started)) >= 3, 20, 0.02))
                and arranged
            )
            time.sleep(self.rng.uniform(0.0, delay * 0.8))
        if gw.proc.poll() is None:
            os.kill(pid, signal.SIGKILL)
        return arranged

    def run(self) -> Figures:
        opts = self.opts
        fig = self.figures
        t0 = time.monotonic()
        deadline = t0 + opts.limit()
        with DnsServer() as dns, CrashSink(SINK_IP, free_port(SINK_IP)) as sink:
            dns.add("example.org", "A", "192.0.2.10")
            gw = GatewayProcess(
                opts.workdir / "gw",
                dns=dns.address,
                tables={
                    "mailertable": f"crash.test smtp:[{SINK_IP}]:{sink.port}\n",
                    "access": "To:crash.test RELAY\n",
                },
                settings=(
                    f"workers = {opts.workers}\n"
                    '[smtp]\ngreet_pause = "0s"\nmax_connections_per_ip = 0\n'
                    "connection_rate_throttle = 0\n"
                    # Deferred mail waits for USR1 (or the end), not for its own retry time.
                    '[queue]\nrun_interval = "1h"\nretry_min = "1h"\n'
                    '[delivery]\nconnect_timeout = "5s"\n'
                ),
            )
            traffic = Traffic(opts, gw.host, gw.port, deadline)
            try:
                self.start_gateway(gw)
                traffic.start()
                self._kills(gw, sink, traffic, deadline)
                if not traffic.join(max(1.0, deadline - time.monotonic())):
                    self.problem("the clients did not finish within the time limit")
                traffic.stop.set()
                self._drain(gw, sink, traffic, deadline)
                self._spool_check(gw, stopped=False)
                gw.stop()
                self._spool_check(gw, stopped=True)
            finally:
                traffic.stop.set()
                if gw.proc is not None and gw.proc.poll() is None:
                    gw.kill9()
            fig.elapsed = time.monotonic() - t0
            self._account(sink, traffic, gw)
        return fig

    def _kills(
        self, gw: GatewayProcess, sink: CrashSink, traffic: Traffic, deadline: float
    ) -> None:
        opts = self.opts
        epoch = sink.mark()
        for i in range(opts.kills):
            kind = KINDS[i % len(KINDS)]
            if time.monotonic() > deadline:
                self.problem(f"time limit reached after {i} kills")
                return
            if kind != "random":
                # Spread the kills over the traffic: kill i after (i+1)/(kills+1) of it.
                goal = (i + 1) * opts.messages // (opts.kills + 1)

                def reached(goal: int = goal) -> bool:
                    return len(traffic.acked) >= goal

                poll(reached, max(0.0, min(60.0, deadline - time.monotonic())), 0.05)
            cut_before = len(traffic.cut)
            acked = len(traffic.acked)
            assert gw.proc is not None
            workers = children_of(gw.proc.pid)
            arranged = self.kill_at(kind, gw, sink, traffic)
            gw.kill9()  # reaps it

            # Its workers die with it (PR_SET_PDEATHSIG), a moment later.
            def gone(w: tuple[int, ...] = tuple(workers)) -> bool:
                return not any(map(alive, w))

            if not poll(gone, 15, 0.02):
                self.problem(f"kill {i + 1}: workers outlived the master")
            # Deliveries the sink holds (its reply delay) finish, as a real server's would:
            # the content is in, the client is gone.
            if not poll(lambda: sink.open_sessions == 0, 15, 0.02):
                self.problem(f"kill {i + 1}: the sink kept {sink.open_sessions} sessions open")
            state = read_spool(gw.spool)
            begun = sink.since(epoch).not_refused()
            time.sleep(0.05)  # clients notice the dead connections
            self.figures.kills.append(
                KillRecord(
                    kind,
                    arranged,
                    acked,
                    len(state.queued) + len(state.other_queued),
                    sorted(set(state.queued) & begun),
                    state.sealed_incoming,
                    cut=len(traffic.cut) - cut_before,
                )
            )
            if state.other_queued:
                self.problem(
                    f"kill {i + 1}: queue entries that are not test messages: "
                    f"{state.other_queued[:5]}"
                )
            sink.delays.clear()
            sink.data_reply = None
            epoch = sink.mark()
            self.start_gateway(gw)

    def _drain(
        self, gw: GatewayProcess, sink: CrashSink, traffic: Traffic, deadline: float
    ) -> None:
        """Until the queue is empty and every acknowledged message arrived (USR1 now and
        then: deferred mail is due only in an hour). An empty queue that stays empty for a
        few seconds ends it too: what has not arrived then is lost, and reported so."""
        acked = set(traffic.acked)

        def queue_empty() -> bool:
            return not any((gw.spool / "queue").iterdir())

        def arrived() -> bool:
            with sink._cond:
                got = {message_number(m.data) for m in sink.messages}
            return acked <= got

        end = min(deadline, time.monotonic() + 120)
        empty_since: float | None = None
        while time.monotonic() < end:
            if queue_empty():
                if arrived():
                    return
                empty_since = empty_since or time.monotonic()
                if time.monotonic() - empty_since > 3:
                    return
            else:
                empty_since = None
                gw.signal(signal.SIGUSR1)
            poll(lambda: queue_empty() and arrived(), 1.0, 0.05)
        self.problem("the queue did not drain within the time limit")

    def _spool_check(self, gw: GatewayProcess, *, stopped: bool) -> None:
        files = spool_files(gw.spool)
        when = "after the stop" if stopped else "once all was delivered"
        for name in ("incoming", "queue", "corrupt") + (("spare",) if stopped else ()):
            if files[name]:
                self.problem(
                    f"spool/{name} {when}: {len(files[name])} files, e.g. {files[name][:5]}"
                )
        if not stopped:
            sealed = sealed_spares(gw.spool)
            if sealed:
                self.problem(f"sealed files in spool/spare: {sealed[:5]}")

    def _account(self, sink: CrashSink, traffic: Traffic, gw: GatewayProcess) -> None:
        fig = self.figures
        opts = self.opts
        with sink._cond:
            messages = list(sink.messages)
        copies: Counter[int] = Counter()
        for m in messages:
            n = message_number(m.data)
            if n is None or not 0 <= n < opts.messages:
                self.problem(f"unknown message at the sink: {m.data[:200]!r}")
                continue
            copies[n] += 1
            expected = make_message(n, opts.seed, random.Random(f"{opts.seed}:{n}"))
            if not m.data.endswith(expected) or m.rcpt_tos != [recipient(n)]:
                self.problem(
                    f"message {n} arrived altered (rcpt {m.rcpt_tos}, {len(m.data)} bytes)"
                )
        fig.sent = len(traffic.sent)
        fig.acknowledged = len(traffic.acked)
        fig.refused = len(traffic.refused)
        fig.cut = len(traffic.cut)
        fig.cut_arrived = len(traffic.cut & set(copies))
        fig.delivered = len(copies)
        fig.copies = sum(copies.values())
        fig.duplicates = fig.copies - fig.delivered
        fig.dup_bound = sum(len(k.in_flight) for k in fig.kills)
        fig.lost = sorted((n, q) for n, q in traffic.acked.items() if n not in copies)
        for e in traffic.errors:
            self.problem(e)
        for line in _trouble(gw)[:5]:
            self.problem(f"the daemon reported: {line[:300]}")
        if len(traffic.sent) + len(traffic.retry) < opts.messages:
            self.problem(f"only {len(traffic.sent)} of {opts.messages} messages were sent")
        if fig.lost:
            log = gw.log().splitlines()
            sample = []
            for n, qid in fig.lost[:3]:
                lines = [line for line in log if qid in line]
                sample.append(
                    f"message {n} (250 with qid {qid}): "
                    + (" | ".join(lines)[:600] if lines else "no maillog line")
                )
            self.problem(
                f"LOST: {len(fig.lost)} acknowledged messages never arrived, e.g. "
                + "; ".join(sample)
            )
        if fig.duplicates > fig.dup_bound:
            self.problem(
                f"{fig.duplicates} duplicates, more than the {fig.dup_bound} "
                "deliveries in flight at the kills"
            )
        in_flight = {n for k in fig.kills for n in k.in_flight}
        strays = sorted(n for n, c in copies.items() if c > 1 and n not in in_flight)
        if strays:
            self.problem(
                f"duplicates of messages that were not in flight at any kill: {strays[:10]}"
            )
        refused_arrived = sorted(set(traffic.refused) & set(copies))
        if refused_arrived:
            self.problem(
                f"refused by the gateway yet delivered: "
                f"{[(n, traffic.refused[n]) for n in refused_arrived[:5]]}"
            )
        if len(fig.kills) != opts.kills:
            self.problem(f"{len(fig.kills)} kills of {opts.kills}")
        missed = [f"{i + 1} ({k.kind})" for i, k in enumerate(fig.kills) if not k.arranged]
        if missed:
            self.problem(f"kills whose arranged moment was not reached: {missed}")


_TROUBLE = re.compile(
    r"delivery attempt failed|session with .* failed|cannot (accept|commit|"
    r"write)|Internal error|Traceback|worker \d+ .*(failed|exited)"
)


def _trouble(gw: GatewayProcess) -> list[str]:
    """Lines of the maillog and the daemon's stderr that tell of an error inside it."""
    try:
        stderr = (gw.dir / "stderr.log").read_text(errors="replace")
    except FileNotFoundError:
        stderr = ""
    return [line for line in (gw.log() + stderr).splitlines() if _TROUBLE.search(line)]


def run(opts: Options) -> Figures:
    return Run(opts).run()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.reliability.crash",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--kills", type=int, default=50)
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--sessions", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="the daemon's workers setting")
    p.add_argument("--delivery-delay", type=float, default=0.3)
    p.add_argument("--time-limit", type=float, default=None, help="hang guard, seconds")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="kept afterwards (default: a temporary folder, removed)",
    )
    args = p.parse_args(argv)

    def go(workdir: Path) -> Figures:
        return run(
            Options(
                workdir=workdir,
                kills=args.kills,
                messages=args.messages,
                sessions=args.sessions,
                seed=args.seed,
                workers=args.workers,
                delivery_delay=args.delivery_delay,
                time_limit=args.time_limit,
            )
        )

    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        figures = go(args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="mailgate-crash-") as tmp:
            figures = go(Path(tmp))
    print(figures.summary())
    return 1 if figures.problems else 0


if __name__ == "__main__":
    sys.exit(main())
