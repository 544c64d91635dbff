"""Freeing delivered messages' files off the event loop.

On a file system mounted with ``discard`` (this machine's ext4) the unlink that frees a
file's blocks waits for the device within the system call: ~170 µs against ~25 µs for a
rename, and a delivered deferred message frees two files (its queue file and its status
file). The daemon's spool therefore moves them out of ``queue/`` into ``trash/`` by rename —
that rename, not the unlink, is the removal from the queue, made at the moment the unlink
used to be — and this thread unlinks them from there.

What it holds is bounded: at most ``MAX`` names waiting (no descriptor: the loop closed the
file, which frees nothing while it has its ``trash/`` name); when they are that many, the
spool unlinks on the loop as before, so a thread that falls behind slows the drain to the
old pace instead of growing. A stop empties the backlog (``close``); what a crash leaves in
``trash/`` is delivered mail, unlinked at the next start (``Spool.recover_incoming``) or, when
only a worker died and the master forks its replacement, by that worker's cleaner, which
first empties ``trash/`` of what is there when it starts (the live workers' names among them:
their own cleaners then find them gone, which is as good).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading


class Cleaner:
    MAX = 4096  # names waiting for their unlink, at most

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._names: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mailgate-cleaner", daemon=True)
        self._thread.start()

    @property
    def room(self) -> bool:
        """Whether another name may wait (else the caller unlinks it itself)."""
        return self._names.qsize() < self.MAX

    @property
    def pending(self) -> int:
        return self._names.qsize()

    def put(self, name: str) -> None:
        """Unlink ``trash/<name>`` soon."""
        self._names.put(name)

    def _run(self) -> None:
        get, folder = self._names.get, self.folder
        with contextlib.suppress(OSError), os.scandir(folder) as found:
            for entry in found:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
        while (name := get()) is not None:
            with contextlib.suppress(OSError):  # gone already: a start-up sweep, a test
                os.unlink(f"{folder}/{name}")

    def close(self, timeout: float = 30.0) -> None:
        """After the names waiting are unlinked (or ``timeout``: the rest is for the next
        start's sweep)."""
        self._names.put(None)
        self._thread.join(timeout)
