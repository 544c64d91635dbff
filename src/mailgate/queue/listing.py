"""Reading the queue for people: ``mailgate mailq`` in Sendmail's ``-bp`` layout or as one JSON
object per line (Postfix's ``postqueue -j``), and ``mailgate qshape`` (Postfix's qshape).

Everything streams: the queue folder is read as it goes (``Spool.qids``, an ``os.scandir``)
and each entry is formatted, or counted, a chunk of a few hundred at a time (``listed``: on
every core), so memory does not grow with the queue and the first line of a listing of a
million messages comes at once.
Nothing here takes a lock or moves a file: an entry is read as it is at that moment (its status
file is replaced whole, never torn), an unreadable one is skipped and left for the attempt to
quarantine, and one that is delivered while the listing runs is simply not listed.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import math
import multiprocessing
import os
import re
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailgate.queue.spool import CorruptEntry, QueuedMessage, Spool

# -- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One queued message as a listing sees it."""

    message: QueuedMessage  # read without its lock: holds no descriptor
    locked: bool  # a runner holds its lock now (being delivered, or waiting for a slot)

    @property
    def queue_name(self) -> str:
        """Postfix's queue names, for the JSON listing: ``hold``, ``active`` (a runner has it),
        ``deferred`` (attempted before), ``incoming`` (not attempted yet)."""
        status = self.message.status
        if status.held:
            return "hold"
        if self.locked:
            return "active"
        return "deferred" if status.attempts else "incoming"


def entries(spool: Spool, *, locks: bool = True) -> Generator[Entry]:
    """The queue's messages in directory order (not sorted: sorting needs them all first).
    ``locks``: look whether each is locked (a non-blocking flock on the descriptor the entry
    is read through, ``Spool.peek``)."""
    return _entries_of(spool, spool.qids(), locks=locks)


# -- listing in parallel ------------------------------------------------------------------------
# The listing is CPU-bound (two small files read and two JSON parses per message: ~50 µs),
# so ``mailq`` spreads it over the machine's cores: the queue folder is read here, in
# directory order, in chunks of ``CHUNK`` names; worker processes (forked: nothing to import
# again) read and format each chunk, and the chunks are written out in the order they were
# read. At most ``AHEAD`` chunks per worker are under way: memory stays a few chunks.
CHUNK = 256
AHEAD = 3

Format = Callable[[Entry], str]
_spool: Spool | None = None  # a worker's, made at its first chunk


def _format_chunk(root: str, layout: str, qids: list[str]) -> tuple[str, int]:
    """In a worker: the text of ``qids``' entries, and how many were listed."""
    global _spool
    if _spool is None or str(_spool.root) != root:
        _spool = Spool(Path(root))
    text = []
    listed = 0
    fmt = _LAYOUTS[layout]
    if qids and not _spool.cached(qids[0]):
        # Read from the disk: ask for the whole chunk's files at once, so that the disk
        # serves many reads together instead of one entry's after another's.
        for qid in qids:
            _spool.warm(qid)
    for entry in _entries_of(_spool, qids):
        text.append(fmt(entry))
        listed += 1
    return "".join(text), listed


def _entries_of(spool: Spool, qids: Iterable[str], *, locks: bool = True) -> Generator[Entry]:
    for qid in qids:
        try:
            peeked = spool.peek(qid, probe=locks)
        except CorruptEntry:
            continue
        if peeked is not None:
            yield Entry(*peeked)


def listed(spool: Spool, layout: str, *, workers: int | None = None) -> Iterator[tuple[str, int]]:
    """The queue formatted in ``layout`` ("mailq", "json"): (text, entries in it) per chunk,
    in directory order. ``workers``: processes to format with (default: two per core this
    process may run on, since a queue larger than the page cache makes the listing wait for
    the disk, and more reads at once are answered sooner; 1 formats here, with no process
    made). Forked: the caller flushes its buffered output first, which the workers would
    otherwise write again."""
    if workers is None:
        workers = 2 * len(os.sched_getaffinity(0))
    chunks = _chunks(spool.qids(), CHUNK)
    root = str(spool.root)
    first = next(chunks, None)
    if first is None:
        return  # an empty queue: no process made
    chunks = itertools.chain([first], chunks)
    if workers <= 1:
        for chunk in chunks:
            yield _format_chunk(root, layout, chunk)
        return
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: collections.deque[Future[tuple[str, int]]] = collections.deque()
        for chunk in chunks:
            pending.append(pool.submit(_format_chunk, root, layout, chunk))
            if len(pending) >= workers * AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _chunks(names: Iterator[str], n: int) -> Iterator[list[str]]:
    while chunk := list(itertools.islice(names, n)):
        yield chunk


# -- mailq: Sendmail's layout -------------------------------------------------------------------

MAILQ_COLUMNS = "-----Q-ID----- --Size-- -----Q-Time----- ------------Sender/Recipient-----------"


def mailq_header(queue_dir: str, count: int) -> list[str]:
    """The lines before the entries; ``count``: the running daemon's, or a pass over the names
    only (``cli.queue.cmd_mailq``)."""
    if count == 0:
        return [f"{queue_dir} is empty"]
    return [f"\t\t{queue_dir} ({count} request{'s' if count != 1 else ''})", MAILQ_COLUMNS]


def mailq_total(listed: int) -> str:
    return f"\t\tTotal requests: {listed}"


def mailq_entry(entry: Entry) -> list[str]:
    """One message as ``sendmail -bp`` prints it: `mailq_lines` of its `entry_fields`."""
    return mailq_lines(entry_fields(entry))


def mailq_lines(fields: Mapping[str, Any]) -> list[str]:
    """One message, given as `entry_fields` (or its JSON from another node), as ``sendmail
    -bp`` prints it (``print_single_queue``): id and mark, size, arrival, sender; the
    quarantine reason; the body type and the last deferral reason; each recipient still
    pending, with its own last error when it differs from the message's.

    The mark after the id is Sendmail's ``*`` for a locked entry, or Postfix's ``!`` for one on
    hold (a held entry shows ``!`` even while a tool has it locked for a moment)."""
    queue_name = fields["queue_name"]
    mark = "!" if queue_name == "hold" else "*" if queue_name == "active" else " "
    arrival = _minute(int(fields["arrival_time"] // 60))
    sender = f"<{fields['sender']}>"
    lines = [f"{fields['queue_id']:>13}{mark}{fields['message_size']:>8} {arrival} {sender}"]
    if fields.get("hold_reason"):
        lines.append(f"     QUARANTINE: {fields['hold_reason'][:60]}")
    last = fields.get("last_message") or ""
    body_type = fields.get("body_type") or ""
    if last or body_type:
        reason = f"   ({last[:60]})" if last else ""
        lines.append(f"    {body_type:>10.10}{reason}")
    for rcpt in fields["recipients"]:
        lines.append(f"\t\t\t\t\t <{rcpt['address']}>")
        error = rcpt.get("delay_reason")
        if error and error != last:  # its own error (the message's is shown above)
            lines.append(f"\t\t\t\t\t   ({error[:60]})")
    return lines


@functools.lru_cache(maxsize=4096)
def _minute(minute: int) -> str:
    """ctime's first 16 characters, as Sendmail prints them (the day of month space-padded),
    of a time given in minutes: a queue's messages arrived in far fewer minutes than there
    are messages, and strftime is a tenth of an entry's formatting."""
    return time.strftime("%a %b %e %H:%M", time.localtime(minute * 60))


def entry_fields(entry: Entry) -> dict[str, Any]:
    """One message as `mailq_json` writes it: ``postqueue -j``'s fields (so tools written
    for it read it) and ours: ``hold_reason`` (held only), ``attempts``, ``next_attempt``,
    and what the ``-bp`` layout shows besides, ``last_message`` (the message's last
    deferral, when there is one) and ``body_type`` (``8BITMIME`` only)."""
    msg = entry.message
    env, status = msg.envelope, msg.status
    recipients = []
    for rcpt in status.pending(env.recipients):
        item: dict[str, str] = {"address": rcpt.address}
        reason = status.last_error(rcpt.address) or status.last_message
        if reason:
            item["delay_reason"] = reason
        recipients.append(item)
    obj: dict[str, Any] = {
        "queue_name": entry.queue_name,
        "queue_id": env.qid,
        "arrival_time": int(env.arrival),
        "message_size": msg.size,
        "forced_expire": False,
        "sender": env.sender,
        "recipients": recipients,
    }
    if status.hold is not None:
        obj["hold_reason"] = status.hold
    obj["attempts"] = status.attempts
    obj["next_attempt"] = None if status.next_attempt is None else int(status.next_attempt)
    if status.last_message:
        obj["last_message"] = status.last_message
    if env.body_8bit:
        obj["body_type"] = "8BITMIME"
    return obj


def mailq_json(entry: Entry) -> str:
    """One message as one line of JSON (`entry_fields`), ASCII only: an address kept as raw
    bytes (surrogate escapes) is still valid JSON."""
    return json.dumps(entry_fields(entry), separators=(",", ":"))


_LAYOUTS: dict[str, Format] = {
    "mailq": lambda entry: "".join(line + "\n" for line in mailq_entry(entry)),
    "json": lambda entry: mailq_json(entry) + "\n",
}


# -- qshape -------------------------------------------------------------------------------------


def shape_domain(address: str) -> str:
    """The domain qshape files an address under: lower case, after the last ``@``, doubled dots
    made single, one leading and one trailing dot dropped; the null sender is MAILER-DAEMON."""
    address = address.lower()
    if address == "":
        return "MAILER-DAEMON"
    domain = address.rpartition("@")[2].replace("..", ".")
    edges = _EDGE_DOTS.fullmatch(domain)
    return edges.group(1) if edges else domain


_EDGE_DOTS = re.compile(r"\.?(.+?)\.?", re.DOTALL)  # qshape's s/\.?(.+?)\.?$/$1/


class Shape:
    """Counts by domain × age, as Postfix's qshape: bucket 1 holds ages below ``minutes``,
    each next one ages below twice the previous limit, the last one everything older.
    Only counts are kept (one row of ``buckets + 1`` integers per domain)."""

    TOTAL = "TOTAL"

    def __init__(self, *, buckets: int = 10, minutes: float = 5) -> None:
        self.buckets = buckets
        self.minutes = minutes
        self.rows: dict[str, list[int]] = {self.TOTAL: [0] * (buckets + 1)}

    def bucket(self, age: float) -> int:
        """1 … ``buckets`` for an age in seconds (qshape's ``bucket``)."""
        m = age / (60 * self.minutes)
        if m < 1:
            return 1
        return min(2 + int(math.log2(m)), self.buckets)

    def add(self, domains: Iterable[str], age: float) -> None:
        """One message of ``age`` seconds: each of ``domains`` (one per recipient, or the
        sender's) counts once."""
        b = self.bucket(age)
        total = self.rows[self.TOTAL]
        for domain in domains:
            total[0] += 1
            total[b] += 1
            row = self.rows.get(domain)
            if row is None:
                row = self.rows[domain] = [0] * (self.buckets + 1)
            row[0] += 1
            row[b] += 1

    def add_rows(self, rows: Mapping[str, Sequence[int]]) -> None:
        """Another shape's rows (another node's, of the same buckets), added to these."""
        for domain, counts in rows.items():
            if len(counts) != self.buckets + 1:
                raise ValueError(f"{domain}: {len(counts)} counts, not {self.buckets + 1}")
            row = self.rows.setdefault(domain, [0] * (self.buckets + 1))
            for i, n in enumerate(counts):
                row[i] += int(n)

    def labels(self) -> list[str]:
        """``T``, then each bucket's upper limit in minutes, the last one ``N+``."""
        heads = ["T"]
        limit: float = 0
        for i in range(1, self.buckets + 1):
            if i < self.buckets:
                limit = limit * 2 if limit else self.minutes
                heads.append(f"{limit:g}")
            else:
                heads.append(f"{limit:g}+")
        return heads

    def lines(self, *, top: int | None = None, width: int = 80) -> list[str]:
        """The table: a heading row, TOTAL, then the domains by count (largest first; the
        shorter name first on a tie, as qshape; then by name); ``top``: only that many
        domains. Right-justified to ``width`` columns as qshape does: each column one wider
        than its widest figure (at least 3), the domain names in what is left (at least 18),
        a longer name cut to its end behind a ``+``."""
        heads = self.labels()
        total = self.rows[self.TOTAL]
        widths = []
        for i, head in enumerate(heads):
            w = max(len(str(total[i])), len(head))
            widths.append(w + 1 if w > 2 else 3)
        name_width = max(width - sum(widths), 18)

        def row(name: str, cells: list[str]) -> str:
            if len(name) > name_width:
                name = "+" + name[len(name) - name_width + 1 :]
            return f"{name:>{name_width}}" + "".join(
                f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)
            )

        domains = sorted(
            (d for d in self.rows if d != self.TOTAL),
            key=lambda d: (-self.rows[d][0], len(d), d),
        )
        if top is not None:
            domains = domains[:top]
        out = [row("", heads), row(self.TOTAL, [str(n) for n in total])]
        out += [row(d, [str(n) for n in self.rows[d]]) for d in domains]
        return out


def shape(
    spool: Spool,
    *,
    by_sender: bool = False,
    held: bool = False,
    buckets: int = 10,
    minutes: float = 5,
    now: float | None = None,
) -> Shape:
    """The queue's shape: messages waiting for delivery (or, with ``held``, those on hold) by
    recipient domain (each pending recipient counts) or sender domain (each message counts
    once), by age since arrival."""
    clock = time.time() if now is None else now
    counts = Shape(buckets=buckets, minutes=minutes)
    for entry in entries(spool, locks=False):
        msg = entry.message
        if msg.status.held != held:
            continue
        env = msg.envelope
        if by_sender:
            domains = [shape_domain(env.sender)]
        else:
            domains = [shape_domain(r.address) for r in msg.status.pending(env.recipients)]
        counts.add(domains, clock - env.arrival)
    return counts
