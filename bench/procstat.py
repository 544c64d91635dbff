"""CPU time and memory of a process tree, read from /proc (Linux only, stdlib only).

CPU: for every process of the tree, utime + stime + cutime + cstime from /proc/PID/stat. A
child that exits and is reaped moves its time into its parent's cutime/cstime, so the sum over
the live tree is continuous while Postfix's short-lived daemons come and go; the difference of
two snapshots is the CPU the tree used in between.

Memory: a sampler thread sums VmRSS (and, less often, Pss from smaps_rollup, which splits
shared pages between the processes that map them) over the tree and keeps the peaks.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    return raw[raw.rfind(")") + 2 :].split()


def all_parents() -> dict[int, int]:
    """pid → ppid for every live process."""
    out: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is not None:
            out[int(name)] = int(fields[1])
    return out


def tree(root: int) -> list[int]:
    """``root`` and all its descendants that are alive now."""
    parents = all_parents()
    if root not in parents:
        return []
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo and len(out) < 100_000:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """user + system time of ``pids`` including their reaped children, in seconds."""
    ticks = 0
    for pid in pids:
        # A zombie still shows its own time until its parent reaps it (then the parent's
        # cutime/cstime holds it), so counting zombies keeps the sum continuous.
        fields = _stat_fields(pid)
        if fields is None:
            continue
        ticks += sum(int(x) for x in fields[11:15])
    return ticks / CLK_TCK


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """(user, system) time of ``pids`` with their reaped children, in seconds."""
    user = system = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None:
            continue
        user += int(fields[11]) + int(fields[13])
        system += int(fields[12]) + int(fields[14])
    return user / CLK_TCK, system / CLK_TCK


def tree_cpu(root: int) -> float:
    return cpu_seconds(tree(root))


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def status_kib(pid: int, key: str) -> int:
    """A ``VmRSS``/``VmHWM``-style line of /proc/PID/status, in KiB (0 if absent)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, IndexError, ValueError):
        pass
    return 0


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


class Sampler:
    """Samples the RSS (and PSS) sum of a process tree in a thread; keeps the peaks.

    ``roots`` is a callable so that a tree whose root is known only later (Postfix's
    master) can be followed.
    """

    def __init__(
        self, root: int, interval: float = 0.05, pss_every: int = 10, max_seconds: float = 3600.0
    ) -> None:
        self.root = root
        self.interval = interval
        self.pss_every = pss_every
        self.max_seconds = max_seconds
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_procs = 0
        self.samples = 0
        self.series: list[tuple[float, int]] = []  # (time, rss sum)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def sample(self) -> int:
        pids = tree(self.root)
        rss = sum(rss_bytes(p) for p in pids)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_procs = max(self.peak_procs, len(pids))
        if self.samples % self.pss_every == 0:
            self.peak_pss = max(self.peak_pss, sum(pss_bytes(p) for p in pids))
        self.samples += 1
        self.series.append((time.time(), rss))
        return rss

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(Exception):
            self.sample()


def snapshot_all() -> dict[int, tuple[int, str]]:
    """pid → (utime + stime ticks, name) for every live process."""
    out: dict[int, tuple[int, str]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields is not None:
                out[int(name)] = (int(fields[11]) + int(fields[12]), process_name(int(name)))
    return out


def foreign_cpu(
    before: dict[int, tuple[int, str]], after: dict[int, tuple[int, str]], ours: set[int]
) -> tuple[float, list[tuple[float, int, str]]]:
    """CPU seconds used between two snapshots by processes alive in both and not in ``ours``
    (other people's load on the machine); also the top three as (seconds, pid, name)."""
    used = []
    for pid, (ticks, name) in after.items():
        if pid in ours or pid not in before or before[pid][1] != name:
            continue
        d = (ticks - before[pid][0]) / CLK_TCK
        if d > 0:
            used.append((d, pid, name))
    used.sort(reverse=True)
    return sum(u[0] for u in used), used[:3]
