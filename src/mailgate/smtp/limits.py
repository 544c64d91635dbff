"""Connection admission, as Postfix's anvil: how many sessions are open, in all and per client
address, for the whole daemon.

The listener asks :meth:`Admission.has_room` before it accepts (the ceiling: excess
connections wait in the kernel's listen queue, as Sendmail's do). An accepted connection asks
:meth:`Admission.admit` (the per-IP limit), which registers it only if it is let in, so a
refused connection (`PER_IP_REFUSAL`, its 421) is never counted, not even while its
reply goes out; :meth:`Admission.release` when it ends. With one process the counts are plain
dictionaries. With ``workers > 1`` the master makes a :class:`SharedCounts` before it forks:
arrays in shared memory, one row per worker, holding its total and its per-address counts
hashed into 65,536 slots; a count is the sum over the rows. Two addresses in one slot share
a count, so the per-IP limit can only ever bite early for a neighbour of a busy address, never
late; the total is exact.

The connection rate (:class:`ConnectionRate`, Sendmail's ConnectionRateThrottle: per listening
socket, per wall-clock second) is counted the same way: each worker's row holds, per listener,
the second it last accepted in and how many it accepted in it; the daemon's count for a second
is the sum of the rows that are in that second.
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
RESERVED = ""  # the address places under the ceiling are held under (no session has it)


class Counts(Protocol):
    def add(self, ip: str, delta: int) -> None: ...

    def count(self, ip: str) -> int: ...

    def total(self) -> int: ...

    def arrive(self, listener: int, second: int, delta: int) -> None: ...

    def arrivals(self, listener: int, second: int) -> int: ...


class LocalCounts:
    """One process's counts."""

    def __init__(self) -> None:
        self._per_ip: Counter[str] = Counter()
        self._total = 0
        self._arrivals: dict[int, tuple[int, int]] = {}  # listener → (second, connections)

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

    def arrive(self, listener: int, second: int, delta: int) -> None:
        last, count = self._arrivals.get(listener, (second, 0))
        if last != second:
            if delta < 0:  # given back after its second ended: nothing to take back
                return
            count = 0
        self._arrivals[listener] = (second, count + delta)

    def arrivals(self, listener: int, second: int) -> int:
        last, count = self._arrivals.get(listener, (second, 0))
        return count if last == second else 0


def _slot(ip: str) -> int:
    return zlib.crc32(ip.encode()) % SLOTS


class SharedCounts:
    """Counts every worker of one daemon sees: made by the master before it forks.

    One row per worker in shared memory; a worker writes only its own row (no lock), readers
    add the rows up. When a worker dies the master zeroes its row before it starts the next
    one, so a killed worker's sessions stop counting with it."""

    def __init__(self, workers: int, listeners: int) -> None:
        self.workers = workers
        self.listeners = listeners
        context = multiprocessing.get_context("fork")
        self._rows = context.RawArray(ctypes.c_int, workers * (SLOTS + 1))
        # Per worker and listener: the second of its last accept, and its accepts in it.
        self._arrivals = context.RawArray(ctypes.c_longlong, workers * listeners * 2)
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

    def arrive(self, listener: int, second: int, delta: int) -> None:
        at = (self.row * self.listeners + listener) * 2
        rows = self._arrivals
        if rows[at] != second:
            if delta < 0:  # given back after its second ended: nothing to take back
                return
            # The count first: a reader between the two writes sees 0 in either second.
            rows[at + 1] = 0
            rows[at] = second
        rows[at + 1] += delta

    def arrivals(self, listener: int, second: int) -> int:
        rows, step = self._arrivals, self.listeners * 2
        at = listener * 2
        return sum(
            rows[w * step + at + 1] for w in range(self.workers) if rows[w * step + at] == second
        )

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

    def reserve(self, max_connections: int) -> bool:
        """A place under the ceiling for an accepted connection until its session has
        counted itself (then :meth:`unreserve`): ask, take, ask again, as :meth:`admit` does,
        so that workers accepting at the same instant never pass ``max_connections``. The
        place is counted under no address (``RESERVED``)."""
        if self.counts.total() >= max_connections:
            return False
        self.counts.add(RESERVED, 1)
        if self.counts.total() > max_connections:
            self.counts.add(RESERVED, -1)
            return False
        return True

    def unreserve(self) -> None:
        self.counts.add(RESERVED, -1)

    @property
    def open_sessions(self) -> int:
        return self.counts.total()


class ConnectionRate:
    """Sendmail's ConnectionRateThrottle for one listening socket: at most ``rate`` new
    connections a wall-clock second, over every worker (0: no limit). The rest wait (in the
    kernel's listen queue, or with their PROXY header read) until the next second.

    A place is taken, then the count asked again, as :meth:`Admission.admit` does: of two
    workers that take the last place at the same instant both give it back and try again a
    moment later, so a second never holds more than ``rate``."""

    RETRY = 0.002  # seconds: after giving back a place another worker took at the same time

    def __init__(self, counts: Counts, listener: int) -> None:
        self.counts = counts
        self.listener = listener

    def take(self, rate: int, now: float) -> float:
        """0, and a place in this second is taken; else the seconds to wait, nothing taken."""
        if rate <= 0:
            return 0.0
        second = int(now)
        if self.counts.arrivals(self.listener, second) >= rate:
            return (second + 1) - now
        self.counts.arrive(self.listener, second, 1)
        if self.counts.arrivals(self.listener, second) > rate:
            self.counts.arrive(self.listener, second, -1)
            return min(self.RETRY, (second + 1) - now)
        return 0.0

    def give_back(self, now: float) -> None:
        """A place taken at ``now`` went unused (no connection was waiting)."""
        self.counts.arrive(self.listener, int(now), -1)


# What a client over the per-IP limit is told before the connection is closed: the words
# of Sendmail's FEATURE(conncontrol) (its sendmail.cf), which fail2ban's sendmail-reject
# filter bans on.
PER_IP_REFUSAL = Reply(421, "4.3.2", "Too many open connections.")
