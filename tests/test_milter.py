"""Milters end to end: the real daemon, smtplib clients, a sink as the next hop, and a filter
of our own (tests/support/milter.py, on kilter.protocol's codec) for every reply and change,
and for filters that fail: down, dying mid-body, too slow, speaking nonsense, each with its
default action. The real filters (OpenDKIM, rspamd, clamav-milter) are test_milter_peers.py's.
"""

from __future__ import annotations

import contextlib
import os
import re
import smtplib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kilter.protocol import messages as km

from tests.support.gateway import GatewayProcess, free_port, mailgate_command, run_cli
from tests.support.milter import QuitNewConnection, TestMilter
from tests.support.scrape import scrape, value
from tests.support.sink import SinkServer
from tests.support.world import (
    HOP1,
    HOSTNAME,
    OUTSIDE,
    SENDER_DNS,
    GatewayFactory,
    World,
    issue_world,
    message,
    wait_until,
)

DNS_RECORDS = SENDER_DNS


def milter_entry(name: str, socket: str, **settings: str) -> str:
    lines = [f'name = "{name}"', f'socket = "{socket}"']
    lines += [f"{key} = {value}" for key, value in settings.items()]
    return "[[milter]]\n" + "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def milter() -> Iterator[TestMilter]:
    with TestMilter() as m:
        yield m


@pytest.fixture
def filt(milter: TestMilter) -> TestMilter:
    """The module's filter, plain again (continue everywhere, accept at the end)."""
    return milter.configure()


@pytest.fixture(scope="module")
def world(hop1: SinkServer, mx_port: int) -> World:
    return issue_world(hop1.port, mx_port).but(
        settings='[smtp]\nmax_message_size = "200M"\n[queue]\nmin_free = 0\n'
    )


METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def gw(module_gateway: GatewayFactory, world: World, milter: TestMilter) -> GatewayProcess:
    return module_gateway(
        world.but(
            settings='pid_file = "mailgate.pid"\n'
            f'[metrics]\nlisten = "127.0.0.1:{METRICS_PORT}"\n'
            '[submission]\nmilters = ["test"]\n'
            + milter_entry("test", milter.socket, read_timeout='"2s"', eom_timeout='"2s"')
        )
    )


def counted(name: str, **labels: str) -> float:
    return value(scrape("127.0.0.1", METRICS_PORT), name, **labels)


def verdicts(milter: str = "test", port: int = METRICS_PORT) -> dict[tuple[str, str], float]:
    """(stage, verdict) → count of one filter, from a scrape of the metrics listener."""
    return {
        (labels["stage"], labels["verdict"]): n
        for (name, key), n in scrape("127.0.0.1", port).items()
        if name == "mailgate_milter_verdicts_total"
        for labels in [dict(key)]
        if labels["milter"] == milter
    }


def added(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> dict:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


@dataclass
class Dialogue:
    """What each command of one transaction got."""

    mail: tuple[int, str]
    rcpts: list[tuple[int, str]]
    data: tuple[int, str] | None
    qid: str | None

    @property
    def accepted(self) -> bool:
        return self.data is not None and self.data[0] == 250


def send(
    gw: GatewayProcess,
    content: bytes,
    *,
    rcpts: tuple[str, ...] = ("bob@targetdomain1.com",),
    sender: str = "alice@example.org",
    options: tuple[str, ...] = (),
    port: int | None = None,
    client: smtplib.SMTP | None = None,
) -> Dialogue:
    """One transaction; the session is left open when ``client`` is given."""
    s = client or smtplib.SMTP(gw.host, port or gw.port, source_address=(OUTSIDE, 0), timeout=30)
    try:
        if client is None:
            s.ehlo("client.example.net")
        code, text = s.mail(sender, list(options))
        mail = (code, text.decode())
        rcpt_replies = []
        if code == 250:
            rcpt_replies = [(c, t.decode()) for c, t in (s.rcpt(r) for r in rcpts)]
        data = None
        if any(c == 250 for c, _ in rcpt_replies):
            data = _data(s, content)
        qid = data[1].split()[1] if data and data[0] == 250 else None
        return Dialogue(mail, rcpt_replies, data, qid)
    finally:
        if client is None:
            with contextlib.suppress(smtplib.SMTPServerDisconnected):
                s.quit()


def _data(s: smtplib.SMTP, content: bytes) -> tuple[int, str]:
    """DATA without smtplib's exception on a refusal (its reply is the point here)."""
    code, text = s.docmd("DATA")
    if code != 354:
        return code, text.decode()
    s.send(content.replace(b"\r\n.", b"\r\n..") + b".\r\n")
    code, text = s.getreply()
    return code, text.decode()


def queue_empty(gw: GatewayProcess) -> bool:
    return gw.queued() == [] and not os.listdir(gw.spool / "incoming")


# -- the events ------------------------------------------------------------------------------------


def test_every_event_in_smtp_order_with_its_macros(
    gw: GatewayProcess, filt: TestMilter, hop1: SinkServer
) -> None:
    before = verdicts()
    got = send(
        gw,
        message("events", headers="X-Folded: one\r\n\ttwo\r\n"),
        rcpts=("bob@targetdomain1.com", "carol@targetdomain1.com"),
        options=("SIZE=400", "BODY=8BITMIME"),
    )
    assert got.accepted
    hop1.wait_subject("events")
    filt.wait_event("Close")
    assert filt.names() == [
        "Negotiate",
        "Connect",
        "Helo",
        "EnvelopeFrom",
        "EnvelopeRecipient",
        "EnvelopeRecipient",
        "Data",
        *["Header"] * 6,
        "EndOfHeaders",
        "Body",
        "EndOfMessage",
        "Close",
    ]
    [connect] = filt.events("Connect")
    assert connect == km.Connect("[127.0.0.2]", km.ip_address(OUTSIDE), connect.port)
    assert filt.events("Helo") == [km.Helo("client.example.net")]
    assert filt.events("EnvelopeFrom") == [
        km.EnvelopeFrom(b"<alice@example.org>", [b"SIZE=400", b"BODY=8BITMIME"])
    ]
    assert [bytes(e.recipient) for e in filt.events("EnvelopeRecipient")] == [  # type: ignore[attr-defined]
        b"<bob@targetdomain1.com>",
        b"<carol@targetdomain1.com>",
    ]
    # Our own Received: is not shown; one leading space goes; folding as LF.
    headers = [(h.name, bytes(h.value)) for h in filt.events("Header")]  # type: ignore[attr-defined]
    assert headers[0] == ("From", b"<alice@example.org>")
    assert ("X-Folded", b"one\n\ttwo") in headers
    assert filt.events("Body") == [km.Body(b"Hi Bob.\r\n")]
    c = filt.macros(b"C")
    assert (c["j"], c["{client_addr}"], c["{daemon_name}"], c["{client_resolve}"]) == (
        "gateway.example.com",
        OUTSIDE,
        "MTA",
        "FAIL",
    )
    assert int(c["{client_port}"]) == connect.port
    assert filt.macros(b"M")["{mail_addr}"] == "alice@example.org"
    assert filt.macros(b"R")["{rcpt_addr}"] == "carol@targetdomain1.com"
    # The queue id is made at MAIL (as Sendmail's): the filters have it from there on.
    assert filt.macros(b"M")["i"] == got.qid == filt.macros(b"R")["i"]
    assert filt.macros(b"T")["i"] == got.qid == filt.macros(b"E")["i"]
    assert filt.macros(b"E")["{msg_id}"] == "<events@example.org>"
    # Every answer counted by filter, stage and verdict (connect left out: the daemon's
    # start-up probe, a session of its own, may be counted after ``before``).
    changed = added(before, verdicts())
    del changed[("connect", "continue")]
    assert changed == {
        ("helo", "continue"): 1,
        ("mail", "continue"): 1,
        ("rcpt", "continue"): 2,
        ("data", "continue"): 1,
        ("header", "continue"): 6,
        ("eoh", "continue"): 1,
        ("body", "continue"): 1,
        ("eom", "accept"): 1,
    }


def test_rset_aborts_the_filter_s_message(gw: GatewayProcess, filt: TestMilter) -> None:
    with smtplib.SMTP(gw.host, gw.port, source_address=(OUTSIDE, 0)) as s:
        s.ehlo("client.example.net")
        s.mail("alice@example.org")
        s.rcpt("bob@targetdomain1.com")
        s.rset()
        s.noop()  # the ABORT went before this reply
        wait_until(lambda: "Abort" in filt.names(), "ABORT at the filter")
        assert filt.names()[-3:] == ["EnvelopeFrom", "EnvelopeRecipient", "Abort"]


def test_unknown_commands_reach_the_filter(gw: GatewayProcess, filt: TestMilter) -> None:
    with smtplib.SMTP(gw.host, gw.port, source_address=(OUTSIDE, 0)) as s:
        s.ehlo("client.example.net")
        assert s.docmd("XYZZY", "magic")[0] == 500
    filt.wait_event("Unknown")
    assert filt.events("Unknown") == [km.Unknown(b"XYZZY magic\0")]


# -- the verdicts ----------------------------------------------------------------------------------


def test_refusals_at_each_stage(gw: GatewayProcess, filt: TestMilter, hop1: SinkServer) -> None:
    before = counted("mailgate_rejections_total", reason="milter")
    answers = verdicts()
    filt.configure(replies={"EnvelopeFrom": [km.Reject()]})
    assert send(gw, message("mail refused")).mail == (550, "5.7.1 Command rejected")
    gw.wait_log("Milter: from=<alice@example.org>, reject=550 5.7.1 Command rejected")

    filt.configure(rcpt_replies={"<carol@targetdomain1.com>": [km.TemporaryFailure()]})
    got = send(gw, message("one rcpt"), rcpts=("bob@targetdomain1.com", "carol@targetdomain1.com"))
    assert got.rcpts[1] == (451, "4.3.2 Please try again later") and got.accepted
    [msg] = hop1.wait_subject("one rcpt")
    assert msg.rcpt_tos == ["bob@targetdomain1.com"]

    filt.configure(replies={"Data": [km.ReplyCode(b"550 5.7.0 No data from you\0")]})
    got = send(gw, message("data refused"))
    assert got.data == (550, "5.7.0 No data from you")
    gw.wait_log("Milter: cmd=data, reject=550 5.7.0 No data from you")

    filt.configure(replies={"Helo": [km.Reject()]})
    with smtplib.SMTP(gw.host, gw.port, source_address=(OUTSIDE, 0)) as s:
        assert s.ehlo("client.example.net")[0] == 550
    gw.wait_log("Milter: helo=client.example.net, reject=550 5.7.1 Command rejected")
    # MAIL, one RCPT, DATA and HELO: each refusal counted once.
    assert counted("mailgate_rejections_total", reason="milter") == before + 4
    changed = added(answers, verdicts())
    assert (changed[("mail", "reject")], changed[("rcpt", "tempfail")]) == (1, 1)
    assert (changed[("data", "replycode")], changed[("helo", "reject")]) == (1, 1)


def test_rejected_recipients_go_to_filters_that_ask_for_them(
    gw: GatewayProcess, filt: TestMilter, hop1: SinkServer
) -> None:
    """SMFIP_RCPT_REJ: our refusal is sent too, with Sendmail's macros for it; what the
    filter answers to it does not change our answer. A filter that did not ask gets none."""
    rcpts = ("nobody@elsewhere.example", "bob@targetdomain1.com")
    filt.configure(
        protocol=km.ProtocolFlags.RCPT_REJ,
        rcpt_replies={"<nobody@elsewhere.example>": [km.Reject()]},
    )
    got = send(gw, message("rcpt rej"), rcpts=rcpts)
    refusal = "<nobody@elsewhere.example>... Relaying denied. IP name lookup failed [127.0.0.2]"
    assert got.rcpts[0] == (550, f"5.7.1 {refusal}")
    assert got.accepted
    hop1.wait_subject("rcpt rej")
    filt.wait_event("Close")
    [session] = filt._sessions()
    at = [i for i, m in enumerate(session) if isinstance(m, km.EnvelopeRecipient)]
    assert [bytes(session[i].recipient) for i in at] == [  # type: ignore[attr-defined]
        b"<nobody@elsewhere.example>",
        b"<bob@targetdomain1.com>",
    ]
    rejected, accepted = (session[i - 1] for i in at)  # each one's macros come first
    assert isinstance(rejected, km.Macro) and isinstance(accepted, km.Macro)
    assert rejected.macros == {
        "i": got.qid,
        "{rcpt_addr}": refusal,
        "{rcpt_host}": "5.7.1",
        "{rcpt_mailer}": "error",
    }
    # The delivery agent and next hop the recipient resolves to, as Sendmail's: here the
    # mailertable's smtp:[127.0.0.5] (with our port), not the domain and "esmtp".
    assert (accepted.macros["{rcpt_mailer}"], accepted.macros["{rcpt_host}"]) == (
        "smtp",
        f"[{HOP1}]:{hop1.port}",
    )
    # The refusal's maillog line has the transaction's queue id, as Sendmail's.
    assert gw.log_lines(f"{got.qid}: ruleset=check_rcpt, arg1=<nobody@elsewhere.example>")

    filt.configure()
    got = send(gw, message("no rcpt rej"), rcpts=rcpts)
    assert got.accepted
    filt.wait_event("Close")
    assert filt.names().count("EnvelopeRecipient") == 1


def test_the_sendmail_command_goes_through_the_submission_filters(
    gw: GatewayProcess, filt: TestMilter, hop1: SinkServer
) -> None:
    """``[submission] milters``: a local submission is a session from localhost to them,
    and their refusal is the command's exit status and message."""
    filt.configure(eom=[km.AddHeader("X-Local", b"filtered")])
    content = b"From: root\nSubject: local submission\n\nHello.\n"
    done = submit(gw, content)
    assert done.returncode == 0, done.stderr
    [msg] = hop1.wait_subject("local submission")
    assert b"\r\nX-Local: filtered\r\n" in msg.data
    filt.wait_event("Close")
    assert filt.names()[:6] == [
        "Negotiate",
        "Connect",
        "Helo",
        "EnvelopeFrom",
        "EnvelopeRecipient",
        "Data",
    ]
    [connect] = filt.events("Connect")
    assert (connect.hostname, str(connect.address)) == ("localhost", "127.0.0.1")  # type: ignore[attr-defined]
    assert filt.events("Helo") == [km.Helo("localhost")]
    assert filt.macros(b"M")["{mail_addr}"] == f"root@{HOSTNAME}"

    # A recipient they refuse is the command's refused recipient; the others get it.
    filt.configure(rcpt_replies={"<carol@targetdomain1.com>": [km.Reject()]})
    one = submit(gw, content.replace(b"local submission", b"one of two"), "carol@targetdomain1.com")
    assert (one.returncode, one.stderr.strip()) == (
        os.EX_DATAERR,  # the filter's 550 5.7.1: Sendmail's dsntoexitstat of a 5.7.x
        "carol@targetdomain1.com... Command rejected",
    )
    [msg] = hop1.wait_subject("one of two")
    assert msg.rcpt_tos == ["bob@targetdomain1.com"]

    filt.configure(eom_verdict=km.ReplyCode(b"554 5.7.1 Not from here\0"))
    refused = submit(gw, content.replace(b"local submission", b"refused submission"))
    assert (refused.returncode, refused.stderr.strip()) == (
        os.EX_UNAVAILABLE,
        "sendmail: 554 5.7.1 Not from here",
    )
    filt.configure(replies={"EnvelopeFrom": [km.TemporaryFailure()]})
    later = submit(gw, content)
    assert (later.returncode, later.stderr.strip()) == (
        os.EX_TEMPFAIL,
        "sendmail: 451 4.3.2 Please try again later",
    )
    assert gw.queued() == []  # neither was queued


def submit(gw: GatewayProcess, content: bytes, *more: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*mailgate_command("sendmail"), "-C", str(gw.config), "bob@targetdomain1.com", *more],
        input=content.decode(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_verdicts_for_the_whole_connection(
    gw: GatewayProcess, filt: TestMilter, hop1: SinkServer
) -> None:
    filt.configure(replies={"Connect": [km.Reject()]})
    with smtplib.SMTP(gw.host, gw.port, source_address=(OUTSIDE, 0)) as s:
        assert s.ehlo("client.example.net")[0] == 250
        assert s.mail("alice@example.org") == (550, b"5.7.1 Command rejected")
    gw.wait_log("Milter: connect: host=[127.0.0.2], addr=127.0.0.2, rejecting commands")
    filt.configure(replies={"Connect": [km.Accept()]})
    assert send(gw, message("accepted at connect")).accepted
    hop1.wait_subject("accepted at connect")
    [conn] = filt.connections
    assert [type(m).__name__ for m in conn if not isinstance(m, km.Macro)] == [
        "Negotiate",
        "Connect",
    ]


def test_a_reply_code_at_end_of_data_spools_nothing(gw: GatewayProcess, filt: TestMilter) -> None:
    filt.configure(eom_verdict=km.ReplyCode(b"554 5.7.1 Gtube pattern\0"))
    got = send(gw, message("gtube-ish"))
    assert got.data == (554, "5.7.1 Gtube pattern") and got.qid is None
    gw.wait_log("Milter: data, reject=554 5.7.1 Gtube pattern")
    [line] = gw.log_lines("Milter: data, reject=554 5.7.1 Gtube pattern")
    qid = line.split(": ")[1]
    assert not gw.log_lines(f"{qid}: from=")  # never committed
    assert queue_empty(gw)


def test_multiline_replies_and_reject_text(gw: GatewayProcess, filt: TestMilter) -> None:
    filt.configure(eom_verdict=km.ReplyCode(b"550-5.7.1 first line\r\n550 5.7.1 second 100%%\0"))
    with smtplib.SMTP(gw.host, gw.port, source_address=(OUTSIDE, 0)) as s:
        s.ehlo("client.example.net")
        s.mail("alice@example.org")
        s.rcpt("bob@targetdomain1.com")
        assert _data(s, message("multi")) == (550, "5.7.1 first line\n5.7.1 second 100%")
    filt.configure(eom_verdict=km.Reject())
    assert send(gw, message("plain reject")).data == (554, "5.7.1 Command rejected")
    filt.configure(eom_verdict=km.TemporaryFailure())
    assert send(gw, message("plain tempfail")).data == (451, "4.3.2 Please try again later")


def test_discard(gw: GatewayProcess, filt: TestMilter, hop1: SinkServer) -> None:
    filt.configure(eom_verdict=km.Discard())
    got = send(gw, message("discarded"))
    assert got.data is not None and got.data[0] == 250
    log = gw.wait_log(": Milter: data, discard")
    assert queue_empty(gw) and not hop1.with_subject("discarded")
    assert "Milter: data, discard" in log
    filt.configure(replies={"EnvelopeFrom": [km.Discard()]})
    assert send(gw, message("discarded at mail")).accepted
    gw.wait_log("Milter: from=<alice@example.org>, discard")
    assert not hop1.with_subject("discarded at mail")


def test_a_421_reply_closes_the_session(gw: GatewayProcess, filt: TestMilter) -> None:
    filt.configure(replies={"EnvelopeFrom": [km.ReplyCode(b"421 4.7.0 go away\0")]})
    with smtplib.SMTP(gw.host, gw.port, source_address=(OUTSIDE, 0)) as s:
        s.ehlo("client.example.net")
        assert s.mail("alice@example.org") == (421, b"4.7.0 go away")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            s.noop()


def test_progress_keeps_a_slow_filter_alive(
    gw: GatewayProcess, filt: TestMilter, hop1: SinkServer
) -> None:
    """eom_timeout is 2 s; three progress replies 1.2 s apart take 3.6 s, and each restarts it."""
    filt.configure(progress=3, delay=1.2)
    assert send(gw, message("slow but alive")).accepted
    hop1.wait_subject("slow but alive")


def test_skip_ends_the_body(gw: GatewayProcess, filt: TestMilter, hop1: SinkServer) -> None:
    filt.configure(protocol=km.ProtocolFlags.SKIP, replies={"Body": [km.Skip()]})
    assert send(gw, message("skipped", size=300_000)).accepted
    hop1.wait_subject("skipped")
    assert len(filt.events("Body")) == 1 and filt.events("EndOfMessage")


def test_no_reply_steps(gw: GatewayProcess, filt: TestMilter, hop1: SinkServer) -> None:
    everything = km.ProtocolFlags(0)
    for flag in (
        "NR_CONNECT",
        "NR_HELO",
        "NR_SENDER",
        "NR_RECIPIENT",
        "NR_DATA",
        "NR_HEADER",
        "NR_END_OF_HEADERS",
        "NR_BODY",
    ):
        everything |= getattr(km.ProtocolFlags, flag)
    filt.configure(protocol=everything, eom=[km.AddHeader("X-Spam-Status", b"No")])
    assert send(gw, message("no replies")).accepted
    [msg] = hop1.wait_subject("no replies")
    assert b"\r\nX-Spam-Status: No\r\n" in msg.data


def test_declined_steps_are_not_sent(gw: GatewayProcess, filt: TestMilter) -> None:
    filt.configure(
        protocol=km.ProtocolFlags.NO_HELO | km.ProtocolFlags.NO_HEADERS | km.ProtocolFlags.NO_BODY
    )
    assert send(gw, message("declined")).accepted
    filt.wait_event("EndOfMessage")
    names = filt.names()
    assert "Helo" not in names and "Header" not in names and "Body" not in names
    assert "EndOfHeaders" in names


# -- the changes -----------------------------------------------------------------------------------


def test_every_change_before_the_250(
    gw: GatewayProcess, filt: TestMilter, hop1: SinkServer
) -> None:
    filt.configure(
        eom=[
            km.InsertHeader(0, "X-Top", b"inserted at the top"),
            km.AddHeader("X-Report", b"line one;\n\tline two"),
            km.ChangeHeader(1, "Subject", b"[filtered] changes"),
            km.ChangeHeader(1, "X-Drop", b""),
            km.ChangeHeader(3, "X-Report", b"a third"),  # there is one: added, as Sendmail
            km.ChangeSender("<bounces@example.org>"),
            km.AddRecipientPar("<carol@targetdomain1.com>", "NOTIFY=NEVER"),
            km.RemoveRecipient("<bob@targetdomain1.com>"),
            km.ReplaceBody(b"A new body\nwith bare LF\n"),
            km.ReplaceBody(b"in two chunks.\n"),
        ]
    )
    got = send(gw, message("changes", headers="X-Drop: me\r\n"))
    assert got.accepted
    [msg] = hop1.wait_subject("[filtered] changes")
    assert msg.mail_from == "bounces@example.org"
    assert msg.rcpt_tos == ["carol@targetdomain1.com"]
    head, _, body = msg.data.partition(b"\r\n\r\n")
    assert head.startswith(b"X-Top: inserted at the top\r\nReceived: from client.example.net")
    assert b"\r\nX-Report: line one;\r\n\tline two" in head and b"X-Drop" not in head
    assert head.endswith(b"\r\nX-Report: a third")
    assert body == b"A new body\r\nwith bare LF\r\nin two chunks.\r\n"
    log = gw.log()
    for line in (
        f"{got.qid}: Milter insert (0): header: X-Top: inserted at the top",
        f"{got.qid}: Milter change: header Subject: from changes to [filtered] changes",
        f"{got.qid}: Milter delete: header X-Drop: me",
        f"{got.qid}: Milter change (add): header: X-Report: a third",
        f"{got.qid}: Milter chgfrom: <bounces@example.org>",
        f"{got.qid}: Milter add: rcpt: <carol@targetdomain1.com>",
        f"{got.qid}: Milter delete: rcpt <bob@targetdomain1.com>",
        f"{got.qid}: Milter message: body replaced",
        f"{got.qid}: from=<bounces@example.org>, size=",
    ):
        assert line in log, line


@pytest.mark.parametrize("size", [None, 1024 * 1024], ids=["small", "spilled"])
def test_added_header_fields_and_the_body_as_sent(
    gw: GatewayProcess, filt: TestMilter, hop1: SinkServer, size: int | None
) -> None:
    """The change OpenDKIM and rspamd make to every message: fields added, the body left
    alone. A small message is edited in its write buffer (never spilled: no file yet), a
    1 MiB one (spilled to its file) copied into a new file; each is delivered with the new
    fields where the filter put them and every other byte as the client sent it."""
    filt.configure(
        eom=[
            km.InsertHeader(0, "DKIM-Signature", b"v=1; a=rsa-sha256;\n\tb=xyz"),
            km.AddHeader("X-Spam", b"no"),
        ]
    )
    subject = f"fields added {size}"
    content = message(subject, size=size)
    got = send(gw, content)
    assert got.accepted
    [msg] = hop1.wait_subject(subject)
    assert msg.rcpt_tos == ["bob@targetdomain1.com"]
    head, _, body = msg.data.partition(b"\r\n\r\n")
    sent_head, _, sent_body = content.partition(b"\r\n\r\n")
    assert body == sent_body
    assert head.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;\r\n\tb=xyz\r\nReceived: from ")
    assert head.endswith(b"\r\n" + sent_head + b"\r\nX-Spam: no")
    assert f"{got.qid}: Milter add: header: X-Spam: no" in gw.log()


def test_quarantine_puts_the_message_on_hold(
    gw: GatewayProcess, filt: TestMilter, hop1: SinkServer
) -> None:
    filt.configure(eom=[km.Quarantine("suspicious attachment")])
    got = send(gw, message("quarantined"))
    assert got.accepted and got.qid
    gw.wait_log(f"{got.qid}: placed on hold, reason=suspicious attachment")
    assert f"{got.qid}: milter=test, quarantine=suspicious attachment" in gw.log()
    rc = run_cli("mailq", "-c", str(gw.config))
    assert rc.returncode == 0
    assert got.qid not in rc.stdout  # held: only in the quarantine listing
    rc = run_cli("mailq", "--quarantined", "-c", str(gw.config))
    assert rc.returncode == 0
    lines = rc.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(got.qid))
    assert lines[at].startswith(f"{got.qid} ")
    assert lines[at + 1] == "     QUARANTINE: suspicious attachment"
    assert not hop1.with_subject("quarantined")
    filt.configure()
    assert run_cli("release", "-c", str(gw.config), got.qid).returncode == 0
    hop1.wait_subject("quarantined")


def test_a_message_larger_than_memory_streams_through(
    gw: GatewayProcess, filt: TestMilter, hop1: SinkServer
) -> None:
    """64 MiB in, the body sent to the filter in chunks from the spool file, a 64 MiB new body
    streamed back into a file: the daemon's peak memory grows by far less than the message."""
    assert gw.proc is not None
    peak_before = _vm_hwm(gw.proc.pid)
    chunk = b"y" * 65000 + b"\n"
    filt.configure(eom=[km.ReplaceBody(chunk)] * 1000)  # ~64 MiB
    hop1.discard_data = True
    try:
        got = send(gw, message("big", size=64 * 1024 * 1024))
        assert got.accepted
        msg = wait_until(
            lambda: next((m for m in hop1.messages if m.size >= 1000 * 65002), None),
            "the big message at the sink",
            60,
        )
    finally:
        hop1.discard_data = False
    assert sum(len(b.content) for b in filt.events("Body")) >= 64 * 1024 * 1024 - 1000  # type: ignore[attr-defined]
    assert _vm_hwm(gw.proc.pid) - peak_before < 32 * 1024 * 1024
    assert msg.size >= 1000 * 65002


def _vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


# -- several filters -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def second() -> Iterator[TestMilter]:
    with TestMilter() as m:
        yield m


@pytest.fixture(scope="module")
def two(
    module_gateway: GatewayFactory, world: World, milter: TestMilter, second: TestMilter
) -> GatewayProcess:
    return module_gateway(
        world.but(
            settings=milter_entry("first", milter.socket) + milter_entry("second", second.socket)
        )
    )


def test_filters_compose_in_order(
    two: GatewayProcess, filt: TestMilter, second: TestMilter, hop1: SinkServer
) -> None:
    filt.configure(eom=[km.AddHeader("X-First", b"1")])
    second.configure(eom=[km.ChangeHeader(1, "X-First", b"changed by the second")])
    assert send(two, message("composed")).accepted
    [msg] = hop1.wait_subject("composed")
    assert b"\r\nX-First: changed by the second\r\n" in msg.data
    assert ("X-First", b"1") in [(h.name, bytes(h.value)) for h in second.events("Header")]  # type: ignore[attr-defined]


def test_the_first_refusal_wins(two: GatewayProcess, filt: TestMilter, second: TestMilter) -> None:
    filt.configure(replies={"EnvelopeFrom": [km.Reject()]})
    second.configure()
    assert send(two, message("first says no")).mail[0] == 550
    second.wait_event("Close")
    assert "EnvelopeFrom" not in second.names()


# -- filters that fail -----------------------------------------------------------------------------

ACTIONS = ("tempfail", "reject", "accept", "quarantine", "shutdown")
FAILING_METRICS = free_port()


def failures(milter: str) -> dict[str, float]:
    """reason → count of one filter's failures, from a scrape of the metrics listener."""
    samples = scrape("127.0.0.1", FAILING_METRICS)
    return {
        labels["reason"]: n
        for (name, key), n in samples.items()
        if name == "mailgate_milter_failures_total"
        for labels in [dict(key)]
        if labels["milter"] == milter
    }


@pytest.fixture(scope="module")
def dying() -> Iterator[TestMilter]:
    with TestMilter() as m:
        yield m


@pytest.fixture(scope="module")
def failing(
    module_gateway: GatewayFactory, world: World, dying: TestMilter
) -> tuple[GatewayProcess, dict[str, int]]:
    """One listener per default action, each with its own [[milter]] entry for the same
    filter: the sessions of each listener see that action."""
    ports = {action: free_port() for action in (*ACTIONS, "nowhere")}
    listen = ", ".join(f'"127.0.0.1:{p}"' for p in ports.values())
    entries = "".join(
        milter_entry(
            f"dying-{action}",
            dying.socket,
            default_action=f'"{action}"',
            listen=f'["127.0.0.1:{port}"]',
            read_timeout='"1s"',
            eom_timeout='"1s"',
        )
        for action, port in ports.items()
        if action in ACTIONS
    )
    entries += milter_entry(  # nothing listens there
        "nowhere",
        f"inet:{free_port()}@127.0.0.1",
        default_action='"accept"',
        listen=f'["127.0.0.1:{ports["nowhere"]}"]',
    )
    gw = module_gateway(
        world.but(
            settings=f"listen = [{listen}]\n"
            f'[metrics]\nlisten = "127.0.0.1:{FAILING_METRICS}"\n' + entries
        ),
        start=False,
    )
    gw.port = ports["accept"]  # what the daemon's start waits for
    gw.start()
    return gw, ports


def test_a_filter_that_dies_mid_body(
    failing: tuple[GatewayProcess, dict[str, int]], dying: TestMilter, hop1: SinkServer
) -> None:
    gw, ports = failing
    dying.configure(die_at="Body")
    big = message("dies", size=200_000)
    got = send(gw, big, port=ports["tempfail"])
    assert got.data == (451, "4.7.1 Service unavailable - try again later")
    failed = "Milter (dying-tempfail): connection closed by filter, where=body, default_action="
    gw.wait_log(failed)
    # In a transaction, with its queue id (as Sendmail's e_id), as the message's other lines.
    (line,) = gw.log_lines(failed)
    assert re.search(r"mailgate\[\d+\]: \w{14}: Milter \(dying-tempfail\)", line), line
    assert send(gw, big, port=ports["reject"]).data == (550, "5.5.0 Service unavailable")
    accepted = send(gw, message("dies but accepted", size=200_000), port=ports["accept"])
    assert accepted.accepted
    hop1.wait_subject("dies but accepted")
    held = send(gw, message("dies so held", size=200_000), port=ports["quarantine"])
    assert held.accepted
    gw.wait_log(f"{held.qid}: placed on hold, reason=milter dying-quarantine unavailable")
    with smtplib.SMTP(gw.host, ports["shutdown"], source_address=(OUTSIDE, 0)) as s:
        s.ehlo("client.example.net")
        s.mail("alice@example.org")
        s.rcpt("bob@targetdomain1.com")
        assert _data(s, big) == (421, "4.7.0 gateway.example.com closing connection")
    assert gw.queued() == [held.qid]  # the held one only: nothing refused was spooled


def test_after_a_failure_the_session_keeps_the_default_action(
    failing: tuple[GatewayProcess, dict[str, int]], dying: TestMilter
) -> None:
    gw, ports = failing
    dying.configure(die_at="EnvelopeRecipient")
    with smtplib.SMTP(gw.host, ports["tempfail"], source_address=(OUTSIDE, 0)) as s:
        s.ehlo("client.example.net")
        s.mail("alice@example.org")
        assert s.rcpt("bob@targetdomain1.com") == (
            451,
            b"4.7.1 Service unavailable - try again later",
        )
        s.rset()
        assert s.mail("alice@example.org")[0] == 451  # every later transaction, as Postfix


def test_a_filter_that_is_down(
    failing: tuple[GatewayProcess, dict[str, int]], dying: TestMilter
) -> None:
    gw, ports = failing
    before = failures("dying-tempfail")
    dying.configure(die_at="Negotiate")
    with smtplib.SMTP(gw.host, ports["tempfail"], source_address=(OUTSIDE, 0)) as s:
        # As Sendmail: the session is no longer the filters' once refused at connect, so
        # HELO is answered as ever, and MAIL, RCPT and DATA get the refusal.
        assert s.ehlo("client.example.net")[0] == 250
        assert s.mail("alice@example.org") == (451, b"4.7.1 Service unavailable - try again later")
    gw.wait_log(
        "Milter (dying-tempfail): connection closed by filter, where=negotiate, "
        "default_action=tempfail"
    )
    gw.wait_log("Milter: connect: host=[127.0.0.2], addr=127.0.0.2, temp failing commands")
    assert added(before, failures("dying-tempfail")) == {"closed": 1}
    assert verdicts("dying-tempfail", FAILING_METRICS)[("negotiate", "failed")] == 1
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP(gw.host, ports["shutdown"], source_address=(OUTSIDE, 0))
    assert refused.value.smtp_code == 421
    assert send(gw, message("down, accepted"), port=ports["accept"]).accepted


def test_a_filter_that_is_too_slow(
    failing: tuple[GatewayProcess, dict[str, int]], dying: TestMilter
) -> None:
    gw, ports = failing
    before = failures("dying-reject"), verdicts("dying-reject", FAILING_METRICS)
    dying.configure(hang_at="EnvelopeFrom")
    assert send(gw, message("slow"), port=ports["reject"]).mail == (
        550,
        "5.5.0 Service unavailable",
    )
    gw.wait_log(
        "Milter (dying-reject): timeout before data read, where=mail, default_action=reject"
    )
    assert added(before[0], failures("dying-reject")) == {"timeout": 1}
    assert added(before[1], verdicts("dying-reject", FAILING_METRICS)) == {
        ("connect", "continue"): 1,
        ("helo", "continue"): 1,
        ("mail", "failed"): 1,
    }


def test_a_filter_that_cannot_be_reached(
    failing: tuple[GatewayProcess, dict[str, int]], hop1: SinkServer
) -> None:
    gw, ports = failing
    assert send(gw, message("nobody filters"), port=ports["nowhere"]).accepted  # accept
    hop1.wait_subject("nobody filters")
    assert failures("nowhere") == {
        "connect": 1,
        "timeout": 0,
        "closed": 0,
        "protocol": 0,
        "io": 0,
    }


def test_a_filter_that_speaks_nonsense(
    failing: tuple[GatewayProcess, dict[str, int]], dying: TestMilter
) -> None:
    gw, ports = failing
    before = failures("dying-tempfail")
    dying.configure(replies={"EnvelopeFrom": [km.AddHeader("X-Too", b"early")]})
    assert send(gw, message("nonsense"), port=ports["tempfail"]).mail[0] == 451
    gw.wait_log(
        "Milter (dying-tempfail): protocol error: AddHeader in answer to mail, where=mail, "
        "default_action=tempfail"
    )
    assert added(before, failures("dying-tempfail")) == {"protocol": 1}
    dying.configure(eom=[km.AddHeader("Bad Name", b"x")])
    assert send(gw, message("bad header name"), port=ports["reject"]).data == (
        550,
        "5.5.0 Service unavailable",
    )
    gw.wait_log("Milter (dying-reject): protocol error: bad header name 'Bad Name', where=eom")


def test_no_filter_no_milter_connection(
    make_gateway: GatewayFactory, world: World, hop1: SinkServer
) -> None:
    """Filters on another listener only: this listener's sessions never contact them."""
    with TestMilter() as lonely:
        port, other = free_port(), free_port()
        gw = make_gateway(
            world.but(
                settings=f'listen = ["127.0.0.1:{port}", "127.0.0.1:{other}"]\n'
                + milter_entry("elsewhere", lonely.socket, listen=f'["127.0.0.1:{other}"]')
            ),
            start=False,
        )
        gw.port = port
        gw.start()
        assert send(gw, message("unfiltered")).accepted
        hop1.wait_subject("unfiltered")
        assert lonely.connections == []


# -- connections kept between sessions (reuse_connections) -----------------------------------------
# The tests run in this order: each leaves the pool as the next expects it.


@pytest.fixture(scope="module")
def kept() -> Iterator[TestMilter]:
    with TestMilter() as m:
        yield m


@pytest.fixture(scope="module")
def keeping(module_gateway: GatewayFactory, world: World, kept: TestMilter) -> GatewayProcess:
    """The filter on a second listener (``keeping.filtered``), which the start-up probe of the
    first does not touch: every connection the filter sees is a test's."""
    probe, filtered = free_port(), free_port()
    gw = module_gateway(
        world.but(
            # One process: the kept connections are each worker's own.
            settings=f'workers = 1\nlisten = ["127.0.0.1:{probe}", "127.0.0.1:{filtered}"]\n'
            + milter_entry(
                "kept",
                kept.socket,
                reuse_connections="1",
                read_timeout='"1s"',
                listen=f'["127.0.0.1:{filtered}"]',
            )
        ),
        start=False,
    )
    gw.port = probe
    gw.start()
    gw.filtered = filtered  # type: ignore[attr-defined]
    return gw


def sessions_on(connection: list[km.Message]) -> list[list[str]]:
    """One connection's events cut at each QUIT_NC, by class name, macros left out."""
    cut: list[list[str]] = [[]]
    for m in connection:
        if isinstance(m, QuitNewConnection):
            cut.append([])
        elif not isinstance(m, km.Macro):
            cut[-1].append(type(m).__name__)
    return cut


def last_events(milter: TestMilter) -> list[str]:
    with milter.lock:
        return sorted(type(c[-1]).__name__ for c in milter.connections if c)


def closed_by_gateway(port: int) -> bool:
    """No socket to ``port`` is left half-closed (CLOSE_WAIT, state 08): the gateway has
    seen the filter close each of its connections, and closed its side."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return not any(
        f[3] == "08" and int(f[2].split(":")[1], 16) == port for f in (x.split() for x in lines)
    )


def test_a_kept_connection_serves_the_next_sessions(
    keeping: GatewayProcess, kept: TestMilter, hop1: SinkServer
) -> None:
    port = keeping.filtered  # type: ignore[attr-defined]
    for n in range(3):
        assert send(keeping, message(f"kept {n}"), port=port).accepted
        hop1.wait_subject(f"kept {n}")
    wait_until(lambda: last_events(kept) == ["QuitNewConnection"], "the third QUIT_NC")
    [connection] = kept.connections  # one connection, negotiated once, for all three
    first, *more, idle = sessions_on(connection)
    assert first[0] == "Negotiate"
    assert len(more) == 2 and first[1:] == more[0] == more[1]
    assert first[1:4] == ["Connect", "Helo", "EnvelopeFrom"] and first[-1] == "EndOfMessage"
    assert idle == []  # the third's QUIT_NC: kept, idle


def test_a_failure_on_a_kept_connection_is_the_default_action(
    keeping: GatewayProcess, kept: TestMilter
) -> None:
    kept.configure(hang_at="Connect")  # the kept connection stops answering
    port = keeping.filtered  # type: ignore[attr-defined]
    with smtplib.SMTP(keeping.host, port, source_address=(OUTSIDE, 0)) as s:
        s.ehlo("client.example.net")
        assert s.mail("alice@example.org") == (451, b"4.7.1 Service unavailable - try again later")
    keeping.wait_log(
        "Milter (kept): timeout before data read, where=connect, default_action=tempfail"
    )
    assert kept.connections == []  # no new connection: the kept one was used, and failed


def test_a_kept_connection_the_filter_closed_is_not_used(
    keeping: GatewayProcess, kept: TestMilter
) -> None:
    kept.configure(die_at="QuitNewConnection")  # the filter closes what we would keep
    port = keeping.filtered  # type: ignore[attr-defined]
    assert send(keeping, message("then closed"), port=port).accepted
    wait_until(lambda: last_events(kept) == ["QuitNewConnection"], "the filter's close")
    wait_until(lambda: closed_by_gateway(kept.port), "the gateway's side closed")
    assert send(keeping, message("on a new one"), port=port).accepted
    wait_until(lambda: len(last_events(kept)) == 2, "a second connection")
    assert [type(c[0]).__name__ for c in kept.connections] == ["Negotiate"] * 2


def test_at_most_reuse_connections_are_kept(keeping: GatewayProcess, kept: TestMilter) -> None:
    kept.configure()
    wait_until(lambda: closed_by_gateway(kept.port), "the last one closed by the filter")
    port = keeping.filtered  # type: ignore[attr-defined]
    first = smtplib.SMTP(keeping.host, port, source_address=(OUTSIDE, 0))
    second = smtplib.SMTP(keeping.host, port, source_address=(OUTSIDE, 0))
    first.quit()
    wait_until(lambda: "QuitNewConnection" in last_events(kept), "the first session kept")
    second.quit()
    ended = {"Close", "QuitNewConnection"}
    wait_until(
        lambda: len(last_events(kept)) == 2 and set(last_events(kept)) <= ended,
        "both sessions' ends",
    )
    # The first to end is kept (QUIT_NC); the second finds the one place taken (QUIT).
    assert last_events(kept) == ["Close", "QuitNewConnection"]
