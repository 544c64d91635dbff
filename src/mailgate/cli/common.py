"""What the commands share: loading the config, the log of a command, argument types."""

from __future__ import annotations

import io
import json
import os
import sys
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from mailgate import maillog
from mailgate.config import Config, ConfigError, LogSettings, load_config, parse_config
from mailgate.snapshot import Snapshot, build_snapshot, load_snapshot
from mailgate.tables import table_errors
from mailgate.tables.maps import TableError

if TYPE_CHECKING:
    from mailgate.control import Outcome

STOP_MARGIN = 20.0  # seconds `mailgate stop` waits beyond stop_grace (the last cancellations)


def snapshot_or_exit(path: str | None) -> Snapshot:
    try:
        return load_snapshot(path)
    except (ConfigError, TableError) as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def config_or_exit(path: str | None) -> Config:
    """The settings alone: ``stop`` and ``status`` work whatever state the tables are in."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


# What `stop` and `status` need of a config to find the daemon and wait for it.
_DAEMON_KEYS = ("pid_file", "spool_dir", "stop_grace")


def daemon_config_or_exit(path: str | None) -> Config:
    """``config_or_exit`` for the commands that find the running daemon (``stop``,
    ``status``): when the file on disk no longer passes its check (an edit the daemon's
    reload refused, which is when an admin asks for the status), the daemon still runs on
    its old config and must still be found and stoppable: the file's ``pid_file``,
    ``spool_dir`` and ``stop_grace`` alone locate it, with a warning naming the error."""
    try:
        return load_config(path)
    except ConfigError as exc:
        error = exc
    cfg = _daemon_keys_only(path)
    if cfg is None:
        print(f"mailgate: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(
        f"mailgate: warning: {error}; the daemon is looked for by the file's "
        f"{', '.join(_DAEMON_KEYS)} alone (pid file {cfg.pid_file})",
        file=sys.stderr,
    )
    return cfg


def _daemon_keys_only(path: str | None) -> Config | None:
    """The config with only the file's ``_DAEMON_KEYS`` (and the environment's); None when
    even those do not load (the TOML itself broken, or one of them wrong)."""
    if path is None:
        return None
    p = Path(path).expanduser().absolute()
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    lines = []
    for key in _DAEMON_KEYS:
        value = doc.get(key)
        if isinstance(value, str):
            lines.append(f"{key} = {json.dumps(value)}\n")  # a JSON string is a TOML one
        elif isinstance(value, int | float) and not isinstance(value, bool):
            lines.append(f"{key} = {value}\n")
    try:
        return parse_config("".join(lines), p, p.parent, os.environ)
    except ConfigError:
        return None


def open_log(hostname: str, log: maillog.LogOptions, *, echo: bool = False) -> bool:
    try:
        maillog.setup(hostname, log, echo=echo)
    except OSError as exc:
        print(f"mailgate: cannot open the log: {exc}", file=sys.stderr)
        return False
    return True


def command_log(log: LogSettings) -> LogSettings:
    """The log of a command an admin runs (``flush``, the queue tools): the daemon's, but the
    JSON copy only to its file, never to stdout, which is the admin's."""
    return replace(log, json=log.json and log.json_file is not None)


def lost_when_detached(log: LogSettings) -> list[str]:
    """What ``serve --daemon`` would write to stderr or stdout, /dev/null once detached."""
    lost = []
    if maillog.text_target(log) == "stderr":
        lost.append('[log] target is stderr (no file, not "syslog"): the daemon\'s log is lost')
    if log.json and log.json_file is None:
        lost.append("[log] json goes to stdout (no json_file): the daemon's JSON lines are lost")
    return lost


def checked_snapshot(path: str | None) -> Snapshot | None:
    """What ``mailgate check`` checks: the config and every table it names, warnings
    printed; None (the error printed, file:line) when it does not load."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    try:
        snapshot = build_snapshot(config)
    except TableError as exc:
        # Every table's first error, not only the one that stopped the load.
        folder = config.tables_dir
        for error in (table_errors(folder) if folder is not None else []) or [exc]:
            print(f"error: {error}", file=sys.stderr)
        return None
    for w in snapshot.warnings():
        print(f"warning: {w}")
    return snapshot


def report_outcome(outcome: Outcome) -> int:
    print(f"mailgate: {outcome.text}", file=sys.stderr if outcome.error else sys.stdout)
    return outcome.code


def text_out() -> TextIO:
    """stdout, writing what it cannot encode (an address kept as raw bytes) as escapes, as
    Sendmail's mailq prints unprintable characters, rather than failing mid-listing."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")
    return sys.stdout


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
