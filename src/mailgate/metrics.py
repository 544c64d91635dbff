"""The daemon's counts: what every worker adds to, read as one number for the whole daemon.

Every process has a *row* of 64-bit words in one shared memory mapping, which the master makes
before it forks (one row per worker; a single process makes its own one-row table). A process
writes only its own row, with plain stores: counting is a ``memoryview`` item increment (about
60 ns), no lock, no system call. Whoever answers a scrape (``monitor.py``) adds the rows up.
A worker that dies leaves its counts in its row and its successor counts on in the same row,
so the daemon's counters never go backwards; only the words that describe a running process
(its pid, whether it is listening) are cleared by the master.

A row holds, after those two words, the *families*: a counter is one word per label value,
a histogram one word per bucket (not cumulative) and its sum in microseconds. Which words a
family has is fixed here, at import, so label values are a closed set, except for names:
each row has a small table of next-hop names (a failed delivery's; ``HOP_ENTRIES``, past it
failures count under ``next_hop="other"``) and one of filter names (``[[milter]]``, entered
when the config is loaded; ``MILTER_ENTRIES``), written by its worker, read by the scrape.

The same row is what the ``statistics:`` maillog line reports (``Gateway.log_statistics``), so
the log line and the metrics count the same events. See README "Metrics" for what each means.
"""

from __future__ import annotations

import bisect
import mmap
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product
from typing import Literal, get_args

Kind = Literal["counter", "histogram"]

PID = 0  # the row's process id; 0: no process (the worker died or has not started)
LISTENING = 1  # 1 while every listener of the row's process accepts connections
# Messages the row's process put into queue/ and took out of it (its Spool's ``moves``):
# not exposed as such; what makes the queue's count cheap (``monitor.QueueCount``).
QUEUE_ENTERED = 2
QUEUE_LEFT = 3
_FIRST = 4  # the first word of the families


@dataclass(frozen=True)
class Family:
    """One metric as rows store it: ``size`` words from ``base``."""

    name: str  # the exposition name, without the counter's ``_total``
    kind: Kind
    help: str
    labels: tuple[str, ...]
    values: tuple[tuple[str, ...], ...]  # every label value combination, in word order
    base: int
    buckets: tuple[float, ...] = ()  # a histogram's upper bounds (+Inf is the last word)

    @property
    def size(self) -> int:
        if self.kind == "histogram":
            return len(self.buckets) + 2  # each bucket, +Inf, the sum
        return len(self.values)

    def slot(self, *values: str) -> int:
        """The word of one label value combination (a ValueError for an unknown one)."""
        return self.base + self.values.index(values)


FAMILIES: list[Family] = []


def _family(
    name: str,
    kind: Kind,
    help: str,
    labels: tuple[str, ...] = (),
    values: tuple[tuple[str, ...], ...] = ((),),
    buckets: tuple[float, ...] = (),
) -> Family:
    base = FAMILIES[-1].base + FAMILIES[-1].size if FAMILIES else _FIRST
    family = Family(name, kind, help, labels, values, base, buckets)
    FAMILIES.append(family)
    return family


def _each(*values: str) -> tuple[tuple[str, ...], ...]:
    return tuple((v,) for v in values)


# How the connect stage ended, one per accepted connection.
CONNECTION_OUTCOMES = (
    "greeted",
    "access_refused",
    "early_talker",
    "per_ip_limit",
    "stopping",  # the daemon began to stop during the connect stage: its 421, no greeting
)
# Why mail was refused: one per refusing reply (a connection refused at the connect stage
# counts once, not again for each command it then sends).
RejectReason = Literal[
    "relay",  # RCPT: relaying denied
    "access",  # access Connect: / From: / To: REJECT or ERROR
    "sender_domain",  # MAIL: the sender's domain does not resolve
    "sender",  # MAIL: unqualified sender
    "recipient",  # RCPT: unknown local user, error: route
    "early_talker",  # spoke before the greeting
    "throttle",  # too many connections from the client's address (421)
    "size",  # SIZE= or the content over max_message_size
    "storage",  # 452 4.3.1: the spool is low on space or failed
    "protocol",  # bare CR/LF in a command, content sent before the 354
    "content",  # too many hops, header section too large, bare CR/LF or NUL in content
    "milter",  # a [[milter]] filter refused, or its default action after it failed
]
REJECT_REASONS: tuple[str, ...] = get_args(RejectReason)
SESSION_EVENTS = (
    "rcpt_throttled",  # BadRcptThrottle started delaying the session's RCPTs
    "bad_rcpt_disconnect",  # max_bad_rcpts: 421 and close
    "bare_newline",  # a command line with a bare CR or LF: 521 and close
    "improper_pipelining",  # content before the 354: 554 and close
    "timeout",  # no command or content within the timeout: 421 and close
)
# Sendmail's mailer names (``delivery.mailers.MAILERS``; a test keeps the two alike).
MAILERS = (
    *("smtp", "esmtp", "smtp8", "dsmtp", "relay"),
    *("uucp", "uucp-old", "suucp", "uucp-new", "uucp-dom", "uucp-uudom"),
    *("local", "*file*", "prog", "error"),
)
DELIVERY_STATUSES = ("delivered", "deferred", "bounced")
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    1800.0,
    3600.0,
    14400.0,
    86400.0,
)

CONNECTIONS = _family(
    "mailgate_connections",
    "counter",
    "Connections accepted, by how the connect stage ended",
    ("outcome",),
    _each(*CONNECTION_OUTCOMES),
)
MESSAGES_RECEIVED = _family(
    "mailgate_messages_received", "counter", "Messages acknowledged with 250 and queued"
).base
MESSAGES_DISCARDED = _family(
    "mailgate_messages_discarded",
    "counter",
    "Messages acknowledged and dropped (access DISCARD, or a filter's DISCARD)",
).base
REJECTIONS = _family(
    "mailgate_rejections",
    "counter",
    "Refusing replies to clients, by reason",
    ("reason",),
    _each(*REJECT_REASONS),
)
EVENTS = _family(
    "mailgate_session_events",
    "counter",
    "Sessions throttled or closed for misbehaving, by event",
    ("event",),
    _each(*SESSION_EVENTS),
)
STRESS_EPISODES = _family(
    "mailgate_stress_episodes", "counter", "Times stress mode started (Postfix's)"
).base
DELIVERIES = _family(
    "mailgate_deliveries",
    "counter",
    "Delivery results (recipients of maillog to= lines), by mailer and status",
    ("mailer", "status"),
    tuple(product(MAILERS, DELIVERY_STATUSES)),
)
LATENCY = _family(
    "mailgate_delivery_latency_seconds",
    "histogram",
    "From the message's arrival (maillog delay=) to its delivery, per delivered recipient",
    buckets=LATENCY_BUCKETS,
)
TLS = _family(
    "mailgate_tls",
    "counter",
    "STARTTLS handshakes, as server (clients) and as client (next hops), by outcome",
    ("side", "outcome"),
    tuple(product(("server", "client"), ("ok", "failed"))),
)

ROW_WORDS = FAMILIES[-1].base + FAMILIES[-1].size


@dataclass(frozen=True)
class NameTable:
    """Per row, after the families: ``entries`` entries, each a name (a length byte and up
    to ``name_max`` bytes of UTF-8, written by the row's process, the length last so that a
    reader sees a whole name or none) and one word per ``counts`` label value."""

    first: int  # the word of entry 0 in a row
    entries: int
    name_max: int  # 1 + name_max is a multiple of 8
    counts: tuple[tuple[str, ...], ...]

    @property
    def name_words(self) -> int:
        return (1 + self.name_max) // 8

    @property
    def entry_words(self) -> int:
        return self.name_words + len(self.counts)

    @property
    def end(self) -> int:
        return self.first + self.entries * self.entry_words

    def offset(self, *values: str) -> int:
        """Where a label value combination's word is, from the entry's first count word."""
        return self.counts.index(values)


# The next-hop table: a failed delivery's next hop, a word per failure status.
HOP_STATUSES = ("deferred", "bounced")
HOP_ENTRIES = 256
HOP_NAME_MAX = 119
HOPS = NameTable(ROW_WORDS, HOP_ENTRIES, HOP_NAME_MAX, _each(*HOP_STATUSES))
OTHER = "other"  # the name past a full name table
HOP_OTHER = OTHER

# The filter table: a [[milter]]'s name, a word per (stage, verdict) that can happen and per
# failure reason. Names come from the config; the daemon enters them when it loads it, in
# the config's order (a reload appends new ones), so every filter's series are there from the
# start. Past MILTER_ENTRIES - 1 names (a long life of renamed filters), ``other``.
MILTER_STAGES = (
    *("negotiate", "connect", "helo", "mail", "rcpt", "data"),
    *("unknown", "header", "eoh", "body", "eom"),
)
MILTER_VERDICTS = (
    *("continue", "accept", "reject", "tempfail", "replycode"),
    *("discard", "skip", "quarantine", "shutdown", "failed"),
)
# Which verdict a stage can have (milter/session.py checks the same): negotiation only fails;
# DISCARD not for the connection's events, SKIP only for body chunks, quarantine (a filter's
# ``q`` before its verdict) only at the end of the message.
MILTER_OUTCOMES: tuple[tuple[str, str], ...] = (
    ("negotiate", "failed"),
    *(
        (stage, verdict)
        for stage in MILTER_STAGES[1:]
        for verdict in MILTER_VERDICTS
        if not (verdict == "discard" and stage in ("connect", "helo"))
        and (verdict != "skip" or stage == "body")
        and (verdict != "quarantine" or stage == "eom")
    ),
)
MILTER_FAILURE_REASONS = ("connect", "timeout", "closed", "protocol", "io")  # client.py's
MILTER_ENTRIES = 32
MILTERS = NameTable(
    HOPS.end,
    MILTER_ENTRIES,
    63,
    (
        *(("verdict", *pair) for pair in MILTER_OUTCOMES),
        *(("failure", reason) for reason in MILTER_FAILURE_REASONS),
    ),
)
_ROW_BYTES = MILTERS.end * 8

_STATUS_OF_OUTCOME = {"sent": "delivered", "temp": "deferred", "perm": "bounced"}
_DELIVERY_SLOTS = {
    (mailer, outcome): DELIVERIES.slot(mailer, status)
    for mailer in MAILERS
    for outcome, status in _STATUS_OF_OUTCOME.items()
}
_LATENCY_SUM = LATENCY.base + len(LATENCY_BUCKETS) + 1


def connection(outcome: str) -> int:
    return CONNECTIONS.slot(outcome)


def rejection(reason: RejectReason) -> int:
    return REJECTIONS.slot(reason)


def event(name: str) -> int:
    return EVENTS.slot(name)


def statistics_counts(value: Callable[[int], int]) -> dict[str, int]:
    """The counters of the maillog's ``statistics:`` line, in its order, each read by
    ``value`` (a word of one row, or its sum over the rows)."""
    return {
        "connections": sum(value(CONNECTIONS.base + i) for i in range(CONNECTIONS.size)),
        "messages_received": value(MESSAGES_RECEIVED),
        "early_talkers": value(connection("early_talker")),
        "rcpt_throttled": value(event("rcpt_throttled")),
        "bad_rcpt_disconnects": value(event("bad_rcpt_disconnect")),
        "per_ip_limit": value(connection("per_ip_limit")),
        "connect_refused": value(connection("access_refused")),
        "bare_newline": value(event("bare_newline")),
        "improper_pipelining": value(event("improper_pipelining")),
        "stress": value(STRESS_EPISODES),
    }


def tls(side: str, ok: bool) -> int:
    return TLS.slot(side, "ok" if ok else "failed")


class Table:
    """The shared mapping: one row per process. Made before the fork (anonymous and shared,
    so every child writes into the same pages)."""

    def __init__(self, rows: int = 1) -> None:
        self.rows = rows
        self._map = mmap.mmap(-1, rows * _ROW_BYTES)  # MAP_SHARED | MAP_ANONYMOUS
        self.words = memoryview(self._map).cast("Q")

    def row(self, index: int) -> Row:
        return Row(self, index)

    def _base(self, index: int) -> int:
        return index * (_ROW_BYTES // 8)

    def value(self, slot: int, row: int | None = None) -> int:
        """One word of one row, or (``row`` None) its sum over the rows."""
        words, width = self.words, _ROW_BYTES // 8
        if row is not None:
            return int(words[row * width + slot])
        return sum(int(words[r * width + slot]) for r in range(self.rows))

    def process_gone(self, index: int) -> None:
        """The process of row ``index`` died (called by the master): it no longer runs or
        listens; its counts stay."""
        base = self._base(index)
        self.words[base + PID] = 0
        self.words[base + LISTENING] = 0

    def named(self, names: NameTable) -> dict[str, list[int]]:
        """Name → its counts summed over every row, for one name table."""
        out: dict[str, list[int]] = {}
        for index in range(self.rows):
            for name, counts in _read_names(self, index, names).items():
                total = out.setdefault(name, [0] * len(counts))
                for i, n in enumerate(counts):
                    total[i] += n
        return out

    def hop_failures(self) -> dict[tuple[str, str], int]:
        """(next hop, status) → failures, over every row."""
        return {
            (name, status): n
            for name, counts in self.named(HOPS).items()
            for status, n in zip(HOP_STATUSES, counts, strict=True)
        }


def _entry_word(table: Table, index: int, names: NameTable, entry: int) -> int:
    return table._base(index) + names.first + entry * names.entry_words


def _read_names(table: Table, index: int, names: NameTable) -> dict[str, list[int]]:
    """The named entries of one row's table, in entry order (a zero length ends it)."""
    out: dict[str, list[int]] = {}
    raw = table._map
    for entry in range(names.entries):
        word = _entry_word(table, index, names, entry)
        length = raw[word * 8]
        if length == 0:
            break
        name = raw[word * 8 + 1 : word * 8 + 1 + length].decode("utf-8", "replace")
        counts_at = word + names.name_words
        out[name] = [int(table.words[counts_at + i]) for i in range(len(names.counts))]
    return out


class Row:
    """What one process writes: its own row of the table, and nothing else."""

    __slots__ = ("_entries", "counts", "index", "table", "words")

    def __init__(self, table: Table, index: int) -> None:
        self.table = table
        self.index = index
        base = table._base(index)
        self.counts = table.words[base : base + ROW_WORDS]
        self.words = table.words  # the name tables' words: ``entry`` gives their place
        # A successor of a dead worker counts on in the entries its predecessor named.
        self._entries = {
            names: {name: e for e, name in enumerate(_read_names(table, index, names))}
            for names in (HOPS, MILTERS)
        }

    def inc(self, slot: int, n: int = 1) -> None:
        self.counts[slot] += n

    def value(self, slot: int) -> int:
        return int(self.counts[slot])

    def started(self, pid: int, listening: bool) -> None:
        self.counts[PID] = pid
        self.counts[LISTENING] = int(listening)

    def set_listening(self, listening: bool) -> None:
        self.counts[LISTENING] = int(listening)

    def queue_moves(self) -> memoryview:
        """The two words a Spool counts its queue entries and removals in (``QUEUE_ENTERED``,
        ``QUEUE_LEFT``): a successor of a dead worker counts on from its predecessor's."""
        return self.counts[QUEUE_ENTERED : QUEUE_LEFT + 1]

    def delivery(self, mailer: str, outcome: str, delay: float, next_hop: str | None) -> None:
        """One recipient of a maillog ``to=`` line: ``outcome`` is ``delivery.Status``'s
        value (sent, temp, perm); a delivered one's ``delay`` goes into the latency
        histogram, a failed one to an SMTP ``next_hop`` into that hop's failures."""
        slot = _DELIVERY_SLOTS.get((mailer, outcome))
        if slot is not None:
            self.counts[slot] += 1
        if outcome == "sent":
            counts = self.counts
            counts[LATENCY.base + bisect.bisect_left(LATENCY_BUCKETS, delay)] += 1
            counts[_LATENCY_SUM] += max(0, int(delay * 1_000_000))
        elif next_hop is not None:
            status = _STATUS_OF_OUTCOME[outcome]
            self.words[self.entry(HOPS, next_hop) + HOP_STATUSES.index(status)] += 1

    def entry(self, names: NameTable, name: str) -> int:
        """The word (in ``words``) of the first count of ``name``'s entry: an entry of its
        own, made now if it has none, or ``other``'s once the table is full."""
        entries = self._entries[names]
        entry = entries.get(name)
        if entry is None:
            entry = self._name_entry(names, name)
        return _entry_word(self.table, self.index, names, entry) + names.name_words

    def _name_entry(self, names: NameTable, name: str) -> int:
        entries = self._entries[names]
        if len(entries) >= names.entries - 1:
            name = OTHER
            if name in entries:
                return entries[name]
        entry = len(entries)
        data = name.encode("utf-8", "replace")[: names.name_max]
        at = _entry_word(self.table, self.index, names, entry) * 8
        raw = self.table._map
        raw[at + 1 : at + 1 + len(data)] = data
        raw[at] = len(data)  # last: a reader sees the whole name or none
        entries[name] = entry
        return entry

    def milter(self, name: str) -> MilterCounts:
        """Where filter ``name``'s verdicts and failures are counted."""
        return MilterCounts(self.words, self.entry(MILTERS, name))


_MILTER_VERDICT_AT = {pair: MILTERS.offset("verdict", *pair) for pair in MILTER_OUTCOMES}
_MILTER_FAILURE_AT = {r: MILTERS.offset("failure", r) for r in MILTER_FAILURE_REASONS}


class MilterCounts:
    """One filter's counts in one row (``Row.milter``): kept by the SMTP session's filter,
    so a count is a dict look-up and an increment."""

    __slots__ = ("base", "words")

    def __init__(self, words: memoryview, base: int) -> None:
        self.words = words
        self.base = base

    def verdict(self, stage: str, verdict: str) -> None:
        """``verdict`` of ``MILTER_VERDICTS`` at ``stage`` (a pair MILTER_OUTCOMES has)."""
        self.words[self.base + _MILTER_VERDICT_AT[(stage, verdict)]] += 1

    def failure(self, reason: str) -> None:
        self.words[self.base + _MILTER_FAILURE_AT[reason]] += 1


def local_row() -> Row:
    """A row of a table of its own: one process, or code that counts with nobody reading."""
    return Table(1).row(0)
