"""The delivery attempt in process, with fake mailers (no sockets, no DNS): the phases plan →
deliver → record → decide against a real spool in ``tmp_path``.

The world: ``gateway.example.com`` with local users ``alice`` and ``dave`` (Maildir folders),
the alias ``team: alice, bob@hop.test``, and a mailertable sending ``hop.test`` to
``[192.0.2.1]``, ``other.test`` to ``[192.0.2.2]`` and ``bad.test`` to an ``error:`` entry.
``FakeMailer`` stands for every SMTP mailer and another for the local ones; each records the
batches it was given and answers from a script (address → reply; else 250). The error mailer
is the real one. Reports (bounces, warnings, receipts) arrive at ``World.reports`` as the
scheduler would get them.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import shutil
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from mailgate import cli, maillog, metrics
from mailgate.config import LogSettings, parse_config
from mailgate.delivery import Job, Mailer, Outcome, Status, notify
from mailgate.delivery.attempt import DeliveryContext, attempt
from mailgate.delivery.mailers import ErrorMailer
from mailgate.delivery.smtp import DestinationLimits, SmtpMailer
from mailgate.dns import Resolver
from mailgate.dsn import CHUNK
from mailgate.queue.scheduler import Scheduler
from mailgate.queue.spool import (
    Envelope,
    IncomingMessage,
    QueuedMessage,
    RcptStatus,
    Recipient,
    Spool,
)
from mailgate.reply import Reply
from mailgate.routing import Route
from mailgate.snapshot import Snapshot, build_snapshot
from mailgate.tables.mailertable import SMTP_MAILERS, NextHop
from tests.support import world
from tests.support.wait import wait_until_async

HOST = "gateway.example.com"
SENDER = "sender@example.org"
CONTENT = b"Subject: test\r\nMessage-Id: <t1@example.org>\r\n\r\nbody\r\n"
DATA = Path(__file__).parent / "data" / "old-status"
USERS = ("alice", "dave")

TABLES = {
    "aliases": "team: alice, bob@hop.test\n",
    "mailertable": textwrap.dedent("""\
        hop.test smtp:[192.0.2.1]
        other.test smtp:[192.0.2.2]
        bad.test error:5.1.1:550 No such user here
        """),
}


class FakeMailer:
    """Records each batch; answers each job from ``script`` (by the route's address)."""

    def __init__(self, *, per_hop: bool) -> None:
        self.per_hop = per_hop
        self.script: dict[str, Reply | Outcome] = {}
        self.batches: list[tuple[str, str, list[str]]] = []  # (qid, mailer, addresses)

    def batch_key(self, route: Route) -> str:
        return route.host if self.per_hop else route.target

    async def deliver(self, msg: QueuedMessage, jobs: Sequence[Job]) -> list[Outcome]:
        assert msg.fd is not None  # the attempt holds the lock while it delivers
        self.batches.append((msg.qid, jobs[0].route.mailer, [j.route.address for j in jobs]))
        out = []
        for job in jobs:
            answer = self.script.get(job.route.address, Reply(250, "2.0.0", "Ok"))
            out.append(
                answer
                if isinstance(answer, Outcome)
                else Outcome.from_reply(answer, "[192.0.2.1]", "[192.0.2.1]")
            )
        return out

    def delivered(self) -> list[str]:
        return [a for _qid, _mailer, addresses in self.batches for a in addresses]


class World:
    def __init__(
        self, tmp_path: Path, settings: str = "", tables: dict[str, str] | None = None
    ) -> None:
        setup = world.World(hostname=HOST, tables=tables or TABLES, settings=settings, users=USERS)
        self.config_path = setup.write(tmp_path)
        config = parse_config(self.config_path.read_text(), self.config_path, tmp_path)
        self.snap: Snapshot = build_snapshot(config)
        self.spool = Spool(config.spool_dir, fsync="threads")
        self.smtp = FakeMailer(per_hop=True)
        self.local = FakeMailer(per_hop=False)
        self.reports: list[QueuedMessage] = []
        self.ctx = self.context(self.spool)

    def context(self, spool: Spool) -> DeliveryContext:
        def mailers(cfg: object, ctx: DeliveryContext) -> dict[str, Mailer]:
            fakes: dict[str, Mailer] = dict.fromkeys(SMTP_MAILERS, self.smtp)
            fakes.update(
                {
                    "local": self.local,
                    "*file*": self.local,
                    "prog": self.local,
                    "error": ErrorMailer(self.snap.config, ctx),
                }
            )
            return fakes

        return DeliveryContext(
            spool=spool,
            resolver=Resolver(["192.0.2.53"]),
            snapshot=lambda: self.snap,
            queued=self.reports.append,
            make_mailers=mailers,
        )

    async def queue(
        self,
        *recipients: Recipient | str,
        content: bytes = CONTENT,
        age: float = 0.0,
        lock: bool = True,
        sender: str = SENDER,
        ret: str | None = None,
    ) -> QueuedMessage:
        """A message committed as a session commits it (``lock``: hot, holding its lock)."""
        rcpts = [r if isinstance(r, Recipient) else Recipient(r, r) for r in recipients]
        env = Envelope(
            qid=self.spool.new_qid(),
            sender=sender,
            recipients=rcpts,
            arrival=time.time() - age,
            client_ip="192.0.2.9",
            ret=ret,
        )
        incoming = self.spool.open_incoming(env)
        incoming.write(content)
        return await self.spool.commit(incoming, lock=lock)

    def report(self, index: int = -1) -> email.message.Message:
        queued = self.reports[index]
        data = queued.path.read_bytes()[queued.offset :]
        return email.message_from_bytes(data, policy=email.policy.compat32)

    def queued(self) -> list[str]:
        return sorted(self.spool.qids())


def run(coro: Callable[[], object]) -> None:
    asyncio.run(coro())  # type: ignore[arg-type]


@pytest.fixture
def log(tmp_path: Path) -> Iterator[Path]:
    """The maillog, in a file for the test to read."""
    path = tmp_path / "maillog"
    maillog.setup(HOST, LogSettings(file=path))
    yield path
    maillog.setup("localhost")


def log_lines(path: Path, text: str) -> list[str]:
    """The maillog lines that contain ``text``, without their syslog prefix."""
    return [line.split(": ", 1)[1] for line in path.read_text().splitlines() if text in line]


def report_fields(msg: email.message.Message) -> list[dict[str, str]]:
    """Per-recipient fields of a DSN's delivery-status part, keys lower-case."""
    parts = msg.get_payload()
    assert isinstance(parts, list)  # the report's own parts, not those of a report it returns
    [status] = [p for p in parts if p.get_content_type() == "message/delivery-status"]
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return [{k.lower(): " ".join(str(v).split()) for k, v in b.items()} for b in blocks[1:]]


# -- fan-out, partial failure, temp then success ------------------------------------------------
def test_one_attempt_fans_out_to_each_mailer_and_next_hop(tmp_path: Path) -> None:
    w = World(tmp_path)

    async def go() -> None:
        msg = await w.queue(
            "x@hop.test",
            "alice@gateway.example.com",
            "y@hop.test",
            "z@other.test",
            "team@gateway.example.com",
        )
        qid = msg.qid
        assert await attempt(w.ctx, qid, msg) is None
        # One transaction per next hop carrying all its recipients (bob@hop.test came from
        # the alias), one call per local target; alice (direct and through the alias) once.
        assert sorted(w.smtp.batches) == [
            (qid, "smtp", ["x@hop.test", "y@hop.test", "bob@hop.test"]),
            (qid, "smtp", ["z@other.test"]),
        ]
        assert w.local.batches == [(qid, "local", ["alice"])]
        assert msg.fd is None  # the lock went with the file
        assert w.queued() == []
        # Delivered at its first attempt: its file is kept for the next message.
        assert len(os.listdir(w.spool.spare)) == 1
        assert w.reports == []

    run(go)


def test_a_permanent_failure_is_bounced_and_the_rest_delivered(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.smtp.script["y@hop.test"] = Reply(550, "5.1.1", "<y@hop.test>... User unknown")

    async def go() -> None:
        msg = await w.queue("x@hop.test", Recipient("y@hop.test", "Y@hop.test"), "e@bad.test")
        assert await attempt(w.ctx, msg.qid, msg) is None
        assert w.queued() == [w.reports[0].qid]  # only the bounce is left
        [bounce] = w.reports
        assert bounce.envelope.is_bounce and bounce.envelope.sender == ""
        assert [r.address for r in bounce.envelope.recipients] == [SENDER]
        assert bounce.fd is not None  # hot: handed over with its lock, as a received one
        bounce.close()
        fields = report_fields(w.report())
        assert [(f["final-recipient"], f["action"], f["status"]) for f in fields] == [
            ("rfc822; Y@hop.test", "failed", "5.1.1"),
            ("rfc822; e@bad.test", "failed", "5.1.1"),
        ]
        assert fields[1]["diagnostic-code"] == "smtp; 550 5.1.1 <e@bad.test>... No such user here"

    run(go)


def test_temporary_failure_then_success_at_the_next_attempt(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.smtp.script["y@hop.test"] = Reply(451, "4.3.0", "Try later")

    async def go() -> None:
        msg = await w.queue("x@hop.test", "y@hop.test", "alice@gateway.example.com")
        qid = msg.qid
        started = time.time()
        due = await attempt(w.ctx, qid, msg)
        assert due is not None and due > started
        assert msg.fd is None  # the lock is released between attempts
        assert w.queued() == [qid]
        st = w.spool.load_status(qid)
        assert st.attempts == 1 and st.next_attempt == due
        assert st.recipients["x@hop.test"].status is RcptStatus.SENT
        assert st.recipients["alice@gateway.example.com"].status is RcptStatus.SENT
        y = st.recipients["y@hop.test"]
        assert y.status is RcptStatus.PENDING
        assert y.last_error == "Deferred: 451 4.3.0 Try later"
        assert st.last_message == "Deferred: 451 4.3.0 Try later"

        del w.smtp.script["y@hop.test"]
        w.smtp.batches.clear()
        w.local.batches.clear()
        assert await attempt(w.ctx, qid) is None  # cold: claimed from the spool
        assert w.smtp.delivered() == ["y@hop.test"]  # only what was left
        assert w.local.batches == []
        assert w.queued() == []

    run(go)


def test_a_target_done_for_one_recipient_is_not_delivered_for_another(tmp_path: Path) -> None:
    """root@localhost and postmaster both end at root: once, as Sendmail; here alice directly
    and through the alias, across two attempts."""
    w = World(tmp_path)
    w.smtp.script["bob@hop.test"] = Reply(451, "4.4.1", "Connection refused by [192.0.2.1]")

    async def go() -> None:
        msg = await w.queue("alice@gateway.example.com", "team@gateway.example.com")
        qid = msg.qid
        assert await attempt(w.ctx, qid, msg) is not None
        assert w.local.delivered() == ["alice"]
        st = w.spool.load_status(qid)
        assert st.recipients["alice@gateway.example.com"].status is RcptStatus.SENT
        assert st.is_pending("team@gateway.example.com")
        del w.smtp.script["bob@hop.test"]
        assert await attempt(w.ctx, qid) is None
        assert w.local.delivered() == ["alice"]  # not again
        assert w.smtp.delivered() == ["bob@hop.test", "bob@hop.test"]

    run(go)


# -- expiry, warning, receipt -------------------------------------------------------------------
def test_expiry_bounces_what_is_still_pending(tmp_path: Path, log: Path) -> None:
    w = World(tmp_path)
    w.smtp.script["y@hop.test"] = Reply(451, "4.4.1", "Connection refused by [192.0.2.1]")

    async def go() -> None:
        msg = await w.queue("x@hop.test", "y@hop.test", age=5 * 86400 + 60, lock=False)
        qid = msg.qid
        assert await attempt(w.ctx, qid) is None
        assert w.queued() == [w.reports[0].qid]
        for r in w.reports:
            r.close()
        bounce = w.report()
        assert bounce["Subject"] == "Returned mail: see transcript for details"
        [field] = report_fields(bounce)
        assert field["final-recipient"] == "rfc822; y@hop.test"
        assert (field["action"], field["status"]) == ("failed", "4.4.7")
        # The peer's last reply (this test's next hop answered 451), without "Deferred: ".
        assert field["diagnostic-code"] == "smtp; 451 4.4.1 Connection refused by [192.0.2.1]"
        # Sendmail's lines: the recipient's, then the bounce's.
        deferred, expired = log_lines(log, "to=<y@hop.test>")
        assert deferred.endswith("stat=Deferred: 451 4.4.1 Connection refused by [192.0.2.1]")
        assert "dsn=4.4.7" in expired and expired.endswith("stat=Cannot send message for 5 days")
        assert log_lines(log, "DSN:") == [
            f"{qid}: {w.reports[0].qid}: DSN: Cannot send message for 5 days"
        ]

    run(go)


def test_what_fails_as_the_message_expires_goes_back_in_the_same_report(
    tmp_path: Path, log: Path
) -> None:
    """Sendmail returns an envelope once per queue run: the recipient refused in the last
    attempt and the one that expires with it are in one report, not two."""
    w = World(tmp_path)
    w.smtp.script["x@hop.test"] = Reply(550, "5.1.1", "<x@hop.test>... User unknown")
    w.smtp.script["y@hop.test"] = Reply(451, "4.4.1", "Connection refused by [192.0.2.1]")

    async def go() -> None:
        msg = await w.queue("x@hop.test", "y@hop.test", age=5 * 86400 + 60, lock=False)
        qid = msg.qid
        assert await attempt(w.ctx, qid) is None
        [report] = w.reports
        assert w.queued() == [report.qid]
        report.close()
        fields = report_fields(w.report())
        assert [(f["final-recipient"], f["action"], f["status"]) for f in fields] == [
            ("rfc822; x@hop.test", "failed", "5.1.1"),
            ("rfc822; y@hop.test", "failed", "4.4.7"),
        ]
        [_deferred, expired] = log_lines(log, "to=<y@hop.test>")
        assert "dsn=4.4.7" in expired and expired.endswith("stat=Cannot send message for 5 days")
        assert log_lines(log, "DSN:") == [f"{qid}: {report.qid}: DSN: User unknown"]
        assert log_lines(log, "removed") == [f"{qid}: removed"]

    run(go)


def test_delay_warning_once_then_retry(tmp_path: Path, log: Path) -> None:
    w = World(tmp_path)
    w.smtp.script["y@hop.test"] = Reply(451, "4.4.1", "Connection refused by [192.0.2.1]")

    async def go() -> None:
        msg = await w.queue(
            "y@hop.test", Recipient("n@hop.test", "n@hop.test", notify="FAILURE"), age=4 * 3600 + 60
        )
        w.smtp.script["n@hop.test"] = w.smtp.script["y@hop.test"]
        qid = msg.qid
        assert await attempt(w.ctx, qid, msg) is not None
        [warning] = w.reports
        warning.close()
        assert w.report()["Subject"] == "Warning: could not send message for past 4 hours"
        # Only y: n's NOTIFY does not ask for delays.
        assert [(f["final-recipient"], f["action"]) for f in report_fields(w.report())] == [
            ("rfc822; y@hop.test", "delayed")
        ]
        assert w.spool.load_status(qid).warned
        assert log_lines(log, "DSN:") == [
            f"{qid}: {warning.qid}: DSN: Warning: could not send message for past 4 hours"
        ]
        assert await attempt(w.ctx, qid) is not None
        assert len(w.reports) == 1  # not twice
        assert len(log_lines(log, "DSN:")) == 1
        assert w.spool.load_status(qid).attempts == 2

    run(go)


def test_return_receipt_when_the_hop_does_not_take_dsn(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.smtp.script["p@other.test"] = Outcome(
        Status.SENT, Reply(250, "2.0.0", "Ok"), "[192.0.2.2]", "[192.0.2.2]", dsn_passed=True
    )

    async def go() -> None:
        msg = await w.queue(
            Recipient("r@hop.test", "r@hop.test", notify="SUCCESS"),
            Recipient("p@other.test", "p@other.test", notify="SUCCESS"),
            Recipient(
                "alice@gateway.example.com", "alice@gateway.example.com", notify="SUCCESS,FAILURE"
            ),
        )
        assert await attempt(w.ctx, msg.qid, msg) is None
        [receipt] = w.reports
        receipt.close()
        report = w.report()
        assert report["Subject"] == "Return receipt"
        # p@other.test's hop took NOTIFY itself: its receipt is the hop's to send.
        assert [(f["final-recipient"], f["action"]) for f in report_fields(report)] == [
            ("rfc822; r@hop.test", "relayed"),
            ("rfc822; alice@gateway.example.com", "delivered"),
        ]
        assert "text/rfc822-headers" in [p.get_content_type() for p in report.walk()]

    run(go)


def test_several_failures_in_one_attempt_are_one_bounce(tmp_path: Path, log: Path) -> None:
    """Failures at two next hops, in the error mailer and in a local mailer, beside a
    delivery: one DSN listing each failed recipient, one maillog line for it."""
    w = World(tmp_path)
    w.smtp.script["y@hop.test"] = Reply(550, "5.1.1", "<y@hop.test>... User unknown")
    w.smtp.script["z@other.test"] = Reply(554, "5.7.1", "<z@other.test>... Refused")
    w.local.script["dave"] = Reply(552, "5.2.2", "<dave@gateway.example.com>... Mailbox full")

    async def go() -> None:
        rcpts = ["y@hop.test", "x@hop.test", "z@other.test", "e@bad.test"]
        msg = await w.queue(*rcpts, "dave@gateway.example.com")
        assert await attempt(w.ctx, msg.qid, msg) is None
        [bounce] = w.reports
        bounce.close()
        assert [r.address for r in bounce.envelope.recipients] == [SENDER]
        assert [(f["final-recipient"], f["status"]) for f in report_fields(w.report())] == [
            ("rfc822; y@hop.test", "5.1.1"),
            ("rfc822; z@other.test", "5.7.1"),
            ("rfc822; e@bad.test", "5.1.1"),
            ("rfc822; dave@gateway.example.com", "5.2.2"),
        ]
        assert log_lines(log, "DSN:") == [f"{msg.qid}: {bounce.qid}: DSN: User unknown"]
        assert w.queued() == [bounce.qid]

    run(go)


def test_one_to_line_per_transaction_and_outcome(tmp_path: Path, log: Path) -> None:
    """As sendmail -bD logs a delivery: the recipients of one transaction that had the same
    outcome on one line, in the order of the transaction; one refused at RCPT on a line of
    its own, before it; another next hop (with the same relay= and reply here) and the
    local delivery each on their own line; the metrics still count each recipient."""
    w = World(tmp_path)
    w.smtp.script["w@hop.test"] = Outcome.from_reply(
        Reply(550, "5.1.1", "No such user"), "[192.0.2.1]", "[192.0.2.1]", at_rcpt=True
    )

    async def go() -> None:
        rcpts = ["x@hop.test", "w@hop.test", "y@hop.test", "z@other.test"]
        msg = await w.queue(*rcpts, "team@gateway.example.com")  # alice, bob@hop.test
        assert await attempt(w.ctx, msg.qid, msg) is None
        assert [line.split(", delay=")[0] for line in log_lines(log, "to=<")] == [
            f"{msg.qid}: to=<w@hop.test>",
            f"{msg.qid}: to=<x@hop.test>,<y@hop.test>,<bob@hop.test>",
            f"{msg.qid}: to=<z@other.test>",
            f"{msg.qid}: to=<team@gateway.example.com>",
        ]
        refused, sent, other, local = log_lines(log, "to=<")
        assert refused.endswith("dsn=5.1.1, reply=550 5.1.1 No such user, stat=User unknown")
        pri = maillog.priority(msg.size, 5, 0)  # one priority, the message's
        assert sent.endswith(
            f"mailer=smtp, pri={pri}, relay=[192.0.2.1] [192.0.2.1], dsn=2.0.0, stat=Sent (Ok)"
        )
        assert other.split(", ", 3)[3] == sent.split(", ", 3)[3]  # the same facts, another hop
        assert "mailer=local" in local

    run(go)
    row = w.ctx.metrics
    assert row.value(metrics.DELIVERIES.slot("smtp", "delivered")) == 4
    assert row.value(metrics.DELIVERIES.slot("smtp", "bounced")) == 1
    assert row.value(metrics.DELIVERIES.slot("local", "delivered")) == 1


def test_an_unknown_local_user_is_named_in_its_log_line(tmp_path: Path, log: Path) -> None:
    """The error route for a local user that does not exist (a bounce to an unknown local
    sender reaches it) names no address of its own: the line names the recipient."""
    w = World(tmp_path)

    async def go() -> None:
        msg = await w.queue("nobody-here@gateway.example.com")
        assert await attempt(w.ctx, msg.qid, msg) is None
        [line] = log_lines(log, "to=<")
        assert f"{msg.qid}: to=<nobody-here@gateway.example.com>," in line
        assert "mailer=error" in line and "stat=User unknown" in line

    run(go)


async def refused_bounce(w: World) -> QueuedMessage:
    """A message refused by its hop, then its bounce refused by the sender's: the bounce,
    after that attempt (``w.reports`` holds it and what came of it)."""
    w.smtp.script["y@hop.test"] = Reply(550, "5.1.1", "<y@hop.test>... User unknown")
    w.smtp.script[SENDER] = Reply(550, "5.1.1", f"<{SENDER}>... User unknown")
    msg = await w.queue("y@hop.test")
    assert await attempt(w.ctx, msg.qid, msg) is None
    [bounce] = w.reports
    assert await attempt(w.ctx, bounce.qid, bounce) is None  # its sender's MX refuses it
    return bounce


def test_a_failed_bounce_goes_to_the_postmaster_once(tmp_path: Path, log: Path) -> None:
    """Sendmail's double bounce: a bounce that cannot be delivered is reported to the
    postmaster (never to its null sender), with the bounce attached; a postmaster notify
    that fails in turn is logged, not reported again."""
    w = World(tmp_path)

    async def go() -> None:
        bounce = await refused_bounce(w)
        assert w.smtp.delivered() == ["y@hop.test", SENDER]
        [_, notice] = w.reports
        notice.close()
        env = notice.envelope
        assert (env.sender, [r.address for r in env.recipients]) == ("", ["postmaster"])
        assert env.is_bounce and env.postmaster_notify
        report = w.report()
        assert report["Subject"] == "Postmaster notify: see transcript for details"
        assert report["To"] == "<postmaster@gateway.example.com>"
        assert [
            (f["final-recipient"], f["action"], f["status"]) for f in report_fields(report)
        ] == [(f"rfc822; {SENDER}", "failed", "5.1.1")]
        returned = report.get_payload()[2]  # the bounce that could not be delivered
        assert returned.get_content_type() == "message/rfc822"
        assert "Subject: Returned mail: see transcript for details" in returned.as_string()
        assert log_lines(log, "postmaster notify:") == [
            f"{bounce.qid}: {notice.qid}: postmaster notify: User unknown"
        ]
        # postmaster has no alias and no mailbox: root gets it; here root refuses too.
        w.local.script["root"] = Reply(550, "5.1.1", "<postmaster>... User unknown")
        assert await attempt(w.ctx, notice.qid) is None
        assert w.local.delivered() == ["root"]
        assert len(w.reports) == 2 and w.queued() == []
        assert log_lines(log, "not reported again") == [
            f"{notice.qid}: postmaster notify undeliverable, not reported again: User unknown"
        ]

    run(go)


def test_double_bounce_address_names_who_gets_them(tmp_path: Path, log: Path) -> None:
    """Sendmail's DoubleBounceAddress: an address of another domain gets the notice (routed
    like any mail), and the notice says so in its To:."""
    w = World(tmp_path, settings='[queue]\ndouble_bounce_address = "mailops@hop.test"\n')

    async def go() -> None:
        await refused_bounce(w)
        [_, notice] = w.reports
        notice.close()
        assert [r.address for r in notice.envelope.recipients] == ["mailops@hop.test"]
        assert w.report()["To"] == "<mailops@hop.test>"
        assert await attempt(w.ctx, notice.qid) is None
        assert w.smtp.delivered() == ["y@hop.test", SENDER, "mailops@hop.test"]

    run(go)


def test_an_empty_double_bounce_address_drops_them_with_a_line(tmp_path: Path, log: Path) -> None:
    w = World(tmp_path, settings='[queue]\ndouble_bounce_address = ""\n')

    async def go() -> None:
        bounce = await refused_bounce(w)
        assert len(w.reports) == 1 and w.queued() == []
        assert log_lines(log, "double bounce dropped") == [
            f"{bounce.qid}: double bounce dropped (double_bounce_address is empty): User unknown"
        ]

    run(go)


def test_mail_from_the_null_sender_that_fails_goes_to_the_postmaster(
    tmp_path: Path, log: Path
) -> None:
    """Not only our own bounces: any message from <> (another MTA's bounce) that fails."""
    w = World(tmp_path)
    w.smtp.script["x@hop.test"] = Reply(550, "5.1.1", "<x@hop.test>... User unknown")

    async def go() -> None:
        msg = await w.queue("x@hop.test", sender="")
        assert await attempt(w.ctx, msg.qid, msg) is None
        [notice] = w.reports
        notice.close()
        assert [r.address for r in notice.envelope.recipients] == ["postmaster"]
        assert [f["final-recipient"] for f in report_fields(w.report())] == ["rfc822; x@hop.test"]
        assert w.queued() == [notice.qid]
        assert log_lines(log, "DSN:") == []
        assert log_lines(log, "postmaster notify:") == [
            f"{msg.qid}: {notice.qid}: postmaster notify: User unknown"
        ]

    run(go)


# -- at-least-once ------------------------------------------------------------------------------
class Crash(BaseException):
    """The process dies here."""


def test_a_crash_between_delivery_and_status_write_delivers_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = World(tmp_path)
    w.smtp.script["y@hop.test"] = Reply(451, "4.3.0", "Try later")

    async def first() -> str:
        msg = await w.queue("x@hop.test", "y@hop.test")

        def crash(*_args: object) -> None:
            raise Crash

        monkeypatch.setattr(w.spool, "save_status", crash)
        with pytest.raises(Crash):
            await attempt(w.ctx, msg.qid, msg)
        assert msg.fd is None  # the lock died with the process
        return msg.qid

    qid = asyncio.run(first())
    assert w.smtp.delivered() == ["x@hop.test", "y@hop.test"]
    # Restart: a new spool on the same folder; nothing about x was recorded.
    spool = Spool(w.spool.root, fsync="threads")
    assert spool.recover() == [qid]
    del w.smtp.script["y@hop.test"]
    w.smtp.batches.clear()

    async def second() -> None:
        assert await attempt(w.context(spool), qid) is None

    asyncio.run(second())
    assert w.smtp.delivered() == ["x@hop.test", "y@hop.test"]  # x twice in all, none lost
    assert sorted(spool.qids()) == []


# -- the status file of the code before --------------------------------------------------------
def test_a_status_file_of_the_old_format_is_read(tmp_path: Path) -> None:
    """Written by an attempt of the code before per-recipient records (tests/data/old-status):
    team = alice (delivered) + bob@down.example (deferred), carol deferred, dave delivered,
    erin failed and bounced."""
    w = World(
        tmp_path,
        settings='[queue]\nmax_age = "36500d"\nwarn_after = "36500d"\n',
        tables={
            "aliases": "team: alice, bob@down.example\n",
            "mailertable": "down.example smtp:[127.0.0.1]:1\n"
            "bad.example error:5.1.1:550 No such user here\n",
        },
    )
    qid = "kB1MMa00029091"
    for name in (qid, qid + ".st"):
        shutil.copy(DATA / name, w.spool.queue / name)
    assert w.spool.recover() == [qid]
    loaded = w.spool.load(qid)
    assert loaded is not None
    st = loaded.status
    assert st.attempts == 1 and not st.warned
    assert {a: r.status for a, r in st.recipients.items()} == {
        "team@gateway.example.com": RcptStatus.PENDING,
        "carol@down.example": RcptStatus.PENDING,
        "dave@gateway.example.com": RcptStatus.SENT,
        "erin@bad.example": RcptStatus.FAILED,
    }
    refused = "Deferred: 451 4.4.1 Connection refused by [127.0.0.1]"
    assert st.last_error("team@gateway.example.com") == refused
    assert st.last_error("carol@down.example") == refused
    assert set(st.done_targets()) == {"local::alice", "local::dave", "error::erin@bad.example"}

    async def go() -> None:
        assert await attempt(w.ctx, qid) is None

    asyncio.run(go())
    # Only what was left: alice and dave are not delivered again, erin not bounced again.
    assert w.smtp.batches == [(qid, "smtp", ["bob@down.example", "carol@down.example"])]
    assert w.local.batches == []
    assert w.reports == [] and w.queued() == []


def test_the_new_status_file_round_trips(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.smtp.script["y@hop.test"] = Reply(451, "4.3.0", "Try later")

    async def go() -> None:
        msg = await w.queue("x@hop.test", "y@hop.test")
        await attempt(w.ctx, msg.qid, msg)
        claimed = w.spool.claim(msg.qid)
        assert claimed is not None
        with claimed:
            assert claimed.status == w.spool.load_status(msg.qid)
            assert claimed.status.recipients["x@hop.test"].targets == {
                "smtp:[192.0.2.1]:x@hop.test": RcptStatus.SENT
            }

    run(go)


# -- the spool is read, not changed, by listings ------------------------------------------------
def test_mailq_and_etrn_move_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mailgate.daemon import Gateway

    w = World(tmp_path)
    asyncio.run(w.queue("x@hop.test", lock=False))
    (w.spool.queue / "BROKEN00000001").write_bytes(b'{"qid": "BROKEN0')
    before = sorted(os.listdir(w.spool.queue))
    assert cli.main(["mailq", "-c", str(w.config_path)]) == 0
    out = capsys.readouterr().out
    assert "Total requests: 1" in out and "<x@hop.test>" in out
    gw = Gateway(w.config_path, w.snap)
    chosen, spilled = gw._queued_for("hop.test", False, 10)
    assert len(chosen) == 1 and spilled == 0
    gw.spool.close()
    assert sorted(os.listdir(w.spool.queue)) == before
    assert os.listdir(w.spool.corrupt) == []

    # The attempt is what quarantines it.
    async def go() -> None:
        assert await attempt(w.ctx, "BROKEN00000001") is None

    asyncio.run(go())
    assert "BROKEN00000001" in os.listdir(w.spool.corrupt)


def test_a_locked_entry_is_left_to_its_runner(tmp_path: Path) -> None:
    w = World(tmp_path)

    async def go() -> None:
        msg = await w.queue("x@hop.test")
        due = await attempt(w.ctx, msg.qid)  # another runner holds it: try again later
        assert due is not None and due > time.time() + 30
        assert w.smtp.batches == []
        assert await attempt(w.ctx, msg.qid, msg) is None

    run(go)


# -- reports are written on the loop ------------------------------------------------------------
def test_a_bounce_is_written_into_the_spool_on_the_loop_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spare-file pool and an IncomingMessage are loop-only: a bounce of a big message,
    whose writes spill into a reused spare file, must not touch them from the thread that
    builds it; and it is built in bounded batches, not whole in memory."""
    w = World(tmp_path)
    w.smtp.script["y@hop.test"] = Reply(550, "5.1.1", "<y@hop.test>... User unknown")
    loop_thread = threading.get_ident()
    touched: list[tuple[str, int]] = []
    take_spare = Spool.take_spare
    write = IncomingMessage.write

    def spy_take_spare(self: Spool) -> tuple[int, str, int] | None:
        touched.append(("take_spare", threading.get_ident()))
        return take_spare(self)

    def spy_write(self: IncomingMessage, data: bytes) -> None:
        touched.append(("write", threading.get_ident()))
        write(self, data)

    batches: list[int] = []
    take = notify._take

    def spy_take(blocks: object, limit: int) -> list[bytes]:
        out = take(blocks, limit)  # type: ignore[arg-type]
        batches.append(sum(len(b) for b in out))
        return out

    monkeypatch.setattr(Spool, "take_spare", spy_take_spare)
    monkeypatch.setattr(IncomingMessage, "write", spy_write)
    monkeypatch.setattr(notify, "_take", spy_take)
    big = b"Subject: big\r\n\r\n" + b"0123456789abcdef" * (3 * 1024 * 1024 // 16) + b"\r\n"

    async def go() -> None:
        msg = await w.queue("y@hop.test", content=big)
        spare = await w.queue("x@hop.test")  # delivered: its file becomes a spare
        assert await attempt(w.ctx, spare.qid, spare) is None
        assert len(os.listdir(w.spool.spare)) == 1
        touched.clear()
        assert await attempt(w.ctx, msg.qid, msg) is None

    run(go)
    assert ("take_spare", loop_thread) in touched  # the bounce spilled into the spare file
    assert {ident for _what, ident in touched} == {loop_thread}
    assert max(batches) <= notify.BLOCK + CHUNK and len(batches) > 10
    [bounce] = w.reports
    bounce.close()
    # The spare file is the queued bounce now, its spare/ name its second one.
    [second] = os.listdir(w.spool.spare)
    assert (w.spool.spare / second).stat().st_ino == bounce.path.stat().st_ino
    content = bounce.path.read_bytes()[bounce.offset :]
    assert big in content  # the original, whole, in part 3
    assert w.spool._sealed_qid(bounce.path) == bounce.qid


def test_the_daemon_counts_received_mail_not_its_own_reports(tmp_path: Path) -> None:
    """A session's message goes through ``message_queued`` (counted); a bounce goes from the
    attempt to the scheduler directly (not counted), hot like received mail."""
    from mailgate.daemon import Gateway

    w = World(tmp_path)
    w.smtp.script["y@hop.test"] = Reply(550, "5.1.1", "<y@hop.test>... User unknown")
    gw = Gateway(w.config_path, w.snap)
    gw.delivery.make_mailers = w.ctx.make_mailers
    w.spool = gw.spool  # one spool per process (two would hand out the same queue ids)
    submitted: list[tuple[str, QueuedMessage | None]] = []

    class Scheduler:
        def submit(
            self, qid: str, when: float | None = None, *, message: QueuedMessage | None = None
        ) -> None:
            submitted.append((qid, message))

    gw.scheduler = Scheduler()  # type: ignore[assignment]

    async def go() -> None:
        msg = await w.queue("y@hop.test")
        gw.message_queued(msg)
        assert submitted == [(msg.qid, msg)]
        assert await attempt(gw.delivery, msg.qid, msg) is None
        [(_qid, bounce)] = submitted[1:]
        assert bounce is not None and bounce.envelope.is_bounce and bounce.fd is not None
        bounce.close()

    run(go)
    assert gw.metrics.value(metrics.MESSAGES_RECEIVED) == 1
    gw.spool.close()


# -- the scheduler carries the hot message ------------------------------------------------------
def test_the_scheduler_hands_the_hot_message_to_its_attempt(tmp_path: Path) -> None:
    w = World(tmp_path)
    seen: list[tuple[str, QueuedMessage | None]] = []
    release = asyncio.Event()

    async def fake_attempt(qid: str, message: QueuedMessage | None) -> float | None:
        seen.append((qid, message))
        await release.wait()
        if message is not None:
            message.close()
        return None

    async def go() -> None:
        scheduler = Scheduler(fake_attempt, max_concurrent=1)
        scheduler.HOLD_MAX = 1
        scheduler.start()
        a, b, c = [await w.queue("x@hop.test") for _ in range(3)]
        for m in (a, b, c):
            scheduler.submit(m.qid, message=m)
        await asyncio.sleep(0)
        assert seen == [(a.qid, a)]  # straight to its attempt
        assert b.fd is not None  # waits for the slot, still locked
        assert c.fd is None  # one too many to hold: closed, claimed later from the spool
        release.set()
        await wait_until_async(lambda: len(seen) == 3, "the other two attempts")
        assert seen[1:] == [(b.qid, b), (c.qid, None)]
        await scheduler.stop()

    run(go)


# -- max_per_destination ------------------------------------------------------------------------
def test_smtp_deliveries_at_once_per_next_hop_are_limited(tmp_path: Path) -> None:
    """``queue.max_per_destination`` (Postfix's default_destination_concurrency_limit): at
    most that many transactions to one next hop at once; another hop is not held up."""
    w = World(tmp_path, settings="[queue]\nmax_per_destination = 2\n")
    ctx = DeliveryContext(
        spool=w.spool,
        resolver=Resolver(["192.0.2.53"]),
        snapshot=lambda: w.snap,
        queued=w.reports.append,
    )
    mailer = SmtpMailer(w.snap.config, ctx)
    in_flight: dict[str, int] = {}
    most: dict[str, int] = {}
    gate = asyncio.Event()

    async def fake_to_hop(
        message: QueuedMessage, route: Route, recipients: Sequence[str], dsn: object = None
    ) -> dict[str, Outcome]:
        in_flight[route.host] = in_flight.get(route.host, 0) + 1
        most[route.host] = max(most.get(route.host, 0), in_flight[route.host])
        await gate.wait()
        in_flight[route.host] -= 1
        return dict.fromkeys(recipients, Outcome(Status.SENT, Reply(250, "2.0.0", "Ok")))

    mailer.to_hop = fake_to_hop  # type: ignore[method-assign]

    async def go() -> None:
        msg = await w.queue("x@hop.test", lock=False)
        hop = Route("smtp", "x@hop.test", (NextHop("192.0.2.1", None, False),))
        other = Route("smtp", "z@other.test", (NextHop("192.0.2.2", None, False),))
        rcpt = msg.envelope.recipients[0]
        tasks = [asyncio.create_task(mailer.deliver(msg, [Job(rcpt, hop)])) for _ in range(5)]
        tasks.append(asyncio.create_task(mailer.deliver(msg, [Job(rcpt, other)])))
        for _ in range(100):
            await asyncio.sleep(0)
        assert in_flight == {"[192.0.2.1]": 2, "[192.0.2.2]": 1}
        # A waiter that gives up does not take a slot with it.
        tasks[4].cancel()
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[4], asyncio.CancelledError)
        assert all(r[0].status is Status.SENT for r in results if isinstance(r, list))
        assert most == {"[192.0.2.1]": 2, "[192.0.2.2]": 1}
        assert ctx.limits.busy("[192.0.2.1]") == 0

    run(go)


def test_destination_limits_serve_waiters_in_order() -> None:
    async def go() -> None:
        limits = DestinationLimits()
        order: list[int] = []
        await limits.acquire("h", 1)

        async def wait(n: int) -> None:
            await limits.acquire("h", 1)
            order.append(n)
            limits.release("h")

        tasks = [asyncio.create_task(wait(n)) for n in range(3)]
        await asyncio.sleep(0)
        assert order == [] and limits.busy("h") == 1
        limits.release("h")
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2]
        assert limits.busy("h") == 0

    asyncio.run(go())
