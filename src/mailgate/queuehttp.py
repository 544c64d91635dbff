"""``GET /queue`` and ``GET /qshape`` on the metrics listener: a node's queue for
``mailgate mailq --node`` and ``qshape --node`` (``cluster.py``), read-only.

Off until ``[metrics] token_file`` is set (404), and then only for a request with
``Authorization: Bearer <token>`` (401 without one, 403 with another; compared in constant
time, ``hmac.compare_digest``): the queue is the senders' and recipients' addresses. Each
answer and refusal is logged (``queue_read``, ``queue_read_refused``).

``/queue`` streams the lines of ``mailgate mailq --json`` (`listing.mailq_json`) with chunked
transfer encoding, so a listing cut short (the node stopped mid-way) is an error for the
client, never a short queue. The entries are read in a thread, ``BATCH`` at a time, and a
batch is written only once the previous one has left (``drain``): memory is one batch and the
socket's buffers whatever the queue's depth, and the event loop (worker 0's, which also
serves SMTP) never reads a status file. Bounds per request: ``limit=N`` entries if asked,
``WRITE_TIMEOUT`` for the client to take each batch, and ``MAX_LISTINGS`` requests at once
(more get 503): a listing costs a read of every entry, as ``mailgate mailq`` does.

``/qshape`` answers one JSON object, the node's `listing.Shape` (counts per domain and age
bucket, as of the node's clock), computed in a thread; ``cluster.py`` sums them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import Callable, Generator, Iterator

from mailgate import maillog
from mailgate.monitor import Identity, Request, response
from mailgate.queue import listing
from mailgate.queue.spool import Spool

BATCH = 256  # entries read per turn of the thread
WRITE_TIMEOUT = 30.0  # seconds for the client to take one batch
MAX_LISTINGS = 2  # /queue and /qshape requests answered at once

NDJSON = "application/x-ndjson"
# The headers of a /queue answer (cluster.py reads them).
HOSTNAME = "X-Mailgate-Hostname"
QUEUE_DIR = "X-Mailgate-Queue"
QUEUE_COUNT = "X-Mailgate-Queue-Count"


class QueueEndpoint:
    def __init__(self, spool: Spool, identity: Callable[[], Identity]) -> None:
        self.spool = spool
        self.identity = identity
        self.busy = 0

    async def answer(self, request: Request, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) else "unknown"
        what = request.path
        identity = self.identity()
        refusal = _refusal(request, identity.token)
        if refusal is not None:
            status, why = refusal
            if identity.token is not None:
                maillog.queue_read_refused(client, what, why)
            headers = [("WWW-Authenticate", 'Bearer realm="mailgate"')] if "401" in status else []
            await _send(
                writer, response(status, "text/plain", f"{why}\n".encode(), headers=headers)
            )
            return
        if self.busy >= MAX_LISTINGS:
            body = f"{MAX_LISTINGS} queue listings are running; try again\n".encode()
            await _send(writer, response("503 Service Unavailable", "text/plain", body))
            return
        self.busy += 1
        try:
            if what == "/qshape":
                await self._qshape(request, writer, client, identity)
            else:
                await self._queue(request, writer, client, identity)
        finally:
            self.busy -= 1

    async def _queue(
        self, request: Request, writer: asyncio.StreamWriter, client: str, identity: Identity
    ) -> None:
        try:
            limit = int(_number(request, "limit", int, 0)) or None
        except ValueError:
            limit = -1
        if limit is not None and limit < 1:
            await _send(writer, _bad("limit is a whole number, 1 or more"))
            return
        count = await asyncio.to_thread(self.spool.count)
        head = (
            "HTTP/1.1 200 OK\r\n"
            f"Content-Type: {NDJSON}\r\nTransfer-Encoding: chunked\r\n"
            f"{HOSTNAME}: {identity.hostname}\r\n{QUEUE_DIR}: {self.spool.queue}\r\n"
            f"{QUEUE_COUNT}: {count}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode("utf-8", "surrogateescape"))
        entries: Generator[listing.Entry] = listing.entries(self.spool)
        sent, complete = 0, False
        try:
            while limit is None or sent < limit:
                want = BATCH if limit is None else min(BATCH, limit - sent)
                lines = await asyncio.to_thread(_json_lines, entries, want)
                if not lines:
                    break
                data = "".join(lines).encode("ascii")
                writer.write(b"%x\r\n%b\r\n" % (len(data), data))
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await writer.drain()
                sent += len(lines)
            writer.write(b"0\r\n\r\n")
            async with asyncio.timeout(WRITE_TIMEOUT):
                await writer.drain()
            complete = True
        finally:
            with contextlib.suppress(ValueError):  # still running in its thread: left to gc
                entries.close()
            maillog.queue_read(client, "/queue", sent, complete)

    async def _qshape(
        self, request: Request, writer: asyncio.StreamWriter, client: str, identity: Identity
    ) -> None:
        by = request.query.get("by", ["recipient"])[-1]
        try:
            buckets = int(_number(request, "buckets", int, 10))
            minutes = _number(request, "minutes", float, 5.0)
        except ValueError:
            buckets, minutes = 0, 0.0
        if by not in ("recipient", "sender"):
            await _send(writer, _bad('by is "recipient" or "sender"'))
            return
        if not 1 <= buckets <= 64 or not minutes > 0:
            await _send(writer, _bad("buckets is 1 to 64, minutes more than 0"))
            return
        held = request.query.get("hold", ["0"])[-1] not in ("", "0", "false")
        shape = await asyncio.to_thread(
            listing.shape,
            self.spool,
            by_sender=by == "sender",
            held=held,
            buckets=buckets,
            minutes=minutes,
        )
        body = json.dumps(
            {
                "hostname": identity.hostname,
                "buckets": buckets,
                "minutes": minutes,
                "rows": shape.rows,
            },
            separators=(",", ":"),
        ).encode("ascii")
        await _send(writer, response("200 OK", "application/json", body))
        maillog.queue_read(client, "/qshape", shape.rows[shape.TOTAL][0], True)


def _refusal(request: Request, token: str | None) -> tuple[str, str] | None:
    """Why the request is not answered (status, reason), or None."""
    if token is None:
        return "404 Not Found", "the queue is not served: [metrics] token_file is not set"
    if request.method != "GET":
        return "405 Method Not Allowed", "GET only"
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return "401 Unauthorized", "the cluster token is needed (Authorization: Bearer)"
    if not hmac.compare_digest(given.strip().encode("latin-1"), token.encode("ascii")):
        return "403 Forbidden", "wrong token"
    return None


def _json_lines(entries: Iterator[listing.Entry], n: int) -> list[str]:
    """Up to ``n`` more entries of the listing as JSON lines (in a thread)."""
    out = []
    for entry in entries:
        out.append(listing.mailq_json(entry) + "\n")
        if len(out) >= n:
            break
    return out


def _number(request: Request, name: str, kind: Callable[[str], float], default: float) -> float:
    """A number in the query; ValueError (a 400) when it is not one."""
    values = request.query.get(name)
    return kind(values[-1]) if values else default


def _bad(why: str) -> bytes:
    return response("400 Bad Request", "text/plain", f"{why}\n".encode())


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    async with asyncio.timeout(WRITE_TIMEOUT):
        await writer.drain()
