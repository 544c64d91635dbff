"""Moving from Sendmail: import-mc, makemap, newaliases, install-sendmail-link."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from mailgate.config import ConfigError, load_config
from mailgate.tables.maps import TableError


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


def add_migration_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
