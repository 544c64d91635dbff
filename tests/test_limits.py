"""Connection admission (smtp/limits.py): the per-IP limit asks, then registers.

The daemon-level behaviour (the 421 on the wire, two workers sharing the counts) is in
tests/test_edge.py and tests/test_workers.py; here the counting itself, in one process and
over the shared-memory rows the workers use, and the connection rate counted the same way.
"""

from __future__ import annotations

import pytest

from mailgate.policy import Client
from mailgate.smtp.limits import (
    PER_IP_REFUSAL,
    Admission,
    ConnectionRate,
    LocalCounts,
    SharedCounts,
)

CLIENT = Client("192.0.2.7")


def test_a_refused_session_is_never_counted() -> None:
    adm = Admission()
    assert [adm.admit(CLIENT, 2) for _ in range(4)] == [True, True, False, False]
    assert adm.counts.count("192.0.2.7") == 2 and adm.open_sessions == 2
    adm.release("192.0.2.7")
    assert adm.admit(CLIENT, 2)  # a place came free
    assert not adm.admit(CLIENT, 2)
    assert adm.admit(Client("192.0.2.8"), 2)  # another address has its own count
    assert adm.open_sessions == 3


def test_no_limit_for_the_local_host_or_with_zero() -> None:
    adm = Admission()
    assert all(adm.admit(Client("127.0.0.1"), 1) for _ in range(5))
    assert all(adm.admit(Client("::1"), 1) for _ in range(5))
    assert all(adm.admit(CLIENT, 0) for _ in range(5))
    assert adm.open_sessions == 15
    assert adm.admit(Client("127.0.0.2"), 1)
    assert not adm.admit(Client("127.0.0.2"), 1)  # only 127.0.0.1 and ::1 are the local host


def test_the_ceiling() -> None:
    adm = Admission()
    for n in range(3):
        adm.admit(Client(f"192.0.2.{n}"), 10)
    assert adm.has_room(4) and not adm.has_room(3)


def test_shared_counts_add_up_the_workers() -> None:
    counts = SharedCounts(2, 1)
    adm = Admission(counts)
    counts.row = 0
    assert adm.admit(CLIENT, 3) and adm.admit(CLIENT, 3)
    counts.row = 1
    assert adm.admit(CLIENT, 3)
    assert not adm.admit(CLIENT, 3)  # three in all, whichever worker holds them
    assert adm.open_sessions == 3
    counts.clear_row(0)  # worker 0 died: its sessions stop counting
    assert adm.open_sessions == 1 and adm.admit(CLIENT, 3)


class RacingCounts(SharedCounts):
    """Worker 1 registers the same address just after worker 0 asked (two processes at the
    same instant, which cannot be timed from a test)."""

    def __init__(self) -> None:
        super().__init__(2, 1)
        self.raced = False

    def count(self, ip: str) -> int:
        n = super().count(ip)
        if not self.raced:
            self.raced = True
            row, self.row = self.row, 1
            self.add(ip, 1)
            self.row = row
        return n


def test_a_simultaneous_registration_elsewhere_never_passes_the_limit() -> None:
    counts = RacingCounts()
    adm = Admission(counts)
    counts.add(CLIENT.ip, 1)  # worker 0 holds one; the limit is 2
    assert not adm.admit(CLIENT, 2)  # asked (1), the other worker took the place meanwhile
    assert counts.count(CLIENT.ip) == 2  # its own registration withdrawn


def test_the_refusal_reply_is_sendmails_conncontrol() -> None:
    assert str(PER_IP_REFUSAL) == "421 4.3.2 Too many open connections."


def test_the_connection_rate_is_per_second_and_per_listener() -> None:
    counts = LocalCounts()
    first, second = ConnectionRate(counts, 0), ConnectionRate(counts, 1)
    assert [first.take(3, 100.2) for _ in range(3)] == [0, 0, 0]
    assert first.take(3, 100.75) == pytest.approx(0.25)  # the rest wait for the next second
    assert first.take(0, 100.75) == 0  # 0: no limit
    assert second.take(3, 100.75) == 0  # another listening socket counts its own
    first.give_back(100.8)  # a place taken when no connection was waiting
    assert first.take(3, 100.9) == 0
    assert first.take(3, 100.9) == pytest.approx(0.1)
    assert first.take(3, 101.0) == 0  # a new second
    first.give_back(100.9)  # a place of a second that has ended: nothing to give back
    assert counts.arrivals(0, 101) == 1


def test_the_connection_rate_counts_every_worker() -> None:
    counts = SharedCounts(2, 2)
    rate = ConnectionRate(counts, 1)
    counts.row = 0
    assert rate.take(3, 50.1) == 0 and rate.take(3, 50.2) == 0
    counts.row = 1
    assert rate.take(3, 50.5) == 0  # the third place; the other worker took two
    assert rate.take(3, 50.6) == pytest.approx(0.4)
    assert ConnectionRate(counts, 0).take(3, 50.6) == 0
    assert rate.take(3, 51.0) == 0  # a new second: the old rows no longer count
    counts.row = 0
    assert rate.take(3, 51.3) == 0  # this worker's row moves to the new second, afresh
    assert counts.arrivals(1, 51) == 2


class RacingArrivals(SharedCounts):
    """Worker 1 takes a place just after worker 0 asked (not timeable from a test)."""

    def __init__(self) -> None:
        super().__init__(2, 1)
        self.raced = False

    def arrivals(self, listener: int, second: int) -> int:
        n = super().arrivals(listener, second)
        if not self.raced:
            self.raced = True
            row, self.row = self.row, 1
            self.arrive(listener, second, 1)
            self.row = row
        return n


def test_a_place_taken_elsewhere_at_the_same_instant_is_given_back() -> None:
    counts = RacingArrivals()
    rate = ConnectionRate(counts, 0)
    counts.arrive(0, 7, 1)  # worker 0 took one of two places
    assert 0 < rate.take(2, 7.5) <= ConnectionRate.RETRY  # the other worker took the last
    assert counts.arrivals(0, 7) == 2  # worker 0's second place given back
    assert rate.take(2, 7.6) == pytest.approx(0.4)
