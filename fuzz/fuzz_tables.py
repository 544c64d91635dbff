#!/usr/bin/env python3
"""atheris target: every Sendmail table parser (mailgate.tables).

Byte 0 chooses the file (access, mailertable, virtusertable, domaintable, aliases,
local-host-names, relay-domains, or an aliases :include: list); the rest is written to it
as it is. Loading gives a table or a TableError naming an existing, non-blank file:line;
on a table, the lookups the session makes and ``mailgate check``'s lint never raise.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import _setup  # noqa: F401  (sys.path)
import atheris
from atheris.import_hook import instrument_imports

with instrument_imports(include=["mailgate"]):
    import mailgate.address
    import mailgate.tables
    import mailgate.tables.lint  # noqa: F401

from tests.reliability.fuzz_support import check_table_error

from mailgate.tables import Tables
from mailgate.tables.access import AccessTable
from mailgate.tables.aliases import AliasTable, read_include
from mailgate.tables.domaintable import DomainTable
from mailgate.tables.lint import lint
from mailgate.tables.localnames import read_names
from mailgate.tables.mailertable import MailerTable
from mailgate.tables.maps import TableError
from mailgate.tables.virtusers import VirtUserTable

KINDS = (
    ("access", AccessTable.load, "access"),
    ("mailertable", MailerTable.load, "mailertable"),
    ("virtusertable", VirtUserTable.load, "virtusers"),
    ("domaintable", DomainTable.load, "domaintable"),
    ("aliases", AliasTable.load, "aliases"),
    ("local-host-names", read_names, "local_names"),
    ("relay-domains", read_names, "relay_domains"),
    ("include.list", read_include, None),
)
QUERIES = (
    ("192.0.2.1", None, "user", "example.com"),
    ("2001:db8::5", "host.example.com", "User+tag", "sub.example.com"),
    ("10.1.2.3", "a..b", "", ""),
)


def work_dir() -> Path:
    """A folder for the table files, in memory where there is /dev/shm. libFuzzer ends the
    process without running exit handlers, so each run removes what dead runs left."""
    base = Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    for old in base.glob("mailgate-fuzz-tables-*"):
        try:
            os.kill(int(old.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(old, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's
    path = base / f"mailgate-fuzz-tables-{os.getpid()}"
    path.mkdir(exist_ok=True)
    return path


DIR = work_dir()


def with_table(field: str, table: Any) -> Tables:
    """Empty tables but this one (lint and lookups see it as load_tables() would give it)."""
    kw: dict[str, Any] = {field: table}
    return dataclasses.replace(Tables.empty(), **kw)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    name, load, field = KINDS[data[0] % len(KINDS)]
    body = data[1:]
    path = DIR / name
    path.write_bytes(body)
    try:
        table = load(path)
    except TableError as exc:
        check_table_error(exc, path, body)
        return
    if field is None:
        return
    tables = with_table(field, table)
    for blocklist in (False, True):
        lint(tables, blocklist_recipients=blocklist)
    for ip, host, local, domain in QUERIES:
        tables.access.connect(ip, host)
        tables.access.client_relay(ip, host, exact_names=False)
        tables.access.sender(local, domain)
        tables.access.recipient(local, domain)
        tables.access.recipient_domain_relay(domain, exact_names=True)
        tables.access.greet_pause(ip, host)
        tables.mailertable.lookup(domain)
        tables.virtusers.lookup(local, domain)
        tables.domaintable.rewrite(domain)
        tables.aliases.lookup(local)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
