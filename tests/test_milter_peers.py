"""Real filters from Debian (tests/support/filters.py), as a new user would set them up: the
README's two [[milter]] entries, rspamd then OpenDKIM, and mail comes out signed with rspamd's
headers; GTUBE is refused at the end of DATA with nothing spooled; the copy in the spool is
strict CRLF; the signature verifies (dkim=pass) when the message comes back from outside;
with rspamd stopped, new mail gets 451 and a log line naming it; clamav-milter finds EICAR
with a private signature, offline. Each test is skipped, saying why, when its package is not
installed (``.ci/run`` installs them)."""

from __future__ import annotations

import re
import smtplib
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate.config import parse_config
from tests.support.filters import EICAR, GTUBE, ClamavMilter, OpenDkim, Rspamd
from tests.support.gateway import GatewayProcess, free_port
from tests.support.sink import SinkServer
from tests.support.world import (
    OUTSIDE,
    SENDER_DNS,
    GatewayFactory,
    World,
    issue_world,
    message,
    wait_until,
)

DNS_RECORDS = SENDER_DNS
README = Path(__file__).resolve().parent.parent / "README.md"
INSIDE = "127.0.0.1"  # opendkim's InternalHosts: its mail is signed


def readme_milters() -> str:
    """The TOML block of README's "Milters" section: what a new user copies."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Milters") :]
    return re.search(r"```toml\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def with_ports(block: str, rspamd: Rspamd, dkim: OpenDkim) -> str:
    """The README's entries, pointed at this test's filters (their ports are free ones)."""
    entries = tomllib.loads(block)["milter"]
    assert [e["name"] for e in entries] == ["rspamd", "opendkim"]
    block = block.replace(entries[0]["socket"], rspamd.socket)
    return block.replace(entries[1]["socket"], dkim.socket)


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rspamd]:
    if Rspamd.missing:
        pytest.skip(f"{Rspamd.missing} is not installed (apt install rspamd)")
    with Rspamd(tmp_path_factory.mktemp("rspamd")) as peer:
        yield peer


@pytest.fixture(scope="module")
def opendkim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenDkim]:
    if OpenDkim.missing:
        pytest.skip(f"{OpenDkim.missing} is not installed (apt install opendkim opendkim-tools)")
    with OpenDkim(tmp_path_factory.mktemp("opendkim")) as peer:
        yield peer


@pytest.fixture(scope="module")
def gw(
    module_gateway: GatewayFactory,
    hop1: SinkServer,
    mx_port: int,
    rspamd: Rspamd,
    opendkim: OpenDkim,
) -> GatewayProcess:
    world = issue_world(hop1.port, mx_port)
    return module_gateway(world.but(settings=with_ports(readme_milters(), rspamd, opendkim)))


def send(
    gw: GatewayProcess,
    source: str,
    content: bytes,
    rcpt: str = "bob@targetdomain1.com",
    port: int | None = None,
) -> tuple[int, str]:
    with smtplib.SMTP(gw.host, port or gw.port, source_address=(source, 0), timeout=30) as s:
        s.ehlo("client.example.net")
        assert s.mail("alice@example.org")[0] == 250
        assert s.rcpt(rcpt)[0] == 250
        code, _ = s.docmd("DATA")
        assert code == 354
        s.send(content.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        code, text = s.getreply()
        return code, text.decode()


def test_the_readme_entries_are_a_valid_config() -> None:
    config = parse_config(
        readme_milters(), Path("/etc/mailgate/mailgate.toml"), Path("/etc/mailgate")
    )
    assert [(m.name, str(m.socket)) for m in config.milter] == [
        ("rspamd", "inet:11332@127.0.0.1"),
        ("opendkim", "inet:8891@127.0.0.1"),
    ]


def test_signed_with_rspamd_s_headers_and_strict_crlf(gw: GatewayProcess, hop1: SinkServer) -> None:
    code, _ = send(gw, INSIDE, message("signed ham"))
    assert code == 250
    [msg] = hop1.wait_subject("signed ham")
    head = msg.data.split(b"\r\n\r\n")[0]
    assert head.startswith(
        b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/simple; d=example.org; s=sel1;"
    )
    assert b"\r\nX-Spamd-Result: default: False" in head and b"\r\nX-Spam-Status: No" in head
    assert gw.log_lines("Milter insert (0): header: DKIM-Signature:")
    assert gw.log_lines("Milter add: header: X-Spam-Status: No")


def test_the_spooled_copy_is_strict_crlf(gw: GatewayProcess, hop1: SinkServer) -> None:
    """rspamd folds its X-Spamd-Result with bare LF: what reaches the disk has only CRLF."""
    hop1.rcpt_reply["held@targetdomain1.com"] = "451 4.3.0 not now"
    try:
        code, text = send(gw, OUTSIDE, message("kept in the queue"), rcpt="held@targetdomain1.com")
        assert code == 250
        qid = text.split()[1]
        path = gw.spool / "queue" / qid
        data = path.read_bytes()
        content = data[data.index(b"\n") + 1 :]  # after the envelope line
        assert b"\r\nX-Spamd-Result: " in content
        assert content.count(b"\n") == content.count(b"\r\n")
        assert content.count(b"\r") == content.count(b"\r\n")
    finally:
        del hop1.rcpt_reply["held@targetdomain1.com"]


def test_gtube_is_refused_at_the_end_of_data(gw: GatewayProcess) -> None:
    code, text = send(gw, OUTSIDE, message("gtube", body=GTUBE + b"\r\n"))
    assert (code, text) == (554, "5.7.1 Gtube pattern")
    [line] = gw.log_lines("Milter: data, reject=554 5.7.1 Gtube pattern")
    qid = line.split(": ")[1]
    assert not gw.log_lines(f"{qid}: from=")
    assert not (gw.spool / "queue" / qid).exists() and not (gw.spool / "incoming" / qid).exists()


def test_the_signature_verifies_from_outside(gw: GatewayProcess, hop1: SinkServer) -> None:
    send(gw, INSIDE, message("round trip"))
    [signed] = hop1.wait_subject("round trip")
    hop1.clear()
    code, _ = send(gw, OUTSIDE, signed.data)
    assert code == 250
    [verified] = hop1.wait_subject("round trip")
    assert verified.data.startswith(
        b"Authentication-Results: gateway.example.com;\r\n"
        b"\tdkim=pass (1024-bit key) header.d=example.org "
    )


def test_with_rspamd_stopped_new_mail_is_tempfailed(
    module_gateway: GatewayFactory,
    hop1: SinkServer,
    mx_port: int,
    tmp_path: Path,
    opendkim: OpenDkim,
) -> None:
    if Rspamd.missing:
        pytest.skip(f"{Rspamd.missing} is not installed (apt install rspamd)")
    peer = Rspamd(tmp_path / "rspamd").start()
    world: World = issue_world(hop1.port, mx_port)
    gw = module_gateway(world.but(settings=with_ports(readme_milters(), peer, opendkim)))
    assert send(gw, OUTSIDE, message("before the stop"))[0] == 250
    peer.stop()
    with smtplib.SMTP(gw.host, gw.port, source_address=(OUTSIDE, 0)) as s:
        s.ehlo("client.example.net")
        assert s.mail("alice@example.org") == (451, b"4.7.1 Service unavailable - try again later")
    line = wait_until(
        lambda: gw.log_lines("Milter (rspamd): error connecting to filter"), "rspamd's failure line"
    )
    assert "where=connect, default_action=tempfail" in line[0]


# -- clamav-milter ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clamav(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClamavMilter]:
    if ClamavMilter.missing:
        pytest.skip(
            f"{ClamavMilter.missing} is not installed (apt install clamav-daemon clamav-milter)"
        )
    with ClamavMilter(tmp_path_factory.mktemp("clamav")) as peer:
        yield peer


def test_clamav_finds_eicar_offline(
    module_gateway: GatewayFactory, hop1: SinkServer, mx_port: int, clamav: ClamavMilter
) -> None:
    gw = module_gateway(
        issue_world(hop1.port, mx_port).but(
            settings=f'[[milter]]\nname = "clamav"\nsocket = "{clamav.socket}"\n'
        )
    )
    code, text = send(gw, OUTSIDE, message("infected", body=EICAR + b"\r\n"))
    assert (code, text) == (550, "5.7.1 Virus Mailgate.Test.EICAR.UNOFFICIAL detected")
    assert send(gw, OUTSIDE, message("clean"))[0] == 250
    [msg] = hop1.wait_subject("clean")
    assert b"\r\nX-Virus-Status: Clean\r\n" in msg.data


# -- QUIT_NC: a connection kept for the next session (reuse_connections) ---------------------------


def kept_for(gf: GatewayFactory, world: World, name: str, socket: str, more: str) -> tuple:
    """A gateway whose filter serves a second listener only (which the start-up probe of the
    first does not touch), and that listener's port."""
    probe, filtered = free_port(), free_port()
    gw = gf(
        world.but(
            # One process: the kept connections are each worker's own.
            settings=f'workers = 1\nlisten = ["127.0.0.1:{probe}", "127.0.0.1:{filtered}"]\n'
            f'[[milter]]\nname = "{name}"\nsocket = "{socket}"\nreuse_connections = 1\n'
            f'listen = ["127.0.0.1:{filtered}"]\n{more}'
        ),
        start=False,
    )
    gw.port = probe
    gw.start()
    return gw, filtered


def test_rspamd_takes_quit_nc_and_serves_the_next_sessions(
    module_gateway: GatewayFactory, hop1: SinkServer, mx_port: int, rspamd: Rspamd
) -> None:
    log = rspamd.dir / "rspamd.log"
    accepted = "accepted milter connection"
    world = issue_world(hop1.port, mx_port)
    gw, port = kept_for(module_gateway, world, "rspamd", rspamd.socket, "")
    before = log.read_text().count(accepted)
    for n in range(3):
        assert send(gw, OUTSIDE, message(f"scanned {n}"), port=port)[0] == 250
        [msg] = hop1.wait_subject(f"scanned {n}")
        assert b"\r\nX-Spam-Status: No, score=" in msg.data
    gtube = message("gtube again", body=GTUBE + b"\r\n")
    assert send(gw, OUTSIDE, gtube, port=port) == (554, "5.7.1 Gtube pattern")
    assert log.read_text().count(accepted) - before == 1  # one connection for the four


def test_opendkim_ignores_quit_nc_after_it_accepted_a_message(
    module_gateway: GatewayFactory, hop1: SinkServer, mx_port: int, opendkim: OpenDkim
) -> None:
    """libmilter's state machine takes QUIT_NC only after an end of message answered
    *continue*; OpenDKIM accepts every message it signs, so the kept connection's next
    CONNECT gets no answer: the failure of a reused connection is the default action and
    the filter's line, as on a new one (why reuse is off unless a filter is known to take it)."""
    world = issue_world(hop1.port, mx_port)
    timeout = 'read_timeout = "1s"\n'
    gw, port = kept_for(module_gateway, world, "opendkim", opendkim.socket, timeout)
    assert send(gw, INSIDE, message("signed, then kept"), port=port)[0] == 250
    [msg] = hop1.wait_subject("signed, then kept")
    assert msg.data.startswith(b"DKIM-Signature: ")
    with smtplib.SMTP(gw.host, port, source_address=(INSIDE, 0)) as s:
        s.ehlo("client.example.net")
        assert s.mail("alice@example.org") == (451, b"4.7.1 Service unavailable - try again later")
    gw.wait_log(
        "Milter (opendkim): timeout before data read, where=connect, default_action=tempfail"
    )
