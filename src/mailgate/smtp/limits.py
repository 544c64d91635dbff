"""Connection admission, as Postfix's anvil: how many sessions are open, in all and per client
address, for the whole daemon.

The listener asks :meth:`Admission.has_room` before it accepts (the ceiling: excess
connections wait in the kernel's listen queue, as Sendmail's do). An accepted connection asks
:meth:`Admission.admit` (the per-IP limit), which registers it only if it is let in, so a
refused connection (:func:`per_ip_refusal`, its 421) is never counted, not even while its
reply goes out; :meth:`Admission.release` when it ends. With one process the counts are plain
dictionaries. With ``workers > 1`` the master makes a :class:`SharedCounts` before it forks:
arrays in shared memory, one row per worker, holding its total and its per-address counts
hashed into 65,536 slots; a count is the sum over the rows. Two addresses in one slot share
a count, so the per-IP limit can only ever bite early for a neighbour of a busy address, never
late; the total is exact. The connection *rate* is not shared: each worker takes its share of
``connection_rate_throttle`` (the kernel spreads the connections among the workers' accept
loops evenly).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import zlib
from collections import Counter
from typing import Protocol

from mailgate.policy import Client
from mailgate.reply import Reply

SLOTS = 65536


class Counts(Protocol):
    def add(self, ip: str, delta: int) -> None: ...

    def count(self, ip: str) -> int: ...

    def total(self) -> int: ...


class LocalCounts:
    """One process's counts."""

    def __init__(self) -> None:
        self._per_ip: Counter[str] = Counter()
        self._total = 0

    def add(self, ip: str, delta: int) -> None:
        count = self._per_ip[ip] + delta
        if count > 0:
            self._per_ip[ip] = count
        else:
            self._per_ip.pop(ip, None)
        self._total += delta

    def count(self, ip: str) -> int:
        return self._per_ip[ip]

    def total(self) -> int:
        return self._total


def _slot(ip: str) -> int:
    return zlib.crc32(ip.encode()) % SLOTS


class SharedCounts:
    """Counts every worker of one daemon sees: made by the master before it forks.

    One row per worker in shared memory; a worker writes only its own row (no lock), readers
    add the rows up. When a worker dies the master zeroes its row before it starts the next
    one, so a killed worker's sessions stop counting with it."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._rows = multiprocessing.get_context("fork").RawArray(
            ctypes.c_int, workers * (SLOTS + 1)
        )
        self.row = 0  # set in each worker after the fork

    def _sum(self, slot: int) -> int:
        rows, width = self._rows, SLOTS + 1
        return sum(rows[w * width + slot] for w in range(self.workers))

    def add(self, ip: str, delta: int) -> None:
        base = self.row * (SLOTS + 1)
        self._rows[base + _slot(ip)] += delta
        self._rows[base + SLOTS] += delta

    def count(self, ip: str) -> int:
        return self._sum(_slot(ip))

    def total(self) -> int:
        return self._sum(SLOTS)

    def clear_row(self, row: int) -> None:
        """The worker of this row is gone (called by the master)."""
        ctypes.memset(
            ctypes.addressof(self._rows) + row * (SLOTS + 1) * ctypes.sizeof(ctypes.c_int),
            0,
            (SLOTS + 1) * ctypes.sizeof(ctypes.c_int),
        )


class Admission:
    """The ceiling and the per-IP limit over one set of counts."""

    def __init__(self, counts: Counts | None = None) -> None:
        self.counts: Counts = counts if counts is not None else LocalCounts()

    def has_room(self, max_connections: int) -> bool:
        return self.counts.total() < max_connections

    def admit(self, client: Client, max_per_ip: int) -> bool:
        """Sendmail's MaxConnectionsPerIP (0: none; the local host is never limited): True,
        and the session is counted, when ``client`` has fewer than ``max_per_ip`` sessions;
        False, and nothing is counted, when it has that many.

        Ask, then register. With several workers another one may register the same address
        between the two: the count is asked once more after registering, and a session that
        turns out to be over the limit withdraws, so the limit is never passed (at worst both
        of two simultaneous sessions are refused)."""
        ip = client.ip
        if not max_per_ip or client.is_loopback:
            self.counts.add(ip, 1)
            return True
        if self.counts.count(ip) >= max_per_ip:
            return False
        self.counts.add(ip, 1)
        if self.counts.count(ip) > max_per_ip:
            self.counts.add(ip, -1)
            return False
        return True

    def release(self, ip: str) -> None:
        """An admitted session from ``ip`` has ended."""
        self.counts.add(ip, -1)

    @property
    def open_sessions(self) -> int:
        return self.counts.total()


def per_ip_refusal(ip: str, hostname: str) -> Reply:
    """What a client over the per-IP limit is told before the connection is closed."""
    return Reply(
        421, "4.7.0", f"{hostname} Too many concurrent connections from {ip}; try again later"
    )
