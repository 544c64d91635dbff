"""The scheduler's bounded window and the passes that feed it (``queue.feeder``): a queue far
longer than the window is delivered whole, what is due later or held stays on disk, hot mail
that finds the window full is left on disk and still delivered; with the real daemon, a
restart on a deep queue greets before its first pass ends, messages outside the window expire
on time, and hold / release / requeue work through the window.

Windows of a few messages, so that a queue of a few hundred is "deep".
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from pathlib import Path

import pytest

from mailgate import control, metrics, runstate
from mailgate.monitor import QueueCount
from mailgate.queue.feeder import QueueFeeder
from mailgate.queue.scheduler import Scheduler
from mailgate.queue.spool import HELD_DUE, Envelope, QueuedMessage, QueueStatus, Recipient, Spool
from tests.support.blackhole import Blackhole
from tests.support.gateway import GatewayProcess, run_cli
from tests.support.sink import SinkServer
from tests.support.wait import wait_until, wait_until_async
from tests.support.world import (
    HOP1,
    MXHOST,
    SENDER_DNS,
    GatewayFactory,
    SinkFactory,
    World,
    issue_world,
    message,
)

GUARD = 30.0
DNS_RECORDS = SENDER_DNS  # the senders' domain resolves; its MX takes the bounces


async def _queue(spool: Spool, n: int, *, lock: bool = False) -> list[QueuedMessage]:
    out = []
    for i in range(n):
        env = Envelope(
            qid=spool.new_qid(),
            sender="alice@example.org",
            recipients=[Recipient(f"u{i}@hop.test", f"u{i}@hop.test")],
            arrival=time.time(),
        )
        incoming = spool.open_incoming(env)
        incoming.write(b"Subject: window\r\n\r\nx\r\n")
        out.append(await spool.commit(incoming, lock=lock))
    return out


class Bench:
    """A spool, a scheduler with a small window and its feeder; the attempt claims the
    message from the spool (or takes the hot one) and removes it: delivered."""

    def __init__(self, tmp_path: Path, *, limit: int, slots: int) -> None:
        self.spool = Spool(tmp_path / "spool", fsync="threads")
        self.attempted: list[str] = []
        self.peak_waiting = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.feeder = QueueFeeder(self.spool, lambda q: True, lambda: 3600.0, where="test")
        self.scheduler = Scheduler(self._attempt, slots, limit=limit, outside=self.feeder)
        self.feeder.attach(self.scheduler)

    async def _attempt(self, qid: str, message: QueuedMessage | None) -> float | None:
        waiting = self.scheduler.limit - self.scheduler.room
        self.peak_waiting = max(self.peak_waiting, waiting)
        await self.gate.wait()
        msg = message if message is not None else self.spool.claim(qid)
        assert msg is not None, qid
        with msg:
            self.attempted.append(qid)
            self.spool.remove(qid, status_file=True)
        return None

    def start(self) -> None:
        self.scheduler.start()
        self.feeder.start()

    async def stop(self) -> None:
        await self.feeder.stop()
        await self.scheduler.stop()
        self.spool.close()


def test_a_queue_longer_than_the_window_is_delivered_whole(tmp_path: Path) -> None:
    async def go() -> None:
        bench = Bench(tmp_path, limit=8, slots=3)
        queued = {m.qid for m in await _queue(bench.spool, 300)}
        bench.start()
        await wait_until_async(lambda: len(bench.attempted) == 300, "300 attempts", GUARD)
        assert sorted(bench.attempted) == sorted(queued)  # each once
        assert bench.peak_waiting <= 8
        assert list(bench.spool.qids()) == []
        await bench.stop()

    asyncio.run(go())


def test_hot_mail_the_full_window_cannot_take_waits_on_disk_and_is_delivered(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        bench = Bench(tmp_path, limit=4, slots=1)
        bench.gate.clear()  # attempts wait: the window fills
        bench.start()
        hot = await _queue(bench.spool, 20, lock=True)
        taken = [bench.scheduler.submit(m.qid, message=m) for m in hot]
        # One straight to its attempt, four in the window, the rest left on disk, closed.
        assert taken.count(False) == 15
        assert all(m.fd is None for m, ok in zip(hot, taken, strict=True) if not ok)
        assert bench.scheduler.queued == 5
        bench.gate.set()
        await wait_until_async(lambda: len(bench.attempted) == 20, "20 attempts", GUARD)
        assert sorted(bench.attempted) == sorted(m.qid for m in hot)
        await bench.stop()

    asyncio.run(go())


def test_a_pass_takes_what_is_due_and_leaves_what_is_later_or_held(tmp_path: Path) -> None:
    async def go() -> None:
        bench = Bench(tmp_path, limit=4, slots=2)
        msgs = await _queue(bench.spool, 12)
        now = time.time()
        due, later, held = msgs[:6], msgs[6:10], msgs[10:]
        for m in due:
            bench.spool.save_status(m.qid, QueueStatus(attempts=1, next_attempt=now - 5))
        for m in later:
            bench.spool.save_status(m.qid, QueueStatus(attempts=1, next_attempt=now + 3600))
        for m in held:
            bench.spool.save_status(m.qid, QueueStatus(attempts=1, hold="spam"))
        assert {q for q, t in bench.spool.due_times(lambda q: True) if t == HELD_DUE} == {
            m.qid for m in held
        }
        bench.start()
        await wait_until_async(lambda: bench.feeder.passes >= 1, "the first pass", GUARD)
        await wait_until_async(lambda: len(bench.attempted) == 6, "the due ones", GUARD)
        assert sorted(bench.attempted) == sorted(m.qid for m in due)
        # Due later: in the window only while it is less than half full, the rest on disk.
        assert sum(bench.scheduler.knows(m.qid) for m in later) <= 2
        # USR1's pass: everything due now, except what is held.
        bench.feeder.run_all()
        await wait_until_async(lambda: len(bench.attempted) == 10, "the later ones", GUARD)
        assert sorted(bench.attempted[6:]) == sorted(m.qid for m in later)
        bench.feeder.request_pass()  # as a drain does: is anything left but the held ones?
        await wait_until_async(lambda: bench.feeder.settled, "a pass that finds nothing", GUARD)
        assert sorted(bench.spool.qids()) == sorted(m.qid for m in held)
        await bench.stop()

    asyncio.run(go())


def test_mail_left_on_disk_for_later_is_taken_when_due(tmp_path: Path) -> None:
    """The window left a message on disk, due in half a second, while the feeder waited for
    a pass an hour away: it is attempted when due, not an hour later."""

    async def go() -> None:
        bench = Bench(tmp_path, limit=4, slots=1)
        bench.start()
        await wait_until_async(lambda: bench.feeder.passes >= 1, "the first pass", GUARD)
        [msg] = await _queue(bench.spool, 1)
        msg.close()
        due = time.time() + 0.5
        bench.spool.save_status(msg.qid, QueueStatus(attempts=1, next_attempt=due))
        bench.feeder.outside(msg.qid, due, now=False)  # what the window does when full
        await wait_until_async(lambda: bench.attempted == [msg.qid], "its attempt", 10)
        await bench.stop()

    asyncio.run(go())


# -- the daemon -----------------------------------------------------------------------------------
@pytest.fixture
def hop1(make_sink: SinkFactory) -> SinkServer:
    """targetdomain1.com's server (tests stop it to play an outage)."""
    return make_sink(HOP1)


@pytest.fixture
def world(hop1: SinkServer, mx_port: int) -> World:
    return issue_world(hop1.port, mx_port)


WINDOW = "[queue]\nactive_limit = 4\nmax_deliveries = 2\n"


def _fill(spool_dir: Path, n: int, rcpt: str) -> list[str]:
    """``n`` never-attempted messages for ``rcpt``, committed with the spool's code while the
    daemon is down."""

    async def go() -> list[str]:
        spool = Spool(spool_dir, fsync="threads")
        try:
            msgs = []
            for _ in range(n):
                env = Envelope(
                    qid=spool.new_qid(),
                    sender="alice@example.org",
                    recipients=[Recipient(rcpt, rcpt)],
                    arrival=time.time(),
                    client_ip="192.0.2.9",
                )
                incoming = spool.open_incoming(env)
                incoming.write(b"Subject: deep\r\n\r\nx\r\n")
                msgs.append((await spool.commit(incoming)).qid)
            return msgs
        finally:
            spool.close()

    return asyncio.run(go())


def test_a_restart_on_a_deep_queue_greets_before_its_first_pass_ends(
    make_gateway: GatewayFactory, world: World, hop1: SinkServer
) -> None:
    """The next hop drops connections (attempts hang): two attempts and a window of four
    take six messages, and the first pass waits for room; the daemon greets all the same.
    Once the hop answers, the pass goes on and all 40 are delivered."""
    hop1.stop()
    gw = make_gateway(
        world.but(settings=WINDOW + '[delivery]\nconnect_timeout = "20s"\n'), start=False
    )
    qids = _fill(gw.spool, 40, "bob@targetdomain1.com")
    hole = Blackhole(HOP1, hop1.port)
    hole.start()
    try:
        gw.start()
        with gw.smtp() as s:
            assert s.noop()[0] == 250
        # The first pass waits for room in the window (no attempt ends within 20 s): the
        # daemon that used to read the whole queue first logged this before listening.
        assert "recovered" not in gw.log()
    finally:
        hole.stop()
    hop1.start()
    wait_until(lambda: gw.recovered() == 40, "40 recovered (each worker its share)", GUARD)
    wait_until(lambda: all(gw.log_lines(q, "stat=Sent") for q in qids), "40 sent", GUARD)
    assert len(hop1.messages) == 40
    wait_until(lambda: gw.queued() == [], "an empty queue", GUARD)


def test_messages_outside_the_window_expire_on_time(
    make_gateway: GatewayFactory,
    world: World,
    hop1: SinkServer,
    make_sink: SinkFactory,
    mx_port: int,
) -> None:
    hop1.stop()
    mx = make_sink(MXHOST, mx_port)
    gw = make_gateway(world.but(settings=WINDOW + '[queue]\nmax_age = "3s"\n'))
    with gw.smtp() as s:
        for i in range(16):
            s.sendmail("alice@example.org", ["bob@targetdomain1.com"], message(f"expire {i}"))
    bounces = mx.wait_for(16, timeout=GUARD)
    assert all(b.mail_from == "" for b in bounces)
    assert len(gw.log_lines("DSN: Cannot send message for")) == 16
    wait_until(lambda: gw.queued() == [], "an empty queue", GUARD)


def test_hold_release_and_requeue_through_a_small_window(
    make_gateway: GatewayFactory, world: World, hop1: SinkServer
) -> None:
    hourly = '[queue]\nrun_interval = "1h"\nretry_min = "1h"\n'
    hop1.stop()
    gw: GatewayProcess = make_gateway(world.but(settings=WINDOW + hourly))
    with gw.smtp() as s:
        for i in range(12):
            s.sendmail("alice@example.org", ["bob@targetdomain1.com"], message(f"held {i}"))
    wait_until(lambda: len(gw.log_lines("stat=Deferred")) >= 12, "12 deferrals", GUARD)
    queued = gw.queued()
    held = queued[0]
    cfg = ["-c", str(gw.config)]
    out = run_cli("hold", held, *cfg)
    assert out.returncode == 0, out.stderr
    hop1.start()
    # Twelve markers for a window of four: the rest are made due on disk for the pass.
    out = run_cli("requeue", "--all", *cfg)
    assert out.returncode == 0, out.stderr
    wait_until(
        lambda: len(hop1.messages) == 11, lambda: f"11 at the hop, {len(hop1.messages)}", GUARD
    )
    assert gw.queued() == [held]
    out = run_cli("release", held, *cfg)
    assert out.returncode == 0, out.stderr
    wait_until(lambda: len(hop1.messages) == 12, "the released one", GUARD)
    wait_until(lambda: gw.queued() == [], "an empty queue", GUARD)


def test_mailq_in_chunks_on_every_core_lists_the_queue_in_directory_order(
    tmp_path: Path,
) -> None:
    """``listing.listed``: the text of forked workers, chunk by chunk, is the entries'
    formatting in the order the folder is read, each message once, as one process makes it;
    and the CLI's listing is that text between its header and its total."""
    from mailgate.queue import listing

    spool = Spool(tmp_path / "spool", fsync="threads")
    msgs = asyncio.run(_queue(spool, 3 * listing.CHUNK + 7))
    for i, m in enumerate(msgs[::5]):
        status = QueueStatus(attempts=1, next_attempt=time.time() + 60)
        status.of(m.envelope.recipients[0].address).last_error = f"Deferred: 451 try {i}"
        status.last_message = "Deferred: 451 try later"
        status.hold = "held" if i % 3 == 0 else None
        spool.save_status(m.qid, status)
    order = list(spool.qids())
    assert sorted(order) == sorted(m.qid for m in msgs)
    held = {m.qid for m in msgs if spool.load_status(m.qid).held}
    assert held
    waiting = [qid for qid in order if qid not in held]
    # mailq leaves the held ones out (Sendmail's quarantined), the JSON has every message.
    expected = {
        "json": "".join(listing.mailq_json(e) + "\n" for e in listing.entries(spool)),
        "mailq": "".join(
            line + "\n"
            for e in listing.entries(spool)
            if not e.message.status.held
            for line in listing.mailq_entry(e)
        ),
    }
    for layout, listed in (("mailq", len(waiting)), ("json", len(msgs))):
        chunks = list(listing.listed(spool, layout, workers=2))
        assert len(chunks) == 4 and sum(n for _, n in chunks) == listed
        assert "".join(text for text, _ in chunks) == expected[layout]
        assert list(listing.listed(spool, layout, workers=1)) == chunks
    lines = expected["mailq"].splitlines()
    ids = [line[:14] for line in lines if not line.startswith((" ", "\t"))]
    assert ids == waiting  # directory order, each message once
    config = tmp_path / "mailgate.toml"
    config.write_text(
        f'hostname = "gw.example.com"\nlisten = ["127.0.0.1:2525"]\n'
        f'spool_dir = "{tmp_path / "spool"}"\n'
    )
    spool.close()
    out = run_cli("mailq", "-c", str(config))
    assert out.returncode == 0, out.stderr
    header, columns, *body, total = out.stdout.split("\n")[:-1]
    assert header.endswith(f"({len(waiting)} requests)") and columns == listing.MAILQ_COLUMNS
    assert "\n".join(body) + "\n" == expected["mailq"]
    assert total == listing.mailq_total(len(waiting))


def _fill_deferred(spool_dir: Path, n: int, rcpt: str) -> None:
    """``n`` messages deferred for an hour, as a deferral leaves them, written with the
    spool's code but without an fsync each (a deep queue in a fraction of a second)."""
    spool = Spool(spool_dir, fsync="threads")
    now = time.time()
    later = now + 3600
    try:
        for _ in range(n):
            env = Envelope(spool.new_qid(), "alice@example.org", [Recipient(rcpt, rcpt)], now)
            incoming = spool.open_incoming(env)
            incoming.write(b"Subject: deep\r\n\r\nx\r\n")
            incoming.seal(lock=False)
            os.link(incoming.path, spool.queue / env.qid)
            incoming.committed(f"{spool.queue}/{env.qid}", keep_fd=False)
            status = QueueStatus(attempts=1, next_attempt=later, last_message="Deferred: down")
            status_file = spool.queue / f"{env.qid}.st"
            status_file.write_bytes(status.to_json())
            os.utime(status_file, (later, later))  # its next attempt, as save_status sets it
            os.unlink(incoming.path)
    finally:
        spool.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_drained_deferred_queue_leaves_nothing_behind_in_queue_or_trash(
    make_gateway: GatewayFactory, world: World, hop1: SinkServer, workers: int
) -> None:
    """The hop returns and the queue is run: more deferred messages than the spares hold,
    so most are freed through trash/ by the cleaner thread. Each arrives once, queue/ ends
    with no file of them (queue file or status file), and after the stop trash/ is empty."""
    n = 300
    hourly = '[queue]\nrun_interval = "1h"\nretry_min = "1h"\n'
    gw = make_gateway(world.but(settings=f"workers = {workers}\n" + hourly), start=False)
    _fill_deferred(gw.spool, n, "bob@targetdomain1.com")
    gw.start()
    # Each process's first pass over (its signal handlers in place), then the queue run.
    wait_until(lambda: len(gw.log_lines("recovered ")) == workers, "the first passes", GUARD)
    gw.signal(signal.SIGUSR1)
    wait_until(lambda: len(hop1.messages) >= n, f"{n} at the hop", GUARD)
    wait_until(lambda: not any((gw.spool / "queue").iterdir()), "an empty queue/", GUARD)
    gw.stop()
    assert not any((gw.spool / "trash").iterdir())
    assert len(hop1.messages) == n


@pytest.mark.parametrize("workers", [1, 2])
def test_status_and_the_statistics_line_count_the_queue_not_the_window(
    make_gateway: GatewayFactory, world: World, hop1: SinkServer, workers: int
) -> None:
    """A queue deeper than ``control.COUNT_BELOW`` behind a window of four: systemd's STATUS
    (the state file), the statistics line, ``mailgate status`` and mailq's header count all
    of it, as mailq lists it; with two workers each counts the whole queue and the master
    does not add them up, and the statistics line is one for the daemon, the master's."""
    n = control.COUNT_BELOW + 50
    hourly = '[queue]\nrun_interval = "1h"\nretry_min = "1h"\n'
    gw = make_gateway(world.but(settings=f"workers = {workers}\n" + WINDOW + hourly), start=False)
    _fill_deferred(gw.spool, n, "bob@targetdomain1.com")
    gw.start()
    state_file = runstate.state_path(gw.spool / "mailgate.pid")

    def reported() -> runstate.Activity | None:
        state = runstate.read(state_file)
        return state.activity if state is not None and state.activity.counted else None

    activity = wait_until(reported, "the daemon's count of the queue", GUARD)
    assert (activity.queued, activity.delivering) == (n, 0)
    cfg = ["-c", str(gw.config)]
    status = run_cli("status", *cfg)
    assert status.returncode == 0, status.stderr
    queue_line = next(line for line in status.stdout.splitlines() if "  queue " in line)
    assert queue_line.startswith(
        f"  queue      {n} messages in {gw.spool / 'queue'} (the daemon's count, "
    )
    mailq = run_cli("mailq", *cfg).stdout.splitlines()
    assert mailq[0] == f"\t\t{gw.spool / 'queue'} ({n} requests)"
    assert mailq[-1] == f"\t\tTotal requests: {n}"
    gw.signal(signal.SIGUSR2)  # the master passes it on to each worker, then writes the line
    line = wait_until(
        lambda: gw.log_lines(f"queued={n}, delivering=0"), "the statistics line", GUARD
    )
    assert gw.proc is not None and len(line) == 1 and f"mailgate[{gw.proc.pid}]: " in line[0]
    time.sleep(0.5)  # the workers' reports are in: none writes a line of its own
    assert len(gw.log_lines("statistics: ")) == 1


def test_the_queue_count_follows_what_enters_and_leaves_between_censuses(
    tmp_path: Path,
) -> None:
    """``QueueCount``: a census, then what every process's spool put into the queue and took
    out of it, without a new listing; what another program did (here a spool not counting
    into the table, as ``mailgate delete`` in its own process) waits for the next census."""

    async def go() -> None:
        table = metrics.Table(2)
        spools = [Spool(tmp_path / "spool", fsync="threads") for _ in range(3)]
        for row, spool in enumerate(spools[:2]):  # two workers; the third is a tool
            spool.count_moves_in(table.row(row).queue_moves())
        count = QueueCount(spools[0], table)
        assert count.known() is None
        first = await _queue(spools[0], 5)
        assert (await count.current())[0] == 5
        for i in range(3):  # the other worker's mail (its own qids: another pid's)
            env = Envelope(f"OTHER{i:09d}", "a@example.org", [Recipient("b@hop.test", "b")], 0)
            incoming = spools[1].open_incoming(env)
            incoming.write(b"x\r\n")
            (await spools[1].commit(incoming)).close()
        spools[0].finish(first[0])  # delivered
        spools[1].remove(first[1].qid)  # delivered by the other worker
        known = count.known()
        assert known is not None and known[0] == 6 == len(list(spools[0].qids()))
        spools[2].delete(first[2].qid)
        known = count.known()
        assert known is not None and known[0] == 6  # until the next census
        for spool in spools:
            spool.close()

    asyncio.run(go())


def test_the_daemons_count_is_used_only_while_it_is_recent_and_counted(tmp_path: Path) -> None:
    """``control.daemon_queue_count`` over the state file as a reader gets it."""
    path = tmp_path / "mailgate.state.json"
    now = time.time()
    counted = runstate.Activity(queued=7, counted=True)
    base = runstate.RunState(
        pid=1, started=now, config="c", listeners=[], workers=1, phase="ready", updated=now
    )

    def read(**changes: object) -> runstate.RunState | None:
        runstate.write(path, dataclasses.replace(base, **changes))
        return runstate.read(path)

    assert control.daemon_queue_count(read(activity=counted)) == 7
    assert control.daemon_queue_count(read()) is None  # no census in yet
    stale = now - control.STATE_FRESH - 1
    assert control.daemon_queue_count(read(activity=counted, updated=stale)) is None
    assert control.daemon_queue_count(read(activity=counted, phase="stopping")) is None
