"""RFC 5321 paths and mailboxes, normalised the way Sendmail's ruleset 3 does it.

Two steps, kept apart because the session needs the first before it knows which domains are
local: :func:`parse_path_arg` splits ``FROM:<addr> PARAMS`` into the raw address and ESMTP
parameters, and :func:`normalize` turns the raw address into a :class:`Mailbox` (source routes
dropped, UUCP ``host!user`` and the ``%``-hack resolved, domain lower-cased).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from mailgate.reply import Reply

__all__ = [
    "AddressError",
    "Mailbox",
    "RouteError",
    "canon_domain",
    "is_valid_domain",
    "normalize",
    "parse_path_arg",
    "route_step",
    "routed_hosts",
    "unquote_local",
]

# Sendmail's shortenstring(firstp, MAXSHORTSTR) bound for the skipword() error text.
_MAXSHORTSTR = 203
# Sendmail's MAXNAME - 1: the longest address parseaddr() takes (RFC 5321 allows 256 octets).
_MAXADDR = 255
# RFC 5322 atext plus "." (Sendmail and Postfix accept leading/double dots in local parts).
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_ATEXT = frozenset(_ALNUM + "!#$%&'*+-/=?^_`{|}~.")
# atext and the host-name characters (labels and dots) as patterns: one call per string
# instead of a loop per character (every MAIL and RCPT goes through them).
_LAX_ATOM = re.compile("[A-Za-z0-9!#$%&'*+\\-/=?^_`{|}~.\x80-\U0010ffff]*")
_HOST_CHARS = re.compile("[A-Za-z0-9_.\\-\x80-\U0010ffff]*")
# The usual forms, checked by one match each, for the fast paths below: an ASCII host name
# (labels of 1 to 63 letters, digits, "_" or inner "-"; an optional final dot), and a mailbox
# made of an ASCII dot-atom without routing characters ("!" and "%" start UUCP and the
# %-hack) at such a host name. Whatever does not match goes the whole way, so they decide
# nothing the general code would decide otherwise.
_LABEL = "[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_PLAIN_HOST = re.compile(f"{_LABEL}(?:\\.{_LABEL})*\\.?")
_PLAIN_MAILBOX = re.compile(f"([A-Za-z0-9#$&'*+\\-/=?^_`{{|}}~.]+)@({_LABEL}(?:\\.{_LABEL})*)\\.?")


class AddressError(ValueError):
    """An address that cannot be used; ``reply`` is what the SMTP session should answer."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def _err(code: int, dsn: str, written: str, text: str) -> AddressError:
    return AddressError(Reply(code, dsn, f"{written}... {text}"))


# C0, DEL and C1 controls; other non-ASCII is UTF-8 text (SMTPUTF8) and allowed.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _has_control(s: str) -> bool:
    return _CONTROL.search(s) is not None


# A byte that is not UTF-8: command lines are decoded with surrogateescape, which keeps each
# such byte as a lone surrogate. It is no character of any address (and cannot be encoded).
_NOT_UTF8 = re.compile("[\ud800-\udfff]")


def _shorten(s: str) -> str:
    if len(s) <= _MAXSHORTSTR:
        return s
    return s[: _MAXSHORTSTR - 3] + "..."


def _skipword(arg: str, keyword: str) -> str:
    """Sendmail's skipword(): return the text after ``KEYWORD:`` or raise the 501 it sends."""
    p = arg.lstrip()
    k = len(keyword)
    if p[k : k + 1] == ":" and p[:k].lower() == keyword.lower():
        # The usual "FROM:<...>": the word is the keyword, the colon right behind it.
        rest = p[k + 1 :].lstrip()
        if rest:
            return rest
    i = 0
    while i < len(p) and p[i] != ":" and not p[i].isspace():
        i += 1
    word = p[:i]
    j = i
    while j < len(p) and p[j].isspace():
        j += 1
    # Sendmail NULs the colon and the spaces before it, so its message shows just the word.
    syntax = AddressError(
        Reply(501, "5.5.2", f'Syntax error in parameters scanning "{_shorten(word)}"')
    )
    if j >= len(p) or p[j] != ":":
        raise syntax
    rest = p[j + 1 :].lstrip()
    if not rest or word.lower() != keyword.lower():
        raise syntax
    return rest


def _scan_angle(rest: str) -> tuple[str, str]:
    """Split ``<addr> params`` at the ``>`` that closes the first ``<``; quotes may hide ``>``."""
    if '"' not in rest and "\\" not in rest:
        # Nothing quoted or escaped (the usual case): the first ">" closes it unless another
        # "<" opened before it.
        i = rest.find(">")
        if i > 0 and rest.count("<", 0, i) == 1:
            return rest[1:i], rest[i + 1 :]
    depth = 0
    quoted = False
    i = 0
    n = len(rest)
    while i < n:
        c = rest[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == "\\":
            i += 1
        elif c == '"':
            quoted = True
        elif c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
            if depth == 0:
                return rest[1:i], rest[i + 1 :]
        i += 1
    written = rest.rstrip()
    if quoted:
        raise _err(553, "5.0.0", written, "Unbalanced '\"'")
    raise _err(553, "5.0.0", written, "Unbalanced '<'")


def _scan_bare(rest: str) -> tuple[str, str]:
    """Split ``addr params`` (no brackets) at the first unquoted white space."""
    quoted = False
    i = 0
    n = len(rest)
    while i < n:
        c = rest[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == "\\":
            i += 1
        elif c == '"':
            quoted = True
        elif c.isspace():
            break
        elif c == ">":
            raise _err(553, "5.0.0", rest.split()[0], "Unbalanced '>'")
        i += 1
    if quoted:
        raise _err(553, "5.0.0", rest.rstrip(), "Unbalanced '\"'")
    return rest[:i], rest[i:]


_PARAM_KEY = re.compile("[A-Za-z0-9][A-Za-z0-9-]*")


def _parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for token in text.split():
        key, eq, value = token.partition("=")
        # esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-"), ASCII only.
        if _PARAM_KEY.fullmatch(key) is None:
            raise AddressError(Reply(501, "5.5.4", f"Syntax error in parameters: {token}"))
        key = key.upper()
        if key in params:
            # RFC 1869 4.1.2 lets a keyword appear once; "the last one wins" would let a
            # filter and the next hop read different values (Postfix and Sendmail refuse it).
            raise AddressError(Reply(501, "5.5.4", f"Duplicate {key} parameter"))
        params[key] = value if eq else None
    return params


def parse_path_arg(arg: str, keyword: str) -> tuple[str, dict[str, str | None]]:
    """Split the argument of MAIL/RCPT into the raw address and its ESMTP parameters.

    ``arg`` is the text after the verb (``"FROM:<a@b> SIZE=10"``); ``keyword`` is ``"FROM"`` or
    ``"TO"``. Parameter keys are upper-cased; a parameter without ``=`` maps to None.
    """
    k = len(keyword)
    if arg[k : k + 2] == ":<" and arg[:k].upper() == keyword.upper():
        # The usual "FROM:<addr>": no white space to skip, and nothing in the brackets that
        # could hide or nest a ">" (quotes, escapes, "<"), so the first ">" closes them, as
        # the scan below would find. Anything else, errors included, goes the general way.
        i = arg.find(">", k + 2)
        if i > 0:
            addr = arg[k + 2 : i]
            if '"' not in addr and "\\" not in addr and "<" not in addr and not _has_control(addr):
                tail = arg[i + 1 :]
                if not tail:
                    return addr, {}
                if tail[0].isspace():
                    return addr, _parse_params(tail)
    return _parse_path_arg_general(arg, keyword)


def _parse_path_arg_general(arg: str, keyword: str) -> tuple[str, dict[str, str | None]]:
    """parse_path_arg for any text (the fast path's definition)."""
    rest = _skipword(arg, keyword)
    if rest.startswith("<"):
        addr, tail = _scan_angle(rest)
        written = f"<{addr}>"
        # Sendmail's prescan accepts nested brackets (<<a@b>>); the innermost is the address.
        while addr.startswith("<") and addr.endswith(">"):
            addr = addr[1:-1]
        if tail and not tail[0].isspace():
            raise _err(553, "5.0.0", written + tail.split()[0], "Junk after '>'")
    else:
        addr, tail = _scan_bare(rest)
        written = addr
    if _has_control(addr):
        raise _err(553, "5.1.1", written, "Address contained invalid control characters")
    return addr, _parse_params(tail)


@dataclass(frozen=True)
class Mailbox:
    """A normalised mailbox: ``local`` as written (quotes kept), ``domain`` lower-case."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain


def _split_unquoted(s: str, sep: str, *, last: bool) -> int:
    """Index of the first/last ``sep`` outside quoted strings and backslash escapes, or -1."""
    if '"' not in s and "\\" not in s:
        return s.rfind(sep) if last else s.find(sep)
    found = -1
    quoted = False
    i = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif not quoted and c == sep:
            if not last:
                return i
            found = i
        i += 1
    return found


def _quotes_balanced(s: str) -> bool:
    if '"' not in s:
        return True
    quoted = False
    i = 0
    while i < len(s):
        if s[i] == "\\":
            i += 1
        elif s[i] == '"':
            quoted = not quoted
        i += 1
    return not quoted


def _valid_local(local: str) -> bool:
    """Dot-atom (lax about dots, UTF-8 allowed) or a quoted string, or a mix as Sendmail takes."""
    if _NOT_UTF8.search(local):
        return False
    if '"' not in local and "\\" not in local:
        return _LAX_ATOM.fullmatch(local) is not None
    quoted = False
    i = 0
    n = len(local)
    while i < n:
        c = local[i]
        if c == "\\":
            if i + 1 >= n:
                return False
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif not quoted and c not in _ATEXT and ord(c) < 0x80:
            return False
        i += 1
    return not quoted


def _literal(inner: str) -> str | None:
    """Canonical form of an address literal's inside, or None if invalid."""
    if inner[:5].lower() == "ipv6:":
        if "%" in inner:
            return None  # a scope id ("fe80::1%eth0"), which ipaddress takes: not RFC 5321's
        try:
            return "ipv6:" + str(ipaddress.IPv6Address(inner[5:]))
        except ValueError:
            return None
    try:
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        return None


def is_valid_domain(domain: str) -> bool:
    """A host name (labels of letters, digits, ``-``, ``_`` or UTF-8) or an address literal."""
    if len(domain) <= 255 and _PLAIN_HOST.fullmatch(domain) is not None:
        return True  # an ASCII host name: the checks below all pass
    if domain.startswith("[") and domain.endswith("]"):
        return _literal(domain[1:-1]) is not None
    d = domain[:-1] if domain.endswith(".") else domain
    if not d or len(d) > 255 or _NOT_UTF8.search(d) or _HOST_CHARS.fullmatch(d) is None:
        return False
    for label in d.split("."):
        if not label or label[0] == "-" or label[-1] == "-":
            return False
        if len(label) > 63 or (not label.isascii() and len(label.encode("utf-8")) > 63):
            return False
    return True


def canon_domain(domain: str) -> str | None:
    """Lower-case, no trailing dot; literals ``[192.0.2.1]`` / ``[ipv6:…]``; None if invalid."""
    if domain.startswith("[") and domain.endswith("]"):
        lit = _literal(domain[1:-1])
        return None if lit is None else f"[{lit}]"
    if not is_valid_domain(domain):
        return None
    return domain.rstrip(".").lower() if domain.endswith(".") else domain.lower()


def unquote_local(local: str) -> str:
    """The local part with quotes and backslash escapes removed (``"root"`` → ``root``)."""
    if '"' not in local and "\\" not in local:
        return local
    out: list[str] = []
    i = 0
    while i < len(local):
        c = local[i]
        if c == "\\" and i + 1 < len(local):
            out.append(local[i + 1])
            i += 2
            continue
        if c != '"':
            out.append(c)
        i += 1
    return "".join(out)


class RouteError(ValueError):
    """A local part holding routing characters that do not name a usable host: ``host`` is
    the invalid host text, or None when a side is empty (``user%``, ``!user``)."""

    def __init__(self, host: str | None) -> None:
        super().__init__(host or "empty route")
        self.host = host


# Sender-specified routing in a local part: "user@host" (quoted or escaped), UUCP "host!user",
# the "%-hack" "user%host".
ROUTING_CHARS = frozenset("@!%")


def _quote_local(text: str) -> str:
    """``text`` as a local part: bare when it is a dot-atom, else a quoted string."""
    if text and _valid_local(text) and '"' not in text and "\\" not in text:
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def route_step(local: str) -> tuple[str, str] | None:
    """The outermost hop of sender-specified routing in a local part: ``(rest, host)``, the
    rest re-quoted where it needs it, the host canonical; None when the local part routes
    nowhere. Quotes and escapes do not hide routing (``"u@other"`` and ``u\\@other`` name
    other). Precedence as Sendmail's ruleset 3: the last ``@``, else the first ``!``, else
    the last ``%``. Raises :class:`RouteError` for a route that names no valid host."""
    text = unquote_local(local)
    if not ROUTING_CHARS.intersection(text):
        return None
    if "@" in text:
        user, _, host = text.rpartition("@")
    elif "!" in text:
        host, _, user = text.partition("!")
    else:
        user, _, host = text.rpartition("%")
    if not user or not host:
        raise RouteError(None)
    canon = canon_domain(host)
    if canon is None:
        raise RouteError(host)
    return _quote_local(user), canon


def routed_hosts(local: str) -> tuple[str, ...]:
    """Every host that sender-specified routing in ``local`` names, outermost first:
    ``u%b%a`` → ``("a", "b")``. Raises :class:`RouteError` for a malformed route."""
    hosts: list[str] = []
    step = route_step(local)
    while step is not None:
        local, host = step
        hosts.append(host)
        step = route_step(local)
    return tuple(hosts)


def normalize(raw: str, is_local: Callable[[str], bool], *, written: str | None = None) -> Mailbox:
    """Turn a raw path (without brackets) into a :class:`Mailbox` as Sendmail would.

    ``is_local(domain)`` says whether a (lower-case) domain is one of ours, for the ``%``-hack;
    it is called with ``""`` for an unqualified address.
    ``written`` is the address as the client wrote it, for error texts (default ``<raw>``).
    """
    plain = _PLAIN_MAILBOX.fullmatch(raw)
    if plain is not None and len(raw) <= _MAXADDR:
        # ASCII dot-atom @ ASCII host name, within the length limit: every check below
        # passes (one "@", no quotes, no control, valid labels), no routing character means
        # no route to resolve whatever is_local says, and the result is no longer than raw.
        local, host = plain.groups()
        return Mailbox(local, host.lower())
    return _normalize_general(raw, is_local, written)


def _normalize_general(raw: str, is_local: Callable[[str], bool], written: str | None) -> Mailbox:
    """normalize for any text (the fast path's definition)."""
    shown = written if written is not None else f"<{raw}>"
    if raw == "":
        return Mailbox("", "")
    if raw == "@":
        raise _err(553, "5.1.3", shown, "List:; syntax illegal for recipient addresses")
    if _has_control(raw):
        raise _err(553, "5.1.1", shown, "Address contained invalid control characters")
    if len(raw.encode("utf-8", "surrogateescape")) > _MAXADDR:
        raise _err(553, "5.1.0", shown, f"Address too long ({_MAXADDR} bytes max)")
    if not _quotes_balanced(raw):
        raise _err(553, "5.0.0", shown, "Unbalanced '\"'")
    addr = raw
    # Source route "@a,@b:user@dom": only the mailbox after the last route colon counts.
    if addr.startswith("@"):
        colon = _split_unquoted(addr, ":", last=False)
        if colon < 0:
            raise _err(553, "5.1.3", shown, "User address required")
        addr = addr[colon + 1 :]
        if not addr:
            raise _err(553, "5.1.3", shown, "User address required")
    at = _split_unquoted(addr, "@", last=True)
    if at < 0:
        local, domain = addr, ""
    else:
        local, domain = addr[:at], addr[at + 1 :]
        if not domain:
            raise _err(553, "5.1.3", shown, "Hostname required")
    if not local:
        raise _err(553, "5.1.3", shown, "User address required")
    canon = canon_domain(domain) if domain else ""
    if canon is None:
        raise _err(553, "5.1.2", shown, "Invalid host name")
    if _split_unquoted(local, "@", last=False) >= 0:
        raise _err(553, "5.1.3", shown, "Invalid route address")
    # Sender-specified routing behind one of our names ("" = unqualified, which is_local
    # decides) is resolved as Sendmail's ruleset 3 does: "user%other", "other!user" and
    # "\"user@other\"" mean user@other, again while the new host is ours too. Bounded: each
    # pass takes a host out of the local part.
    while is_local(canon):
        try:
            step = route_step(local)
        except RouteError as exc:
            if exc.host is None:
                break  # an empty side ("user%", "!user"): a user name, not a route
            raise _err(553, "5.1.2", shown, "Invalid host name") from None
        if step is None:
            break
        local, canon = step
    if not _valid_local(local):
        raise _err(553, "5.1.3", shown, "Invalid local part")
    mailbox = Mailbox(local, canon)
    if len(str(mailbox).encode("utf-8", "surrogateescape")) > _MAXADDR:
        # Resolving a route re-quotes what is left (h!u\ gives "u\\"@h, 3 bytes more): the
        # result keeps the input's limit (RFC 5321 4.5.3.1.3), so normalize() accepts its own
        # output and no next hop gets a longer path than we would take.
        raise _err(553, "5.1.0", shown, f"Address too long ({_MAXADDR} bytes max)")
    return mailbox
