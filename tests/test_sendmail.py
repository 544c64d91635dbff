"""The sendmail command driven the way cron and scripts call it: the real ``mailgate sendmail``
(and the program names ``install-sendmail-link`` puts in place) in a subprocess, a message on
its standard input, the real daemon delivering to a sink on loopback, or down.

The daemon's queue runs are an hour apart here, so a message that arrives at the sink within
the wait came because the command told the daemon (PICKUP_SIGNAL through the pid file).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mailgate.queue.spool import Spool
from tests.support.dnsserver import DnsServer
from tests.support.gateway import GatewayProcess, accepts, mailgate_command
from tests.support.sink import SinkServer
from tests.support.world import (
    HOP1,
    HOSTNAME,
    SENDER,
    SENDER_DNS,
    GatewayFactory,
    SinkFactory,
    World,
    issue_world,
    wait_until,
)

DNS_RECORDS = SENDER_DNS
ROOT = f"root@{HOSTNAME}"
CRON_MAIL = (
    b"From: root (Cron Daemon)\n"
    b"To: bob@targetdomain1.com\n"
    b"Cc: Carol <carol@targetdomain1.com>, dave@targetdomain1.com\n"
    b"Bcc: eve@targetdomain1.com\n"
    b"Subject: Cron <root@gw> run-parts /etc/cron.daily\n"
    b"\n"
    b"/etc/cron.daily/logrotate:\n"
    b"error: skipping\n"
)


@pytest.fixture
def hop1(make_sink: SinkFactory) -> SinkServer:
    return make_sink(HOP1)


@pytest.fixture
def world(hop1: SinkServer, mx_port: int) -> World:
    return issue_world(hop1.port, mx_port).but(
        settings='pid_file = "mailgate.pid"\n[queue]\nrun_interval = "1h"\n'
    )


def sendmail(
    gw: GatewayProcess, *args: str, stdin: bytes = b"", program: list[str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``sendmail -C <the gateway's config> args`` with ``stdin``, as a script runs it."""
    return subprocess.run(
        [*(program or mailgate_command("sendmail")), "-C", str(gw.config), *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )


def spool_file(gw: GatewayProcess, qid: str) -> tuple[str, bytes]:
    """(the envelope line, the content) of a queued message."""
    envelope, _, content = (gw.spool / "queue" / qid).read_bytes().partition(b"\n")
    return envelope.decode(), content


@pytest.mark.parametrize("workers", [1, 2])
def test_cron_mail_with_t_is_delivered_to_to_cc_and_bcc_without_the_bcc_line(
    make_gateway: GatewayFactory, world: World, hop1: SinkServer, workers: int
) -> None:
    # With workers, the master has the pid file and passes the signal on to them.
    gw = make_gateway(world.but(settings=f"workers = {workers}\n"))
    done = sendmail(gw, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "-t", stdin=CRON_MAIL)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    [msg] = hop1.wait_for(1, timeout=15)
    assert msg.mail_from == ROOT
    assert msg.rcpt_tos == [
        "bob@targetdomain1.com",
        "carol@targetdomain1.com",
        "dave@targetdomain1.com",
        "eve@targetdomain1.com",
    ]
    head, _, body = msg.data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"Received: (from root@localhost)"
    assert lines[1].startswith(b"\tby gateway.example.com (mailgate/Submit) id ")
    assert not [line for line in lines if line.lower().startswith(b"bcc:")]
    assert b"From: root (Cron Daemon)" in lines  # the message's own, kept
    assert body == b"/etc/cron.daily/logrotate:\r\nerror: skipping\r\n"
    [line] = gw.log_lines("relay=root@localhost")
    assert f"from=<{ROOT}>" in line and "nrcpts=4" in line


def test_echo_into_sendmail_with_an_address_is_delivered(
    make_gateway: GatewayFactory, world: World, hop1: SinkServer
) -> None:
    gw = make_gateway(world)
    done = sendmail(gw, "bob@targetdomain1.com", stdin=b"hi\n")
    assert (done.returncode, done.stderr) == (0, b"")
    [msg] = hop1.wait_for(1, timeout=15)
    assert msg.rcpt_tos == ["bob@targetdomain1.com"]
    head, _, body = msg.data.partition(b"\r\n\r\n")
    assert body == b"hi\r\n"
    assert b"\r\nFrom: root <root@gateway.example.com>" in head  # added, with passwd's name
    assert b"\r\nMessage-Id: <" in head and b"\r\nDate: " in head


def test_with_the_daemon_down_the_message_waits_in_the_spool_for_its_start(
    make_gateway: GatewayFactory, world: World, hop1: SinkServer
) -> None:
    gw = make_gateway(world, start=False)
    done = sendmail(gw, "-f", "backup@example.org", "bob@targetdomain1.com", stdin=b"x\nyz\r\n")
    assert (done.returncode, done.stderr) == (0, b"")
    [qid] = gw.queued()
    envelope, content = spool_file(gw, qid)
    assert '"sender":"backup@example.org"' in envelope and '"proto":"local"' in envelope
    assert content.endswith(b"\r\n\r\nx\r\nyz\r\n")
    assert b"\n" not in content.replace(b"\r\n", b"")  # the bare LF became CRLF
    gw.start()
    [msg] = hop1.wait_for(1, timeout=15)
    assert (msg.mail_from, msg.rcpt_tos) == ("backup@example.org", ["bob@targetdomain1.com"])
    wait_until(lambda: not gw.queued(), "the queue to be empty")


def test_f_by_an_untrusted_user_gets_an_authentication_warning(
    make_gateway: GatewayFactory, world: World, hop1: SinkServer
) -> None:
    # root is trusted only by the list, which this config empties; the spool belongs to
    # the daemon's user, who always is.
    gw = make_gateway(world.but(settings="[submission]\ntrusted_users = []\n"))
    os.chown(gw.spool, 1, 1)
    done = sendmail(gw, "-f", "ceo@example.org", "bob@targetdomain1.com", stdin=b"pay\n")
    assert (done.returncode, done.stderr) == (0, b"")
    [msg] = hop1.wait_for(1, timeout=15)
    assert msg.mail_from == "ceo@example.org"
    warning = b"X-Authentication-Warning: gateway.example.com: root set sender to ceo@example.org"
    assert warning + b" using -f\r\n" in msg.data
    assert gw.log_lines("Authentication-Warning: gateway.example.com: root set sender to")


def test_f_by_a_trusted_user_gets_none(
    make_gateway: GatewayFactory, world: World, hop1: SinkServer
) -> None:
    gw = make_gateway(world)
    done = sendmail(gw, "-fceo@example.org", "bob@targetdomain1.com", stdin=b"pay\n")
    assert done.returncode == 0
    [msg] = hop1.wait_for(1, timeout=15)
    assert msg.mail_from == "ceo@example.org"
    assert b"X-Authentication-Warning" not in msg.data


def test_bd_is_the_detached_daemon_and_bd_upper_the_foreground_one(
    world: World, hop1: SinkServer, dns: DnsServer, tmp_path: Path
) -> None:
    gw = world.gateway(tmp_path / "gw", dns)  # its files; sendmail is the daemon

    def deliver(subject: str) -> None:
        wait_until(lambda: accepts(gw.host, gw.port), "it to listen")
        with gw.smtp() as client:
            client.sendmail(SENDER, ["bob@targetdomain1.com"], f"Subject: {subject}\r\n\r\nx\r\n")
        hop1.wait_subject(subject, timeout=15)

    detached = sendmail(gw, "-bd", "-q1h")  # returns once the daemon listens
    assert (detached.returncode, detached.stderr) == (0, b"")
    try:
        deliver("via -bd")
    finally:
        stopped = subprocess.run(
            mailgate_command("stop", "-c", str(gw.config)), capture_output=True, timeout=60
        )
    assert stopped.returncode == 0, stopped.stderr
    foreground = subprocess.Popen(
        [*mailgate_command("sendmail"), "-C", str(gw.config), "-bD", "-q1h"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deliver("via -bD")
    finally:
        foreground.terminate()
        _, stderr = foreground.communicate(timeout=30)
    assert (foreground.returncode, stderr) == (0, b"")


def test_a_full_name_cannot_add_a_header_field(make_gateway: GatewayFactory, world: World) -> None:
    gw = make_gateway(world, start=False)
    done = sendmail(gw, "-F", "Mallory\r\nBcc: eve@example.org\n", "alice", stdin=b"hi\n")
    assert done.returncode == 0
    [qid] = gw.queued()
    _, content = spool_file(gw, qid)
    assert b'\r\nFrom: "Mallory Bcc: eve@example.org" <root@gateway.example.com>\r\n' in content
    assert b"\r\nBcc:" not in content


def test_8bitmime_is_declared_for_8_bit_text_or_as_b_says(
    make_gateway: GatewayFactory, world: World
) -> None:
    gw = make_gateway(world, start=False)
    for args, text in [
        ((), b"Subject: plain\n\nascii\n"),
        ((), "Subject: utf-8\n\nR\u00e9sum\u00e9\n".encode()),
        (("-B8BITMIME",), b"Subject: said 8-bit\n\nascii\n"),
        (("-B7BIT",), "Subject: said 7-bit\n\nR\u00e9sum\u00e9\n".encode()),
        # Larger than what is read before the envelope line is written: the rest is unseen.
        ((), b"Subject: large\n\n" + (b"x" * 70 + b"\n") * 4000),
    ]:
        assert sendmail(gw, *args, "alice", stdin=text).returncode == 0
    declared = {}
    for qid in gw.queued():
        envelope, content = spool_file(gw, qid)
        subject = content.split(b"\r\nSubject: ")[1].split(b"\r\n")[0].decode()
        declared[subject] = json.loads(envelope)["body_8bit"]
    assert declared == {
        "plain": False,
        "utf-8": True,
        "said 8-bit": True,
        "said 7-bit": False,
        "large": True,
    }


def test_a_lone_dot_ends_the_message_unless_i(make_gateway: GatewayFactory, world: World) -> None:
    gw = make_gateway(world, start=False)
    text = b"Subject: dots\n\nbefore\n.\nafter\n"
    assert sendmail(gw, "alice", stdin=text).returncode == 0
    assert sendmail(gw, "-oi", "alice", stdin=text).returncode == 0
    first, second = (spool_file(gw, qid)[1] for qid in gw.queued())
    assert first.endswith(b"\r\n\r\nbefore\r\n")
    assert second.endswith(b"\r\n\r\nbefore\r\n.\r\nafter\r\n")


@pytest.mark.parametrize(
    ("args", "stdin", "status", "stderr"),
    [
        ((), b"hi\n", 64, b"sendmail: Recipient names must be specified\n"),
        (("-t",), b"hi\n", 64, b"sendmail: No recipient addresses found in header\n"),
        (("-Y", "alice"), b"hi\n", 64, b"sendmail: invalid option -- 'Y'\n"),
        (
            ("-bs",),
            b"",
            64,
            b"sendmail: -bs: mode not supported (use -bm, -bp, -bt, -bv, -bd, -bi)\n",
        ),
        (("nosuch",), b"hi\n", 67, b"nosuch... User unknown\n"),
        (
            ("-t",),
            b"To: nosuch, Bob <bob@>, <@>\n\nhi\n",
            67,
            b"nosuch... User unknown\nbob@... Hostname required\n"
            b"@... List:; syntax illegal for recipient addresses\n",
        ),
        (
            ("-f", "a@b@c", "alice"),
            b"hi\n",
            64,
            b"sendmail: -f a@b@c: <a@b@c>... Invalid route address\n",
        ),
        (
            ("-O", "MaxMessageSize=200", "alice"),
            b"Subject: big\n\n" + b"x" * 300 + b"\n",
            65,
            b"sendmail: 552 5.2.3 Message exceeds maximum fixed size (200)\n",
        ),
    ],
)
def test_exit_statuses_are_sendmails_and_nothing_is_queued(
    make_gateway: GatewayFactory,
    world: World,
    args: tuple[str, ...],
    stdin: bytes,
    status: int,
    stderr: bytes,
) -> None:
    gw = make_gateway(world, start=False)
    Spool(gw.spool).close()  # its folders, for the check that nothing is left in them
    done = sendmail(gw, *args, stdin=stdin)
    assert (done.returncode, done.stderr) == (status, stderr)
    assert gw.queued() == []
    assert list((gw.spool / "incoming").iterdir()) == []


def test_a_refused_recipient_leaves_the_others_their_message(
    make_gateway: GatewayFactory, world: World
) -> None:
    gw = make_gateway(world, start=False)
    done = sendmail(gw, "nosuch", "Alice <alice>, bob@targetdomain1.com", stdin=b"hi\n")
    assert (done.returncode, done.stderr) == (67, b"nosuch... User unknown\n")
    [qid] = gw.queued()
    envelope, _ = spool_file(gw, qid)
    assert '"recipients":[{"address":"alice","original":"alice"' in envelope
    assert '{"address":"bob@targetdomain1.com"' in envelope


def test_a_config_that_does_not_load_is_ex_config(tmp_path: Path) -> None:
    bad = tmp_path / "mailgate.toml"
    bad.write_text("[smtp]\nmax_message_size = 'huge'\n")
    done = subprocess.run(
        mailgate_command("sendmail", "-C", str(bad), "alice"),
        input=b"hi\n",
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 78
    assert done.stderr.decode() == (
        f"sendmail: {bad}:2: smtp.max_message_size: bad size 'huge': use e.g. \"50M\", "
        '"100MiB" or a number of bytes\n'
    )


def test_without_c_the_config_is_mailgate_config_as_postfixs_mail_config(
    make_gateway: GatewayFactory, world: World, tmp_path: Path
) -> None:
    gw = make_gateway(world, start=False)

    def run(config: Path) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            mailgate_command("sendmail", "alice"),
            input=b"hi\n",
            capture_output=True,
            timeout=60,
            check=False,
            env={**os.environ, "MAILGATE_CONFIG": str(config)},
            cwd=tmp_path,  # not where the embedded config's relative spool would be
        )

    assert run(gw.config).returncode == 0
    assert len(gw.queued()) == 1
    missing = run(tmp_path / "none.toml")
    assert (missing.returncode, missing.stderr) == (
        78,
        f"sendmail: {tmp_path / 'none.toml'}: no such file\n".encode(),
    )


def test_bp_lists_the_queue_and_q_v_runs_it(
    make_gateway: GatewayFactory, world: World, hop1: SinkServer
) -> None:
    gw = make_gateway(world, start=False)
    assert sendmail(gw, "bob@targetdomain1.com", stdin=b"queued\n").returncode == 0
    [qid] = gw.queued()
    listing = sendmail(gw, "-bp")
    assert listing.returncode == 0
    lines = listing.stdout.decode().splitlines()
    assert lines[0] == f"\t\t{gw.spool / 'queue'} (1 request)"
    assert lines[2].startswith(qid) and lines[2].endswith(f"<{ROOT}>")
    assert lines[3:] == ["\t\t\t\t\t <bob@targetdomain1.com>", "\t\tTotal requests: 1"]
    run = sendmail(gw, "-q", "-v")
    assert run.returncode == 0
    assert f"Running {qid}" in run.stdout.decode()
    [msg] = hop1.wait_for(1, timeout=15)
    assert msg.rcpt_tos == ["bob@targetdomain1.com"]
    assert gw.queued() == []


def test_bv_verifies_without_sending(
    make_gateway: GatewayFactory, world: World, hop1: SinkServer
) -> None:
    gw = make_gateway(world, start=False)
    done = sendmail(gw, "-bv", "team@mail.example.org", "bob@targetdomain1.com", "nosuch")
    assert done.returncode == 67
    assert done.stdout.decode().splitlines() == [
        "alice... deliverable: mailer local, user alice",
        f"bob@targetdomain1.com... deliverable: mailer smtp, host [{HOP1}]:{hop1.port}, "
        "user bob@targetdomain1.com",
        f"bob@targetdomain1.com... deliverable: mailer smtp, host [{HOP1}]:{hop1.port}, "
        "user bob@targetdomain1.com",
        "nosuch... User unknown",
    ]
    assert gw.queued() == []
    ok = sendmail(gw, "-bv", "alice")
    assert (ok.returncode, ok.stdout) == (0, b"alice... deliverable: mailer local, user alice\n")


def test_bt_routes_the_addresses_on_standard_input(
    make_gateway: GatewayFactory, world: World, hop1: SinkServer
) -> None:
    gw = make_gateway(world, start=False)
    done = sendmail(
        gw, "-bt", stdin=b"alice\n3,0 bob@targetdomain1.com\n# a comment\n/quit\nnosuch\n"
    )
    assert done.returncode == 0
    assert done.stdout.decode().splitlines() == [
        "alice: mailer local, host local, user alice  [local user]",
        f"bob@targetdomain1.com: mailer smtp, host [{HOP1}]:{hop1.port}, user "
        "bob@targetdomain1.com  [mailertable line 1 (targetdomain1.com)]",
    ]


def test_bt_takes_the_same_forms_on_the_command_line(
    make_gateway: GatewayFactory, world: World, hop1: SinkServer
) -> None:
    gw = make_gateway(world, start=False)
    done = sendmail(gw, "-bt", "3,0 bob@targetdomain1.com", "/parse alice", stdin=b"")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().splitlines() == [
        f"bob@targetdomain1.com: mailer smtp, host [{HOP1}]:{hop1.port}, user "
        "bob@targetdomain1.com  [mailertable line 1 (targetdomain1.com)]",
        "alice: mailer local, host local, user alice  [local user]",
    ]


def launcher(tmp_path: Path) -> Path:
    """A ``mailgate`` program, as the console script is: what the links lead to."""
    program = tmp_path / "bin" / "mailgate"
    program.parent.mkdir()
    program.write_text(
        f"#!{sys.executable}\nimport sys\nfrom mailgate.cli import main\nsys.exit(main())\n"
    )
    program.chmod(0o755)
    return program


def test_installed_names_act_as_sendmail_and_mailq(
    make_gateway: GatewayFactory, world: World, hop1: SinkServer, tmp_path: Path
) -> None:
    gw = make_gateway(world)
    program = launcher(tmp_path)
    root = tmp_path / "root"
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "usr" / "lib" / "sendmail").symlink_to("../sbin/sendmail")  # as Debian has it
    done = subprocess.run(
        [str(program), "install-sendmail-link", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"{root}/usr/sbin/sendmail: linked to {program}",
        f"{root}/usr/lib/sendmail: leads to mailgate already",
        f"{root}/usr/bin/mailq: linked to {program}",
        f"{root}/usr/bin/newaliases: linked to {program}",
    ]
    for name in ("usr/sbin/sendmail", "usr/lib/sendmail"):
        sent = sendmail(gw, "-t", stdin=CRON_MAIL, program=[str(root / name)])
        assert (sent.returncode, sent.stderr) == (0, b"")
    messages = hop1.wait_for(2, timeout=15)
    assert [m.mail_from for m in messages] == [ROOT, ROOT]
    wait_until(lambda: not gw.queued(), "the queue to be empty")
    gw.stop()
    assert (
        sendmail(gw, "alice", stdin=b"hi\n", program=[str(root / "usr/sbin/sendmail")]).returncode
        == 0
    )
    mailq = sendmail(gw, program=[str(root / "usr/bin/mailq")])
    assert mailq.returncode == 0
    assert mailq.stdout.decode().splitlines()[-1] == "\t\tTotal requests: 1"


def test_install_sendmail_link_leaves_another_mtas_files_unless_forced(tmp_path: Path) -> None:
    program = launcher(tmp_path)
    root = tmp_path / "root"
    sbin = root / "usr" / "sbin"
    sbin.mkdir(parents=True)
    (sbin / "sendmail.postfix").write_text("postfix's sendmail\n")
    (sbin / "sendmail").symlink_to("sendmail.postfix")
    (root / "usr" / "bin").mkdir()
    (root / "usr" / "bin" / "mailq").write_text("another mailq\n")

    def install(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(program), "install-sendmail-link", "--root", str(root), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    refused = install()
    assert refused.returncode == 1
    assert refused.stdout.splitlines() == [
        f"{sbin}/sendmail: refusing: a link to sendmail.postfix (another MTA's; --force "
        "replaces it)",
        f"{root}/usr/lib/sendmail: to be linked to {program}",
        f"{root}/usr/bin/mailq: refusing: a file (another MTA's; --force replaces it)",
        f"{root}/usr/bin/newaliases: to be linked to {program}",
    ]
    assert os.readlink(sbin / "sendmail") == "sendmail.postfix"
    assert not (root / "usr" / "lib").exists()
    forced = install("--force")
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.splitlines()[0] == (
        f"{sbin}/sendmail: linked to {program} (what was there is {sbin}/sendmail.pre-mailgate)"
    )
    for name in ("usr/sbin/sendmail", "usr/lib/sendmail", "usr/bin/mailq", "usr/bin/newaliases"):
        assert os.readlink(root / name) == str(program)
    assert os.readlink(sbin / "sendmail.pre-mailgate") == "sendmail.postfix"
    assert (root / "usr/bin/mailq.pre-mailgate").read_text() == "another mailq\n"
    again = install()
    assert again.returncode == 0
    assert all(line.endswith("leads to mailgate already") for line in again.stdout.splitlines())
