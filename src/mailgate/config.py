"""Settings: one TOML file → frozen dataclasses, every error naming file and line.

Each setting is written once, as a dataclass field: `setting()` puts its converter, its default
(as it is written in TOML) and a one-line meaning into the field's metadata; the field's name is
the key, and the `section()` field of `Config` that holds the dataclass is the ``[section]``.
`parse_config` is a loop over those fields; `keys()` lists them for `mailgate.config --markdown`
and for the test that checks README's configuration table.

The Sendmail tables are not settings; they live beside the TOML file under their Sendmail names and
are loaded by `mailgate.tables`. Relative paths in the TOML file are relative to its folder; the
embedded default config (no file) resolves them against the working directory.

One config for many nodes: the main file's ``include`` names per-node files (``node.toml``)
whose keys replace the main file's one by one, and ``MAILGATE__KEY`` /
``MAILGATE__SECTION__KEY`` environment variables replace both (`_layers`). An error names the
file and line, or the variable, that gave the value; ``Config.origins`` says which values came
from where, for ``mailgate check``; ``Config.digest`` is a hash of everything read.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import re
import socket
import ssl
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import Field, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypeVar, cast, get_args

from mailgate import tls
from mailgate.errors import SourceError, where
from mailgate.logsink import Facility
from mailgate.maillog import Level, Target

T = TypeVar("T")
S = TypeVar("S")
L = TypeVar("L", bound=str)

# What tomllib gives for a value (dates and tables are no setting's type).
TomlValue: TypeAlias = str | int | float | bool | list["TomlValue"]
Convert: TypeAlias = Callable[[object], T]

FsyncMode = Literal["auto", "threads"]
TlsDelivery = Literal["may", "none"]
ProxyVersions = Literal["v1", "v2", "any"]  # as mailgate.smtp.proxy.Versions
Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(SourceError):
    """A bad setting; ``str()`` is ``path:line: message`` like a compiler error."""


# --- converters: a TOML value → the setting's type, or ValueError with the admin's words ----

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SIZE = re.compile(r"(\d+)\s*(k|kb|kib|m|mb|mib|g|gb|gib)?", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_duration(value: object) -> float:
    """``"30m"``, ``"1h30m"``, ``"5s"``, ``"250ms"`` or a number of seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError('expected a duration such as "30m" or "5s"')
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError('expected a duration such as "30m" or "5s"')
    text = value.strip().lower()
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f'bad duration {value!r}: use e.g. "30m", "5s", "1h30m"')
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2) and m.group(2).lower()]
        pos = m.end()
        while pos < len(text) and text[pos] == " ":
            pos += 1
    return total


def parse_size(value: object) -> int:
    """``"50M"``, ``"100MiB"``, ``"10MB"`` or a number of bytes → bytes."""
    if isinstance(value, bool):
        raise ValueError('expected a size such as "50M"')
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.fullmatch(value.strip())
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2) and m.group(2).lower()]
    raise ValueError(f'bad size {value!r}: use e.g. "50M", "100MiB" or a number of bytes')


def parse_listen(value: object) -> tuple[str, int]:
    """``"127.0.0.1:25"``, ``"[::1]:25"``, ``":25"`` (all IPv4 addresses) → (host, port)."""
    if not isinstance(value, str):
        raise ValueError('listen entries are strings like "127.0.0.1:2525"')
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'bad listen address {value!r}: use "ip:port" or "[ipv6]:port"')
    host = host or "0.0.0.0"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"bad listen address {value!r}: {host!r} is not an IP address") from None
    return host, int(port)


def _check_nameserver(value: object) -> str:
    # Not dns.parse_nameserver: that one is for values already checked here (it takes "+53"
    # and " 53" as ports, and its errors do not name the setting).
    if not isinstance(value, str):
        raise ValueError('nameservers are strings like "127.0.0.1" or "127.0.0.1:5353"')
    host, port = value, None
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif value.count(":") == 1:
        host, port = value.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"nameserver {value!r} is not an IP address") from None
    if port is not None and (not port.isdigit() or not 0 < int(port) < 65536):
        raise ValueError(f"nameserver {value!r} has a bad port")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _int(minimum: int = 0) -> Convert[int]:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected a whole number")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}")
        return value

    return convert


def _zero_or_between(low: int, high: int | None, zero: str) -> Convert[int]:
    """A whole number that is 0 (meaning ``zero``) or within ``low``..``high``."""

    def convert(value: object) -> int:
        number = _int(0)(value)
        if number and (number < low or (high is not None and number > high)):
            upper = f" and {high}" if high is not None else " or more"
            between = f"between {low}{upper}" if high is not None else f"{low}{upper}"
            raise ValueError(f"must be 0 ({zero}) or {between}")
        return number

    return convert


def _share(value: object) -> float:
    """``"80%"`` (or the whole number 80) → 0.8: a share of a limit, above 0, at most 100 %.
    A bare fraction (0.8) is refused rather than read as 0.8 %."""
    number: float | None = None
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            number = float(value.strip()[:-1])
        except ValueError:
            number = None
    elif isinstance(value, int) and not isinstance(value, bool):
        number = float(value)
    if number is None or not 0 < number <= 100:
        raise ValueError('expected a percentage such as "80%"')
    return number / 100


def _at_least(low: float) -> Convert[float]:
    def convert(value: object) -> float:
        seconds = parse_duration(value)
        if seconds < low:
            raise ValueError(f"must be at least {low:g} seconds")
        return seconds

    return convert


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be more than 0 seconds")
    return seconds


def _str(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


def _syslog_name(value: object) -> str:
    text = _str(value)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,31}", text):
        raise ValueError(f"{value!r} is not a program name (letters, digits, . _ / -; 32 at most)")
    return text


def _double_bounce_address(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    text = value.strip()
    if text and not re.fullmatch(r"[^\s<>@,;:\\\"()\[\]]+(@[A-Za-z0-9.\-]+)?", text):
        raise ValueError(f"{value!r} is not an address (write user or user@domain, no <>)")
    return text


def _hostname(value: object) -> str:
    text = _str(value).rstrip(".").lower()
    if not re.fullmatch(r"[a-z0-9]([a-z0-9\-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9\-]*[a-z0-9])?)*", text):
        raise ValueError(f"{value!r} is not a valid host name")
    return text


def _path(value: object) -> Path:
    """A path as written (``~`` expanded); `_Reader` resolves a relative one (``relative=``)."""
    return Path(_str(value)).expanduser()


def _path_or_none(value: object) -> Path | None:
    return None if value == "" else _path(value)


def _str_list(item: Convert[T]) -> Convert[tuple[T, ...]]:
    def convert(value: object) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise ValueError('expected a list, e.g. ["a", "b"]')
        return tuple(item(v) for v in value)

    return convert


def _listen(value: object) -> tuple[tuple[str, int], ...]:
    # May be empty when [[listener]] tables are given (parse_config checks there is one).
    return _str_list(parse_listen)(value)


def _network(value: object) -> Network:
    """``"10.0.0.0/24"``, ``"2001:db8::/64"`` or one address (``"10.0.0.5"``, a /32)."""
    text = _str(value)
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            loose = ipaddress.ip_network(text, strict=False)
            raise ValueError(f"{text!r} has host bits set: did you mean {loose}?") from None
        raise ValueError(f"{text!r} is not an address or network (CIDR)") from None
    if net.prefixlen == 0:
        # Trusting every address lets anyone claim to be any client, 127.0.0.1 included,
        # which may relay: the open relay this setting is there to prevent.
        raise ValueError(
            f"{text!r} trusts every address: anyone could claim to be any client; "
            "list the load balancers' addresses"
        )
    return net


def _trusted_networks(value: object) -> tuple[Network, ...]:
    """``proxy_trusted``: networks none of which, nor all of them together, is every address
    (``["0.0.0.0/1", "128.0.0.0/1"]`` is a ``/0`` too)."""
    nets = _str_list(_network)(value)
    for version in (4, 6):
        same = [n for n in nets if n.version == version]
        whole = [n for n in ipaddress.collapse_addresses(same) if n.prefixlen == 0]  # type: ignore[type-var]
        if whole:
            raise ValueError(
                f"{', '.join(repr(str(n)) for n in same)} together trust every address "
                f"({whole[0]}): anyone could claim to be any client; list the load balancers' "
                "addresses"
            )
    return nets


_FILTER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _filter_name(value: object) -> str:
    """A ``[[milter]]`` name: one word, as Sendmail's ``X`` lines (and ``confINPUT_MAIL_FILTERS``,
    a comma list) have them; it is the ``Milter (name)`` of log lines and a metrics label."""
    name = _str(value)
    if _FILTER_NAME.fullmatch(name) is None:
        raise ValueError(f"{name!r} is not a filter name: letters, digits, '-', '_', '.'")
    return name


def _joined(base: Path, path: Path) -> Path:
    """``base / path``; with a ``..`` in it, resolved as the kernel would (through any
    symbolic link), so that the spool, the pid file and the logs are not shown as
    ``/etc/mail/../spool`` in every line that names them."""
    joined = base / path
    return joined.resolve() if ".." in joined.parts else joined


def _listen_or_off(value: object) -> tuple[str, int] | None:
    return None if value == "" else parse_listen(value)


def _nameservers(value: object) -> tuple[str, ...] | None:
    return _str_list(_check_nameserver)(value) or None  # [] = the system resolver too


def _one_of(options: tuple[L, ...]) -> Convert[L]:
    def convert(value: object) -> L:
        word = _str(value).lower()
        for option in options:
            if word == option:
                return option
        listed = " or ".join(f'"{o}"' for o in options)
        raise ValueError(f"must be {listed}, not {value!r}")

    return convert


_PRIVACY_FLAGS = {
    "authwarnings",
    "novrfy",
    "noexpn",
    "noverb",
    "goaway",
    "public",
    "needmailhelo",
    "needexpnhelo",
    "needvrfyhelo",
    "noetrn",
    "noreceipts",
    "nobodyreturn",
    "restrictqrun",
    "restrictmailq",
    "restrictexpand",
    "noactualrecipient",
}


def _privacy_flag(value: object) -> str:
    flag = _str(value).lower()
    if flag not in _PRIVACY_FLAGS:
        raise ValueError(f"unknown privacy flag {value!r}")
    return flag


_UUCP_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_UUX_MACROS = ("g", "h", "u")


def _uucp_name(value: object) -> str:
    text = _str(value)
    if not _UUCP_NAME.fullmatch(text):
        raise ValueError(f"{value!r} is not a UUCP node name (letters, digits, . _ -)")
    return text


def _uux_args(value: object) -> tuple[str, ...]:
    """Sendmail's ``A=`` of a UUCP mailer: argv words; ``$g``, ``$h`` and ``$u`` expanded,
    the one word holding ``$u`` repeated for each recipient."""
    words = tuple(_str(value).split())
    for word in words:
        for macro in re.findall(r"\$(.?)", word):
            if macro not in _UUX_MACROS:
                raise ValueError(
                    f"{word!r}: only $g (sender), $h (host) and $u (recipient) are expanded"
                )
    if sum("$u" in w for w in words) != 1:
        raise ValueError("needs exactly one word with $u (it is given once per recipient)")
    return words


def default_uucp_node() -> str:
    """Sendmail's ``$k``: the node name of ``uname``."""
    try:
        return _uucp_name(os.uname().nodename)
    except ValueError:
        return "localhost"


def default_hostname() -> str:
    name = socket.getfqdn() or socket.gethostname() or "localhost"
    try:
        return _hostname(name)
    except ValueError:
        return "localhost"


# --- the definition ------------------------------------------------------------------------

_SETTING = "mailgate.setting"
_SECTION = "mailgate.section"
_TABLES = "mailgate.tables"


@dataclass(frozen=True)
class Setting:
    """What a field's metadata holds: how its TOML value is read, and what README says of it."""

    convert: Convert[object]
    default: TomlValue | None  # as written in TOML; None: absent, see ``shown``
    doc: str  # one line; README's table may say more
    shown: str | None = None  # README's words for a default that is no TOML value
    relative: bool = False  # a path, relative to the TOML file's folder


def setting(
    convert: Convert[T],
    default: TomlValue | None,
    doc: str,
    *,
    shown: str | None = None,
    relative: bool = False,
    factory: Callable[[], T] | None = None,
) -> T:
    """A settings field: ``default`` is what the admin would write in TOML, and ``convert``
    makes the field's default of it, so the default passes its own check. ``factory`` is for a
    default that is found at start (the host name); ``shown`` then says what it is."""
    if (default is None) == (shown is None):
        raise TypeError("a setting has a TOML default or, when it has none, shown words")
    meta = {_SETTING: Setting(convert, default, doc, shown, relative)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    value = None if default is None else convert(default)
    return cast(T, field(default=value, metadata=meta))


def section(cls: Callable[[], S]) -> S:
    """A ``[section]`` of `Config`, named by the field; its settings are ``cls``'s fields."""
    return field(default_factory=cls, metadata={_SECTION: cls})


def tables(cls: Callable[..., S]) -> tuple[S, ...]:
    """``[[name]]`` tables of `Config` (TOML's array of tables), named by the field: each one
    a ``cls`` of its own settings, in the file's order."""
    return cast(tuple[S, ...], field(default=(), metadata={_TABLES: cls}))


@dataclass(frozen=True)
class SmtpSettings:
    greet_pause: float = setting(
        parse_duration, "5s", "hold the greeting (access `GreetPause:` overrides per client)"
    )
    max_message_size: int = setting(
        parse_size, "50M", "announced in SIZE, refused with 552 (`0` = no limit)"
    )
    max_recipients: int = setting(_int(1), 100, "more get `452 4.5.3 Too many recipients`")
    max_command_line: int = setting(  # Sendmail's MAXLINE, Postfix's line_length_limit
        _int(512), 2048, "longest command line accepted, CRLF included (RFC 5321's 512 or more)"
    )
    # RFC 5321 4.5.3.1.6: a server must take lines of 1000 bytes, so no lower limit. 0 = no
    # limit (the default, as Postfix's smtpd and Sendmail: long lines are folded on the way out).
    max_text_line: int = setting(
        _zero_or_between(1000, None, "no limit"),
        0,
        "longest message line accepted, CRLF included (`0` = no limit; else at least `1000`)",
    )
    command_timeout: float = setting(  # RFC 5321 4.5.3.2.7: at least 5 minutes
        parse_duration, "5m", "waiting for a command (RFC 5321 §4.5.3.2)"
    )
    data_timeout: float = setting(  # RFC 5321 4.5.3.2.6 data block, per read
        parse_duration, "3m", "waiting for message content, per read (RFC 5321 §4.5.3.2)"
    )
    max_bad_commands: int = setting(  # Sendmail's MAXBADCOMMANDS
        _int(1), 25, "unknown / refused commands answered; the next gets `421` and close"
    )
    privacy: tuple[str, ...] = setting(
        _str_list(_privacy_flag),
        ["authwarnings", "novrfy", "noexpn", "noverb"],
        "Sendmail's PrivacyOptions",
    )
    bad_rcpt_throttle: int = setting(
        _int(0), 1, "after N refused RCPTs, answer each RCPT after `bad_rcpt_throttle_delay`"
    )
    bad_rcpt_throttle_delay: float = setting(
        parse_duration, "1s", "the pause of `bad_rcpt_throttle`"
    )
    max_bad_rcpts: int = setting(_int(0), 20, "after N refused RCPTs, `421` and close")
    connection_rate_throttle: int = setting(
        _int(0),
        100,
        "new connections accepted per second on each listening socket, all workers together"
        " (`0` = no limit)",
    )
    max_connections_per_ip: int = setting(
        _int(0),
        20,
        "more get `421 4.3.2 Too many open connections.` (Sendmail's conncontrol; `0` = no limit;"
        " the local host, 127.0.0.1 and ::1, is never limited)",
    )
    max_connections: int = setting(
        _int(1), 20000, "sessions at once (all workers together); beyond, new connections wait"
    )
    # Postfix's stress mode: past this share of max_connections, shorter timeouts.
    stress_threshold: float = setting(
        _share, "80%", "share of `max_connections` at which stress mode starts"
    )
    stress_timeout: float = setting(
        _positive_duration, "10s", "command and DATA timeout under stress"
    )
    # Postfix 3.9's smtpd_forbid_unauth_pipelining: content sent before our 354 closes.
    forbid_unauth_pipelining: bool = setting(
        _bool, True, "content sent before our `354` gets `554 5.5.0` and the session is closed"
    )
    allow_bogus_helo: bool = setting(
        _bool,
        False,
        "take any HELO/EHLO argument; else a host name or address literal, or `501 5.0.0 "
        "Invalid domain name` (Sendmail's AllowBogusHELO)",
    )
    check_sender_domain: bool = setting(
        _bool,
        True,
        "MAIL FROM domain must resolve (MX/A/AAAA; an address literal, a PTR name, as Sendmail)",
    )
    require_qualified_sender: bool = setting(_bool, True, "`553 5.5.4` for a sender without domain")


@dataclass(frozen=True)
class QueueSettings:
    run_interval: float = setting(
        _positive_duration, "30m", "retry interval cap (Sendmail's `-q30m`)"
    )
    retry_min: float = setting(
        parse_duration, "4m", "first retry; doubles each time up to `run_interval`"
    )
    max_age: float = setting(
        parse_duration, "5d", "then the sender gets a bounce (Timeout.queuereturn)"
    )
    warn_after: float = setting(
        parse_duration, "4h", "then the sender gets a delay warning (Timeout.queuewarn)"
    )
    double_bounce_address: str = setting(
        _double_bounce_address,
        "postmaster",
        "who gets the report on a bounce that failed (Sendmail's DoubleBounceAddress; "
        'a local name is ours, `""` drops them, logged)',
    )
    max_deliveries: int = setting(_int(1), 200, "delivery attempts at once")
    active_limit: int = setting(
        _int(4),
        20_000,
        "queued messages the scheduler keeps in memory at most (Postfix's "
        "`qmgr_message_active_limit`); the rest wait on disk for a queue pass",
    )
    max_per_destination: int = setting(
        _int(1),
        20,
        "SMTP deliveries at once to one next hop (Postfix's "
        "`default_destination_concurrency_limit`); the others wait their turn",
    )
    fsync: FsyncMode = setting(
        _one_of(get_args(FsyncMode)),
        "auto",
        "how the spool flushes before `250`: `auto` (Linux AIO) or `threads`",
    )
    # Sendmail's MinFreeBlocks / Postfix's queue_minfree: below this much free space in the
    # spool's file system, MAIL and DATA get 452 4.3.1 (0 = no check). The reserve is what
    # messages already in DATA, status files and bounces (up to a whole message) still need.
    min_free: int = setting(
        parse_size, "100M", "free space the spool keeps; below it, mail gets `452 4.3.1`"
    )


@dataclass(frozen=True)
class DeliverySettings:
    connect_timeout: float = setting(parse_duration, "30s", "per address tried")
    command_timeout: float = setting(
        parse_duration, "5m", "scales the SMTP client's RFC 5321 stage timeouts down"
    )
    helo_name: str | None = setting(
        _hostname, None, "the name we give in EHLO/HELO", shown="`hostname`"
    )
    bind_address: str | None = setting(
        _str, None, "source address of connections to next hops", shown="none"
    )
    port: int = setting(  # for hops without a port of their own (MX and plain hosts)
        _int(1), 25, "port for next hops that do not name one"
    )
    # Longer lines are broken with CRLF SPACE before they go out (Postfix's
    # smtp_line_length_limit); 998 is RFC 5321 4.5.3.1.6's limit without the CRLF. Below 78
    # (RFC 5322's recommended length) folding would cut up ordinary mail.
    line_length_limit: int = setting(
        _zero_or_between(78, 998, "lines are never broken"),
        998,
        "longer lines are broken with CRLF SPACE on the way out (`0` = never)",
    )


@dataclass(frozen=True)
class DnsSettings:
    nameservers: tuple[str, ...] | None = setting(
        _nameservers, None, '`"ip"` or `"ip:port"` list', shown="system resolver"
    )
    timeout: float = setting(parse_duration, "5s", "per DNS query")


@dataclass(frozen=True)
class LocalSettings:
    maildir_root: Path = setting(
        _path, "maildir", "local users are system accounts or folders here", relative=True
    )


@dataclass(frozen=True)
class UucpSettings:
    # cf/mailer/uucp.m4's UUCP_MAILER_PATH, UUCP_MAILER_ARGS and UUCP_MAILER_MAX (M=).
    uux: str = setting(
        _str, "/usr/bin/uux", "the uux of the UUCP mailers (a bare name is looked up in PATH)"
    )
    args: tuple[str, ...] = setting(
        _uux_args,
        "uux - -r -a$g -gC $h!rmail ($u)",
        "its arguments (`UUCP_MAILER_ARGS`): `$g` sender, `$h` host, `$u` each recipient",
    )
    node: str = setting(
        _uucp_name,
        None,
        "our UUCP name (`$U`/`$k`): UUCP senders are `node!user`, From_ says `remote from node`",
        shown="`uname -n`",
        factory=default_uucp_node,
    )
    max_size: int = setting(
        parse_size,
        100000,
        "`UUCP_MAX_SIZE`: bigger messages bounce, `552 5.3.4` (`0` = no limit)",
    )


@dataclass(frozen=True)
class AccessSettings:
    blocklist_recipients: bool = setting(
        _bool, False, "FEATURE(blocklist_recipients) for `To:` REJECT"
    )


@dataclass(frozen=True)
class TlsSettings:
    cert_file: Path | None = setting(
        _path_or_none,
        None,
        "PEM certificate chain; with `key_file`, STARTTLS is offered",
        shown="none",
        relative=True,
    )
    key_file: Path | None = setting(_path_or_none, None, "its PEM key", shown="none", relative=True)
    delivery: TlsDelivery = setting(
        _one_of(get_args(TlsDelivery)),
        "may",
        "STARTTLS to next hops that offer it (`may`), or never (`none`)",
    )
    # Built (and so checked) when the config is read: a bad pair is a config error.
    server_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ListenerSettings:
    """One ``[[listener]]`` table: an address and what is particular to it. A ``listen``
    entry is a listener with only its address."""

    address: tuple[str, int] = setting(
        parse_listen, None, '`"ip:port"` / `"[v6]:port"` to listen on', shown="required"
    )
    proxy_protocol: ProxyVersions | None = setting(
        _one_of(get_args(ProxyVersions)),
        None,
        "`v1`, `v2` or `any`: every connection starts with a PROXY header, whose client it is",
        shown="none (no PROXY header)",
    )
    proxy_trusted: tuple[Network, ...] = setting(
        _trusted_networks,
        [],
        "the proxies' addresses or CIDR networks; required with `proxy_protocol`",
    )
    proxy_timeout: float = setting(  # the spec: no sooner than 3 s; Postfix's default 5 s
        _at_least(3.0), "5s", "the PROXY header must arrive within this (at least `3s`)"
    )

    @property
    def label(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class SubmissionSettings:
    # Sendmail's class t: who may set the envelope sender with `sendmail -f` without an
    # X-Authentication-Warning. The spool's owner (the daemon's user) always may.
    trusted_users: tuple[str, ...] = setting(
        _str_list(_str),
        ["root", "daemon"],
        "who may use `sendmail -f` without an `X-Authentication-Warning` (Sendmail's class t)",
    )
    # Postfix's non_smtpd_milters: [[milter]] names, checked against them at load.
    milters: tuple[str, ...] = setting(
        _str_list(_str),
        [],
        "the `[[milter]]` filters (by name, in order) that mail from the sendmail command "
        "goes through (Postfix's `non_smtpd_milters`)",
    )


@dataclass(frozen=True)
class LogSettings:
    # No default target: a file setting is the file target (as before targets existed), and
    # without one the lines go to stderr, where `mailgate serve` in a terminal shows them.
    target: Target | None = setting(
        _one_of(get_args(Target)),
        None,
        "`stderr`, `file` or `syslog`: where maillog lines go",
        shown='`"file"` when `file` is set, else `"stderr"`',
    )
    file: Path | None = setting(
        _path_or_none, None, "the file of target `file`", shown="none", relative=True
    )
    level: Level = setting(
        _one_of(get_args(Level)),
        "info",
        "`debug`, `info`, `notice`, `warning` or `error`: the least written",
    )
    syslog_socket: Path = setting(
        _path, "/dev/log", "the syslog daemon's socket (target `syslog`)", relative=True
    )
    facility: Facility = setting(
        _one_of(get_args(Facility)), "mail", "the syslog facility (target `syslog`)"
    )
    # Postfix's syslog_name. Log readers find a mail server's lines by this name: fail2ban's
    # sendmail filters and logwatch's sendmail service by "sendmail" or "sm-mta".
    syslog_name: str = setting(
        _syslog_name,
        "mailgate",
        'the program name of each line (`name[pid]:`); `"sm-mta"` or `"sendmail"` keeps '
        "fail2ban's and logwatch's Sendmail filters reading them",
    )
    json: bool = setting(_bool, False, "also write each line as a JSON object (`json_file`)")
    json_file: Path | None = setting(
        _path_or_none, None, "where the JSON lines go", shown="stdout", relative=True
    )


@dataclass(frozen=True)
class MetricsSettings:
    # Off unless asked for: a config that predates metrics opens no new port on upgrade, and
    # two daemons on one host do not fight over one. The embedded default config turns it on.
    listen: tuple[str, int] | None = setting(
        _listen_or_off,
        "",
        '`/metrics` and `/health` over HTTP, e.g. `"127.0.0.1:9925"` (`""` = off)',
    )
    # The queue of a node is its senders' and recipients' addresses: listed only to someone
    # who has the cluster's token, and not at all until one is set.
    token_file: Path | None = setting(
        _path_or_none,
        None,
        "a file holding the shared token that `/queue` and `/qshape` require (off without it)",
        shown="none",
        relative=True,
    )
    # Read (and so checked) when the config is read: a missing file is a config error.
    token: str | None = field(default=None, compare=False, repr=False)


MilterAction = Literal["tempfail", "reject", "accept", "quarantine", "shutdown"]


@dataclass(frozen=True)
class MilterSocket:
    """Where a filter listens: ``inet`` (``host``, ``port``) or ``unix`` (``path``)."""

    kind: Literal["inet", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"inet:{self.port}@{self.host}"


def parse_milter_socket(value: object) -> MilterSocket:
    """Sendmail's and the filters' ``inet:port@host`` (``inet6:`` too), Postfix's
    ``inet:host:port``, ``unix:/path`` (Sendmail's ``local:`` too)."""
    text = _str(value).strip()
    kind, colon, where = text.partition(":")
    kind = kind.lower()
    if colon and kind in ("unix", "local"):
        if not where:
            raise ValueError(f'{text!r}: give the socket\'s path, as in "unix:/run/x.sock"')
        return MilterSocket("unix", path=where)
    if colon and kind in ("inet", "inet6"):
        if "@" in where:
            port, _, host = where.partition("@")
        else:
            host, _, port = where.rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return MilterSocket("inet", host=host, port=int(port))
    raise ValueError(
        f'bad milter socket {text!r}: use "inet:port@host" (or "inet:host:port") or "unix:/path"'
    )


def _macro_list(value: object) -> tuple[str, ...]:
    names = _str_list(_str)(value)
    for name in names:
        if not re.fullmatch(r"\{?[A-Za-z0-9_]+\}?", name) or name.count("{") != name.count("}"):
            raise ValueError(f"{name!r} is not a macro name (j, _, {{client_addr}}, ...)")
    return names


@dataclass(frozen=True)
class MilterSettings:
    """One ``[[milter]]``: a content filter spoken to with Sendmail's milter protocol."""

    name: str = setting(
        _filter_name,
        None,
        "the filter's name in log lines and metrics (Sendmail's `X` name): letters, digits, "
        "`-`, `_`, `.`",
        shown="required",
    )
    socket: MilterSocket = setting(
        parse_milter_socket,
        None,
        'where it listens: `"inet:port@host"`, `"inet:host:port"` or `"unix:/path"`',
        shown="required",
    )
    default_action: MilterAction = setting(
        _one_of(get_args(MilterAction)),
        "tempfail",
        "when the filter is down, slow or wrong: `tempfail`, `reject`, `accept`, "
        "`quarantine` or `shutdown`",
    )
    connect_timeout: float = setting(
        _positive_duration, "30s", "to connect and negotiate (Sendmail's `T=C:`)"
    )
    send_timeout: float = setting(
        _positive_duration, "10s", "to write one event to the filter (`T=S:`)"
    )
    read_timeout: float = setting(
        _positive_duration, "30s", "for its answer to each event but the last (`T=R:`)"
    )
    eom_timeout: float = setting(
        _positive_duration, "5m", "for its final answer at end of message (`T=E:`)"
    )
    listen: tuple[tuple[str, int], ...] | None = setting(
        lambda v: _str_list(parse_listen)(v) or None,
        None,
        "the `listen` addresses whose sessions it filters",
        shown="all of them",
    )
    reuse_connections: int = setting(
        _int(0),
        0,
        "idle connections kept for later SMTP sessions (SMFIC_QUIT_NC); 0: one per session",
    )
    connect_macros: tuple[str, ...] = setting(
        _macro_list,
        [
            "j",
            "{daemon_name}",
            "{daemon_addr}",
            "{daemon_port}",
            "{if_addr}",
            "v",
            "_",
            "{client_addr}",
            "{client_name}",
            "{client_port}",
            "{client_ptr}",
            "{client_resolve}",
        ],
        "macros sent at connect, unless the filter asks for others",
    )
    helo_macros: tuple[str, ...] = setting(
        _macro_list,
        ["{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}"],
        "macros sent at HELO/EHLO",
    )
    mail_macros: tuple[str, ...] = setting(
        _macro_list,
        [
            "i",
            "{auth_type}",
            "{auth_authen}",
            "{auth_author}",
            "{mail_addr}",
            "{mail_host}",
            "{mail_mailer}",
        ],
        "macros sent at MAIL",
    )
    rcpt_macros: tuple[str, ...] = setting(
        _macro_list,
        ["i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"],
        "macros sent at RCPT",
    )
    data_macros: tuple[str, ...] = setting(_macro_list, ["i"], "macros sent at DATA")
    eoh_macros: tuple[str, ...] = setting(
        _macro_list, ["i"], "macros sent at the end of the header"
    )
    eom_macros: tuple[str, ...] = setting(
        _macro_list, ["i", "{msg_id}"], "macros sent at the end of the message"
    )


@dataclass(frozen=True)
class Origin:
    """A value that is not the main file's: ``label`` (``[smtp] greet_pause``), the value as
    written, and where (``node.toml:3``, ``environment variable MAILGATE__…``, ``-O …``)."""

    label: str
    value: str
    where: str


@dataclass(frozen=True)
class Config:
    path: Path | None  # the TOML file; None: the embedded default config
    include: tuple[Path, ...] = setting(
        _str_list(_path),
        [],
        "per-node files (`node.toml`) read after this one: their keys replace this file's",
    )
    hostname: str = setting(
        _hostname,
        None,
        "`$j`: greeting, Received, bounces",
        shown="the machine's FQDN",
        factory=default_hostname,
    )
    listen: tuple[tuple[str, int], ...] = setting(
        _listen, ["127.0.0.1:2525"], '`"ip:port"` / `"[v6]:port"` list'
    )
    # Listeners with settings of their own (the PROXY protocol); `listeners` is both kinds.
    listener: tuple[ListenerSettings, ...] = tables(ListenerSettings)
    # Content filters (milters), in the order they are applied.
    milter: tuple[MilterSettings, ...] = tables(MilterSettings)
    spool_dir: Path = setting(_path, "spool", "the durable queue", relative=True)
    # None (the default) is replaced by the TOML file's folder; the embedded config has none.
    tables_dir: Path | None = setting(
        _path_or_none,
        None,
        "where the Sendmail tables are read",
        shown="the TOML file's folder",
        relative=True,
    )
    relay_hosts_only: bool = setting(
        _bool, True, "FEATURE(relay_hosts_only): RELAY grants are exact names"
    )
    # None (the default) is replaced by spool_dir/mailgate.pid, as Postfix keeps its master.pid
    # in its queue folder: `mailgate stop`, `reload` and `status` find the daemon there. "" is
    # no pid file (systemd does not need one, but those three commands then cannot work).
    pid_file: Path | None = setting(
        _path_or_none,
        None,
        "the daemon's (master's) pid, locked while it runs; `mailgate.state.json` beside it",
        shown="`spool_dir`/mailgate.pid",
        relative=True,
    )
    workers: int = setting(  # processes sharing the listeners and the spool; 0 = one per CPU
        _int(0), 0, "processes sharing the listeners and the spool (`0` = one per CPU)"
    )
    stop_grace: float = setting(
        parse_duration,
        "10s",
        "on stop, how long sessions and deliveries in progress may take to finish",
    )
    smtp: SmtpSettings = section(SmtpSettings)
    queue: QueueSettings = section(QueueSettings)
    delivery: DeliverySettings = section(DeliverySettings)
    dns: DnsSettings = section(DnsSettings)
    local: LocalSettings = section(LocalSettings)
    uucp: UucpSettings = section(UucpSettings)
    access: AccessSettings = section(AccessSettings)
    submission: SubmissionSettings = section(SubmissionSettings)
    log: LogSettings = section(LogSettings)
    tls: TlsSettings = section(TlsSettings)
    metrics: MetricsSettings = section(MetricsSettings)
    # Values that a node file, the environment or the command line gave (`mailgate check`).
    origins: tuple[Origin, ...] = field(default=(), compare=False)
    # sha256 of every file and variable read: `Snapshot.generation` adds the tables.
    digest: str = field(default="", compare=False)

    @property
    def source(self) -> str:
        return str(self.path) if self.path else "<embedded default config>"

    @property
    def helo_name(self) -> str:
        return self.delivery.helo_name or self.hostname

    @property
    def worker_processes(self) -> int:
        # The CPUs this process may run on (a container's or taskset's share), not the host's.
        return self.workers or len(os.sched_getaffinity(0))

    @property
    def listeners(self) -> tuple[ListenerSettings, ...]:
        """Every listener: the ``listen`` addresses (plain), then the ``[[listener]]`` tables."""
        return tuple(ListenerSettings(address=a) for a in self.listen) + self.listener

    @property
    def listening_on(self) -> str:
        """The listeners' addresses as the maillog names them."""
        return ", ".join(listener.label for listener in self.listeners)


@dataclass(frozen=True)
class Key:
    """One setting as the admin sees it: ``[section] name``, its default and its meaning."""

    section: str  # "" for the top level
    name: str
    setting: Setting
    array: bool = False  # a key of ``[[section]]`` tables

    @property
    def label(self) -> str:
        if self.array:
            return f"[[{self.section}]] {self.name}"
        return f"[{self.section}] {self.name}" if self.section else self.name

    @property
    def shown_default(self) -> str:
        """The default as README's table gives it: a TOML value in backquotes, or words."""
        if self.setting.default is None:
            return self.setting.shown or ""
        return f"`{toml_literal(self.setting.default)}`"


def _settings_of(cls: type[object]) -> Iterator[tuple[Field[Any], Setting]]:
    for f in fields(cast(Any, cls)):
        spec = f.metadata.get(_SETTING)
        if spec is not None:
            yield f, spec


def _sections() -> Iterator[tuple[str, type[object]]]:
    for f in fields(Config):
        cls = f.metadata.get(_SECTION)
        if cls is not None:
            yield f.name, cls


def _table_arrays() -> Iterator[tuple[str, type[object]]]:
    for f in fields(Config):
        cls = f.metadata.get(_TABLES)
        if cls is not None:
            yield f.name, cls


def keys() -> tuple[Key, ...]:
    """Every setting, top level first, then the ``[[tables]]``, then each section in
    `Config`'s order."""
    found = [Key("", f.name, spec) for f, spec in _settings_of(Config)]
    for name, cls in _table_arrays():
        found += [Key(name, f.name, spec, array=True) for f, spec in _settings_of(cls)]
    for name, cls in _sections():
        found += [Key(name, f.name, spec) for f, spec in _settings_of(cls)]
    return tuple(found)


def toml_literal(value: TomlValue) -> str:
    """``value`` written as TOML (README's spelling: no blanks inside lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string, for the values defaults hold
    if isinstance(value, list):
        return "[" + ",".join(toml_literal(v) for v in value) + "]"
    return str(value)


def markdown_rows() -> list[str]:
    """README's configuration table from the definition, one row per key."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{k.label}` | {k.shown_default} | {k.setting.doc} |" for k in keys()]
    return rows


# --- the reader ----------------------------------------------------------------------------

# A [table] or [[array of tables]] header; the name may be spaced, quoted or dotted.
_HEADER = re.compile(r"\s*\[\[?\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")


def _key_line(key: str) -> re.Pattern[str]:
    """A line that assigns ``key`` (bare or quoted), or a dotted key under it."""
    return re.compile(rf"\s*([\"']?){re.escape(key)}\1\s*[=.]")


def _dotted(section: str, key: str) -> re.Pattern[str]:
    return re.compile(rf"\s*{re.escape(section)}\s*\.\s*{re.escape(key)}\s*=")


class _Reader:
    """Pulls typed values out of the parsed TOML, turning mistakes into ConfigErrors with lines."""

    def __init__(self, path: str, text: str, data: dict[str, Any]) -> None:
        self.path = path
        self.lines = text.split("\n")  # as tomllib counts them (splitlines() also breaks at FF)
        self.data = data
        # (section, key) → the node file or variable that gave it ("" section: the top
        # level, and a [[name]] array as a whole): its errors are that source's.
        self.owners: dict[tuple[str, str], _Reader | _EnvVariable] = {}

    def line_of(self, section: str, key: str | None) -> int | None:
        """Best-effort line number of ``key`` in ``[section]``, or of ``[section]`` itself for
        None (tomllib gives no positions). Dotted keys and inline tables at the top are found
        too, and ``[section.key]`` for a key that is a table."""
        current = ""
        for no, line in enumerate(self.lines, 1):
            m = _HEADER.match(line)
            if m:
                current = re.sub(r"[\"'\s]", "", m.group(1))
                if current == (section if key is None else f"{section}.{key}".lstrip(".")):
                    return no
                continue
            if key is None:
                if current == "" and section and _key_line(section).match(line):
                    return no  # smtp.greet_pause = … or smtp = { … }
                continue
            if current == section and _key_line(key).match(line):
                return no
            if current == "" and section and _dotted(section, key).match(line):
                return no  # smtp.greet_pause = … at the top
        return None

    def error(self, section: str, key: str | None, message: str) -> ConfigError:
        owner = self.owners.get((section, key) if key is not None else ("", section))
        if owner is not None:
            return owner.error(section, key, message)
        name = f"{section}.{key}" if section and key else (key or section)
        line = self.line_of(section, key)
        if line is None and key is not None and section:
            line = self.line_of(section, None)  # a key that is missing: its section's header
        return ConfigError(self.path, line, f"{name}: {message}")

    def table(self, section: str) -> dict[str, Any]:
        value = self.data.get(section, {}) if section else self.data
        if not isinstance(value, dict):
            raise self.error("", section, "must be a table ([section])")
        return value

    def values(self, section: str, cls: type[object], base: Path) -> dict[str, object]:
        """The settings of ``cls`` that ``[section]`` gives, converted, and its relative
        paths made absolute (the others are left to the dataclass's defaults)."""
        return self._converted(
            self.table(section), cls, base, lambda key, text: self.error(section, key, text)
        )

    def _converted(
        self,
        given: dict[str, Any],
        cls: type[object],
        base: Path,
        error: Callable[[str, str], ConfigError],
    ) -> dict[str, object]:
        out: dict[str, object] = {}
        for f, spec in _settings_of(cls):
            if f.name in given:
                try:
                    value = spec.convert(given[f.name])
                except (ValueError, TypeError) as exc:
                    raise error(f.name, str(exc)) from None
            elif spec.relative:
                value = f.default
            else:
                continue
            if spec.relative and isinstance(value, Path) and not value.is_absolute():
                value = _joined(base, value)
            out[f.name] = value
        return out

    # -- [[name]] tables: the n-th one (from 1) is named name[n] in errors ----------------
    def entries(self, name: str) -> list[dict[str, Any]]:
        value = self.data.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error("", name, f"must be tables, each under its own [[{name}]] line")
        return value

    def entry_line(self, name: str, index: int, key: str | None) -> int | None:
        """The line of ``key`` in the ``index``-th ``[[name]]`` table (from 1), or of that
        table's header line when ``key`` is None or not on a line of its own."""
        header: int | None = None
        seen = 0
        for no, line in enumerate(self.lines, 1):
            m = _HEADER.match(line)
            if m:
                if header is not None:
                    break  # the end of that table
                current = re.sub(r"[\"'\s]", "", m.group(1))
                if current == name and line.lstrip().startswith("[["):
                    seen += 1
                    if seen == index:
                        header = no
                continue
            if header is not None and key is not None and _key_line(key).match(line):
                return no
        return header

    def entry_error(self, name: str, index: int, key: str | None, message: str) -> ConfigError:
        owner = self.owners.get(("", name))
        if isinstance(owner, _Reader):  # a node file's [[name]] tables replace the main file's
            return owner.entry_error(name, index, key, message)
        label = f"{name}[{index}]" + (f".{key}" if key else "")
        return ConfigError(self.path, self.entry_line(name, index, key), f"{label}: {message}")

    def entry_values(
        self, name: str, index: int, given: dict[str, Any], cls: type[object], base: Path
    ) -> dict[str, object]:
        known = {f.name for f, _ in _settings_of(cls)}
        for key in given:
            if key not in known:
                raise self.entry_error(name, index, key, "unknown setting")
        return self._converted(
            given, cls, base, lambda key, text: self.entry_error(name, index, key, text)
        )

    def check_unknown(self) -> None:
        known = {name: {f.name for f, _ in _settings_of(cls)} for name, cls in _sections()}
        arrays = {name for name, _ in _table_arrays()}
        top = {f.name for f, _ in _settings_of(Config)} | set(known) | arrays
        for key, value in self.data.items():
            if key in arrays:
                continue  # checked entry by entry (entries, entry_values)
            if isinstance(value, dict) and key in known:
                for sub in value:
                    if sub not in known[key]:
                        raise self.error(key, sub, "unknown setting")
            elif isinstance(value, dict):
                raise ConfigError(self.path, self.line_of(key, None), f"[{key}]: unknown section")
            elif key not in top:
                raise self.error("", key, "unknown setting")


def _with_tls_context(r: _Reader, settings: TlsSettings) -> TlsSettings:
    """Both of cert_file and key_file or neither; a pair is loaded now, so that a bad one is
    refused at start and on reload rather than at the first STARTTLS."""
    cert_file, key_file = settings.cert_file, settings.key_file
    if (cert_file is None) != (key_file is None):
        raise r.error(
            "tls",
            "cert_file" if cert_file is None else "key_file",
            "is needed too: give both cert_file and key_file, or neither",
        )
    if cert_file is None or key_file is None:
        return settings
    try:
        context = tls.server_context(cert_file, key_file)
    except ssl.SSLError as exc:  # before OSError, of which it is a kind
        raise r.error(
            "tls",
            "cert_file",
            f"{cert_file} and {key_file} are not a PEM certificate and its key: {exc}",
        ) from None
    except OSError as exc:
        # ssl names no file: find the one that cannot be read, and blame its line.
        for key, file in (("cert_file", cert_file), ("key_file", key_file)):
            try:
                file.open("rb").close()
            except OSError as unreadable:
                raise r.error(
                    "tls", key, f"cannot read {file}: {unreadable.strerror or unreadable}"
                ) from None
        raise r.error(
            "tls", "cert_file", f"cannot read {exc.filename or cert_file}: {exc.strerror or exc}"
        ) from None
    return replace(settings, server_context=context)


def _listener_tables(r: _Reader, base: Path) -> tuple[ListenerSettings, ...]:
    """The ``[[listener]]`` tables; a PROXY listener names the proxies it trusts, and only
    a PROXY listener may (fail closed: no list trusts nobody, not everybody)."""
    found = []
    for n, given in enumerate(r.entries("listener"), 1):
        values = r.entry_values("listener", n, given, ListenerSettings, base)
        if "address" not in values:
            raise r.entry_error("listener", n, None, 'needs an address ("ip:port")')
        listener = _build(ListenerSettings, values)
        if listener.proxy_protocol is not None and not listener.proxy_trusted:
            raise r.entry_error(
                "listener",
                n,
                "proxy_trusted" if "proxy_trusted" in given else "proxy_protocol",
                "a PROXY listener needs proxy_trusted, the addresses of the proxies allowed "
                'to connect (e.g. ["10.0.0.0/24"]); anyone else is closed before the banner',
            )
        if listener.proxy_protocol is None:
            for key in ("proxy_trusted", "proxy_timeout"):
                if key in given:
                    raise r.entry_error(
                        "listener", n, key, "is for a PROXY listener: set proxy_protocol too"
                    )
        found.append(listener)
    return tuple(found)


def _check_listeners(
    r: _Reader, listen: tuple[tuple[str, int], ...], tables: tuple[ListenerSettings, ...]
) -> None:
    """At least one listener, and no address twice."""
    if not listen and not tables:
        raise r.error("", "listen", "needs at least one address (or a [[listener]] table)")
    seen = set(listen)
    if len(seen) < len(listen):
        raise r.error("", "listen", "the same address is given twice")
    for n, listener in enumerate(tables, 1):
        if listener.address in seen:
            raise r.entry_error(
                "listener", n, "address", f"{listener.label} is given twice (listen, [[listener]])"
            )
        seen.add(listener.address)


def _check_log(r: _Reader, log: LogSettings) -> None:
    """The settings of ``[log]`` that only make sense together."""
    if log.target == "file" and log.file is None:
        raise r.error("log", "target", 'is "file": give the file too (file = "/path/maillog")')
    if log.file is not None and log.target in ("stderr", "syslog"):
        raise r.error("log", "file", f'is for target = "file", but target is "{log.target}"')
    if log.json_file is not None and not log.json:
        raise r.error("log", "json_file", "is set, but json is not true")


@dataclass(frozen=True)
class Override:
    """A setting given on the command line (``sendmail -O``, ``-q30m``), over the file's."""

    section: str  # "" for the top level
    key: str
    value: TomlValue  # as TOML would give it, for the setting's own converter
    origin: str  # as the admin wrote it, for errors: "-O MaxMessageSize=10M"


_command_line: tuple[Override, ...] = ()
_command_line_cwd = Path("/")  # where a relative path on the command line is from


def set_command_line(overrides: Sequence[Override]) -> None:
    """Settings given on the command line: every config read in this process from now on
    (the first, each reload, and so in every worker) takes them over the file's, as
    Sendmail's command-line options stand over sendmail.cf for the daemon's whole life.
    A bad value is a ConfigError naming ``origin`` when the config is read."""
    global _command_line, _command_line_cwd
    known = {(k.section, k.name) for k in keys()}
    for o in overrides:
        if (o.section, o.key) not in known:
            raise ValueError(f"{o.origin}: no setting [{o.section}] {o.key}")
    _command_line = tuple(overrides)
    # Now: `serve --daemon` moves to / before its reloads read the config again.
    _command_line_cwd = Path.cwd()


def _apply_command_line(top: dict[str, object]) -> list[Origin]:
    sections = dict(_sections())
    origins = []
    for o in _command_line:
        cls = sections[o.section] if o.section else Config
        spec = next(s for f, s in _settings_of(cls) if f.name == o.key)
        label = f"[{o.section}] {o.key}" if o.section else o.key
        try:
            value = spec.convert(o.value)
        except (ValueError, TypeError) as exc:
            raise ConfigError(o.origin, None, f"{label}: {exc}") from None
        if spec.relative and isinstance(value, Path) and not value.is_absolute():
            value = _joined(_command_line_cwd, value)  # relative to where it was run
        if o.section:
            top[o.section] = replace(cast(Any, top[o.section]), **{o.key: value})
        else:
            top[o.key] = value
        origins.append(Origin(label, _shown(o.value), o.origin))
    return origins


def _toml(text: str, source: str) -> _Reader:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        line = int(m.group(1)) if m else None
        if line is None and "end of document" in str(exc):
            # An unfinished value (``listen = [``): the last line is where it was left.
            line = len(text.rstrip("\n").split("\n"))
        raise ConfigError(source, line, f"TOML syntax: {exc}") from None
    r = _Reader(source, text, data)
    r.check_unknown()
    return r


class _EnvVariable:
    """A setting given as ``MAILGATE__KEY`` or ``MAILGATE__SECTION__KEY``: its errors name
    the variable (there is no line)."""

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def where(self) -> str:
        return f"environment variable {self.name}"

    def error(self, section: str, key: str | None, message: str) -> ConfigError:
        label = f"{section}.{key}" if section and key else (key or section)
        return ConfigError(self.where, None, f"{label}: {message}")


ENV_PREFIX = "MAILGATE__"


def env_name(section: str, key: str) -> str:
    """The variable that sets ``[section] key``: ``MAILGATE__SMTP__GREET_PAUSE``."""
    return ENV_PREFIX + (f"{section}__{key}" if section else key).upper()


def _env_value(text: str) -> TomlValue:
    """A TOML value (``4``, ``true``, ``["10.0.0.5:25"]``, ``"x"``), or else the text itself
    as a string: ``MAILGATE__HOSTNAME=mx1.example.com`` needs no quotes."""
    try:
        parsed = tomllib.loads(f"value = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return cast(TomlValue, parsed["value"]) if parsed.keys() == {"value"} else text


def _environment(environ: Mapping[str, str]) -> list[tuple[str, str, TomlValue, _EnvVariable]]:
    """The settings the environment gives: (section, key, value, variable). Every
    ``MAILGATE__`` variable must name a setting: a misspelt one is an error, not ignored."""
    known = {env_name(k.section, k.name): k for k in keys() if not k.array}
    arrays = {name.upper() for name, _ in _table_arrays()}
    found = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        var = _EnvVariable(name)
        key = known.get(name)
        rest = name[len(ENV_PREFIX) :]
        if key is None or key.name == "include":
            if (table := rest.split("__")[0]) in arrays:
                why = (
                    f"[[{table.lower()}]] tables cannot be given in the environment: put them "
                    "in a node file"
                )
            elif key is not None:
                why = "include is read from the main file only"
            else:
                why = "no such setting (MAILGATE__KEY or MAILGATE__SECTION__KEY, e.g. "
                why += "MAILGATE__HOSTNAME, MAILGATE__SMTP__GREET_PAUSE)"
            raise ConfigError(var.where, None, why)
        found.append((key.section, key.name, _env_value(environ[name]), var))
    return found


def _layers(
    main: _Reader, base: Path, environ: Mapping[str, str]
) -> tuple[_Reader, list[Origin], list[str]]:
    """The main file with its ``include`` files and the environment laid over it, key by key:
    a reader of the merged data whose errors name each value's own source; what did not come
    from the main file; and the texts read, for the digest."""
    merged: dict[str, Any] = {
        k: dict(v) if isinstance(v, dict) else v for k, v in main.data.items()
    }
    r = _Reader(main.path, "\n".join(main.lines), merged)
    origins: list[Origin] = []
    texts: list[str] = []
    sections = dict(_sections())
    includes = r.values("", Config, base).get("include", ())
    for name in cast(tuple[Path, ...], includes):
        path = name if name.is_absolute() else base / name
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise r.error("", "include", f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise r.error("", "include", f"{path}: cannot read: {exc}") from None
        texts += [str(path), text]
        node = _toml(text, str(path))
        if "include" in node.data:
            raise node.error("", "include", "only the main file includes others")
        for key, value in node.data.items():
            if key in sections and isinstance(value, dict):
                into = merged.get(key)
                if not isinstance(into, dict):
                    into = merged[key] = {}
                for sub, item in value.items():
                    into[sub] = item
                    r.owners[(key, sub)] = node
                    at = where(str(path), node.line_of(key, sub))
                    origins.append(Origin(f"[{key}] {sub}", _shown(item), at))
            else:
                merged[key] = value
                r.owners[("", key)] = node
                line = node.line_of("", key) if key not in sections else node.line_of(key, None)
                label = f"[[{key}]]" if key in dict(_table_arrays()) else key
                origins.append(Origin(label, _shown(value), where(str(path), line)))
    for section, key, value, var in _environment(environ):
        texts += [var.name, repr(value)]
        if section:
            into = merged.get(section)
            if not isinstance(into, dict):
                into = merged[section] = {}
            into[key] = value
        else:
            merged[key] = value
        r.owners[(section, key)] = var
        origins.append(Origin(f"[{section}] {key}" if section else key, _shown(value), var.where))
    return r, origins, texts


def _shown(value: object) -> str:
    """A value as ``mailgate check`` shows it: as TOML would write it."""
    if isinstance(value, bool | int | float | str) or (
        isinstance(value, list) and all(isinstance(v, bool | int | float | str) for v in value)
    ):
        return toml_literal(cast(TomlValue, value))
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return f"{len(value)} table{'s' if len(value) != 1 else ''}"
    return "(a table)"


def read_token_file(path: Path) -> str:
    """The token in ``path`` (``[metrics] token_file``, ``--token-file``): one word of at
    least 16 printable characters, in a file not readable by every user. ValueError says
    what is wrong."""
    try:
        with path.open("rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read(4096)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    if mode & 0o004:
        raise ValueError(f"{path} is readable by every user: chmod o-r it")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        token = ""
    if len(token) < 16 or any(c.isspace() or not c.isprintable() for c in token):
        raise ValueError(
            f"{path} must hold one token of at least 16 printable characters (no blanks), "
            "e.g. from `openssl rand -hex 32`"
        )
    return token


def _with_token(r: _Reader, settings: MetricsSettings) -> MetricsSettings:
    """``[metrics] token_file`` read now: a missing, short or world-readable token is a
    config error at start and on reload, not a 401 for everyone later."""
    if settings.token_file is None:
        return settings
    try:
        token = read_token_file(settings.token_file)
    except ValueError as exc:
        raise r.error("metrics", "token_file", str(exc)) from None
    return replace(settings, token=token)


def parse_config(
    text: str, path: Path | None, base: Path, environ: Mapping[str, str] | None = None
) -> Config:
    """Parse TOML ``text``, then its ``include`` files and the ``MAILGATE__`` variables of
    ``environ`` (none unless given: `load_config` gives the process's); relative paths
    resolve against ``base``, whichever of them gives the path."""
    source = str(path) if path else "<embedded default config>"
    r, origins, texts = _layers(_toml(text, source), base, environ or {})
    data = r.data
    top = r.values("", Config, base)
    given = cast(tuple[Path, ...], top.get("include", ()))
    top["include"] = tuple(p if p.is_absolute() else base / p for p in given)
    top["listener"] = _listener_tables(r, base)
    if "listen" not in data and top["listener"]:
        top["listen"] = ()  # the [[listener]] tables replace the default address
    if "tables_dir" not in data:  # the TOML file's folder; the embedded config has no tables
        top["tables_dir"] = base if path else None
    if "pid_file" not in data:
        top["pid_file"] = cast(Path, top["spool_dir"]) / "mailgate.pid"
    for name, cls in _sections():
        top[name] = _build(cls, r.values(name, cls, base))
    origins += _apply_command_line(top)
    top["tls"] = _with_tls_context(r, cast(TlsSettings, top["tls"]))
    top["metrics"] = _with_token(r, cast(MetricsSettings, top["metrics"]))
    _check_log(r, cast(LogSettings, top["log"]))
    top["milter"] = _milter_tables(r, base)
    digest = hashlib.sha256()
    for part in [source, text, *texts, *(f"{o.origin}={o.value!r}" for o in _command_line)]:
        digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    top["origins"] = tuple(origins)
    top["digest"] = digest.hexdigest()
    config = _build(Config, {"path": path, **top})
    _check_listeners(r, config.listen, config.listener)
    _check_milters(r, config)
    return config


def _milter_tables(r: _Reader, base: Path) -> tuple[MilterSettings, ...]:
    """The ``[[milter]]`` tables, in order: each with its name and socket (a relative socket
    path from the TOML file's folder), no name twice."""
    found: list[MilterSettings] = []
    for n, given in enumerate(r.entries("milter"), 1):
        values = r.entry_values("milter", n, given, MilterSettings, base)
        for key in ("name", "socket"):
            if key not in values:
                raise r.entry_error("milter", n, None, f"needs a {key}")
        milter = _build(MilterSettings, values)
        if any(m.name == milter.name for m in found):
            raise r.entry_error(
                "milter", n, "name", f"{milter.name!r} is the name of an earlier [[milter]] too"
            )
        sock = milter.socket
        if sock.kind == "unix" and not Path(sock.path).is_absolute():
            milter = replace(milter, socket=replace(sock, path=str(base / sock.path)))
        found.append(milter)
    return tuple(found)


def _check_milters(r: _Reader, config: Config) -> None:
    """A filter's ``listen`` names listeners the daemon has; ``[submission] milters``
    names filters there are."""
    names = {m.name for m in config.milter}
    for name in config.submission.milters:
        if name not in names:
            raise r.error("submission", "milters", f"{name!r} is not the name of a [[milter]]")
    addresses = {listener.address for listener in config.listeners}
    for n, milter in enumerate(config.milter, 1):
        for host, port in milter.listen or ():
            if (host, port) not in addresses:
                raise r.entry_error(
                    "milter", n, "listen", f"{host}:{port} is not one of the listeners"
                )


def _build(cls: Callable[..., T], values: Mapping[str, object]) -> T:
    return cls(**values)


def default_config_text() -> str:
    return resources.files("mailgate").joinpath("default.toml").read_text(encoding="utf-8")


def load_config(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Load ``path``, or the embedded default config (paths relative to the working dir),
    with its ``include`` files and the ``MAILGATE__`` variables of ``environ`` (default: this
    process's environment)."""
    env = os.environ if environ is None else environ
    if path is None:
        return parse_config(default_config_text(), None, Path.cwd(), env)
    p = Path(path).expanduser().absolute()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(p), None, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(p), None, f"cannot read: {exc}") from None
    return parse_config(text, p, p.parent, env)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mailgate.config --markdown``: README's configuration table, regenerated."""
    parser = argparse.ArgumentParser(
        prog="python -m mailgate.config", description="The settings mailgate.toml may hold."
    )
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="print README's configuration table from the definition",
    )
    args = parser.parse_args(argv)
    if not args.markdown:
        parser.print_help()
        return 2
    print("\n".join(markdown_rows()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
