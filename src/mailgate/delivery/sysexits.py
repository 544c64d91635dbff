"""A mailer program's exit status → the reply it means, as Sendmail's ``giveresponse`` and
``markfailure`` (deliver.c) read it, for the program mailers (``prog``, the UUCP mailers).

0 is delivered. The sysexits.h codes 64-78 have Sendmail's texts (sysexits.c ``SysExMsg``);
of them ``EX_OSERR``, ``EX_IOERR`` and ``EX_TEMPFAIL`` are 4xx, so the recipient is queued
and tried again, as markfailure queues exactly those three; every other code bounces, a code
outside sysexits.h as ``554 5.3.0 unknown mailer error N``. Death by a signal is temporary
(endmailer returns ``EX_TEMPFAIL``). The first line the program wrote to stderr, when there
is one, is added to the text: Sendmail puts the program's output in the bounce's transcript;
here it is in the reply, so the maillog line and the bounce both show it.
"""

from __future__ import annotations

import os

from mailgate.reply import Reply

__all__ = ["EX_TEMPFAIL", "SYSEXITS", "dsn_exit_status", "exit_reply"]

EX_TEMPFAIL = 75

SYSEXITS: dict[int, Reply] = {
    64: Reply(500, "5.0.0", "Bad usage"),  # EX_USAGE
    65: Reply(501, "5.6.0", "Data format error"),  # EX_DATAERR
    66: Reply(550, "5.3.0", "Cannot open input"),  # EX_NOINPUT
    67: Reply(550, "5.1.1", "User unknown"),  # EX_NOUSER
    68: Reply(550, "5.1.2", "Host unknown"),  # EX_NOHOST
    69: Reply(554, "5.0.0", "Service unavailable"),  # EX_UNAVAILABLE
    70: Reply(554, "5.3.0", "Internal error"),  # EX_SOFTWARE
    71: Reply(451, "4.0.0", "Operating system error"),  # EX_OSERR: queued
    72: Reply(554, "5.3.5", "System file missing"),  # EX_OSFILE
    73: Reply(550, "5.0.0", "Can't create output"),  # EX_CANTCREAT
    74: Reply(451, "4.0.0", "I/O error"),  # EX_IOERR: queued
    EX_TEMPFAIL: Reply(450, "4.0.0", "Deferred"),  # queued
    76: Reply(554, "5.5.0", "Remote protocol error"),  # EX_PROTOCOL
    77: Reply(550, "5.0.0", "Insufficient permission"),  # EX_NOPERM
    78: Reply(554, "5.3.5", "Local configuration error"),  # EX_CONFIG
}


def exit_reply(status: int, mailer: str, stderr_line: str = "") -> Reply | None:
    """What ``status`` (a returncode: negative = killed by that signal) of ``mailer`` means;
    None when it delivered."""
    if status == 0:
        return None
    if status < 0:
        reply = Reply(451, "4.3.0", f"mailer {mailer} died with signal {-status}")
    else:
        reply = SYSEXITS.get(status) or Reply(554, "5.3.0", f"unknown mailer error {status}")
    if stderr_line:
        reply = Reply(reply.code, reply.enhanced, f"{reply.text}: {stderr_line}")
    return reply


# Sendmail's dsntoexitstat (deliver.c): the exit status of a permanent failure, from its
# enhanced code's subject and detail; a pair not listed falls back to the subject's entry,
# then to EX_UNAVAILABLE. Checked against sendmail -bv over the error mailer.
_EXIT_BY_DETAIL: dict[tuple[int, int], int] = {
    (1, 0): os.EX_DATAERR,
    (1, 1): os.EX_NOUSER,
    (1, 6): os.EX_NOUSER,
    (1, 2): os.EX_NOHOST,
    (1, 8): os.EX_NOHOST,
    (1, 3): os.EX_USAGE,
    (1, 7): os.EX_USAGE,
    (1, 5): os.EX_CONFIG,
    (2, 3): os.EX_DATAERR,
    (4, 0): os.EX_IOERR,
    (4, 2): os.EX_IOERR,
    (4, 1): EX_TEMPFAIL,
    (4, 3): EX_TEMPFAIL,
    (4, 5): EX_TEMPFAIL,
    (4, 4): os.EX_PROTOCOL,
    (4, 6): os.EX_CONFIG,
}
_EXIT_BY_SUBJECT = {3: os.EX_OSERR, 5: os.EX_PROTOCOL, 7: os.EX_DATAERR}


def dsn_exit_status(reply: Reply) -> int:
    """The sysexits.h status Sendmail's command line exits with for a refusal ``reply``:
    EX_TEMPFAIL for a 4xx, else by its enhanced code (EX_NOUSER for 5.1.1)."""
    if reply.code < 500:
        return EX_TEMPFAIL
    if reply.enhanced is None:
        return os.EX_UNAVAILABLE
    try:
        subject, detail = (int(part) for part in reply.enhanced.split(".")[1:3])
    except ValueError:
        return os.EX_UNAVAILABLE
    status = _EXIT_BY_DETAIL.get((subject, detail))
    return status if status is not None else _EXIT_BY_SUBJECT.get(subject, os.EX_UNAVAILABLE)
