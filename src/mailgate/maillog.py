"""Sendmail-style maillog lines, one function per event, so admins' log parsers keep working.

Lines go to stderr by default (``[log] file`` sends them to a file) with a syslog-like prefix:
``Nov 24 19:21:00 gateway mailgate[1234]: 6AOJL6hk004507: from=<a@b>, size=78, ...``.

Every line the gateway writes is built here, by a function named for its event; a call site
passes facts (a queue id, a relay, a reply), never a formatted line. Each event states its
severity by name, the one syslog would get: ``info`` for the from=/to= lines and routine
events, ``notice`` for refusals and protocol abuse, ``warning`` and ``error`` for trouble.
To add a line: write one function in the section it belongs to, call ``_log(level, text)``
(which flattens CR/LF), and keep its text stable once shipped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeGuard, get_args

if TYPE_CHECKING:
    from mailgate.tls import Session as TlsSession

Level = Literal["debug", "info", "notice", "warning", "error"]
"""Severity by name; the syslog priorities of the same names (``error`` is ``LOG_ERR``)."""

_LEVELS: dict[Level, int] = {"debug": 10, "info": 20, "notice": 25, "warning": 30, "error": 40}


class _Writer:
    """One ``write`` per line to an O_APPEND descriptor: lines from several workers never
    interleave, nothing is buffered (an admin tailing the log sees each line at once), and a
    busy gateway pays one system call per line and no logging-framework overhead."""

    def __init__(self) -> None:
        self.fd = 2  # stderr until setup() says otherwise
        self.own_fd = False
        self.host = "localhost"
        self.level = _LEVELS["info"]
        self.pid = os.getpid()
        self.second = -1
        self.stamp = ""

    def setup(self, hostname: str, file: Path | None, level: str) -> None:
        fd = 2
        if file is not None:
            fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        if self.own_fd:
            os.close(self.fd)
        self.fd, self.own_fd = fd, file is not None
        self.host = hostname.split(".")[0]
        name = level.lower()
        self.level = _LEVELS[name] if _is_level(name) else _LEVELS["info"]

    def write(self, level: Level, text: str) -> None:
        if _LEVELS[level] < self.level:
            return
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.stamp = time.strftime("%b %e %H:%M:%S", time.localtime(now))
        line = f"{self.stamp} {self.host} mailgate[{self.pid}]: {text}\n"
        with contextlib.suppress(OSError):  # a full log disk must not stop the mail
            os.write(self.fd, line.encode("utf-8", "replace"))

    def after_fork(self) -> None:
        self.pid = os.getpid()


def _is_level(name: str) -> TypeGuard[Level]:
    return name in get_args(Level)


_writer = _Writer()
os.register_at_fork(after_in_child=_writer.after_fork)


class _LibraryHandler(logging.Handler):
    """Warnings of the libraries we run on (asyncio, dnspython) go to the maillog as one
    line each, never as a traceback on stderr behind the admin's back."""

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            text += f": {record.exc_info[1]!r}"
        _writer.write(_level_of(record.levelno), text.replace("\n", " "))


def _level_of(levelno: int) -> Level:
    """Python logging's numeric level → ours (CRITICAL is an error here too)."""
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warning"
    if levelno >= logging.INFO:
        return "info"
    return "debug"


_library_handler = _LibraryHandler(logging.WARNING)


def setup(hostname: str, file: Path | None = None, level: str = "info") -> None:
    """Send log lines to ``file`` or stderr; safe to call again on reload."""
    _writer.setup(hostname, file, level)
    root = logging.getLogger()
    if _library_handler not in root.handlers:
        root.addHandler(_library_handler)


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


def _log(level: Level, text: str) -> None:
    """One line, CR/LF flattened (it may hold a peer's or an exception's text)."""
    _writer.write(level, _clean(text))


# -- Sendmail's message lines (parsed by admins' tools: keep the formats) ---------------------
def received(
    qid: str, sender: str, size: int, nrcpts: int, msgid: str | None, proto: str, relay: str
) -> None:
    msg = f"{qid}: from=<{sender}>, size={size}, class=0, nrcpts={nrcpts}"
    if msgid:
        msg += f", msgid={_clean(msgid)}"
    _writer.write("info", f"{msg}, proto={proto}, daemon=MTA, relay={relay}")


def delivery(
    qid: str,
    to: str,
    *,
    delay: float,
    xdelay: float,
    mailer: str,
    relay: str | None,
    dsn: str,
    stat: str,
    reply: str | None = None,
    ctladdr: str | None = None,
) -> None:
    parts = [f"{qid}: to=<{to}>"]
    if ctladdr:
        parts.append(f"ctladdr=<{ctladdr}>")
    parts += [f"delay={format_delay(delay)}", f"xdelay={format_delay(xdelay)}", f"mailer={mailer}"]
    if relay:
        parts.append(f"relay={relay}")
    parts.append(f"dsn={dsn}")
    if reply:
        parts.append(f"reply={_clean(reply)}")
    parts.append(f"stat={_clean(stat)}")
    _writer.write("info", ", ".join(parts))


def reject(qid: str | None, ruleset: str, arg1: str, relay: str, reply: str) -> None:
    prefix = f"{qid}: " if qid else ""
    _writer.write(
        "notice",
        f"{prefix}ruleset={ruleset}, arg1={_clean(arg1)}, relay={relay}, reject={_clean(reply)}",
    )


def discard(qid: str | None, ruleset: str, arg1: str, relay: str) -> None:
    prefix = f"{qid}: " if qid else ""
    _writer.write(
        "notice", f"{prefix}ruleset={ruleset}, arg1={_clean(arg1)}, relay={relay}, discard"
    )


def dsn_created(qid: str, bounce_qid: str, reason: str) -> None:
    _writer.write("info", f"{qid}: {bounce_qid}: DSN: {_clean(reason)}")


# -- the SMTP server's sessions ---------------------------------------------------------------
def early_talker(relay: str, ip: str, seconds: float) -> None:
    _log(
        "info",
        f"rejecting commands from {relay} [{ip}] due to pre-greeting traffic after "
        f"{seconds} seconds",
    )


def improper_pipelining(relay: str, nbytes: int) -> None:
    _log(
        "info",
        f"improper command pipelining after DATA from {relay}: {nbytes} bytes sent before the 354",
    )


def auth_warning(host: str, text: str) -> None:
    _log("info", f"Authentication-Warning: {host}: {text}")


def message_refused(qid: str, relay: str, reply: object) -> None:
    _log("notice", f"{qid}: message from {relay} refused: {reply}")


def starttls_server(relay: str, session: TlsSession) -> None:
    _log("info", f"STARTTLS=server, relay={relay}, {session.for_maillog()}")


def starttls_accept_failed(relay: str, why: str) -> None:
    _log("warning", f"STARTTLS=server, error: accept failed={why}, relay={relay}")


def tls_read_failed(relay: str, exc: BaseException | None) -> None:
    _log("warning", f"STARTTLS=server, error: read failed={exc!r}, relay={relay}")


def starttls_plaintext_dropped(relay: str, nbytes: int) -> None:
    _log(
        "notice",
        f"STARTTLS=server, relay={relay}: {nbytes} bytes of plaintext pipelined "
        "after STARTTLS discarded",
    )


def input_timeout(relay: str, stage: Literal["DATA", "command"]) -> None:
    _log("notice", f"timeout waiting for input from {relay} during {stage}")


def write_timeout(relay: str) -> None:
    _log(
        "notice",
        f"timeout writing to {relay}: the client does not read its replies; closing connection",
    )


def rcpt_flood(relay: str) -> None:
    _log("notice", f"{relay}: Possible SMTP RCPT flood, throttling.")


def bare_newline(relay: str, text: str) -> None:
    _log(
        "notice", f"{relay}: {text} in a command line (possible SMTP smuggling); closing connection"
    )


def session_failed(relay: str, exc: BaseException) -> None:
    _log("error", f"session with {relay} failed: {exc!r}")


def accept_error(strerror: str | None) -> None:
    _log("error", f"accept: {strerror}; pausing 100 ms")


# -- the spool --------------------------------------------------------------------------------
def spool_error(qid: str, text: object) -> None:
    """A message being received could not be written or committed."""
    _log("error", f"{qid}: {text}")


def low_space(free: int, root: object, min_free: int) -> None:
    _log(
        "warning",
        f"low on space ({free} bytes free in {root}, min_free is {min_free}): refusing mail",
    )


def space_available(free: int, root: object) -> None:
    _log("info", f"space available again ({free} bytes free in {root}): accepting mail")


def recover_failed(path: object, why: object) -> None:
    _log("error", f"cannot recover {path}: {why}; left for the next start")


def recovered(n: int, where: object) -> None:
    _log("info", f"recovered {n} queued message(s) from {where}")


def recovered_incoming(n: int, where: object) -> None:
    _log("info", f"recovered {n} acknowledged message(s) from {where}/incoming")


def queue_scan(n: int, where: object) -> None:
    _log("info", f"queue run: {n} message(s) found in {where} that no runner here had")


def due_taken(n: int, where: object) -> None:
    _log("info", f"{n} message(s) marked due in {where}/due: attempting now")


# -- the queue tools (mailgate hold, release, delete, requeue): Postfix's postsuper lines ------
def placed_on_hold(qid: str, reason: str) -> None:
    _log("info", f"{qid}: placed on hold" + (f", reason={reason}" if reason else ""))


def released_from_hold(qid: str) -> None:
    _log("info", f"{qid}: released from hold")


def removed(qid: str) -> None:
    _log("info", f"{qid}: removed")


def requeued(qid: str) -> None:
    _log("info", f"{qid}: requeued")


# -- delivery ---------------------------------------------------------------------------------
def starttls_client(relay: str, session: TlsSession) -> None:
    _log("info", f"STARTTLS=client, relay={relay}, {session.for_maillog()}")


def starttls_client_failed(relay: str, why: object) -> None:
    _log("warning", f"STARTTLS=client, error: {why}, relay={relay}; going on in clear")


def held_skipped(qid: str) -> None:
    """An attempt found the message on hold (debug: a queue run may meet thousands)."""
    _log("debug", f"{qid}: on hold, not attempted")


def attempt_failed(qid: str, exc: BaseException) -> None:
    _log("error", f"{qid}: delivery attempt failed: {exc!r}")


def status_write_failed(qid: str, exc: BaseException) -> None:
    _log("error", f"{qid}: cannot record the delivery status: {exc}")


def bounce_not_sent(qid: str, reason: str) -> None:
    _log("info", f"{qid}: bounce for null sender not sent: {reason}")


def bounce_queue_failed(qid: str, exc: BaseException) -> None:
    _log("error", f"{qid}: cannot queue the bounce, will try again: {exc}")


def receipt_queue_failed(qid: str, exc: BaseException) -> None:
    _log("error", f"{qid}: cannot queue the return receipt: {exc}")


def warning_queue_failed(qid: str, exc: BaseException) -> None:
    _log("error", f"{qid}: cannot queue the delay warning: {exc}")


# -- the daemon -------------------------------------------------------------------------------
def daemon_started(listen: str, source: object, spool_dir: object) -> None:
    _log(
        "info", f"starting daemon (mailgate): SMTP on {listen}, config {source}, queue {spool_dir}"
    )


def stopping() -> None:
    _log("info", "stopping: no new connections, finishing deliveries in progress")


def config_warning(w: object) -> None:
    _log("warning", f"warning: {w}")


def reload_refused(err: object) -> None:
    _log("error", f"reload refused, keeping the running configuration: {err}")


def reloaded(source: object) -> None:
    _log("info", f"configuration reloaded from {source}")


def restart_needed() -> None:
    _log("warning", "listen and spool_dir changes take effect only after a restart")


def stress_started(open_now: int, max_connections: int, stress_timeout: float) -> None:
    _log(
        "warning",
        f"stress: {open_now} of {max_connections} sessions open; command and DATA "
        f"timeouts now {stress_timeout:g}s",
    )


def stress_ended(
    open_now: int, max_connections: int, command_timeout: float, data_timeout: float
) -> None:
    _log(
        "info",
        f"stress over: {open_now} of {max_connections} sessions open; timeouts back "
        f"to {command_timeout:g}s / {data_timeout:g}s",
    )


def statistics(counters: dict[str, int], sessions_now: int, queued: int, delivering: int) -> None:
    """One line of counters, like Postfix's anvil statistics, in the order given."""
    text = ", ".join(f"{n}={v}" for n, v in counters.items())
    _log(
        "info",
        f"statistics: {text}, sessions_now={sessions_now}, queued={queued}, "
        f"delivering={delivering}",
    )


def master_started(pid: int, n: int) -> None:
    _log("info", f"master {pid}: {n} workers")


def worker_failed(index: int, exc: BaseException) -> None:
    _log("error", f"worker {index} failed: {exc!r}")


def worker_exited(index: int, pid: int, status: int) -> None:
    _log("error", f"worker {index} (pid {pid}) exited with status {status}; restarting it")
