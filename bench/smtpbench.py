"""A timestamping SMTP sink and a rate-limited SMTP source, for per-message latency.

``smtp-source`` reports no per-message time and its Message-Id numbering is not unique (the
counter in it is per process and goes negative under ``-s``), so the latency run uses these two
instead: the source puts ``Message-Id: <RUN.SEQ@bench.example>`` in each message and records
the wall-clock time of the ``250`` after DATA; the sink records the wall-clock time at which the
final ``.`` of each message arrived, by Message-Id. Both run on this machine, so ``time.time()``
is one clock; joining on the Message-Id gives the exact 250 → arrival time of every message.

    python3 bench/smtpbench.py sink --port P --count N --out arrivals.json [--timeout S]
    python3 bench/smtpbench.py source --port P --count N --rate R --sessions C --size S \
        --out sent.json
    # one message to 100 recipients over 10 domains; a sink on 10 addresses, counting them:
    python3 bench/smtpbench.py sink --host 127.0.0.11,...,127.0.0.20 --port P \
        --rcpt-count 20000 --out arrivals.json
    python3 bench/smtpbench.py source --port P --count 200 --rcpts 100 \
        --domains hop1.example,...,hop10.example --out sent.json

Loopback only: both refuse any host outside 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import re
import signal
import sys
import time
from typing import Any

MSGID = re.compile(rb"^Message-Id:\s*<([^>\r\n]*)>", re.IGNORECASE | re.MULTILINE)


def loopback(host: str) -> str:
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"refusing non-loopback address {host}")
    return host


def install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# -- sink --------------------------------------------------------------------------------------


class SinkState:
    def __init__(self, count: int) -> None:
        self.count = count
        self.arrivals: dict[str, float] = {}
        self.rcpt_count = 0  # exit once this many recipients arrived (0: by messages)
        self.progress = False  # print "rcpt=N" (running recipient count) after each message
        self.no_id = 0
        self.messages = 0
        self.bytes = 0
        self.recipients = 0  # RCPTs of the transactions that ended with the final "."
        self.by_id: dict[str, int] = {}  # Message-Id → recipients received (duplicates too)
        self.last = 0.0
        self.all_in = asyncio.Event()

    def arrived(self, msgid: str | None, size: int, rcpts: int = 1) -> None:
        now = time.time()
        self.messages += 1
        self.bytes += size
        self.recipients += rcpts
        self.last = now
        if msgid is None:
            self.no_id += 1
        else:
            self.arrivals.setdefault(msgid, now)
            self.by_id[msgid] = self.by_id.get(msgid, 0) + rcpts
        if self.progress:
            sys.stdout.write(f"rcpt={self.recipients}\n")
            sys.stdout.flush()
        if self.rcpt_count:
            if self.recipients >= self.rcpt_count:
                self.all_in.set()
        elif self.count and self.messages >= self.count:
            self.all_in.set()


class SinkProtocol(asyncio.Protocol):
    """Minimal ESMTP server with PIPELINING: answers 250 to everything, keeps nothing."""

    def __init__(self, state: SinkState) -> None:
        self.state = state
        self.buf = bytearray()
        self.in_data = False
        self.scan_from = 0
        self.rcpts = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: typed loosely.
        self.transport = transport
        transport.write(b"220 bench-sink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out: list[bytes] = []
        while True:
            if self.in_data:
                # The end is CRLF.CRLF; the leading CRLF may be the one ending the DATA line.
                i = self.buf.find(b"\r\n.\r\n", max(0, self.scan_from - 4))
                if i < 0:
                    self.scan_from = len(self.buf)
                    break
                head = bytes(self.buf[: min(i, 65536)])
                m = MSGID.search(head.split(b"\r\n\r\n", 1)[0])
                msgid = m.group(1).decode("ascii", "replace") if m else None
                self.state.arrived(msgid, i, max(1, self.rcpts))
                self.rcpts = 0
                del self.buf[: i + 5]
                self.in_data = False
                self.scan_from = 0
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            j = self.buf.find(b"\r\n")
            if j < 0:
                if len(self.buf) > 4096:
                    out.append(b"500 5.5.0 line too long\r\n")
                    self.buf.clear()
                break
            line = bytes(self.buf[:j])
            del self.buf[: j + 2]
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.append(
                    b"250-bench-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                    b"250-SIZE 0\r\n250 ENHANCEDSTATUSCODES\r\n"
                )
            elif verb == b"DATA":
                self.in_data = True
                self.scan_from = 0
                # Lines after DATA in this buffer are message content: the loop reads them.
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                # The CRLF that ended the DATA line: so an empty message's "." is found too.
                self.buf[:0] = b"\r\n"
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                if self.transport:
                    self.transport.write(b"".join(out))
                    self.transport.close()
                return
            else:  # HELO, MAIL, RCPT, RSET, NOOP, ...
                if verb == b"RCPT":
                    self.rcpts += 1
                elif verb in (b"MAIL", b"RSET"):
                    self.rcpts = 0
                out.append(b"250 2.0.0 Ok\r\n")
        if out and self.transport:
            self.transport.write(b"".join(out))


async def run_sink(
    hosts: list[str],
    port: int,
    count: int,
    timeout: float,
    out: str,
    rcpt_count: int = 0,
    progress: bool = False,
) -> int:
    state = SinkState(count)
    state.rcpt_count = rcpt_count
    state.progress = progress
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(
            lambda: SinkProtocol(state), host, port, backlog=1024, reuse_address=True
        )
        for host in hosts
    ]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    waits = [asyncio.ensure_future(stop.wait())]
    if count:
        waits.append(asyncio.ensure_future(state.all_in.wait()))
    await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    for server in servers:
        server.close()
    with open(out, "w") as f:
        json.dump(
            {
                "messages": state.messages,
                "no_id": state.no_id,
                "bytes": state.bytes,
                "recipients": state.recipients,
                "last": state.last,
                "by_id": state.by_id,
                "arrivals": state.arrivals,
            },
            f,
        )
    return 0


# -- source ------------------------------------------------------------------------------------


def recipients(count: int, domains: list[str]) -> list[str]:
    """``count`` addresses spread round-robin over ``domains`` (``u0@d0``, ``u1@d1``, …)."""
    return [f"u{j}@{domains[j % len(domains)]}" for j in range(count)]


def make_message(run: str, seq: int, size: int) -> bytes:
    head = (
        f"From: <sender@example.org>\r\nTo: <user@bench.example>\r\n"
        f"Subject: bench {run} {seq}\r\nMessage-Id: <{run}.{seq}@bench.example>\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n\r\n"
    )
    line = b"X" * 76 + b"\r\n"
    body = line * (size // len(line)) + b"Y" * (size % len(line)) + b"\r\n"
    return head.encode() + body


async def read_reply(reader: asyncio.StreamReader) -> int:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3])


async def send_one(
    host: str,
    port: int,
    message: bytes,
    timeout: float,
    rcpts: tuple[str, ...] = ("user@bench.example",),
) -> float:
    """One SMTP session, one message (as smtp-source without -d); returns the 250 time."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:

        async def cmd(line: bytes | None, want: int) -> None:
            if line is not None:
                writer.write(line)
            code = await asyncio.wait_for(read_reply(reader), timeout)
            if code != want:
                raise ConnectionError(f"{line!r} got {code}, wanted {want}")

        await cmd(None, 220)
        await cmd(b"EHLO source.example.org\r\n", 250)
        await cmd(b"MAIL FROM:<sender@example.org>\r\n", 250)
        for rcpt in rcpts:
            await cmd(f"RCPT TO:<{rcpt}>\r\n".encode(), 250)
        await cmd(b"DATA\r\n", 354)
        await cmd(message + b".\r\n", 250)
        accepted = time.time()
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(read_reply(reader), timeout)
        return accepted
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def run_source(
    host: str,
    port: int,
    count: int,
    rate: float,
    sessions: int,
    size: int,
    run: str,
    out: str,
    timeout: float,
    rcpts: tuple[str, ...] = ("user@bench.example",),
) -> int:
    """Message ``i`` is due at start + i/rate (open loop, at most ``sessions`` at once)."""
    sent: dict[str, list[float]] = {}
    errors: list[str] = []
    next_seq = 0
    start = time.time() + 0.2
    deadline = time.monotonic() + timeout

    async def worker() -> None:
        nonlocal next_seq
        while next_seq < count and time.monotonic() < deadline:
            seq = next_seq
            next_seq += 1
            due = start + seq / rate if rate > 0 else time.time()
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                t250 = await send_one(host, port, make_message(run, seq, size), 30.0, rcpts)
                sent[f"{run}.{seq}@bench.example"] = [due, t250]
            except (OSError, ConnectionError, TimeoutError) as exc:
                if len(errors) < 100:
                    errors.append(f"{seq}: {exc!r}")

    await asyncio.gather(*(worker() for _ in range(sessions)))
    end = time.time()
    with open(out, "w") as f:
        json.dump(
            {
                "start": start,
                "end": end,
                "sent": sent,
                "rcpts_per_message": len(rcpts),
                "errors": errors,
                "attempted": next_seq,
            },
            f,
        )
    return 0 if not errors else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sink")
    s.add_argument("--host", default="127.0.0.1", help="address, or several: a,b,c")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--count", type=int, default=0, help="exit once this many arrived")
    s.add_argument(
        "--rcpt-count", type=int, default=0, help="exit once this many recipients arrived"
    )
    s.add_argument("--timeout", type=float, default=600)
    s.add_argument("--progress", action="store_true", help='"rcpt=N" on stdout per message')
    s.add_argument("--out", required=True)
    c = sub.add_parser("source")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--count", type=int, required=True)
    c.add_argument("--rate", type=float, default=0, help="messages/s (0 = as fast as possible)")
    c.add_argument("--sessions", type=int, default=20)
    c.add_argument("--size", type=int, default=1024)
    c.add_argument("--rcpts", type=int, default=1, help="recipients per message")
    c.add_argument(
        "--domains", default="bench.example", help="recipient domains, round-robin: a,b,c"
    )
    c.add_argument("--run", default="r0")
    c.add_argument("--timeout", type=float, default=600)
    c.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    install_uvloop()
    hosts = [loopback(h) for h in a.host.split(",")]
    if a.cmd == "sink":
        return asyncio.run(
            run_sink(hosts, a.port, a.count, a.timeout, a.out, a.rcpt_count, a.progress)
        )
    rcpts = (
        ("user@bench.example",)
        if a.rcpts == 1 and a.domains == "bench.example"
        else tuple(recipients(a.rcpts, a.domains.split(",")))
    )
    return asyncio.run(
        run_source(
            hosts[0], a.port, a.count, a.rate, a.sessions, a.size, a.run, a.out, a.timeout, rcpts
        )
    )


if __name__ == "__main__":
    sys.exit(main())
