"""MAILER(uucp): mailertable uucp/uucp-old, suucp/uucp-new, uucp-dom and uucp-uudom lines hand
their mail to uux as Sendmail's cf/mailer/uucp.m4 mailers do.

The rewriting (``$g``, ``$u``, the From_ line, the argv) is checked as pure functions against
uucp.m4's rulesets; then the real mailer, through the in-process attempt and through the real
daemon, runs a fake ``uux`` (tests/support/fakeuux.py) that records each call's argv and stdin
and exits as told; a last test queues a job with Debian's real uux when it is installed.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import re
import shutil
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate import cli, maillog
from mailgate.config import ConfigError, LogSettings, parse_config
from mailgate.delivery.attempt import DeliveryContext, attempt
from mailgate.delivery.uucp import (
    MAX_RCPT,
    from_line,
    recipient_argument,
    sender_argument,
    uux_argv,
)
from mailgate.dns import Resolver
from mailgate.queue.spool import Envelope, QueuedMessage, RcptStatus, Recipient, Spool
from mailgate.snapshot import Snapshot, build_snapshot, load_snapshot
from tests.support import world
from tests.support.fakeuux import Call, FakeUux
from tests.support.gateway import GatewayProcess
from tests.support.world import SENDER_DNS, GatewayFactory, message, wait_until

HOST = "gateway.example.com"
NODE = "gwnode"  # our UUCP name in the tests ([uucp] node)
SENDER = "alice@example.org"
CONTENT = b"Subject: uucp\r\nMessage-Id: <u1@example.org>\r\n\r\nFrom the start\r\nbody\r\n"
LF_CONTENT = CONTENT.replace(b"\r\n", b"\n")  # non-SMTP mailers get LF; no F=E: From kept
# One domain per mailer, all to the neighbour uuhost (the sendmail.mc's MAILER(uucp)).
MAILERTABLE = textwrap.dedent("""\
    old.example       uucp:uuhost
    oldold.example    uucp-old:uuhost
    new.example       uucp-new:uuhost
    snew.example      suucp:uuhost
    uucpdomain.example uucp-dom:uuhost
    uudom.example     uucp-uudom:uuhost
    unknown.example   uucp-dom:nosuchhost
    """)
DATE = r"[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}"  # ctime's, Sendmail's $d


def not_local(_domain: str) -> bool:
    return False


def is_gateway(domain: str) -> bool:
    return domain == HOST


# -- the rewriting, rule by rule of uucp.m4 ----------------------------------------------------
@pytest.mark.parametrize(
    ("mailer", "sender", "expected"),
    [
        # FromU (uucp, uucp-old, suucp, uucp-new): UUCP form behind our name...
        ("uucp", "alice@example.org", "gwnode!example.org!alice"),
        ("uucp-new", "alice@example.org.", "gwnode!example.org!alice"),  # trailing dot
        ("suucp", "bob@foo.UUCP", "gwnode!foo!bob"),  # $* < @ $- . UUCP >  =>  $2 ! $1
        ("uucp-old", "bob@a.b.uucp", "gwnode!a.b.uucp!bob"),  # not one label: a domain
        ("uucp", "root@gateway.example.com", "gwnode!root"),  # $=w stripped
        ("uucp", "", "gwnode!MAILER-DAEMON"),  # <@> => $n
        ("uucp", "daemon", "gwnode!daemon"),  # unqualified
        # ... unless it already goes through $h: $h!user stays, $h!...!user loses $h.
        ("uucp", "carol@uuhost", "uuhost!carol"),
        ("uucp", "carol@UUHOST", "UUHOST!carol"),
        ("uucp-new", "far!carol@uuhost", "far!carol"),
        ("uucp", "uuhost!far!carol@gateway.example.com", "far!carol"),
        ("uucp", "uuhost!carol@gateway.example.com", "uuhost!carol"),
        # EnvFromUD (uucp-dom): EnvFromSMTP, qualified with $j; ruleset 4's UUCP form.
        ("uucp-dom", "alice@example.org", "alice@example.org"),
        ("uucp-dom", "root@gateway.example.com", "root@gateway.example.com"),
        ("uucp-dom", "", "MAILER-DAEMON@gateway.example.com"),
        ("uucp-dom", "daemon", "daemon@gateway.example.com"),
        ("uucp-dom", "bob@foo.UUCP", "foo!bob"),
        # EnvFromUUD (uucp-uudom): EnvFromSMTP, then domain!user.
        ("uucp-uudom", "alice@example.org", "example.org!alice"),
        ("uucp-uudom", "", "gateway.example.com!MAILER-DAEMON"),
        ("uucp-uudom", "bob@foo.uucp", "foo!bob"),
    ],
)
def test_sender_as_each_mailer_rewrites_it(mailer: str, sender: str, expected: str) -> None:
    assert (
        sender_argument(
            mailer, sender, host="uuhost", node=NODE, hostname=HOST, is_local=is_gateway
        )
        == expected
    )


@pytest.mark.parametrize(
    ("mailer", "address", "expected"),
    [
        ("uucp", "bob@uucpdomain.example", "uucpdomain.example!bob"),  # EnvToU
        ("uucp-old", "bob@uucpdomain.example.", "uucpdomain.example!bob"),
        ("suucp", "bob@far.UUCP", "far!bob"),
        ("uucp-new", "far!bob@uucpdomain.example", "uucpdomain.example!far!bob"),
        ("uucp-dom", "bob@uucpdomain.example", "bob@uucpdomain.example"),  # EnvToSMTP
        ("uucp-dom", "Bob.Smith@uucpdomain.example", "Bob.Smith@uucpdomain.example"),  # F=u
        ("uucp-uudom", "bob@far.uucp", "far!bob"),  # ruleset 4: UUCP always in old form
    ],
)
def test_recipient_as_each_mailer_rewrites_it(mailer: str, address: str, expected: str) -> None:
    assert recipient_argument(mailer, address) == expected


def test_from_line_with_and_without_f_u() -> None:
    date = "Tue Nov 24 19:17:12 2026"
    # F=U: putfromline's "From %s  $d remote from %s", the path split at its first "!".
    assert from_line("uucp", "gwnode!example.org!alice", date) == (
        b"From example.org!alice  Tue Nov 24 19:17:12 2026 remote from gwnode\n"
    )
    assert from_line("uucp-new", "uuhost!carol", date) == (
        b"From carol  Tue Nov 24 19:17:12 2026 remote from uuhost\n"
    )
    # No U (uucp-dom, uucp-uudom): UnixFromLine "From $g $d".
    assert from_line("uucp-dom", "alice@example.org", date) == (
        b"From alice@example.org Tue Nov 24 19:17:12 2026\n"
    )
    assert from_line("uucp-uudom", "example.org!alice", date) == (
        b"From example.org!alice Tue Nov 24 19:17:12 2026\n"
    )


def test_argv_repeats_the_u_word_per_recipient() -> None:
    args = ("uux", "-", "-r", "-a$g", "-gC", "$h!rmail", "($u)")
    assert uux_argv(args, g="gwnode!alice", h="uuhost", users=["a!b", "c!d"]) == [
        "uux", "-", "-r", "-agwnode!alice", "-gC", "uuhost!rmail", "(a!b)", "(c!d)",
    ]  # fmt: skip
    # An admin's UUCP_MAILER_ARGS: words after the $u word stay after the recipients.
    args = ("uux", "-z", "$h!rmail", "-a$g", "($u)", "-n")
    assert uux_argv(args, g="g", h="h", users=["u1", "u2"]) == [
        "uux", "-z", "h!rmail", "-ag", "(u1)", "(u2)", "-n",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ('"uux - -r $h!rmail"', "needs exactly one word with $u"),
        ('"uux ($u) ($u)"', "needs exactly one word with $u"),
        ('"uux -a$f $h!rmail ($u)"', "only $g (sender), $h (host) and $u (recipient)"),
        ('""', "expected a non-empty string"),
    ],
)
def test_bad_uux_args_name_file_and_line(tmp_path: Path, value: str, fragment: str) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text(f'[uucp]\nnode = "n"\nargs = {value}\n')
    with pytest.raises(ConfigError) as info:
        parse_config(path.read_text(), path, tmp_path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert fragment in str(info.value)


def test_uucp_defaults_are_uucp_m4s(tmp_path: Path) -> None:
    cfg = world.World().config(tmp_path).uucp
    assert cfg.uux == "/usr/bin/uux"
    assert cfg.args == ("uux", "-", "-r", "-a$g", "-gC", "$h!rmail", "($u)")
    assert cfg.max_size == 100000
    assert cfg.node == os.uname().nodename  # $k


# -- the mailer in the in-process attempt --------------------------------------------------------
class Gateway:
    """The gateway's spool, snapshot and delivery context, in process, with the real mailers."""

    def __init__(
        self, tmp_path: Path, uux: str, settings: str = "", aliases: str = "list: bob@old.example\n"
    ) -> None:
        setup = world.World(
            hostname=HOST,
            tables={"mailertable": MAILERTABLE, "aliases": aliases},
            settings=world.merge_settings(f'[uucp]\nuux = "{uux}"\nnode = "{NODE}"\n', settings),
        )
        config = setup.config(tmp_path)
        self.snap: Snapshot = build_snapshot(config)
        self.spool = Spool(config.spool_dir, fsync="threads")
        self.reports: list[QueuedMessage] = []
        self.ctx = DeliveryContext(
            spool=self.spool,
            resolver=Resolver(["192.0.2.53"]),
            snapshot=lambda: self.snap,
            queued=self.reports.append,
        )

    async def queue(self, *rcpts: str, sender: str = SENDER, content: bytes = CONTENT) -> str:
        env = Envelope(
            qid=self.spool.new_qid(),
            sender=sender,
            recipients=[Recipient(r, r) for r in rcpts],
            arrival=time.time(),
            client_ip="192.0.2.9",
        )
        incoming = self.spool.open_incoming(env)
        incoming.write(content)
        msg = await self.spool.commit(incoming, lock=False)
        return msg.qid

    def deliver(self, *rcpts: str, sender: str = SENDER, content: bytes = CONTENT) -> str:
        """Queue a message and make one attempt; its queue id."""

        async def go() -> str:
            qid = await self.queue(*rcpts, sender=sender, content=content)
            await attempt(self.ctx, qid)
            return qid

        return asyncio.run(go())

    def retry(self, qid: str) -> float | None:
        return asyncio.run(attempt(self.ctx, qid))

    def report(self) -> email.message.Message:
        [queued] = self.reports
        data = queued.path.read_bytes()[queued.offset :]
        return email.message_from_bytes(data, policy=email.policy.compat32)


@pytest.fixture
def log(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "maillog"
    maillog.setup(HOST, LogSettings(file=path))
    yield path
    maillog.setup("localhost")


def to_lines(log: Path) -> list[str]:
    """The ``to=`` lines, without the syslog prefix, the delays and the priority."""
    out = []
    for line in log.read_text().splitlines():
        if " to=<" in line:
            text = line.split(": ", 1)[1]
            out.append(re.sub(r" delay=[^,]+, xdelay=[^,]+,| pri=\d+,", "", text))
    return out


def from_line_of(call: Call) -> str:
    return call.stdin.split(b"\n", 1)[0].decode()


def body_of(call: Call) -> bytes:
    return call.stdin.split(b"\n", 1)[1]


@pytest.fixture
def fake(tmp_path: Path) -> FakeUux:
    return FakeUux(tmp_path / "fake")


def test_uucp_dom_hands_all_recipients_to_one_uux_call(
    tmp_path: Path, fake: FakeUux, log: Path
) -> None:
    gw = Gateway(tmp_path, str(fake.path))
    qid = gw.deliver("bob@uucpdomain.example", "carol@uucpdomain.example")
    [call] = fake.calls()
    assert call.argv == [
        "-", "-r", "-aalice@example.org", "-gC", "uuhost!rmail",
        "(bob@uucpdomain.example)", "(carol@uucpdomain.example)",
    ]  # fmt: skip
    assert re.fullmatch(f"From alice@example.org {DATE}", from_line_of(call))
    assert body_of(call) == LF_CONTENT
    assert sorted(gw.spool.qids()) == []  # delivered, nothing bounced
    assert gw.reports == []
    assert to_lines(log) == [  # one uux call, one line (Sendmail's F=m)
        f"{qid}: to=<bob@uucpdomain.example>,<carol@uucpdomain.example>, mailer=uucp-dom,"
        " relay=uuhost, dsn=2.0.0, stat=Sent"
    ]


@pytest.mark.parametrize(
    ("domain", "mailer", "sender", "recipient", "uucp_from"),
    [
        ("old.example", "uucp", "gwnode!example.org!alice", "old.example!{}", True),
        ("oldold.example", "uucp-old", "gwnode!example.org!alice", "oldold.example!{}", True),
        ("new.example", "uucp-new", "gwnode!example.org!alice", "new.example!{}", True),
        ("snew.example", "suucp", "gwnode!example.org!alice", "snew.example!{}", True),
        ("uucpdomain.example", "uucp-dom", "alice@example.org", "{}@uucpdomain.example", False),
        ("uudom.example", "uucp-uudom", "example.org!alice", "{}@uudom.example", False),
    ],
)
def test_each_mailers_argv_and_stdin(
    tmp_path: Path,
    fake: FakeUux,
    log: Path,
    domain: str,
    mailer: str,
    sender: str,
    recipient: str,
    uucp_from: bool,
) -> None:
    gw = Gateway(tmp_path, str(fake.path))
    gw.deliver(f"bob@{domain}", f"carol@{domain}")
    head = ["-", "-r", f"-a{sender}", "-gC", "uuhost!rmail"]
    users = [f"({recipient.format(u)})" for u in ("bob", "carol")]
    calls = fake.calls()
    if mailer in ("uucp", "uucp-old"):  # no F=m: one recipient per call, a line each
        assert [c.argv for c in calls] == [[*head, u] for u in users]
        listed = [f"<bob@{domain}>", f"<carol@{domain}>"]
    else:
        assert [c.argv for c in calls] == [head + users]
        listed = [f"<bob@{domain}>,<carol@{domain}>"]
    for call in calls:
        first = from_line_of(call)
        if uucp_from:  # F=U
            assert re.fullmatch(f"From example.org!alice  {DATE} remote from gwnode", first)
        else:
            assert re.fullmatch(f"From {re.escape(sender)} {DATE}", first)
        assert body_of(call) == LF_CONTENT
    assert [line.split(": to=", 1)[1] for line in to_lines(log)] == [
        f"{to}, mailer={mailer}, relay=uuhost, dsn=2.0.0, stat=Sent" for to in listed
    ]


def test_a_bounce_goes_out_from_mailer_daemon(tmp_path: Path, fake: FakeUux) -> None:
    gw = Gateway(tmp_path, str(fake.path))
    gw.deliver("bob@old.example", sender="")
    gw.deliver("bob@uucpdomain.example", sender="")
    old, dom = fake.calls()
    assert old.argv[2] == "-agwnode!MAILER-DAEMON"
    assert re.fullmatch(f"From MAILER-DAEMON  {DATE} remote from gwnode", from_line_of(old))
    assert dom.argv[2] == "-aMAILER-DAEMON@gateway.example.com"


def test_at_most_100_recipients_per_uux_call(tmp_path: Path, fake: FakeUux, log: Path) -> None:
    gw = Gateway(tmp_path, str(fake.path))
    rcpts = [f"u{i:03}@new.example" for i in range(MAX_RCPT + 1)]
    gw.deliver(*rcpts)
    first, second = fake.calls()
    assert first.argv[5:] == [f"(new.example!u{i:03})" for i in range(MAX_RCPT)]
    assert second.argv[5:] == [f"(new.example!u{MAX_RCPT:03})"]
    assert sorted(gw.spool.qids()) == []
    # Each call's recipients on lines of their own (the first call's too many for one line)
    lists = [line.split(": to=", 1)[1].split(", mailer=")[0] for line in to_lines(log)]
    *first_call, second_call = lists
    assert [to.endswith(", [more]") for to in first_call] == [True] * (len(first_call) - 1) + [
        False
    ]
    assert ",".join(to.removesuffix(", [more]") for to in first_call) == ",".join(
        f"<{r}>" for r in rcpts[:MAX_RCPT]
    )
    assert second_call == f"<{rcpts[MAX_RCPT]}>"


def test_an_alias_to_a_uucp_address(tmp_path: Path, fake: FakeUux, log: Path) -> None:
    gw = Gateway(tmp_path, str(fake.path))
    qid = gw.deliver("list@gateway.example.com")
    [call] = fake.calls()
    assert call.argv[5:] == ["(old.example!bob)"]
    # The address it went to, as Sendmail's to= of an expanded alias.
    assert [line.split(", ")[0] for line in to_lines(log)] == [f"{qid}: to=<bob@old.example>"]


def test_a_recipient_with_white_space_bounces_alone(tmp_path: Path, fake: FakeUux) -> None:
    # uux joins its words and splits them again: ("a b"@x) would become two broken words.
    gw = Gateway(tmp_path, str(fake.path))
    gw.deliver('"a b"@uucpdomain.example', "bob@uucpdomain.example")
    [call] = fake.calls()
    assert call.argv[5:] == ["(bob@uucpdomain.example)"]
    [bounce] = gw.reports
    bounce.close()
    assert "553 5.1.3 White space in a UUCP address" in str(gw.report())


def test_tempfail_is_deferred_and_retried(tmp_path: Path, fake: FakeUux, log: Path) -> None:
    gw = Gateway(tmp_path, str(fake.path))
    fake.answer(75, "uux: spool locked\nmore\n")
    qid = gw.deliver("bob@uucpdomain.example")
    assert sorted(gw.spool.qids()) == [qid]
    st = gw.spool.load_status(qid)
    assert st.recipients["bob@uucpdomain.example"].status is RcptStatus.PENDING
    assert st.last_error("bob@uucpdomain.example") == (
        "Deferred: 450 4.0.0 Deferred: uux: spool locked"
    )
    assert to_lines(log) == [
        f"{qid}: to=<bob@uucpdomain.example>, mailer=uucp-dom, relay=uuhost, dsn=4.0.0,"
        " stat=Deferred: 450 4.0.0 Deferred: uux: spool locked"
    ]
    fake.answer(0)
    assert gw.retry(qid) is None
    first, second = fake.calls()
    assert first.argv == second.argv
    assert sorted(gw.spool.qids()) == []
    assert gw.reports == []


@pytest.mark.parametrize("status", [71, 74])  # EX_OSERR, EX_IOERR: queued as Sendmail's
def test_oserr_and_ioerr_are_deferred(tmp_path: Path, fake: FakeUux, status: int) -> None:
    gw = Gateway(tmp_path, str(fake.path))
    fake.answer(status)
    qid = gw.deliver("bob@new.example")
    assert sorted(gw.spool.qids()) == [qid]
    assert gw.reports == []


def test_nouser_is_bounced_with_the_first_stderr_line(
    tmp_path: Path, fake: FakeUux, log: Path
) -> None:
    gw = Gateway(tmp_path, str(fake.path))
    fake.answer(67, "rmail: bob: no such user\n")
    qid = gw.deliver("bob@uucpdomain.example", "carol@uucpdomain.example")
    assert len(fake.calls()) == 1  # both in the one call: both fail
    [bounce] = gw.reports
    assert sorted(gw.spool.qids()) == [bounce.qid]
    bounce.close()
    report = gw.report()
    assert report["To"] == f"<{SENDER}>"
    parts = report.get_payload()
    assert isinstance(parts, list)
    [status] = [p for p in parts if p.get_content_type() == "message/delivery-status"]
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    fields = [{k.lower(): " ".join(str(v).split()) for k, v in b.items()} for b in blocks[1:]]
    assert [(f["final-recipient"], f["action"], f["status"]) for f in fields] == [
        ("rfc822; bob@uucpdomain.example", "failed", "5.1.1"),
        ("rfc822; carol@uucpdomain.example", "failed", "5.1.1"),
    ]
    assert fields[0]["diagnostic-code"] == "smtp; 550 5.1.1 User unknown: rmail: bob: no such user"
    assert to_lines(log)[0] == (
        f"{qid}: to=<bob@uucpdomain.example>,<carol@uucpdomain.example>, mailer=uucp-dom,"
        " relay=uuhost, dsn=5.1.1, stat=User unknown"
    )


def test_an_unknown_exit_status_bounces(tmp_path: Path, fake: FakeUux, log: Path) -> None:
    gw = Gateway(tmp_path, str(fake.path))
    fake.answer(1, "uux: uuhost: System not found\n")
    gw.deliver("bob@old.example")
    assert len(gw.reports) == 1
    assert to_lines(log)[0].endswith(
        "mailer=uucp, relay=uuhost, dsn=5.3.0,"
        " stat=554 5.3.0 unknown mailer error 1: uux: uuhost: System not found"
    )


def test_uux_killed_by_a_signal_is_deferred(tmp_path: Path, log: Path) -> None:
    script = tmp_path / "uux"
    script.write_text("#!/bin/sh\ncat >/dev/null\nkill -KILL $$\n")
    script.chmod(0o755)
    gw = Gateway(tmp_path, str(script))
    qid = gw.deliver("bob@uucpdomain.example")
    assert sorted(gw.spool.qids()) == [qid]
    assert to_lines(log)[0].endswith(
        "dsn=4.3.0, stat=Deferred: 451 4.3.0 mailer uucp-dom died with signal 9"
    )


def test_missing_uux_defers_with_the_reason(tmp_path: Path, log: Path) -> None:
    missing = tmp_path / "nowhere" / "uux"
    gw = Gateway(tmp_path, str(missing))
    qid = gw.deliver("bob@uucpdomain.example")
    assert sorted(gw.spool.qids()) == [qid]
    assert gw.reports == []
    reason = f"Deferred: 451 4.3.0 Cannot exec {missing}: No such file or directory"
    assert gw.spool.load_status(qid).last_error("bob@uucpdomain.example") == reason
    assert to_lines(log)[0].endswith(f"relay=uuhost, dsn=4.3.0, stat={reason}")


def test_a_bare_uux_is_looked_up_in_path(
    tmp_path: Path, fake: FakeUux, monkeypatch: pytest.MonkeyPatch, log: Path
) -> None:
    gw = Gateway(tmp_path, "uux")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    qid = gw.deliver("bob@uucpdomain.example")
    assert gw.spool.load_status(qid).last_error("bob@uucpdomain.example") == (
        "Deferred: 451 4.3.0 Cannot exec uux: not in PATH"
    )
    monkeypatch.setenv("PATH", fake.path_with_bin())
    assert gw.retry(qid) is None
    [call] = fake.calls()
    assert call.argv[5:] == ["(bob@uucpdomain.example)"]


def test_a_message_over_max_size_bounces_without_uux(tmp_path: Path, fake: FakeUux) -> None:
    gw = Gateway(tmp_path, str(fake.path), "[uucp]\nmax_size = 100\n")
    big = CONTENT + b"x" * 100 + b"\r\n"
    gw.deliver("bob@uucpdomain.example", content=big)
    assert fake.calls() == []
    [bounce] = gw.reports
    bounce.close()
    assert "552 5.3.4 Message is too large; 100 bytes max" in str(gw.report())
    gw.reports.clear()
    gw.deliver("bob@uucpdomain.example")  # len(CONTENT) < 100
    assert len(fake.calls()) == 1


def test_alias_program_exit_codes_route_through_the_program_mailer(
    tmp_path: Path, log: Path
) -> None:
    aliases = 'nouser: "|cat >/dev/null; exit 67"\nlater: "|exit 75"\n'
    gw = Gateway(tmp_path, "/usr/bin/uux", aliases=aliases)
    qid = gw.deliver("nouser@gateway.example.com", "later@gateway.example.com")
    lines = sorted(to_lines(log))
    assert lines == [
        f"{qid}: to=<later@gateway.example.com>, mailer=prog, relay=local, dsn=4.0.0,"
        " stat=Deferred: 450 4.0.0 Deferred",
        f"{qid}: to=<nouser@gateway.example.com>, mailer=prog, relay=local, dsn=5.1.1,"
        " stat=User unknown",
    ]
    assert len(gw.reports) == 1  # nouser bounced; later waits


# -- mailgate check and mailgate route -----------------------------------------------------------
def write_config(tmp_path: Path, uux: str) -> Path:
    return world.World(
        hostname=HOST,
        tables={"mailertable": "uucpdomain.example uucp-dom:uuhost\nold.example uucp:uuhost\n"},
        settings=f'[uucp]\nuux = "{uux}"\nnode = "{NODE}"\n',
    ).write(tmp_path)


def test_check_loads_the_uucp_dom_line(
    tmp_path: Path, fake: FakeUux, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, str(fake.path))
    assert cli.main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    generation = load_snapshot(path).generation
    assert (
        out == f"{path}: OK (0 in local-host-names, 0 in relay-domains; 0 warnings; "
        f"generation {generation})\n"
    )


def test_check_warns_when_uux_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere" / "uux"
    path = write_config(tmp_path, str(missing))
    assert cli.main(["check", "-c", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = tmp_path / "tables" / "mailertable"
    assert lines == [
        f"warning: {table}:1: uucpdomain.example: uucp-dom runs {missing}, which is not there"
        " or not executable: its mail is deferred until it is (install uucp, or set [uucp] uux)",
        f"warning: {table}:2: old.example: uucp runs {missing}, which is not there"
        " or not executable: its mail is deferred until it is (install uucp, or set [uucp] uux)",
        f"{path}: OK (0 in local-host-names, 0 in relay-domains; 2 warnings; "
        f"generation {load_snapshot(path).generation})",
    ]


def test_route_shows_the_uucp_mailer_host_and_user(
    tmp_path: Path, fake: FakeUux, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, str(fake.path))
    assert cli.main(["route", "-c", str(path), "bob@uucpdomain.example", "bob@old.example"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "bob@uucpdomain.example: mailer uucp-dom, host uuhost, user bob@uucpdomain.example"
        "  [mailertable line 1 (uucpdomain.example)]",
        # -bt's user: the recipient after the mailer's R= (EnvToU)
        "bob@old.example: mailer uucp, host uuhost, user old.example!bob"
        "  [mailertable line 2 (old.example)]",
    ]


# -- the real daemon -----------------------------------------------------------------------------
DNS_RECORDS = SENDER_DNS

E2E_WORLD = world.World(
    tables={
        "mailertable": "uucpdomain.example uucp-dom:uuhost\n",
        "access": "To:uucpdomain.example RELAY\n",
    },
    settings=(
        '[queue]\nrun_interval = "2s"\nretry_min = "1s"\n'
        '[smtp]\ngreet_pause = "0s"\n'
        f'[uucp]\nuux = "uux"\nnode = "{NODE}"\n'
    ),
)


def test_daemon_hands_uucp_dom_mail_to_uux_on_path(
    make_gateway: GatewayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeUux(tmp_path / "fake")
    fake.answer(75, "uux: busy")
    monkeypatch.setenv("PATH", fake.path_with_bin())  # the daemon's PATH
    gw: GatewayProcess = make_gateway(E2E_WORLD)
    body = message("to uucp", to="bob@uucpdomain.example")
    with gw.smtp("127.0.0.2") as s:
        s.sendmail(SENDER, ["bob@uucpdomain.example", "carol@uucpdomain.example"], body)
    gw.wait_log("stat=Deferred: 450 4.0.0 Deferred: uux: busy")
    assert len(gw.queued()) == 1
    fake.answer(0)
    gw.wait_log("stat=Sent")
    wait_until(lambda: gw.queued() == [], "the message to leave the queue")
    *_tempfailed, call = fake.calls()
    assert call.argv == [
        "-", "-r", "-aalice@example.org", "-gC", "uuhost!rmail",
        "(bob@uucpdomain.example)", "(carol@uucpdomain.example)",
    ]  # fmt: skip
    assert re.fullmatch(f"From alice@example.org {DATE}", from_line_of(call))
    data = body_of(call)  # as queued (our Received: on top), with LF line ends
    assert data.startswith(b"Received: from client.example.net ([127.0.0.2])")
    assert data.endswith(body.replace(b"\r\n", b"\n"))
    assert b"\r" not in data
    [sent] = gw.log_lines("stat=Sent")
    assert re.search(
        r"to=<bob@uucpdomain\.example>,<carol@uucpdomain\.example>, delay=\S+, xdelay=\S+,"
        r" mailer=uucp-dom, pri=\d+, relay=uuhost, dsn=2\.0\.0, stat=Sent",
        sent,
    )


# -- Debian's uucp (Taylor UUCP 1.07) ------------------------------------------------------------
REAL_UUX = "/usr/bin/uux"
needs_uucp = pytest.mark.skipif(
    not os.access(REAL_UUX, os.X_OK), reason="Debian's uucp is not installed"
)


@pytest.fixture
def taylor() -> Iterator[Path]:
    """A Taylor UUCP configuration of our own (uux -I): node gwnode, one known system uuhost,
    spool and logs in a folder that the setuid-uucp uux may write."""
    top = Path(tempfile.mkdtemp(prefix="mailgate-uucp-"))
    try:
        top.chmod(0o755)
        spool = top / "spool"
        spool.mkdir(mode=0o777)
        spool.chmod(0o777)
        files = {name: top / name for name in ("sys", "port", "dial", "call", "passwd")}
        for name, path in files.items():
            path.write_text("system uuhost\ntime any\nport none\n" if name == "sys" else "")
        (top / "config").write_text(
            f"nodename {NODE}\nspool {spool}\npubdir {spool}\nlockdir {spool}\n"
            f"logfile {spool}/Log\nstatfile {spool}/Stats\ndebugfile {spool}/Debug\n"
            + "".join(f"{name}file {path}\n" for name, path in files.items())
        )
        yield top
    finally:
        shutil.rmtree(top)


def taylor_gateway(tmp_path: Path, taylor: Path) -> Gateway:
    args = f"uux -I {taylor / 'config'} - -r -a$g -gC $h!rmail ($u)"
    return Gateway(tmp_path, REAL_UUX, f'[uucp]\nargs = "{args}"\n')


@needs_uucp
def test_real_uux_queues_one_rmail_job_for_both(tmp_path: Path, taylor: Path, log: Path) -> None:
    gw = taylor_gateway(tmp_path, taylor)
    qid = gw.deliver("bob@uucpdomain.example", "carol@uucpdomain.example")
    assert to_lines(log) == [  # one uux call, one line (Sendmail's F=m)
        f"{qid}: to=<bob@uucpdomain.example>,<carol@uucpdomain.example>, mailer=uucp-dom,"
        " relay=uuhost, dsn=2.0.0, stat=Sent"
    ]
    jobs = taylor / "spool" / "uuhost"
    [command] = (jobs / "C.").iterdir()
    # Taylor's execute line: the data file, the requestor (-a$g), the command without ($u)'s
    # parentheses: what uuhost's uuxqt will run.
    line = command.read_text()
    found = re.fullmatch(
        r"E (D\.\w+) \S+ \S+ -CR \1 0666 alice@example\.org 0 "
        r"rmail bob@uucpdomain\.example carol@uucpdomain\.example\n",
        line,
    )
    assert found, line
    data = (jobs / "D." / found[1]).read_bytes()
    first, rest = data.split(b"\n", 1)
    assert re.fullmatch(f"From alice@example.org {DATE}", first.decode())
    assert rest == LF_CONTENT
    status = subprocess.run(
        ["uustat", "-I", str(taylor / "config"), "-a"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "rmail bob@uucpdomain.example carol@uucpdomain.example" in status


@needs_uucp
def test_real_uux_refuses_an_unknown_system(tmp_path: Path, taylor: Path, log: Path) -> None:
    # Taylor's uux exits EX_UNAVAILABLE (69) for a system its sys file does not list.
    gw = taylor_gateway(tmp_path, taylor)
    qid = gw.deliver("bob@unknown.example")
    assert to_lines(log) == [
        f"{qid}: to=<bob@unknown.example>, mailer=uucp-dom, relay=nosuchhost, dsn=5.0.0,"
        " stat=554 5.0.0 Service unavailable: uux: nosuchhost: System not found"
    ]
    assert len(gw.reports) == 1
    assert not (taylor / "spool" / "nosuchhost").exists()
