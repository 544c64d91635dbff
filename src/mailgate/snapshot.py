"""One immutable view of settings + tables; reload builds a new one and swaps a reference.

Sessions keep the snapshot they started with, so a SIGHUP never changes the rules in the middle
of a transaction.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mailgate import maillog
from mailgate.config import Config, ConfigError, load_config
from mailgate.delivery.uucp import uux_warnings
from mailgate.errors import SourceError
from mailgate.routing import RoutingContext, class_w
from mailgate.tables import TABLE_FILES, Tables, load_tables
from mailgate.tables.lint import lint
from mailgate.tables.maps import TableError, TableWarning
from mailgate.users import resolve_local_user

if TYPE_CHECKING:
    from mailgate.policy import Client, ConnectDecision


@dataclass(frozen=True)
class Snapshot:
    config: Config
    tables: Tables
    routing: RoutingContext
    # What `mailgate check` prints and `mailgate status` shows of the running daemon: the
    # same figure means the same files, node file, variables and tables (`generation`).
    generation: str = ""
    # The connect stage's decision by client, made once per client and snapshot (it is a
    # pure function of the two, asked at every connection: smtp/server.py). Not an init
    # field, so dataclasses.replace() starts a new one.
    connect_decisions: dict[Client, ConnectDecision] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def warnings(self) -> list[TableWarning]:
        seen: set[str] = set()
        out = []
        for w in [
            *self.tables.warnings,
            *lint(self.tables, blocklist_recipients=self.config.access.blocklist_recipients),
            *uux_warnings(self.tables, self.config),
        ]:
            if str(w) not in seen:
                seen.add(str(w))
                out.append(w)
        return out


def build_snapshot(config: Config) -> Snapshot:
    """Load every table named by ``config``; raises TableError naming file and line."""
    tables = Tables.empty() if config.tables_dir is None else load_tables(config.tables_dir)
    root = config.local.maildir_root

    def local_user(user: str) -> str | None:
        return resolve_local_user(user, root)

    listen_ips = [listener.address[0] for listener in config.listeners]
    ctx = RoutingContext(
        tables=tables,
        class_w=class_w(tables, config.hostname, listen_ips),
        local_user=local_user,
    )
    return Snapshot(config, tables, ctx, generation(config))


GENERATION_DIGITS = 12


def generation(config: Config) -> str:
    """A hash of what the config was read from (`Config.digest`) and of each table file as
    it is on disk now, so that a node's ``mailgate check`` and its daemon's ``status`` can
    be compared: the rolling reload waits for them to agree. The tables are read a second
    time for it, at load only (an edit between the two reads shows as a new generation)."""
    digest = hashlib.sha256(config.digest.encode())
    if config.tables_dir is not None:
        for name in TABLE_FILES:
            digest.update(f"\0{name}\0".encode())
            try:
                with open(config.tables_dir / name, "rb") as f:
                    for block in iter(lambda: f.read(1 << 16), b""):
                        digest.update(block)
            except OSError:
                digest.update(b"-")  # no such table (or unreadable: load_tables said so)
    return digest.hexdigest()[:GENERATION_DIGITS]


def load_snapshot(path: str | Path | None) -> Snapshot:
    return build_snapshot(load_config(path))


def try_reload(path: str | Path | None) -> Snapshot | SourceError:
    """A new snapshot from the config at ``path``, or (logged) why it does not load: the
    running one stays, never half-loaded. One place for the master and for every worker."""
    try:
        return build_snapshot(load_config(path))
    except (ConfigError, TableError) as exc:
        maillog.reload_refused(exc)
        return exc
