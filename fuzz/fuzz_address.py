#!/usr/bin/env python3
"""atheris target: MAIL/RCPT arguments and address normalisation (mailgate.address).

Byte 0 chooses the local domains (for the %-hack), byte 1 whether the rest is a MAIL/RCPT
argument (parse_path_arg, then normalize) or a raw path (normalize); the rest is decoded as
the protocol decodes a command line (UTF-8, surrogateescape). Only AddressError with a
well-formed 5xx reply may be raised; a Mailbox must be valid and canonical, with no unquoted
"@" in its local part, which normalize gives back from its own text, and the hosts its
local part routes to (routed_hosts, what the relay check reads) are valid and canonical.
"""

from __future__ import annotations

import sys

import _setup  # noqa: F401  (sys.path)
import atheris
from atheris.import_hook import instrument_imports

with instrument_imports(include=["mailgate"]):
    import mailgate.address
    import mailgate.reply  # noqa: F401

from tests.reliability.fuzz_support import CONTROL, check_address_error, check_mailbox

from mailgate.address import (
    AddressError,
    RouteError,
    canon_domain,
    is_valid_domain,
    normalize,
    parse_path_arg,
    routed_hosts,
)

CANDIDATES = ("", "gateway.example", "localhost", "targetdomain1.com", "foreign.example")


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    local = frozenset(d for i, d in enumerate(CANDIDATES) if data[0] >> i & 1)
    text = data[2:].decode("utf-8", "surrogateescape")
    is_local = local.__contains__
    raw = text
    if data[1] & 3:
        keyword = "FROM" if data[1] & 1 else "TO"
        try:
            raw, params = parse_path_arg(text, keyword)
        except AddressError as exc:
            check_address_error(exc)
            return
        assert not CONTROL.search(raw), raw
        assert all(k == k.upper() for k in params), params
    try:
        mb = normalize(raw, is_local)
    except AddressError as exc:
        check_address_error(exc)
        return
    check_mailbox(mb, raw)
    again = normalize(str(mb), is_local)
    assert again == mb, (raw, mb, again)
    try:
        hosts = routed_hosts(mb.local)  # what the relay check reads
    except RouteError:
        return
    assert all(is_valid_domain(h) and canon_domain(h) == h for h in hosts), (mb, hosts)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
