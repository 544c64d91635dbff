"""``[metrics] listen``: ``/metrics`` (Prometheus text format) and ``/health``, over HTTP;
with ``[metrics] token_file``, ``/queue`` and ``/qshape`` too (``queuehttp.py``).

One process answers, on its event loop: the only process with one worker, worker 0 with
several (the master binds the socket before it forks and only worker 0 accepts on it). Its
answers are the whole daemon's all the same: the counts are summed over every worker's row of
the shared table (``metrics.py``), the open sessions are the shared admission count, the queue
is counted from the spool folder now and then and kept up to date by every process's counts
of what entered and left it (``QueueCount``). A scrape never blocks the loop on the queue:
the folder listing runs in a thread, and less often the longer it takes.

The HTTP side is a few lines of asyncio on purpose: prometheus_client's own server runs a
thread per request beside the event loop (and threads do not mix with a master that forks),
while here a request is one read of at most 8 KiB within ``READ_TIMEOUT``, one write, and
close, with at most ``MAX_CONNECTIONS`` at once. The text format itself is prometheus_client's
(``generate_latest`` over a collector that reads the table), so escaping and number formatting
are the library's (``exposition.py``, imported at the first scrape: the workers that answer
none, and a daemon without ``[metrics] listen``, never load the library).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from mailgate import metrics
from mailgate.queue.spool import Spool
from mailgate.smtp.listener import bind_socket

if TYPE_CHECKING:
    from mailgate.queuehttp import QueueEndpoint

MAX_CONNECTIONS = 16  # more at once are closed at once
READ_TIMEOUT = 5.0  # for the request head
MAX_HEAD = 8192


def bind(listen: tuple[str, int]) -> socket.socket:
    """The ``[metrics] listen`` socket; an OSError that names the setting."""
    host, port = listen
    try:
        return bind_socket(host, port, backlog=64)
    except OSError as exc:
        raise OSError(exc.errno, f"[metrics] listen {host}:{port}: {exc.strerror}") from None


class QueueCount:
    """The queue as ``mailq`` counts it (the messages in ``queue/``), for ``/metrics``, the
    statistics line, systemd's STATUS and ``mailgate status``: a census now and then
    (``Spool.census``, a listing of the names, in a thread) plus what entered and left the
    queue since that census began, every process's (``metrics.QUEUE_ENTERED`` / ``QUEUE_LEFT``
    in the shared table, counted by each process's Spool). So the count follows the traffic
    at no cost between censuses, and a census only corrects for what the daemon did not do
    itself (``mailgate delete`` or ``flush`` in their own processes, files moved by hand) and
    for the messages that came or went while it listed (such a census is kept a tenth as
    long). A census is reused until
    ``MIN_AGE`` has passed and ``COST`` times as long as it took, at most ``MAX_AGE``: the
    listings take at most 1/``COST`` of one core (a million names, ~1 s, every five minutes;
    a small queue every 2 s)."""

    MIN_AGE = 2.0
    COST = 300
    MAX_AGE = 300.0

    def __init__(self, spool: Spool, table: metrics.Table | None = None) -> None:
        self.spool = spool
        self.table = table
        # The last census: its count, its oldest arrival, and the moves as it began.
        self._census: tuple[int, float | None, int] | None = None
        self._due = -1.0
        self._lock = asyncio.Lock()

    def _moves(self) -> int:
        """Entered minus left, summed over every process's row (or this spool's alone)."""
        if self.table is None:
            moves = self.spool.moves
            return int(moves[Spool.ENTERED]) - int(moves[Spool.LEFT])
        return self.table.value(metrics.QUEUE_ENTERED) - self.table.value(metrics.QUEUE_LEFT)

    def known(self) -> tuple[int, float | None] | None:
        """The count now from the last census, without a new one; None before the first."""
        if self._census is None:
            return None
        count, oldest, moves = self._census
        count = max(0, count + self._moves() - moves)
        return count, oldest if count else None

    async def current(self) -> tuple[int, float | None]:
        """The count now, after a new census if the last one is too old."""
        async with self._lock:  # concurrent askers share one census
            if time.monotonic() >= self._due:
                started = time.monotonic()
                moves = self._moves()
                count, oldest = await asyncio.to_thread(self.spool.census)
                self._census = (count, oldest, moves)
                took = time.monotonic() - started
                age = min(max(self.MIN_AGE, took * self.COST), self.MAX_AGE)
                if self._moves() != moves:
                    # Mail came or went while it listed: a name may be counted twice or
                    # not at all. Listed again ten times sooner (at most 1/30 of a core),
                    # so a listing slowed by load does not leave the count off for minutes.
                    age = max(self.MIN_AGE, age / 10)
                self._due = time.monotonic() + age
        known = self.known()
        assert known is not None
        return known


@dataclass(frozen=True)
class Gauges:
    """What is true now, for the whole daemon (the counters are in the table)."""

    sessions_open: int
    queue_messages: int
    queue_oldest: float | None  # arrival time (epoch seconds) of the oldest queued message
    spool_free_bytes: int
    stress: bool


class MonitorServer:
    """The HTTP endpoint: ``GET /metrics`` and ``GET /health`` (HEAD too); ``/queue`` and
    ``/qshape`` are `queuehttp.QueueEndpoint`'s."""

    def __init__(
        self,
        sock: socket.socket,
        table: metrics.Table,
        gauges: Callable[[], Gauges],
        queue_count: QueueCount,
        problems: Callable[[], list[str]],
        identity: Callable[[], Identity],
    ) -> None:
        self.sock = sock
        self.table = table
        self.gauges = gauges
        self.queue_count = queue_count
        self.problems = problems
        self.identity = identity
        self.open = 0
        self.server: asyncio.Server | None = None
        self.queue: QueueEndpoint | None = None  # made at the first /queue or /qshape

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, sock=self.sock, limit=MAX_HEAD)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open >= MAX_CONNECTIONS:
            writer.close()
            return
        self.open += 1
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            request = Request.parse(head)
            if request.path in QUEUE_PATHS:
                # Streams, with its own time limits (queuehttp.py): a deep queue takes longer
                # than a scrape, and the client's reading speed sets the pace.
                from mailgate.queuehttp import QueueEndpoint

                if self.queue is None:
                    self.queue = QueueEndpoint(self.queue_count.spool, self.identity)
                await self.queue.answer(request, writer)
                return
            async with asyncio.timeout(READ_TIMEOUT):
                status, ctype, body = await self._answer(request)
                writer.write(response(status, ctype, body, head_only=request.method == "HEAD"))
                await writer.drain()
        except (
            TimeoutError,
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def _answer(self, request: Request) -> tuple[str, str, bytes]:
        if request.method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET or HEAD only\n"
        target = request.path
        if target == "/metrics":
            # Imported here: only the process that answers scrapes loads prometheus_client.
            from mailgate import exposition

            gauges = self.gauges()
            count, oldest = await self.queue_count.current()
            gauges = Gauges(
                gauges.sessions_open, count, oldest, gauges.spool_free_bytes, gauges.stress
            )
            return "200 OK", exposition.CONTENT_TYPE, exposition.text(self.table, gauges)
        if target == "/health":
            problems = self.problems()
            if problems:
                return (
                    "503 Service Unavailable",
                    "text/plain",
                    ("; ".join(problems) + "\n").encode(),
                )
            return "200 OK", "text/plain", b"ok\n"
        return "404 Not Found", "text/plain", b"/metrics, /health, /queue or /qshape\n"


QUEUE_PATHS = ("/queue", "/qshape")


@dataclass(frozen=True)
class Identity:
    """What the queue endpoint needs of the config in force (a reload changes it)."""

    hostname: str
    token: str | None  # [metrics] token_file's token; None: /queue and /qshape are off


@dataclass(frozen=True)
class Request:
    """A request head, as far as these endpoints read it: method, path, query, headers
    (names in lower case; a repeated header keeps its last value)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]

    @classmethod
    def parse(cls, head: bytes) -> Request:
        text = head.decode("latin-1")
        first, *lines = text.split("\r\n")
        method, _, rest = first.partition(" ")
        target = rest.split(" ", 1)[0]
        path, _, query = target.partition("?")
        headers = {}
        for line in lines:
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        return cls(method, path, parse_qs(query), headers)


def response(
    status: str,
    ctype: str,
    body: bytes,
    *,
    head_only: bool = False,
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + body
