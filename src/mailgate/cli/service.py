"""The daemon's commands: serve, check, stop, drain, reload, status."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from mailgate import maillog
from mailgate.cli.common import (
    STOP_MARGIN,
    checked_snapshot,
    command_log,
    config_or_exit,
    daemon_config_or_exit,
    lost_when_detached,
    open_log,
    report_outcome,
    snapshot_or_exit,
)


def cmd_serve(args: argparse.Namespace) -> int:
    from mailgate import master
    from mailgate.pidfile import AlreadyRunning
    from mailgate.service import Lifecycle, detach

    snapshot = snapshot_or_exit(args.config)
    cfg = snapshot.config
    # Absolute, so that a reload finds the file after --daemon has moved to /.
    config_path = os.path.abspath(args.config) if args.config else None
    if args.daemon:
        if cfg.pid_file is None:
            print("mailgate: --daemon needs a pid_file (it is how stop finds it)", file=sys.stderr)
            return 2
        for lost in lost_when_detached(cfg.log):
            print(f"mailgate: warning: {lost}", file=sys.stderr)
    # Opened before detaching: a log that cannot be opened, or a syslog daemon that is not
    # there, is said on the admin's terminal, not on the daemon's /dev/null.
    if not open_log(cfg.hostname, cfg.log):
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


def cmd_check(args: argparse.Namespace) -> int:
    snapshot = checked_snapshot(args.config)
    if snapshot is None:
        return 1
    warnings = len(snapshot.warnings())
    cfg = snapshot.config
    t = snapshot.tables
    print(
        f"{cfg.source}: OK ({len(t.local_names)} in local-host-names, "
        f"{len(t.relay_domains)} in relay-domains; "
        f"{warnings} warning{'s' if warnings != 1 else ''}; generation {snapshot.generation})"
    )
    for origin in cfg.origins:  # what the node file, the environment or -O gave
        print(f"  {origin.label} = {origin.value}  from {origin.where}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from mailgate import control

    cfg = daemon_config_or_exit(args.config)
    timeout = args.timeout if args.timeout is not None else cfg.stop_grace + STOP_MARGIN
    return report_outcome(control.stop(cfg, timeout))


DRAIN_LISTED = 20  # queue ids the drain report names; `mailgate mailq` lists the rest


def cmd_drain(args: argparse.Namespace) -> int:
    """Take the node out of service (control.drain), then hand over what is left (``--handover``)
    and say what is still queued: 0 when nothing is, 1 when something is (it stays queued)."""
    from mailgate import control, daemon
    from mailgate.delivery.attempt import DeliveryContext
    from mailgate.delivery.handover import hand_over
    from mailgate.queue.spool import Spool

    cfg = config_or_exit(args.config)
    outcome = control.drain(cfg, args.deadline, cfg.stop_grace + STOP_MARGIN)
    report_outcome(outcome)
    if outcome.code != control.RUNNING:
        return outcome.code  # the daemon is still there: the queue is its own
    spool = Spool(cfg.spool_dir)
    try:
        if args.handover is not None:
            snapshot = snapshot_or_exit(args.config)
            log = command_log(snapshot.config.log)
            if not open_log(cfg.hostname, log):
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

    snapshot = checked_snapshot(args.config)
    if snapshot is None:
        print("mailgate: reload refused: the daemon keeps its configuration", file=sys.stderr)
        return 1
    return report_outcome(control.reload(snapshot.config, args.timeout))


def cmd_status(args: argparse.Namespace) -> int:
    from mailgate import control

    return report_outcome(control.status(daemon_config_or_exit(args.config)))
