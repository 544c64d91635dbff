"""The command line: every subcommand's arguments, and ``main``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mailgate import __version__
from mailgate.cli.common import STOP_MARGIN, duration, host_port, minutes, positive_integer, seconds
from mailgate.cli.migrate import add_migration_commands, cmd_install_sendmail_link
from mailgate.cli.queue import cmd_flush, cmd_mailq, cmd_qshape, cmd_queue_tool
from mailgate.cli.routing import cmd_check_dns, cmd_route
from mailgate.cli.service import cmd_check, cmd_drain, cmd_reload, cmd_serve, cmd_status, cmd_stop


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
            help="TOML config file (default: $MAILGATE_CONFIG, else the embedded loopback config)",
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
        "--json",
        action="store_true",
        help="one JSON object per message (held ones too, any selection aside), as postqueue -j",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="mailq -v: with the priority column"
    )
    p.add_argument(
        "--quarantined",
        action="store_true",
        help="only the messages on hold (mailq -qQ: Sendmail's quarantine), not the others",
    )
    for flag, what in (("id", "-qI: the queue id"), ("recipient", "-qR: a pending recipient")):
        p.add_argument(
            f"--{flag}",
            action="append",
            default=[],
            metavar="TEXT",
            help=f"{what} contains TEXT (!TEXT: does not); given again: either",
        )
    p.add_argument(
        "--sender",
        action="append",
        default=[],
        metavar="TEXT",
        help="-qS: the sender contains TEXT (!TEXT: does not); given again: either",
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
    add_migration_commands(sub)
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
    from mailgate.sendmail import CONFIG_VARIABLE, PROGRAMS

    if argv is None:
        # Called as sendmail, mailq or newaliases (install-sendmail-link's links): that
        # program's command line, as Sendmail's binary acts on its argv[0].
        program = os.path.basename(sys.argv[0])
        if program in PROGRAMS:
            from mailgate.sendmail.command import run as sendmail

            return sendmail(sys.argv[1:], run_subcommand, program=program)
        argv = sys.argv[1:]
    if argv and argv[0] == "sendmail":
        from mailgate.sendmail.command import run as sendmail

        return sendmail(argv[1:], run_subcommand)
    args = build_parser().parse_args(argv)
    if getattr(args, "config", "") is None:
        # The variable the sendmail command honours, for every command: a `serve` that
        # missed it would run the embedded default on the spool in the working folder.
        args.config = os.environ.get(CONFIG_VARIABLE) or None
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
