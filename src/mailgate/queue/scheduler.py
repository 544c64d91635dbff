"""What is due when: a bounded window of (due time, queue id), a bounded number of attempts
at once.

New mail is tried at once; deferred mail comes back at the time its attempt chose (the
back-off is ``delivery.attempt.retry_delay``, capped by ``run_interval``, so every deferred
message is tried at least once per queue run, as with Sendmail's ``-q30m``). The spool stays
the truth: the heap only caches due times, and it is a window, not the queue (Postfix's
active queue): it holds at most ``limit`` messages waiting, and messages due later than now
only while it is less than half full. One it cannot take is left on disk, where its status
file's time says when it is due, and ``outside`` is told (``queue.feeder``, whose passes over
the queue folder take it on again when it is due and there is room); ``wants_more`` says when
to feed it, and ``room_freed`` is called when that becomes true.

A message just committed comes with its ``QueuedMessage`` (``submit(qid, message=…)``),
which holds its open, locked file: the first attempt needs no open, lock or read of the
envelope. If it must wait for a free slot, the scheduler keeps it (at most ``HOLD_MAX``
descriptors); beyond that, or when stopping, it is closed and its attempt claims it from the
spool like any queued message. Loop-only, as everything here.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from mailgate import maillog
from mailgate.queue.spool import QueuedMessage

# One attempt of one message: its qid and, when it comes hot from a commit, the message
# itself (the attempt owns it from then on). Returns the next attempt time, None when done.
Attempt = Callable[[str, QueuedMessage | None], Awaitable[float | None]]


class Outside(Protocol):
    """Who keeps what the window could not take (``queue.feeder.QueueFeeder``)."""

    def outside(self, qid: str, due: float, *, now: bool) -> None:
        """``qid``, due at ``due``, was left on disk; ``now``: it was asked for now (its
        status file's time may say later)."""

    def room_freed(self) -> None:
        """The window wants more (``Scheduler.wants_more``)."""


class Scheduler:
    HOLD_MAX = 1000  # hot messages (open, locked files) kept while they wait for a slot

    def __init__(
        self,
        attempt: Attempt,
        max_concurrent: int,
        *,
        limit: int = 20_000,
        outside: Outside | None = None,
    ) -> None:
        self._attempt = attempt
        self.limit = max(4, limit)
        self._outside = outside
        self._heap: list[tuple[float, int, str]] = []
        # qid → the due time that counts; heap rows with another time are stale.
        self._due: dict[str, float] = {}
        self._held: dict[str, QueuedMessage] = {}  # hot messages waiting in the heap
        self._active: set[str] = set()
        self._again: set[str] = set()  # asked to run again while an attempt was running
        self._seq = itertools.count()
        self._max = max(1, max_concurrent)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, grace: float = 10.0) -> None:
        """Stop starting attempts; give running ones ``grace`` seconds, then cancel them
        (a cancelled attempt leaves its message in the spool, to be retried after restart)."""
        self._stopping = True
        self._wake.set()
        if self._runner:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        while self._held:
            self._held.popitem()[1].close()

    def submit(
        self,
        qid: str,
        when: float | None = None,
        *,
        message: QueuedMessage | None = None,
        scanned: bool = False,
    ) -> bool:
        """Schedule ``qid`` at ``when`` (now if None); an earlier time wins over a later one.
        ``message``: ``qid`` just committed, with its locked file, which the scheduler now
        owns and hands to the attempt. False if the window has no room for it: it is left
        on disk (``message`` closed) and, unless ``scanned`` (the feeder's own pass offers
        it), ``outside`` is told."""
        now = time.time()
        due = now if when is None else when
        if qid in self._active or self._stopping:
            if when is None and not self._stopping:
                self._again.add(qid)
            if message is not None:
                message.close()
            return True
        if when is None and len(self._active) < self._max and qid not in self._due:
            self._start(qid, message)  # new mail, and room: straight to its attempt
            return True
        current = self._due.get(qid)
        if current is None and not self._has_room(due, now):
            if message is not None:
                message.close()
            if not scanned and self._outside is not None:
                self._outside.outside(qid, due, now=when is None)
            return False
        if message is not None:
            if qid in self._held or len(self._held) >= self.HOLD_MAX:
                message.close()
            else:
                self._held[qid] = message
        if current is not None and current <= due:
            return True
        self._due[qid] = due
        heapq.heappush(self._heap, (due, next(self._seq), qid))
        self._wake.set()
        return True

    def _has_room(self, due: float, now: float) -> bool:
        """Due now: while the window is not full; due later: while it is less than half
        full, so that the other half is always there for what is due (a window full of
        messages deferred for an hour would keep what is due now on disk)."""
        waiting = len(self._due)
        return waiting < (self.limit if due <= now else self.limit // 2)

    @property
    def wants_more(self) -> bool:
        """Below three quarters of the window: the feeder may offer what is on disk."""
        return not self._stopping and len(self._due) < self.limit * 3 // 4

    @property
    def room(self) -> int:
        """How many more due messages the window takes."""
        return max(0, self.limit - len(self._due))

    def _freed(self) -> None:
        if self._outside is not None and self.wants_more:
            self._outside.room_freed()

    def run_now(self, qids: list[str] | None = None) -> int:
        """Make every (or the given) message in the window due now; returns how many (the
        feeder's forced pass does the same for the messages on disk)."""
        chosen = list(self._due) if qids is None else qids
        for qid in chosen:
            self.submit(qid)
        return len(chosen)

    def knows(self, qid: str) -> bool:
        """Is ``qid`` waiting here or being attempted now?"""
        return qid in self._due or qid in self._active

    @property
    def queued(self) -> int:
        """Messages in the window: waiting or being attempted (not the queue's length)."""
        return len(self._due) + len(self._active)

    @property
    def active(self) -> int:
        return len(self._active)

    def _start(self, qid: str, message: QueuedMessage | None) -> None:
        self._active.add(qid)
        task = asyncio.get_running_loop().create_task(self._one(qid, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        while not self._stopping:
            now = time.time()
            while self._heap and self._heap[0][0] <= now and len(self._active) < self._max:
                due, _, qid = heapq.heappop(self._heap)
                if self._due.get(qid) != due:
                    continue  # superseded by an earlier submit
                del self._due[qid]
                self._start(qid, self._held.pop(qid, None))
            self._freed()
            self._wake.clear()
            if len(self._active) >= self._max:
                timeout = None  # a finishing attempt wakes us
            else:
                timeout = max(0.0, self._heap[0][0] - time.time()) if self._heap else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _one(self, qid: str, message: QueuedMessage | None) -> None:
        next_time: float | None = None
        try:
            next_time = await self._attempt(qid, message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug or an unexpected I/O error must not lose the message: retry it later.
            maillog.attempt_failed(qid, exc)
            next_time = time.time() + 300
        finally:
            self._active.discard(qid)
            if self._heap:
                self._wake.set()  # room for one that waited
        if qid in self._again:
            self._again.discard(qid)
            self.submit(qid)
        elif next_time is not None:
            self.submit(qid, next_time)
