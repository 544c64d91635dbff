"""Feeding the scheduler's window from the queue on disk: Postfix's queue manager scanning
its deferred queue, Sendmail's queue runs.

The scheduler holds a bounded window (``Scheduler.limit`` messages waiting); the queue may
hold a million. What is not in the window is on disk, and its status file's modification
time says when it is due (``Spool.save_status``; ``HELD_DUE`` when held; a message without a
status file was never attempted and is due now). A *pass* reads the queue folder in
directory order with one ``stat`` per message and no file opened (``Spool.due_times``, in a
thread, ``BATCH`` entries at a time) and offers each unknown message of this process's share
to the window; it pauses while the window is full and goes on when attempts have made room,
so a pass over a deep queue is spread over its drain and memory stays the window's.

When passes run: at start (after the listeners are open: the first pass is what start-up
recovery used to be, and the daemon greets before it ends), ``run_interval`` after the last
one began (mail queued by ``mailgate flush``, or whose process died), and as soon as
something left on disk is due: the earliest due time the last pass skipped, and of every
message the window refused since (``outside``). A pass started by USR1 or a drain takes every
message as due now (Sendmail's ``-q``). Due markers (``due/``, ``mailgate release`` /
``requeue``) are read at start, on the wake-up signal and at every pass: as many as the
window takes are submitted, the rest made due now on disk for the pass that follows.

Loop-only, as the scheduler; the folder is read in a worker thread, one batch at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator

from mailgate import maillog
from mailgate.queue.scheduler import Scheduler
from mailgate.queue.spool import HELD_DUE, Spool

Mine = Callable[[str], bool]


class QueueFeeder:
    BATCH = 1000  # directory entries read per thread call
    RETRY = 60.0  # seconds before a pass that failed is tried again
    SUBMIT_BATCH = 1000  # due markers submitted per loop turn

    def __init__(
        self,
        spool: Spool,
        mine: Mine,
        run_interval: Callable[[], float],
        *,
        where: object,
    ) -> None:
        self.spool = spool
        self.mine = mine
        self.run_interval = run_interval
        self.where = where
        self.scheduler: Scheduler | None = None  # set by ``attach``
        self._pass: Iterator[tuple[str, float]] | None = None
        self._pass_started = 0.0
        self._pass_min = math.inf  # earliest due of what the pass in progress left on disk
        self._next_pass = 0.0  # when the next pass starts (0: at once)
        self._force = False  # the pass in progress takes every message as due now
        self._force_next = False  # the next pass does
        self._seen = 0  # messages of ours the pass in progress read
        self._found = 0  # and gave the window (that it did not know)
        self._left = 0  # and left on disk (due later, or no room)
        self._first = True  # the first pass after start: start-up's recovery
        self._due_marked = True  # due/ is read at start
        self._settled = False  # the last pass found nothing, and nothing was left since
        self.passes = 0  # passes finished
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def attach(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop after the batch being read (a pass is never cut inside a thread call)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._end_pass()

    # -- what the scheduler and the daemon tell it ------------------------------------------------
    def outside(self, qid: str, due: float, *, now: bool) -> None:
        """The window left ``qid`` on disk: a pass takes it on when it is due. Asked for
        now, its status file is made due now (it may say later)."""
        if now:
            self.spool.set_due(qid, due)
        self._later(due)

    def room_freed(self) -> None:
        if self._pass is not None or self._force_next or time.time() >= self._next_pass:
            self._wake.set()

    def due_marked(self) -> None:
        """The wake-up signal: read ``due/``."""
        self._due_marked = True
        self._wake.set()

    def run_all(self) -> None:
        """USR1, a drain: every message in the window due now, and a pass that takes every
        message on disk as due now (from the one in progress on)."""
        if self.scheduler is not None:
            self.scheduler.run_now()
        self._force = self._pass is not None
        self._force_next = True
        self._settled = False
        self._wake.set()

    def request_pass(self) -> None:
        """A pass as soon as the window has room (a drain looks whether the queue is empty)."""
        self._later(time.time())

    @property
    def settled(self) -> bool:
        """No pass under way, the last one found nothing the window did not know, and
        nothing was left on disk since: the window is the whole queue."""
        return self._settled and self._pass is None and not self._force_next

    def _later(self, due: float) -> None:
        self._settled = False
        if self._pass is not None:
            self._pass_min = min(self._pass_min, due)
            self._left += 1  # perhaps behind the pass: it cannot say the queue is settled
        else:
            self._next_pass = min(self._next_pass, due)
        if due <= time.time():
            self._wake.set()

    # -- the loop ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        scheduler = self.scheduler
        assert scheduler is not None
        while not self._stopping:
            if self._due_marked:
                self._due_marked = False
                try:
                    await self._take_due()
                except Exception as exc:  # due/ could not be read: at the next pass, then
                    maillog.queue_pass_failed(self.where, exc)
            now = time.time()
            if (
                self._pass is None
                and scheduler.wants_more
                and (self._force_next or now >= self._next_pass)
            ):
                self._begin_pass(now)
            while self._pass is not None and scheduler.wants_more and not self._stopping:
                try:
                    await self._pull()
                except Exception as exc:  # the folder could not be read: try again later
                    maillog.queue_pass_failed(self.where, exc)
                    self._end_pass()
                    self._next_pass = time.time() + self.RETRY
            self._wake.clear()
            if self._stopping:
                break
            timeout: float | None = None
            if scheduler.wants_more and self._pass is None:
                timeout = max(0.0, self._next_pass - time.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def _begin_pass(self, now: float) -> None:
        self._pass = self.spool.due_times(self.mine)
        self._pass_started = now
        self._pass_min = math.inf
        self._force, self._force_next = self._force_next, False
        self._seen = self._found = self._left = 0
        self._due_marked = True  # each pass reads due/ too (a marker whose signal was lost)

    async def _pull(self) -> None:
        scheduler = self.scheduler
        assert scheduler is not None and self._pass is not None
        # No more than the window takes: what is read and cannot be taken needs another pass.
        want = max(1, min(self.BATCH, scheduler.room))
        # What is due now is attempted soon: its files are read ahead in the thread.
        warm_until = math.inf if self._force else time.time()
        batch, done = await asyncio.to_thread(_read, self._pass, want, self.spool, warm_until)
        now = time.time()
        self._seen += len(batch)
        for qid, due in batch:
            if due >= HELD_DUE:
                continue  # held: its release marks it due
            when = now if self._force or due <= now else due
            # One the window knows is offered too: its file may say earlier (a due marker
            # beyond the window's room, ETRN), and the earlier time wins.
            known = scheduler.knows(qid)
            if scheduler.submit(qid, when, scanned=True):
                self._found += not known
            else:
                self._left += 1
                if when < due:  # forced: due now, though its file says later
                    self.spool.set_due(qid, when)
                self._pass_min = min(self._pass_min, when)
        if done:
            self._finish_pass()

    def _finish_pass(self) -> None:
        self._end_pass()
        self.passes += 1
        self._next_pass = min(self._pass_min, self._pass_started + self.run_interval())
        self._settled = self._found == 0 and self._left == 0
        if self._first:
            self._first = False
            if self._seen:  # the queue: in the window or not (an empty one says nothing)
                maillog.recovered(self._seen, self.where)
        elif self._found:
            maillog.queue_scan(self._found, self.where)
        self._force = False

    def _end_pass(self) -> None:
        if self._pass is not None:
            # Not closed if a thread still runs it (a stop cancelled mid-batch): dropped,
            # its scandir is closed when the generator is collected.
            with contextlib.suppress(ValueError):
                self._pass.close()  # type: ignore[attr-defined]
            self._pass = None

    async def _take_due(self) -> int:
        """Submit, due now, the messages of our share marked in ``due/``: as many as the
        window has room for; the others are made due now on disk for the next pass."""
        scheduler = self.scheduler
        assert scheduler is not None
        qids, spilled = await asyncio.to_thread(self.spool.take_due, self.mine, scheduler.room)
        await self.submit_now(qids)
        if spilled:
            self._later(time.time())
        if qids or spilled:
            maillog.due_taken(len(qids) + spilled, self.where)
        return len(qids) + spilled

    async def submit_now(self, qids: Iterable[str]) -> None:
        """Make ``qids`` due now, a thousand per loop turn (sessions go on meanwhile)."""
        scheduler = self.scheduler
        assert scheduler is not None
        for n, qid in enumerate(qids, 1):
            scheduler.submit(qid)
            if n % self.SUBMIT_BATCH == 0:
                await asyncio.sleep(0)


def _read(
    entries: Iterator[tuple[str, float]], n: int, spool: Spool, warm_until: float
) -> tuple[list[tuple[str, float]], bool]:
    """Up to ``n`` of a pass's entries, and whether the pass is at its end (in a thread).
    Those due by ``warm_until`` (not held) have their files read ahead (``Spool.warm``): a
    queue out of the page cache would otherwise be read one file at a time, on the event
    loop, by each attempt's ``claim``."""
    batch = list(itertools.islice(entries, n))
    for qid, due in batch:
        if due <= warm_until and due < HELD_DUE:
            spool.warm(qid)
    return batch, len(batch) < n
