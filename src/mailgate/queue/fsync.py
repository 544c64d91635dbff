"""fsync without blocking the event loop, and without a Python thread per flush.

The spool's one fsync per message is the only disk wait on the receiving path. Handing it to
a thread pool costs far more CPU than the flush itself: each hand-off wakes a thread, which
must then take the GIL from the event loop and give it back (measured here: about 70 futex
calls and a dozen context switches per message, a third of the gateway's CPU). Linux AIO
(``IOCB_CMD_FSYNC``, kernel 4.18+) runs the flush in the kernel's own workqueue and reports
its completion on an eventfd that the event loop already polls, so a flush costs two
system calls and no thread at all; flushes submitted in the same loop turn go in one
``io_submit`` and concurrent flushes still share journal commits. caio provides the system
calls. Where Linux AIO is missing (another OS, a kernel built without it, ``aio-max-nr``
exhausted) a thread pool does the same job.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol


@functools.cache
def linux_aio() -> Any | None:
    """caio's Linux AIO module, imported when a daemon first asks (the queue tools never
    flush through it, and the import is a sixth of their start: 45 ms); None when it cannot
    be had (not Linux, or a kernel without AIO: caio refuses the module)."""
    try:
        from caio import linux_aio as aio
    except ImportError:
        return None
    return aio


# A completion's ``res`` arrives as an unsigned 64-bit value; a negative errno wraps.
_WRAP = 1 << 64


class Fsync(Protocol):
    name: str

    def fsync(self, fd: int) -> Awaitable[None]: ...

    def close(self) -> None: ...


class ThreadFsync:
    """``os.fsync`` in a thread pool: concurrent flushes overlap, the loop never waits."""

    name = "threads"

    def __init__(self, threads: int = 32) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fsync")

    def fsync(self, fd: int) -> Awaitable[None]:
        return asyncio.get_running_loop().run_in_executor(self._pool, os.fsync, fd)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class KernelFsync:
    """``IOCB_CMD_FSYNC`` through Linux AIO, completions read on the event loop.

    Bound to the event loop it is created on (an AIO context does not survive ``fork``, so
    each worker process makes its own).
    """

    name = "linux-aio"
    MAX_IN_FLIGHT = 512

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        aio = linux_aio()
        assert aio is not None
        self._aio = aio
        self._loop = loop
        self._ctx = aio.Context(self.MAX_IN_FLIGHT)
        self._in_flight: dict[int, tuple[Any, asyncio.Future[None]]] = {}
        self._waiting: list[tuple[Any, asyncio.Future[None], int]] = []  # next io_submit
        self._fallback: ThreadFsync | None = None
        self._submit_scheduled = False
        loop.add_reader(self._ctx.fileno, self._on_ready)

    def fsync(self, fd: int) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self._loop.create_future()
        op = self._aio.Operation.fsync(fd)
        op.set_callback(functools.partial(self._done, id(op)))
        self._waiting.append((op, fut, fd))
        self._schedule_submit()
        return fut

    def _schedule_submit(self) -> None:
        # Everything asked for in this loop turn goes to the kernel in one io_submit.
        if not self._submit_scheduled:
            self._submit_scheduled = True
            self._loop.call_soon(self._submit)

    def _submit(self) -> None:
        self._submit_scheduled = False
        room = self.MAX_IN_FLIGHT - len(self._in_flight)
        batch, self._waiting = self._waiting[:room], self._waiting[room:]
        if not batch:
            return
        try:
            accepted = self._ctx.submit(*(op for op, _, _ in batch))
        except Exception:  # caio says EINVAL (a file system without AIO fsync) as ValueError
            accepted = 0
        for op, fut, _fd in batch[:accepted]:
            self._in_flight[id(op)] = (op, fut)
        for _op, fut, fd in batch[accepted:]:
            # Refused by the kernel: the same flush, the ordinary way.
            self._fallback_fsync(fd, fut)

    def _fallback_fsync(self, fd: int, fut: asyncio.Future[None]) -> None:
        if self._fallback is None:
            self._fallback = ThreadFsync(threads=4)

        def copy(done: asyncio.Future[None]) -> None:
            if fut.done():
                return
            if done.exception() is not None:
                fut.set_exception(done.exception())  # type: ignore[arg-type]
            else:
                fut.set_result(None)

        asyncio.ensure_future(self._fallback.fsync(fd)).add_done_callback(copy)

    def _done(self, key: int, res: int) -> None:
        _op, fut = self._in_flight.pop(key)
        if fut.done():
            return
        if res >= _WRAP // 2:
            errno = _WRAP - res
            fut.set_exception(OSError(errno, os.strerror(errno)))
        else:
            fut.set_result(None)

    def _on_ready(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._ctx.poll()  # reset the eventfd
        while self._ctx.process_events():
            pass
        if self._waiting:  # more than MAX_IN_FLIGHT were asked for: room again now
            self._schedule_submit()

    def close(self) -> None:
        # In-flight flushes finish in the kernel; nobody is left to wait for them. The loop
        # may be closed already (a Spool outliving one asyncio.run).
        with contextlib.suppress(RuntimeError):
            self._loop.remove_reader(self._ctx.fileno)
        if self._fallback is not None:
            self._fallback.close()


class InlineFsync:
    """``os.fsync`` on the loop's own thread, for a commit that no other client waits behind
    (the process's only session: ``SessionHost.quiet``). The hand-off to the kernel's
    workqueue costs its own wake-ups: a 1 KiB spool file's fsync took 0.15 ms here called
    directly and 0.28 ms through Linux AIO (bench/RESULTS.md, "Session 10"), and a client
    alone waits for the whole of it. Blocking is only worth it while the disk is that fast:
    an fsync slower than ``SLOW`` sends the next ``BACKOFF`` commits the other way."""

    SLOW = 0.002
    BACKOFF = 256

    def __init__(self) -> None:
        self._skip = 0

    def usable(self) -> bool:
        if self._skip:
            self._skip -= 1
            return False
        return True

    def fsync(self, fd: int) -> None:
        start = time.monotonic()
        os.fsync(fd)
        if time.monotonic() - start > self.SLOW:
            self._skip = self.BACKOFF


def for_loop(loop: asyncio.AbstractEventLoop, prefer: str = "auto") -> Fsync:
    """The best fsync available on this loop: Linux AIO unless ``prefer`` is "threads" or
    the kernel refuses an AIO context."""
    if prefer != "threads" and linux_aio() is not None:
        try:
            return KernelFsync(loop)
        except (OSError, SystemError):
            pass
    return ThreadFsync()
