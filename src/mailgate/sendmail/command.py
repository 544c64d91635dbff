"""``mailgate sendmail …`` (and ``sendmail``, ``mailq``, ``newaliases`` by the name it is called
by): which mode does what, and the exit statuses (sysexits.h, as sendmail's).

Most modes are other ``mailgate`` subcommands, run through ``subcommand`` (the ``mailgate``
command's own entry point), so that they are the same code and take on what those commands
learn: ``-bp`` is ``mailgate mailq`` (``-v``, ``-qQ``, ``-qR``/``-qS``/``-qI`` its ``-v``,
``--quarantined``, ``--recipient``/``--sender``/``--id``), ``-q [-v]`` ``mailgate flush
[-v]`` (``-qR``/``-qI`` its ``--domain``/``--id``), ``-bd`` ``mailgate serve --daemon``
and ``-bD`` ``mailgate serve`` (``-q30m``: with that queue run interval), ``-bi`` ``mailgate
newaliases``, ``-bt`` ``mailgate route``. ``-bm`` (local submission) and ``-bv`` are ``submit``'s.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import BinaryIO, TextIO

from mailgate import config, maillog
from mailgate.config import ConfigError, Override
from mailgate.queue.tools import wake_daemon
from mailgate.sendmail import CONFIG_VARIABLE, PROGRAMS, options
from mailgate.sendmail.submit import (
    Refused,
    Submission,
    SubmitError,
    split_addresses,
    verify,
    who_am_i,
)
from mailgate.snapshot import Snapshot, load_snapshot
from mailgate.tables.maps import TableError

# ``mailgate``'s own main for a subcommand's argv; None when it has no such subcommand.
Subcommand = Callable[[Sequence[str]], int | None]

# The config without -C, as sendmail reads /etc/mail/sendmail.cf: not mailgate's embedded
# default (its spool is relative to the working folder, where cron's mail would be lost).
# MAILGATE_CONFIG names another, as Postfix's sendmail takes MAIL_CONFIG.
DEFAULT_CONFIG = "/etc/mail/mailgate.toml"
_ROUTE_BATCH = 1000  # -bt addresses from a file, routed this many at a time
TEST_BANNER = (
    "ADDRESS TEST MODE: each address is routed as Sendmail's /parse routes it\n"
    "Enter <address>, <ruleset> <address> or /parse <address>; /quit or end of input ends"
)


def run(
    argv: Sequence[str],
    subcommand: Subcommand,
    *,
    program: str = "sendmail",
    stdin: BinaryIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run sendmail's command line ``argv`` (without the program name) as ``program``."""
    err = stderr or sys.stderr
    try:
        return _run(argv, subcommand, program, stdin or sys.stdin.buffer, stdout or sys.stdout, err)
    except Exception as exc:  # a bug: the caller gets sendmail's status for one, not 1
        print(f"{program}: internal error: {exc!r}", file=err)
        return os.EX_SOFTWARE


def _run(
    argv: Sequence[str],
    subcommand: Subcommand,
    program: str,
    stdin: BinaryIO,
    out: TextIO,
    err: TextIO,
) -> int:
    try:
        inv = options.parse([*PROGRAMS.get(program, ()), *argv])
    except options.UsageError as exc:
        print(f"{program}: {exc}", file=err)
        return os.EX_USAGE
    overrides = list(inv.overrides)
    if inv.queue_interval is not None:
        overrides.append(
            Override("queue", "run_interval", inv.queue_interval, f"-q{inv.queue_interval}")
        )
    config.set_command_line(overrides)
    path = inv.config or os.environ.get(CONFIG_VARIABLE) or DEFAULT_CONFIG
    try:
        snap = load_snapshot(path)
    except (ConfigError, TableError) as exc:
        print(f"{program}: {exc}", file=err)
        return os.EX_CONFIG
    base = ["-c", path]
    mode = inv.mode
    if inv.queue_interval is not None and mode == "deliver":
        mode = "daemon"  # -q30m alone: Sendmail's queue-runner daemon (ours listens too)
    elif inv.run_queue and mode == "deliver":
        mode = "flush"
    if mode == "mailq":
        chosen = [
            *(["-v"] if inv.verbose else []),
            *(["--quarantined"] if inv.quarantined else []),
            *(f"--id={q}" for q in inv.queue_ids),
            *(f"--recipient={r}" for r in inv.queue_recipients),
            *(f"--sender={s}" for s in inv.queue_senders),
        ]
        return _delegate(subcommand, ["mailq", *base, *chosen], program, err)
    if mode == "flush":
        only = [
            *(f"--domain={d}" for d in inv.queue_domains),
            *(f"--id={q}" for q in inv.queue_ids),
        ]
        verbose = ["-v"] if inv.verbose else []
        return _delegate(subcommand, ["flush", *base, *verbose, *only], program, err)
    if mode in ("serve", "daemon"):
        detach = ["--daemon"] if mode == "daemon" else []
        return _delegate(subcommand, ["serve", *base, *detach], program, err, failure=os.EX_OSERR)
    if mode == "newaliases":
        return _delegate(subcommand, ["newaliases", *base], program, err)
    if mode == "route":
        return _address_test(inv.recipients, stdin, subcommand, base, out, err, program)
    if mode == "verify":
        return _verify(inv.recipients, snap, out, err, program)
    return _deliver(inv, snap, stdin, err, program)


def _delegate(
    subcommand: Subcommand,
    argv: list[str],
    program: str,
    err: TextIO,
    *,
    failure: int = os.EX_SOFTWARE,
) -> int:
    """Run a mailgate subcommand; its status as a sysexits one."""
    try:
        status = subcommand(argv)
    except SystemExit as exc:  # its config no longer loads (edited meanwhile)
        return os.EX_CONFIG if exc.code else os.EX_OK
    except OSError as exc:  # the spool is not this user's to read, say
        print(f"{program}: {exc}", file=err)
        return os.EX_NOPERM if exc.errno in (errno.EACCES, errno.EPERM) else os.EX_OSERR
    if status is None:
        print(f"{program}: this mailgate has no '{argv[0]}' command", file=err)
        return os.EX_UNAVAILABLE
    if status == 0 or os.EX_USAGE <= status <= os.EX_CONFIG:
        return status
    return failure


def _deliver(
    inv: options.Invocation, snap: Snapshot, stdin: BinaryIO, err: TextIO, program: str
) -> int:
    cfg = snap.config
    log = replace(cfg.log, json=cfg.log.json and cfg.log.json_file is not None)
    if (log.target or ("file" if log.file else "stderr")) == "stderr":
        log = replace(log, level="error")  # stderr is the caller's: only what went wrong
    try:
        maillog.setup(cfg.hostname, log)
    except OSError as exc:  # the log is the daemon's: the message goes in without its line
        print(f"{program}: cannot open the log ({exc.strerror}); queueing anyway", file=err)
        quiet = replace(log, target="stderr", file=None, level="error", json=False)
        maillog.setup(cfg.hostname, quiet)
    read = getattr(stdin, "read1", stdin.read)
    try:
        result = Submission(inv, snap, who_am_i(), read).run()
    except SubmitError as exc:
        print(f"{program}: {exc}", file=err)
        return exc.status
    for refused in result.refused:
        print(str(refused), file=err)
    if result.qid:
        told = wake_daemon(cfg.pid_file) is not None
        if inv.verbose:
            print(
                f"{result.qid}: queued"
                + ("; the daemon was told" if told else "; the daemon takes it at its next run"),
                file=err,
            )
    return result.status


def _verify(recipients: list[str], snap: Snapshot, out: TextIO, err: TextIO, program: str) -> int:
    if not recipients:
        print(f"{program}: Recipient names must be specified", file=err)
        return os.EX_USAGE
    status = os.EX_OK
    for arg in recipients:
        for raw in split_addresses(arg) or [arg]:
            for line in verify(raw, snap):
                if isinstance(line, Refused):
                    status = max(status, line.status)
                print(str(line), file=out)
    return status


def _test_lines(stdin: BinaryIO, out: TextIO, err: TextIO, interactive: bool) -> Iterator[str]:
    """The addresses typed in address test mode: ``addr``, ``3,0 addr`` (the rulesets are
    not run: the address is routed whole), ``/parse addr``; ``/quit`` ends."""
    while True:
        if interactive:
            print("> ", end="", file=out, flush=True)
        raw = stdin.readline()
        if not raw:
            return
        line = raw.decode("utf-8", "surrogateescape").strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command.lower() == "/quit":
                return
            if command.lower() == "/parse" and rest.strip():
                yield rest.strip()
            else:
                print(f"{command}: not known here (only /parse <address> and /quit)", file=err)
            continue
        yield _without_ruleset(line)


def _without_ruleset(line: str) -> str:
    """``3,0 addr`` → ``addr``: the rulesets are not run, the address is routed whole."""
    first, _, rest = line.partition(" ")
    return rest.strip() if rest.strip() and "@" not in first else line


def _address_test(
    recipients: list[str],
    stdin: BinaryIO,
    subcommand: Subcommand,
    base: list[str],
    out: TextIO,
    err: TextIO,
    program: str,
) -> int:
    interactive = stdin.isatty()
    if interactive:
        print(TEST_BANNER, file=out)

    def route(addresses: Iterable[str]) -> int:
        out.flush()
        return _delegate(
            subcommand, ["route", *base, "--", *addresses], program, err, failure=os.EX_NOUSER
        )

    # On the command line as typed at the prompt: `sendmail -bt '3,0 bob@example.com'`.
    given = [
        r[7:].strip() if r[:7].lower() == "/parse " else _without_ruleset(r.strip())
        for r in recipients
    ]
    status = route(given) if given else os.EX_OK
    batch: list[str] = []
    for address in _test_lines(stdin, out, out if interactive else err, interactive):
        batch.append(address)
        if interactive or len(batch) >= _ROUTE_BATCH:
            status = max(status, route(batch))
            batch = []
    if batch:
        status = max(status, route(batch))
    return status
