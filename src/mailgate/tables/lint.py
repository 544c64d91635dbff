"""``mailgate check``: lines that are legal but surely not what the admin meant (semantics §18).

Each warning names file and line. The result also carries the warnings found while loading
(trailing-dot keys, duplicates), so one call gives the whole list.
"""

from __future__ import annotations

from mailgate.tables import Tables
from mailgate.tables.maps import TableWarning

__all__ = ["lint"]

_TO_IGNORED = frozenset({"REJECT", "DISCARD", "ERROR"})


def _nocode(text: str) -> bool:
    """True when an ``error:`` text carries no reply code: Sendmail's 553 5.3.0 misparse."""
    words = text.strip().strip('"').split()
    if not words:
        return True
    head = words[0]
    if ":" in head and head.count(".") == 2:
        return False
    if head.lower() in {"nouser", "tempfail", "unavailable", "nohost", "noperm", "software"}:
        return len(words) < 2 or not (words[1].isdigit() and len(words[1]) == 3)
    return not (head.isdigit() and len(head) == 3)


def lint(tables: Tables, *, blocklist_recipients: bool) -> list[TableWarning]:
    out: list[TableWarning] = list(tables.warnings)
    access = tables.access
    apath = access.path or "access"
    local = tables.local_names

    # mailertable keys for local domains: Sendmail delivers locally and never looks (§18.3).
    mt = tables.mailertable
    for key in mt.domain_keys():
        route = mt.route_for_key(key)
        if route is None:
            continue
        if key in local:
            out.append(
                TableWarning(
                    mt.path or "mailertable",
                    route.line,
                    f"{key}: local-host-names lists it, so mailertable line {route.line} is"
                    " never used, as in Sendmail (mail for it is delivered locally)",
                )
            )
    for e in mt.entries:
        mailer, _, rest = e.value.partition(":")
        if mailer.lower() == "error" and _nocode(rest):
            out.append(
                TableWarning(
                    mt.path or "mailertable",
                    e.line,
                    f"{e.key}: error:{rest} has no reply code, so the reply is"
                    f" '553 5.3.0 {rest.strip()}'; write e.g. error:5.1.2:550 <text>",
                )
            )

    vt = tables.virtusers
    for e in vt.entries():
        if e.value[:6].lower() == "error:" and _nocode(e.value[6:]):
            out.append(
                TableWarning(
                    vt.path or "virtusertable",
                    e.line,
                    f"{e.key}: {e.value} has no reply code, so the reply is"
                    f" '553 5.3.0 {e.value[6:].strip()}'; write e.g. error:5.1.1:550 <text>",
                )
            )
        domain = e.key.rpartition("@")[2].lower().rstrip(".")
        if domain not in local:
            out.append(
                TableWarning(
                    vt.path or "virtusertable",
                    e.line,
                    f"{e.key}: {domain} is not in local-host-names, so this line is never used"
                    " (virtusertable applies to local domains only)",
                )
            )

    for tag, key, v in access.entries():
        where = (apath, v.line)
        if tag == "to":
            if v.action in _TO_IGNORED and not blocklist_recipients:
                out.append(
                    TableWarning(
                        *where,
                        f"{v.key} {v.action} is ignored: To: rejections need"
                        " blocklist_recipients, which is off (as in the Sendmail setup)",
                    )
                )
            elif v.action == "OK":
                out.append(TableWarning(*where, f"{v.key} OK has no effect for To: (use RELAY?)"))
        elif tag == "from" and v.action == "RELAY":
            out.append(
                TableWarning(
                    *where,
                    f"{v.key} RELAY has no effect for From: (it does not let the sender relay;"
                    " use Connect:<client> RELAY)",
                )
            )
        elif tag == "spam":
            out.append(
                TableWarning(
                    *where,
                    f"{v.key} is ignored: Spam: entries need delay_checks, which is not used",
                )
            )
        elif tag == "connect" and "@" in key:
            out.append(
                TableWarning(
                    *where,
                    f"{v.key} never matches: Connect: keys are client addresses or host names",
                )
            )
        if tag in ("to", "") and v.action == "RELAY" and key in local:
            out.append(
                TableWarning(
                    *where,
                    f"{v.key} RELAY is pointless: {key} is in local-host-names, so mail for it"
                    " is local and needs no relay permission",
                )
            )

    for domain in sorted(tables.relay_domains & local):
        out.append(
            TableWarning(
                "relay-domains",
                None,
                f"{domain} is also in local-host-names, so it is local and relay-domains"
                " has no effect for it",
            )
        )

    seen: set[str] = set()
    unique: list[TableWarning] = []
    for w in out:
        s = str(w)
        if s not in seen:
            seen.add(s)
            unique.append(w)
    return unique
