"""Sendmail-style maillog lines, one function per event, so admins' log parsers keep working.

Lines go to stderr by default (``[log] file`` sends them to a file) with a syslog-like prefix:
``Nov 24 19:21:00 gateway mailgate[1234]: 6AOJL6hk004507: from=<a@b>, size=78, ...``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

_LEVELS = {"debug": 10, "info": 20, "notice": 25, "warning": 30, "error": 40}


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
        self.level = _LEVELS.get(level.lower(), _LEVELS["info"])

    def write(self, level: int, text: str) -> None:
        if level < self.level:
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


_writer = _Writer()
os.register_at_fork(after_in_child=_writer.after_fork)


class _LibraryHandler(logging.Handler):
    """Warnings of the libraries we run on (asyncio, dnspython) go to the maillog as one
    line each, never as a traceback on stderr behind the admin's back."""

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            text += f": {record.exc_info[1]!r}"
        _writer.write(record.levelno, text.replace("\n", " "))


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


def _clean(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


def received(qid: str, sender: str, size: int, nrcpts: int, msgid: str | None, proto: str,
             relay: str) -> None:
    msg = f"{qid}: from=<{sender}>, size={size}, class=0, nrcpts={nrcpts}"
    if msgid:
        msg += f", msgid={_clean(msgid)}"
    _writer.write(20, f"{msg}, proto={proto}, daemon=MTA, relay={relay}")


def delivery(qid: str, to: str, *, delay: float, xdelay: float, mailer: str, relay: str | None,
             dsn: str, stat: str, reply: str | None = None, ctladdr: str | None = None) -> None:
    parts = [f"{qid}: to=<{to}>"]
    if ctladdr:
        parts.append(f"ctladdr=<{ctladdr}>")
    parts += [f"delay={format_delay(delay)}", f"xdelay={format_delay(xdelay)}",
              f"mailer={mailer}"]
    if relay:
        parts.append(f"relay={relay}")
    parts.append(f"dsn={dsn}")
    if reply:
        parts.append(f"reply={_clean(reply)}")
    parts.append(f"stat={_clean(stat)}")
    _writer.write(20, ", ".join(parts))


def reject(qid: str | None, ruleset: str, arg1: str, relay: str, reply: str) -> None:
    prefix = f"{qid}: " if qid else ""
    _writer.write(25, f"{prefix}ruleset={ruleset}, arg1={_clean(arg1)}, relay={relay}, "
                      f"reject={_clean(reply)}")


def discard(qid: str | None, ruleset: str, arg1: str, relay: str) -> None:
    prefix = f"{qid}: " if qid else ""
    _writer.write(25, f"{prefix}ruleset={ruleset}, arg1={_clean(arg1)}, relay={relay}, discard")


def dsn_created(qid: str, bounce_qid: str, reason: str) -> None:
    _writer.write(20, f"{qid}: {bounce_qid}: DSN: {_clean(reason)}")


def info(text: str) -> None:
    _writer.write(20, _clean(text))


def warning(text: str) -> None:
    _writer.write(30, _clean(text))


def error(text: str) -> None:
    _writer.write(40, _clean(text))
