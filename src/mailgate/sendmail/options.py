"""The ``sendmail`` command line, parsed as Sendmail 8.15's ``getopt`` takes it: pure, argv in,
an :class:`Invocation` out, or :class:`UsageError` (the caller exits ``EX_USAGE``).

Permissive where Sendmail is: every flag it knows is taken, bundled (``-ti``) or not, with its
argument attached (``-fbob``) or next (``-f bob``); options and addresses may come in any
order (glibc's getopt, which Sendmail on Linux uses, permutes), ``--`` ends the options. Flags
that have no meaning here (``-odb``, ``-oem``, ``-Am``, ``-X file``, ``-h 17``, ``-L tag``…) are
accepted and ignored, as scripts and cron pass them; a flag Sendmail does not know is an error.
``-q`` takes its argument attached only (``-q30m``): a bare ``-q`` runs the queue once, so
``-q -v`` is two flags, as Sendmail's own argv fix-up makes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mailgate.config import Override, TomlValue, parse_duration
from mailgate.smtp import dsn_params

# Sendmail 8.15's OPTIONS: letters with an argument, and those without.
_WITH_ARG = frozenset("ABbCDdeFfhLMNOopQRrVX")
_NO_ARG = frozenset("cGIimnsTtv")

MODES = {
    "m": "deliver",  # read a message on stdin and queue it (the default)
    "p": "mailq",
    "t": "route",  # address test mode
    "v": "verify",
    "d": "daemon",  # detached, as Sendmail's -bd
    "D": "serve",  # in the foreground
    "i": "newaliases",
}


class UsageError(Exception):
    """A command line Sendmail would refuse too (EX_USAGE)."""


@dataclass
class Invocation:
    mode: str = "deliver"
    recipients: list[str] = field(default_factory=list)
    config: str | None = None  # -C
    sender: str | None = None  # -f / -r, as written
    full_name: str | None = None  # -F
    extract: bool = False  # -t
    ignore_dots: bool = False  # -i, -oi, -O IgnoreDots
    verbose: bool = False  # -v
    run_queue: bool = False  # -q (once)
    queue_interval: str | None = None  # -q30m: serve, with that queue run interval
    queue_domains: list[str] = field(default_factory=list)  # -qRdomain: flush --domain
    queue_ids: list[str] = field(default_factory=list)  # -qIqid: flush --id, mailq --id
    # -bp's selection (mailq --recipient, --sender, --id; -q!X: "!" before the string)
    queue_recipients: list[str] = field(default_factory=list)  # -qRstring, as written
    queue_senders: list[str] = field(default_factory=list)  # -qSstring
    quarantined: bool = False  # -qQ: the held messages (Sendmail's quarantine)
    body: str | None = None  # -B 7BIT | 8BITMIME
    notify: str | None = None  # -N, as NOTIFY= (RFC 3461)
    ret: str | None = None  # -R full | hdrs
    envid: str | None = None  # -V, as xtext
    overrides: list[Override] = field(default_factory=list)  # -O / -o that map to settings


def _text(value: str) -> TomlValue:
    return value


def _number(value: str) -> TomlValue:
    if not value.strip().isdigit():
        raise UsageError(f"{value!r} is not a number")
    return int(value)


def _words(value: str) -> TomlValue:
    return [w for w in value.replace(",", " ").split() if w]


def _duration(value: str) -> TomlValue:
    # Sendmail's Timeout.queuereturn may be "5d/4h" (old -oT: return/warn): the first part.
    return value.split("/")[0].strip()


def _yes_no(value: str) -> TomlValue:
    return value.strip().lower() in ("", "t", "true", "y", "yes", "1")


# Sendmail option names (lower case) → the setting each maps to, and how its value reads.
SETTINGS: dict[str, tuple[str, str, Callable[[str], TomlValue]]] = {
    "queuedirectory": ("", "spool_dir", _text),
    "maxmessagesize": ("smtp", "max_message_size", _number),
    "maxrecipientspermessage": ("smtp", "max_recipients", _number),
    "privacyoptions": ("smtp", "privacy", _words),
    "connectionratethrottle": ("smtp", "connection_rate_throttle", _number),
    "timeout.command": ("smtp", "command_timeout", _duration),
    "timeout.datablock": ("smtp", "data_timeout", _duration),
    "timeout.queuereturn": ("queue", "max_age", _duration),
    "timeout.queuewarn": ("queue", "warn_after", _duration),
    "timeout.connect": ("delivery", "connect_timeout", _duration),
    "heloname": ("delivery", "helo_name", _text),
}
# Sendmail's one-letter options (-oX) by their long names, for those that map.
LETTERS = {"Q": "QueueDirectory", "T": "Timeout.queuereturn", "p": "PrivacyOptions"}


def parse(argv: Sequence[str]) -> Invocation:
    inv = Invocation()
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            inv.recipients += args[i:]
            break
        if not arg.startswith("-") or arg == "-":
            inv.recipients.append(arg)
            continue
        pos = 1
        while pos < len(arg):
            letter = arg[pos]
            pos += 1
            if letter == "q":
                _queue(inv, arg[pos:])
                break
            if letter in _NO_ARG:
                _flag(inv, letter)
                continue
            if letter not in _WITH_ARG:
                raise UsageError(f"invalid option -- '{letter}'")
            value = arg[pos:]
            if not value:
                if i >= len(args):
                    raise UsageError(f"option requires an argument -- '{letter}'")
                value = args[i]
                i += 1
            _option(inv, letter, value)
            break
    if inv.mode != "mailq":
        # Selections that only the listing has (-bp may come after them: looked at here).
        negated = [q for q in inv.queue_ids + inv.queue_recipients if q.startswith("!")]
        if inv.queue_senders or inv.quarantined or negated:
            what = "-qS" if inv.queue_senders else "-qQ" if inv.quarantined else "-q!"
            raise UsageError(
                f"{what}: only with -bp; a queue run takes only -q, -qRdomain, -qIqid and "
                "-q<interval>"
            )
    return inv


def _flag(inv: Invocation, letter: str) -> None:
    if letter == "t":
        inv.extract = True
    elif letter == "i":
        inv.ignore_dots = True
    elif letter == "v":
        inv.verbose = True
    elif letter == "I":
        inv.mode = "newaliases"
    # -c -G -m -n -s -T: nothing to do here


def _queue(inv: Invocation, value: str) -> None:
    if not value:
        inv.run_queue = True
        return
    negate = value.startswith("!")
    kind, text = (value[1:2], value[2:]) if negate else (value[:1], value[1:])
    if kind in "RIS" and text:
        # Sendmail matches a substring of a recipient (of the queue id, of the sender), as
        # mailq's --recipient/--id/--sender do; flush matches the domain (.domain: its
        # subdomains) and the whole id.
        inv.run_queue = True
        if negate:
            text = "!" + text
        if kind == "R":
            inv.queue_recipients.append(text)
            if not negate:
                inv.queue_domains.append(text.lstrip("@"))
        elif kind == "I":
            inv.queue_ids.append(text)
        else:
            inv.queue_senders.append(text)
        return
    if value == "Q":
        inv.quarantined = True
        return
    if value[0] in "RISQrisq!fp":
        raise UsageError(
            f"-q{value}: only -q (run the queue once), -qRdomain, -qIqid and -q<interval> "
            "are supported"
        )
    try:
        parse_duration(value)
    except ValueError as exc:
        raise UsageError(f"-q{value}: {exc}") from None
    inv.queue_interval = value


def _option(inv: Invocation, letter: str, value: str) -> None:
    if letter == "b":
        if value[:1] not in MODES or len(value) != 1:
            raise UsageError(f"-b{value}: mode not supported (use -bm, -bp, -bt, -bv, -bd, -bi)")
        inv.mode = MODES[value]
    elif letter == "C":
        inv.config = value
    elif letter in "fr":
        if inv.sender is not None:
            raise UsageError('more than one "from" person')  # Sendmail's words
        inv.sender = value
    elif letter == "F":
        inv.full_name = value
    elif letter == "B":
        if value.upper() not in ("7BIT", "8BITMIME"):
            raise UsageError(f"-B{value}: illegal body type (7BIT or 8BITMIME)")
        inv.body = value.upper()
    elif letter == "N":
        if dsn_params.check_notify(value) is not None:
            raise UsageError(f"-N{value}: use never, or success, failure, delay")
        inv.notify = value.upper()
    elif letter == "R":
        if dsn_params.check_ret(value) is not None:
            raise UsageError(f"-R{value}: use full or hdrs")
        inv.ret = value.upper()
    elif letter == "V":
        envid = dsn_params.xtext_encode(value)
        if dsn_params.check_envid(envid) is not None:
            raise UsageError(f"-V{value}: an envelope id is at most 100 characters")
        inv.envid = envid
    elif letter == "O":
        name, _, setting = value.partition("=")
        _long_option(inv, name.strip(), setting.strip(), f"-O{value}")
    elif letter == "o":
        name = LETTERS.get(value[0], "IgnoreDots" if value[0] == "i" else "")
        _long_option(inv, name, value[1:], f"-o{value}")
    # -A -D -d -e -h -L -M -p -Q -X: accepted, nothing to do here


def _long_option(inv: Invocation, name: str, value: str, origin: str) -> None:
    key = name.lower()
    if key == "ignoredots":
        inv.ignore_dots = bool(_yes_no(value))
        return
    target = SETTINGS.get(key)
    if target is None:
        return  # DeliveryMode, ErrorMode, LogLevel…: nothing here to set
    section, setting, read = target
    try:
        inv.overrides.append(Override(section, setting, read(value), origin))
    except UsageError as exc:
        raise UsageError(f"{origin}: {exc}") from None
