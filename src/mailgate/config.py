"""Settings: one TOML file → frozen dataclasses, every error naming file and line.

The Sendmail tables are not settings; they live beside the TOML file under their Sendmail names and
are loaded by `mailgate.tables`. Relative paths in the TOML file are relative to its folder; the
embedded default config (no file) resolves them against the working directory.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mailgate import tls


class ConfigError(Exception):
    """A bad setting; ``str()`` is ``path:line: message`` like a compiler error."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.line = line
        self.message = message

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class SmtpSettings:
    greet_pause: float = 5.0
    max_message_size: int = 50 * 1024 * 1024  # 0 = no limit
    max_recipients: int = 100
    max_command_line: int = 512
    # Longest text line accepted in DATA, CRLF included; 0 = no limit (the default, as
    # Postfix's smtpd and Sendmail: long lines are folded on the way out instead).
    max_text_line: int = 0
    command_timeout: float = 300.0  # RFC 5321 4.5.3.2.7: at least 5 minutes
    data_timeout: float = 180.0  # RFC 5321 4.5.3.2.6 data block, per read
    max_bad_commands: int = 20
    privacy: tuple[str, ...] = ("authwarnings", "novrfy", "noexpn", "noverb")
    bad_rcpt_throttle: int = 1
    bad_rcpt_throttle_delay: float = 1.0
    max_bad_rcpts: int = 20
    connection_rate_throttle: int = 100
    max_connections_per_ip: int = 20
    max_connections: int = 20000
    # Postfix's stress mode: past this share of max_connections, shorter timeouts.
    stress_threshold: float = 0.8
    stress_timeout: float = 10.0
    # Postfix 3.9's smtpd_forbid_unauth_pipelining: content sent before our 354 closes.
    forbid_unauth_pipelining: bool = True
    check_sender_domain: bool = True
    require_qualified_sender: bool = True


@dataclass(frozen=True)
class QueueSettings:
    run_interval: float = 1800.0
    retry_min: float = 240.0
    max_age: float = 5 * 86400.0
    warn_after: float = 4 * 3600.0
    max_deliveries: int = 200
    max_per_destination: int = 20
    fsync: str = "auto"  # how the spool flushes: "auto" (Linux AIO if the kernel has it), "threads"
    # Sendmail's MinFreeBlocks / Postfix's queue_minfree: below this much free space in the
    # spool's file system, MAIL and DATA get 452 4.3.1 (0 = no check). The reserve is what
    # messages already in DATA, status files and bounces (up to a whole message) still need.
    min_free: int = 100 * 1024 * 1024


@dataclass(frozen=True)
class DeliverySettings:
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    helo_name: str | None = None
    bind_address: str | None = None
    port: int = 25  # for hops without a port of their own (MX and plain hosts)
    # Longer lines are broken with CRLF SPACE before they go out (Postfix's
    # smtp_line_length_limit); 998 is RFC 5321 4.5.3.1.6's limit without the CRLF. 0 = never.
    line_length_limit: int = 998


@dataclass(frozen=True)
class DnsSettings:
    nameservers: tuple[str, ...] | None = None  # None = system resolver
    timeout: float = 5.0


@dataclass(frozen=True)
class LocalSettings:
    maildir_root: Path = Path("maildir")


@dataclass(frozen=True)
class AccessSettings:
    blocklist_recipients: bool = False


@dataclass(frozen=True)
class TlsSettings:
    cert_file: Path | None = None  # PEM certificate chain; with key_file, STARTTLS is offered
    key_file: Path | None = None
    delivery: str = "may"  # STARTTLS to next hops that offer it ("may"), or never ("none")
    # Built (and so checked) when the config is read: a bad pair is a config error.
    server_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class LogSettings:
    file: Path | None = None  # None = stderr
    level: str = "info"


@dataclass(frozen=True)
class Config:
    path: Path | None
    hostname: str
    listen: tuple[tuple[str, int], ...]
    spool_dir: Path
    tables_dir: Path | None
    relay_hosts_only: bool = True
    pid_file: Path | None = None
    workers: int = 1  # processes sharing the listeners and the spool; 0 = one per CPU
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    dns: DnsSettings = field(default_factory=DnsSettings)
    local: LocalSettings = field(default_factory=LocalSettings)
    access: AccessSettings = field(default_factory=AccessSettings)
    log: LogSettings = field(default_factory=LogSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)

    @property
    def source(self) -> str:
        return str(self.path) if self.path else "<embedded default config>"

    @property
    def helo_name(self) -> str:
        return self.delivery.helo_name or self.hostname


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SIZE = re.compile(r"(\d+)\s*(k|kb|kib|m|mb|mib|g|gb|gib)?", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2,
    "mib": 1024**2, "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
}


def parse_duration(value: object) -> float:
    """``"30m"``, ``"1h30m"``, ``"5s"``, ``"250ms"`` or a number of seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as \"30m\" or \"5s\"")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a duration such as \"30m\" or \"5s\"")
    text = value.strip().lower()
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"bad duration {value!r}: use e.g. \"30m\", \"5s\", \"1h30m\"")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2) and m.group(2).lower()]
        pos = m.end()
        while pos < len(text) and text[pos] == " ":
            pos += 1
    return total


def parse_size(value: object) -> int:
    """``"50M"``, ``"100MiB"``, ``"10MB"`` or a number of bytes → bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as \"50M\"")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.fullmatch(value.strip())
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2) and m.group(2).lower()]
    raise ValueError(f"bad size {value!r}: use e.g. \"50M\", \"100MiB\" or a number of bytes")


def parse_listen(value: str) -> tuple[str, int]:
    """``"127.0.0.1:25"``, ``"[::1]:25"``, ``":25"`` (all IPv4 addresses) → (host, port)."""
    if not isinstance(value, str):
        raise ValueError("listen entries are strings like \"127.0.0.1:2525\"")
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad listen address {value!r}: use \"ip:port\" or \"[ipv6]:port\"")
    host = host or "0.0.0.0"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"bad listen address {value!r}: {host!r} is not an IP address") from None
    return host, int(port)


def _check_nameserver(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("nameservers are strings like \"127.0.0.1\" or \"127.0.0.1:5353\"")
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


class _Reader:
    """Pulls typed values out of the parsed TOML, turning mistakes into ConfigErrors with lines."""

    def __init__(self, path: str, text: str, data: dict[str, Any]) -> None:
        self.path = path
        self.lines = text.splitlines()
        self.data = data
        self.used: set[tuple[str, ...]] = set()

    def line_of(self, section: str, key: str | None) -> int | None:
        """Best-effort line number of ``key`` in ``[section]`` (tomllib gives no positions)."""
        current = ""
        header = re.compile(r"\s*\[\s*([A-Za-z0-9_.\-\" ]+?)\s*\]\s*(#.*)?$")
        for no, line in enumerate(self.lines, 1):
            m = header.match(line)
            if m:
                current = m.group(1).replace('"', "")
                if key is None and current == section:
                    return no
                continue
            if key is not None and current == section and re.match(
                rf"\s*\"?{re.escape(key)}\"?\s*=", line
            ):
                return no
        return None

    def error(self, section: str, key: str | None, message: str) -> ConfigError:
        name = f"{section}.{key}" if section and key else (key or section)
        return ConfigError(self.path, self.line_of(section, key), f"{name}: {message}")

    def table(self, section: str) -> dict[str, Any]:
        value = self.data.get(section, {}) if section else self.data
        if not isinstance(value, dict):
            raise self.error("", section, "must be a table ([section])")
        return value

    def get(self, section: str, key: str, convert: Any, default: Any) -> Any:
        self.used.add((section, key))
        tbl = self.table(section)
        if key not in tbl:
            return default
        try:
            return convert(tbl[key])
        except (ValueError, TypeError) as exc:
            raise self.error(section, key, str(exc)) from None

    def check_unknown(self, known: dict[str, set[str]]) -> None:
        for key, value in self.data.items():
            if isinstance(value, dict) and key in known:
                for sub in value:
                    if sub not in known[key]:
                        raise self.error(key, sub, "unknown setting")
            elif isinstance(value, dict):
                raise ConfigError(self.path, self.line_of(key, None),
                                  f"[{key}]: unknown section")
            elif key not in known[""]:
                raise self.error("", key, "unknown setting")


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _int(minimum: int = 0) -> Any:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected a whole number")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}")
        return value
    return convert


def _zero_or_between(low: int, high: int | None, zero: str) -> Any:
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


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be more than 0 seconds")
    return seconds


def _str(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


def _hostname(value: object) -> str:
    text = _str(value).rstrip(".").lower()
    if not re.fullmatch(r"[a-z0-9]([a-z0-9\-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9\-]*[a-z0-9])?)*", text):
        raise ValueError(f"{value!r} is not a valid host name")
    return text


def _str_list(item: Any) -> Any:
    def convert(value: object) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise ValueError("expected a list, e.g. [\"a\", \"b\"]")
        return tuple(item(v) for v in value)
    return convert


_PRIVACY_FLAGS = {
    "authwarnings", "novrfy", "noexpn", "noverb", "goaway", "public", "needmailhelo",
    "needexpnhelo", "needvrfyhelo", "noetrn", "noreceipts", "nobodyreturn", "restrictqrun",
    "restrictmailq", "restrictexpand", "noactualrecipient",
}


def _fsync_mode(value: object) -> str:
    mode = _str(value).lower()
    if mode not in ("auto", "threads"):
        raise ValueError(f'must be "auto" or "threads", not {value!r}')
    return mode


def _tls_delivery(value: object) -> str:
    mode = _str(value).lower()
    if mode not in ("may", "none"):
        raise ValueError(f'must be "may" or "none", not {value!r}')
    return mode


def _privacy_flag(value: object) -> str:
    flag = _str(value).lower()
    if flag not in _PRIVACY_FLAGS:
        raise ValueError(f"unknown privacy flag {value!r}")
    return flag


_KNOWN = {
    "": {"hostname", "listen", "spool_dir", "tables_dir", "relay_hosts_only", "pid_file", "workers",
         "smtp", "queue", "delivery", "dns", "local", "access", "log", "tls"},
    "smtp": set(SmtpSettings.__dataclass_fields__),
    "queue": set(QueueSettings.__dataclass_fields__),
    "delivery": set(DeliverySettings.__dataclass_fields__),
    "dns": set(DnsSettings.__dataclass_fields__),
    "local": set(LocalSettings.__dataclass_fields__),
    "access": set(AccessSettings.__dataclass_fields__),
    "log": set(LogSettings.__dataclass_fields__),
    "tls": set(TlsSettings.__dataclass_fields__) - {"server_context"},
}


def default_hostname() -> str:
    name = socket.getfqdn() or socket.gethostname() or "localhost"
    try:
        return _hostname(name)
    except ValueError:
        return "localhost"


def parse_config(text: str, path: Path | None, base: Path) -> Config:
    """Parse TOML ``text``; relative paths resolve against ``base``."""
    source = str(path) if path else "<embedded default config>"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(source, int(m.group(1)) if m else None, f"TOML syntax: {exc}") from None
    r = _Reader(source, text, data)
    r.check_unknown(_KNOWN)

    def rel(value: object) -> Path:
        p = Path(_str(value)).expanduser()
        return p if p.is_absolute() else base / p

    def rel_or_none(value: object) -> Path | None:
        return None if value == "" else rel(value)

    listen = r.get("", "listen", _str_list(parse_listen), (("127.0.0.1", 2525),))
    if not listen:
        raise r.error("", "listen", "needs at least one address")
    smtp_defaults = SmtpSettings()
    smtp = SmtpSettings(
        greet_pause=r.get("smtp", "greet_pause", parse_duration, smtp_defaults.greet_pause),
        max_message_size=r.get("smtp", "max_message_size", parse_size,
                               smtp_defaults.max_message_size),
        max_recipients=r.get("smtp", "max_recipients", _int(1), smtp_defaults.max_recipients),
        max_command_line=r.get("smtp", "max_command_line", _int(512),
                               smtp_defaults.max_command_line),
        # RFC 5321 4.5.3.1.6: a server must take lines of 1000 bytes, so no lower limit.
        max_text_line=r.get("smtp", "max_text_line", _zero_or_between(1000, None, "no limit"),
                            smtp_defaults.max_text_line),
        command_timeout=r.get("smtp", "command_timeout", parse_duration,
                              smtp_defaults.command_timeout),
        data_timeout=r.get("smtp", "data_timeout", parse_duration, smtp_defaults.data_timeout),
        max_bad_commands=r.get("smtp", "max_bad_commands", _int(1),
                               smtp_defaults.max_bad_commands),
        privacy=r.get("smtp", "privacy", _str_list(_privacy_flag), smtp_defaults.privacy),
        bad_rcpt_throttle=r.get("smtp", "bad_rcpt_throttle", _int(0),
                                smtp_defaults.bad_rcpt_throttle),
        bad_rcpt_throttle_delay=r.get("smtp", "bad_rcpt_throttle_delay", parse_duration,
                                      smtp_defaults.bad_rcpt_throttle_delay),
        max_bad_rcpts=r.get("smtp", "max_bad_rcpts", _int(0), smtp_defaults.max_bad_rcpts),
        connection_rate_throttle=r.get("smtp", "connection_rate_throttle", _int(0),
                                       smtp_defaults.connection_rate_throttle),
        max_connections_per_ip=r.get("smtp", "max_connections_per_ip", _int(0),
                                     smtp_defaults.max_connections_per_ip),
        max_connections=r.get("smtp", "max_connections", _int(1), smtp_defaults.max_connections),
        stress_threshold=r.get("smtp", "stress_threshold", _share,
                               smtp_defaults.stress_threshold),
        stress_timeout=r.get("smtp", "stress_timeout", _positive_duration,
                             smtp_defaults.stress_timeout),
        forbid_unauth_pipelining=r.get("smtp", "forbid_unauth_pipelining", _bool,
                                       smtp_defaults.forbid_unauth_pipelining),
        check_sender_domain=r.get("smtp", "check_sender_domain", _bool,
                                  smtp_defaults.check_sender_domain),
        require_qualified_sender=r.get("smtp", "require_qualified_sender", _bool,
                                       smtp_defaults.require_qualified_sender),
    )
    qd = QueueSettings()
    queue = QueueSettings(
        run_interval=r.get("queue", "run_interval", parse_duration, qd.run_interval),
        retry_min=r.get("queue", "retry_min", parse_duration, qd.retry_min),
        max_age=r.get("queue", "max_age", parse_duration, qd.max_age),
        warn_after=r.get("queue", "warn_after", parse_duration, qd.warn_after),
        max_deliveries=r.get("queue", "max_deliveries", _int(1), qd.max_deliveries),
        max_per_destination=r.get("queue", "max_per_destination", _int(1),
                                  qd.max_per_destination),
        fsync=r.get("queue", "fsync", _fsync_mode, qd.fsync),
        min_free=r.get("queue", "min_free", parse_size, qd.min_free),
    )
    if queue.run_interval <= 0:
        raise r.error("queue", "run_interval", "must be longer than 0s")
    dd = DeliverySettings()
    delivery = DeliverySettings(
        connect_timeout=r.get("delivery", "connect_timeout", parse_duration, dd.connect_timeout),
        command_timeout=r.get("delivery", "command_timeout", parse_duration, dd.command_timeout),
        helo_name=r.get("delivery", "helo_name", _hostname, None),
        bind_address=r.get("delivery", "bind_address", _str, None),
        port=r.get("delivery", "port", _int(1), 25),
        # Below 78 (RFC 5322's recommended length) folding would cut up ordinary mail; above
        # 998 the lines sent would break RFC 5321 4.5.3.1.6.
        line_length_limit=r.get("delivery", "line_length_limit",
                                _zero_or_between(78, 998, "lines are never broken"),
                                dd.line_length_limit),
    )
    dns = DnsSettings(
        nameservers=r.get("dns", "nameservers", _str_list(_check_nameserver), None) or None,
        timeout=r.get("dns", "timeout", parse_duration, 5.0),
    )
    cert_file = r.get("tls", "cert_file", rel_or_none, None)
    key_file = r.get("tls", "key_file", rel_or_none, None)
    if (cert_file is None) != (key_file is None):
        raise r.error("tls", "cert_file" if cert_file is None else "key_file",
                      "is needed too: give both cert_file and key_file, or neither")
    context = None
    if cert_file is not None and key_file is not None:
        try:
            context = tls.server_context(cert_file, key_file)
        except ssl.SSLError as exc:  # before OSError, of which it is a kind
            raise r.error("tls", "cert_file", f"{cert_file} and {key_file} are not a PEM "
                                              f"certificate and its key: {exc}") from None
        except OSError as exc:
            raise r.error("tls", "cert_file", f"cannot read {exc.filename or cert_file}: "
                                              f"{exc.strerror or exc}") from None
    tls_settings = TlsSettings(cert_file=cert_file, key_file=key_file,
                               delivery=r.get("tls", "delivery", _tls_delivery, "may"),
                               server_context=context)
    config = Config(
        path=path,
        hostname=r.get("", "hostname", _hostname, None) or default_hostname(),
        listen=listen,
        spool_dir=r.get("", "spool_dir", rel, base / "spool"),
        tables_dir=r.get("", "tables_dir", rel_or_none, base if path else None),
        relay_hosts_only=r.get("", "relay_hosts_only", _bool, True),
        pid_file=r.get("", "pid_file", rel_or_none, None),
        workers=r.get("", "workers", _int(0), 1),
        smtp=smtp,
        queue=queue,
        delivery=delivery,
        dns=dns,
        local=LocalSettings(maildir_root=r.get("local", "maildir_root", rel, base / "maildir")),
        access=AccessSettings(
            blocklist_recipients=r.get("access", "blocklist_recipients", _bool, False)),
        log=LogSettings(
            file=r.get("log", "file", rel_or_none, None),
            level=r.get("log", "level", _str, "info"),
        ),
        tls=tls_settings,
    )
    return config


def default_config_text() -> str:
    return resources.files("mailgate").joinpath("default.toml").read_text(encoding="utf-8")


def load_config(path: str | Path | None) -> Config:
    """Load ``path``, or the embedded default config (paths relative to the working dir)."""
    if path is None:
        return parse_config(default_config_text(), None, Path.cwd())
    p = Path(path).expanduser().absolute()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(p), None, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(p), None, f"cannot read: {exc}") from None
    return parse_config(text, p, p.parent)
