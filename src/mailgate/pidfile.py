"""The pid file, and whether the daemon it names is alive.

Alive means "holds the file's lock", as Postfix's master does with its ``master.pid``: a pid
alone can be reused (the default pid file is in the spool, which survives a reboot, and then
the number may be any process's), a lock dies with its holder, ``kill -9`` included. The daemon
claims the file before it binds or touches the spool (a second daemon on the same spool is
refused, with the pid of the first), and writes its pid after it listens, atomically: a new
file, locked, renamed over the claimed one. A reader that finds the lock free has found a stale
file, which the next daemon takes over.

Readers (``mailgate stop`` / ``reload`` / ``status``) take a shared lock for an instant to
test it; a daemon claiming at that instant tries again for a moment before it gives up.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

CLAIM_TRIES = 20  # × CLAIM_PAUSE: how long a claim waits out a reader's test of the lock
CLAIM_PAUSE = 0.05


class AlreadyRunning(Exception):
    """Another daemon holds the pid file."""

    def __init__(self, path: Path, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        who = f"pid {pid}" if pid is not None else "a daemon that is still starting"
        super().__init__(f"already running ({who}, pid file {path})")


def _pid_in(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Is ``fd`` still the file at ``path`` (a daemon may have renamed a new one over it)?"""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


class PidFile:
    """The daemon's side: claim, write, release."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None  # the locked file at ``path``
        self.stale_pid: int | None = None  # the pid a taken-over stale file named

    def claim(self) -> None:
        """Lock the file at ``path`` (created empty if there is none), or raise AlreadyRunning.
        A stale file is taken over and emptied: until `write`, readers find a daemon that is
        starting, never the dead one's pid."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        holder: int | None = None
        for _ in range(CLAIM_TRIES):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            if not _try_lock(fd, fcntl.LOCK_EX):
                holder = _pid_in(fd)
                os.close(fd)
                time.sleep(CLAIM_PAUSE)
                continue
            if not _same_file(fd, self.path):
                os.close(fd)  # replaced or removed meanwhile: look again
                continue
            self.stale_pid = _pid_in(fd)
            os.ftruncate(fd, 0)
            self.fd = fd
            return
        raise AlreadyRunning(self.path, holder)

    def write(self, pid: int) -> None:
        """Put ``pid`` in place in one rename; the new file is locked before it gets the name."""
        tmp = self.path.with_name(f".{self.path.name}.{pid}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a new file: nobody else can hold it
            os.write(fd, f"{pid}\n".encode())
            os.fsync(fd)
            os.rename(tmp, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if self.fd is not None:
            os.close(self.fd)  # the claimed file, no longer at ``path``
        self.fd = fd

    def release(self) -> None:
        """At exit: remove the file if it is still ours, and drop the lock."""
        if self.fd is None:
            return
        if _same_file(self.fd, self.path):
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self.fd)
        self.fd = None

    def forget(self) -> None:
        """In a forked worker: close the inherited descriptor, leaving file and lock to the
        master (a worker still dying after a ``kill -9`` of the master must not hold it)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass(frozen=True)
class Holder:
    """What a reader finds at a pid file."""

    exists: bool
    running: bool  # its lock is held
    pid: int | None  # the pid written in it (None: no file, or a daemon still starting)


def inspect(path: Path) -> Holder:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return Holder(exists=False, running=False, pid=None)
    try:
        pid = _pid_in(fd)
        running = not _try_lock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)  # drops a lock taken just now
    return Holder(exists=True, running=running, pid=pid)


def wait_released(path: Path, timeout: float, step: float = 0.1) -> bool:
    """Wait until no daemon holds the pid file (it has exited); False after ``timeout``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        deadline = time.monotonic() + timeout
        while not _try_lock(fd, fcntl.LOCK_SH):
            if time.monotonic() >= deadline:
                return False
            time.sleep(step)
        return True
    finally:
        os.close(fd)
