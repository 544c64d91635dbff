"""The access table over real sockets: one case per tag and value, at the stage Sendmail acts
(semantics §4, issue item 6). Each client is its own 127.x source address (IPv6: ::1).

Connect: keys act on the client (IP with octet stripping, IPv6 group stripping, PTR name and
its parents); From: keys on MAIL (full address, user@, domain and parents); To: keys decide
relaying, and refuse only with blocklist_recipients. Untagged keys serve every stage.
"""

from __future__ import annotations

import smtplib

import pytest

from tests.support.edge import EDGE_DNS, greet
from tests.support.gateway import GatewayProcess, run_cli
from tests.support.sink import SinkServer
from tests.support.wait import wait_until
from tests.support.world import GatewayFactory, World, issue_world, message, stays

DNS_RECORDS = EDGE_DNS

# (key, value) in file order: tests refer to lines by key, so nothing depends on numbering.
STAGES_ACCESS = [
    ("To:targetdomain1.com", "RELAY"),
    ("targetdomain3.com", "RELAY"),
    ("To:victim@targetdomain1.com", "REJECT"),
    ("To:rejectonly.example", "REJECT"),
    ("To:errdom.example", "ERROR:5.7.1:550 No mail for you"),
    ("To:trash@targetdomain1.com", "DISCARD"),
    ("GreetPause:127.0.20", "0"),
    ("Connect:127.0.0.60", "REJECT"),
    ("GreetPause:127.0.0.60", "5000"),
    ("Connect:127.0.0.61", 'ERROR:"550 Go away"'),
    ("Connect:127.0.0.62", "ERROR:5.7.0:550 Not from your network"),
    ("Connect:127.0.0.63", "ERROR:4.7.1:451 Come back later"),
    ("Connect:127.0.0.64", "DISCARD"),
    ("Connect:127.0.0.77", 'ERROR:"421 4.3.2 Go away now"'),
    ("Connect:127.0.0.65", "OK"),
    ("Connect:127.0.4", "REJECT"),
    ("Connect:127.0.4.5", "OK"),
    ("Connect:127.0.7", "REJECT"),
    ("Connect:127.0.7.8", "SKIP"),
    ("Connect:127.0.0.66", "RELAY"),
    ("127.0.5", "RELAY"),
    ("127.0.6.", "RELAY"),
    ("127.0.8", "REJECT"),
    ("Connect:bad.example", "REJECT"),
    ("Connect:trusted.example", "RELAY"),
    ("Connect:IPv6:0:0:0:0", "REJECT"),
    ("From:spammer@example.org", "REJECT"),
    ("From:blocked.example", "REJECT"),
    ("From:okuser@blocked.example", "OK"),
    ("From:skip.blocked.example", "SKIP"),
    ("From:baduser@", "REJECT"),
    ("From:discard.example", "DISCARD"),
    ("From:err.example", "ERROR:5.7.0:550 Sender blocked here"),
    ("From:tmp.example", "ERROR:4.7.1:451 Come back later"),
    ("From:quoted.example", 'ERROR:"550 Go away"'),
    ("From:relayer.example", "RELAY"),
    ("untagged.example", "REJECT"),
]
BLOCKLIST_ACCESS = [
    ("To:targetdomain1.com", "RELAY"),
    ("To:victim@targetdomain1.com", "REJECT"),
    ("To:err@targetdomain1.com", "ERROR:5.1.1:550 No such user here"),
    ("To:busy@targetdomain1.com", "ERROR:4.2.1:451 Mailbox busy"),
    ("To:gone@", "REJECT"),
    ("To:trash@targetdomain1.com", "DISCARD"),
]


def access_text(entries: list[tuple[str, str]]) -> str:
    return "".join(f"{k:<32}{v}\n" for k, v in entries)


def line_of(entries: list[tuple[str, str]], key: str) -> int:
    return next(i for i, (k, _) in enumerate(entries, 1) if k == key)


@pytest.fixture(scope="module")
def world(hop1: SinkServer, mx_port: int) -> World:
    return issue_world(hop1.port, mx_port)


@pytest.fixture(scope="module")
def stages(module_gateway: GatewayFactory, world: World) -> GatewayProcess:
    """The issue's settings (short delays), blocklist_recipients off, also on [::1]."""
    smtp = (
        '[smtp]\ngreet_pause = "0.3s"\nbad_rcpt_throttle = 1\nbad_rcpt_throttle_delay = "0.3s"\n'
        "connection_rate_throttle = 0\n"
    )
    stages_world = world.but(tables={"access": access_text(STAGES_ACCESS)}, settings=smtp)
    return module_gateway(stages_world, host="127.0.0.13", ipv6=True)


@pytest.fixture(scope="module")
def blocklist(module_gateway: GatewayFactory, world: World) -> GatewayProcess:
    blocklist_world = world.but(
        tables={"access": access_text(BLOCKLIST_ACCESS)},
        settings="[access]\nblocklist_recipients = true\n",
    )
    return module_gateway(blocklist_world, host="127.0.0.14")


# == Connect: (and untagged client keys) =======================================================
DENIED = "550 5.7.1 Access denied"
CONNECT_CASES = [
    # source, refusal at MAIL/RCPT/DATA (None: accepted), may relay anywhere
    pytest.param("127.0.0.60", DENIED, False, id="Connect-REJECT"),
    pytest.param("127.0.0.61", "550 5.0.0 Go away", False, id="Connect-ERROR-quoted"),
    pytest.param("127.0.0.62", "550 5.7.0 Not from your network", False, id="Connect-ERROR-dsn"),
    pytest.param("127.0.0.63", "451 4.7.1 Come back later", False, id="Connect-ERROR-4xx"),
    pytest.param("127.0.4.6", DENIED, False, id="Connect-REJECT-octet-prefix"),
    pytest.param("127.0.8.1", DENIED, False, id="untagged-REJECT-octet-prefix"),
    pytest.param("127.0.0.67", DENIED, False, id="Connect-REJECT-PTR-parent-domain"),
    pytest.param("127.0.7.9", DENIED, False, id="Connect-REJECT-beside-SKIP"),
    pytest.param("127.0.7.8", None, False, id="Connect-SKIP-exempts-address"),
    pytest.param("127.0.4.5", None, False, id="Connect-OK-exempts-address-no-relay"),
    pytest.param("127.0.0.65", None, False, id="Connect-OK-is-not-RELAY"),
    pytest.param("127.0.0.66", None, True, id="Connect-RELAY"),
    pytest.param("127.0.5.9", None, True, id="untagged-RELAY-octet-prefix"),
    pytest.param("127.0.6.9", None, False, id="trailing-dot-key-never-matches"),
    pytest.param("127.0.0.68", None, True, id="Connect-RELAY-PTR-name"),
    pytest.param("127.0.0.69", None, False, id="Connect-RELAY-PTR-exact-name-only"),
    pytest.param("127.0.0.2", None, False, id="no-entry"),
]


@pytest.mark.parametrize(("source", "refusal", "relays"), CONNECT_CASES)
def test_connect_stage(
    stages: GatewayProcess, source: str, refusal: str | None, relays: bool
) -> None:
    c, greeting, _ = greet(stages, source)
    with c:
        assert greeting.code == 220  # a Connect refusal still greets
        assert c.cmd("EHLO client.example.net").code == 250
        if refusal is not None:
            for line in (
                "MAIL FROM:<alice@example.org>",
                "RCPT TO:<bob@targetdomain1.com>",
                "DATA",
            ):
                assert c.cmd(line).first == refusal, line
            assert c.cmd("NOOP").code == 250  # not closed, still in step (no 354)
        else:
            assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
            assert c.cmd("RCPT TO:<bob@targetdomain1.com>").code == 250
            reply = c.cmd("RCPT TO:<someone@example.net>")
            if relays:
                assert reply.first == "250 2.1.5 <someone@example.net>... Recipient ok"
            else:
                assert reply.first.startswith("550 5.7.1 <someone@example.net>... Relaying denied")
        assert c.cmd("QUIT").code == 221
    if refusal is not None:
        assert stages.log_lines("ruleset=check_relay", source, f"reject={refusal}")
    else:
        assert not stages.log_lines("ruleset=check_relay", f"{source},")


def test_connect_reject_is_not_paused_and_keeps_the_connection(stages: GatewayProcess) -> None:
    # GreetPause:127.0.0.60 5000, but clients rejected at Connect are not paused (§10)
    c, greeting, waited = greet(stages, "127.0.0.60")
    with c:
        assert greeting.code == 220
        assert waited < 5.0 / 2
        for _ in range(3):
            assert c.cmd("MAIL FROM:<alice@example.org>").first == DENIED
        assert c.cmd("HELO client.example.net").code == 250
        assert c.cmd("RSET").code == 250
        assert c.cmd("QUIT").code == 221


def test_connect_error_421_is_the_greeting_and_closes(stages: GatewayProcess) -> None:
    """Sendmail says a check_relay 421 instead of its greeting and closes the connection
    (other refusals answer each later command)."""
    c, greeting, _ = greet(stages, "127.0.0.77")
    with c:
        assert greeting.first == "421 4.3.2 Go away now"
        assert c.wait_closed() == b""
    assert stages.log_lines("reject=421 4.3.2 Go away now", "127.0.0.77")


def test_connect_ipv6_prefix_reject(stages: GatewayProcess) -> None:
    assert stages.port6 is not None
    with smtplib.SMTP("::1", stages.port6, timeout=10, local_hostname="client.example.net") as s:
        assert s.ehlo()[0] == 250
        assert s.mail("alice@example.org") == (550, b"5.7.1 Access denied")
        assert s.rcpt("bob@targetdomain1.com") == (550, b"5.7.1 Access denied")
    assert stages.log_lines("ruleset=check_relay", "::1", f"reject={DENIED}")


def test_connect_discard_accepts_everything_and_delivers_nothing(
    stages: GatewayProcess, hop1: SinkServer
) -> None:
    source = "127.0.0.64"
    c, greeting, _ = greet(stages, source)
    with c:
        assert greeting.code == 220
        c.cmd("EHLO client.example.net")
        assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
        assert c.cmd("RCPT TO:<bob@targetdomain1.com>").code == 250
        # As Sendmail's (compared with its daemon): a discarded client learns nothing of our
        # users, and still may not relay.
        assert c.cmd("RCPT TO:<no-such-user@gateway.example.com>").first == (
            "250 2.1.5 <no-such-user@gateway.example.com>... Recipient ok"
        )
        assert c.cmd("RCPT TO:<y@example.net>").first.startswith(
            "550 5.7.1 <y@example.net>... Relaying denied"
        )
        assert c.cmd("DATA").code == 354
        c.send(message("connect discard") + b".\r\n")
        reply = c.read_reply()
        assert reply.code == 250 and "Message accepted" in reply.text
        c.cmd("QUIT")
    assert stages.log_lines(f"relay=[{source}]", "discard")
    assert not stages.log_lines("from=<alice@example.org>", f"relay=[{source}]", "nrcpts=1")
    stays(lambda: hop1.with_subject("connect discard") == [], "nothing delivered", 0.5)


# == From: (and untagged sender keys) ==========================================================
FROM_CASES = [
    pytest.param(
        "spammer@example.org",
        "550 5.7.1 <spammer@example.org>... Access denied",
        id="From-full-address-REJECT",
    ),
    pytest.param(
        "x@blocked.example",
        "550 5.7.1 <x@blocked.example>... Access denied",
        id="From-domain-REJECT",
    ),
    pytest.param(
        "x@sub.blocked.example",
        "550 5.7.1 <x@sub.blocked.example>... Access denied",
        id="From-parent-domain-REJECT",
    ),
    pytest.param(
        "okuser@blocked.example",
        "250 2.1.0 <okuser@blocked.example>... Sender ok",
        id="From-address-OK-beats-domain-REJECT",
    ),
    pytest.param(
        "x@skip.blocked.example",
        "250 2.1.0 <x@skip.blocked.example>... Sender ok",
        id="From-SKIP-exempts-subdomain",
    ),
    pytest.param(
        "baduser@example.net",
        "550 5.7.1 <baduser@example.net>... Access denied",
        id="From-user@-REJECT",
    ),
    pytest.param(
        "x@err.example", "550 5.7.0 <x@err.example>... Sender blocked here", id="From-ERROR-dsn"
    ),
    pytest.param("x@tmp.example", "451 4.7.1 Come back later", id="From-ERROR-4xx-no-prefix"),
    pytest.param(
        "x@untagged.example",
        "550 5.7.1 <x@untagged.example>... Access denied",
        id="untagged-domain-REJECT",
    ),
    pytest.param(
        "x@discard.example",
        "250 2.1.0 <x@discard.example>... Sender ok",
        id="From-DISCARD-accepted",
    ),
    pytest.param("alice@example.org", "250 2.1.0 <alice@example.org>... Sender ok", id="no-entry"),
]


@pytest.mark.parametrize(("sender", "reply"), FROM_CASES)
def test_from_stage(stages: GatewayProcess, sender: str, reply: str) -> None:
    c, _, _ = greet(stages, "127.0.20.1")
    with c:
        c.cmd("EHLO client.example.net")
        assert c.cmd(f"MAIL FROM:<{sender}>").first == reply
        c.cmd("QUIT")
    if reply.startswith(("4", "5")):
        assert stages.log_lines("ruleset=check_mail", f"arg1=<{sender}>", f"reject={reply}")


def test_a_refused_sender_is_logged_with_the_envelope_sendmail_holds(
    stages: GatewayProcess, hop1: SinkServer
) -> None:
    """As ``sendmail -bD`` logs it (8.17, seen with its syslog captured): a refused MAIL is
    logged with the queue id the session's next accepted transaction takes, and, unless one
    is accepted after it, gets a from= line (size 0, no recipients) at RSET or at the end of
    the session, whether by QUIT or by the client's hang-up."""

    def lines(ip: str) -> list[str]:
        return [line.split(": ", 1)[1] for line in stages.log_lines(f"relay=[{ip}]")]

    c, _, _ = greet(stages, "127.0.20.6")
    with c:
        c.cmd("EHLO client.example.net")
        assert c.cmd("MAIL FROM:<spammer@example.org>").code == 550
        assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
        assert c.cmd("RCPT TO:<bob@targetdomain1.com>").code == 250
        assert c.cmd("DATA").code == 354
        accepted = c.cmd(message("after a refusal").decode() + "\r\n.")
        assert c.cmd("MAIL FROM:<spammer@example.org>").code == 550
        c.cmd("QUIT")
    first = accepted.first.split()[2]
    hop1.wait_subject("after a refusal")
    refused = "ruleset=check_mail, arg1=<spammer@example.org>, relay=[127.0.20.6], reject=550"
    wait_until(lambda: len(lines("127.0.20.6")) == 4, "the four lines of 127.0.20.6's session")
    [refusal, received, again, unfinished] = lines("127.0.20.6")
    assert refusal.startswith(f"{first}: {refused}")
    assert received.startswith(f"{first}: from=<alice@example.org>, size=")
    second = again.split(":")[0]
    assert second != first and again.startswith(f"{second}: {refused}")
    assert unfinished == (
        f"{second}: from=<spammer@example.org>, size=0, class=0, nrcpts=0, proto=ESMTP,"
        " daemon=MTA, relay=[127.0.20.6]"
    )

    c, _, _ = greet(stages, "127.0.20.7")
    with c:
        c.cmd("EHLO client.example.net")
        assert c.cmd("MAIL FROM:<spammer@example.org>").code == 550
        assert c.cmd("RSET").code == 250
        wait_until(lambda: len(lines("127.0.20.7")) == 2, "the refusal and its from= at RSET")
        assert c.cmd("NOOP").code == 250
        c.cmd("QUIT")
    c, _, _ = greet(stages, "127.0.20.8")
    with c:
        c.cmd("EHLO client.example.net")
        assert c.cmd("MAIL FROM:<spammer@example.org>").code == 550
    for ip in ("127.0.20.7", "127.0.20.8"):
        wait_until(lambda ip=ip: len(lines(ip)) == 2, f"{ip}'s refusal and its from= line")
        [refusal, unfinished] = lines(ip)
        qid = refusal.split(":")[0]
        assert refusal.startswith(f"{qid}: ruleset=check_mail, arg1=<spammer@example.org>")
        assert unfinished.startswith(f"{qid}: from=<spammer@example.org>, size=0, class=0")


def test_from_error_quoted_form(stages: GatewayProcess) -> None:
    c, _, _ = greet(stages, "127.0.20.2")
    with c:
        c.cmd("EHLO client.example.net")
        reply = c.cmd("MAIL FROM:<x@quoted.example>")
    assert reply.code == 550 and reply.enhanced == "5.0.0"
    assert reply.first.endswith("Go away")


def test_from_discard_drops_the_whole_message(stages: GatewayProcess, hop1: SinkServer) -> None:
    with stages.smtp("127.0.20.3") as s:
        # an unknown user of ours is taken too, as Sendmail's for a discarded envelope
        s.sendmail(
            "x@discard.example",
            ["bob@targetdomain1.com", "no-such-user@gateway.example.com"],
            message("from discard"),
        )
        s.ehlo()
        s.mail("alice@example.org")
        assert s.rcpt("no-such-user@gateway.example.com")[0] == 550  # not discarded: refused
        s.rset()
        s.sendmail("alice@example.org", ["bob@targetdomain1.com"], message("after discard"))
    hop1.wait_subject("after discard")
    assert stages.log_lines("ruleset=check_mail", "arg1=<x@discard.example>", "discard")
    assert hop1.with_subject("from discard") == []


def test_from_relay_grants_nothing(stages: GatewayProcess) -> None:
    c, _, _ = greet(stages, "127.0.20.4")
    with c:
        c.cmd("EHLO client.example.net")
        assert c.cmd("MAIL FROM:<x@relayer.example>").code == 250
        assert c.cmd("RCPT TO:<y@example.net>").first.startswith(
            "550 5.7.1 <y@example.net>... Relaying denied"
        )


# == To: without blocklist_recipients: only RELAY counts =======================================
def test_to_stage_without_blocklist(stages: GatewayProcess, hop1: SinkServer) -> None:
    c, _, _ = greet(stages, "127.0.20.5")
    with c:
        c.cmd("EHLO client.example.net")
        c.cmd("MAIL FROM:<alice@example.org>")
        for rcpt in (
            "victim@targetdomain1.com",
            "trash@targetdomain1.com",
            "bob@targetdomain1.com",
        ):
            assert c.cmd(f"RCPT TO:<{rcpt}>").first == f"250 2.1.5 <{rcpt}>... Recipient ok"
        # untagged RELAY for a recipient domain (exact name)
        assert c.cmd("RCPT TO:<x@targetdomain3.com>").code == 250
        assert c.cmd("RSET").code == 250
        c.cmd("MAIL FROM:<alice@example.org>")
        for rcpt in (
            "victim@targetdomain1.com",
            "trash@targetdomain1.com",
            "bob@targetdomain1.com",
        ):
            assert c.cmd(f"RCPT TO:<{rcpt}>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(message("to ignored") + b".\r\n")
        assert c.read_reply().code == 250  # To: DISCARD ignored: delivered
        # a domain whose only entry is To: REJECT / ERROR lacks RELAY: normal relay denial
        c.cmd("MAIL FROM:<alice@example.org>")
        for rcpt in ("x@rejectonly.example", "x@errdom.example"):
            assert c.cmd(f"RCPT TO:<{rcpt}>").first.startswith(
                f"550 5.7.1 <{rcpt}>... Relaying denied"
            ), rcpt
    [msg] = hop1.wait_subject("to ignored")
    assert sorted(msg.rcpt_tos) == [
        "bob@targetdomain1.com",
        "trash@targetdomain1.com",
        "victim@targetdomain1.com",
    ]


def test_check_warns_about_to_refusals_while_blocklist_is_off(
    stages: GatewayProcess, blocklist: GatewayProcess
) -> None:
    out = run_cli("check", "-c", str(stages.config))
    assert out.returncode == 0, out.stderr
    for key, value in STAGES_ACCESS:
        if key.startswith("To:") and value != "RELAY":
            [line] = [
                w for w in out.stdout.splitlines() if f"access:{line_of(STAGES_ACCESS, key)}:" in w
            ]
            assert key in line and "blocklist_recipients" in line, line
    # the trailing-dot IPv4 key is named with its fix (semantics §18.2)
    dot = [
        w for w in out.stdout.splitlines() if f"access:{line_of(STAGES_ACCESS, '127.0.6.')}:" in w
    ]
    assert dot and "127.0.6" in dot[0]
    out = run_cli("check", "-c", str(blocklist.config))
    assert out.returncode == 0, out.stderr
    assert "blocklist_recipients" not in out.stdout


# == To: with blocklist_recipients = true ======================================================
def test_to_stage_with_blocklist(blocklist: GatewayProcess, hop1: SinkServer) -> None:
    c, greeting, _ = greet(blocklist, "127.0.0.2")
    with c:
        assert greeting.code == 220
        c.cmd("EHLO client.example.net")
        c.cmd("MAIL FROM:<alice@example.org>")
        expected = {
            "victim@targetdomain1.com": (
                "550 5.2.1 <victim@targetdomain1.com>... Mailbox disabled for this recipient"
            ),
            "err@targetdomain1.com": "550 5.1.1 <err@targetdomain1.com>... No such user here",
            "busy@targetdomain1.com": "451 4.2.1 Mailbox busy",
            # To:gone@ is for our own domains (Sendmail asks U:user@ of class w only)
            "gone@gateway.example.com": (
                "550 5.2.1 <gone@gateway.example.com>... Mailbox disabled for this recipient"
            ),
            "gone@targetdomain1.com": "250 2.1.5 <gone@targetdomain1.com>... Recipient ok",
            "bob@targetdomain1.com": "250 2.1.5 <bob@targetdomain1.com>... Recipient ok",
            "trash@targetdomain1.com": "250 2.1.5 <trash@targetdomain1.com>... Recipient ok",
        }
        for rcpt, reply in expected.items():
            assert c.cmd(f"RCPT TO:<{rcpt}>").first == reply, rcpt
        assert c.cmd("DATA").code == 354
        c.send(message("blocklist discard") + b".\r\n")
        assert c.read_reply().code == 250  # accepted, then silently dropped
        c.cmd("MAIL FROM:<alice@example.org>")
        assert c.cmd("RCPT TO:<bob@targetdomain1.com>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(message("blocklist sentinel") + b".\r\n")
        assert c.read_reply().code == 250
        c.cmd("QUIT")
    hop1.wait_subject("blocklist sentinel")
    assert hop1.with_subject("blocklist discard") == []
    assert blocklist.log_lines("discard", "relay=[127.0.0.2]")
    for rcpt in ("victim", "err", "busy"):
        assert blocklist.log_lines("ruleset=check_rcpt", f"arg1=<{rcpt}@targetdomain1.com>")
    assert blocklist.log_lines("ruleset=check_rcpt", "arg1=<gone@gateway.example.com>")


def test_connect_reject_refuses_every_other_command(stages: GatewayProcess) -> None:
    c, _, _ = greet(stages, "127.0.0.60")
    with c:
        for line in ("ETRN targetdomain1.com", "VRFY alice", "EXPN team", "HELP"):
            assert c.cmd(line).first == DENIED, line
        c.send(b"MAIL FROM:<alice@example.org>\r\n" * 40)
        transcript = c.wait_closed(timeout=1.5).decode()
    # 4 refused above and 21 here make max_bad_commands (25)
    assert transcript.count(DENIED) == 21
    assert "421 4.7.0 " in transcript
