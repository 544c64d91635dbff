"""The ``mailgate`` command: argument parsing and output only; the work is elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO

from mailgate import __version__, maillog
from mailgate.config import Config, ConfigError, LogSettings, load_config
from mailgate.snapshot import Snapshot, load_snapshot
from mailgate.tables.maps import TableError

if TYPE_CHECKING:
    from mailgate.control import Outcome
    from mailgate.queue.spool import QueuedMessage

STOP_MARGIN = 20.0  # seconds `mailgate stop` waits beyond stop_grace (the last cancellations)


def _load(path: str | None) -> Snapshot:
    try:
        return load_snapshot(path)
    except (ConfigError, TableError) as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _load_config(path: str | None) -> Config:
    """The settings alone: ``stop`` and ``status`` work whatever state the tables are in."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _open_log(hostname: str, log: maillog.LogOptions) -> bool:
    try:
        maillog.setup(hostname, log)
    except OSError as exc:
        print(f"mailgate: cannot open the log: {exc}", file=sys.stderr)
        return False
    return True


def _command_log(log: LogSettings) -> LogSettings:
    """The log of a command an admin runs (``flush``, the queue tools): the daemon's, but the
    JSON copy only to its file, never to stdout, which is the admin's."""
    return replace(log, json=log.json and log.json_file is not None)


def _lost_when_detached(log: LogSettings) -> list[str]:
    """What ``serve --daemon`` would write to stderr or stdout, /dev/null once detached."""
    lost = []
    if maillog.text_target(log) == "stderr":
        lost.append('[log] target is stderr (no file, not "syslog"): the daemon\'s log is lost')
    if log.json and log.json_file is None:
        lost.append("[log] json goes to stdout (no json_file): the daemon's JSON lines are lost")
    return lost


def cmd_serve(args: argparse.Namespace) -> int:
    from mailgate import master
    from mailgate.pidfile import AlreadyRunning
    from mailgate.service import Lifecycle, detach

    snapshot = _load(args.config)
    cfg = snapshot.config
    # Absolute, so that a reload finds the file after --daemon has moved to /.
    config_path = os.path.abspath(args.config) if args.config else None
    if args.daemon:
        if cfg.pid_file is None:
            print("mailgate: --daemon needs a pid_file (it is how stop finds it)", file=sys.stderr)
            return 2
        for lost in _lost_when_detached(cfg.log):
            print(f"mailgate: warning: {lost}", file=sys.stderr)
    # Opened before detaching: a log that cannot be opened, or a syslog daemon that is not
    # there, is said on the admin's terminal, not on the daemon's /dev/null.
    if not _open_log(cfg.hostname, cfg.log):
        return 1
    problem = maillog.syslog_problem()
    if problem is not None:  # not fatal: syslogd may come up later, and lines go there then
        print(
            f"mailgate: warning: {cfg.log.syslog_socket}: {problem}; log lines are lost "
            "until the syslog daemon is there",
            file=sys.stderr,
        )
    report_fd = detach(chdir=config_path is not None) if args.daemon else None
    for w in snapshot.warnings():
        maillog.config_warning(w)
    lifecycle = Lifecycle(cfg, report_fd=report_fd, generation=snapshot.generation)
    try:
        master.run(config_path, snapshot, lifecycle)
    except AlreadyRunning as exc:
        lifecycle.failed(str(exc))
        print(f"mailgate: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        maillog.start_failed(exc)
        lifecycle.failed(f"cannot start: {exc}")
        print(f"mailgate: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _checked(path: str | None) -> Snapshot | None:
    """What ``mailgate check`` checks: the config and every table it names, warnings
    printed; None (the error printed, file:line) when it does not load."""
    try:
        snapshot = load_snapshot(path)
    except (ConfigError, TableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    for w in snapshot.warnings():
        print(f"warning: {w}")
    return snapshot


def cmd_check(args: argparse.Namespace) -> int:
    snapshot = _checked(args.config)
    if snapshot is None:
        return 1
    warnings = len(snapshot.warnings())
    cfg = snapshot.config
    t = snapshot.tables
    print(
        f"{cfg.source}: OK ({len(t.local_names)} local names, "
        f"{len(t.relay_domains)} relay domains; "
        f"{warnings} warning{'s' if warnings != 1 else ''}; generation {snapshot.generation})"
    )
    for origin in cfg.origins:  # what the node file, the environment or -O gave
        print(f"  {origin.label} = {origin.value}  from {origin.where}")
    return 0


def _outcome(outcome: Outcome) -> int:
    print(f"mailgate: {outcome.text}", file=sys.stderr if outcome.error else sys.stdout)
    return outcome.code


def cmd_stop(args: argparse.Namespace) -> int:
    from mailgate import control

    cfg = _load_config(args.config)
    timeout = args.timeout if args.timeout is not None else cfg.stop_grace + STOP_MARGIN
    return _outcome(control.stop(cfg, timeout))


DRAIN_LISTED = 20  # queue ids the drain report names; `mailgate mailq` lists the rest


def cmd_drain(args: argparse.Namespace) -> int:
    """Take the node out of service (control.drain), then hand over what is left (``--handover``)
    and say what is still queued: 0 when nothing is, 1 when something is (it stays queued)."""
    from mailgate import control, daemon
    from mailgate.delivery.attempt import DeliveryContext
    from mailgate.delivery.handover import hand_over
    from mailgate.queue.spool import Spool

    cfg = _load_config(args.config)
    outcome = control.drain(cfg, args.deadline, cfg.stop_grace + STOP_MARGIN)
    _outcome(outcome)
    if outcome.code != control.RUNNING:
        return outcome.code  # the daemon is still there: the queue is its own
    spool = Spool(cfg.spool_dir)
    try:
        if args.handover is not None:
            snapshot = _load(args.config)
            log = _command_log(snapshot.config.log)
            if not _open_log(cfg.hostname, log):
                return 1
            ctx = DeliveryContext(
                spool=spool,
                resolver=daemon.make_resolver(cfg),
                snapshot=lambda: snapshot,
                queued=lambda report: report.close(),  # none: a handover bounces nothing
            )
            host, port = args.handover
            daemon.install_event_loop()
            done = asyncio.run(hand_over(ctx, host, port))
            print(
                f"mailgate: handed over {len(done.sent)} message(s) to {host}:{port}"
                + (f"; {len(done.kept)} could not be" if done.kept else "")
            )
        left = list(spool.qids())
    finally:
        spool.close()
    if not left:
        print(f"mailgate: the queue is empty ({cfg.spool_dir / 'queue'})")
        return 0
    named = " ".join(left[:DRAIN_LISTED]) + (" …" if len(left) > DRAIN_LISTED else "")
    print(
        f"mailgate: {len(left)} message(s) left in {cfg.spool_dir / 'queue'} (kept, not lost; "
        f"`mailgate mailq` shows them, `mailgate drain --handover HOST:PORT` sends them on): "
        f"{named}",
        file=sys.stderr,
    )
    return 1


def cmd_reload(args: argparse.Namespace) -> int:
    """The checks of ``mailgate check`` first: a config that fails them is refused here, and
    the daemon is not disturbed."""
    from mailgate import control

    snapshot = _checked(args.config)
    if snapshot is None:
        print("mailgate: reload refused: the daemon keeps its configuration", file=sys.stderr)
        return 1
    return _outcome(control.reload(snapshot.config, args.timeout))


def cmd_status(args: argparse.Namespace) -> int:
    from mailgate import control

    return _outcome(control.status(_load_config(args.config)))


def _text_out() -> TextIO:
    """stdout, writing what it cannot encode (an address kept as raw bytes) as escapes, as
    Sendmail's mailq prints unprintable characters, rather than failing mid-listing."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")
    return sys.stdout


def cmd_mailq(args: argparse.Namespace) -> int:
    """Streams: the header's count comes from a pass over the names only, then the entries
    are read and printed in chunks, formatted on every core (queue.listing.listed)."""
    from mailgate.queue import listing
    from mailgate.queue.spool import Spool

    if args.nodes:
        from mailgate import cluster

        return cluster.cmd_mailq(args, _load_config, _text_out())
    cfg = _load(args.config).config
    spool = Spool(cfg.spool_dir)
    out = _text_out()
    try:
        # The listing's workers are forked: what is still in the buffer would be theirs
        # too, and each would write it again as it exits.
        out.flush()
        if args.json:
            for text, _n in listing.listed(spool, "json"):
                out.write(text)
            return 0
        count = spool.count()
        out.write("".join(line + "\n" for line in listing.mailq_header(str(spool.queue), count)))
        out.flush()
        total = 0
        if count:
            for text, n in listing.listed(spool, "mailq"):
                out.write(text)
                total += n
        out.write(listing.mailq_total(total) + "\n")
    finally:
        spool.close()
    return 0


def cmd_qshape(args: argparse.Namespace) -> int:
    from mailgate.queue import listing
    from mailgate.queue.spool import Spool

    # qshape's rule: the top 20 on a terminal, every domain into a pipe or a file.
    top = args.top if args.top is not None else (20 if sys.stdout.isatty() else 0)
    if args.nodes:
        from mailgate import cluster

        return cluster.cmd_qshape(args, _load_config, _text_out(), top or None)
    cfg = _load(args.config).config
    spool = Spool(cfg.spool_dir)
    try:
        counts = listing.shape(
            spool,
            by_sender=args.sender or args.by == "sender",
            held=args.hold,
            buckets=args.buckets,
            minutes=args.minutes,
        )
    finally:
        spool.close()
    out = _text_out()
    out.write("".join(line + "\n" for line in counts.lines(top=top or None)))
    return 0


def _domain_matches(domain: str, wanted: str) -> bool:
    """``flush --domain``: the domain itself, or with a leading dot its subdomains (a
    mailertable key's convention)."""
    domain, wanted = domain.lower(), wanted.lower()
    return domain.endswith(wanted) if wanted.startswith(".") else domain == wanted


def cmd_flush(args: argparse.Namespace) -> int:
    """Run the queue now in this process, like ``sendmail -q [-v]`` (``--id``: ``-qI``,
    ``--domain``: ``-qR``), with the tables on disk now. Safe while the daemon runs: each
    attempt takes the message's lock, and one the daemon has is skipped."""
    from mailgate import daemon
    from mailgate.delivery.attempt import DeliveryContext, attempt
    from mailgate.queue.spool import CorruptEntry, Spool

    snapshot = _load(args.config)
    cfg = snapshot.config
    log = _command_log(cfg.log)
    if args.verbose:  # the lines on stderr, between the dialogue's
        log = replace(log, target="stderr", file=None)
    if not _open_log(cfg.hostname, log):
        return 1
    spool = Spool(cfg.spool_dir)

    def transcript(line: str) -> None:
        print(line, flush=True)

    def chosen() -> Iterator[str]:
        """The messages to try, streamed from the queue folder (or the ids given)."""
        if args.ids:
            for qid in args.ids:
                if spool.valid_qid(qid) and (spool.queue / qid).exists():
                    yield qid
                else:
                    print(f"mailgate: {qid}: not in the queue", file=sys.stderr)
            return
        for qid in spool.qids():
            if qid in queued_here:
                continue  # a report this run queued: tried in the next round
            if not args.domains:
                yield qid
                continue
            try:
                msg = spool.load(qid)
            except CorruptEntry:
                continue  # the attempt would quarantine it; this run is not for it
            if msg is not None and any(
                _domain_matches(r.mailbox.domain, d)
                for r in msg.status.pending(msg.envelope.recipients)
                for d in args.domains
            ):
                yield qid

    queued_here: set[str] = set()
    new: list[str] = []

    def report_queued(report: QueuedMessage) -> None:
        new.append(report.qid)  # tried in the next round, from the spool
        queued_here.add(report.qid)
        report.close()

    async def run() -> int:
        ctx = DeliveryContext(
            spool=spool,
            resolver=daemon.make_resolver(cfg),
            snapshot=lambda: snapshot,
            queued=report_queued,
            transcript=transcript if args.verbose else None,
        )
        tried = held = busy = 0
        todo: Iterable[str] = chosen()
        while True:
            for qid in todo:
                # Looked at here to say so; the attempt decides again, under the lock.
                if spool.load_status(qid).held:
                    held += 1
                    if args.verbose:
                        print(f"\n{qid}: on hold, not tried", flush=True)
                    continue
                if spool.is_locked(qid):
                    busy += 1
                    if args.verbose:
                        print(f"\n{qid}: being delivered by another runner, skipped", flush=True)
                    continue
                if args.verbose:
                    print(f"\nRunning {qid}", flush=True)
                await attempt(ctx, qid)
                tried += 1
            if not new:
                break
            todo, new[:] = list(new), []
        remaining = spool.count()
        spool.close()
        others = (f", {held} on hold" if held else "") + (
            f", {busy} being delivered by another runner" if busy else ""
        )
        print(
            f"mailgate: queue run done: {tried} message(s) tried{others}, {remaining} still queued"
        )
        return 0

    daemon.install_event_loop()
    return asyncio.run(run())


def _qid_arguments(qids: Sequence[str]) -> Iterator[str]:
    """The queue ids given; ``-`` reads more from standard input, one a line (postsuper's
    convention: ``mailgate mailq --json | jq -r … | mailgate delete -``)."""
    for qid in qids:
        if qid != "-":
            yield qid
            continue
        for line in sys.stdin:
            if line.strip():
                yield line.strip()


# What each queue tool says: the summary (postsuper's words), an unchanged message, the verb.
_TOOL_WORDS = {
    "hold": ("Placed on hold", "already on hold", "held"),
    "release": ("Released from hold", "not on hold", "released"),
    "delete": ("Deleted", "", "deleted"),
    "requeue": ("Requeued", "on hold: stays held (release it to send it)", "requeued"),
}


def cmd_queue_tool(args: argparse.Namespace) -> int:
    """``hold``, ``release``, ``delete``, ``requeue``: each message under its lock
    (queue.tools), a line for each one not changed, postsuper's summary, the daemon told."""
    from mailgate.queue import tools
    from mailgate.queue.spool import Spool

    cfg = _load(args.config).config
    if not _open_log(cfg.hostname, _command_log(cfg.log)):  # a line per message changed
        return 1
    name = args.command
    summary, unchanged, verb = _TOOL_WORDS[name]
    changes: dict[str, tools.Change] = {
        "hold": partial(tools.hold, reason=getattr(args, "reason", "")),
        "release": tools.release,
        "delete": tools.delete,
        "requeue": tools.requeue,
    }
    every = getattr(args, "all", False)
    if every == bool(args.qids):
        either = "queue ids or --all, not both" if name == "requeue" else "at least one queue id"
        print(f"mailgate {name}: give {either}", file=sys.stderr)
        return 2
    spool = Spool(cfg.spool_dir)
    wait = getattr(args, "wait", 0.0)
    qids = spool.qids() if every else _qid_arguments(args.qids)
    done = 0
    failed = False
    try:
        for qid, outcome, detail in tools.apply(spool, changes[name], qids, wait):
            if outcome is tools.Outcome.DONE:
                done += 1
                continue
            if every and outcome is tools.Outcome.NOT_FOUND:
                continue  # listed, then delivered before its turn: nothing to requeue
            failed |= outcome is not tools.Outcome.UNCHANGED
            why = {
                tools.Outcome.UNCHANGED: unchanged,
                tools.Outcome.NOT_FOUND: "not in the queue",
                tools.Outcome.BUSY: f"being delivered (locked) for all of {wait:g} s; not {verb}",
                tools.Outcome.UNREADABLE: f"unreadable queue entry; not {verb}",
                tools.Outcome.FAILED: f"not {verb}: {detail}",
            }[outcome]
            print(f"mailgate: {qid}: {why}", file=sys.stderr)
    finally:
        spool.close()
    print(f"mailgate: {summary}: {done} message{'s' if done != 1 else ''}", file=sys.stderr)
    if done and name in ("release", "requeue"):
        pid = tools.wake_daemon(cfg.pid_file)
        if pid is not None:
            print(f"mailgate: told the daemon (pid {pid})", file=sys.stderr)
        else:
            print(
                "mailgate: no running daemon found through pid_file: it takes them on at "
                "its next queue run or start",
                file=sys.stderr,
            )
    return 1 if failed else 0


def cmd_route(args: argparse.Namespace) -> int:
    """Like ``sendmail -bt`` with ``/parse``: where each address would go, sending nothing."""
    from mailgate.address import AddressError, normalize
    from mailgate.delivery.uucp import recipient_argument
    from mailgate.routing import resolve

    snapshot = _load(args.config)
    status = 0
    for arg in args.addresses:
        raw = arg[1:-1] if arg.startswith("<") and arg.endswith(">") else arg
        try:
            mailbox = normalize(raw, snapshot.routing.is_local)
        except AddressError as exc:
            print(f"{arg}: {exc.reply}")
            status = 1
            continue
        routes = resolve(mailbox, snapshot.routing, expand=True)
        print(f"{arg}:" if len(routes) != 1 else f"{arg}: ", end="")
        for route in routes:
            prefix = "\n  " if len(routes) != 1 else ""
            if route.mailer == "error" and route.error is not None:
                print(f"{prefix}mailer error, {route.error.reply(f'<{mailbox}>')}  [{route.via}]")
                status = 1
                continue
            host = route.host or ("local" if route.mailer == "local" else "")
            # A UUCP mailer's user is its $u, as -bt shows the user after the mailer's R=.
            user = (
                recipient_argument(route.mailer, route.address) if route.is_uucp else route.address
            )
            print(f"{prefix}mailer {route.mailer}, host {host}, user {user}  [{route.via}]")
        if len(routes) != 1:
            print()
    return status


def cmd_install_sendmail_link(args: argparse.Namespace) -> int:
    from mailgate.sendmail import links

    try:
        target = links.mailgate_program(args.target)
        plan = links.plan(args.root, target)
    except links.LinkError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return 1
    refused = [step for step in plan if step.action == "other"]
    if refused and not args.force:
        for step in plan:
            print(step.describe())
        print(
            "mailgate: nothing changed: another MTA's files are there; remove that MTA's "
            "package, or use --force (each file is kept as NAME.pre-mailgate)",
            file=sys.stderr,
        )
        return 1
    try:
        for step in plan:
            print(links.carry_out(step))
    except OSError as exc:
        print(f"mailgate: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


def cmd_check_dns(args: argparse.Namespace) -> int:
    """What the DNS says of this gateway: one line per check, 1 if any failed."""
    import ipaddress

    from mailgate import daemon, dnscheck

    snapshot = _load(args.config)
    cfg = snapshot.config
    names = tuple(dict.fromkeys(n.lower().rstrip(".") for n in [cfg.hostname, *args.name]))
    try:
        given = [str(ipaddress.ip_address(a)) for a in args.address]
    except ValueError as exc:
        print(f"mailgate: --address: {exc}", file=sys.stderr)
        return 2
    # Where clients connect directly: the MX's addresses of a PROXY listener are the
    # balancer's, not the gateway's, so a gateway with only those compares none.
    listen = {ls.address[0] for ls in cfg.listeners if ls.proxy_protocol is None}
    if given:
        addresses: frozenset[str] | None = frozenset(given)
    elif not listen or listen & {"0.0.0.0", "::"}:
        addresses = None  # every address of the machine: nothing to compare with
    else:
        addresses = frozenset(listen)
    gateway = dnscheck.Gateway(
        names,
        addresses,
        args.port,
        args.timeout if args.timeout is not None else cfg.smtp.greet_pause + 10.0,
    )
    domains = [d.lower().rstrip(".") for d in args.domains] or dnscheck.served_domains(
        snapshot.tables
    )
    counts = {"OK": 0, "WARN": 0, "FAIL": 0}
    if not domains:
        print("WARN domains: none served (local-host-names, relay-domains, mailertable, access)")
        counts["WARN"] += 1

    async def run() -> None:
        async for finding in dnscheck.check(daemon.make_resolver(cfg), gateway, domains):
            counts[finding.status] += 1
            print(finding, flush=True)

    daemon.install_event_loop()
    asyncio.run(run())
    print(f"check-dns: {counts['OK']} OK, {counts['WARN']} WARN, {counts['FAIL']} FAIL")
    return 1 if counts["FAIL"] else 0


# --- moving from Sendmail: import-mc, makemap, newaliases ----------------------------------

NEWALIASES_CONFIG = "/etc/mail/mailgate.toml"  # as newaliases reads /etc/mail/sendmail.cf


def _read_mc(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # old mc files; every byte is some character


def cmd_import_mc(args: argparse.Namespace) -> int:
    """``mailgate import-mc sendmail.mc > mailgate.toml``: the TOML on stdout, each finding
    on stderr; 1 when something was refused or a table does not load, 2 when m4 would fail."""
    from mailgate.migrate.m4 import McSyntaxError
    from mailgate.migrate.mc import convert
    from mailgate.migrate.toml import render
    from mailgate.tables import Tables, load_tables

    mc = Path(args.mc)
    try:
        text = _read_mc(mc)
    except OSError as exc:
        print(f"error: {mc}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return 2
    mail_dir = Path(args.mail_dir if args.mail_dir else mc.parent).absolute()
    tables: Tables | None = None
    table_error: TableError | None = None
    if not mail_dir.is_dir():
        table_error = TableError(mail_dir, None, "no such directory: the tables are read there")
    else:
        try:
            tables = load_tables(mail_dir)
        except TableError as exc:
            table_error = TableError(
                exc.path, exc.line, f"{exc.message} (mailgate check refuses this table)"
            )
    try:
        conv = convert(
            text,
            str(mc),
            mail_dir=mail_dir,
            tables=tables,
            table_error=table_error,
            allow_unsafe=args.allow_unsafe,
        )
    except McSyntaxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render(conv))
    for f in conv.findings:
        print(f"{f.kind}: {f}", file=sys.stderr)
    counts = {
        kind: sum(1 for f in conv.findings if f.kind == kind)
        for kind in ("warning", "refused", "error")
    }
    print(
        f"{mc}: {len(conv.constructs)} constructs, {len(conv.assignments)} settings;"
        f" {counts['warning']} warnings, {counts['refused']} refused, {counts['error']} errors",
        file=sys.stderr,
    )
    return 1 if conv.failed else 0


class _MakemapParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"makemap: {message}", file=sys.stderr)
        raise SystemExit(64)  # EX_USAGE, as Sendmail's makemap


def _makemap_parser() -> _MakemapParser:
    p = _MakemapParser(
        prog="mailgate makemap",
        description="Check a table as Sendmail's makemap would build it (mailgate reads the"
        " text, so nothing is written).",
    )
    p.add_argument("-C", metavar="CF", help="ignored (Sendmail's configuration file)")
    p.add_argument("-N", action="store_true", help="ignored (NUL-terminated keys)")
    p.add_argument("-c", metavar="SIZE", help="ignored (cache size)")
    p.add_argument("-D", metavar="CHAR", default="#", help="comment character: # only")
    p.add_argument("-d", action="store_true", help="duplicate keys: refused, as without -d")
    p.add_argument("-e", action="store_true", help="empty values: refused by mailgate")
    p.add_argument("-f", action="store_true", help="keep the case of keys (lookups ignore it)")
    p.add_argument("-i", metavar="TYPE", help="ignored")
    p.add_argument("-l", action="store_true", help="list the map types")
    p.add_argument("-o", action="store_true", help="ignored (append)")
    p.add_argument("-r", action="store_true", help="duplicate keys: an error, see the manual")
    p.add_argument("-s", action="store_true", help="ignored (skip safety checks)")
    p.add_argument("-t", metavar="DELIM", help="key/value delimiter: white space only")
    p.add_argument("-u", action="store_true", help="print the table (key TAB value)")
    p.add_argument("-v", action="store_true", help="print the number of entries")
    p.add_argument("type", nargs="?")
    p.add_argument("mapname", nargs="?")
    return p


def cmd_makemap(args: argparse.Namespace) -> int:
    from mailgate.migrate import tablecheck as tc
    from mailgate.tables.maps import read_map

    parser = _makemap_parser()
    opts = parser.parse_args(args.argv)
    if opts.l:
        print("\n".join(tc.MAP_TYPES))
        return 0
    if opts.type is None or opts.mapname is None:
        parser.error("a map type and a map name are needed")
    if opts.t is not None or opts.D != "#":
        parser.error("mailgate reads tables with white space between key and value and #"
                     " comments; -t and -D are not supported")  # fmt: skip
    if opts.type not in tc.MAP_TYPES:
        print(
            f"makemap: error opening type {opts.type} map {opts.mapname}: Unknown database type",
            file=sys.stderr,
        )
        return tc.EX_CANTCREAT
    source = Path(opts.mapname).with_name(tc.table_kind(opts.mapname))
    if opts.u:
        try:
            entries = read_map(source) if source.exists() else []
        except TableError as exc:
            print(f"makemap: {exc}", file=sys.stderr)
            return tc.EX_DATAERR
        for e in entries:
            print(f"{e.key if opts.f else e.key.lower()}\t{e.value}")
        return 0
    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        print(f"makemap: {source}:{line}: not valid UTF-8 (byte {exc.start})", file=sys.stderr)
        return tc.EX_DATAERR
    report = tc.check_map(opts.mapname, text, fold=not opts.f, replace=opts.r)
    if source.is_file() and source.read_bytes() != data:
        report.warnings.append(
            f"{source}: mailgate reads this file, not the text given on standard input, which"
            " differs from it: copy the new text there"
        )
    for w in report.warnings:
        print(f"makemap: warning: {w}", file=sys.stderr)
    for error in report.errors:
        print(f"makemap: {error}", file=sys.stderr)
    if opts.v:
        print(f"makemap: {source}: {report.entries} entries", file=sys.stderr)
    return tc.EX_DATAERR if report.errors else 0


def cmd_newaliases(args: argparse.Namespace) -> int:
    from mailgate.migrate import tablecheck as tc

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"newaliases: {exc}", file=sys.stderr)
        return 78  # EX_CONFIG, as Sendmail without its configuration file
    if cfg.tables_dir is None:
        print("newaliases: the configuration has no tables_dir: no aliases file", file=sys.stderr)
        return 78
    path = cfg.tables_dir / "aliases"
    report = tc.check_aliases(path)
    for w in report.warnings:
        print(f"newaliases: warning: {w}", file=sys.stderr)
    for error in report.errors:
        print(error, file=sys.stderr)
    if not report.errors and path.exists():
        print(f"{path}: {report.entries} aliases (read as text: nothing to rebuild)")
    return tc.EX_SOFTWARE if report.errors else 0


def _add_migration_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    text = "write mailgate.toml from a sendmail.mc (on standard output)"
    p = sub.add_parser("import-mc", help=text, description=text)
    p.add_argument("mc", metavar="SENDMAIL.MC")
    p.add_argument(
        "--mail-dir",
        metavar="DIR",
        help="where the tables are, used as they are (default: the mc file's folder)",
    )
    p.add_argument(
        "--allow-unsafe",
        action="store_true",
        help="import accept_unresolvable_domains and accept_unqualified_senders (never an"
        " open relay)",
    )
    p.set_defaults(func=cmd_import_mc)
    text = "check a table as Sendmail's makemap TYPE NAME < file would build it"
    # makemap parses its own options (Sendmail's, with its exit status for a usage error):
    # with no option prefix here, "-r" and the others reach it as plain words.
    p = sub.add_parser("makemap", help=text, description=text, add_help=False, prefix_chars="+")
    p.add_argument("argv", nargs="*")
    p.set_defaults(func=cmd_makemap)
    text = "check the aliases file, as Sendmail's newaliases rebuilds it"
    p = sub.add_parser("newaliases", help=text, description=text)
    p.add_argument(
        "-c",
        "-C",
        "--config",
        metavar="PATH",
        default=NEWALIASES_CONFIG,
        help=f"TOML config file (default: {NEWALIASES_CONFIG})",
    )
    p.set_defaults(func=cmd_newaliases)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailgate", description="A mail gateway with Sendmail's tables."
    )
    parser.add_argument("--version", action="version", version=f"mailgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "-c",
            "--config",
            metavar="PATH",
            help="TOML config file (default: the embedded loopback config)",
        )
        return p

    def add_nodes(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--node",
            dest="nodes",
            action="append",
            default=[],
            metavar="URL",
            help="read this node's queue over its [metrics] listen (http://HOST:PORT) instead "
            "of the local spool; repeatable",
        )
        p.add_argument(
            "--token-file",
            metavar="PATH",
            help="the cluster's token (default: the config's [metrics] token_file)",
        )

    p = add("serve", "run the gateway (in the foreground, as systemd and AIX's SRC want)")
    p.add_argument(
        "--daemon",
        action="store_true",
        help="detach (for SysV init): returns once the daemon listens, with its pid in pid_file",
    )
    p.set_defaults(func=cmd_serve)
    add("check", "validate the config and every table; warn about suspicious lines").set_defaults(
        func=cmd_check
    )
    p = add("stop", "stop the daemon: sessions and deliveries in progress finish first")
    p.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help=f"wait this long for it to exit (default: stop_grace + {STOP_MARGIN:g})",
    )
    p.set_defaults(func=cmd_stop)
    p = add(
        "drain",
        "take this node out of service: new sessions get 421, the queue is delivered, then "
        "the daemon stops; what is left is reported (or handed over)",
    )
    p.add_argument(
        "--deadline",
        type=duration,
        default=300.0,
        metavar="DURATION",
        help='how long to deliver the queue before stopping anyway, e.g. "10m" (default: 5m)',
    )
    p.add_argument(
        "--handover",
        type=host_port,
        metavar="HOST:PORT",
        help="relay what is still queued then to this node (which must let us relay)",
    )
    p.set_defaults(func=cmd_drain)
    p = add("reload", "check the config and tables, then have the daemon load them")
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="wait this long for the daemon's answer (default: 30)",
    )
    p.set_defaults(func=cmd_reload)
    add("status", "is the daemon running: pid, listeners, queue, uptime").set_defaults(
        func=cmd_status
    )
    p = add("mailq", "list the queue as Sendmail's mailq (sendmail -bp) does")
    p.add_argument(
        "--json", action="store_true", help="one JSON object per message, as postqueue -j"
    )
    add_nodes(p)
    p.set_defaults(func=cmd_mailq)
    p = add("flush", "try queued messages now, in this process (like sendmail -q)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the SMTP dialogue")
    p.add_argument(
        "--domain",
        dest="domains",
        action="append",
        default=[],
        metavar="DOMAIN",
        help="only messages with a recipient still pending in DOMAIN (.DOMAIN: its "
        "subdomains), like sendmail -qR; repeatable",
    )
    p.add_argument(
        "--id",
        dest="ids",
        action="append",
        default=[],
        metavar="QID",
        help="only this message, like sendmail -qI; repeatable",
    )
    p.set_defaults(func=cmd_flush)

    def add_tool(name: str, help_text: str, *, waits: bool = True) -> argparse.ArgumentParser:
        """A queue tool: queue ids (``-``: read from standard input) and, for those that take
        the message's lock, how long to wait for one being delivered."""
        p = add(name, help_text)
        p.add_argument(
            "qids", nargs="*", metavar="QID", help="queue ids (-: read from stdin, one a line)"
        )
        if waits:
            p.add_argument(
                "--wait",
                type=seconds,
                default=30.0,
                metavar="SECONDS",
                help="how long to wait for a message being delivered right now (default 30); "
                "then it is left as it is and reported",
            )
        p.set_defaults(func=cmd_queue_tool)
        return p

    p = add_tool("hold", "put messages on hold: never attempted until released (postsuper -h)")
    p.add_argument("--reason", default="", help="why, shown by mailq as QUARANTINE: …")
    add_tool("release", "release messages from hold; the daemon attempts them now (postsuper -H)")
    add_tool("delete", "remove messages from the queue, logged (postsuper -d)")
    p = add_tool(
        "requeue",
        "make messages due now: the daemon routes them again with its tables (postsuper -r)",
        waits=False,
    )
    p.add_argument("--all", action="store_true", help="every message in the queue")
    p = add("qshape", "messages by domain and age, as Postfix's qshape")
    p.add_argument(
        "--by",
        choices=["recipient", "sender"],
        default="recipient",
        help="recipient domains (each pending recipient counts) or sender domains",
    )
    p.add_argument("-s", dest="sender", action="store_true", help="the same as --by sender")
    p.add_argument("--hold", action="store_true", help="the messages on hold instead")
    p.add_argument("-n", "--top", type=int, metavar="N", help="only the top N domains (0: all)")
    p.add_argument(
        "-b", "--buckets", type=positive_integer, default=10, metavar="N", help="age buckets"
    )
    p.add_argument(
        "-t",
        "--minutes",
        type=minutes,
        default=5.0,
        metavar="MINUTES",
        help="the first bucket's age limit; each next one doubles it",
    )
    add_nodes(p)
    p.add_argument(
        "--per-node", action="store_true", help="with --node: each node's table, then the sum"
    )
    p.set_defaults(func=cmd_qshape)
    p = add("route", "show the mailer, next hop and address each address would use")
    p.add_argument("addresses", nargs="+", metavar="ADDRESS")
    p.set_defaults(func=cmd_route)
    # Parsed by mailgate.sendmail.options (main() hands it over before argparse): here for
    # --help only.
    p = sub.add_parser(
        "sendmail",
        help="Sendmail's command line: -t, -i, -f, -bm, -bp, -q, -bt, -bv, -bd, -q30m, -C, -O",
        add_help=False,
    )
    p.add_argument("args", nargs=argparse.REMAINDER)
    p = sub.add_parser(
        "install-sendmail-link",
        help="put mailgate at /usr/sbin/sendmail, /usr/lib/sendmail, /usr/bin/mailq and "
        "/usr/bin/newaliases",
        description="Link Sendmail's program names to mailgate; another MTA's files are "
        "left alone unless --force (which keeps each as NAME.pre-mailgate).",
    )
    p.add_argument("--force", action="store_true", help="replace another MTA's files")
    p.add_argument(
        "--target", metavar="PATH", help="the mailgate program to link to (default: this one)"
    )
    p.add_argument(
        "--root", metavar="DIR", default="/", help="install under DIR (a chroot, a package)"
    )
    p.set_defaults(func=cmd_install_sendmail_link)
    p = add(
        "check-dns",
        "check MX, A/AAAA, PTR (forward-confirmed) and the SMTP banner for the served domains",
    )
    p.add_argument("domains", nargs="*", metavar="DOMAIN", help="default: every served domain")
    p.add_argument(
        "--name",
        action="append",
        default=[],
        help="another name of this gateway (an MX host name); hostname is one",
    )
    p.add_argument(
        "--address",
        action="append",
        default=[],
        help="an address the names must resolve to (default: the listen addresses; behind "
        "NAT, the public ones)",
    )
    p.add_argument("--port", type=int, default=25, help="where the banner is asked (25)")
    p.add_argument(
        "--timeout", type=float, help="seconds to wait for the banner (greet_pause + 10)"
    )
    p.set_defaults(func=cmd_check_dns)
    _add_migration_commands(sub)
    return parser


def duration(text: str) -> float:
    """``"5m"``, ``"90s"`` or a number of seconds, as in the config."""
    from mailgate.config import parse_duration

    return parse_duration(text)


def host_port(text: str) -> tuple[str, int]:
    """``mx2.example.com:25``, ``192.0.2.2:25`` or ``[2001:db8::2]:25``."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(text)
    return host, int(port)


def seconds(text: str) -> float:
    """A number of seconds, 0 or more (argparse names the function in its error)."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise ValueError(text)
    return value


def minutes(text: str) -> float:
    value = seconds(text)
    if value == 0:
        raise ValueError(text)
    return value


def positive_integer(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _subcommand_names(parser: argparse.ArgumentParser) -> set[str]:
    return {
        name
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    }


def run_subcommand(argv: Sequence[str]) -> int | None:
    """``mailgate <argv>``, for ``mailgate sendmail``'s modes; None if there is no such
    subcommand (``newaliases`` comes with the import tools)."""
    if not argv or argv[0] not in _subcommand_names(build_parser()):
        return None
    return main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from mailgate.sendmail.command import PROGRAMS
    from mailgate.sendmail.command import run as sendmail

    if argv is None:
        # Called as sendmail, mailq or newaliases (install-sendmail-link's links): that
        # program's command line, as Sendmail's binary acts on its argv[0].
        program = os.path.basename(sys.argv[0])
        if program in PROGRAMS:
            return sendmail(sys.argv[1:], run_subcommand, program=program)
        argv = sys.argv[1:]
    if argv and argv[0] == "sendmail":
        return sendmail(argv[1:], run_subcommand)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
