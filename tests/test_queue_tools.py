"""The queue tools against the real daemon under load: ``mailgate hold`` / ``release`` /
``delete`` / ``requeue`` / ``flush --domain|--id`` / ``mailq [--json]`` / ``qshape``.

The daemon relays ``dead.test`` (and ``d1.test``, ``d2.test``) by mailertable to an address
where nothing listens, so their mail is deferred and waits (retries and queue runs every hour:
only what a test does moves it), and ``live.test`` to a sink. While a test works on the queue,
two clients keep sending to ``live.test`` (a bounded loop); at the end every one of those
messages must have arrived exactly once. A mailertable change (``route``, then HUP) sends the
dead domains to a live sink when a test wants them delivered. The listings' exact layout and
qshape's exact figures are checked on queues built with the Spool API.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest

from mailgate import cli
from mailgate.queue.spool import Envelope, QueueStatus, RcptStatus, Recipient, Spool
from tests.support.dnsserver import DnsServer
from tests.support.gateway import GatewayProcess, free_port, run_cli
from tests.support.sink import SinkServer
from tests.support.wait import wait_until

CLIENT = "127.0.7.20"
LIVE = "127.0.7.1"  # live.test's next hop, and the dead domains' once they are routed there
NEW_HOP = "127.0.7.3"  # a second live next hop (requeue after a mailertable change)
DEAD = "127.0.7.2"  # nothing listens here: connections are refused, mail is deferred
SENDER = "alice@example.org"
GUARD = 30.0  # hang guard for anything that should happen soon
DEAD_DOMAINS = ("dead.test", "d1.test", "d2.test")


def message(tag: str) -> tuple[str, bytes]:
    msgid = f"<{tag.replace(' ', '-')}.{uuid.uuid4().hex[:12]}@example.org>"
    return msgid, (
        f"From: <{SENDER}>\r\nSubject: {tag}\r\nMessage-ID: {msgid}\r\n\r\nHello.\r\n"
    ).encode()


class Load:
    """Clients sending to live.test while a test works: two threads, each at most ``limit``
    messages, stopped at the end of the ``with``."""

    def __init__(self, gw: GatewayProcess, *, threads: int = 2, limit: int = 400) -> None:
        self.gw = gw
        self.limit = limit
        self.sent: list[str] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(n,)) for n in range(threads)]

    def run(self, n: int) -> None:
        count = 0
        try:
            while count < self.limit and not self.stop.is_set():
                with self.gw.smtp(CLIENT, timeout=GUARD) as s:
                    for _ in range(10):
                        msgid, data = message(f"load {n} {count}")
                        assert s.sendmail(SENDER, [f"load{n}@live.test"], data) == {}
                        self.sent.append(msgid)
                        count += 1
                        if self.stop.wait(0.005):
                            break
        except BaseException as exc:
            self.errors.append(exc)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()

        def started() -> bool:
            if self.errors:
                raise self.errors[0]
            return len(self.sent) >= 10

        wait_until(started, "the load to start", GUARD)
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(GUARD)


class World:
    """The daemon, its two live next hops, and what the tests do to them."""

    def __init__(self, tmp_path: Path, dns: DnsServer, *, workers: int = 1) -> None:
        self.dead_port = free_port(DEAD)
        self.sink = SinkServer(LIVE, free_port(LIVE), hostname="live.test")
        self.new_hop = SinkServer(NEW_HOP, free_port(NEW_HOP), hostname="new-hop.test")
        self.routes = {d: f"smtp:[{DEAD}]:{self.dead_port}" for d in DEAD_DOMAINS}
        self.routes["live.test"] = f"smtp:[{LIVE}]:{self.sink.port}"
        self.gw = GatewayProcess(
            tmp_path / "gw",
            dns=dns.address,
            tables={"mailertable": self.mailertable(), "access": "127.0.7   RELAY\n"},
            settings=(
                f"workers = {workers}\n"  # pid_file: its default, spool/mailgate.pid
                '[smtp]\ngreet_pause = "0s"\ncheck_sender_domain = false\n'
                '[queue]\nretry_min = "1h"\nrun_interval = "1h"\n'
                '[delivery]\nconnect_timeout = "2s"\n'
                # Debug lines too: "<qid>: on hold, not attempted" shows a skipped attempt.
                '[log]\nlevel = "debug"\n'
            ),
        )
        self.workers = workers
        self.reloads = 0

    def mailertable(self) -> str:
        return "".join(f"{domain}  {hop}\n" for domain, hop in self.routes.items())

    def cli(self, *args: str) -> tuple[int, str, str]:
        out = run_cli(*args, "-c", str(self.gw.config))
        return out.returncode, out.stdout, out.stderr

    def send(self, rcpt: str, tag: str) -> tuple[str, str]:
        """One message from the outside client: (its Message-ID, its queue id)."""
        msgid, data = message(tag)
        with self.gw.smtp(CLIENT, timeout=GUARD) as s:
            assert s.sendmail(SENDER, [rcpt], data) == {}
        line = self.gw.wait_log(f"msgid={msgid}", GUARD).split(f"msgid={msgid}")[0]
        return msgid, line.splitlines()[-1].split(": from=")[0].split()[-1]

    def send_deferred(self, rcpt: str, tag: str) -> tuple[str, str]:
        """A message deferred by its first attempt, which has ended (its lock is free)."""
        msgid, qid = self.send(rcpt, tag)
        self.gw.wait_log(f"{qid}: to=<{rcpt}>", GUARD)
        assert "stat=Deferred: Connection refused" in self.lines(qid)[-1]
        spool = Spool(self.gw.spool)
        try:
            wait_until(lambda: not spool.is_locked(qid), f"{qid}'s attempt to end", GUARD)
        finally:
            spool.close()
        return msgid, qid

    def lines(self, qid: str) -> list[str]:
        return [line for line in self.gw.log().splitlines() if f" {qid}: " in line]

    def sent_lines(self, qid: str) -> list[str]:
        return [line for line in self.lines(qid) if "stat=Sent" in line]

    def sent_line(self, qid: str) -> str:
        """The one ``stat=Sent`` line of ``qid``, waited for: it is written after the next
        hop's 250, so a sink holding the message may be ahead of the log."""
        wait_until(lambda: self.sent_lines(qid), f"{qid}'s stat=Sent line", GUARD)
        [line] = self.sent_lines(qid)
        return line

    def route(self, hop: str, port: int, *domains: str) -> None:
        """Point ``domains`` at ``hop`` in the mailertable on disk (the daemon reads it at
        the next reload; ``mailgate flush`` at once)."""
        for domain in domains:
            self.routes[domain] = f"smtp:[{hop}]:{port}"
        (self.gw.dir / "mailertable").write_text(self.mailertable())

    def reload(self) -> None:
        """HUP, and wait until every process has the new tables (the master's line, or the
        one process's)."""
        self.reloads += 1
        self.gw.signal(signal.SIGHUP)
        wait_until(
            lambda: self.gw.log().count("configuration reloaded") >= self.reloads,
            "the reload",
            GUARD,
        )

    def queue_run(self) -> None:
        self.gw.signal(signal.SIGUSR1)


def copies(sink: SinkServer, msgid: str) -> int:
    return sum(1 for m in list(sink.messages) if f"Message-ID: {msgid}".encode() in m.data)


def delivered_once(sink: SinkServer, msgid: str) -> None:
    wait_until(lambda: copies(sink, msgid) >= 1, f"{msgid} at {sink.hostname}", GUARD)
    assert copies(sink, msgid) == 1


@pytest.fixture
def world(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[World]:
    """One daemon process, or (``@pytest.mark.parametrize("world", [2], indirect=True)``) a
    master and that many workers."""
    with DnsServer() as dns:
        w = World(tmp_path, dns, workers=getattr(request, "param", 1))
        with w.sink, w.new_hop, w.gw:
            yield w


@pytest.fixture
def load(world: World) -> Iterator[Load]:
    """The load for the whole test; afterwards, each of its messages arrived exactly once."""
    with Load(world.gw) as running:
        yield running
    assert running.errors == []
    assert len(running.sent) >= 10
    for msgid in running.sent:
        delivered_once(world.sink, msgid)


# -- against the running daemon -------------------------------------------------------------------


def test_held_message_is_never_attempted_and_release_delivers_it(world: World, load: Load) -> None:
    held_id, held = world.send_deferred("x@dead.test", "held")
    other_id, other = world.send_deferred("y@dead.test", "other")

    rc, _, err = world.cli("hold", "--reason", "milter: spam score 12", held)
    assert rc == 0, err
    assert "mailgate: Placed on hold: 1 message" in err
    assert f"{held}: placed on hold, reason=milter: spam score 12" in world.gw.log()
    rc, _, err = world.cli("hold", held)
    assert (rc, err.splitlines()[0]) == (0, f"mailgate: {held}: already on hold")

    # Out of mailq's listing, in its quarantine listing (-qQ) with the reason, as Sendmail
    # lists a quarantined message; in the JSON, as held.
    rc, out, _ = world.cli("mailq")
    assert rc == 0
    lines = out.splitlines()
    assert not any(line.startswith(held) for line in lines), out
    assert next(line for line in lines if line.startswith(other))[14] == " "
    rc, out, _ = world.cli("mailq", "--quarantined")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].endswith("/queue (1 request)") and lines[-1] == "\t\tTotal requests: 1"
    at = next(i for i, line in enumerate(lines) if line.startswith(held))
    assert re.fullmatch(rf"{held}  +\d+ \w\w\w \w\w\w [ \d]\d \d\d:\d\d <{SENDER}>", lines[at]), (
        lines[at]
    )
    assert lines[at + 1 : at + 4] == [
        "     QUARANTINE: milter: spam score 12",
        f"                 (Deferred: Connection refused by [{DEAD}])",
        "\t\t\t\t\t <x@dead.test>",
    ]
    assert not any(line.startswith(other) for line in lines), out
    rc, out, _ = world.cli("mailq", "--json")
    listing = {o["queue_id"]: o for o in map(json.loads, out.splitlines())}
    assert listing[held]["queue_name"] == "hold"
    assert listing[held]["hold_reason"] == "milter: spam score 12"
    assert listing[held]["recipients"] == [
        {
            "address": "x@dead.test",
            "delay_reason": f"Deferred: Connection refused by [{DEAD}]",
        }
    ]
    assert listing[other]["queue_name"] == "deferred"
    assert "hold_reason" not in listing[other]
    rc, out, _ = world.cli("qshape", "--hold")
    assert [line.split()[:2] for line in out.splitlines()[1:]] == [
        ["TOTAL", "1"],
        ["dead.test", "1"],
    ]

    # A forced queue run with a working route: the other message goes, the held one is
    # looked at under its lock and left; `flush` (another runner) leaves it too.
    world.route(LIVE, world.sink.port, "dead.test")
    world.reload()
    world.queue_run()
    delivered_once(world.sink, other_id)
    world.gw.wait_log(f"{held}: on hold, not attempted", GUARD)
    rc, out, _ = world.cli("flush", "-v", "--id", held)
    assert rc == 0
    assert f"{held}: on hold, not tried" in out and f"Running {held}" not in out
    assert copies(world.sink, held_id) == 0
    assert world.sent_lines(held) == []
    st = QueueStatus.from_json((world.gw.spool / "queue" / f"{held}.st").read_bytes())
    assert (st.attempts, st.hold) == (1, "milter: spam score 12")

    rc, _, err = world.cli("release", held)
    assert rc == 0, err
    assert "mailgate: Released from hold: 1 message" in err
    assert "mailgate: told the daemon (pid" in err
    delivered_once(world.sink, held_id)
    world.sent_line(held)
    assert f"{held}: released from hold" in world.gw.log()
    wait_until(lambda: held not in world.gw.queued(), "the released message to leave", GUARD)
    assert not (world.gw.spool / "queue" / f"{held}.st").exists()


def test_deleted_message_is_gone_logged_and_never_delivered(world: World, load: Load) -> None:
    gone_id, gone = world.send_deferred("x@dead.test", "deleted")
    kept_id, kept = world.send_deferred("y@dead.test", "kept")
    rc, _, err = world.cli("delete", gone, "NOSUCHQID00001")
    assert rc == 1
    assert err.splitlines() == [
        "mailgate: NOSUCHQID00001: not in the queue",
        "mailgate: Deleted: 1 message",
    ]
    assert gone not in world.gw.queued()
    assert not (world.gw.spool / "queue" / f"{gone}.st").exists()
    assert world.lines(gone)[-1].endswith(f"{gone}: removed")

    world.route(LIVE, world.sink.port, "dead.test")
    world.reload()
    world.queue_run()
    delivered_once(world.sink, kept_id)
    assert copies(world.sink, gone_id) == 0
    world.sent_line(kept)
    assert world.sent_lines(gone) == []


def test_a_message_being_delivered_is_waited_for_then_left(world: World, load: Load) -> None:
    """A runner holds the message's lock (here the test, as an attempt would): the tools wait
    ``--wait`` seconds, then leave it unchanged and say so; once it is free they act."""
    _, qid = world.send_deferred("x@dead.test", "locked")
    spool = Spool(world.gw.spool)
    try:
        msg = spool.claim(qid, wait=GUARD)  # its attempt may still be writing its status
        assert msg is not None
        with msg:
            rc, _, err = world.cli("delete", "--wait", "0.3", qid)
            assert rc == 1
            assert err.splitlines() == [
                f"mailgate: {qid}: being delivered (locked) for all of 0.3 s; not deleted",
                "mailgate: Deleted: 0 messages",
            ]
            rc, _, err = world.cli("hold", "--wait", "0", qid)
            assert rc == 1
            assert f"mailgate: {qid}: being delivered (locked) for all of 0 s; not held" in err
            assert qid in world.gw.queued()
            assert not spool.load_status(qid).held
        rc, _, err = world.cli("delete", qid)
        assert (rc, err.splitlines()) == (0, ["mailgate: Deleted: 1 message"])
        assert qid not in world.gw.queued()
    finally:
        spool.close()


def test_requeue_after_a_mailertable_change_goes_to_the_new_hop(world: World, load: Load) -> None:
    moved_id, moved = world.send_deferred("x@dead.test", "requeued")
    held_id, held = world.send_deferred("y@dead.test", "held, requeued")
    assert world.cli("hold", held)[0] == 0
    world.route(NEW_HOP, world.new_hop.port, "dead.test")
    world.reload()
    # Its next attempt is an hour away: only the requeue makes it go now.
    rc, _, err = world.cli("requeue", moved, held)
    assert rc == 0, err
    assert err.splitlines()[:2] == [
        f"mailgate: {held}: on hold: stays held (release it to send it)",
        "mailgate: Requeued: 1 message",
    ]
    delivered_once(world.new_hop, moved_id)
    assert f"relay=[{NEW_HOP}]" in world.sent_line(moved)
    assert f"{moved}: requeued" in world.gw.log()
    assert copies(world.new_hop, held_id) == 0 and world.sent_lines(held) == []

    # --all: everything due now, through the new hop; the held one still waits.
    rest = [world.send_deferred(f"z{i}@d1.test", f"all {i}") for i in range(3)]
    world.route(NEW_HOP, world.new_hop.port, "d1.test")
    world.reload()
    rc, _, err = world.cli("requeue", "--all")
    assert rc == 0, err
    for msgid, qid in rest:
        delivered_once(world.new_hop, msgid)
        assert f"relay=[{NEW_HOP}]" in world.sent_line(qid)
    assert copies(world.new_hop, held_id) == 0
    assert held in world.gw.queued()


def test_flush_by_domain_and_by_id(world: World, load: Load) -> None:
    """``flush`` runs in its own process with the tables on disk now (the daemon has not
    reloaded them), taking each message's lock: only the chosen messages go."""
    one_id, _ = world.send_deferred("a@d1.test", "d1 first")
    two_id, two = world.send_deferred("b@d2.test", "d2")
    three_id, _ = world.send_deferred("c@d1.test", "d1 second")
    world.route(LIVE, world.sink.port, "d1.test", "d2.test")
    rc, out, err = world.cli("flush", "--domain", "D1.test")
    assert rc == 0, err
    assert out.startswith("mailgate: queue run done: 2 message(s) tried")
    assert copies(world.sink, one_id) == 1 and copies(world.sink, three_id) == 1
    assert copies(world.sink, two_id) == 0
    assert two in world.gw.queued()
    rc, out, err = world.cli("flush", "--id", two)
    assert rc == 0, err
    assert out.startswith("mailgate: queue run done: 1 message(s) tried")
    assert copies(world.sink, two_id) == 1


def test_release_and_requeue_while_the_daemon_is_stopped(world: World) -> None:
    """Untold (no daemon to signal), the daemon takes them on when it starts, though their
    next attempts were an hour away."""
    released_id, released = world.send_deferred("x@dead.test", "released while down")
    requeued_id, requeued = world.send_deferred("y@dead.test", "requeued while down")
    assert world.cli("hold", released)[0] == 0
    world.gw.stop()
    for tool, qid in (("release", released), ("requeue", requeued)):
        rc, _, err = world.cli(tool, qid)
        assert rc == 0, err
        assert "no running daemon found through pid_file" in err
    world.route(LIVE, world.sink.port, "dead.test")
    world.gw.start()
    delivered_once(world.sink, released_id)
    delivered_once(world.sink, requeued_id)


@pytest.mark.parametrize("world", [2], indirect=True)
def test_the_master_passes_the_wake_up_on_to_its_workers(world: World, load: Load) -> None:
    """With workers, the pid file is the master's: it forwards the signal, and the worker
    whose share a marked message is takes it on."""
    msgs = [world.send_deferred(f"x{i}@dead.test", f"workers {i}") for i in range(4)]
    held = [qid for _, qid in msgs[:2]]
    rc, _, err = world.cli("hold", *held)
    assert (rc, err) == (0, "mailgate: Placed on hold: 2 messages\n")
    world.route(LIVE, world.sink.port, "dead.test")
    world.reload()
    rc, _, err = world.cli("requeue", *(qid for _, qid in msgs[2:]))
    assert rc == 0, err
    rc, _, err = world.cli("release", *held)
    assert rc == 0, err
    assert "mailgate: told the daemon (pid" in err
    for msgid, _ in msgs:
        delivered_once(world.sink, msgid)


# -- the listings, exactly, on queues built with the Spool API -----------------------------------

ARRIVAL = 1795547820.0  # Tue Nov 24 19:17:00 2026 UTC


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


class Queue:
    """A spool and a config naming it, filled with ``add``; the CLI runs in-process."""

    def __init__(self, tmp_path: Path) -> None:
        self.config = tmp_path / "mailgate.toml"
        self.config.write_text(
            f'hostname = "gw.example.com"\nlisten = ["127.0.0.1:2525"]\n'
            f'spool_dir = "{tmp_path / "spool"}"\n'
        )
        self.spool = Spool(tmp_path / "spool", fsync="threads")

    def add(
        self,
        qid: str,
        rcpts: list[str],
        *,
        sender: str = SENDER,
        arrival: float = ARRIVAL,
        content: bytes = b"Subject: x\r\n\r\nHello.\r\n",
        status: QueueStatus | None = None,
        body_8bit: bool = False,
    ) -> None:
        env = Envelope(
            qid=qid,
            sender=sender,
            recipients=[Recipient(r, r) for r in rcpts],
            arrival=arrival,
            body_8bit=body_8bit,
        )

        async def commit() -> None:
            incoming = self.spool.open_incoming(env)
            incoming.write(content)
            (await self.spool.commit(incoming)).close()

        asyncio.run(commit())
        if status is not None:
            self.spool.save_status(qid, status)

    def run(self, capsys: pytest.CaptureFixture[str], *args: str) -> str:
        assert cli.main([*args, "-c", str(self.config)]) == 0
        return capsys.readouterr().out


def deferred(error: str, errors: dict[str, str] | None = None) -> QueueStatus:
    """Attempted twice; ``error`` the message's last, ``errors`` some recipients' own."""
    st = QueueStatus(attempts=2, last_attempt=ARRIVAL + 60, next_attempt=ARRIVAL + 600)
    st.last_message = error
    for address, text in (errors or {}).items():
        st.of(address).last_error = text
    return st


def test_mailq_layout_and_json(
    tmp_path: Path, utc: None, capsys: pytest.CaptureFixture[str]
) -> None:
    q = Queue(tmp_path)
    refused = "Deferred: 451 4.4.1 Connection refused by [192.0.2.7]"
    q.add("AAAAAAAA000001", ["bob@example.net"], status=deferred(refused))
    part = deferred(refused, {"carol@example.net": "Deferred: 452 4.2.2 Mailbox full"})
    part.of("dave@example.net").status = RcptStatus.SENT
    q.add(
        "AAAAAAAA000002",
        ["carol@example.net", "dave@example.net", "erin@example.com"],
        sender="",
        arrival=ARRIVAL - 8 * 86400 + 7200,
        status=part,
        body_8bit=True,
    )
    held = QueueStatus(hold="spam score 12")
    # 10 lines of 100 bytes with CR LF: Sendmail's df file would hold 990 (LF line ends).
    big = b"Subject: big\r\n\r\n" + (b"x" * 98 + b"\r\n") * 10
    q.add("AAAAAAAA000003", ["frank@example.net"], content=big, status=held)
    q.add("AAAAAAAA000004", ["gina@example.net"])
    locked = q.spool.claim("AAAAAAAA000004")
    assert locked is not None
    with locked:
        # Sizes are the bodies' ("Hello." and its line end: 7); the held message is only in
        # the quarantine listing; a recipient's own error only in -v's.
        text = q.run(capsys, "mailq")
        lines = text.splitlines()
        assert lines[:2] == [
            f"\t\t{tmp_path}/spool/queue (3 requests)",
            "-----Q-ID----- --Size-- -----Q-Time----- ------------Sender/Recipient-----------",
        ]
        assert lines[-1] == "\t\tTotal requests: 3"
        blocks = set(re.split(r"\n(?=AAAA)", "\n".join(lines[2:-1])))
        assert blocks == {
            "AAAAAAAA000001        7 Tue Nov 24 19:17 <alice@example.org>\n"
            "                 (Deferred: 451 4.4.1 Connection refused by [192.0.2.7])\n"
            "\t\t\t\t\t <bob@example.net>",
            "AAAAAAAA000002        7 Mon Nov 16 21:17 <>\n"
            "      8BITMIME   (Deferred: 451 4.4.1 Connection refused by [192.0.2.7])\n"
            "\t\t\t\t\t <carol@example.net>\n"
            "\t\t\t\t\t <erin@example.com>",
            "AAAAAAAA000004*       7 Tue Nov 24 19:17 <alice@example.org>\n"
            "\t\t\t\t\t <gina@example.net>",
        }
        # -v: the priority (22 bytes, 30000 a recipient, 90000 a queue run after the first
        # attempt), the arrival without its weekday, recipients one tab further.
        lines = q.run(capsys, "mailq", "-v").splitlines()
        assert lines[1] == (
            "-----Q-ID----- --Size-- -Priority- ---Q-Time--- --------Sender/Recipient--------"
        )
        blocks = set(re.split(r"\n(?=AAAA)", "\n".join(lines[2:-1])))
        assert blocks == {
            "AAAAAAAA000001        7     120022 Nov 24 19:17 <alice@example.org>\n"
            "                 (Deferred: 451 4.4.1 Connection refused by [192.0.2.7])\n"
            "\t\t\t\t\t\t<bob@example.net>",
            "AAAAAAAA000002        7     180022 Nov 16 21:17 <>\n"
            "      8BITMIME   (Deferred: 451 4.4.1 Connection refused by [192.0.2.7])\n"
            "\t\t\t\t\t\t<carol@example.net>\n"
            "\t\t (Deferred: 452 4.2.2 Mailbox full)\n"
            "\t\t\t\t\t\t<erin@example.com>",
            "AAAAAAAA000004*       7      30022 Nov 24 19:17 <alice@example.org>\n"
            "\t\t\t\t\t\t<gina@example.net>",
        }
        assert q.run(capsys, "mailq", "--quarantined").splitlines() == [
            f"\t\t{tmp_path}/spool/queue (1 request)",
            "-----Q-ID----- --Size-- -----Q-Time----- ------------Sender/Recipient-----------",
            "AAAAAAAA000003      990 Tue Nov 24 19:17 <alice@example.org>",
            "     QUARANTINE: spam score 12",
            "\t\t\t\t\t <frank@example.net>",
            "\t\tTotal requests: 1",
        ]
        objects = {
            o["queue_id"]: o for o in map(json.loads, q.run(capsys, "mailq", "--json").splitlines())
        }
    assert objects == {
        "AAAAAAAA000001": {
            "queue_name": "deferred",
            "queue_id": "AAAAAAAA000001",
            "arrival_time": 1795547820,
            "message_size": 22,
            "forced_expire": False,
            "sender": SENDER,
            "recipients": [{"address": "bob@example.net", "delay_reason": refused}],
            "attempts": 2,
            "next_attempt": 1795548420,
            "body_size": 7,
            "priority": 120022,
            "last_message": refused,
        },
        "AAAAAAAA000002": {
            "queue_name": "deferred",
            "queue_id": "AAAAAAAA000002",
            "arrival_time": 1794863820,
            "message_size": 22,
            "forced_expire": False,
            "sender": "",
            "recipients": [
                {
                    "address": "carol@example.net",
                    "delay_reason": "Deferred: 452 4.2.2 Mailbox full",
                },
                {"address": "erin@example.com", "delay_reason": refused},
            ],
            "attempts": 2,
            "next_attempt": 1795548420,
            "body_size": 7,
            "priority": 180022,
            "last_message": refused,
            "body_type": "8BITMIME",
        },
        "AAAAAAAA000003": {
            "queue_name": "hold",
            "queue_id": "AAAAAAAA000003",
            "arrival_time": 1795547820,
            "message_size": 1016,
            "forced_expire": False,
            "sender": SENDER,
            "recipients": [{"address": "frank@example.net"}],
            "hold_reason": "spam score 12",
            "attempts": 0,
            "next_attempt": None,
            "body_size": 990,
            "priority": 31016,
        },
        "AAAAAAAA000004": {
            "queue_name": "active",
            "queue_id": "AAAAAAAA000004",
            "arrival_time": 1795547820,
            "message_size": 22,
            "forced_expire": False,
            "sender": SENDER,
            "recipients": [{"address": "gina@example.net"}],
            "attempts": 0,
            "next_attempt": None,
            "body_size": 7,
            "priority": 30022,
        },
    }
    q.spool.close()


def test_mailq_of_an_empty_queue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    q = Queue(tmp_path)
    assert q.run(capsys, "mailq") == f"{tmp_path}/spool/queue is empty\n\t\tTotal requests: 0\n"
    assert q.run(capsys, "mailq", "--json") == ""
    q.spool.close()


def test_qshape_counts_exactly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Ages in the middle of their buckets (the few seconds the test takes cannot move one):
    [0,5) [5,10) [10,20) … [640,1280) [1280,∞) minutes, as Postfix's qshape."""
    q = Queue(tmp_path)
    now = time.time()

    def add(n: int, minutes: float, rcpts: list[str], **kw: object) -> None:
        q.add(f"SHAPE{n:09d}", rcpts, arrival=now - minutes * 60, **kw)  # type: ignore[arg-type]

    add(1, 2, ["a@one.example", "b@one.example", "c@Two.example"])
    add(2, 7, ["a@one.example"])
    add(3, 15, ["x@two.example."], sender="")
    add(4, 30, ["a@three.example"])
    add(5, 300, ["a@one.example"])
    add(6, 1000, ["a@one.example", "b@two.example"])
    add(7, 5000, ["a@a-very-long-subdomain-name.of.a-rather-long-domain.example"])
    done = QueueStatus(attempts=1)
    done.of("a@one.example").status = RcptStatus.SENT
    add(8, 100, ["a@one.example", "b@four.example"], status=done)  # a@one.example is done
    add(9, 2, ["a@one.example"], status=QueueStatus(hold="held"))  # on hold: not counted
    heading = " " * 39 + "  T  5 10 20 40 80 160 320 640 1280 1280+"
    assert q.run(capsys, "qshape").splitlines() == [
        heading,
        "                                  TOTAL 11  3  1  1  1  0   1   1   0    2     1",
        "                            one.example  5  2  1  0  0  0   0   1   0    1     0",
        "                            two.example  3  1  0  1  0  0   0   0   0    1     0",
        "                           four.example  1  0  0  0  0  0   1   0   0    0     0",
        "                          three.example  1  0  0  0  1  0   0   0   0    0     0",
        # 58 characters in a 39-column field: "+" and the last 38.
        "+n-name.of.a-rather-long-domain.example  1  0  0  0  0  0   0   0   0    0     1",
    ]
    assert q.run(capsys, "qshape", "--by", "sender", "-n", "1").splitlines() == [
        heading,
        "                                  TOTAL  8  1  1  1  1  0   1   1   0    1     1",
        "                            example.org  7  1  1  0  1  0   1   1   0    1     1",
    ]
    assert q.run(capsys, "qshape", "-s", "--hold").splitlines() == [
        heading,
        "                                  TOTAL  1  1  0  0  0  0   0   0   0    0     0",
        "                            example.org  1  1  0  0  0  0   0   0   0    0     0",
    ]
    q.spool.close()
