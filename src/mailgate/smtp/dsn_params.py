"""The SMTP DSN extension's parameters (RFC 3461): RET and ENVID on MAIL, NOTIFY and ORCPT on
RCPT, and the xtext encoding they travel in. Pure functions: each check returns the reply for a
bad value, or None."""

from __future__ import annotations

import re
from collections.abc import Callable

from mailgate.reply import Reply

_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")
_PLAIN = re.compile(r"[!-*,-<>-~]*")
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
_NOTIFY_WORDS = {"SUCCESS", "FAILURE", "DELAY"}
MAX_ENVID = 100
MAX_ORCPT = 500


def xtext_decode(text: str) -> str:
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def xtext_encode(text: str) -> str:
    """``text`` as xtext: "+", "=", controls, space and non-ASCII as +XX (UTF-8 bytes)."""
    if _PLAIN.fullmatch(text):
        return text  # the usual address: nothing to escape
    out = []
    for ch in text:
        if "!" <= ch <= "~" and ch not in "+=":
            out.append(ch)
        else:
            out.extend(f"+{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def check_ret(value: str | None) -> Reply | None:
    if (value or "").upper() not in ("FULL", "HDRS"):
        return Reply(501, "5.5.4", f'Bad argument "{value or ""}" for RET; use FULL or HDRS')
    return None


def check_envid(value: str | None) -> Reply | None:
    if not value or len(value) > MAX_ENVID or not _XTEXT.fullmatch(value):
        return Reply(501, "5.5.4", "Bad ENVID parameter (xtext of at most 100 characters)")
    return None


def check_notify(value: str | None) -> Reply | None:
    words = (value or "").upper().split(",")
    if words == ["NEVER"] or (set(words) <= _NOTIFY_WORDS and len(set(words)) == len(words)):
        return None
    return Reply(
        501,
        "5.5.4",
        f'Bad argument "{value or ""}" for NOTIFY; use NEVER or SUCCESS, FAILURE, DELAY',
    )


# RFC 6533 3: a "utf-8" address is utf-8-addr-unitext (raw UTF-8, with SMTPUTF8) or
# utf-8-addr-xtext: printable ASCII but "+", "=" and "\", and \x{HEX} for any other character.
_UTF8_ADDR = re.compile(r"(?:[!-*,-<>-\[\]-~\u0080-\U0010ffff]|\\x\{[0-9A-Fa-f]{1,6}\})+")
_EMBEDDED = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def check_orcpt(value: str | None) -> Reply | None:
    addr_type, semi, addr = (value or "").partition(";")
    if not semi or not _ATOM.fullmatch(addr_type) or not addr or len(value or "") > MAX_ORCPT:
        return Reply(501, "5.5.4", "Bad ORCPT parameter (addr-type;xtext)")
    if addr_type.lower() == "utf-8":
        if not _UTF8_ADDR.fullmatch(addr) or not _embedded_ok(addr):
            return Reply(501, "5.5.4", "Bad ORCPT parameter (utf-8;address, RFC 6533)")
    elif not _XTEXT.fullmatch(addr):
        return Reply(501, "5.5.4", "Bad ORCPT parameter (addr-type;xtext)")
    return None


def _embedded_ok(addr: str) -> bool:
    """Every \\x{HEX} names a Unicode scalar value (no NUL, no surrogate)."""
    return all(
        0 < (n := int(h, 16)) <= 0x10FFFF and not 0xD800 <= n <= 0xDFFF
        for h in _EMBEDDED.findall(addr)
    )


def orcpt_ascii(orcpt: str) -> str:
    """An ORCPT fit for a next hop without SMTPUTF8: a utf-8 address's raw characters become
    \\x{HEX} (RFC 6533's utf-8-addr-xtext); other types are xtext already."""
    addr_type, _, addr = orcpt.partition(";")
    if addr.isascii():
        return orcpt
    return f"{addr_type};" + "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in addr)


# The parameter checks by keyword, for the MAIL and RCPT commands.
MAIL_CHECKS: dict[str, Callable[[str | None], Reply | None]] = {
    "RET": check_ret,
    "ENVID": check_envid,
}
RCPT_CHECKS: dict[str, Callable[[str | None], Reply | None]] = {
    "NOTIFY": check_notify,
    "ORCPT": check_orcpt,
}


def orcpt_for(given: str | None, original: str) -> str | None:
    """The ORCPT to pass on to a DSN-aware next hop: the client's, else the address as first
    written (RFC 3461 4.2), when it is plain ASCII."""
    if given:
        return given
    if original and original.isascii():
        return "rfc822;" + xtext_encode(original)
    return None


def orcpt_text(orcpt: str) -> str:
    """An ORCPT value as a DSN's Original-Recipient field shows it: "rfc822;bob@example.org"
    (a utf-8 address with its \\x{HEX} escapes decoded, RFC 6533 3)."""
    addr_type, _, addr = orcpt.partition(";")
    if addr_type.lower() == "utf-8":
        return f"{addr_type};" + _EMBEDDED.sub(lambda m: chr(int(m.group(1), 16)), addr)
    return f"{addr_type};{xtext_decode(addr)}"
