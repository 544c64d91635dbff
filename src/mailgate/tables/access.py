"""Sendmail's access database (FEATURE(access_db)): tagged keys → verdicts (semantics §3, §4).

Keys are parsed once into one plain dict per tag (``""`` = untagged), so a lookup is a handful
of dict probes: IPv4 drops one octet at a time, IPv6 one group at a time, names climb to their
parents. At each level the tagged key is tried before the untagged one, and the first entry
found ends the search; ``SKIP`` ends it as if nothing had matched.
"""

from __future__ import annotations

import gc
import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from mailgate.tables.maps import (
    ErrorValue,
    MapEntry,
    TableError,
    TableWarning,
    iter_map,
    parse_error_value,
)

__all__ = ["TAGS", "AccessTable", "Verdict"]

# Tag names as Sendmail's rulesets spell them, keyed by their lower-case form.
TAGS = {
    "connect": "Connect",
    "from": "From",
    "to": "To",
    "spam": "Spam",
    "greetpause": "GreetPause",
}
_ACTIONS = frozenset({"OK", "RELAY", "REJECT", "DISCARD", "SKIP"})
_SPAM_ACTIONS = frozenset({"FRIEND", "HATER"})
_HEX = frozenset("0123456789abcdef")
_IPV4_CHARS = frozenset("0123456789.")


@dataclass(frozen=True)
class Verdict:
    """What an access entry says; ``key`` is the key as written (with tag), ``line`` its line."""

    action: str  # OK | RELAY | REJECT | DISCARD | ERROR (GreetPause: PAUSE, Spam: FRIEND | HATER)
    error: ErrorValue | None
    key: str
    line: int
    value: int | None = None  # GreetPause milliseconds


# Stored per key: (action, error, key as written, line, pause ms). Tuples, not Verdicts, so a
# million-line table loads fast; the Verdict is built only for the entry a lookup returns.
_Stored = tuple[str, ErrorValue | None, str, int, int | None]


def _verdict(s: _Stored) -> Verdict:
    return Verdict(s[0], s[1], s[2], s[3], s[4])


def _ipv6_prefix_key(body: str) -> str | None:
    """Canonical form of an ``IPv6:`` key body: a full address or a prefix of whole groups."""
    try:
        return ipaddress.IPv6Address(body).compressed
    except ValueError:
        pass
    trimmed = body.rstrip(":")
    if not trimmed or "::" in trimmed:
        return None
    groups = trimmed.split(":")
    if len(groups) > 7 or not all(0 < len(g) <= 4 and set(g) <= _HEX for g in groups):
        return None
    return ":".join(g.lstrip("0") or "0" for g in groups)


@lru_cache(maxsize=4096)
def _ip_keys(ip: str) -> tuple[str, ...]:
    """The keys to try for a client address, most specific first; () if not an address."""
    if ":" not in ip:
        if not ip or not set(ip) <= _IPV4_CHARS:
            return ()
        keys = [ip]
        k = ip
        while True:
            k, sep, _ = k.rpartition(".")
            if not sep or not k:
                break
            keys.append(k)
        return tuple(keys)
    try:
        addr = ipaddress.IPv6Address(
            ip.split("%", 1)[0].removeprefix("IPv6:").removeprefix("ipv6:")
        )
    except ValueError:
        return ()
    if addr.ipv4_mapped is not None:
        return _ip_keys(str(addr.ipv4_mapped))
    groups = [g.lstrip("0") or "0" for g in addr.exploded.split(":")]
    keys = ["ipv6:" + addr.compressed]
    keys.extend("ipv6:" + ":".join(groups[:n]) for n in range(7, 0, -1))
    return tuple(keys)


def _name_keys(name: str, exact: bool) -> list[str]:
    k = name.lower()
    if k.endswith("."):
        k = k[:-1]
    if not k:
        return []
    if exact:
        return [k]
    keys = [k]
    while True:
        _, sep, k = k.partition(".")
        if not sep or not k:
            return keys
        keys.append(k)


class AccessTable:
    """The parsed access db; immutable after loading."""

    def __init__(self, path: str = "") -> None:
        self.path = path
        self._maps: dict[str, dict[str, _Stored]] = {tag: {} for tag in ("", *TAGS)}
        self.warnings: list[TableWarning] = []
        self._size = 0
        self._connect_view: dict[str, _Stored] = {}

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path | None) -> AccessTable:
        table = cls(str(path) if path is not None else "")
        table._add_all(iter_map(path))
        return table

    @classmethod
    def from_entries(cls, entries: Iterable[MapEntry], path: Path | str = "") -> AccessTable:
        table = cls(str(path))
        table._add_all((e.line, e.key, e.value) for e in entries)
        return table

    def _add_all(self, rows: Iterable[tuple[int, str, str]]) -> None:
        maps = self._maps
        untagged = maps[""]
        # Values repeat massively in big tables ("REJECT", one ERROR text): parse each once.
        parsed: dict[str, dict[str, tuple[str, ErrorValue | None, int | None]]] = {
            "": {},
            "greetpause": {},
            "spam": {},
        }
        plain = parsed[""]
        count = 0
        # A million new tuples would trigger the cyclic GC over and over; none can form a
        # cycle, so collection is paused while building (it is the biggest single cost).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            count = self._fill(rows, maps, untagged, parsed, plain)
        finally:
            if gc_was_enabled:
                gc.enable()
        self._size += count
        # Connect lookups probe one merged dict (tagged entries win, as they are tried first
        # at each level): the hot path of every new connection.
        conn = maps["connect"]
        self._connect_view = {**untagged, **conn} if untagged and conn else (conn or untagged)

    def _fill(
        self,
        rows: Iterable[tuple[int, str, str]],
        maps: dict[str, dict[str, _Stored]],
        untagged: dict[str, _Stored],
        parsed: dict[str, dict[str, tuple[str, ErrorValue | None, int | None]]],
        plain: dict[str, tuple[str, ErrorValue | None, int | None]],
    ) -> int:
        path = self.path
        tags = TAGS
        count = 0
        for no, key, value in rows:
            d = untagged
            tag = ""
            rest = key
            colon = key.find(":")
            if colon > 0:
                t = key[:colon].lower()
                if t in tags:
                    tag, rest, d = t, key[colon + 1 :], maps[t]
            rest = rest.lower()
            if not rest:
                raise TableError(path, no, f"{key}: empty key after the tag")
            if rest[-1] == ".":
                self._trailing_dot(no, key, rest)
            elif rest.startswith("ipv6:"):
                canon = _ipv6_prefix_key(rest[5:])
                if canon is None:
                    raise TableError(path, no, f"{key}: not an IPv6 address or prefix")
                if rest.endswith("::"):
                    self.warnings.append(
                        TableWarning(
                            path,
                            no,
                            f"{key} matches the single address {canon} only; for the network"
                            f" write IPv6:{rest[5:].rstrip(':')}",
                        )
                    )
                rest = "ipv6:" + canon
            cache = plain if tag in ("", "connect", "from", "to") else parsed[tag]
            v = cache.get(value)
            if v is None:
                v = cache[value] = self._parse_value(tag, key, value, no)
            new = (v[0], v[1], key, no, v[2])
            first = d.setdefault(rest, new)
            if first is not new:
                self.warnings.append(
                    TableWarning(
                        path, no, f"duplicate key {key}: line {first[3]} is used (as makemap does)"
                    )
                )
                continue
            count += 1
        return count

    def _trailing_dot(self, no: int, key: str, rest: str) -> None:
        # Stored verbatim (no client key ends in a dot, so it never matches, as in Sendmail).
        fixed = key[:-1]
        if set(rest) <= _IPV4_CHARS:
            msg = (
                f"{key} never matches: Sendmail ignores IPv4 keys ending in a dot;"
                f" write {fixed} to match the whole network"
            )
        else:
            msg = f"{key} never matches: access keys take no trailing dot; write {fixed}"
        self.warnings.append(TableWarning(self.path, no, msg))

    def _parse_value(
        self, kind: str, key: str, value: str, no: int
    ) -> tuple[str, ErrorValue | None, int | None]:
        """(action, error, pause ms) for a value; ``kind`` is the tag (greetpause, spam matter)."""
        up = value.upper()
        if kind == "greetpause":
            if not value.isdigit():
                raise TableError(self.path, no, f"{key}: GreetPause value must be milliseconds")
            return "PAUSE", None, int(value)
        if up in _ACTIONS or (kind == "spam" and up in _SPAM_ACTIONS):
            return up, None, None
        if up.startswith("ERROR:"):
            text = value[6:]
        elif value[:3].isdigit() and value[:1] in "45":
            # Sendmail's "generic error": any other value starting with a reply code.
            text = value
        elif up.startswith("QUARANTINE:"):
            raise TableError(
                self.path, no, f"{key}: QUARANTINE is not supported by mailgate; use REJECT"
            )
        else:
            raise TableError(
                self.path,
                no,
                f"{key}: unknown value {value!r} (expected OK, RELAY, REJECT, DISCARD, SKIP"
                " or ERROR:D.S.N:NNN text)",
            )
        try:
            return "ERROR", parse_error_value(text), None
        except ValueError as exc:
            raise TableError(self.path, no, f"{key}: {exc}") from None

    # -- lookups -------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._size

    def _chain(self, tag: str, untagged: bool = True) -> tuple[dict[str, _Stored], ...]:
        # Empty dicts are left out: with no Connect: entries, a connect lookup probes one dict.
        dicts = (self._maps[tag], self._maps[""]) if untagged else (self._maps[tag],)
        return tuple(d for d in dicts if d)

    @staticmethod
    def _probe(dicts: tuple[dict[str, _Stored], ...], keys: Iterable[str]) -> _Stored | None:
        """The first entry found (SKIP included); tagged before untagged at each level."""
        for k in keys:
            for d in dicts:
                s = d.get(k)
                if s is not None:
                    return s
        return None

    def _search(self, tag: str, ip: str | None, name: str | None, exact: bool) -> _Stored | None:
        """Host name (with parents unless ``exact``) first, then the IP: Sendmail's D then A.

        A SKIP ends the search in that dimension only, so the IP is still looked up.
        """
        dicts = self._chain(tag, untagged=tag != "greetpause")
        if not dicts:
            return None
        if name:
            s = self._probe(dicts, _name_keys(name, exact))
            if s is not None and s[0] != "SKIP":
                return s
        if ip:
            s = self._probe(dicts, _ip_keys(ip))
            if s is not None and s[0] != "SKIP":
                return s
        return None

    def connect(self, ip: str, hostname: str | None) -> Verdict | None:
        """``Connect:`` then untagged: the client's host name and its parents, then its IP."""
        if hostname or ":" in ip:
            s = self._search("connect", ip, hostname, exact=False)
            return None if s is None else _verdict(s)
        # The hot path, an IPv4 client without PTR name: probe the octet prefixes inline.
        get = self._connect_view.get
        i = len(ip)
        while i > 0:
            s = get(ip[:i])
            if s is not None:
                return None if s[0] == "SKIP" else _verdict(s)
            i = ip.rfind(".", 0, i)
        return None

    def client_relay(self, ip: str, hostname: str | None, exact_names: bool) -> bool:
        """Does a RELAY entry (``Connect:`` or untagged) cover the client IP or its name?

        The name is used exactly under relay_hosts_only (``exact_names``), else with parents.
        Only the first entry found counts: ``Connect:10.1 OK`` hides an untagged ``10 RELAY``.
        """
        dicts = self._chain("connect")
        if not dicts:
            return False
        s = self._probe(dicts, _ip_keys(ip))
        if s is not None and s[0] == "RELAY":
            return True
        if hostname:
            s = self._probe(dicts, _name_keys(hostname, exact_names))
            if s is not None and s[0] == "RELAY":
                return True
        return False

    def _address(self, tag: str, local: str, domain: str, *, user: bool = True) -> _Stored | None:
        """Sendmail's SearchList: full address, ``user@`` (unless ``user`` is false), then
        the domain climbing.

        The first entry found ends the search; a SKIP there means "no entry".
        """
        dicts = self._chain(tag)
        if not dicts:
            return None
        if not local and not domain:
            s = self._probe(dicts, ("<>",))
        else:
            local = local.lower()
            domain = domain.lower()
            keys: list[str] = [f"{local}@{domain}"] if domain else []
            if user or not domain:
                keys.append(f"{local}@")
            if domain.startswith("[") and domain.endswith("]"):
                # An address-literal domain: the literal key, then the IP with its prefixes.
                keys.append(domain)
                keys.extend(_ip_keys(domain[1:-1]))
            elif domain:
                keys.extend(_name_keys(domain, exact=False))
            s = self._probe(dicts, keys)
        return None if s is None or s[0] == "SKIP" else s

    def sender(self, local: str, domain: str) -> Verdict | None:
        """``From:`` then untagged: ``user@domain``, ``user@``, then the domain and parents.

        The null sender (``""``, ``""``) looks up ``From:<>``.
        """
        s = self._address("from", local, domain)
        return None if s is None else _verdict(s)

    def recipient(self, local: str, domain: str, *, is_local: bool) -> Verdict | None:
        """``To:`` then untagged, in the sender's order (used with blocklist_recipients), but
        ``user@`` only for a local domain (class w) or none: Sendmail's blocklist_recipients
        rules ask ``U:user@`` of local recipients only, so ``To:guest@`` blocks
        guest@ourselves and not guest@ a domain we relay to."""
        s = self._address("to", local, domain, user=is_local)
        return None if s is None else _verdict(s)

    def recipient_domain_relay(self, domain: str, exact_names: bool) -> bool:
        """``To:dom RELAY`` or untagged ``dom RELAY`` (exact name under relay_hosts_only)."""
        dicts = self._chain("to")
        if not dicts:
            return False
        s = self._probe(dicts, _name_keys(domain, exact_names))
        return s is not None and s[0] == "RELAY"

    def greet_pause(self, ip: str, hostname: str | None) -> int | None:
        """Milliseconds from ``GreetPause:`` keys (name and parents, then IP); None: default."""
        s = self._search("greetpause", ip, hostname, exact=False)
        return None if s is None else s[4]

    # -- for lint ------------------------------------------------------------------------

    def entries(self, tag: str | None = None) -> Iterator[tuple[str, str, Verdict]]:
        """(tag, canonical key, verdict) of every entry, or of one tag (``""`` = untagged)."""
        tags = [tag.lower()] if tag is not None else list(self._maps)
        for t in tags:
            for k, s in self._maps.get(t, {}).items():
                yield t, k, _verdict(s)
