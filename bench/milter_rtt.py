"""The milter client's own cost per message, without the daemon around it.

One process drives the events of one relayed 1 KiB message (OPTNEG, CONNECT, HELO, MAIL,
RCPT, DATA, six header fields, EOH, one body chunk, the end of message, QUIT) at a real
filter, ``--messages`` times, one filter connection per message as an SMTP session has, with
``milter/client.py`` and ``milter/session.py`` as the daemon uses them (``--mode client``),
or with the least Python that can do the same exchange on the same event loop (``--mode
bare``: the packets prebuilt, one future per answered event, the answers counted, not
parsed): the floor a round trip costs in Python on uvloop. CPU seconds per message and round
trips per message are printed; under callgrind (``--callgrind``) the instructions per
message, as ``instructions.py`` counts them (two runs, the difference over the difference of
the counts).

    python3 bench/milter_rtt.py --pythonpath src --filter opendkim --mode client
    python3 bench/milter_rtt.py --pythonpath src --filter opendkim --callgrind

Run it under the bench lock when its CPU seconds matter (the callgrind counts do not move
with the load).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
HEADERS = [
    ("Received", " from client.example.net ([127.0.0.1])\r\n\tby gateway.example.com"),
    ("From", " <sender@example.org>"),
    ("To", " <rcpt@example.com>"),
    ("Date", " Wed, 2 Dec 2026 06:00:00 +0000"),
    ("Message-Id", " <20261202060000.1@client.example.net>"),
    ("Subject", " benchmark message"),
]
LINE = b"abcdefghijklmnopqrstuvwxyz" * 2 + b"\r\n"
BODY = LINE * 16
MACROS = {
    "j": "gateway.example.com",
    "{daemon_name}": "MTA",
    "{daemon_addr}": "127.0.0.1",
    "{daemon_port}": "25",
    "{if_addr}": "127.0.0.1",
    "v": "mailgate",
    "_": "client.example.net [127.0.0.1]",
    "{client_addr}": "127.0.0.1",
    "{client_name}": "client.example.net",
    "{client_port}": "40000",
    "{client_ptr}": "client.example.net",
    "{client_resolve}": "OK",
    "i": "4Q1A2B3C4D",
    "{mail_addr}": "sender@example.org",
    "{mail_host}": "example.org",
    "{mail_mailer}": "esmtp",
    "{rcpt_addr}": "rcpt@example.com",
    "{rcpt_host}": "example.com",
    "{rcpt_mailer}": "esmtp",
    "{msg_id}": "<20261202060000.1@client.example.net>",
}


async def client_messages(socket: str, n: int) -> int:
    """``n`` messages through FilterClient; the round trips made."""
    from mailgate.config import MilterSettings, parse_milter_socket
    from mailgate.milter.client import FilterClient
    from mailgate.milter.session import Outgoing, Stage

    settings = MilterSettings(name="bench", socket=parse_milter_socket(socket))
    trips = 0
    for _ in range(n):
        client = FilterClient(settings)
        await client.open()
        s = client.session
        trips += 1

        async def send(stage: Stage, out: Outgoing) -> None:
            nonlocal trips
            trips += out.reply
            await client.event(out, stage)  # noqa: B023 - awaited at once

        await send(Stage.CONNECT, s.connect(MACROS, "client.example", b"4", 40000, "127.0.0.1"))
        await send(Stage.HELO, s.helo(MACROS, "client.example.net"))
        await send(Stage.MAIL, s.mail(MACROS, ["<sender@example.org>"]))
        await send(Stage.RCPT, s.rcpt(MACROS, ["<rcpt@example.com>"]))
        await send(Stage.DATA, s.data(MACROS))
        for name, value in HEADERS:
            await send(Stage.HEADER, s.header(name, value))
        await send(Stage.EOH, s.eoh(MACROS))
        await send(Stage.BODY, s.body(BODY))
        trips += 1
        async for _reply in client.replies(s.end_of_message(MACROS)):
            pass
        client.quit()
    return trips


class _Bare(asyncio.Protocol):
    """Counts whole packets; a future per wait, completed by the packet that ends it."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None
        self.transport: asyncio.Transport | None = None
        self.last = b""  # the OPTNEG answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= 4:
            length = int.from_bytes(buf[:4], "big")
            if len(buf) < 4 + length:
                return
            command = buf[4:5]
            if command == b"O":
                self.last = bytes(buf[: 4 + length])
            del buf[: 4 + length]
            # Modifications come before the end of message's verdict: not the end of a wait.
            if command in b"cartdsfyO" and self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(bytes(command))


def _plan(negotiation: bytes) -> list[tuple[bytes, bool]]:
    """The packets of one message as FilterSession builds them for this filter's answer to
    OPTNEG: (bytes, answered), unanswered ones joined to the next answered one."""
    from mailgate.milter.session import FilterSession

    s = FilterSession({})
    s.negotiate()
    s.receive_data(negotiation)
    assert s.next_reply() is not None
    builds = [
        lambda: s.connect(MACROS, "client.example.net", b"4", 40000, "127.0.0.1"),
        lambda: s.helo(MACROS, "client.example.net"),
        lambda: s.mail(MACROS, ["<sender@example.org>"]),
        lambda: s.rcpt(MACROS, ["<rcpt@example.com>"]),
        lambda: s.data(MACROS),
        *(lambda n=n, v=v: s.header(n, v) for n, v in HEADERS),
        lambda: s.eoh(MACROS),
        lambda: s.body(BODY),
        lambda: s.end_of_message(MACROS),
    ]
    outs = []
    for build in builds:
        outs.append(build())
        s.awaiting = None  # no reply is read here
    plan, pending = [], b""
    for out in outs:
        pending += out.data
        if out.reply:
            plan.append((pending, True))
            pending = b""
    return plan


async def bare_messages(socket: str, n: int) -> int:
    """The same exchange with prebuilt packets: what a round trip costs at the least."""
    from mailgate.milter import codec

    port, host = socket.removeprefix("inet:").split("@")
    loop = asyncio.get_running_loop()
    negotiate = codec.encode_optneg(6, codec.ALL_ACTIONS, codec.ALL_STEPS)
    quit_ = codec.encode_bare(codec.QUIT)
    plan: list[tuple[bytes, bool]] | None = None
    trips = 0
    for _ in range(n):
        transport, proto = await loop.create_connection(_Bare, host, int(port))
        proto.waiter = loop.create_future()
        transport.write(negotiate)
        await proto.waiter
        trips += 1
        if plan is None:
            plan = _plan(proto.last)
        for data, _answered in plan:
            proto.waiter = loop.create_future()
            transport.write(data)
            await proto.waiter
            trips += 1
        transport.write(quit_)
        transport.close()
    return trips


def run(args: argparse.Namespace) -> None:
    import resource

    import uvloop

    main = client_messages if args.mode == "client" else bare_messages
    uvloop.run(main(args.socket, 5))  # imports, first connections: not counted
    before = resource.getrusage(resource.RUSAGE_SELF)
    trips = uvloop.run(main(args.socket, args.messages))
    after = resource.getrusage(resource.RUSAGE_SELF)
    user = (after.ru_utime - before.ru_utime) / args.messages * 1e6
    system = (after.ru_stime - before.ru_stime) / args.messages * 1e6
    print(
        f"{args.mode}: {args.messages} messages, {trips / args.messages:.1f} round trips each, "
        f"CPU a message: {user:.0f} µs user, {system:.0f} µs system"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pythonpath", required=True, help="a checkout's src/")
    ap.add_argument("--filter", choices=("opendkim", "rspamd"), default="opendkim")
    ap.add_argument("--socket", help="a filter already running (inet:port@host)")
    ap.add_argument("--mode", choices=("client", "bare"), default="client")
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--callgrind", action="store_true", help="instructions per message")
    args = ap.parse_args(argv)
    if args.socket:
        sys.path.insert(0, args.pythonpath)
        run(args)
        return 0
    sys.path.insert(0, str(BENCH.parent))
    from tests.support.filters import OpenDkim, Rspamd

    with tempfile.TemporaryDirectory(prefix="milter-rtt-") as tmp:
        cls = OpenDkim if args.filter == "opendkim" else Rspamd
        with cls(Path(tmp) / args.filter) as peer:
            me = [sys.executable, __file__, "--pythonpath", args.pythonpath]
            me += ["--socket", peer.socket, "--mode", args.mode]
            if not args.callgrind:
                subprocess.run([*me, "--messages", str(args.messages)], check=True)
                return 0
            totals = []
            valgrind = ["valgrind", "--tool=callgrind", "-q"]
            small, large = args.messages // 5, args.messages
            for n in (small, large):
                out = Path(tmp) / f"callgrind.{n}"
                subprocess.run(
                    [*valgrind, f"--callgrind-out-file={out}", *me, "--messages", str(n)],
                    check=True,
                )
                found = re.search(rb"^(?:summary|totals): (\d+)", out.read_bytes(), re.M)
                assert found is not None
                totals.append(int(found.group(1)))
            per = (totals[1] - totals[0]) / (large - small)
            print(f"{args.mode}: {per / 1e3:.0f} k instructions a message")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
