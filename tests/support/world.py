"""The test world: what a test needs around the gateway, described once.

- :class:`World`: a gateway as data (its hostname, its tables, a settings fragment, its local
  users) that becomes the real daemon on loopback (:meth:`World.gateway`, a
  tests/support/gateway.py GatewayProcess) or the files, config and snapshot the in-process
  tests drive (:meth:`World.write`, :meth:`World.config`, :meth:`World.snapshot`).
  :meth:`World.but` derives a variant: more tables, more settings (merged key by key, a
  later key replacing an earlier one).
- :func:`issue_world`: the gateway of the issue (targetdomain1.com routed by mailertable to its
  internal server, relayed by access, mail.example.org local), which most end-to-end files use.
- :func:`message`: the one message builder (header fields, body, exact size, 8-bit text).
- The addresses the files share (HOP1, MXHOST, ...), the DNS records every gateway needs for
  its sender domain (SENDER_DNS), and the waits of tests/support/wait.py.

The fixtures that start DNS servers, sinks and gateways for a test are in tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from mailgate.config import Config, parse_config
from mailgate.snapshot import Snapshot, build_snapshot
from tests.support.dnsserver import DnsServer, Records
from tests.support.gateway import GatewayProcess, merge_settings
from tests.support.sink import SinkServer
from tests.support.wait import poll, stays, wait_until

__all__ = [
    "HOP1",
    "HOSTNAME",
    "MXHOST",
    "OUTSIDE",
    "SENDER",
    "SENDER_DNS",
    "GatewayFactory",
    "SinkFactory",
    "World",
    "issue_world",
    "message",
    "message_id",
    "poll",
    "stays",
    "wait_until",
]

HOSTNAME = "gateway.example.com"
SENDER = "alice@example.org"
OUTSIDE = "127.0.0.2"  # an ordinary Internet client: no PTR, may not relay
HOP1 = "127.0.0.5"  # targetdomain1.com's internal server (mailertable smtp:[HOP1]:port)
MXHOST = "127.0.0.7"  # example.org's MX (where bounces go), and example.net's

# The fixtures make_gateway / module_gateway and make_sink of tests/conftest.py.
GatewayFactory = Callable[..., GatewayProcess]
SinkFactory = Callable[..., SinkServer]

# The sender domain of the tests' mail resolves (the gateway checks it at MAIL).
SENDER_DNS: Records = {
    "example.org": [("MX", "10 mx.example.org.")],
    "mx.example.org": [("A", MXHOST)],
}


@dataclass(frozen=True)
class World:
    hostname: str = HOSTNAME
    tables: Mapping[str, str] = field(default_factory=dict)
    settings: str = ""  # a TOML fragment: root keys, then [sections]
    users: tuple[str, ...] = ()  # local users (Maildir folders)

    def but(
        self,
        *,
        tables: Mapping[str, str] | None = None,
        settings: str = "",
        users: tuple[str, ...] | None = None,
    ) -> World:
        """This world with ``tables`` added (a name given replaces that table) and
        ``settings`` merged into its own."""
        return replace(
            self,
            tables={**self.tables, **(tables or {})},
            settings=merge_settings(self.settings, settings),
            users=self.users if users is None else users,
        )

    def gateway(
        self,
        directory: Path,
        dns: DnsServer | None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        ipv6: bool = False,
    ) -> GatewayProcess:
        """The daemon of this world in ``directory``, listening on ``host`` at ``port`` (a
        free one if not given); not started."""
        gw = GatewayProcess(
            directory,
            dns=dns.address if dns is not None else None,
            hostname=self.hostname,
            tables=dict(self.tables),
            settings=self.settings,
            host=host,
            port=port,
            ipv6=ipv6,
        )
        for user in self.users:
            (gw.maildir / user).mkdir(parents=True, exist_ok=True)
        return gw

    def write(self, directory: Path) -> Path:
        """The files of an in-process test's gateway: tables in ``directory/tables``, Maildirs
        in ``directory/maildir``, the spool in ``directory/spool`` (nothing listens); the path
        of its mailgate.toml."""
        tables, maildir = directory / "tables", directory / "maildir"
        tables.mkdir(parents=True, exist_ok=True)
        for name, text in self.tables.items():
            (tables / name).write_text(text)
        for user in self.users:
            (maildir / user).mkdir(parents=True, exist_ok=True)
        path = directory / "mailgate.toml"
        path.write_text(
            merge_settings(
                f'hostname = "{self.hostname}"\nlisten = ["192.0.2.1:25"]\n'
                f'tables_dir = "{tables}"\nspool_dir = "{directory / "spool"}"\n'
                f'[local]\nmaildir_root = "{maildir}"\n',
                self.settings,
            )
        )
        return path

    def config(self, directory: Path) -> Config:
        """The config of :meth:`write`'s files."""
        path = self.write(directory)
        return parse_config(path.read_text(), path, directory)

    def snapshot(self, directory: Path) -> Snapshot:
        return build_snapshot(self.config(directory))


def issue_world(hop1_port: int, mx_port: int) -> World:
    """The issue's gateway: targetdomain1.com routed by mailertable to its internal server
    (a sink at HOP1 on ``hop1_port``) and relayed for anyone by access; mail.example.org local
    (alice, and the aliases postmaster and team); other domains by MX on ``mx_port``; a queue
    that retries within seconds; no greet pause or recipient throttle unless a test sets one."""
    return World(
        tables={
            "mailertable": f"targetdomain1.com   smtp:[{HOP1}]:{hop1_port}\n",
            "access": "To:targetdomain1.com  RELAY\n",
            "local-host-names": "mail.example.org\n",
            "aliases": "postmaster: alice\nteam: alice, bob@targetdomain1.com\n",
        },
        settings=(
            '[queue]\nrun_interval = "2s"\nretry_min = "1s"\n'
            f'[delivery]\nport = {mx_port}\nconnect_timeout = "2s"\n'
            '[smtp]\ngreet_pause = "0s"\nbad_rcpt_throttle = 0\n'
        ),
        users=("alice",),
    )


def message_id(subject: str) -> str:
    """The Message-ID :func:`message` gives a message with this subject."""
    return f"<{subject.replace(' ', '-')}@example.org>"


def message(
    subject: str = "hello",
    *,
    frm: str = SENDER,
    to: str | None = "bob@targetdomain1.com",
    body: bytes | str = "Hi Bob.\r\n",
    msgid: str | bool = True,
    date: bool = True,
    headers: str = "",
    size: int | None = None,
) -> bytes:
    """A message as a client sends it (CRLF line ends, not dot-stuffed): From, To, Subject,
    Date and Message-ID (:func:`message_id`, or ``msgid`` itself), then ``headers`` (whole
    lines), an empty line and ``body``. Text is UTF-8 (so non-ASCII makes it 8-bit); ``size``
    pads the body with lines of x to exactly that many octets."""
    head = f"From: <{frm}>\r\n" + (f"To: <{to}>\r\n" if to else "") + f"Subject: {subject}\r\n"
    if date:
        head += "Date: Tue, 24 Nov 2026 19:17:12 +0000\r\n"
    if msgid:
        head += f"Message-ID: {message_id(subject) if msgid is True else msgid}\r\n"
    content = (head + headers + "\r\n").encode() + (
        body.encode() if isinstance(body, str) else body
    )
    if size is not None:
        line = b"x" * 70 + b"\r\n"
        fill = size - len(content)
        content += line * (fill // len(line))
        rest = size - len(content)
        assert rest != 1 and rest >= 0, f"cannot pad to {size} octets"
        if rest:
            content += b"y" * (rest - 2) + b"\r\n"
        assert len(content) == size
    return content
