"""The ``mailgate`` command: argument parsing and output only; the work is elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from mailgate import __version__, maillog
from mailgate.config import ConfigError
from mailgate.snapshot import Snapshot, load_snapshot
from mailgate.tables.maps import TableError

if TYPE_CHECKING:
    from mailgate.queue.spool import QueuedMessage


def _load(path: str | None) -> Snapshot:
    try:
        return load_snapshot(path)
    except (ConfigError, TableError) as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _open_log(hostname: str, log: maillog.LogOptions) -> bool:
    try:
        maillog.setup(hostname, log)
    except OSError as exc:
        print(f"mailgate: cannot open the log: {exc}", file=sys.stderr)
        return False
    return True


def cmd_serve(args: argparse.Namespace) -> int:
    from mailgate import master

    snapshot = _load(args.config)
    cfg = snapshot.config
    if not _open_log(cfg.hostname, cfg.log):
        return 1
    problem = maillog.syslog_problem()
    if problem is not None:  # not fatal: syslogd may come up later, and lines go there then
        print(
            f"mailgate: warning: {cfg.log.syslog_socket}: {problem}; log lines are lost "
            "until the syslog daemon is there",
            file=sys.stderr,
        )
    for w in snapshot.warnings():
        maillog.config_warning(w)
    try:
        master.run(args.config, snapshot)
    except OSError as exc:
        print(f"mailgate: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    try:
        snapshot = load_snapshot(args.config)
    except (ConfigError, TableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    warnings = snapshot.warnings()
    for w in warnings:
        print(f"warning: {w}")
    cfg = snapshot.config
    t = snapshot.tables
    print(
        f"{cfg.source}: OK ({len(t.local_names)} local names, "
        f"{len(t.relay_domains)} relay domains; "
        f"{len(warnings)} warning{'s' if len(warnings) != 1 else ''})"
    )
    return 0


def _mailq_time(ts: float) -> str:
    return time.strftime("%a %b %d %H:%M", time.localtime(ts))


def cmd_mailq(args: argparse.Namespace) -> int:
    from mailgate.queue.spool import CorruptEntry, Spool

    cfg = _load(args.config).config
    spool = Spool(cfg.spool_dir)
    try:
        messages = []
        for qid in sorted(spool.qids()):
            try:
                msg = spool.load(qid)  # reads only: an unreadable entry stays where it is
            except CorruptEntry:
                continue
            if msg is not None:
                messages.append(msg)
        print(format_mailq(messages, str(spool.queue), spool.is_locked))
    finally:
        spool.close()
    return 0


def format_mailq(
    msgs: Sequence[QueuedMessage], queue_dir: str, is_locked: Callable[[str], bool]
) -> str:
    """Sendmail's ``mailq`` (``sendmail -bp``) layout (semantics §15)."""
    if not msgs:
        return f"{queue_dir} is empty"
    n = len(msgs)
    lines = [
        f"\t\t{queue_dir} ({n} request{'s' if n != 1 else ''})",
        "-----Q-ID----- --Size-- -----Q-Time----- ------------Sender/Recipient-----------",
    ]
    for m in msgs:
        env, st = m.envelope, m.status
        mark = "*" if is_locked(env.qid) else " "
        sender = f"<{env.sender}>" if env.sender else "<>"
        lines.append(f"{env.qid}{mark}{m.size:>8} {_mailq_time(env.arrival)} {sender}")
        if st.last_message:
            lines.append(f"                 ({st.last_message[:60]})")
        for r in st.pending(env.recipients):
            lines.append(f"\t\t\t\t\t <{r.address}>")
            err = st.last_error(r.address)
            if err and err != st.last_message:
                lines.append(f"\t\t\t\t\t   ({err[:60]})")
    lines.append(f"\t\tTotal requests: {n}")
    return "\n".join(lines)


def cmd_flush(args: argparse.Namespace) -> int:
    """Run the queue now in this process, like ``sendmail -q [-v]``."""
    from mailgate import daemon
    from mailgate.delivery.attempt import DeliveryContext, attempt
    from mailgate.queue.spool import Spool

    snapshot = _load(args.config)
    cfg = snapshot.config
    # -v: the lines on stderr, between the dialogue's. The JSON copy goes to stdout only in
    # the daemon: here stdout is the admin's.
    log = replace(cfg.log, json=cfg.log.json and cfg.log.json_file is not None)
    if args.verbose:
        log = replace(log, target="stderr", file=None)
    if not _open_log(cfg.hostname, log):
        return 1

    def transcript(line: str) -> None:
        print(line, flush=True)

    async def run() -> int:
        spool = Spool(cfg.spool_dir)
        todo = sorted(spool.qids())
        new: list[str] = []

        def report_queued(report: QueuedMessage) -> None:
            new.append(report.qid)  # tried in the next round, from the spool
            report.close()

        ctx = DeliveryContext(
            spool=spool,
            resolver=daemon.make_resolver(cfg),
            snapshot=lambda: snapshot,
            queued=report_queued,
            transcript=transcript if args.verbose else None,
        )
        seen = 0
        while todo:
            for qid in todo:
                if args.verbose:
                    print(f"\nRunning {qid}", flush=True)
                await attempt(ctx, qid)
                seen += 1
            todo, new[:] = list(new), []
        spool.close()
        remaining = sum(1 for _ in Spool(cfg.spool_dir).qids())
        print(f"mailgate: queue run done: {seen} message(s) tried, {remaining} still queued")
        return 0

    daemon.install_event_loop()
    return asyncio.run(run())


def cmd_route(args: argparse.Namespace) -> int:
    """Like ``sendmail -bt`` with ``/parse``: where each address would go, sending nothing."""
    from mailgate.address import AddressError, normalize
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
            print(
                f"{prefix}mailer {route.mailer}, host {host}, user {route.address}  [{route.via}]"
            )
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
    listen = {host for host, _port in cfg.listen}
    if given:
        addresses: frozenset[str] | None = frozenset(given)
    elif listen & {"0.0.0.0", "::"}:
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

    add("serve", "run the gateway in the foreground").set_defaults(func=cmd_serve)
    add("check", "validate the config and every table; warn about suspicious lines").set_defaults(
        func=cmd_check
    )
    add("mailq", "list the queue as Sendmail's mailq does").set_defaults(func=cmd_mailq)
    p = add("flush", "try every queued message now (like sendmail -q)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the SMTP dialogue")
    p.set_defaults(func=cmd_flush)
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
    return parser


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
