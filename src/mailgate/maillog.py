"""Sendmail-style maillog lines, one function per event, so admins' log parsers keep working.

Lines go to stderr by default (``[log] file`` sends them to a file) with a syslog-like prefix:
``Nov 24 19:21:00 gateway mailgate[1234]: 6AOJL6hk004507: from=<a@b>, size=78, ...``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

logger = logging.getLogger("mailgate")


class _SyslogFormatter(logging.Formatter):
    def __init__(self, hostname: str) -> None:
        super().__init__()
        self.hostname = hostname.split(".")[0]

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%b %e %H:%M:%S", time.localtime(record.created))
        return f"{stamp} {self.hostname} mailgate[{os.getpid()}]: {record.getMessage()}"


def setup(hostname: str, file: Path | None = None, level: str = "info") -> None:
    """Send log lines to ``file`` or stderr; safe to call again on reload."""
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    handler: logging.Handler = (
        logging.FileHandler(file, encoding="utf-8") if file else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(_SyslogFormatter(hostname))
    logger.addHandler(handler)
    logger.setLevel(getattr(logging, level.upper(), logging.INFO))
    logger.propagate = False


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
    logger.info(f"{msg}, proto={proto}, daemon=MTA, relay={relay}")


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
    logger.info(", ".join(parts))


def reject(qid: str | None, ruleset: str, arg1: str, relay: str, reply: str) -> None:
    prefix = f"{qid}: " if qid else ""
    logger.info(f"{prefix}ruleset={ruleset}, arg1={_clean(arg1)}, relay={relay}, "
                f"reject={_clean(reply)}")


def discard(qid: str | None, ruleset: str, arg1: str, relay: str) -> None:
    prefix = f"{qid}: " if qid else ""
    logger.info(f"{prefix}ruleset={ruleset}, arg1={_clean(arg1)}, relay={relay}, discard")


def dsn_created(qid: str, bounce_qid: str, reason: str) -> None:
    logger.info(f"{qid}: {bounce_qid}: DSN: {_clean(reason)}")


def info(text: str) -> None:
    logger.info(_clean(text))


def warning(text: str) -> None:
    logger.warning(_clean(text))


def error(text: str) -> None:
    logger.error(_clean(text))
