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

from mailgate import maillog
from mailgate.queue.spool import HELD_DUE, CorruptEntry, QueuedMessage, Spool

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


@dataclass(frozen=True)
class Selection:
    """Which messages ``mailq`` lists, as Sendmail's ``-bp`` takes them: the queue (not held)
    or, with ``held`` (``-qQ``), the quarantine only; and, as ``-qI``/``-qR``/``-qS``, those
    whose queue id, a pending recipient or the sender contains one of the strings (any case;
    a string starting with ``!``: does not contain it). Empty: no condition of that kind."""

    held: bool = False
    ids: tuple[str, ...] = ()
    recipients: tuple[str, ...] = ()
    senders: tuple[str, ...] = ()

    @property
    def by_content(self) -> bool:
        """Does choosing need more than the queue id and the hold (so a read of each entry)?"""
        return bool(self.ids or self.recipients or self.senders)

    def takes(self, fields: Mapping[str, Any]) -> bool:
        """Is the message, as `entry_fields` gives it (or another node's JSON), chosen?"""
        if (fields["queue_name"] == "hold") != self.held:
            return False
        if not self.by_content:
            return True
        rcpts = [r["address"] for r in fields["recipients"]]
        # As Sendmail's: the queue id's case counts, the addresses' does not.
        return (
            _matches(self.ids, [fields["queue_id"]], fold=False)
            and _matches(self.recipients, rcpts, fold=True)
            and _matches(self.senders, [fields["sender"]], fold=True)
        )


def _matches(wanted: tuple[str, ...], values: list[str], *, fold: bool) -> bool:
    # Sendmail's QueueLimit lists: each -q option adds one; an entry is taken when any of
    # them (of one kind) holds, a negated one when none of the values contains it.
    if not wanted:
        return True
    if fold:
        values = [v.lower() for v in values]
    for w in wanted:
        negate = w.startswith("!")
        needle = w[1:] if negate else w
        if fold:
            needle = needle.lower()
        found = any(needle in v for v in values)
        if found != negate:
            return True
    return False


ALL = Selection()


def _format_chunk(
    root: str, layout: str, qids: list[str], selection: Selection = ALL
) -> tuple[str, int]:
    """In a worker: the text of ``qids``' entries that ``selection`` takes, and how many."""
    global _spool
    if _spool is None or str(_spool.root) != root:
        _spool = Spool(Path(root))
    text = []
    listed = 0
    fmt = _LAYOUTS.get(layout)
    if qids and not _spool.cached(qids[0]):
        # Read from the disk: ask for the whole chunk's files at once, so that the disk
        # serves many reads together instead of one entry's after another's.
        for qid in qids:
            _spool.warm(qid)
    # postqueue -j lists the hold queue with the rest: json takes no selection.
    for entry in _entries_of(_spool, qids):
        if fmt is not None:
            text.append(fmt(entry))
        else:
            fields = entry_fields(entry)
            if not selection.takes(fields):
                continue
            text.append(_FIELD_LAYOUTS[layout](fields))
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


def waiting_count(spool: Spool) -> int:
    """How many messages are queued and not held: the names, and a ``stat`` of each status
    file (a held message's time is ``HELD_DUE``), no file opened."""
    queue = str(spool.queue)
    count = 0
    for qid in spool.qids():
        try:
            if os.stat(f"{queue}/{qid}.st").st_mtime >= HELD_DUE:
                continue
        except FileNotFoundError:
            pass  # never attempted: not held (a hold writes the status file)
        count += 1
    return count


def listed(
    spool: Spool, layout: str, selection: Selection = ALL, *, workers: int | None = None
) -> Iterator[tuple[str, int]]:
    """The queue formatted in ``layout`` ("mailq", "mailq-v": ``-bp -v``, "count": no text,
    "json": every entry, ``selection`` not asked) of the entries ``selection`` takes: (text,
    entries in it) per chunk, in directory order. ``workers``: processes to format with
    (default: two per core this process may run on, since a queue larger than the page
    cache makes the listing wait for the disk, and more reads at once are answered sooner; 1
    formats here, with no process made). Forked: the caller flushes its buffered output
    first, which the workers would otherwise write again."""
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
            yield _format_chunk(root, layout, chunk, selection)
        return
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: collections.deque[Future[tuple[str, int]]] = collections.deque()
        for chunk in chunks:
            pending.append(pool.submit(_format_chunk, root, layout, chunk, selection))
            if len(pending) >= workers * AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _chunks(names: Iterator[str], n: int) -> Iterator[list[str]]:
    while chunk := list(itertools.islice(names, n)):
        yield chunk


# -- mailq: Sendmail's layout -------------------------------------------------------------------

MAILQ_COLUMNS = "-----Q-ID----- --Size-- -----Q-Time----- ------------Sender/Recipient-----------"
MAILQ_COLUMNS_VERBOSE = (
    "-----Q-ID----- --Size-- -Priority- ---Q-Time--- --------Sender/Recipient--------"
)


def mailq_header(queue_dir: str, count: int, *, verbose: bool = False) -> list[str]:
    """The lines before the entries; ``count``: the running daemon's, or a pass over the queue
    (``cli.queue.cmd_mailq``). An empty queue has the one line (the total follows)."""
    if count == 0:
        return [f"{queue_dir} is empty"]
    columns = MAILQ_COLUMNS_VERBOSE if verbose else MAILQ_COLUMNS
    return [f"\t\t{queue_dir} ({count} request{'s' if count != 1 else ''})", columns]


def mailq_total(listed: int) -> str:
    return f"\t\tTotal requests: {listed}"


def mailq_entry(entry: Entry, *, verbose: bool = False) -> list[str]:
    """One message as ``sendmail -bp`` (``-v``) prints it: `mailq_lines` of its fields."""
    return mailq_lines(entry_fields(entry), verbose=verbose)


def prtstr(text: str, limit: int) -> str:
    """``text`` as Sendmail's ``prtstr`` prints an address: at most ``limit`` characters, a
    backslash doubled, a character outside printable ASCII as a backslash and three octal
    digits (of each byte of its UTF-8), each counting as the characters it prints."""
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text[:limit]  # nearly every address: no character to escape
    out = []
    left = limit
    for ch in text.encode("utf-8", "surrogateescape"):
        if left <= 0:
            break
        left -= 1
        if ch == 0x5C:
            left -= 1
            if left >= 0:
                out.append("\\\\")
        elif 0x20 <= ch < 0x7F:
            out.append(chr(ch))
        else:
            left -= 3
            if left > 0:
                out.append(f"\\{ch:03o}")
    return "".join(out)


def mailq_lines(fields: Mapping[str, Any], *, verbose: bool = False) -> list[str]:
    """One message, given as `entry_fields` (or its JSON from another node), as Sendmail's
    ``print_single_queue`` prints it: id and mark (``*``: locked, being delivered), the size
    of the body, arrival and sender (``-v``: the priority, ``+`` once a delay warning went,
    the arrival without the weekday); the quarantine reason; the body type and the last
    deferral reason; each recipient still pending. ``-v`` also shows a recipient's own last
    error where it differs from the message's, in the line Sendmail has for a recipient's
    status; the short form has none (Sendmail keeps no per-recipient reason)."""
    mark = "*" if fields["queue_name"] == "active" else " "
    size = fields.get("body_size", fields["message_size"])  # a node of an older version
    wide = 100 if verbose else 60
    if verbose:
        pri = fields.get("priority", 0)
        warned = "+" if fields.get("warned") else " "
        when = _minute(int(fields["arrival_time"] // 60))[4:]
        head = f"{size:>8} {pri:>10}{warned}{when} {prtstr('<' + fields['sender'] + '>', 78)}"
    else:
        when = _minute(int(fields["arrival_time"] // 60))
        head = f"{size:>8} {when} {prtstr('<' + fields['sender'] + '>', 39)}"
    lines = [f"{fields['queue_id']:>13}{mark}{head}"]
    if fields.get("hold_reason"):
        lines.append(f"     QUARANTINE: {fields['hold_reason'][:wide]}")
    last = fields.get("last_message") or ""
    body_type = fields.get("body_type") or ""
    if last or body_type:
        reason = f"   ({last[:wide]})" if last else ""
        lines.append(f"    {body_type:>10.10}{reason}")
    for rcpt in fields["recipients"]:
        address = f"<{rcpt['address']}>"
        if not verbose:
            lines.append(f"\t\t\t\t\t {prtstr(address, 38)}")
            continue
        lines.append(f"\t\t\t\t\t\t{prtstr(address, 71)}")
        error = rcpt.get("delay_reason")
        if error and error != last:  # its own error (the message's is shown above)
            lines.append(f"\t\t ({error[:100]})")
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
    # mailq's figures, as Sendmail's: the body's size (its df file), and the priority its
    # last to= line showed (maillog.priority: the first attempt counts no queue run).
    obj["body_size"] = msg.size if msg.body_size is None else msg.body_size
    obj["priority"] = maillog.priority(msg.size, len(env.recipients), max(status.attempts - 1, 0))
    if status.warned:
        obj["warned"] = True
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
    "json": lambda entry: mailq_json(entry) + "\n",
}
_FIELD_LAYOUTS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "mailq": lambda fields: "".join(line + "\n" for line in mailq_lines(fields)),
    "mailq-v": lambda fields: "".join(line + "\n" for line in mailq_lines(fields, verbose=True)),
    "count": lambda fields: "",
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
