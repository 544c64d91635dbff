"""Helpers for the crash suite (tests/reliability/crash.py): a sink that can be read by epoch,
the messages the clients send, and what a spool holds once its daemon is dead.

Every message is number ``n``: its recipient is ``m<n>@crash.test`` (so that the sink's
command log shows which message a delivery carries before its content arrives) and its
Message-ID ``<crash.<seed>.<n>@example.org>`` (the accounting key at the sink).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mailgate.queue.spool import Spool
from tests.support.sink import SinkServer

DOMAIN = "crash.test"
SENDER = "sender@example.org"
_RCPT = re.compile(r"RCPT TO:<m(\d+)@crash\.test>", re.IGNORECASE)
_MSGID = re.compile(rb"^Message-ID: <crash\.\d+\.(\d+)@example\.org>\r$", re.IGNORECASE | re.M)


def recipient(n: int) -> str:
    return f"m{n}@{DOMAIN}"


def number_of(address: str) -> int | None:
    m = re.fullmatch(r"m(\d+)@crash\.test", address, re.IGNORECASE)
    return int(m.group(1)) if m else None


def make_message(n: int, seed: int, rng: random.Random) -> bytes:
    """Message ``n``: mostly 0.3–6 KiB, one in 150 about 300 KiB (past the spool's write
    buffer and the spare-file size limit), a dot-stuffed line in some."""
    size = 300_000 if rng.random() < 1 / 150 else rng.randint(300, 6000)
    head = (
        f"From: <{SENDER}>\r\nTo: <{recipient(n)}>\r\nSubject: crash test {n}\r\n"
        "Date: Tue, 24 Nov 2026 19:17:12 +0000\r\n"
        f"Message-ID: <crash.{seed}.{n}@example.org>\r\n\r\n"
    )
    line = (f"message {n} " + "abcdefghijklmnopqrstuvwxyz0123456789" * 3)[:76] + "\r\n"
    lines = [line] * max(1, size // len(line))
    if n % 7 == 0:
        lines.insert(len(lines) // 2, ".a line that starts with a dot\r\n")
    return (head + "".join(lines)).encode()


def stuffed(content: bytes) -> bytes:
    """``content`` as sent after DATA: dot-stuffed, without the final ``.CRLF``."""
    out = content.replace(b"\r\n.", b"\r\n..")
    return b"." + out if out.startswith(b".") else out


def message_number(data: bytes) -> int | None:
    """The ``n`` of a message as the sink received it (our Message-ID header)."""
    m = _MSGID.search(data, 0, 64 * 1024)
    return int(m.group(1)) if m else None


class CrashSink(SinkServer):
    """The next hop. ``mark()`` returns a position in its logs; ``since(mark)`` what came after:
    which messages' deliveries began (RCPT seen), were refused (4xx after the content), were
    accepted."""

    def __enter__(self) -> CrashSink:
        self.start()
        return self

    @property
    def open_sessions(self) -> int:
        return len(self._writers)

    def mark(self) -> tuple[int, int, int]:
        with self._cond:
            return len(self.commands), len(self.transactions), len(self.messages)

    def since(self, mark: tuple[int, int, int]) -> Activity:
        with self._cond:
            commands = self.commands[mark[0] :]
            transactions = self.transactions[mark[1] :]
            messages = self.messages[mark[2] :]
        started: Counter[int] = Counter()
        for line in commands:
            m = _RCPT.fullmatch(line)
            if m:
                started[int(m.group(1))] += 1
        refused: Counter[int] = Counter()
        for t in transactions:
            if not t.completed:
                for a in t.rcpt_tos:
                    n = number_of(a)
                    if n is not None:
                        refused[n] += 1
        accepted: Counter[int] = Counter()
        for msg in messages:
            for a in msg.rcpt_tos:
                n = number_of(a)
                if n is not None:
                    accepted[n] += 1
        data_commands = sum(1 for line in commands if line.upper() == "DATA")
        return Activity(started, refused, accepted, data_commands)


@dataclass
class Activity:
    started: Counter[int]  # RCPT commands per message: deliveries begun
    refused: Counter[int]  # transactions refused after the content (the sink's data_reply)
    accepted: Counter[int]  # copies received
    data_commands: int

    def not_refused(self) -> set[int]:
        """Messages with a delivery begun that the sink did not refuse: accepted (maybe a
        duplicate to come) or cut off."""
        return {n for n, c in self.started.items() if c > self.refused[n]}


@dataclass
class SpoolState:
    queued: dict[int, str]  # message number → qid, for every queue/ entry
    other_queued: list[str]  # queue/ entries that are not ours (bounces, unreadable)
    sealed_incoming: int  # incoming/ files that start-up will move into the queue


def read_spool(spool: Path) -> SpoolState:
    """What a dead daemon left: the queue/ entries by message number."""
    queued: dict[int, str] = {}
    other: list[str] = []
    qdir = spool / "queue"
    for p in sorted(qdir.iterdir()) if qdir.exists() else []:
        if p.name.endswith((".st", ".tmp")):
            continue
        try:
            with open(p, "rb") as f:
                line = f.readline(16 * 1024 * 1024)
        except FileNotFoundError:
            continue  # delivered meanwhile (a live worker)
        try:
            numbers = [number_of(r["address"]) for r in json.loads(line)["recipients"]]
        except (ValueError, KeyError, TypeError):
            other.append(p.name)
            continue
        if len(numbers) == 1 and numbers[0] is not None:
            queued[numbers[0]] = p.name
        else:
            other.append(p.name)
    sealed = 0
    idir = spool / "incoming"
    for p in idir.iterdir() if idir.exists() else []:
        if p.name not in queued.values() and not (qdir / p.name).exists() and _sealed(p):
            sealed += 1
    return SpoolState(queued, other, sealed)


def _sealed(path: Path) -> bool:
    try:
        return bool(Spool._sealed_qid(path) == path.name)
    except OSError:
        return False


def spool_files(spool: Path) -> dict[str, list[str]]:
    """Every file left in each spool folder."""
    out: dict[str, list[str]] = {}
    for name in ("incoming", "queue", "corrupt", "spare"):
        d = spool / name
        out[name] = sorted(p.name for p in d.iterdir()) if d.exists() else []
    return out


def sealed_spares(spool: Path) -> list[str]:
    """spare/ files whose seal matches their content (a message start-up would queue again)."""
    d = spool / "spare"
    out = []
    for p in sorted(d.iterdir()) if d.exists() else []:
        try:
            if Spool._sealed_qid(p) is not None:
                out.append(p.name)
        except OSError:
            continue
    return out


def children_of(pid: int) -> list[int]:
    """Live child processes of ``pid`` (the workers of a master)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
