"""The SMTP server side, over real loopback sockets against the real daemon.

Raw sockets (tests/support/rawsmtp.py) so that every reply is checked byte for byte: reply code,
enhanced status code and, where Sendmail's text is part of the contract (sendmail-semantics §9-§14),
the text too. Two daemons are shared by the whole module:

* ``gw``: small limits (message size, recipients, bad commands) to reach them cheaply;
* ``gw_big``: the default size limit (for the 5 MB message) and 1 s command and data timeouts.

Every message goes to a recipient of its own at ``targetdomain1.com`` (routed by mailertable to
one shared sink), so tests can tell their deliveries apart.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from tests.support.gateway import GatewayProcess, free_port
from tests.support.rawsmtp import RawReply, RawSmtp
from tests.support.sink import SinkMessage, SinkServer
from tests.support.world import (
    HOP1,
    HOSTNAME,
    OUTSIDE,
    SENDER,
    SENDER_DNS,
    GatewayFactory,
    World,
    issue_world,
    message,
    stays,
    wait_until,
)

DNS_RECORDS = SENDER_DNS
DEAD_HOP = "127.0.0.8"  # deferred.example's server: nothing listens there
MAX_SIZE = 20000
MAX_RCPTS = 3
MAX_BAD = 5

VRFY_REPLY = b"252 2.5.2 Cannot VRFY user; try RCPT to attempt delivery (or try finger)\r\n"


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(hop1: SinkServer, mx_port: int) -> World:
    hop1.smtputf8 = True
    return issue_world(hop1.port, mx_port).but(
        tables={
            "mailertable": (
                f"targetdomain1.com   smtp:[{HOP1}]:{hop1.port}\n"
                f"deferred.example    smtp:[{DEAD_HOP}]:{free_port(DEAD_HOP)}\n"
            ),
            "access": "To:targetdomain1.com  RELAY\nTo:deferred.example  RELAY\n",
        },
        settings='[queue]\nrun_interval = "30s"\nretry_min = "30s"\n',
    )


@pytest.fixture(scope="module")
def gw(module_gateway: GatewayFactory, world: World) -> GatewayProcess:
    smtp = (
        f"[smtp]\nmax_message_size = {MAX_SIZE}\nmax_recipients = {MAX_RCPTS}\n"
        f"max_bad_commands = {MAX_BAD}\n"
    )
    return module_gateway(world.but(settings=smtp))


@pytest.fixture(scope="module")
def gw_big(module_gateway: GatewayFactory, world: World) -> GatewayProcess:
    return module_gateway(
        world.but(settings='[smtp]\ncommand_timeout = "1s"\ndata_timeout = "1s"\n')
    )


# -- helpers -------------------------------------------------------------------------------------


@contextlib.contextmanager
def session(gw: GatewayProcess, *, ehlo: bool = True) -> Iterator[RawSmtp]:
    """A connection past the greeting (and EHLO)."""
    with gw.raw(OUTSIDE) as c:
        assert c.read_reply().code == 220
        if ehlo:
            assert c.cmd("EHLO client.example.net").code == 250
        yield c


def rcpt(name: str) -> str:
    return f"{name}@targetdomain1.com"


def dot_stuff(content: bytes) -> bytes:
    """The DATA wire form of ``content`` (which ends in CRLF or is empty), terminator included."""
    assert content == b"" or content.endswith(b"\r\n")
    stuffed = re.sub(rb"(?m)^\.", b"..", content) if b"." in content else content
    return stuffed + b".\r\n"


def start_data(c: RawSmtp, rcpts: list[str], mail_args: str = "") -> None:
    assert c.cmd(f"MAIL FROM:<{SENDER}>{mail_args}").code == 250
    for r in rcpts:
        reply = c.cmd(f"RCPT TO:<{r}>")
        assert reply.code == 250, reply
    reply = c.cmd("DATA")
    assert reply.code == 354, reply


def send_message(c: RawSmtp, rcpts: list[str], content: bytes, mail_args: str = "") -> RawReply:
    start_data(c, rcpts, mail_args)
    c.send(dot_stuff(content))
    return c.read_reply()


def qid_of(reply: RawReply) -> str:
    m = re.fullmatch(r"2\.0\.0 (\S+) Message accepted for delivery", reply.text)
    assert reply.code == 250 and m, reply
    return m.group(1)


def wait_rcpt(hop1: SinkServer, address: str, timeout: float = 10.0) -> SinkMessage:
    found = wait_until(
        lambda: [m for m in hop1.messages if address in m.rcpt_tos],
        f"a message for {address} at the sink",
        timeout,
    )
    assert len(found) == 1, found
    return found[0]


def assert_not_delivered(hop1: SinkServer, address: str, grace: float = 0.3) -> None:
    stays(lambda: [m for m in hop1.messages if address in m.rcpt_tos] == [], address, grace)


def incoming(gw: GatewayProcess) -> list[str]:
    return sorted(os.listdir(gw.spool / "incoming"))


def wait_incoming_empty(gw: GatewayProcess, timeout: float = 5.0) -> None:
    wait_until(lambda: incoming(gw) == [], "spool/incoming to be empty", timeout)


def split_message(data: bytes) -> tuple[list[bytes], bytes]:
    """(header lines, body) of a message as delivered; the body is what follows CRLF CRLF."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head = data.removesuffix(b"\r\n")
    return head.split(b"\r\n"), body


def header_names(lines: list[bytes]) -> list[bytes]:
    """Lower-case field names; every line is a field or a continuation (else AssertionError)."""
    names = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            assert names, f"continuation line first: {line!r}"
            continue
        name, colon, _ = line.partition(b":")
        assert colon and name and b" " not in name, f"not a header field line: {line!r}"
        names.append(name.lower())
    return names


# -- greeting, EHLO, HELO ------------------------------------------------------------------------


def test_greeting_format(gw: GatewayProcess) -> None:
    with gw.raw(OUTSIDE) as c:
        greeting = c.read_reply()
        assert greeting.code == 220
        assert len(greeting.lines) == 1
        assert re.fullmatch(rb"220 gateway\.example\.com ESMTP \S.*\r\n", greeting.raw)
        assert c.pending(0.1) == b""  # nothing else is said before the client speaks


def test_ehlo_keywords(gw: GatewayProcess) -> None:
    with session(gw, ehlo=False) as c:
        r = c.cmd("EHLO client.example.net")
        assert r.code == 250
        assert r.lines[0] == f"{HOSTNAME} Hello [{OUTSIDE}], pleased to meet you"
        assert r.raw.startswith(f"250-{HOSTNAME} Hello".encode())
        keywords = r.lines[1:]
        for kw in (
            "PIPELINING",
            f"SIZE {MAX_SIZE}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "DSN",
            "ETRN",
        ):
            assert kw in keywords, (kw, keywords)
        # no enhanced codes in the EHLO reply, and the privacy flags hide EXPN / VERB
        assert not any(re.match(r"\d\.\d+\.\d+ ", line) for line in r.lines)
        assert "EXPN" not in keywords and "VERB" not in keywords
        # every line but the last is "250-", the last "250 "
        raw_lines = r.raw.split(b"\r\n")[:-1]
        assert all(line.startswith(b"250-") for line in raw_lines[:-1])
        assert raw_lines[-1].startswith(b"250 ")


def test_ehlo_size_shows_the_default_limit(gw_big: GatewayProcess) -> None:
    with session(gw_big, ehlo=False) as c:
        r = c.cmd("EHLO client.example.net")
        sizes = [kw for kw in r.lines[1:] if kw.split()[0] == "SIZE"]
        assert sizes == [f"SIZE {50 * 1024 * 1024}"]


def test_helo(gw: GatewayProcess) -> None:
    with session(gw, ehlo=False) as c:
        r = c.cmd("HELO client.example.net")
        assert r.raw == f"250 {HOSTNAME} Hello [{OUTSIDE}], pleased to meet you\r\n".encode()
        # a HELO session can carry mail
        assert c.cmd(f"MAIL FROM:<{SENDER}>").code == 250


@pytest.mark.parametrize("verb", ["EHLO", "HELO"])
def test_hello_without_argument(gw: GatewayProcess, verb: str) -> None:
    with session(gw, ehlo=False) as c:
        r = c.cmd(verb)
        assert r.raw == f"501 5.0.0 {verb} requires domain address\r\n".encode()
        assert c.cmd(f"{verb}    ").first == f"501 5.0.0 {verb} requires domain address"
        assert c.cmd(f"{verb} client.example.net").code == 250


# -- PIPELINING ----------------------------------------------------------------------------------


def test_pipelined_group_replies_in_order_and_message_accepted(
    gw: GatewayProcess, hop1: SinkServer
) -> None:
    a, b = rcpt("pipe-a"), rcpt("pipe-b")
    with session(gw) as c:
        c.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{a}>\r\nRCPT TO:<{b}>\r\nDATA\r\n".encode())
        replies = c.read_replies(4)
        assert [r.first for r in replies] == [
            f"250 2.1.0 <{SENDER}>... Sender ok",
            f"250 2.1.5 <{a}>... Recipient ok",
            f"250 2.1.5 <{b}>... Recipient ok",
            "354 End data with <CR><LF>.<CR><LF>",
        ]
        content = message("pipelined")
        c.send(dot_stuff(content))
        qid_of(c.read_reply())
        assert c.cmd("QUIT").code == 221
    msg = wait_rcpt(hop1, a)
    assert sorted(msg.rcpt_tos) == [a, b]
    assert msg.data.endswith(content)


def test_pipelined_group_with_a_refused_recipient(gw: GatewayProcess, hop1: SinkServer) -> None:
    a = rcpt("pipe-partial")
    with session(gw) as c:
        c.send(
            f"RSET\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<victim@example.net>\r\n"
            f"RCPT TO:<{a}>\r\nDATA\r\n".encode()
        )
        rset, mail, bad, good, data = c.read_replies(5)
        assert rset.first == "250 2.0.0 Reset state"
        assert mail.code == 250
        assert (bad.code, bad.enhanced) == (550, "5.7.1")
        assert good.first == f"250 2.1.5 <{a}>... Recipient ok"
        assert data.code == 354
        c.send(dot_stuff(message("partial")))
        qid_of(c.read_reply())
    assert wait_rcpt(hop1, a).rcpt_tos == [a]


def test_pipelined_commands_after_a_whole_transaction(gw: GatewayProcess, hop1: SinkServer) -> None:
    """Commands pipelined after the end of data are read as commands, not as content."""
    a = rcpt("pipe-after")
    with session(gw) as c:
        start_data(c, [a])
        c.send(dot_stuff(message("after")) + b"NOOP\r\nRSET\r\nQUIT\r\n")
        end, noop, rset, quit_ = c.read_replies(4)
        qid_of(end)
        assert (noop.first, rset.first) == ("250 2.0.0 OK", "250 2.0.0 Reset state")
        assert quit_.code == 221
        assert c.wait_closed() == b""
    assert wait_rcpt(hop1, a).data.endswith(message("after"))


def test_many_pipelined_commands_in_one_write(gw: GatewayProcess) -> None:
    """More than the server buffers before it stops reading (256 KiB): all answered, in order."""
    n = 60_000
    with session(gw) as c:
        c.send(b"NOOP\r\n" * n + b"RSET\r\n")
        for _ in range(n):
            assert c.read_line() == b"250 2.0.0 OK\r\n"
        assert c.read_reply().first == "250 2.0.0 Reset state"
        assert c.pending(0.05) == b""


def test_half_closed_client_still_gets_its_replies(gw: GatewayProcess, hop1: SinkServer) -> None:
    """A client may shut down its sending side after the last command and still read."""
    a = rcpt("half-close")
    with session(gw) as c:
        start_data(c, [a])
        c.send(dot_stuff(message("half close")) + b"QUIT\r\n")
        c.sock.shutdown(socket.SHUT_WR)
        rest = c.wait_closed()
    assert re.fullmatch(
        rb"250 2\.0\.0 \S+ Message accepted for delivery\r\n"
        rb"221 2\.0\.0 gateway\.example\.com closing connection\r\n",
        rest,
    ), rest
    wait_rcpt(hop1, a)


# -- simple commands -----------------------------------------------------------------------------


def test_rset_noop_help_quit(gw: GatewayProcess) -> None:
    with session(gw) as c:
        assert c.cmd("NOOP").raw == b"250 2.0.0 OK\r\n"
        assert c.cmd("noop with an argument").raw == b"250 2.0.0 OK\r\n"
        assert c.cmd(f"MAIL FROM:<{SENDER}>").code == 250
        assert c.cmd("RSET").raw == b"250 2.0.0 Reset state\r\n"
        # RSET ended the transaction: RCPT needs a new MAIL, and a new MAIL is not "second"
        assert c.cmd(f"RCPT TO:<{rcpt('x')}>").first == "503 5.0.0 Need MAIL before RCPT"
        assert c.cmd(f"MAIL FROM:<{SENDER}>").code == 250
        # EHLO implies RSET (RFC 5321 4.1.4)
        assert c.cmd("EHLO client.example.net").code == 250
        assert c.cmd(f"RCPT TO:<{rcpt('x')}>").code == 503
        help_ = c.cmd("HELP")
        assert help_.code == 214 and len(help_.lines) > 1
        assert all(line.startswith("2.0.0 ") for line in help_.lines)
        mail = c.cmd("help mail")  # a topic, as Sendmail's helpfile has them
        assert mail.lines[0] == "2.0.0 MAIL FROM:<sender> [ <parameters> ]"
        assert mail.lines[-1] == "2.0.0 End of HELP info" and mail.code == 214
        assert c.cmd("HELP nosuch").first == '504 5.3.0 HELP topic "nosuch" unknown'
        assert c.cmd("NOOP").code == 250
        q = c.cmd("QUIT")
        assert q.raw == f"221 2.0.0 {HOSTNAME} closing connection\r\n".encode()
        assert c.wait_closed() == b""


def test_vrfy_never_reveals_a_user(gw: GatewayProcess) -> None:
    with session(gw) as c:
        # alice exists (a local mailbox), ghost does not: RCPT tells them apart...
        assert c.cmd(f"MAIL FROM:<{SENDER}>").code == 250
        assert c.cmd("RCPT TO:<alice@mail.example.org>").code == 250
        nobody = c.cmd("RCPT TO:<ghost-user@mail.example.org>")
        assert (nobody.code, nobody.enhanced) == (550, "5.1.1")
        assert c.cmd("RSET").code == 250
        # ...but VRFY answers every one of them with the same bytes
        for who in (
            "alice",
            "alice@mail.example.org",
            "postmaster",
            "ghost-user",
            "ghost-user@mail.example.org",
            "<alice@mail.example.org>",
            "",
        ):
            assert c.cmd(f"VRFY {who}".rstrip()).raw == VRFY_REPLY, who


def test_expn_and_verb_refused(gw: GatewayProcess) -> None:
    with session(gw) as c:
        refused = b"502 5.7.0 Sorry, we do not allow this operation\r\n"
        assert c.cmd("EXPN postmaster").raw == refused
        assert c.cmd("EXPN ghost-user").raw == refused
        assert c.cmd("VERB").raw == b"502 5.7.0 Verbose unavailable\r\n"
        assert c.cmd("NOOP").code == 250


# -- bad commands --------------------------------------------------------------------------------


def test_unknown_command(gw: GatewayProcess) -> None:
    with session(gw) as c:
        r = c.cmd("FROBNICATE now")
        assert (r.code, r.enhanced) == (500, "5.5.1")
        assert r.first == '500 5.5.1 Command unrecognized: "FROBNICATE now"'
        assert c.cmd("NOOP").code == 250


def test_rfc821_commands_are_known_and_not_implemented(gw: GatewayProcess) -> None:
    """SEND, SOML, SAML and TURN get Sendmail's 502, and do not count as bad commands."""
    with session(gw) as c:
        for _ in range(MAX_BAD + 1):
            assert c.cmd("TURN").first == '502 5.5.1 Command not implemented: "TURN"'
        r = c.cmd("SEND FROM:<alice@example.org>")
        assert r.first == '502 5.5.1 Command not implemented: "SEND FROM:<alice@example.org>"'
        assert c.cmd("soml").first == '502 5.5.1 Command not implemented: "SOML"'
        assert c.cmd("NOOP").code == 250


def test_nul_in_command_line(gw: GatewayProcess) -> None:
    with session(gw) as c:
        r = c.cmd(b"NO\0OP")
        assert (r.code, r.enhanced) == (500, "5.5.1")
        assert c.cmd("NOOP").code == 250


@pytest.mark.parametrize(
    ("line", "what"),
    [
        (b"MAIL FROM:<alice@example.org>\n", "LF"),
        (b"NOOP\nRCPT TO:<smuggled@targetdomain1.com>\r\n", "LF"),
        (b"NOOP\rRCPT TO:<smuggled@targetdomain1.com>\r\n", "CR"),
        (b"RCPT TO:<smuggled@targetdomain1.com>\r\r\n", "CR"),
    ],
)
def test_bare_lf_or_cr_in_a_command_closes_the_session(
    gw: GatewayProcess, line: bytes, what: str
) -> None:
    """Postfix's smtpd_forbid_bare_newline = reject: 521 and close; no part of the line is
    acted on, so the RCPT hidden behind the bare LF/CR never reaches the transaction."""
    with session(gw) as c:
        assert c.cmd(f"MAIL FROM:<{SENDER}>").code == 250
        c.send(line + b"DATA\r\n")
        r = c.read_reply()
        assert r.raw == f"521 5.5.2 {HOSTNAME} Error: bare <{what}> received\r\n".encode()
        assert c.wait_closed() == b""
    log = gw.wait_log(f"Error: bare <{what}> received in a command line")
    assert "smuggled@" not in log


def test_content_before_the_354_is_refused(gw: GatewayProcess, hop1: SinkServer) -> None:
    """Postfix 3.9's smtpd_forbid_unauth_pipelining: the message sent along with DATA, before
    the client could see the 354, gets 554 5.5.0 and the session closes; nothing is queued."""
    a = rcpt("blind-pipeliner")
    with session(gw) as c:
        c.send(
            f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{a}>\r\nDATA\r\n".encode()
            + dot_stuff(message("blind"))
        )
        replies = c.read_replies(3)
        assert [r.code for r in replies[:2]] == [250, 250]
        assert replies[2].first == "554 5.5.0 Error: SMTP protocol synchronization"
        assert c.wait_closed() == b""
    gw.wait_log("improper command pipelining after DATA from [127.0.0.2]: ")
    assert_not_delivered(hop1, a, grace=0.2)


def test_correct_pipelining_is_served(gw: GatewayProcess, hop1: SinkServer) -> None:
    """RFC 2920: MAIL, RCPT and DATA in one group, the content after the 354."""
    a, b = rcpt("pipeliner-1"), rcpt("pipeliner-2")
    with session(gw) as c:
        c.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{a}>\r\nRCPT TO:<{b}>\r\nDATA\r\n".encode())
        assert [r.code for r in c.read_replies(4)] == [250, 250, 250, 354]
        c.send(dot_stuff(message("pipelined")) + b"QUIT\r\n")
        assert [r.code for r in c.read_replies(2)] == [250, 221]
    assert wait_rcpt(hop1, a).rcpt_tos == [a, b]


def test_bad_command_limit_closes_with_421(gw: GatewayProcess) -> None:
    with session(gw, ehlo=False) as c:
        replies: list[RawReply] = []
        for i in range(MAX_BAD + 2):
            c.send(f"BOGUS{i}\r\n".encode())
            reply = c.read_reply()
            replies.append(reply)
            if reply.code == 421:
                break
        *errors, last = replies
        assert (last.code, last.enhanced) == (421, "4.7.0")
        assert last.first == f"421 4.7.0 {HOSTNAME} Too many bad commands; closing connection"
        # As Sendmail's: MAX_BAD are answered, the one after them gets 421 in place of a reply
        assert len(errors) == MAX_BAD
        assert all((r.code, r.enhanced) == (500, "5.5.1") for r in errors)
        assert c.wait_closed() == b""


@pytest.mark.parametrize("length", [2100, 100_000])
def test_command_line_too_long(gw: GatewayProcess, length: int) -> None:
    with session(gw) as c:
        r = c.cmd("NOOP " + "x" * length)
        assert (r.code, r.enhanced) == (500, "5.5.0")
        assert c.pending(0.1) == b""  # answered once, not once per 512 bytes
        assert c.cmd("NOOP").raw == b"250 2.0.0 OK\r\n"
        # a long MAIL line is refused as a whole: no transaction was started
        r = c.cmd(f"MAIL FROM:<{'a' * 2100}@example.org>")
        assert (r.code, r.enhanced) == (500, "5.5.0")
        assert c.cmd(f"RCPT TO:<{rcpt('x')}>").code == 503
        assert c.cmd(f"MAIL FROM:<{SENDER}>").code == 250


def test_command_line_of_exactly_2048_bytes_is_accepted(gw: GatewayProcess) -> None:
    with session(gw) as c:  # the default max_command_line, Sendmail's and Postfix's
        line = b"NOOP " + b"x" * (2048 - 5 - 2)
        assert len(line + b"\r\n") == 2048
        assert c.cmd(line).raw == b"250 2.0.0 OK\r\n"
        r = c.cmd(line + b"y")
        assert (r.code, r.enhanced) == (500, "5.5.0")


# -- sequence errors and addresses ---------------------------------------------------------------


def test_rcpt_before_mail(gw: GatewayProcess) -> None:
    with session(gw) as c:
        assert c.cmd(f"RCPT TO:<{rcpt('x')}>").raw == b"503 5.0.0 Need MAIL before RCPT\r\n"


def test_second_mail(gw: GatewayProcess) -> None:
    with session(gw) as c:
        assert c.cmd(f"MAIL FROM:<{SENDER}>").code == 250
        assert (
            c.cmd("MAIL FROM:<other@example.org>").raw == b"503 5.5.0 Sender already specified\r\n"
        )
        # the first sender is kept
        assert c.cmd(f"RCPT TO:<{rcpt('x')}>").code == 250


def test_data_without_recipients(gw: GatewayProcess, hop1: SinkServer) -> None:
    a = rcpt("data-after-503")
    with session(gw) as c:
        r = c.cmd("DATA")
        assert r.raw == b"503 5.0.0 Need MAIL command\r\n"
        assert c.cmd(f"MAIL FROM:<{SENDER}>").code == 250
        r = c.cmd("DATA")
        assert (r.code, r.enhanced) == (503, "5.0.0")
        # still in command mode: the transaction goes on normally
        assert c.cmd(f"RCPT TO:<{a}>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(dot_stuff(message("after 503")))
        qid_of(c.read_reply())
    wait_rcpt(hop1, a)


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("<>", "553 5.0.0 <>... User address required"),
        ("<user@>", "553 5.1.3 <user@>... Hostname required"),
        ("<user@targetdomain1.com", "553 5.0.0 <user@targetdomain1.com... Unbalanced '<'"),
        ("<@>", "553 5.1.3 <@>... List:; syntax illegal for recipient addresses"),
    ],
)
def test_bad_recipient_addresses(gw: GatewayProcess, arg: str, expected: str) -> None:
    with session(gw) as c:
        assert c.cmd(f"MAIL FROM:<{SENDER}>").code == 250
        assert c.cmd(f"RCPT TO:{arg}").raw == (expected + "\r\n").encode()
        # the transaction survives a refused recipient
        assert c.cmd(f"RCPT TO:<{rcpt('x')}>").code == 250


def test_max_recipients(gw: GatewayProcess, hop1: SinkServer) -> None:
    names = [rcpt(f"many{i}") for i in range(MAX_RCPTS + 2)]
    with session(gw) as c:
        assert c.cmd(f"MAIL FROM:<{SENDER}>").code == 250
        for r in names[:MAX_RCPTS]:
            assert c.cmd(f"RCPT TO:<{r}>").code == 250
        for r in names[MAX_RCPTS:]:
            assert c.cmd(f"RCPT TO:<{r}>").raw == b"452 4.5.3 Too many recipients\r\n"
        assert c.cmd("DATA").code == 354
        c.send(dot_stuff(message("many")))
        qid_of(c.read_reply())
    msg = wait_rcpt(hop1, names[0])
    assert sorted(msg.rcpt_tos) == sorted(names[:MAX_RCPTS])


# -- message size --------------------------------------------------------------------------------


def test_mail_size_parameter_over_limit(gw: GatewayProcess) -> None:
    with session(gw) as c:
        r = c.cmd(f"MAIL FROM:<{SENDER}> SIZE={MAX_SIZE + 1}")
        # Sendmail's reply, word for word (RFC 3463 5.2.3: over an administrative limit)
        assert r.first == (
            f"552 5.2.3 Message size exceeds fixed maximum message size ({MAX_SIZE})"
        )
        assert c.cmd(f"RCPT TO:<{rcpt('x')}>").code == 503  # no transaction
        assert c.cmd(f"MAIL FROM:<{SENDER}> SIZE={MAX_SIZE}").code == 250
    assert incoming(gw) == []


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (" SIZE=abc", "501 5.5.4"),
        (" SIZE", "501 5.5.4"),
        (" BODY=BINARYMIME", "501 5.5.4"),
        (" SMTPUTF8=yes", "501 5.5.4"),
        (" FOO=1", "555 5.5.4"),
        (" BODY=7BIT SIZE=100", "250 2.1.0"),
        # DSN (RFC 3461)
        (" RET=HDRS ENVID=QQ+2B314159", "250 2.1.0"),
        (" RET=full", "250 2.1.0"),
        (" RET=SOME", "501 5.5.4"),
        (" RET", "501 5.5.4"),
        (" ENVID=a=b", "501 5.5.4"),  # "=" must be xtext-encoded
        (" ENVID=" + "x" * 101, "501 5.5.4"),
        (" ENVID", "501 5.5.4"),
        # A keyword once only (RFC 1869 4.1.2), as Postfix and Sendmail answer a repeat.
        (" RET=FULL RET=HDRS", "501 5.5.4"),
        (" ENVID=a ENVID=b", "501 5.5.4"),
        (" SIZE=10 SIZE=20", "501 5.5.4"),
        (" BODY=7BIT body=8BITMIME", "501 5.5.4"),
        (" SMTPUTF8 SMTPUTF8", "501 5.5.4"),
    ],
)
def test_mail_parameters(gw: GatewayProcess, params: str, expected: str) -> None:
    with session(gw) as c:
        r = c.cmd(f"MAIL FROM:<{SENDER}>{params}")
        assert f"{r.code} {r.enhanced}" == expected, r


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (" NOTIFY=SUCCESS,FAILURE,DELAY", "250 2.1.5"),
        (" NOTIFY=never", "250 2.1.5"),
        (" NOTIFY=NEVER,SUCCESS", "501 5.5.4"),
        (" NOTIFY=SUCCESS,SUCCESS", "501 5.5.4"),
        (" NOTIFY=ALWAYS", "501 5.5.4"),
        (" NOTIFY", "501 5.5.4"),
        (" ORCPT=rfc822;Bob+2Bx@TargetDomain1.com", "250 2.1.5"),
        (" ORCPT=bob@targetdomain1.com", "501 5.5.4"),
        (" ORCPT=rfc822;", "501 5.5.4"),
        (" NOTIFY=DELAY NOTIFY=NEVER", "501 5.5.4"),
        (" ORCPT=rfc822;a@b ORCPT=rfc822;c@d", "501 5.5.4"),
        # RFC 6533: a utf-8 ORCPT, raw UTF-8 or with \x{HEX} escapes.
        (" ORCPT=utf-8;jörg@targetdomain1.com", "250 2.1.5"),
        (" ORCPT=utf-8;j\\x{F6}rg@targetdomain1.com", "250 2.1.5"),
        (" ORCPT=utf-8;a+b@targetdomain1.com", "501 5.5.4"),
        (" ORCPT=utf-8;\\x{D800}@targetdomain1.com", "501 5.5.4"),
        (" ORCPT=rfc822;jörg@targetdomain1.com", "501 5.5.4"),
        (" FOO=1", "555 5.5.4"),
    ],
)
def test_rcpt_parameters(gw: GatewayProcess, params: str, expected: str) -> None:
    with session(gw) as c:
        assert c.cmd(f"MAIL FROM:<{SENDER}> SMTPUTF8").code == 250
        r = c.cmd(f"RCPT TO:<{rcpt('dsn')}>{params}".encode())
        assert f"{r.code} {r.enhanced}" == expected, r


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("targetdomain1.com", "250 2.0.0 Queuing for node targetdomain1.com started"),
        ("@targetdomain1.com", "250 2.0.0 Queuing for node @targetdomain1.com started"),
        ("TargetDomain1.COM.", "250 2.0.0 Queuing for node TargetDomain1.COM. started"),
        (
            "#outgoing",
            "458 4.0.0 Unable to queue messages for node #outgoing: named queues are "
            "not supported; use ETRN domain",
        ),
        (
            "bad domain with spaces",
            "501 5.5.4 Syntax error in parameters: 'bad domain with "
            "spaces' is not a domain (ETRN domain or ETRN @domain)",
        ),
        (
            "[192.0.2.1]",
            "501 5.5.4 Syntax error in parameters: '[192.0.2.1]' is not a domain "
            "(ETRN domain or ETRN @domain)",
        ),
        (
            "@",
            "501 5.5.4 Syntax error in parameters: '@' is not a domain (ETRN domain or ETRN "
            "@domain)",
        ),
    ],
)
def test_etrn_syntax(gw: GatewayProcess, arg: str, expected: str) -> None:
    """RFC 1985: ``domain`` and ``@domain`` (with subdomains) are served; ``#queue`` names a
    queue, which this gateway does not have; anything else is a syntax error."""
    with session(gw) as c:
        assert c.cmd(f"ETRN {arg}").first == expected


def test_message_over_limit_while_streaming(gw: GatewayProcess, hop1: SinkServer) -> None:
    a = rcpt("too-big")
    queued = set(gw.queued())
    with session(gw) as c:
        start_data(c, [a])
        c.send(dot_stuff(message("too big", body=b"", size=MAX_SIZE + 1)))
        r = c.read_reply()
        assert r.first == f"552 5.2.3 Message exceeds maximum fixed size ({MAX_SIZE})"
        assert incoming(gw) == []
        assert c.cmd("NOOP").raw == b"250 2.0.0 OK\r\n"  # in sync
        assert c.cmd(f"RCPT TO:<{a}>").code == 503  # the transaction is over
    assert set(gw.queued()) <= queued  # nothing new (the module's gateway: others' may go)
    assert_not_delivered(hop1, a)
    # Sendmail's lines for it (logwatch counts the middle one): the from= with the size it
    # had, that size against the limit, a to= per recipient with the refusal.
    [to] = gw.log_lines(f"to=<{a}>")
    qid = to.split(": ")[1]
    found = re.search(rf"{qid}: message size \((\d+)\) exceeds", gw.log())
    assert found is not None
    size = int(found.group(1))
    assert size > MAX_SIZE
    assert gw.log_lines(f"{qid}: from=<{SENDER}>, size={size}, class=0, nrcpts=1")
    assert gw.log_lines(f"{qid}: message size ({size}) exceeds maximum ({MAX_SIZE})")
    assert to.endswith(
        f"{qid}: to=<{a}>, delay=00:00:00, pri={size + 30000}, "
        f"stat=Message exceeds maximum fixed size ({MAX_SIZE})"
    )


def test_message_of_exactly_the_limit_is_accepted(gw: GatewayProcess, hop1: SinkServer) -> None:
    a = rcpt("just-fits")
    content = message("just fits", body=b"", size=MAX_SIZE)
    with session(gw) as c:
        qid_of(send_message(c, [a], content, mail_args=f" SIZE={MAX_SIZE}"))
    assert wait_rcpt(hop1, a).data.endswith(content)


# -- DATA content rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "body", "enhanced"),
    [
        ("bare-lf", b"one\ntwo\r\n", "5.6.11"),
        ("bare-cr", b"one\rtwo\r\n", "5.6.11"),
        ("nul", b"one\0two\r\n", "5.6.0"),
        ("smuggle", b"first\n.\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<x@y>\r\n", "5.6.11"),
    ],
)
def test_bad_bytes_in_data(
    gw: GatewayProcess, hop1: SinkServer, name: str, body: bytes, enhanced: str
) -> None:
    a = rcpt(f"data-{name}")
    queued = set(gw.queued())
    with session(gw) as c:
        start_data(c, [a])
        c.send(message(name, body=body) + b".\r\n")
        r = c.read_reply()
        assert r.code == 550 and r.enhanced == enhanced, r
        assert incoming(gw) == []
        # in sync: nothing of the content was read as a command
        assert c.pending(0.1) == b""
        assert c.cmd("NOOP").raw == b"250 2.0.0 OK\r\n"
        assert set(gw.queued()) <= queued
        # the same session can then send a good message to the same recipient
        good = message(f"{name} good")
        qid_of(send_message(c, [a], good))
    msg = wait_rcpt(hop1, a)
    assert msg.data.endswith(good)
    assert_not_delivered_twice(hop1, a)


def assert_not_delivered_twice(hop1: SinkServer, address: str) -> None:
    stays(lambda: len([m for m in hop1.messages if address in m.rcpt_tos]) == 1, address, 0.3)


@pytest.mark.parametrize(
    ("pieces", "code"),
    [
        # the end of data split everywhere it can be
        ([b"\r", b"\n", b".", b"\r", b"\n"], 250),
        ([b"\r\n.", b"\r\n"], 250),
        ([b"\r\n.\r", b"\n"], 250),
        # a stuffed dot whose CRLF and dot come in different writes
        ([b"\r\n", b"..not the end\r\n.\r\n"], 250),
        # a CR at the end of one write and no LF at the start of the next: bare CR
        ([b"\r", b"x\r\n.\r\n"], 550),
        # an LF at the start of a write after a CR-less line: bare LF
        ([b"x", b"\ny\r\n", b".\r\n"], 550),
    ],
)
def test_data_split_across_writes(
    gw: GatewayProcess, hop1: SinkServer, pieces: list[bytes], code: int
) -> None:
    a = rcpt(f"split-{abs(hash(tuple(pieces))) % 10**8}")
    head = message("split", body=b"line one")
    with session(gw) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start_data(c, [a])
        c.send(head)
        for piece in pieces:
            time.sleep(0.03)  # each piece a TCP segment (a read) of its own
            c.send(piece)
        r = c.read_reply()
        assert r.code == code, r
        if code == 550:
            assert r.enhanced == "5.6.11"
        assert c.cmd("NOOP").code == 250
    if code == 250:
        expected = head + b"".join(pieces)[: -len(b".\r\n")].replace(b"\r\n..", b"\r\n.")
        assert wait_rcpt(hop1, a).data.endswith(expected)
    else:
        assert_not_delivered(hop1, a, grace=0.1)


# -- timeouts and dropped connections ------------------------------------------------------------


def test_idle_timeout(gw_big: GatewayProcess) -> None:
    with session(gw_big) as c:
        assert c.cmd(f"MAIL FROM:<{SENDER}>").code == 250
        started = time.monotonic()
        r = c.read_reply()
        waited = time.monotonic() - started
        assert (r.code, r.enhanced) == (421, "4.4.2")
        assert r.first.startswith(f"421 4.4.2 {HOSTNAME} ")
        assert 0.8 <= waited <= 5, waited
        assert c.wait_closed() == b""


def test_each_command_restarts_the_command_timeout(gw_big: GatewayProcess) -> None:
    """Commands answered as they arrive (server.py's _pump, without the connection's task)
    still move the timeout: a command every 0.6 s of a 1 s timeout is never cut off, and
    the timeout runs from the last one."""
    with session(gw_big) as c:
        for _ in range(4):
            time.sleep(0.6)
            assert c.cmd("NOOP").code == 250
        assert c.cmd(f"MAIL FROM:<{SENDER}>").code == 250
        started = time.monotonic()
        r = c.read_reply()
        waited = time.monotonic() - started
        assert (r.code, r.enhanced) == (421, "4.4.2")
        assert 0.8 <= waited <= 5, waited


def test_content_lines_restart_the_data_timeout(gw_big: GatewayProcess) -> None:
    """The same for content: each read restarts the 1 s DATA timeout, answered or not."""
    with session(gw_big) as c:
        start_data(c, [rcpt("slow-content")])
        for n in range(4):
            time.sleep(0.6)
            c.send(f"Line {n}\r\n".encode())
        started = time.monotonic()
        r = c.read_reply()
        waited = time.monotonic() - started
        assert (r.code, r.enhanced) == (421, "4.4.2")
        assert 0.8 <= waited <= 5, waited


def test_stress_mode_shortens_timeouts_while_sessions_pile_up(
    make_gateway: GatewayFactory, world: World, hop1: SinkServer
) -> None:
    """Postfix's stress mode with injected short values: 5 sessions of a ceiling of 10 (the
    50 % mark) make every waiting session, the silent ones already open included, time out
    after stress_timeout instead of command_timeout; the mode ends once they are gone."""
    smtp = (
        '[smtp]\ncommand_timeout = "60s"\ndata_timeout = "60s"\nmax_connections = 10\n'
        'stress_threshold = "50%"\nstress_timeout = "1s"\n'
    )
    gw = make_gateway(world.but(settings=smtp))
    idle = [gw.raw(OUTSIDE) for _ in range(3)]
    for c in idle:
        assert c.read_reply().code == 220
    with session(gw) as talker:
        start_data(talker, [rcpt("stressed")])
        talker.send(b"Subject: half a message\r\n")
        with gw.raw(OUTSIDE) as last:  # the 5th session: stress begins
            assert last.read_reply().code == 220
            gw.wait_log("stress: 5 of 10 sessions open; command and DATA timeouts now 1s")
            for c in [*idle, last, talker]:
                r = c.read_reply()
                assert (r.code, r.enhanced) == (421, "4.4.2"), r
                assert c.wait_closed() == b""
    for c in idle:
        c.close()
    gw.wait_log("stress over: ")
    # Back to the long timeout: a quiet session is not cut after the stress timeout.
    with session(gw) as quiet:
        assert quiet.pending(2.5) == b""
        assert quiet.cmd("NOOP").code == 250
    assert_not_delivered(hop1, rcpt("stressed"), grace=0.1)


def test_stress_mode_times_content_lines_not_reads(
    make_gateway: GatewayFactory, world: World, hop1: SinkServer
) -> None:
    """Under stress a content line must be complete within stress_timeout (Postfix's
    smtpd_per_record_deadline): a byte every 0.3 s keeps every read within any timeout but
    never ends a line, and is cut off."""
    smtp = (
        '[smtp]\ncommand_timeout = "60s"\ndata_timeout = "60s"\nmax_connections = 4\n'
        'stress_threshold = "50%"\nstress_timeout = "1s"\n'
    )
    gw = make_gateway(world.but(settings=smtp))
    with session(gw) as dribbler, gw.raw(OUTSIDE):
        start_data(dribbler, [rcpt("dribbled")])
        gw.wait_log("stress: 2 of 4 sessions open")
        wait_until(lambda: dribbler.dribble(b"x", 0.3), "the stress timeout to cut off DATA", 15, 0)
    assert "timeout waiting for input from [127.0.0.2] during DATA" in gw.log()
    assert_not_delivered(hop1, rcpt("dribbled"), grace=0.1)


def test_data_timeout_discards_the_partial_message(
    gw_big: GatewayProcess, hop1: SinkServer
) -> None:
    a = rcpt("data-timeout")
    with session(gw_big) as c:
        start_data(c, [a])
        # more than the session's write buffer, so that the partial message reaches the disk
        c.send(
            message(
                "stalled",
                body=b"y" * 70 + b"\r\n" * 1 + (b"z" * 70 + b"\r\n") * 4000 + b"half a mess",
            )
        )
        wait_until(lambda: incoming(gw_big), "the message's spool file", 5)
        assert len(incoming(gw_big)) == 1
        r = c.read_reply()
        assert (r.code, r.enhanced) == (421, "4.4.2")
        assert c.wait_closed() == b""
    wait_incoming_empty(gw_big)
    assert_not_delivered(hop1, a, grace=0.1)


@pytest.mark.parametrize("how", ["close", "reset"])
def test_disconnect_mid_data(gw_big: GatewayProcess, hop1: SinkServer, how: str) -> None:
    a = rcpt(f"dropped-{how}")
    queued = set(gw_big.queued())
    c = gw_big.raw(OUTSIDE)
    try:
        assert c.read_reply().code == 220
        assert c.cmd("EHLO client.example.net").code == 250
        start_data(c, [a])
        # more than the session's write buffer, so that the partial message reaches the disk
        c.send(message("dropped", body=b"part of the body\r\n" * 20000))
        wait_until(lambda: incoming(gw_big), "the message's spool file", 5)
        assert len(incoming(gw_big)) == 1  # the message was being received
        if how == "reset":
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        c.close()
    wait_incoming_empty(gw_big)
    assert set(gw_big.queued()) <= queued
    assert_not_delivered(hop1, a)


# -- message content -----------------------------------------------------------------------------


def test_five_megabyte_message_streams_through_byte_exact(
    gw_big: GatewayProcess, hop1: SinkServer
) -> None:
    a = rcpt("big")
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/0123456789ab\r\n"
    dotted = b".a line that starts with a dot\r\n..two dots\r\n.\r\n"  # "." alone: stuffed
    body = (line * 1000 + dotted) * 66
    content = message("big", body=body)
    assert len(content) > 5 * 1000 * 1000
    with session(gw_big) as c:
        qid_of(send_message(c, [a], content, mail_args=f" SIZE={len(content)}"))
    msg = wait_rcpt(hop1, a, timeout=20)
    assert msg.data.endswith(content)
    added = msg.data[: -len(content)]
    assert added.startswith(b"Received: ") and added.count(b"Received:") == 1
    assert len(msg.data) == len(added) + len(content)


def test_8bitmime_body(gw: GatewayProcess, hop1: SinkServer) -> None:
    a = rcpt("eightbit")
    body = "Grüße, café, naïve — ünïcödé\r\n".encode() + b"latin-1: caf\xe9 \xff\xfe\r\n"
    content = message("eight bit", body=body)
    with session(gw) as c:
        qid_of(send_message(c, [a], content, mail_args=" BODY=8BITMIME"))
    msg = wait_rcpt(hop1, a)
    assert msg.data.endswith(content)
    assert "BODY=8BITMIME" in msg.mail_options


def test_smtputf8_addresses(gw: GatewayProcess, hop1: SinkServer) -> None:
    sender = "jörg@example.org"
    to = "zoë-ünïcode@targetdomain1.com"
    content = message("ünïcode", frm=sender, to=to, msgid="<utf8@example.org>", body="Hallo.\r\n")
    with session(gw) as c:
        r = c.cmd(f"MAIL FROM:<{sender}> SMTPUTF8 BODY=8BITMIME")
        assert r.raw == f"250 2.1.0 <{sender}>... Sender ok\r\n".encode()
        r = c.cmd(f"RCPT TO:<{to}>")
        assert r.raw == f"250 2.1.5 <{to}>... Recipient ok\r\n".encode()
        assert c.cmd("DATA").code == 354
        c.send(dot_stuff(content))
        qid_of(c.read_reply())
    msg = wait_rcpt(hop1, to)
    assert msg.mail_from == sender
    assert "SMTPUTF8" in msg.mail_options
    assert msg.data.endswith(content)
    assert b" with UTF8SMTP id " in msg.data


def test_a_utf8_address_needs_smtputf8(gw: GatewayProcess) -> None:
    """RFC 6531 §3.4, as Postfix answers: a UTF-8 sender or recipient in a transaction that
    did not declare SMTPUTF8 is refused; the same addresses with it are taken."""
    refusal = b"553 5.6.7 Must declare SMTPUTF8 to send unicode address\r\n"
    with session(gw) as c:
        assert c.cmd("MAIL FROM:<jörg@example.org>").raw == refusal
        assert c.cmd("MAIL FROM:<jörg@example.org> BODY=8BITMIME").raw == refusal
        assert c.cmd(f"MAIL FROM:<{SENDER}>").code == 250
        assert c.cmd("RCPT TO:<zoë@targetdomain1.com>").raw == refusal
        assert c.cmd("RCPT TO:<bob@targetdomain1.com>").code == 250
        assert c.cmd("RSET").code == 250
        assert c.cmd(f"MAIL FROM:<{SENDER}> SMTPUTF8").code == 250
        assert c.cmd("RCPT TO:<zoë@targetdomain1.com>").code == 250


def test_message_without_headers_keeps_its_body(gw: GatewayProcess, hop1: SinkServer) -> None:
    a = rcpt("no-headers")
    content = b"just a body line, no header section\r\nsecond line\r\n"
    with session(gw) as c:
        qid_of(send_message(c, [a], content))
    msg = wait_rcpt(hop1, a)
    lines, body = split_message(msg.data)
    # what we add is a header section of its own, separated from the body by an empty line
    assert body == content
    names = header_names(lines)
    assert names[0] == b"received" and names.count(b"received") == 1


@pytest.mark.parametrize("content", [b"only a body\r\n", b""], ids=["body-only", "empty"])
def test_message_without_headers_gets_message_id_and_date(
    gw: GatewayProcess, hop1: SinkServer, content: bytes
) -> None:
    a = rcpt(f"no-headers-id-{len(content)}")
    with session(gw) as c:
        qid = qid_of(send_message(c, [a], content))
    data = wait_rcpt(hop1, a).data
    assert data.endswith(b"\r\n\r\n" + content)
    lines, _ = split_message(data)
    names = header_names(lines)
    assert names.count(b"message-id") == 1 and names.count(b"date") == 1
    assert any(line.startswith(b"Message-Id: <") and qid.encode() in line for line in lines)


def test_message_without_body(gw: GatewayProcess, hop1: SinkServer) -> None:
    a = rcpt("no-body")
    content = (
        f"From: <{SENDER}>\r\nSubject: headers only\r\n"
        "Message-ID: <nobody@example.org>\r\nDate: Tue, 24 Nov 2026 19:17:12 +0000\r\n"
    ).encode()
    with session(gw) as c:
        qid_of(send_message(c, [a], content))
    msg = wait_rcpt(hop1, a)
    assert msg.data.endswith(content)
    lines, body = split_message(msg.data)
    assert body == b""
    names = header_names(lines)
    assert names[0] == b"received" and names.count(b"received") == 1
    assert names.count(b"message-id") == 1 and names.count(b"date") == 1


def test_empty_message(gw: GatewayProcess, hop1: SinkServer) -> None:
    a = rcpt("empty")
    with session(gw) as c:
        qid_of(send_message(c, [a], b""))
    msg = wait_rcpt(hop1, a)
    lines, body = split_message(msg.data)
    assert body == b""
    names = header_names(lines)
    assert names[0] == b"received" and names.count(b"received") == 1


def test_received_added_once_and_message_id_kept(gw: GatewayProcess, hop1: SinkServer) -> None:
    a = rcpt("received-once")
    content = (
        b"Received: from a.example by b.example; Tue, 24 Nov 2026 19:00:00 +0000\r\n"
        + message("has id")
    )
    with session(gw) as c:
        qid = qid_of(send_message(c, [a], content))
    msg = wait_rcpt(hop1, a)
    assert msg.data.endswith(content)
    added = msg.data[: -len(content)]
    assert re.fullmatch(
        rb"Received: from client\.example\.net \(\[127\.0\.0\.2\]\)\r\n"
        rb"\tby gateway\.example\.com \(mailgate\) with ESMTP id " + qid.encode() + rb"\r\n"
        rb"\tfor <received-once@targetdomain1\.com>; [^\r\n]+\r\n",
        added,
    ), added
    names = header_names(split_message(msg.data)[0])
    assert names.count(b"received") == 2 and names.count(b"message-id") == 1


def test_message_id_added_when_missing(gw: GatewayProcess, hop1: SinkServer) -> None:
    a = rcpt("no-msgid")
    content = message("no id", msgid=False)
    with session(gw) as c:
        qid = qid_of(send_message(c, [a], content))
    msg = wait_rcpt(hop1, a)
    lines, body = split_message(msg.data)
    assert body == b"Hi Bob.\r\n"
    names = header_names(lines)
    assert names.count(b"received") == 1 and names.count(b"message-id") == 1
    assert names.count(b"date") == 1  # the client's Date is kept, not doubled
    [mid] = [line for line in lines if line.lower().startswith(b"message-id:")]
    assert re.fullmatch(
        rb"Message-Id: <\d{12}\." + qid.encode() + rb"@gateway\.example\.com>", mid
    ), mid
    log = gw.wait_log(f"{qid}: from=<{SENDER}>")
    assert f"msgid={mid.split(b' ', 1)[1].decode()}" in log


def test_from_added_when_missing(gw: GatewayProcess, hop1: SinkServer) -> None:
    """RFC 5322 3.6 requires From:; as Sendmail, it is made from the envelope sender (and the
    null sender's is MAILER-DAEMON at our name)."""
    a, b = rcpt("no-from"), rcpt("no-from-null")
    content = b"To: <bob@targetdomain1.com>\r\nSubject: no from\r\n\r\nHello.\r\n"
    with session(gw) as c:
        qid_of(send_message(c, [a], content))
        assert c.cmd("MAIL FROM:<>").code == 250
        assert c.cmd(f"RCPT TO:<{b}>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(dot_stuff(content))
        qid_of(c.read_reply())
    lines, _ = split_message(wait_rcpt(hop1, a).data)
    assert [line for line in lines if line.lower().startswith(b"from:")] == [
        f"From: {SENDER}".encode()
    ]
    lines, _ = split_message(wait_rcpt(hop1, b).data)
    assert [line for line in lines if line.lower().startswith(b"from:")] == [
        f"From: MAILER-DAEMON@{HOSTNAME}".encode()
    ]
    # A message with From: keeps its own, and gets no second one.
    c_ = rcpt("has-from")
    with session(gw) as c:
        qid_of(send_message(c, [c_], message("has from")))
    lines, _ = split_message(wait_rcpt(hop1, c_).data)
    assert [line for line in lines if line.lower().startswith(b"from:")] == [
        f"From: <{SENDER}>".encode()
    ]


@pytest.mark.parametrize("piece", [None, 4096])
def test_header_limit_is_the_same_however_the_bytes_arrive(
    gw_big: GatewayProcess, hop1: SinkServer, piece: int | None
) -> None:
    filler = b"".join(f"X-Filler-{i}: {'v' * 70}\r\n".encode() for i in range(560))
    assert 40_000 < len(filler) < 50_000
    a = rcpt(f"big-headers-{piece}")
    with session(gw_big) as c:
        start_data(c, [a])
        wire = dot_stuff(message("big headers", headers=filler.decode()))
        if piece is None:
            c.send(wire)
        else:
            for i in range(0, len(wire), piece):
                c.send(wire[i : i + piece])
                time.sleep(0.005)  # each piece a read of its own
        r = c.read_reply()
        assert r.first == "552 5.6.0 Headers too large (32768 max)"
        assert c.cmd("NOOP").code == 250
    assert_not_delivered(hop1, a, grace=0.1)


# -- durability ----------------------------------------------------------------------------------


def second_names(spool: os.PathLike[str], path: os.PathLike[str]) -> list[str]:
    """The names in incoming/ and spare/ of the file at ``path``."""
    ino = os.stat(path).st_ino
    found = []
    for d in ("incoming", "spare"):
        folder = os.path.join(spool, d)
        for name in os.listdir(folder):
            with contextlib.suppress(FileNotFoundError):  # a spare taken meanwhile
                if os.stat(os.path.join(folder, name)).st_ino == ino:
                    found.append(f"{d}/{name}")
    return found


def test_250_only_after_the_file_is_in_the_queue(gw: GatewayProcess) -> None:
    """The reply to the end of data comes after commit: the file is already in spool/queue."""
    to = "held@deferred.example"  # its next hop is down, so the message stays queued
    content = message("durable")
    with session(gw) as c:
        start_data(c, [to])
        c.send(dot_stuff(content))
        r = c.read_reply()
        path = gw.spool / "queue" / qid_of(r)
        # checked before anything else happens: no waiting, no polling
        exists = path.exists()
        data = path.read_bytes() if exists else b""
        second = second_names(gw.spool, path)
    # The second name (incoming/<qid> for a new file, spare/ for a reused one), made durable
    # by the fsync, stays until the queue/ name is durable too: the deferral's status file is
    # fsync'd in queue/, and then it goes.
    assert exists and second
    envelope, _, stored = data.partition(b"\n")
    assert path.name.encode() in envelope and b"held@deferred.example" in envelope
    assert stored.startswith(b"Received: ") and stored.endswith(content)
    wait_until(lambda: not second_names(gw.spool, path), "the second name to go")
    assert (gw.spool / "queue" / (path.name + ".st")).exists()
