"""Where one session's time goes, step by step, as the client sees it.

    python3 bench/steps.py --pythonpath /work/main/src -n 800
    python3 bench/steps.py --relay postfix -n 800

``relay.py``'s one-session case (``1k1``: smtp-source, one message per connection, one session
at a time) is bound by the round trips of each session, not by CPU. This client makes the same
sessions one after another (connect, greeting, EHLO, MAIL, RCPT, DATA, a 1 KiB message, QUIT)
through a relay started as ``relay.py`` starts it (``workers = 0`` for mailgate, its next hop
Postfix's ``smtp-sink``), and times each step from sending the command to the last line of its
reply: the greeting from the ``connect()``, the content from its first byte to the 250, QUIT to
the 221. Then the medians and 90th percentiles per step, the sum of the medians and the rate
the sessions ran at. ``--warmup`` sessions first are not counted. Run it under the bench lock:
it measures wall-clock time. Loopback only, bounded in count and time.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import relays

STEPS = ("greet", "EHLO", "MAIL", "RCPT", "DATA", "content", "QUIT")


def message(i: int, size: int) -> bytes:
    """A message much like smtp-source's: a few header fields, ``size`` bytes of body lines."""
    head = (
        "From: <sender@example.org>\r\nTo: <user@bench.example>\r\n"
        f"Subject: step timing {i}\r\nMessage-Id: <steps.{i}.{time.time_ns()}@example.org>\r\n\r\n"
    ).encode()
    line = b"La de da de da 1. La de da de da 2. La de da de da 3. La de da de da 4.\r\n"
    body = (line * (size // len(line) + 1))[:size]
    if not body.endswith(b"\r\n"):
        body = body[:-2] + b"\r\n"
    return head + body + b".\r\n"


def read_reply(sock: socket.socket, buf: bytearray) -> bytes:
    """One whole reply (its last line: code and a space); ``buf`` keeps what comes after."""
    while True:
        end = 0
        while (nl := buf.find(b"\n", end)) >= 0:
            line = bytes(buf[end : nl + 1])
            end = nl + 1
            if len(line) < 4 or line[3:4] != b"-":
                reply = bytes(buf[:end])
                del buf[:end]
                return reply
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed; got {bytes(buf)!r}")
        buf += data


def session(port: int, i: int, size: int, marks: list[int] | None = None) -> list[float]:
    """One session; the seconds of each step in ``STEPS``. ``marks`` gets the clock's
    nanoseconds (CLOCK_MONOTONIC, the same in every process) at the start and end of each."""
    clock = time.perf_counter
    times: list[float] = []
    t0 = clock()
    with socket.create_connection((relays.HOST, port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray()
        reply = read_reply(sock, buf)
        t1 = clock()
        times.append(t1 - t0)
        if marks is not None:
            marks += (int(t0 * 1e9), int(t1 * 1e9))
        expect = b"220"
        for command, code in (
            (b"EHLO client.example.org\r\n", b"250"),
            (b"MAIL FROM:<sender@example.org>\r\n", b"250"),
            (b"RCPT TO:<user@bench.example>\r\n", b"250"),
            (b"DATA\r\n", b"354"),
            (message(i, size), b"250"),
            (b"QUIT\r\n", b"221"),
        ):
            if not reply.startswith(expect):
                raise RuntimeError(f"expected {expect!r}, got {reply!r}")
            t0 = clock()
            sock.sendall(command)
            reply = read_reply(sock, buf)
            t1 = clock()
            times.append(t1 - t0)
            if marks is not None:
                marks += (int(t0 * 1e9), int(t1 * 1e9))
            expect = code
        if not reply.startswith(expect):
            raise RuntimeError(f"expected {expect!r}, got {reply!r}")
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--relay", choices=("mailgate", "postfix"), default="mailgate")
    ap.add_argument("--pythonpath", default=None, help="mailgate's src/ (mailgate only)")
    ap.add_argument("-n", type=int, default=800, help="sessions timed")
    ap.add_argument("--warmup", type=int, default=200, help="sessions first, not timed")
    ap.add_argument("--size", type=int, default=1024, help="body bytes")
    ap.add_argument("--workers", default="0", help="mailgate's workers setting")
    ap.add_argument("--max-seconds", type=float, default=120, help="stop timing after this")
    ap.add_argument("--marks", default=None, help="write each step's start and end here")
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="steps-", dir="/var/tmp"))
    relays.BIN_DIR = base
    sink = relays.SmtpSink(base)
    daemon: relays.MailgateRelay | relays.PostfixRelay
    if args.relay == "mailgate":
        daemon = relays.MailgateRelay(
            base / "relay", sink.port, {"": {"workers": args.workers}}, args.pythonpath
        )
    else:
        daemon = relays.PostfixRelay(base / "relay", sink.port)
    rows: list[list[float]] = []
    marks: list[list[int]] = []
    try:
        daemon.start()
        for i in range(args.warmup):
            session(daemon.port, i, args.size)
        start = time.perf_counter()
        deadline = start + args.max_seconds
        for i in range(args.n):
            marks.append([])
            rows.append(session(daemon.port, args.warmup + i, args.size, marks[-1]))
            if time.perf_counter() > deadline:
                break
        wall = time.perf_counter() - start
        sink.counter.wait(args.warmup + len(rows), timeout=60, stall=20)
    finally:
        daemon.stop()
        sink.stop()
    if args.marks:
        Path(args.marks).write_text("".join(" ".join(map(str, m)) + "\n" for m in marks))
    label = args.pythonpath if args.relay == "mailgate" else "postfix"
    print(f"{label}: {len(rows)} sessions, {len(rows) / wall:.0f}/s (ms)")
    medians = [statistics.median(col) * 1000 for col in zip(*rows, strict=True)]
    p90 = [statistics.quantiles(col, n=10)[-1] * 1000 for col in zip(*rows, strict=True)]
    print("| " + " | ".join(("", *STEPS, "sum")) + " |")
    print("|" + "---|" * (len(STEPS) + 2))
    print("| median | " + " | ".join(f"{m:.3f}" for m in medians) + f" | {sum(medians):.3f} |")
    print("| p90 | " + " | ".join(f"{m:.3f}" for m in p90) + " | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
