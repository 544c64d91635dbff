"""``sendmail.mc`` → mailgate settings: each construct of the file, what it becomes, and why.

`convert` is a pure function of the mc text, the tables of the mail dir (loaded by the caller,
or the error loading them gave) and the options. Its `Conversion` holds, for every construct of
the file, a one-line account (``Construct``); the settings of ``mailgate.toml`` with the mc
lines that decide them (``Assignment``, named by the config field it sets, so the result loads
with mailgate's own reader); a ``[[milter]]`` table per mail filter;
and the findings: a warning for each line that cannot be mapped, a refusal for each unsafe
feature, and the table warnings of ``mailgate check`` (`tables.lint`), reused as they are.

Settings the mc does not write follow Sendmail's default where it decides behaviour
(greet pause, throttles, privacy flags, relay_hosts_only) and mailgate's where it is a
protection Sendmail lacked (message size, recipients, timeouts); those are listed in
``Conversion.kept``, so the admin sees both values.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from mailgate.config import Key, TomlValue, keys, parse_milter_socket, parse_size, toml_literal
from mailgate.errors import where
from mailgate.migrate import m4, meanings
from mailgate.migrate.sendmail_names import CONF_NAMES, FEATURES, MAILERS, OPTIONS
from mailgate.smtp.headers import MAX_HEADER_BYTES, MAX_HOPS
from mailgate.tables import Tables
from mailgate.tables.lint import lint
from mailgate.tables.mailertable import parse_mailer_value
from mailgate.tables.maps import TableError

__all__ = ["Assignment", "Block", "Construct", "Conversion", "Finding", "convert"]

Kind = Literal["warning", "refused", "error"]

# Where mailgate keeps what is its own (not in any mc): the queue (and in it, by default, the
# pid file), the Maildirs of local users.
SPOOL_DIR = "/var/spool/mailgate"
MAILDIR_ROOT = "/var/mail/maildirs"


@dataclass(frozen=True)
class Finding:
    """A line that cannot be mapped (``warning``), an unsafe feature left off (``refused``),
    or a table mailgate cannot load (``error``); ``str()`` is ``path:line: message``."""

    path: str
    line: int | None
    message: str
    kind: Kind = "warning"

    def __str__(self) -> str:
        return f"{where(self.path, self.line)}: {self.message}"


@dataclass(frozen=True)
class Assignment:
    """One key of mailgate.toml: ``lines`` are the mc lines that decide it (none: a default)."""

    section: str  # "" = top level
    key: str
    value: TomlValue
    lines: tuple[int, ...]
    why: str

    @property
    def label(self) -> str:
        return f"[{self.section}] {self.key}" if self.section else self.key


@dataclass(frozen=True)
class Construct:
    """One macro call (or run of text) of the mc, from ``line`` to ``end_line``."""

    line: int
    end_line: int
    summary: str  # what it is in mailgate, or why there is nothing to set
    sets: tuple[str, ...]  # labels of the settings it decides


@dataclass(frozen=True)
class Block:
    """A TOML table of its own after the settings (a ``[[milter]]``): ``live`` ones as they
    are, the others (what mailgate cannot use) commented out."""

    line: int
    title: str
    body: tuple[str, ...]
    live: bool = False


@dataclass(frozen=True)
class Conversion:
    mc_path: str
    mc_lines: tuple[str, ...]
    constructs: tuple[Construct, ...]
    assignments: tuple[Assignment, ...]
    blocks: tuple[Block, ...]
    kept: tuple[str, ...]  # mailgate protections kept where Sendmail had none
    findings: tuple[Finding, ...]

    @property
    def failed(self) -> bool:
        """Something was refused or a table cannot be loaded: the import needs the admin."""
        return any(f.kind != "warning" for f in self.findings)

    def source(self, line: int, end_line: int) -> list[str]:
        return list(self.mc_lines[line - 1 : end_line])


# --- values: Sendmail's spelling → mailgate's ----------------------------------------------

_SM_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_TEXT = (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def sendmail_seconds(text: str, unit: str = "m") -> float:
    """Sendmail's convtime: ``1h30m``, ``5d``; a bare number is in ``unit`` (minutes for the
    Timeout options)."""
    text = text.strip().lower()
    if not text:
        raise ValueError("empty duration")
    total = 0.0
    for number, suffix in re.findall(r"(\d+)([a-z]?)", text):
        if suffix and suffix not in _SM_UNITS:
            raise ValueError(f"unknown time unit {suffix!r} in {text!r}")
        total += int(number) * _SM_UNITS[suffix or unit]
    if not re.fullmatch(r"(\d+[a-z]?)+", text):
        raise ValueError(f"{text!r} is not a Sendmail duration (e.g. 5m, 1h30m)")
    return total


def duration_text(seconds: float) -> str:
    """Seconds as mailgate writes a duration: ``"5s"``, ``"1h"``, ``"1500ms"``."""
    ms = round(seconds * 1000)
    if ms % 1000:
        return f"{ms}ms"
    whole = ms // 1000
    if whole == 0:
        return "0s"
    for unit, size in _DURATION_TEXT:
        if whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"  # unreachable: every whole number of seconds divides by 1


def _whole(text: str) -> int:
    if not re.fullmatch(r"\d+", text.strip()):
        raise ValueError(f"{text.strip()!r} is not a whole number")
    return int(text)


# Sendmail's milter timeouts (T=C:5m;S:10s;R:10s;E:5m when not given) and their settings.
_MILTER_TIMEOUTS_SENDMAIL = {"C": "5m", "S": "10s", "R": "10s", "E": "5m"}
_MILTER_TIMEOUT_KEYS = {
    "C": "connect_timeout",
    "S": "send_timeout",
    "R": "read_timeout",
    "E": "eom_timeout",
}
_MILTER_MACROS = {
    "connect_macros": "confMILTER_MACROS_CONNECT",
    "helo_macros": "confMILTER_MACROS_HELO",
    "mail_macros": "confMILTER_MACROS_ENVFROM",
    "rcpt_macros": "confMILTER_MACROS_ENVRCPT",
    "data_macros": "confMILTER_MACROS_DATA",
    "eoh_macros": "confMILTER_MACROS_EOH",
    "eom_macros": "confMILTER_MACROS_EOM",
}


def _macro(text: str) -> str:
    """A macro of a confMILTER_MACROS_* list as mailgate writes it: ``j``, ``{client_addr}``
    (the mc quotes them, as in ``` `{client_addr}' ```)."""
    return text.strip().strip("`'\"").strip()


def _spec_fields(spec: str) -> list[tuple[str, str]]:
    """``Port=smtp, Name=MTA`` → [("Port", "smtp"), ("Name", "MTA")]."""
    out = []
    for part in spec.split(","):
        name, eq, value = part.strip().partition("=")
        if name:
            out.append((name.strip(), value.strip() if eq else ""))
    return out


def _keys() -> dict[tuple[str, str], Key]:
    return {(k.section, k.name): k for k in keys()}


# --- the mapper --------------------------------------------------------------------------


@dataclass
class _Item:
    line: int
    end_line: int
    notes: list[str] = field(default_factory=list)
    sets: list[str] = field(default_factory=list)


@dataclass
class _Daemon:
    item: _Item
    spec: str


@dataclass
class _Filter:
    item: _Item
    spec: str


class _Mapper:
    def __init__(
        self,
        path: str,
        mail_dir: Path,
        tables: Tables | None,
        allow_unsafe: bool,
    ) -> None:
        self.path = path
        self.mail_dir = mail_dir
        self.tables = tables
        self.allow_unsafe = allow_unsafe
        self.keys = _keys()
        self.items: list[_Item] = []
        self.findings: list[Finding] = []
        self.values: dict[tuple[str, str], Assignment] = {}
        self.defines: dict[str, tuple[str, _Item]] = {}
        self.macros: dict[str, str] = {}  # the file's own m4 macros
        self.features: dict[str, _Item] = {}
        self.daemons: list[_Daemon] = []
        self.filters: dict[str, _Filter] = {}
        self.blocks: list[Block] = []
        self.raw: tuple[_Item, str] | None = None  # an open LOCAL_CONFIG-like block
        self.discarding = False  # divert(-1): text is thrown away
        self.item = _Item(0, 0)

    # -- recording ----------------------------------------------------------------------

    def note(self, text: str) -> None:
        if text:
            self.item.notes.append(text)

    def warn(self, message: str, kind: Kind = "warning") -> None:
        self.findings.append(Finding(self.path, self.item.line or None, message, kind))

    def set(
        self,
        section: str,
        key: str,
        value: TomlValue,
        why: str,
        items: Sequence[_Item] = (),
    ) -> bool:
        """Record ``[section] key = value``, checked by the setting's own converter: a value
        mailgate would refuse becomes a warning, never a config that does not load."""
        spec = self.keys[(section, key)].setting
        label = f"[{section}] {key}" if section else key
        try:
            spec.convert(value)
        except (ValueError, TypeError) as exc:
            for it in items:
                self.findings.append(
                    Finding(self.path, it.line, f"{label} cannot take this value: {exc}")
                )
            return False
        lines = tuple(sorted({it.line for it in items if it.line}))
        self.values[(section, key)] = Assignment(section, key, value, lines, why)
        for it in items:
            if label not in it.sets:
                it.sets.append(label)
        return True

    def table_path(self, name: str, spec: str, what: str) -> None:
        """A table's map spec (``[type] [-flags] path``): mailgate reads ``name`` in the mail
        dir as text; say so when Sendmail read another file or no file at all."""
        words = spec.split()
        types = [w for w in words if not w.startswith("-") and "/" not in w]
        kind = types[0].lower() if types and len(words) > 1 else ""
        paths = [w for w in words if "/" in w]
        if kind in ("ldap", "nis", "nisplus", "hesiod", "netinfo", "program", "socket"):
            self.warn(
                f"{what} is a {kind} map, not a file: mailgate reads {self.mail_dir / name}"
                f" as text; export the map there (makemap -u prints a hash map)"
            )
            return
        if kind in ("hash", "btree", "dbm", "cdb", "implicit"):
            self.note(f"Sendmail used a {kind} map made from it")
        if not paths:
            return
        sendmail_dir = self.define("MAIL_SETTINGS_DIR", "/etc/mail/").rstrip("/")
        path = paths[-1]
        for base in (sendmail_dir, str(self.mail_dir).rstrip("/")):
            if path.startswith(base + "/"):
                relative = path[len(base) + 1 :]
                break
        else:
            self.warn(
                f"{what}: Sendmail read {path}, mailgate reads {self.mail_dir / name}:"
                f" copy the file there"
            )
            return
        if relative != name:
            self.warn(
                f"{what}: Sendmail read {path}, mailgate reads {self.mail_dir / name}:"
                f" rename the file"
            )

    def define(self, name: str, default: str = "") -> str:
        found = self.defines.get(name)
        return found[0] if found is not None else default

    # -- the walk -----------------------------------------------------------------------

    def run(self, nodes: Sequence[m4.Node]) -> None:
        for node in nodes:
            self.node(node)
        self.close_raw()

    def node(self, node: m4.Node) -> None:
        if isinstance(node, m4.Text):
            self.text(node)
            return
        call = self.expand(node)
        handler = self.HANDLERS.get(call.name)
        if handler is None and self.raw is not None and call.name not in self.macros:
            self.raw[0].end_line = call.end_line  # part of the raw sendmail.cf text
            return
        self.close_raw()
        self.item = _Item(call.line, call.end_line)
        self.items.append(self.item)
        if handler is not None:
            handler(self, call)
        elif call.name in self.macros:
            self.note(f"{call.name}: an m4 macro of this file, expanded where it is used")
        elif not call.parens:
            self.note("text")
        else:
            self.warn(
                f"{call.name}(…) is no macro of Sendmail's cf: m4 copies it into sendmail.cf"
                " as text, and the importer cannot map it"
            )
            self.note("not mapped")

    def expand(self, call: m4.Call) -> m4.Call:
        """The file's own macros (``define(`MYDIR', `/etc/mail')``) replaced in arguments."""
        if not self.macros:
            return call
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, self.macros)) + r")\b")
        args = tuple(pattern.sub(lambda m: self.macros[m.group(1)], a) for a in call.args)
        return m4.Call(call.name, args, call.line, call.end_line, call.parens)

    def text(self, node: m4.Text) -> None:
        if self.raw is not None:
            self.raw[0].end_line = node.end_line
            return
        item = _Item(node.line, node.end_line)
        self.items.append(item)
        self.item = item
        if self.discarding:
            self.note("text after divert(-1): m4 throws it away")
            return
        self.warn(
            "text outside any macro: m4 copies it into sendmail.cf as it is; not mapped"
            " (a missing dnl or quote?)"
        )
        self.note("not mapped")

    def close_raw(self) -> None:
        if self.raw is None:
            return
        item, name = self.raw
        self.raw = None
        span = f"lines {item.line}-{item.end_line}" if item.end_line > item.line else "line"
        self.findings.append(
            Finding(
                self.path,
                item.line,
                f"{name}: raw sendmail.cf rules and classes ({span}) cannot be mapped: check"
                " by hand what they did",
            )
        )

    # -- handlers -----------------------------------------------------------------------

    def m4_control(self, call: m4.Call) -> None:
        if call.name == "divert":
            self.discarding = call.arg(0) == "-1"
        self.note(f"m4 {call.name}: output control, nothing to set")

    def versionid(self, call: m4.Call) -> None:
        self.note("a version string in sendmail.cf comments: nothing to set")

    def include(self, call: m4.Call) -> None:
        path = call.arg(0)
        if path.endswith("m4/cf.m4"):
            self.note("Sendmail's cf macros: nothing to set")
            return
        self.warn(
            f"{call.name}({path}): the included file is not read by the importer; move what"
            " it sets by hand"
        )
        self.note("not mapped")

    def ostype(self, call: m4.Call) -> None:
        self.note(
            f"OSTYPE({call.arg(0)}): paths of Sendmail's own programs on that system;"
            " nothing to set"
        )

    def domain(self, call: m4.Call) -> None:
        name = call.arg(0)
        if name != "generic":
            self.warn(
                f"DOMAIN({name}): domain/{name}.m4 is not read by the importer; move what it"
                " sets by hand"
            )
            self.note("not mapped")
            return
        # cf/domain/generic.m4, as if its lines were here.
        self.note(
            "DOMAIN(generic), read as cf/domain/generic.m4 has it: FEATURE(use_cw_file)"
            " (local-host-names), FEATURE(redirect), EXPOSED_USER(root) (masquerading only)"
        )
        self.store_define("confFORWARD_PATH", "$z/.forward")
        self.store_define("confMAX_HEADERS_LENGTH", "32768")
        self.features.setdefault("redirect", self.item)
        self.features.setdefault("use_cw_file", self.item)

    def feature(self, call: m4.Call) -> None:
        name = call.arg(0)
        self.features[name] = self.item
        if name in meanings.TABLE_FEATURES:
            table = meanings.TABLE_FEATURES[name]
            self.note(f"{table}: mailgate reads {self.mail_dir / table} as text (no makemap)")
            self.table_path(table, call.arg(1), f"FEATURE({name})")
            for flag in call.args[2:]:
                self.access_flag(flag.strip())
        elif name == "use_ct_file":
            self.trusted_users(call.arg(1).strip() or self.define("confCT_FILE"))
        elif name == "relay_hosts_only":
            self.set(
                "",
                "relay_hosts_only",
                True,
                "FEATURE(relay_hosts_only): RELAY entries and relay-domains name exact hosts",
                [self.item],
            )
        elif name in ("blocklist_recipients", "blacklist_recipients"):
            self.set(
                "access",
                "blocklist_recipients",
                True,
                f"FEATURE({name}): access To: REJECT refuses recipients",
                [self.item],
            )
        elif name == "greet_pause":
            self.greet_pause(call)
        elif name in meanings.UNSAFE:
            self.unsafe(name)
        elif name in meanings.OPEN_RELAY:
            self.warn(
                f"FEATURE({name}) is refused: {meanings.OPEN_RELAY[name]}. mailgate has no such"
                " mode, and --allow-unsafe does not change that; let trusted clients relay with"
                " access entries (Connect:192.0.2 RELAY)",
                kind="refused",
            )
            self.note("refused (open relay)")
        elif name in meanings.NOTE_FEATURES:
            self.note(meanings.NOTE_FEATURES[name])
        elif name in meanings.WARN_FEATURES:
            self.warn(f"FEATURE({name}): {meanings.WARN_FEATURES[name]}")
            self.note("no mailgate equivalent")
        elif name in FEATURES:
            self.warn(f"FEATURE({name}): no mailgate equivalent")
            self.note("no mailgate equivalent")
        else:
            self.warn(f"FEATURE({name}): not a Sendmail feature (m4 would stop: no such file)")
            self.note("not mapped")

    def access_flag(self, flag: str) -> None:
        if flag in ("", "skip"):
            self.note("SKIP stops a lookup as in Sendmail" if flag else "")
        elif flag == "lookupdotdomain":
            self.warn("FEATURE(access_db, …, lookupdotdomain): .domain keys are not looked up")
        elif flag == "relaytofulladdress":
            self.warn("FEATURE(access_db, …, relaytofulladdress): To:user@domain RELAY is not used")
        else:
            self.warn(f"FEATURE(access_db, …, {flag}): not an access_db option mailgate knows")

    def greet_pause(self, call: m4.Call) -> None:
        ms_text = call.arg(1)
        if not ms_text:
            self.set(
                "smtp",
                "greet_pause",
                "0s",
                "FEATURE(greet_pause) without a default: only access GreetPause: entries pause",
                [self.item],
            )
            return
        try:
            ms = _whole(ms_text)
        except ValueError as exc:
            self.warn(f"FEATURE(greet_pause, {ms_text}): {exc} (milliseconds)")
            return
        self.set(
            "smtp",
            "greet_pause",
            duration_text(ms / 1000),
            f"FEATURE(greet_pause, {ms}): the greeting waits {ms} ms; access GreetPause:"
            " entries set other pauses per client",
            [self.item],
        )

    def unsafe(self, name: str) -> None:
        section, key, risk = meanings.UNSAFE[name]
        if self.allow_unsafe:
            self.set(
                section,
                key,
                False,
                f"FEATURE({name}), imported with --allow-unsafe: {risk}",
                [self.item],
            )
            self.warn(f"FEATURE({name}) imported because of --allow-unsafe: {risk}")
            return
        self.warn(
            f"FEATURE({name}) is refused: {risk}. [{section}] {key} stays true; run the"
            " import with --allow-unsafe to take the risk",
            kind="refused",
        )
        self.note("refused (unsafe)")

    def mailer(self, call: m4.Call) -> None:
        name = call.arg(0)
        if name in meanings.MAILER_NOTES:
            self.note(meanings.MAILER_NOTES[name])
        elif name == "uucp":
            try:
                parse_mailer_value("uucp-new:host")
            except ValueError:
                self.note(
                    "the uucp mailers: mailgate has no UUCP delivery yet, so mailgate check"
                    " refuses uucp-* routes in mailertable; nothing to set"
                )
            else:
                self.note("the uucp mailers (uucp-old, uucp-new, uucp-dom, uucp-uudom)")
        elif name in MAILERS:
            self.warn(f"MAILER({name}): mailgate has no {name} mailer")
            self.note("no mailgate equivalent")
        else:
            self.warn(f"MAILER({name}): not a Sendmail mailer (m4 would stop: no such file)")
            self.note("not mapped")

    def define_call(self, call: m4.Call) -> None:
        name = call.arg(0)
        value = call.args[1] if len(call.args) > 1 else ""
        self.store_define(name, value)
        if name in CONF_NAMES or name in meanings.NOTE_DEFINES or name in meanings.WARN_DEFINES:
            return
        if meanings.MAILER_DEFINE.fullmatch(name):
            if name.startswith("LOCAL_MAILER_"):
                self.warn(
                    f"{name}: mailgate delivers local mail to Maildirs itself; Sendmail's"
                    " local mailer settings are not used"
                )
            else:
                self.warn(f"{name}: a setting of a Sendmail mailer; mailgate's have none")
            self.note("no mailgate equivalent")
        elif name.startswith("conf"):
            self.warn(f"{name}: not a Sendmail option (misspelt?); sendmail.cf never reads it")
            self.note("not mapped")
        else:
            self.macros[name] = value
            self.note(f"{name}: an m4 macro of this file, expanded where later lines use it")

    def store_define(self, name: str, value: str) -> None:
        old = self.defines.get(name)
        if old is not None and old[1] is not self.item and not self._a_filter_line(old[1]):
            old[1].notes.append(f"replaced by line {self.item.line} (m4 keeps the last define)")
        self.defines[name] = (value, self.item)

    def _a_filter_line(self, item: _Item) -> bool:
        """An INPUT_MAIL_FILTER line: it appends to confINPUT_MAIL_FILTERS, as m4's macro
        does, and no later line replaces it (a define of the list changes the order only)."""
        return any(f.item is item for f in self.filters.values())

    def undefine(self, call: m4.Call) -> None:
        name = call.arg(0)
        old = self.defines.pop(name, None)
        self.macros.pop(name, None)
        if old is not None:
            old[1].notes.append(f"undone by undefine at line {self.item.line}")
        self.note(f"{name} back to Sendmail's default")

    def daemon_options(self, call: m4.Call) -> None:
        self.daemons.append(_Daemon(self.item, call.arg(0)))

    def client_options(self, call: m4.Call) -> None:
        fields_ = dict((k[:1].upper(), v) for k, v in _spec_fields(call.arg(0)))
        addr = fields_.get("A", "")
        if addr:
            self.set(
                "delivery",
                "bind_address",
                addr,
                f"CLIENT_OPTIONS(Addr={addr}): connections to next hops come from there",
                [self.item],
            )
        others = sorted(set(fields_) - {"A", "F", "N"})
        if others:
            self.warn(f"CLIENT_OPTIONS({call.arg(0)}): only Addr= has a mailgate equivalent")

    def mail_filter(self, call: m4.Call) -> None:
        name = call.arg(0).strip()
        if not name:
            # Sendmail's readcf refuses an X line without a name as well.
            self.warn(f"{call.name} without a filter name: not imported", kind="refused")
            return
        self.filters[name] = _Filter(self.item, call.arg(1))
        if call.name == "INPUT_MAIL_FILTER":
            order = self.define("confINPUT_MAIL_FILTERS")
            self.defines["confINPUT_MAIL_FILTERS"] = (
                f"{order}, {name}" if order else name,
                self.item,
            )

    def trusted_users(self, given: str) -> None:
        """FEATURE(use_ct_file): class t from its file (``-f`` without the warning), added
        to Sendmail's own root and daemon, as ``[submission] trusted_users``."""
        path = Path(given) if given and "$" not in given else self.mail_dir / "trusted-users"
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            self.warn(f"FEATURE(use_ct_file): cannot read {path} ({exc.strerror}): class t "
                      "is root and daemon only")  # fmt: skip
            return
        users: list[TomlValue] = ["root", "daemon"]
        for line in text.splitlines():
            for word in line.split("#", 1)[0].split():
                if word not in users:
                    users.append(word)
        self.set(
            "submission",
            "trusted_users",
            users,
            f"FEATURE(use_ct_file): class t from {path} (sendmail -f without a warning)",
            [self.item],
        )

    def class_macro(self, call: m4.Call) -> None:
        names = call.arg(0).split()
        table, what = (
            ("local-host-names", "local")
            if call.name == "LOCAL_DOMAIN"
            else ("relay-domains", "relayed")
        )
        known = set()
        if self.tables is not None:
            known = set(
                self.tables.local_names
                if table == "local-host-names"
                else self.tables.relay_domains
            )
        missing = [n for n in names if n.lower().rstrip(".") not in known]
        if missing:
            self.warn(
                f"{call.name}: {' '.join(missing)} must be {what}: add them to"
                f" {self.mail_dir / table} (the tables are not changed by the import)"
            )
            self.note("not mapped")
        else:
            self.note(f"{' '.join(names)}: already in {table}")

    def class_file(self, call: m4.Call) -> None:
        table = "relay-domains" if call.name == "RELAY_DOMAIN_FILE" else "local-host-names"
        self.note(f"{table}: mailgate reads {self.mail_dir / table}")
        self.table_path(table, call.arg(0), call.name)

    def note_macro(self, call: m4.Call) -> None:
        self.note(meanings.NOTE_MACROS[call.name])

    def warn_macro(self, call: m4.Call) -> None:
        self.warn(f"{call.name}({call.arg(0)}): {meanings.WARN_MACROS[call.name]}")
        self.note("no mailgate equivalent")

    def raw_block(self, call: m4.Call) -> None:
        self.note(f"{call.name}: raw sendmail.cf text follows")
        self.raw = (self.item, call.name)

    def changequote(self, call: m4.Call) -> None:
        self.note("m4 quotes changed; the importer follows them")

    def conditional(self, call: m4.Call) -> None:
        if call.name == "ifdef" and (call.arg(0) in self.defines or call.arg(0) in self.macros):
            branch = call.args[1] if len(call.args) > 1 else ""
        elif call.name == "ifdef" and (call.arg(0).startswith("conf") or call.arg(0) == ""):
            branch = call.args[2] if len(call.args) > 2 else ""
        else:
            self.warn(f"{call.name}(…): m4 conditionals are not evaluated; check by hand")
            self.note("not mapped")
            return
        outer = self.item
        try:
            nodes = m4.parse(branch, self.path)
        except m4.McSyntaxError as exc:
            self.warn(f"ifdef({call.arg(0)}): its branch cannot be read ({exc.message})")
            self.note("not mapped")
            return
        self.note(f"ifdef({call.arg(0)}): the branch m4 takes is read")
        for node in nodes:
            shift = outer.line - 1
            if isinstance(node, m4.Call):
                node = m4.Call(
                    node.name, node.args, node.line + shift, node.end_line + shift, node.parens
                )
            else:
                node = m4.Text(node.text, node.line + shift, node.end_line + shift)
            self.node(node)

    HANDLERS: ClassVar[dict[str, Callable[[_Mapper, m4.Call], None]]] = {}

    # -- the end: defines, daemons, milters, defaults, tables -----------------------------

    def finish(self) -> None:
        self.item = _Item(0, 0)
        self.resolve_defines()
        self.listen()
        self.milters()
        for section, key, value, why in meanings.SENDMAIL_DEFAULTS:
            spec = self.keys[(section, key)].setting
            if (section, key) not in self.values and spec.convert(value) != spec.convert(
                spec.default
            ):
                self.set(section, key, value, why)
        self.set(
            "",
            "tables_dir",
            str(self.mail_dir),
            "the mail dir: Sendmail's tables are read here as text, as they are (makemap and"
            " newaliases only check them)",
        )
        self.set(
            "",
            "spool_dir",
            SPOOL_DIR,
            "mailgate's own queue; Sendmail's (/var/spool/mqueue) is not read: let `sendmail"
            " -q` empty it before the switch",
        )
        self.set(
            "log",
            "target",
            "syslog",
            "Sendmail logged to syslog, facility mail: the same kind of maillog lines go where"
            " syslog.conf puts mail.* (tail -f /var/log/maillog as before)",
        )
        self.set(
            "log",
            "syslog_name",
            "sm-mta",
            "Debian's Sendmail daemon's name in syslog: fail2ban's sendmail filters and"
            ' logwatch\'s sendmail service find the lines by it ("mailgate" if nothing reads'
            " them)",
        )
        self.set(
            "local",
            "maildir_root",
            MAILDIR_ROOT,
            "local mail (postmaster, aliases to local users) goes to Maildirs here; Sendmail's"
            " local mailer appended to /var/mail/<user>",
        )
        self.check_tables()

    def define_items(self, *names: str) -> tuple[str | None, list[_Item]]:
        """The value of the first of ``names`` the mc defines, and the items defining any."""
        value = None
        items = []
        for name in names:
            found = self.defines.get(name)
            if found is not None:
                if value is None:
                    value = found[0]
                items.append(found[1])
        return value, items

    def resolve_defines(self) -> None:
        done: set[str] = set()
        for names, apply in _DEFINE_RULES:
            value, items = self.define_items(*names)
            done.update(names)
            if value is None:
                continue
            self.item = items[0]
            try:
                apply(self, value.strip(), items)
            except ValueError as exc:
                self.warn(f"{names[0]}: {exc}; not imported")
        for name, (value, item) in self.defines.items():
            if name in done:
                continue
            self.item = item
            self.other_define(name, value.strip())

    def other_define(self, name: str, value: str) -> None:
        if name in meanings.NOTE_DEFINES:
            self.note(meanings.NOTE_DEFINES[name])
        elif name in meanings.WARN_DEFINES:
            mailer = value if ":" in value else f"relay:{value}"
            self.warn(f"{name}: {meanings.WARN_DEFINES[name].format(mailer=mailer)}")
            self.note("no mailgate equivalent")
        elif name in meanings.CLIENT_TIMEOUTS:
            self.warn(
                f"{name}: mailgate's SMTP client uses RFC 5321's timeouts, scaled down by"
                " [delivery] command_timeout; this one is not set apart"
            )
            self.note("no mailgate equivalent")
        elif name in OPTIONS:
            self.warn(f"{name} (Sendmail's {OPTIONS[name]} option): no mailgate equivalent")
            self.note("no mailgate equivalent")
        elif name in CONF_NAMES:
            self.warn(f"{name}: no mailgate equivalent")
            self.note("no mailgate equivalent")

    def listen(self) -> None:
        addresses: list[TomlValue] = []
        items: list[_Item] = []
        daemons = [(d, "mc") for d in self.daemons]
        if not daemons:
            daemons.append((_Daemon(_Item(0, 0), "Name=MTA"), "default MTA"))
        if "no_default_msa" not in self.features:
            daemons.append((_Daemon(_Item(0, 0), "Port=587, Name=MSA, M=E"), "default MSA"))
        for d, origin in daemons:
            self.item = d.item
            address = self.daemon_address(d.spec, origin)
            if address is not None and address not in addresses:
                addresses.append(address)
                items.append(d.item)
        if not addresses:
            self.warn("no DAEMON_OPTIONS line can be imported: mailgate would listen nowhere")
            return
        why = (
            "DAEMON_OPTIONS: the addresses Sendmail listened on"
            if self.daemons
            else "no DAEMON_OPTIONS: Sendmail's default, port 25 on every IPv4 address"
        )
        self.set("", "listen", addresses, why, items)

    def daemon_address(self, spec: str, origin: str) -> str | None:
        """``host:port`` for one DAEMON_OPTIONS spec, or None (with a warning)."""
        fields_: dict[str, str] = {}
        for k, v in _spec_fields(spec):
            fields_[k[:1].upper() if k[:1].isupper() else k] = v
        name = fields_.get("N", "MTA")
        family = fields_.get("F", "inet").lower()
        port_text = fields_.get("P", "smtp")
        modifiers = fields_.get("M", "")
        shown = (
            f"DAEMON_OPTIONS({spec})"
            if origin == "mc"
            else "Sendmail's default MSA (no FEATURE(no_default_msa))"
        )
        if family not in ("inet", "inet6"):
            self.warn(f"{shown}: Family={family} is not served by mailgate; not imported")
            return None
        port = int(port_text) if port_text.isdigit() else meanings.PORTS.get(port_text.lower())
        if port is None:
            self.warn(f"{shown}: unknown port {port_text!r}; not imported")
            return None
        if "a" in modifiers or "s" in modifiers:
            reason = "requires SMTP AUTH (M=a)" if "a" in modifiers else "is SMTPS (M=s)"
            self.warn(f"{shown}: port {port} {reason}, which mailgate does not offer; not imported")
            self.note("not imported")
            return None
        addr = fields_.get("A", "")
        host = "0.0.0.0" if family == "inet" else "::"
        if addr:
            try:
                host = str(ipaddress.ip_address(addr.strip("[]")))
            except ValueError:
                self.warn(
                    f"{shown}: Addr={addr} is not an IP address; mailgate listens on addresses"
                    " only; not imported"
                )
                return None
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if origin == "default MSA":
            self.warn(
                f"{shown}: Sendmail listened on port 587 too, and so does mailgate, without"
                " SMTP AUTH; add FEATURE(no_default_msa) to the mc if that port is not used"
            )
            return address
        self.note(f"listens on {address}")
        if name not in ("MTA", "MTA-v4", "MTA-v6"):
            self.note(f"Name={name}: mailgate's log lines say daemon=MTA")
        if "E" in modifiers:
            self.warn(f"{shown}: M=E refused ETRN there; mailgate answers ETRN on every port")
        return address

    def milters(self) -> None:
        """Each filter of confINPUT_MAIL_FILTERS, in that order, as a ``[[milter]]``:
        ``S=`` its socket, ``F=`` its default action, ``T=`` its timeouts (Sendmail's
        defaults where ``T=`` says nothing), and the confMILTER_MACROS_* lists."""
        order = [n.strip() for n in self.define("confINPUT_MAIL_FILTERS").split(",")]
        for name, unused in self.filters.items():
            if name not in order:
                self.item = unused.item
                self.note(f"mail filter {name}: defined, not used (not in confINPUT_MAIL_FILTERS)")
        macros = {
            key: [_macro(m) for m in value.split(",") if m.strip()]
            for key, stage in _MILTER_MACROS.items()
            if (value := self.define(stage))
        }
        # The define lines of the list and of the macros say what they became.
        listed = self.defines.get("confINPUT_MAIL_FILTERS")
        if listed is not None and not self._a_filter_line(listed[1]):
            used = [n for n in order if n in self.filters]
            listed[1].notes.append(
                f"the [[milter]] tables, in this order: {', '.join(used)}"
                if used
                else "no [[milter]] table: none of these filters is defined"
            )
        for key, stage in _MILTER_MACROS.items():
            given = self.defines.get(stage)
            if given is not None and key in macros:
                given[1].notes.append(f"{key} of every [[milter]] table")
        for name in order:
            flt = self.filters.get(name)
            if flt is None:
                continue
            self.item = flt.item
            fields_ = {k[:1].upper(): v for k, v in _spec_fields(flt.spec)}
            try:
                parse_milter_socket(fields_.get("S", ""))
            except ValueError as exc:
                # Sendmail would log the filter as unusable at each connection and apply its
                # F= action; an entry that does not load would stop the whole config here.
                self.warn(f"mail filter {name}: S=: {exc}: not imported", kind="refused")
                continue
            flags = fields_.get("F", "")
            action = "reject" if "R" in flags else "tempfail" if "T" in flags else "accept"
            if action == "accept":
                self.warn(
                    f'mail filter {name}: no F=R or F=T, so default_action = "accept" as'
                    " in Sendmail: while the filter is down, mail is accepted unfiltered"
                    ' (mailgate\'s own default is "tempfail")'
                )
            body = [
                "[[milter]]",
                f"name = {_toml_string(name)}",
                f"socket = {_toml_string(fields_.get('S', ''))}",
                f"default_action = {_toml_string(action)}",
            ]
            timeouts = dict(_MILTER_TIMEOUTS_SENDMAIL)
            for part in fields_.get("T", "").split(";"):
                letter, colon, value = part.strip().partition(":")
                if colon and letter.upper() in _MILTER_TIMEOUT_KEYS:
                    timeouts[letter.upper()] = value.strip()
                elif part.strip():
                    self.warn(f"mail filter {name}: T={part.strip()}: not a milter timeout")
            for letter, key in _MILTER_TIMEOUT_KEYS.items():
                body.append(f"{key} = {_toml_string(timeouts[letter])}")
            for key, names in macros.items():
                body.append(f"{key} = [{', '.join(_toml_string(n) for n in names)}]")
            self.note(f"a [[milter]] table, default_action = {action}")
            self.blocks.append(Block(flt.item.line, f"mail filter {name}", tuple(body), live=True))

    def check_tables(self) -> None:
        t = self.tables
        self.item = _Item(0, 0)
        if t is None:
            return
        blocklist = self.values.get(("access", "blocklist_recipients"))
        for w in lint(t, blocklist_recipients=bool(blocklist and blocklist.value)):
            self.findings.append(Finding(w.path, w.line, w.message))
        sizes = {
            "mailertable": len(t.mailertable),
            "virtusertable": len(t.virtusers),
            "domaintable": len(t.domaintable),
            "access_db": len(t.access),
            "use_cw_file": len(t.local_names),
        }
        for feature, size in sizes.items():
            if size and feature not in self.features:
                table = meanings.TABLE_FEATURES.get(feature, "local-host-names")
                self.findings.append(
                    Finding(
                        str(self.mail_dir / table),
                        None,
                        f"{size} entries, but {self.path} has no FEATURE({feature}): Sendmail"
                        " ignored this file, mailgate reads it; move it away if it is not meant",
                    )
                )
        if "greet_pause" not in self.features:
            for _, key, v in t.access.entries("greetpause"):
                self.findings.append(
                    Finding(
                        t.access.path,
                        v.line,
                        f"GreetPause:{key}: Sendmail ignored it without FEATURE(greet_pause);"
                        " mailgate pauses this client",
                    )
                )
        aliases = t.aliases
        for name in aliases.names():
            for target in aliases.lookup(name) or ():
                line = aliases.line_of(name)
                if (
                    "redirect" in self.features
                    and target.kind == "address"
                    and target.value.lower().endswith(".redirect")
                ):
                    self.findings.append(
                        Finding(
                            aliases.path,
                            line,
                            f"{name}: {target.value}: mailgate has no .REDIRECT (551 User not"
                            " local); it would try to deliver to that address",
                        )
                    )
                if "smrsh" in self.features and target.kind == "program":
                    self.findings.append(
                        Finding(
                            aliases.path,
                            line,
                            f"{name}: |{target.value}: mailgate runs alias programs with"
                            " /bin/sh -c, without smrsh's list of allowed programs",
                        )
                    )

    def kept(self) -> list[str]:
        out = []
        for section, key, sendmail in meanings.KEPT:
            if (section, key) in self.values:
                continue
            k = self.keys[(section, key)]
            out.append(f"{k.label} = {k.shown_default.strip('`')} ({sendmail})")
        return out


# --- define rules: the defines that become settings ---------------------------------------

DefineRule = Callable[[_Mapper, str, list[_Item]], None]


def _set_int(
    section: str, key: str, option: str, meaning: str, zero: str | None = None
) -> DefineRule:
    def apply(m: _Mapper, value: str, items: list[_Item]) -> None:
        number = _whole(value)
        if number == 0 and zero is not None:
            m.note(f"{option}=0: {zero}")
            return
        m.set(section, key, number, f"{option}={number}: {meaning}", items)

    return apply


def _set_flag(section: str, key: str, option: str, meaning: str) -> DefineRule:
    def apply(m: _Mapper, value: str, items: list[_Item]) -> None:
        # Sendmail's atobool: empty, or starting with t/T/y/Y, is true; anything else false.
        on = not value.strip() or value.strip()[0] in "tTyY"
        m.set(section, key, on, f"{option}={value.strip() or 'True'}: {meaning}", items)

    return apply


def _set_duration(section: str, key: str, option: str, zero: str | None = None) -> DefineRule:
    def apply(m: _Mapper, value: str, items: list[_Item]) -> None:
        seconds = sendmail_seconds(value)
        if seconds == 0 and zero is not None:
            m.note(f"0: {zero}")
            return
        m.set(section, key, duration_text(seconds), f"{option}={value}", items)

    return apply


def _hostname(m: _Mapper, value: str, items: list[_Item]) -> None:
    if "$" in value:
        raise ValueError(f"{value!r} uses Sendmail macros; write the name in hostname")
    m.set("", "hostname", value, f"confDOMAIN_NAME: Sendmail's $j, {value}", items)


def _double_bounce(m: _Mapper, value: str, items: list[_Item]) -> None:
    if "$" in value:
        raise ValueError(f"{value!r} uses Sendmail macros; write the address itself")
    what = f"double bounces go to {value}" if value else "double bounces are dropped"
    m.set("queue", "double_bounce_address", value, f"confDOUBLE_BOUNCE_ADDRESS: {what}", items)


def _helo_name(m: _Mapper, value: str, items: list[_Item]) -> None:
    if "$" in value:
        raise ValueError(f"{value!r} uses Sendmail macros; write the name in helo_name")
    m.set("delivery", "helo_name", value, f"confHELO_NAME: EHLO {value} to next hops", items)


def _privacy(m: _Mapper, value: str, items: list[_Item]) -> None:
    flags = [f.lower() for f in re.split(r"[\s,]+", value) if f]
    convert = m.keys[("smtp", "privacy")].setting.convert
    kept: list[TomlValue] = []
    for flag in flags:
        try:
            convert([flag])
        except ValueError:
            m.warn(f"confPRIVACY_FLAGS: {flag} is no privacy flag mailgate knows; left out")
            continue
        kept.append(flag)
        effect = meanings.PRIVACY_IGNORED.get(flag)
        if effect:
            m.warn(f"confPRIVACY_FLAGS: {flag} is kept but mailgate does not act on it: {effect}")
    m.set("smtp", "privacy", kept, f"PrivacyOptions={value}", items)


def _greeting(m: _Mapper, value: str, items: list[_Item]) -> None:
    words = set(re.findall(r"[A-Za-z0-9][\w.-]*", re.sub(r"\$[a-zA-Z]|\$\{\w+\}", " ", value)))
    plain = {"Sendmail", "ESMTP", "ready", "mailgate", "SMTP"}
    greeting = "220 <hostname> ESMTP mailgate ready; <date>"
    if words - plain:
        m.warn(
            f"confSMTP_LOGIN_MSG {value!r}: mailgate's greeting is fixed ({greeting});"
            " the text of this one is not carried over"
        )
        m.note("no mailgate equivalent")
    else:
        m.note(
            f"the greeting: mailgate sends {greeting}, with the host name and date as here"
            " and no version"
        )


def _fixed(limit: int, what: str) -> DefineRule:
    def apply(m: _Mapper, value: str, items: list[_Item]) -> None:
        if _whole(value) == limit:
            m.note(f"{what} {limit}: mailgate's fixed limit is the same")
        else:
            m.warn(f"{what} {value}: mailgate's limit is fixed at {limit}")
            m.note("no mailgate equivalent")

    return apply


def _log_level(m: _Mapper, value: str, items: list[_Item]) -> None:
    n = _whole(value)
    level = "info" if n >= 9 else "notice" if n >= 4 else "warning" if n >= 2 else "error"
    m.set(
        "log",
        "level",
        level,
        f"LogLevel={n}: {'from=/to= lines are written' if n >= 9 else 'no from=/to= lines'}",
        items,
    )


def _min_free(m: _Mapper, value: str, items: list[_Item]) -> None:
    blocks = _whole(value)
    default = m.keys[("queue", "min_free")].setting
    at_4k = blocks * 4096
    if at_4k > parse_size(default.default):
        m.set("queue", "min_free", at_4k, f"MinFreeBlocks={blocks}, at 4 KiB blocks", items)
    else:
        m.note(f"MinFreeBlocks={blocks}: mailgate keeps its larger default")


def _table_file(table: str) -> DefineRule:
    def apply(m: _Mapper, value: str, items: list[_Item]) -> None:
        m.note(f"{table}: mailgate reads {m.mail_dir / table}")
        m.table_path(table, value, f"{table} file")

    return apply


def _tls_file(key: str) -> DefineRule:
    def apply(m: _Mapper, value: str, items: list[_Item]) -> None:
        if "$" in value:
            raise ValueError(f"{value!r} uses Sendmail macros; write the path in [tls] {key}")
        m.set("tls", key, value, f"the server's {'certificate' if key == 'cert_file' else 'key'}"
              " for STARTTLS", items)  # fmt: skip

    return apply


def _per_priority(m: _Mapper, value: str, items: list[_Item]) -> None:
    m.warn("per-priority queue timeouts: mailgate has one warn_after and one max_age")
    m.note("no mailgate equivalent")


_DEFINE_RULES: tuple[tuple[tuple[str, ...], DefineRule], ...] = (
    (("confDOMAIN_NAME",), _hostname),
    (("confHELO_NAME",), _helo_name),
    (("confDOUBLE_BOUNCE_ADDRESS",), _double_bounce),
    (("confPRIVACY_FLAGS",), _privacy),
    (("confSMTP_LOGIN_MSG",), _greeting),
    (
        ("confALLOW_BOGUS_HELO",),
        _set_flag("smtp", "allow_bogus_helo", "AllowBogusHELO", "any HELO/EHLO argument is taken"),
    ),
    (
        ("confBAD_RCPT_THROTTLE",),
        _set_int(
            "smtp",
            "bad_rcpt_throttle",
            "BadRcptThrottle",
            "after that many refused RCPTs, each RCPT is answered after a pause",
        ),
    ),
    (
        ("confCONNECTION_RATE_THROTTLE",),
        _set_int(
            "smtp",
            "connection_rate_throttle",
            "ConnectionRateThrottle",
            "new connections accepted per second; the rest wait in the listen queue",
        ),
    ),
    (
        ("confMAX_MESSAGE_SIZE",),
        _set_int("smtp", "max_message_size", "MaxMessageSize", "bytes (0: no limit)"),
    ),
    (
        ("confMAX_RCPTS_PER_MESSAGE",),
        _set_int(
            "smtp",
            "max_recipients",
            "MaxRecipientsPerMessage",
            "more get 452 4.5.3 Too many recipients",
            zero="Sendmail's no limit; mailgate keeps its limit",
        ),
    ),
    (
        ("confMAX_DAEMON_CHILDREN",),
        _set_int(
            "smtp",
            "max_connections",
            "MaxDaemonChildren",
            "sessions at once",
            zero="Sendmail's no limit; mailgate keeps its limit",
        ),
    ),
    (("confTO_COMMAND",), _set_duration("smtp", "command_timeout", "Timeout.command")),
    (("confTO_DATABLOCK",), _set_duration("smtp", "data_timeout", "Timeout.datablock")),
    (
        ("confTO_QUEUEWARN_NORMAL", "confTO_QUEUEWARN"),
        _set_duration("queue", "warn_after", "Timeout.queuewarn"),
    ),
    (
        ("confTO_QUEUERETURN_NORMAL", "confTO_QUEUERETURN"),
        _set_duration("queue", "max_age", "Timeout.queuereturn"),
    ),
    (
        ("confTO_CONNECT",),
        _set_duration(
            "delivery",
            "connect_timeout",
            "Timeout.connect",
            zero="the system's connect timeout; mailgate keeps its own",
        ),
    ),
    (("confMAX_HEADERS_LENGTH",), _fixed(MAX_HEADER_BYTES, "MaxHeadersLength")),
    (("confMAX_HOP",), _fixed(MAX_HOPS, "MaxHopCount")),
    (("confLOG_LEVEL",), _log_level),
    (("confMIN_FREE_BLOCKS",), _min_free),
    (("confCW_FILE",), _table_file("local-host-names")),
    (("confCR_FILE",), _table_file("relay-domains")),
    (("confALIAS_FILE", "ALIAS_FILE"), _table_file("aliases")),
    (("confSERVER_CERT",), _tls_file("cert_file")),
    (("confSERVER_KEY",), _tls_file("key_file")),
    (
        (
            "confTO_QUEUEWARN_URGENT",
            "confTO_QUEUEWARN_NONURGENT",
            "confTO_QUEUEWARN_DSN",
            "confTO_QUEUERETURN_URGENT",
            "confTO_QUEUERETURN_NONURGENT",
            "confTO_QUEUERETURN_DSN",
        ),
        _per_priority,
    ),
)

_Mapper.HANDLERS = {
    "divert": _Mapper.m4_control,
    "undivert": _Mapper.m4_control,
    "VERSIONID": _Mapper.versionid,
    "include": _Mapper.include,
    "sinclude": _Mapper.include,
    "OSTYPE": _Mapper.ostype,
    "DOMAIN": _Mapper.domain,
    "FEATURE": _Mapper.feature,
    "MAILER": _Mapper.mailer,
    "define": _Mapper.define_call,
    "undefine": _Mapper.undefine,
    "DAEMON_OPTIONS": _Mapper.daemon_options,
    "CLIENT_OPTIONS": _Mapper.client_options,
    "INPUT_MAIL_FILTER": _Mapper.mail_filter,
    "MAIL_FILTER": _Mapper.mail_filter,
    "LOCAL_DOMAIN": _Mapper.class_macro,
    "RELAY_DOMAIN": _Mapper.class_macro,
    "RELAY_DOMAIN_FILE": _Mapper.class_file,
    "changequote": _Mapper.changequote,
    "ifdef": _Mapper.conditional,
    **dict.fromkeys(meanings.NOTE_MACROS, _Mapper.note_macro),
    **dict.fromkeys(meanings.WARN_MACROS, _Mapper.warn_macro),
    **dict.fromkeys(
        (n for n in m4.BARE_MACROS if n.startswith("LOCAL_")),
        _Mapper.raw_block,
    ),
}


def _toml_string(text: str) -> str:
    return toml_literal(text)


def convert(
    text: str,
    path: str,
    *,
    mail_dir: Path,
    tables: Tables | None,
    table_error: TableError | None = None,
    allow_unsafe: bool = False,
) -> Conversion:
    """Map the mc ``text`` (read from ``path``) to mailgate settings and findings.

    ``tables`` are the tables of ``mail_dir`` as mailgate loads them (None when they do not
    load: ``table_error`` says why). Raises `m4.McSyntaxError` where m4 itself would stop.
    """
    nodes = m4.parse(text, path)
    m = _Mapper(path, mail_dir, tables, allow_unsafe)
    m.run(nodes)
    m.finish()
    if table_error is not None:
        m.findings.append(
            Finding(
                table_error.path,
                table_error.line,
                table_error.message,
                "error",
            )
        )
    constructs = tuple(
        Construct(
            it.line,
            it.end_line,
            "; ".join(it.notes) or ("" if it.sets else "nothing to set"),
            tuple(it.sets),
        )
        for it in m.items
    )
    order = {(k.section, k.name): n for n, k in enumerate(keys())}
    assignments = tuple(sorted(m.values.values(), key=lambda a: order[(a.section, a.key)]))
    return Conversion(
        mc_path=path,
        mc_lines=tuple(text.split("\n")),
        constructs=constructs,
        assignments=assignments,
        blocks=tuple(m.blocks),
        kept=tuple(m.kept()),
        findings=tuple(sorted(m.findings, key=lambda f: (f.path != path, f.path, f.line or 0))),
    )
