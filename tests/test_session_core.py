"""The session core in process: dialogue tables of command → answer against a fake host, no
sockets, no daemon. The wire contract (bytes, timing, TLS) is tests/test_session.py's; this
file pins down what each verb answers and what the connection loop is told to do with it."""

from __future__ import annotations

import asyncio
import gc
import textwrap
import weakref
from pathlib import Path

import pytest

from mailgate import metrics
from mailgate.policy import Client, connect_decision
from mailgate.queue.spool import QueuedMessage, Spool
from mailgate.reply import Reply
from mailgate.smtp.protocol import Command
from mailgate.smtp.session import Answer, Session
from mailgate.snapshot import Snapshot
from tests.support.world import World

HOST = "gateway.example.com"
OUTSIDE = Client("192.0.2.10", "FAIL")
RELAY = Client("192.168.1.1", "FAIL")


class FakeHost:
    """The narrow host a session needs: a real spool in a temp folder, canned DNS answers,
    and a record of what the session asked for."""

    def __init__(self, spool: Spool, resolves: str = "yes") -> None:
        self.spool = spool
        self.resolves = resolves
        self.counted: list[int] = []  # metrics words
        self.flushed: list[tuple[str, bool]] = []
        self.committed: list[str] = []
        self.quiet = False  # other sessions in the process: the commit's fsync goes to AIO

    def count(self, slot: int) -> None:
        self.counted.append(slot)

    async def domain_resolves(self, domain: str) -> str:
        return self.resolves

    def flush_domain(self, domain: str, *, subdomains: bool = False) -> None:
        self.flushed.append((domain, subdomains))

    def message_queued(self, queued: QueuedMessage) -> None:
        self.committed.append(queued.qid)
        assert queued.fd is not None  # committed with its delivery lock, for the attempt
        queued.close()


def snapshot(tmp_path: Path, access: str = "", settings: str = "") -> Snapshot:
    world = World(
        hostname=HOST,
        tables={
            "access": textwrap.dedent(access),
            "mailertable": "targetdomain1.com smtp:[192.0.2.25]\n",
        },
        settings="[queue]\nmin_free = 0\n" + settings,
        users=("alice",),
    )
    return world.snapshot(tmp_path)


def make_session(
    tmp_path: Path,
    client: Client = OUTSIDE,
    access: str = "To:targetdomain1.com RELAY\nConnect:192.0.2.66 REJECT\n192.168.1.1 RELAY\n",
    settings: str = "",
    resolves: str = "yes",
) -> tuple[Session, FakeHost]:
    snap = snapshot(tmp_path, access, settings)
    host = FakeHost(Spool(snap.config.spool_dir), resolves)
    decision = connect_decision(client, snap.tables, snap.config)
    return Session(host, snap, client, decision, before_wait=lambda: None), host


def say(session: Session, line: str, pipelined: int = 0) -> Answer:
    verb, _, arg = line.partition(" ")
    return asyncio.run(session.command(Command(verb.upper(), arg.strip()), pipelined=pipelined))


def dialogue(session: Session, steps: list[tuple[str, str, dict[str, bool]]]) -> None:
    """Each step: a command line, the reply line it gets, and the Answer's flags."""
    for line, reply, flags in steps:
        answer = say(session, line)
        first = Reply(answer.reply.code, answer.reply.enhanced, answer.reply.text.split("\n")[0])
        assert str(first) == reply, (line, answer)
        for name in ("bad", "rcpt", "refused", "close", "starttls"):
            assert getattr(answer, name) == flags.get(name, False), (line, name, answer)


def test_a_plain_transaction(tmp_path: Path) -> None:
    session, host = make_session(tmp_path)
    dialogue(
        session,
        [
            (
                "EHLO client.example.net",
                "250 gateway.example.com Hello [192.0.2.10], pleased to meet you",
                {},
            ),
            ("MAIL FROM:<alice@example.org>", "250 2.1.0 <alice@example.org>... Sender ok", {}),
            (
                "RCPT TO:<bob@targetdomain1.com>",
                "250 2.1.5 <bob@targetdomain1.com>... Recipient ok",
                {"rcpt": True},
            ),
            (
                "RCPT TO:<x@example.net>",
                "550 5.7.1 <x@example.net>... Relaying denied. IP name lookup failed [192.0.2.10]",
                {"rcpt": True, "refused": True},
            ),
            ("DATA", "354 End data with <CR><LF>.<CR><LF>", {}),
        ],
    )
    session.data_chunk(b"Subject: hi\r\n\r\nbody\r\n")
    answer = asyncio.run(session.data_end(22))
    assert answer.reply.code == 250 and "Message accepted for delivery" in answer.reply.text
    # Committed (durable) but not yet handed to its attempt: that waits for the next reply.
    assert session.tx is None and host.committed == [] and session.unsent is not None
    dialogue(
        session, [("QUIT", "221 2.0.0 gateway.example.com closing connection", {"close": True})]
    )
    session.hand_over()  # the connection loop's call once the 221 is out
    assert len(host.committed) == 1 and session.unsent is None
    session.hand_over()  # once only
    assert len(host.committed) == 1


def test_an_answered_message_is_handed_over_when_the_connection_ends(tmp_path: Path) -> None:
    session, host = make_session(tmp_path, client=RELAY)
    for line in ("EHLO relay.example.net", "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>"):
        assert say(session, line).reply.code == 250
    assert say(session, "DATA").reply.code == 354
    session.data_chunk(b"Subject: hi\r\n\r\nbody\r\n")
    assert asyncio.run(session.data_end(22)).reply.code == 250
    assert host.committed == []
    session.abandon()  # the client went away without a QUIT
    session.hand_over()  # as the connection loop does once the last replies are out
    assert len(host.committed) == 1


def test_sequence_errors_and_bad_commands(tmp_path: Path) -> None:
    session, _ = make_session(tmp_path)
    dialogue(
        session,
        [
            ("RCPT TO:<bob@targetdomain1.com>", "503 5.0.0 Need MAIL before RCPT", {}),
            ("DATA", "503 5.0.0 Need MAIL command", {}),
            ("XYZZY", '500 5.5.1 Command unrecognized: "XYZZY"', {"bad": True}),
            ("HELO", "501 5.0.0 HELO requires domain address", {"bad": True}),
            # Sendmail's check of the name (not a bad command there either)
            ("HELO two words", "501 5.0.0 Invalid domain name", {}),
            ("EHLO bad_name!", "501 5.0.0 Invalid domain name", {}),
            ("EHLO " + "a" * 257, "501 5.0.0 Invalid domain name", {}),
            ("EHLO bj\u00f8rn.example", "501 5.0.0 Invalid domain name", {}),
            (
                "MAIL FROM:<a b@example.org>",
                "553 5.1.3 <a b@example.org>... Invalid local part",
                {"bad": True},
            ),
            (
                "MAIL FROM:<alice@example.org> SIZE=1 SIZE=2",
                "501 5.5.4 Duplicate SIZE parameter",
                {"bad": True},
            ),
            ("MAIL FROM:<alice@example.org>", "250 2.1.0 <alice@example.org>... Sender ok", {}),
            ("MAIL FROM:<alice@example.org>", "503 5.5.0 Sender already specified", {}),
            ("DATA", "503 5.0.0 Need RCPT (recipient)", {}),
            (
                "RCPT TO:<>",
                "553 5.0.0 <>... User address required",
                {"rcpt": True, "refused": True},
            ),
            ("RSET", "250 2.0.0 Reset state", {}),
            ("RCPT TO:<bob@targetdomain1.com>", "503 5.0.0 Need MAIL before RCPT", {}),
        ],
    )


def test_content_before_the_354_closes(tmp_path: Path) -> None:
    session, host = make_session(tmp_path)
    dialogue(
        session,
        [
            ("MAIL FROM:<alice@example.org>", "250 2.1.0 <alice@example.org>... Sender ok", {}),
            (
                "RCPT TO:<bob@targetdomain1.com>",
                "250 2.1.5 <bob@targetdomain1.com>... Recipient ok",
                {"rcpt": True},
            ),
        ],
    )
    answer = say(session, "DATA", pipelined=30)
    assert (str(answer.reply), answer.close) == (
        "554 5.5.0 Error: SMTP protocol synchronization",
        True,
    )
    assert host.counted == [
        metrics.event("improper_pipelining"),
        metrics.rejection("protocol"),
    ]
    assert session.tx is None


def test_connect_refusal_is_restricted_mode(tmp_path: Path) -> None:
    session, _ = make_session(tmp_path, Client("192.0.2.66", "FAIL"))
    dialogue(
        session,
        [
            (
                "EHLO x.example",
                "250 gateway.example.com Hello [192.0.2.66], pleased to meet you",
                {},
            ),
            ("MAIL FROM:<alice@example.org>", "550 5.7.1 Access denied", {"bad": True}),
            ("RCPT TO:<bob@targetdomain1.com>", "550 5.7.1 Access denied", {"bad": True}),
            ("DATA", "550 5.7.1 Access denied", {"bad": True}),
            ("NOOP", "250 2.0.0 OK", {}),
        ],
    )


def test_early_talker_is_restricted_too(tmp_path: Path) -> None:
    session, host = make_session(tmp_path)
    assert (
        str(session.early_talk(1).reply) == "554 gateway.example.com ESMTP not accepting messages"
    )
    assert host.counted == [metrics.connection("early_talker"), metrics.rejection("early_talker")]
    dialogue(
        session,
        [
            ("MAIL FROM:<alice@example.org>", "550 5.0.0 Command rejected", {"bad": True}),
            ("RSET", "250 2.0.0 Reset state", {}),
        ],
    )


def test_relay_client_and_sender_domain(tmp_path: Path) -> None:
    session, _ = make_session(tmp_path, RELAY, resolves="no")
    dialogue(
        session,
        [
            (
                "MAIL FROM:<a@nxdomain.example>",
                "553 5.1.8 <a@nxdomain.example>... Domain of "
                "sender address a@nxdomain.example does not exist",
                {},
            ),
            ("MAIL FROM:<>", "250 2.1.0 <>... Sender ok", {}),
            (
                "RCPT TO:<x@example.net>",
                "250 2.1.5 <x@example.net>... Recipient ok",
                {"rcpt": True},
            ),
        ],
    )


def test_etrn_and_starttls_answers(tmp_path: Path) -> None:
    session, host = make_session(tmp_path)
    dialogue(
        session,
        [
            (
                "ETRN @targetdomain1.com",
                "250 2.0.0 Queuing for node @targetdomain1.com started",
                {},
            ),
            (
                "ETRN #q",
                "458 4.0.0 Unable to queue messages for node #q: named queues are not "
                "supported; use ETRN domain",
                {},
            ),
            ("STARTTLS", "502 5.5.1 STARTTLS not available", {}),
        ],
    )
    assert host.flushed == [("targetdomain1.com", True)]


def test_a_header_section_too_large_fails_the_message_only(tmp_path: Path) -> None:
    session, host = make_session(tmp_path)
    say(session, "MAIL FROM:<alice@example.org>")
    say(session, "RCPT TO:<bob@targetdomain1.com>")
    assert say(session, "DATA").reply.code == 354
    session.data_chunk(b"".join(f"X-F{i}: {'v' * 70}\r\n".encode() for i in range(600)))
    answer = asyncio.run(session.data_end(0))
    assert str(answer.reply) == "552 5.6.0 Headers too large (32768 max)"
    assert session.tx is None and host.committed == []
    assert list((tmp_path / "spool" / "incoming").iterdir()) == []


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        ("VRFY alice", "252 2.5.2 Cannot VRFY user; try RCPT to attempt delivery (or try finger)"),
        ("EXPN team", "502 5.7.0 Sorry, we do not allow this operation"),
        ("VERB", "502 5.7.0 Verbose unavailable"),
        ("AUTH PLAIN", "503 5.3.3 AUTH not available"),
        ("BDAT 5 LAST", "502 5.5.1 CHUNKING not supported; use DATA"),
    ],
)
def test_verbs_that_say_no(tmp_path: Path, line: str, reply: str) -> None:
    session, _ = make_session(tmp_path)
    dialogue(session, [(line, reply, {})])


@pytest.mark.parametrize("parked", [False, True])
def test_a_finished_connection_is_freed_by_reference_counting(tmp_path: Path, parked: bool) -> None:
    """When a connection ends, its objects (the protocol, its session, task and buffers) go at
    once: the session holds the connection's flush, and a connection that kept its session
    made a reference cycle per connection, left for the garbage collector to find."""
    from mailgate.daemon import Gateway
    from mailgate.smtp.server import SmtpServerProtocol

    gateway = Gateway(None, snapshot(tmp_path, settings='[smtp]\ngreet_pause = "0s"\n'))

    class Transport:
        def __init__(self, protocol: SmtpServerProtocol) -> None:
            self.protocol: SmtpServerProtocol | None = protocol
            self.out: list[bytes] = []

        def get_extra_info(self, name: str, default: object = None) -> object:
            return ("127.0.0.1", 40000) if name == "peername" else default

        def write(self, data: bytes) -> None:
            self.out.append(data)

        def close(self) -> None:
            protocol, self.protocol = self.protocol, None  # as asyncio's transports let go
            if protocol is not None:
                asyncio.get_running_loop().call_soon(protocol.connection_lost, None)

    async def connection() -> tuple[weakref.ref[SmtpServerProtocol], list[bytes]]:
        protocol = SmtpServerProtocol(gateway)
        transport = Transport(protocol)
        protocol.connection_made(transport)
        # The greeting went out at once (a loopback client: nothing to look up).
        [greeting] = transport.out
        assert greeting.startswith(b"220 gateway.example.com ESMTP mailgate ready")
        if parked:  # the task waits for input: the commands are answered in data_received
            await asyncio.sleep(0)
            assert protocol.parked
            protocol.data_received(b"EHLO client.example.net\r\n")
            assert b"pleased to meet you" in transport.out[-1] and protocol.parked
        protocol.data_received(b"EHLO client.example.net\r\nQUIT\r\n")
        assert protocol.task is not None
        await protocol.task
        await asyncio.sleep(0)  # connection_lost, which the close scheduled
        return weakref.ref(protocol), transport.out

    gc.disable()
    try:
        freed, out = asyncio.run(connection())
        assert b"".join(out).endswith(b"221 2.0.0 gateway.example.com closing connection\r\n")
        assert gateway.sessions == set()
        assert freed() is None
    finally:
        gc.enable()
        gateway.spool.close()
