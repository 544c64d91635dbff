"""The maillog read by the real fail2ban: ``fail2ban-regex`` with Debian's sendmail-reject
filter, as an admin who moved from Sendmail keeps it. Its server is never started.

With ``[log] syslog_name = "sm-mta"`` (what ``mailgate import-mc`` writes) the filter finds
each kind of abuse it bans on in Sendmail's log: relaying denied, a refused
VRFY or EXPN, a client over the per-IP limit, an early talker, and (mode ``extra``) a
connection that asked for nothing, whether it quit, idled until our timeout or was closed
after 25 bad commands. Under the default name it misses the lines with a
queue id (the relaying attempts).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.dnsserver import DnsServer
from tests.support.edge import greet
from tests.support.world import SENDER_DNS, GatewayFactory, World, wait_until

FAIL2BAN_REGEX = shutil.which("fail2ban-regex")
FILTER = Path("/etc/fail2ban/filter.d/sendmail-reject.conf")
pytestmark = pytest.mark.skipif(
    FAIL2BAN_REGEX is None or not FILTER.exists(),
    reason="fail2ban is not installed (Debian package fail2ban; .ci/run installs it)",
)

DNS_RECORDS = SENDER_DNS  # the senders' domain resolves (the dns fixture reads this)

# Each client address does one thing; none has a PTR name (so relaying is denied with
# "IP name lookup failed", the text the filter knows), none is the local host.
RELAYER, PROBER, LIMITED, SILENT, TALKER, HONEST, IDLER, FLOODER = (
    "127.0.30.1",
    "127.0.30.2",
    "127.0.30.3",
    "127.0.30.4",
    "127.0.30.5",
    "127.0.30.6",
    "127.0.30.7",
    "127.0.30.8",
)
SETTINGS = (
    '[smtp]\ngreet_pause = "0.5s"\nmax_connections_per_ip = 1\nconnection_rate_throttle = 0\n'
    'command_timeout = "1s"\n'
)


def banned(log: Path, mode: str) -> list[str]:
    """The client address of each failure fail2ban-regex finds in ``log``."""
    assert FAIL2BAN_REGEX is not None
    done = subprocess.run(
        [FAIL2BAN_REGEX, "-o", "ip", str(log), f"{FILTER}[mode={mode}]"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def abuse(gw_factory: GatewayFactory, world: World, name: str) -> Path:
    gw = gw_factory(world.but(settings=f'{SETTINGS}[log]\nsyslog_name = "{name}"\n'))
    # relaying denied, then an unknown user of ours
    c, _, _ = greet(gw, RELAYER)
    with c:
        c.cmd("EHLO relayer.example.net")
        assert c.cmd("MAIL FROM:<a@example.org>").code == 250
        assert c.cmd("RCPT TO:<victim@example.net>").code == 550
        assert c.cmd("RCPT TO:<no-such-user@gateway.example.com>").code == 550
        c.cmd("QUIT")
    # VRFY and EXPN, refused by the privacy flags
    c, _, _ = greet(gw, PROBER)
    with c:
        c.cmd("EHLO prober.example.net")
        assert c.cmd("VRFY root").code == 252
        assert c.cmd("EXPN staff").code == 502
        c.cmd("QUIT")
    # over max_connections_per_ip (1)
    held, _, _ = greet(gw, LIMITED)
    with held:
        extra, reply, _ = greet(gw, LIMITED)
        with extra:
            assert reply.first == "421 4.3.2 Too many open connections."
    # a connection that asks for nothing
    c, _, _ = greet(gw, SILENT)
    with c:
        c.cmd("EHLO silent.example.net")
        c.cmd("QUIT")
    # asks for nothing and idles until we close (the timeout), or floods us with junk until
    # we close (421 after 25 bad commands): Sendmail's "did not issue" all the same
    c, _, _ = greet(gw, IDLER)
    with c:
        c.cmd("EHLO idler.example.net")
        assert c.read_reply().code == 421  # the command timeout
    c, _, _ = greet(gw, FLOODER)
    with c:
        c.send(b"JUNK\r\n" * 30)
        assert b"421 4.7.0" in c.wait_closed()
    # talks before the greeting
    with gw.raw(TALKER) as c:
        c.send(b"EHLO talker.example.net\r\n")
        assert c.read_reply().code == 554
    # and one that only sends mail: never banned
    with gw.smtp(HONEST) as s:
        s.sendmail("a@example.org", ["bob@targetdomain1.com"], b"Subject: hi\r\n\r\nhello\r\n")
    wait_until(lambda: "did not issue" in gw.log(), "the silent client's line", 10)
    wait_until(lambda: "pre-greeting traffic" in gw.log(), "the early talker's line", 10)
    gw.stop()
    return gw.log_path


@pytest.fixture
def world() -> World:
    return World(
        tables={
            "mailertable": "targetdomain1.com smtp:[127.0.0.1]:9\n",
            "access": "To:targetdomain1.com RELAY\n",
        },
        settings="workers = 1\n",
    )


def test_fail2ban_bans_what_it_banned_under_sendmail(
    make_gateway: GatewayFactory, world: World, dns: DnsServer
) -> None:
    log = abuse(make_gateway, world, "sm-mta")
    normal = banned(log, "normal")
    assert sorted(set(normal)) == sorted({RELAYER, PROBER, LIMITED, TALKER}), log.read_text()
    # Relaying denied; not the unknown user: Sendmail logs "<addr>... User unknown", no
    # ruleset line, and the filter takes that form only for "No such user here" next to a
    # from= line with the client's name (as we log them: tests/test_access_stages.py).
    assert normal.count(RELAYER) == 1
    assert normal.count(PROBER) == 2  # VRFY, EXPN
    # mode extra: also the connections that did not issue MAIL/EXPN/VRFY/ETRN, however they
    # ended (a QUIT, our timeout, our 421 after 25 bad commands)
    extra = {RELAYER, PROBER, LIMITED, TALKER, SILENT, IDLER, FLOODER}
    assert sorted(set(banned(log, "extra"))) == sorted(extra)


def test_under_the_default_name_fail2ban_misses_the_relay_attempts(
    make_gateway: GatewayFactory, world: World, dns: DnsServer
) -> None:
    """Why import-mc sets the name: the filter's prefix takes a queue id only after
    Sendmail's program names, so under ours it misses every line that has one: the relaying
    attempts, what it bans most (journal backends match on the name
    alone: ``journalmatch = SYSLOG_IDENTIFIER=sm-mta``)."""
    log = abuse(make_gateway, world, "mailgate")
    assert RELAYER not in banned(log, "extra")
