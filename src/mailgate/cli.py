"""The ``mailgate`` command: argument parsing and output only; the work is elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, TextIO

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


def cmd_serve(args: argparse.Namespace) -> int:
    from mailgate import master

    snapshot = _load(args.config)
    cfg = snapshot.config
    maillog.setup(cfg.hostname, cfg.log.file, cfg.log.level)
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


def _text_out() -> TextIO:
    """stdout, writing what it cannot encode (an address kept as raw bytes) as escapes, as
    Sendmail's mailq prints unprintable characters, rather than failing mid-listing."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")
    return sys.stdout


def cmd_mailq(args: argparse.Namespace) -> int:
    """Streams: the header's count comes from a pass over the names only, then each entry is
    read and printed before the next (queue.listing)."""
    from mailgate.queue import listing
    from mailgate.queue.spool import Spool

    cfg = _load(args.config).config
    spool = Spool(cfg.spool_dir)
    out = _text_out()
    try:
        if args.json:
            for entry in listing.entries(spool):
                out.write(listing.mailq_json(entry) + "\n")
            return 0
        count = spool.count()
        out.write("".join(line + "\n" for line in listing.mailq_header(str(spool.queue), count)))
        listed = 0
        if count:
            for entry in listing.entries(spool):
                out.write("".join(line + "\n" for line in listing.mailq_entry(entry)))
                listed += 1
        out.write(listing.mailq_total(listed) + "\n")
    finally:
        spool.close()
    return 0


def cmd_qshape(args: argparse.Namespace) -> int:
    from mailgate.queue import listing
    from mailgate.queue.spool import Spool

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
    # qshape's rule: the top 20 on a terminal, every domain into a pipe or a file.
    top = args.top if args.top is not None else (20 if sys.stdout.isatty() else 0)
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
    maillog.setup(cfg.hostname, cfg.log.file if not args.verbose else None, cfg.log.level)
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
    (queue.control), a line for each one not changed, postsuper's summary, the daemon told."""
    from mailgate.queue import control
    from mailgate.queue.spool import Spool

    cfg = _load(args.config).config
    maillog.setup(cfg.hostname, cfg.log.file, cfg.log.level)
    name = args.command
    summary, unchanged, verb = _TOOL_WORDS[name]
    changes: dict[str, control.Change] = {
        "hold": partial(control.hold, reason=getattr(args, "reason", "")),
        "release": control.release,
        "delete": control.delete,
        "requeue": control.requeue,
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
        for qid, outcome, detail in control.apply(spool, changes[name], qids, wait):
            if outcome is control.Outcome.DONE:
                done += 1
                continue
            if every and outcome is control.Outcome.NOT_FOUND:
                continue  # listed, then delivered before its turn: nothing to requeue
            failed |= outcome is not control.Outcome.UNCHANGED
            why = {
                control.Outcome.UNCHANGED: unchanged,
                control.Outcome.NOT_FOUND: "not in the queue",
                control.Outcome.BUSY: f"being delivered (locked) for all of {wait:g} s; not {verb}",
                control.Outcome.UNREADABLE: f"unreadable queue entry; not {verb}",
                control.Outcome.FAILED: f"not {verb}: {detail}",
            }[outcome]
            print(f"mailgate: {qid}: {why}", file=sys.stderr)
    finally:
        spool.close()
    print(f"mailgate: {summary}: {done} message{'s' if done != 1 else ''}", file=sys.stderr)
    if done and name in ("release", "requeue"):
        pid = control.wake_daemon(cfg.pid_file)
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
    p = add("mailq", "list the queue as Sendmail's mailq (sendmail -bp) does")
    p.add_argument(
        "--json", action="store_true", help="one JSON object per message, as postqueue -j"
    )
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
    p.set_defaults(func=cmd_qshape)
    p = add("route", "show the mailer, next hop and address each address would use")
    p.add_argument("addresses", nargs="+", metavar="ADDRESS")
    p.set_defaults(func=cmd_route)
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
