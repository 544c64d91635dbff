"""Sendmail-style maillog lines, one function per event, so admins' log parsers keep working.

Every line the gateway writes is built here, by a function named for its event; a call site
passes facts (a queue id, a relay, a reply), never a formatted line. The function returns the
line's text and ``@_event`` writes it, at the severity `LEVELS` gives the event: that table is
the one place severities are decided (syslog gets the priority of the same name). To add a
line: write its function in the section it belongs to, decorated with ``@_event``, give it a
row in `LEVELS`, and keep its text stable once shipped.

Where lines go (``[log] target``; `setup`): stderr or a file, each line with a syslog-like
prefix (``Nov 24 19:21:00 gateway mailgate[1234]: 6AOJL6hk004507: from=<a@b>, ...``), or the
local syslog socket as glibc's ``syslog()`` would send it (``<22>Nov 24 19:21:00
mailgate[1234]: ...``, facility ``mail``), so a syslog.conf line such as ``mail.debug
/var/log/maillog`` gets the lines Sendmail wrote there. With ``[log] json``, each line also
goes as one JSON object (time, level, event, qid, the text, and the event function's
arguments as fields) to a second file or stdout, for log shippers. `logsink` writes them.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal, ParamSpec, Protocol

from mailgate.logsink import FACILITY_CODES, Facility, LineFile, Sink, SyslogSocket

if TYPE_CHECKING:
    from mailgate.tls import Session as TlsSession

Level = Literal["debug", "info", "notice", "warning", "error"]
"""Severity by name; the syslog priorities of the same names (``error`` is ``LOG_ERR``)."""

Target = Literal["stderr", "file", "syslog"]

_RANK: dict[Level, int] = {"debug": 10, "info": 20, "notice": 25, "warning": 30, "error": 40}
SYSLOG_SEVERITY: dict[Level, int] = {"debug": 7, "info": 6, "notice": 5, "warning": 4, "error": 3}

# Every event's severity, as Sendmail logs the same events (sm_syslog's priorities): the
# from=, to= (sent, deferred or failed alike) and DSN lines are LOG_INFO, ruleset rejects
# LOG_NOTICE; protocol abuse is notice, what an admin must look at warning or error.
LEVELS: dict[str, Level] = {
    # a message's life: each line carries its queue id
    "received": "info",
    "submitted": "info",
    "delivery": "info",
    "dsn_created": "info",
    "removed": "info",
    "reject": "notice",
    "discard": "notice",
    "message_refused": "notice",
    "spool_error": "error",
    "quarantined": "error",
    "attempt_failed": "error",
    "status_write_failed": "error",
    "postmaster_notified": "info",
    "double_bounce_dropped": "notice",
    "postmaster_notify_failed": "error",
    "bounce_queue_failed": "error",
    "receipt_queue_failed": "error",
    "warning_queue_failed": "error",
    # SMTP sessions
    "early_talker": "info",
    "improper_pipelining": "info",
    "auth_warning": "info",
    "starttls_server": "info",
    "starttls_accept_failed": "warning",
    "tls_read_failed": "warning",
    "starttls_plaintext_dropped": "notice",
    "input_timeout": "notice",
    "write_timeout": "notice",
    "rcpt_flood": "notice",
    "null_connection": "info",  # Sendmail's severities, these four
    "lost_input": "notice",
    "premature_eom": "warning",
    "size_exceeded": "notice",  # Sendmail's severities, these two
    "refused_recipient": "info",
    "unexpected_close": "notice",
    "probe_rejected": "info",
    "etrn": "info",
    "address_refused": "notice",
    "bare_newline": "notice",
    "session_failed": "error",
    "connections_deferred": "info",  # Sendmail: LOG_INFO
    "accept_error": "error",
    "proxy_untrusted": "notice",
    "proxy_bad_header": "notice",
    "proxy_timeout": "notice",
    "proxy_local": "debug",
    "proxy_closed": "debug",
    # milters
    "milter_connect_refused": "notice",
    "milter_reject": "notice",
    "milter_discard": "notice",
    "milter_quarantine": "notice",
    "milter_failed": "warning",
    "milter_verdict": "debug",
    "milter_header_added": "info",
    "milter_header_inserted": "info",
    "milter_header_changed": "info",
    "milter_header_deleted": "info",
    "milter_header_change_added": "info",
    "milter_header_delete_noop": "info",
    "milter_sender_changed": "info",
    "milter_rcpt_added": "info",
    "milter_rcpt_deleted": "info",
    "milter_body_replaced": "info",
    # the spool
    "low_space": "warning",
    "space_available": "info",
    "recover_failed": "error",
    "recovered": "info",
    "recovered_incoming": "info",
    "queue_scan": "info",
    "queue_pass_failed": "warning",
    "due_taken": "info",
    # the queue tools
    "placed_on_hold": "info",
    "released_from_hold": "info",
    "deleted": "info",
    "requeued": "info",
    # the queue read over [metrics] listen (mailgate mailq --node)
    "queue_read": "info",
    "queue_read_refused": "warning",
    # delivery
    "starttls_client": "info",
    "starttls_client_failed": "warning",
    "held_skipped": "debug",
    # the daemon
    "daemon_started": "info",
    "start_failed": "error",
    "stale_pid_file": "notice",
    "stopping": "info",
    "draining": "notice",
    "drained": "info",
    "handover_done": "notice",
    "stop_deadline": "warning",
    "config_warning": "warning",
    "reload_refused": "error",
    "reloaded": "info",
    "restart_needed": "warning",
    "stress_started": "warning",
    "stress_ended": "info",
    "statistics": "info",
    "worker_started": "info",
    "worker_failed": "error",
    "worker_exited": "error",
    "worker_hung": "error",
    # the log itself, and the libraries we run on
    "lines_dropped": "warning",
    "log_open_failed": "error",
    "library_warning": "warning",
    "library_error": "error",
}


class LogOptions(Protocol):
    """Where lines go: what ``[log]`` holds (`mailgate.config.LogSettings`)."""

    @property
    def target(self) -> Target | None: ...  # None: "file" when there is a file, else "stderr"
    @property
    def file(self) -> Path | None: ...
    @property
    def level(self) -> Level: ...
    @property
    def syslog_socket(self) -> Path: ...
    @property
    def facility(self) -> Facility: ...
    @property
    def syslog_name(self) -> str: ...
    @property
    def json(self) -> bool: ...
    @property
    def json_file(self) -> Path | None: ...  # None: stdout


class _Writer:
    """The sinks of this process and the prefix of its lines. After a fork (workers) the
    sinks are shared, each line still one ``write`` or one datagram; only the pid changes."""

    def __init__(self) -> None:
        self.text: Sink = LineFile(None)  # stderr until setup() says otherwise
        self.facility: int | None = None  # a syslog facility code when text is the socket
        self.json: Sink | None = None
        self.echo: Sink | None = None  # stderr too, beside the target (`flush -v`)
        self.host = "localhost"
        self.name = "mailgate"  # before [pid]: on each line ([log] syslog_name)
        self.level = _RANK["info"]
        self.pid = os.getpid()
        self.second = -1
        self.stamp = ""
        self.lost = 0  # lines a sink could not take, since start (in the statistics line)

    def setup(self, hostname: str, options: LogOptions | None, echo: bool = False) -> None:
        """Open the new sinks before closing the old: OSError leaves everything as it was.
        ``echo``: each line on stderr as well, unless stderr is the target already."""
        text: Sink = LineFile(None)
        facility: int | None = None
        json_sink: Sink | None = None
        level: Level = "info"
        if options is not None:
            target = text_target(options)
            if target == "syslog":
                text, facility = (
                    SyslogSocket(options.syslog_socket),
                    FACILITY_CODES[options.facility],
                )
            elif target == "file" and options.file is not None:
                text = LineFile(options.file)
            if options.json:
                try:
                    json_sink = LineFile(options.json_file) if options.json_file else _Stdout()
                except OSError:
                    text.close()
                    raise
            level = options.level
        for old in (self.text, self.json, self.echo):
            if old is not None:
                old.close()
        self.text, self.facility, self.json = text, facility, json_sink
        shown = options is not None and text_target(options) != "stderr"
        self.echo = LineFile(None) if echo and shown else None
        self.host = hostname.split(".")[0]
        self.name = options.syslog_name if options is not None else "mailgate"
        self.level = _RANK[level]

    def enabled(self, level: Level) -> bool:
        return _RANK[level] >= self.level

    def write(self, level: Level, event: str, text: str, fields: dict[str, object]) -> None:
        now = time.time()
        second = int(now)
        if second != self.second:  # once a second: the stamp, and the sinks heal themselves
            self.second = second
            self.stamp = time.strftime("%b %e %H:%M:%S", time.localtime(second))
            self.text.check()
            if self.json is not None:
                self.json.check()
        if self.facility is None:
            line = f"{self.stamp} {self.host} {self.name}[{self.pid}]: {text}\n"
        else:  # RFC 3164 as glibc sends it to /dev/log: no host name, no newline
            pri = self.facility * 8 + SYSLOG_SEVERITY[level]
            line = f"<{pri}>{self.stamp} {self.name}[{self.pid}]: {text}"
        healed = self._put(self.text, line.encode("utf-8", "replace"))
        if self.echo is not None:
            shown = f"{self.stamp} {self.host} {self.name}[{self.pid}]: {text}\n"
            healed += self._put(self.echo, shown.encode("utf-8", "replace"))
        if self.json is not None:
            healed += self._put(self.json, self._json(now, level, event, text, fields))
        for sink in healed:  # it works again: say how many lines it lost meanwhile
            count, sink.dropped = sink.dropped, 0
            lines_dropped(count, sink.name)
            if sink.dropped:
                # The line took the one place a reader had just made, and the notice found
                # none: it is said again, with the whole count, once the sink takes a line.
                # (A notice is not one of the lines it counts.)
                sink.dropped, self.lost = count, self.lost - 1

    def _json(
        self, now: float, level: Level, event: str, text: str, fields: dict[str, object]
    ) -> bytes:
        record: dict[str, object] = {
            "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
            "host": self.host,
            "pid": self.pid,
            "level": level,
            "event": event,
        }
        qid = fields.pop("qid", None)
        if qid is not None:
            record["qid"] = qid
        record["text"] = text
        record["fields"] = fields
        encoded = json.dumps(record, ensure_ascii=False, default=_json_value)
        return (encoded + "\n").encode("utf-8", "replace")

    def _put(self, sink: Sink, data: bytes) -> list[Sink]:
        """Write; ``[sink]`` if it took the line after losing some, else ``[]``."""
        if not sink.write(data):
            self.lost += 1
            return []
        return [sink] if sink.dropped else []

    def reopen(self) -> None:
        self.text.reopen()
        if self.json is not None:
            self.json.reopen()

    def after_fork(self) -> None:
        self.pid = os.getpid()


class _Stdout(LineFile):
    """The JSON copy on stdout (fd 1), for a log shipper reading the daemon's output."""

    def __init__(self) -> None:
        super().__init__(None)
        self.fd = 1

    @property
    def name(self) -> str:
        return "stdout"


def _json_value(value: object) -> object:
    """An event argument that JSON has no type for: an exception as the text line shows it,
    a dataclass (a TLS session) as its fields, anything else (a path, a reply) as text."""
    if isinstance(value, BaseException):
        return repr(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


_writer = _Writer()
os.register_at_fork(after_in_child=_writer.after_fork)

P = ParamSpec("P")


def _event(build: Callable[P, str]) -> Callable[P, None]:
    """The event function ``build`` (its arguments → its text), made into one that writes
    the line at its `LEVELS` severity, CR/LF flattened (it may hold a peer's or an
    exception's text); the JSON copy gets the arguments by name."""
    name = build.__name__
    level = LEVELS[name]  # an event without a severity fails at import
    rank = _RANK[level]
    params = list(inspect.signature(build).parameters.values())
    names = [p.name for p in params]
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}

    def log(*args: P.args, **kwargs: P.kwargs) -> None:
        # The rank compared here, not through ``enabled``: a method call per event (a
        # filter's verdict is a debug line per event, usually not written).
        if rank < _writer.level:
            return
        text = _clean(build(*args, **kwargs))
        fields: dict[str, object] = {}
        if _writer.json is not None:
            fields = {**defaults, **dict(zip(names, args, strict=False)), **kwargs}
        _writer.write(level, name, text, fields)

    log.__name__ = log.__qualname__ = name
    log.__doc__ = build.__doc__
    log.__wrapped__ = build  # type: ignore[attr-defined]  # as functools.wraps: an event
    return log


def text_target(options: LogOptions) -> Target:
    """Where the lines go: ``[log] target``, or without it a file when there is one, else
    stderr (where `mailgate serve` in a terminal shows them)."""
    return options.target or ("file" if options.file is not None else "stderr")


def setup(hostname: str, options: LogOptions | None = None, *, echo: bool = False) -> None:
    """Send lines where ``options`` say (stderr when None); called again on reload. OSError
    when a file cannot be opened; the lines then go on where they went. ``echo``: on the
    terminal (stderr) too, as ``sendmail -q -v`` shows what it logs."""
    _writer.setup(hostname, options, echo)
    root = logging.getLogger()
    if _library_handler not in root.handlers:
        root.addHandler(_library_handler)


def reopen() -> None:
    """SIGHUP: open the log file again under its name (logrotate renamed it) and reconnect
    to syslog, whether or not the new configuration loads. Renames are also noticed within
    a second without it."""
    _writer.reopen()


def lost_lines() -> int:
    """Lines a sink could not take since start (a full disk, a syslog daemon not reading);
    a line lost by the syslog socket and the JSON file both counts twice."""
    return _writer.lost


def syslog_problem() -> str | None:
    """Why the syslog socket could not be reached at setup, if it is the target and could not."""
    text = _writer.text
    return text.problem if isinstance(text, SyslogSocket) else None


class _LibraryHandler(logging.Handler):
    """Warnings of the libraries we run on (asyncio, dnspython) go to the maillog as one
    line each, never as a traceback on stderr behind the admin's back."""

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += f": {record.exc_info[1]!r}"
        if record.levelno >= logging.ERROR:  # CRITICAL is an error here too
            library_error(record.name, text)
        else:
            library_warning(record.name, text)


_library_handler = _LibraryHandler(logging.WARNING)


def format_delay(seconds: float) -> str:
    """Sendmail's ``[D+]HH:MM:SS``."""
    s = max(0, int(seconds))
    days, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    text = f"{h:02d}:{m:02d}:{s:02d}"
    return f"{days}+{text}" if days else text


def relay_name(ip: str, name: str | None, verified: bool = True) -> str:
    """``name [ip]`` or ``[ip]``, with ``(may be forged)`` for an unverified PTR name."""
    if not name:
        return f"[{ip}]"
    return f"{name} [{ip}]" + ("" if verified else " (may be forged)")


def next_hop_name(name: str, ip: str) -> str:
    """A next hop as Sendmail's to= lines name it: ``mx.example. [192.0.2.1]`` or ``[ip]``."""
    return f"{name}. [{ip}]" if name != ip else f"[{ip}]"


def _clean(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


# -- Sendmail's message lines (parsed by admins' tools: keep the formats) ---------------------
@_event
def received(
    qid: str,
    sender: str,
    size: int,
    nrcpts: int,
    msgid: str | None,
    proto: str,
    relay: str,
    bodytype: str | None = None,
) -> str:
    msg = f"{qid}: from=<{sender}>, size={size}, class=0, nrcpts={nrcpts}"
    if msgid:
        msg += f", msgid={msgid}"
    if bodytype:  # as Sendmail: only when the client gave BODY=
        msg += f", bodytype={bodytype}"
    return f"{msg}, proto={proto}, daemon=MTA, relay={relay}"


@_event
def submitted(qid: str, sender: str, size: int, nrcpts: int, msgid: str, user: str) -> str:
    """A local submission (``mailgate sendmail``): Sendmail's line for it has no proto."""
    return (
        f"{qid}: from=<{sender}>, size={size}, class=0, nrcpts={nrcpts}, msgid={msgid}, "
        f"relay={user}@localhost"
    )


# Sendmail's logdelivery keeps a line within its syslog buffer (SYSLOG_BUFSIZE, 1024 on
# Linux): the to= list gets what is left of it less 100 (the syslog header, the queue id).
SYSLOG_BUFSIZE = 1024


def deliveries(
    qid: str,
    to: Sequence[str],
    *,
    delay: float,
    xdelay: float,
    mailer: str,
    relay: str | None,
    dsn: str,
    stat: str,
    reply: str | None = None,
    ctladdr: str | None = None,
    pri: int | None = None,
) -> None:
    """The `delivery` line of recipients that had one outcome in one delivery, or several
    when their list is too long for one, each but the last marked ``[more]`` as Sendmail's
    (`to_lists`). Call sites use this, not `delivery`."""
    if len(to) == 1:  # the usual line: nothing to cut, no need to measure it first
        chunks = [(list(to), False)]
    else:
        tail = _delivery_tail(delay, xdelay, mailer, relay, dsn, stat, reply, ctladdr, pri)
        chunks = to_lists(to, SYSLOG_BUFSIZE - 100 - len(tail))
    for chunk, more in chunks:
        delivery(
            qid,
            chunk,
            more=more,
            delay=delay,
            xdelay=xdelay,
            mailer=mailer,
            relay=relay,
            dsn=dsn,
            stat=stat,
            reply=reply,
            ctladdr=ctladdr,
            pri=pri,
        )


def to_lists(to: Sequence[str], room: int) -> list[tuple[list[str], bool]]:
    """``to`` cut as Sendmail's logdelivery cuts its to= list: while what is left of the
    list (``<a>,<b>,…``) is ``room`` characters or more, a line takes the addresses up to
    the last comma at or before character ``room`` (that comma ending its list) and says
    there is more. Where no comma is that early (an address longer than ``room``) Sendmail
    cuts the list at ``room`` characters and loses the rest; here that address goes on a
    line alone, whole, so that every recipient is in the log."""
    out: list[tuple[list[str], bool]] = []
    lengths = [len(a) + 2 for a in to]  # with the brackets
    start, left = 0, sum(lengths) + len(to) - 1  # the rest of the list's characters
    while start < len(to) - 1 and left >= room:
        end, comma = start + 1, lengths[start]  # at least one address; where its comma is
        while end < len(to) - 1 and comma + 1 + lengths[end] <= room:
            comma += 1 + lengths[end]
            end += 1
        out.append((list(to[start:end]), True))
        left -= comma + 1
        start = end
    out.append((list(to[start:]), False))
    return out


@_event
def delivery(
    qid: str,
    to: list[str],
    *,
    delay: float,
    xdelay: float,
    mailer: str,
    relay: str | None,
    dsn: str,
    stat: str,
    reply: str | None = None,
    ctladdr: str | None = None,
    pri: int | None = None,
    more: bool = False,
) -> str:
    """Sendmail's to= line: the recipients that had this outcome (``to=<a>,<b>``; ``more``:
    the list goes on in the next line, ``[more]``), ``relay=name [ip]`` (a literal's name is
    the literal itself), ``reply=`` only for a failure."""
    listed = ",".join(f"<{a}>" for a in to)
    tail = _delivery_tail(delay, xdelay, mailer, relay, dsn, stat, reply, ctladdr, pri)
    return f"{qid}: to={listed}{', [more]' if more else ''}{tail}"


def _delivery_tail(
    delay: float,
    xdelay: float,
    mailer: str,
    relay: str | None,
    dsn: str,
    stat: str,
    reply: str | None,
    ctladdr: str | None,
    pri: int | None,
) -> str:
    """What follows the to= list: Sendmail's ``buf`` in logdelivery."""
    parts = [""]
    if ctladdr:
        parts.append(f"ctladdr=<{ctladdr}>")
    parts += [f"delay={format_delay(delay)}", f"xdelay={format_delay(xdelay)}", f"mailer={mailer}"]
    if pri is not None:
        parts.append(f"pri={pri}")
    if relay:
        parts.append(
            f"relay={relay} {relay}" if relay[0] == "[" and " " not in relay else f"relay={relay}"
        )
    parts.append(f"dsn={dsn}")
    if reply and not dsn.startswith("2."):
        parts.append(f"reply={reply}")
    parts.append(f"stat={stat}")
    return ", ".join(parts)


def priority(size: int, recipients: int, attempts: int) -> int:
    """Sendmail's message priority as its to= lines show it (``pri=``): the size, 30000 a
    recipient (RecipientFactor), 90000 for each queue run before this one (RetryFactor)."""
    return size + 30000 * recipients + 90000 * attempts


@_event
def reject(
    qid: str | None, ruleset: str, arg1: str, relay: str, reply: str, arg2: str | None = None
) -> str:
    """A ruleset's refusal as Sendmail's rscheck logs it; check_relay's ``arg2`` is the
    client's address (``arg1`` its name, or ``[ip]`` without a confirmed one)."""
    prefix = f"{qid}: " if qid else ""
    args = f"arg1={arg1}, arg2={arg2}" if arg2 is not None else f"arg1={arg1}"
    return f"{prefix}ruleset={ruleset}, {args}, relay={relay}, reject={reply}"


@_event
def discard(qid: str | None, ruleset: str, arg1: str, relay: str) -> str:
    prefix = f"{qid}: " if qid else ""
    return f"{prefix}ruleset={ruleset}, arg1={arg1}, relay={relay}, discard"


@_event
def dsn_created(qid: str, bounce_qid: str, reason: str) -> str:
    """A bounce, delay warning or return receipt for ``qid`` was queued as ``bounce_qid``."""
    return f"{qid}: {bounce_qid}: DSN: {reason}"


@_event
def postmaster_notified(qid: str, notify_qid: str, reason: str) -> str:
    """Sendmail's double bounce: mail from <> failed, its report goes to the postmaster."""
    return f"{qid}: {notify_qid}: postmaster notify: {reason}"


@_event
def double_bounce_dropped(qid: str, reason: str) -> str:
    """A bounce failed and ``double_bounce_address`` is empty: nobody is told."""
    return f"{qid}: double bounce dropped (double_bounce_address is empty): {reason}"


@_event
def removed(qid: str) -> str:
    """The message is done (delivered or bounced) and gone from the queue: Postfix's line,
    which Sendmail lacks; the last line of a queue id's life."""
    return f"{qid}: removed"


@_event
def quarantined(qid: str, reason: str, where: object) -> str:
    """An unreadable queue entry was moved aside (never deleted) for the admin to look at."""
    return f"{qid}: unreadable queue entry moved to {where}: {reason}"


# -- the SMTP server's sessions ---------------------------------------------------------------
@_event
def null_connection(qid: str, relay: str) -> str:
    """``qid``: the envelope Sendmail holds for the session's first MAIL, never used."""
    return f"{qid}: {relay} did not issue MAIL/EXPN/VRFY/ETRN during connection to MTA"


@_event
def lost_input(qid: str, relay: str, after: str) -> str:
    """The client went away in a transaction, between commands (``after``: the last)."""
    return f"{qid}: lost input channel from {relay} to MTA after {after}"


@_event
def premature_eom(qid: str) -> str:
    """The client went away in the middle of its message (then `unexpected_close`)."""
    return f"{qid}: collect: premature EOM: unexpected close"


@_event
def unexpected_close(qid: str, relay: str, sender: str) -> str:
    return f"{qid}: collect: relay={relay}, from=<{sender}>, info=unexpected close"


@_event
def probe_rejected(qid: str, relay: str, line: str) -> str:
    return f"{qid}: {relay}: {line} [rejected]"


@_event
def etrn(qid: str, relay: str, node: str) -> str:
    """An ETRN with its argument, whatever comes of it (Sendmail's line)."""
    return f"{qid}: {relay}: ETRN {node}"


@_event
def address_refused(qid: str, text: str) -> str:
    """A recipient its route refuses (``text``: the reply's, ``<addr>... User unknown``)."""
    return f"{qid}: {text}"


@_event
def early_talker(relay: str, ip: str, seconds: float) -> str:
    return (
        f"rejecting commands from {relay} [{ip}] due to pre-greeting traffic after "
        f"{seconds} seconds"
    )


@_event
def improper_pipelining(relay: str, nbytes: int) -> str:
    return (
        f"improper command pipelining after DATA from {relay}: {nbytes} bytes sent before the 354"
    )


@_event
def auth_warning(host: str, text: str) -> str:
    return f"Authentication-Warning: {host}: {text}"


@_event
def message_refused(qid: str, relay: str, reply: object) -> str:
    return f"{qid}: message from {relay} refused: {reply}"


@_event
def size_exceeded(qid: str, size: int, limit: int) -> str:
    return f"{qid}: message size ({size}) exceeds maximum ({limit})"


@_event
def refused_recipient(qid: str, to: str, pri: int, stat: str) -> str:
    """A recipient of a message refused as a whole (its size), as Sendmail's to= says it."""
    return f"{qid}: to=<{to}>, delay=00:00:00, pri={pri}, stat={stat}"


@_event
def starttls_server(relay: str, session: TlsSession) -> str:
    return f"STARTTLS=server, relay={relay}, {session.for_maillog()}"


@_event
def starttls_accept_failed(relay: str, why: str) -> str:
    return f"STARTTLS=server, error: accept failed={why}, relay={relay}"


@_event
def tls_read_failed(relay: str, exc: BaseException | None) -> str:
    return f"STARTTLS=server, error: read failed={exc!r}, relay={relay}"


@_event
def starttls_plaintext_dropped(relay: str, nbytes: int) -> str:
    return (
        f"STARTTLS=server, relay={relay}: {nbytes} bytes of plaintext pipelined "
        "after STARTTLS discarded"
    )


@_event
def input_timeout(relay: str, stage: Literal["DATA", "command"]) -> str:
    return f"timeout waiting for input from {relay} during {stage}"


@_event
def write_timeout(relay: str) -> str:
    return f"timeout writing to {relay}: the client does not read its replies; closing connection"


@_event
def rcpt_flood(relay: str) -> str:
    return f"{relay}: Possible SMTP RCPT flood, throttling."


@_event
def bare_newline(relay: str, text: str) -> str:
    return f"{relay}: {text} in a command line (possible SMTP smuggling); closing connection"


@_event
def session_failed(relay: str, exc: BaseException) -> str:
    return f"session with {relay} failed: {exc!r}"


@_event
def connections_deferred(rate: int) -> str:
    """A connection waits for the next second's place in ``connection_rate_throttle``."""
    return f"deferring connections on daemon MTA: {rate} per second"


@_event
def accept_error(strerror: str | None) -> str:
    return f"accept: {strerror}; pausing 100 ms"


# -- PROXY listeners (before any session: the peer is the proxy) -------------------------------
@_event
def proxy_untrusted(peer: str, listener: str) -> str:
    """A connection to a PROXY listener from an address not in its ``proxy_trusted``."""
    return (
        f"PROXY protocol: connection from [{peer}] to {listener} refused: not a trusted proxy "
        "(proxy_trusted); closed before the greeting"
    )


@_event
def proxy_bad_header(peer: str, why: str) -> str:
    return f"PROXY protocol: bad header from proxy [{peer}]: {why}; connection closed"


@_event
def proxy_timeout(peer: str, seconds: float) -> str:
    return f"PROXY protocol: no header from proxy [{peer}] within {seconds:g} s; connection closed"


@_event
def proxy_local(peer: str, version: int) -> str:
    """v2 LOCAL or v1 UNKNOWN: the proxy's own connection (a health check), served as itself,
    with no client's rights (``policy.Client.unidentified``)."""
    name = "LOCAL" if version == 2 else "UNKNOWN"
    return (
        f"PROXY protocol: {name} connection from proxy [{peer}] (a health check; it may not relay)"
    )


@_event
def proxy_closed(peer: str) -> str:
    """The proxy connected and closed without a byte: a TCP health check."""
    return f"PROXY protocol: proxy [{peer}] closed the connection before a header (a TCP check)"


# -- milters: Sendmail's lines (milter.c, srvrsmtp.c) -------------------------------------------
def _prefixed(qid: str | None, text: str) -> str:
    return f"{qid}: {text}" if qid else text


@_event
def milter_connect_refused(host: str, addr: str, what: str) -> str:
    """A filter refused the connection: ``what`` is ``rejecting commands``, ``temp failing
    commands`` or ``shutdown``."""
    return f"Milter: connect: host={host}, addr={addr}, {what}"


@_event
def milter_reject(qid: str | None, what: str, reply: object) -> str:
    """``what``: ``helo=<name>``, ``from=<a>``, ``to=<b>``, ``cmd=data`` (the DATA command)
    or ``data`` (the end of the message)."""
    return _prefixed(qid, f"Milter: {what}, reject={reply}")


@_event
def milter_discard(qid: str | None, what: str) -> str:
    return _prefixed(qid, f"Milter: {what}, discard")


@_event
def milter_quarantine(qid: str, name: str, reason: str) -> str:
    return f"{qid}: milter={name}, quarantine={reason}"


@_event
def milter_failed(qid: str | None, name: str, problem: str, stage: str, action: str) -> str:
    """A filter is down, slow or wrong: its default action applies from ``stage`` on (with
    the queue id once a transaction has one, as Sendmail's)."""
    return _prefixed(qid, f"Milter ({name}): {problem}, where={stage}, default_action={action}")


@_event
def milter_verdict(qid: str | None, name: str, stage: str, verdict: str) -> str:
    """Every answer of every filter that ends an event (Sendmail's ``milter=…, action=…``
    lines, which it writes at MilterLogLevel 10): ``continue``, ``accepted``,
    ``reject=<reply>``, ``tempfail``, ``discard``, ``skip``, ``shutdown``, or
    ``failed`` for the default action of a filter that failed."""
    return _prefixed(qid, f"milter={name}, action={stage}, {verdict}")


@_event
def milter_header_added(qid: str, name: str, value: str) -> str:
    return f"{qid}: Milter add: header: {name}: {value.lstrip(' ')}"


@_event
def milter_header_inserted(qid: str, index: int, name: str, value: str) -> str:
    return f"{qid}: Milter insert ({index}): header: {name}: {value.lstrip(' ')}"


@_event
def milter_header_changed(qid: str, name: str, old: str, new: str) -> str:
    return f"{qid}: Milter change: header {name}: from {old.lstrip(' ')} to {new.lstrip(' ')}"


@_event
def milter_header_deleted(qid: str, name: str, old: str) -> str:
    return f"{qid}: Milter delete: header {name}:{old}"


@_event
def milter_header_change_added(qid: str, name: str, value: str) -> str:
    """A change of a header the message does not have: it is added (Sendmail, Postfix)."""
    return f"{qid}: Milter change (add): header: {name}: {value.lstrip(' ')}"


@_event
def milter_header_delete_noop(qid: str, name: str) -> str:
    return f"{qid}: Milter delete (noop): header: {name}"


@_event
def milter_sender_changed(qid: str, sender: str) -> str:
    return f"{qid}: Milter chgfrom: {sender}"


@_event
def milter_rcpt_added(qid: str, rcpt: str) -> str:
    return f"{qid}: Milter add: rcpt: {rcpt}"


@_event
def milter_rcpt_deleted(qid: str, rcpt: str) -> str:
    return f"{qid}: Milter delete: rcpt {rcpt}"


@_event
def milter_body_replaced(qid: str) -> str:
    return f"{qid}: Milter message: body replaced"


# -- the spool --------------------------------------------------------------------------------
@_event
def spool_error(qid: str, text: object) -> str:
    """A message being received could not be written or committed."""
    return f"{qid}: {text}"


@_event
def low_space(free: int, root: object, min_free: int) -> str:
    return f"low on space ({free} bytes free in {root}, min_free is {min_free}): refusing mail"


@_event
def space_available(free: int, root: object) -> str:
    return f"space available again ({free} bytes free in {root}): accepting mail"


@_event
def recover_failed(path: object, why: object) -> str:
    return f"cannot recover {path}: {why}; left for the next start"


@_event
def recovered(n: int, where: object) -> str:
    return f"recovered {n} queued message(s) from {where}"


@_event
def recovered_incoming(n: int, where: object) -> str:
    return f"recovered {n} acknowledged message(s) from {where}/incoming"


@_event
def queue_scan(n: int, where: object) -> str:
    return f"queue run: {n} message(s) found in {where} that no runner here had"


@_event
def queue_pass_failed(where: object, exc: Exception) -> str:
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
    return f"cannot read the queue folder {where}: {why}; trying again in 60 s"


@_event
def due_taken(n: int, where: object) -> str:
    return f"{n} message(s) marked due in {where}/due: attempting now"


# -- the queue tools (mailgate hold, release, delete, requeue): Postfix's postsuper lines ------
@_event
def placed_on_hold(qid: str, reason: str) -> str:
    return f"{qid}: placed on hold" + (f", reason={reason}" if reason else "")


@_event
def released_from_hold(qid: str) -> str:
    return f"{qid}: released from hold"


@_event
def deleted(qid: str) -> str:
    """``mailgate delete``: postsuper's line, the text of `removed` (the end of a queue id's
    life for a log parser); the event's name, in the JSON copy, and the tool's pid tell the
    two apart."""
    return f"{qid}: removed"


@_event
def requeued(qid: str) -> str:
    return f"{qid}: requeued"


# -- delivery ---------------------------------------------------------------------------------
@_event
def queue_read(client: str, what: str, entries: int, complete: bool) -> str:
    cut = "" if complete else " (cut short: the client went away or was too slow)"
    return f"{what} read by {client}: {entries} entries{cut}"


@_event
def queue_read_refused(client: str, what: str, why: str) -> str:
    return f"{what} refused to {client}: {why}"


@_event
def starttls_client(relay: str, session: TlsSession) -> str:
    return f"STARTTLS=client, relay={relay}, {session.for_maillog()}"


@_event
def starttls_client_failed(relay: str, why: object) -> str:
    return f"STARTTLS=client, error: {why}, relay={relay}; going on in clear"


@_event
def held_skipped(qid: str) -> str:
    """An attempt found the message on hold (debug: a queue run may meet thousands)."""
    return f"{qid}: on hold, not attempted"


@_event
def attempt_failed(qid: str, exc: BaseException) -> str:
    return f"{qid}: delivery attempt failed: {exc!r}"


@_event
def status_write_failed(qid: str, exc: BaseException) -> str:
    return f"{qid}: cannot record the delivery status: {exc}"


@_event
def postmaster_notify_failed(qid: str, reason: str) -> str:
    return f"{qid}: postmaster notify undeliverable, not reported again: {reason}"


@_event
def bounce_queue_failed(qid: str, exc: BaseException) -> str:
    return f"{qid}: cannot queue the bounce, will try again: {exc}"


@_event
def receipt_queue_failed(qid: str, exc: BaseException) -> str:
    return f"{qid}: cannot queue the return receipt: {exc}"


@_event
def warning_queue_failed(qid: str, exc: BaseException) -> str:
    return f"{qid}: cannot queue the delay warning: {exc}"


# -- the daemon -------------------------------------------------------------------------------
@_event
def daemon_started(listen: str, source: object, spool_dir: object, workers: int = 1) -> str:
    line = f"starting daemon (mailgate): SMTP on {listen}, config {source}, queue {spool_dir}"
    return line + (f", {workers} workers" if workers > 1 else "")


@_event
def start_failed(why: object) -> str:
    return f"cannot start: {why}"


@_event
def stale_pid_file(path: object, pid: int) -> str:
    return f"pid file {path} named pid {pid}, which is not running: taken over"


@_event
def stopping(grace: float) -> str:
    return (
        "stopping: no new connections; sessions finish their transaction and deliveries in"
        f" progress go on for up to {grace:g} s"
    )


@_event
def draining() -> str:
    return (
        "draining (mailgate drain): new sessions get 421 4.3.2, sessions in progress finish, "
        "the queue is delivered now"
    )


@_event
def drained() -> str:
    return "drained: no session in a transaction, nothing queued; stopping"


@_event
def handover_done(target: str, sent: int, kept: int) -> str:
    return f"handover to {target}: {sent} messages handed over, {kept} still queued here"


@_event
def stop_deadline(sessions: int) -> str:
    return f"stop: {sessions} sessions still open at the deadline: closed with 421"


@_event
def config_warning(w: object) -> str:
    return f"warning: {w}"


@_event
def reload_refused(err: object) -> str:
    return f"reload refused, keeping the running configuration: {err}"


@_event
def reloaded(source: object) -> str:
    return f"configuration reloaded from {source}"


@_event
def restart_needed() -> str:
    return (
        "listen, spool_dir, workers and [metrics] listen changes take effect only after a restart"
    )


@_event
def stress_started(open_now: int, max_connections: int, stress_timeout: float) -> str:
    return (
        f"stress: {open_now} of {max_connections} sessions open; command and DATA "
        f"timeouts now {stress_timeout:g}s"
    )


@_event
def stress_ended(
    open_now: int, max_connections: int, command_timeout: float, data_timeout: float
) -> str:
    return (
        f"stress over: {open_now} of {max_connections} sessions open; timeouts back "
        f"to {command_timeout:g}s / {data_timeout:g}s"
    )


@_event
def statistics(counters: dict[str, int], sessions_now: int, queued: int, delivering: int) -> str:
    """One line of counters, like Postfix's anvil statistics, in the order given."""
    text = ", ".join(f"{n}={v}" for n, v in counters.items())
    return (
        f"statistics: {text}, sessions_now={sessions_now}, queued={queued}, delivering={delivering}"
    )


@_event
def worker_started(index: int) -> str:
    return f"worker {index} started"


@_event
def worker_failed(index: int, exc: BaseException) -> str:
    return f"worker {index} failed: {exc!r}"


@_event
def worker_exited(index: int, pid: int, status: int, *, restart: bool = True) -> str:
    """``status`` as waitpid gives it: "killed by signal 9" or "exited with status 1"."""
    code = os.waitstatus_to_exitcode(status)
    how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
    return f"worker {index} (pid {pid}) {how}" + ("; restarting it" if restart else "")


@_event
def worker_hung(index: int, pid: int, seconds: float) -> str:
    return (
        f"worker {index} (pid {pid}) has not stopped {seconds:g} s after the stop began: "
        "killing it; what it acknowledged stays in the spool"
    )


# -- the log itself, and the libraries we run on ----------------------------------------------
@_event
def lines_dropped(count: int, where: str) -> str:
    return f"log: {count} line{'s' if count != 1 else ''} lost: {where} could not take them"


@_event
def log_open_failed(exc: OSError) -> str:
    return f"log: cannot open {exc.filename}: {exc.strerror}; lines go where they went"


@_event
def library_warning(logger: str, text: str) -> str:
    return f"{logger}: {text}"


@_event
def library_error(logger: str, text: str) -> str:
    return f"{logger}: {text}"
