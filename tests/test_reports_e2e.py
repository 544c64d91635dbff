"""Bounces and double bounces end to end, through the real daemon and two loopback servers.

A message from alice@example.org to three recipients of targetdomain1.com, two of which its
internal server refuses: one bounce lists both. alice's own server refuses the bounce, so the
bounce goes to the postmaster (Sendmail's double bounce), whom the aliases send to
admin@targetdomain1.com. Each report has its maillog line. (The in-process cases, delay
warnings and expiry included, are in tests/test_attempt.py; the delay warning and expiry end
to end in tests/reliability/test_outage.py.)
"""

from __future__ import annotations

import email
import email.message
import email.policy
import re
from pathlib import Path

from tests.support.gateway import GatewayProcess, free_port
from tests.support.sink import SinkMessage, SinkServer
from tests.support.wait import wait_until

HOP = "127.0.0.5"  # targetdomain1.com's internal server
SENDER_MX = "127.0.0.6"  # example.org's server, where bounces to alice go
WAIT = 20.0


def parse(msg: SinkMessage) -> email.message.Message:
    return email.message_from_bytes(msg.data, policy=email.policy.compat32)


def parts(report: email.message.Message) -> list[email.message.Message]:
    payload = report.get_payload()
    assert isinstance(payload, list)
    return payload


def final_recipients(report: email.message.Message) -> list[str]:
    """Final-Recipient of each recipient block of the report's own delivery-status part."""
    status = parts(report)[1]
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return [" ".join(str(b["Final-Recipient"]).split()) for b in blocks[1:]]


def test_one_bounce_for_two_failures_then_the_postmaster_gets_the_failed_bounce(
    tmp_path: Path,
) -> None:
    with SinkServer(HOP, free_port(HOP)) as hop, SinkServer(SENDER_MX, free_port(SENDER_MX)) as mx:
        hop.rcpt_reply["carol@targetdomain1.com"] = "550 5.1.1 <carol@targetdomain1.com>... No"
        hop.rcpt_reply["dave@targetdomain1.com"] = "550 5.1.1 <dave@targetdomain1.com>... No"
        mx.rcpt_reply["alice@example.org"] = "550 5.1.1 <alice@example.org>... User unknown"
        gw = GatewayProcess(
            tmp_path / "gw",
            dns=None,
            tables={
                "mailertable": (
                    f"targetdomain1.com smtp:[{HOP}]:{hop.port}\n"
                    f"example.org smtp:[{SENDER_MX}]:{mx.port}\n"
                ),
                "access": "To:targetdomain1.com RELAY\n",
                "aliases": "postmaster: admin@targetdomain1.com\n",
            },
            settings='[smtp]\ngreet_pause = "0s"\ncheck_sender_domain = false\n',
        )
        with gw, gw.smtp() as s:
            s.ehlo()
            assert s.mail("alice@example.org")[0] == 250
            for rcpt in ("bob", "carol", "dave"):
                assert s.rcpt(f"{rcpt}@targetdomain1.com")[0] == 250
            code, text = s.data(
                b"From: alice@example.org\r\nSubject: three\r\n"
                b"Message-ID: <three@example.org>\r\n\r\nHello.\r\n"
            )
            assert code == 250
            qid = text.split()[1].decode()  # "2.0.0 <qid> Message accepted for delivery"

            wait_until(lambda: len(hop.messages) == 2, "the original and the notify", WAIT)
            wait_until(lambda: gw.queued() == [], "the queue is empty", WAIT)
            original, notify = sorted(hop.messages, key=lambda m: m.mail_from == "")
            assert original.rcpt_tos == ["bob@targetdomain1.com"]
            # The bounce went to alice's server (and was refused there): one for both.
            [refused] = [t for t in mx.transactions if t.rcpt_refused]
            assert (refused.mail_from, refused.rcpt_refused) == ("", ["alice@example.org"])
            # The postmaster notify: from <>, to postmaster's alias, the bounce attached.
            assert (notify.mail_from, notify.rcpt_tos) == ("", ["admin@targetdomain1.com"])
            report = parse(notify)
            assert report["Subject"] == "Postmaster notify: see transcript for details"
            assert report["To"] == "<postmaster@gateway.example.com>"
            assert final_recipients(report) == ["rfc822; alice@example.org"]
            bounce = parts(report)[2].get_payload()[0]
            assert bounce["Subject"] == "Returned mail: see transcript for details"
            assert bounce["To"] == "<alice@example.org>"
            assert final_recipients(bounce) == [
                "rfc822; carol@targetdomain1.com",
                "rfc822; dave@targetdomain1.com",
            ]
            assert b"Message-ID: <three@example.org>" in notify.data  # the original, inside
            log = gw.log()
        [bounce_qid] = re.findall(rf": {qid}: (\w+): DSN: User unknown$", log, re.M)
        [notify_qid] = re.findall(
            rf": {bounce_qid}: (\w+): postmaster notify: User unknown$", log, re.M
        )
        assert len(re.findall(r": DSN: |: postmaster notify: ", log)) == 2  # nothing else
        assert f"{bounce_qid}: to=<alice@example.org>" in log
        assert f"{notify_qid}: to=<admin@targetdomain1.com>" in log
