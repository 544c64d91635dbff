"""The queue commands: mailq, qshape, flush, hold/release/delete/requeue."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING

from mailgate.cli.common import command_log, config_or_exit, open_log, snapshot_or_exit, text_out

if TYPE_CHECKING:
    from mailgate.queue.listing import Selection
    from mailgate.queue.spool import QueuedMessage


def cmd_mailq(args: argparse.Namespace) -> int:
    """Streams: the header's count is the running daemon's for a deep queue (its state file,
    at most REPORT_INTERVAL old), else a pass over the names (below COUNT_BELOW, and the
    status files' times: a held one's is HELD_DUE), or, for a selection by content
    (``--id``, ``--recipient``, ``--sender``, ``--quarantined``), a pass that reads the
    entries; then the entries are read and printed in chunks, formatted on every core
    (queue.listing.listed), and the total is what was listed."""
    from mailgate import control
    from mailgate.queue import listing
    from mailgate.queue.spool import Spool

    if args.nodes:
        from mailgate import cluster

        return cluster.cmd_mailq(args, config_or_exit, text_out(), _selection(args))
    cfg = snapshot_or_exit(args.config).config
    spool = Spool(cfg.spool_dir)
    out = text_out()
    selection = _selection(args)
    try:
        # The listing's workers are forked: what is still in the buffer would be theirs
        # too, and each would write it again as it exits.
        out.flush()
        if args.json:
            for text, _n in listing.listed(spool, "json"):
                out.write(text)
            return 0
        if selection.by_content or selection.held:
            count = sum(n for _text, n in listing.listed(spool, "count", selection))
        else:
            # A million names cost seconds to list from a cold disk: the daemon has counted.
            # Its count, or the names', has the held messages too; a small queue's has them
            # taken out (a stat of each status file), which a deep one's first line cannot
            # wait for.
            count, _by_daemon = control.queue_count(cfg.spool_dir, control.running_state(cfg))
            if count < control.COUNT_BELOW:
                count = listing.waiting_count(spool)
        header = listing.mailq_header(str(spool.queue), count, verbose=args.verbose)
        out.write("".join(line + "\n" for line in header))
        out.flush()
        total = 0
        for text, n in listing.listed(spool, "mailq-v" if args.verbose else "mailq", selection):
            out.write(text)
            total += n
        out.write(listing.mailq_total(total) + "\n")
    finally:
        spool.close()
    return 0


def _selection(args: argparse.Namespace) -> Selection:
    from mailgate.queue.listing import Selection

    return Selection(
        held=args.quarantined,
        ids=tuple(args.id),
        recipients=tuple(args.recipient),
        senders=tuple(args.sender),
    )


def cmd_qshape(args: argparse.Namespace) -> int:
    from mailgate.queue import listing
    from mailgate.queue.spool import Spool

    # qshape's rule: the top 20 on a terminal, every domain into a pipe or a file.
    top = args.top if args.top is not None else (20 if sys.stdout.isatty() else 0)
    if args.nodes:
        from mailgate import cluster

        return cluster.cmd_qshape(args, config_or_exit, text_out(), top or None)
    cfg = snapshot_or_exit(args.config).config
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
    out = text_out()
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

    snapshot = snapshot_or_exit(args.config)
    cfg = snapshot.config
    # -v: the lines on stderr too, between the dialogue's, and in the maillog as ever (the
    # deliveries of a verbose run are no less the maillog's than a quiet one's).
    if not open_log(cfg.hostname, command_log(cfg.log), echo=args.verbose):
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

    cfg = snapshot_or_exit(args.config).config
    if not open_log(cfg.hostname, command_log(cfg.log)):  # a line per message changed
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
