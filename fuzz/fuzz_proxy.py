#!/usr/bin/env python3
"""atheris target: the PROXY protocol parser (mailgate.smtp.proxy).

Byte 0 chooses which versions the listener takes (v1, v2, any); the rest is what the proxy
sends. Each input must pass ``check_proxy``: a header, None or ProxyError and nothing else,
a header read from its own bytes alone, the same byte by byte. See README.md here.
"""

from __future__ import annotations

import sys

import _setup  # noqa: F401  (sys.path)
import atheris
from atheris.import_hook import instrument_imports

with instrument_imports(include=["mailgate"]):
    import mailgate.smtp.proxy  # noqa: F401

from mailgate.smtp.proxy import Versions
from tests.reliability.fuzz_support import check_proxy

VERSIONS: tuple[Versions, ...] = ("v1", "v2", "any")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    check_proxy(data[1:], VERSIONS[data[0] % len(VERSIONS)])


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
