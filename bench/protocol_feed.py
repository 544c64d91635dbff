"""The SMTP server protocol's cost for one message's content, without sockets: a
``ServerConnection`` fed EHLO, MAIL, RCPT, DATA, then the content in blocks as uvloop reads
them from smtp-source (37,000 bytes), to the end of data. Best of 5 rounds.

    PYTHONPATH=src python3 bench/protocol_feed.py [--size 102400] [--block 37000] [-n 300]
"""

from __future__ import annotations

import argparse
import time

from mailgate.smtp.protocol import NEED_DATA, Command, DataEnd, ServerConnection

LINE = b"The quick brown fox jumps over the lazy dog, said the admin. 0123456789 abcdefgh\r\n"
COMMANDS = b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"


def one(blocks: list[bytes]) -> None:
    conn = ServerConnection()
    conn.receive_data(COMMANDS)
    while not (isinstance(event := conn.next_event(), Command) and event.verb == "DATA"):
        pass
    conn.start_data()
    for block in blocks:
        conn.receive_data(block)
        while (event := conn.next_event()) is not NEED_DATA:
            if isinstance(event, DataEnd):
                return
    raise RuntimeError("no end of data")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=100 * 1024)
    ap.add_argument("--block", type=int, default=37_000)
    ap.add_argument("-n", type=int, default=300)
    args = ap.parse_args()
    body = (LINE * (args.size // len(LINE) + 1))[: args.size - 2] + b"\r\n"
    blocks = [body[i : i + args.block] for i in range(0, len(body), args.block)] + [b".\r\n"]
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(args.n):
            one(blocks)
        best = min(best, (time.perf_counter() - start) / args.n)
    print(f"{best * 1e6:.1f} µs a {args.size}-byte message through ServerConnection")


if __name__ == "__main__":
    main()
