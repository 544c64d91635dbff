"""maillog: each event's exact line, level names, the logging bridge, and no call site that
formats a line itself."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from mailgate import maillog
from mailgate.config import LogSettings
from mailgate.logsink import SyslogSocket
from mailgate.tls import Session as TlsSession

SRC = Path(__file__).resolve().parent.parent / "src" / "mailgate"


@pytest.fixture
def log(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "maillog"
    maillog.setup("gw.example", LogSettings(file=path, level="debug"))
    yield path
    maillog.setup("localhost")


def lines(path: Path) -> list[str]:
    return [line.split(": ", 1)[1] for line in path.read_text().splitlines()]


def test_event_lines_keep_their_text(log: Path) -> None:
    tls = TlsSession("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256, "NOT")
    maillog.early_talker("[192.0.2.1]", "192.0.2.1", 2)
    maillog.improper_pipelining("[192.0.2.1]", 12)
    maillog.starttls_server("[192.0.2.1]", tls)
    maillog.starttls_client("mx.example. [192.0.2.2]", tls)
    maillog.input_timeout("[192.0.2.1]", "DATA")
    maillog.rcpt_flood("[192.0.2.1]")
    maillog.bare_newline("[192.0.2.1]", "bare\nLF")
    maillog.message_refused("q1", "[192.0.2.1]", "552 5.3.4 too big")
    maillog.statistics({"connections": 3, "stress": 0}, 1, 2, 0)
    maillog.worker_exited(1, 42, 9)  # waitpid's status: killed by SIGKILL
    maillog.worker_exited(0, 43, 1 << 8)  # exit(1)
    maillog.submitted("q2", "root@gw.example", 302, 1, "<m@gw.example>", "root")
    assert lines(log) == [
        "rejecting commands from [192.0.2.1] [192.0.2.1] due to pre-greeting traffic after 2 "
        "seconds",
        "improper command pipelining after DATA from [192.0.2.1]: 12 bytes sent before the 354",
        "STARTTLS=server, relay=[192.0.2.1], version=TLSv1.3, verify=NOT, "
        "cipher=TLS_AES_256_GCM_SHA384, bits=256/256",
        "STARTTLS=client, relay=mx.example. [192.0.2.2], version=TLSv1.3, verify=NOT, "
        "cipher=TLS_AES_256_GCM_SHA384, bits=256/256",
        "timeout waiting for input from [192.0.2.1] during DATA",
        "[192.0.2.1]: Possible SMTP RCPT flood, throttling.",
        "[192.0.2.1]: bare LF in a command line (possible SMTP smuggling); closing connection",
        "q1: message from [192.0.2.1] refused: 552 5.3.4 too big",
        "statistics: connections=3, stress=0, sessions_now=1, queued=2, delivering=0",
        "worker 1 (pid 42) killed by signal 9; restarting it",
        "worker 0 (pid 43) exited with status 1; restarting it",
        "q2: from=<root@gw.example>, size=302, class=0, nrcpts=1, msgid=<m@gw.example>, "
        "relay=root@localhost",
    ]


def test_queue_tool_lines_are_postsupers(log: Path) -> None:
    maillog.placed_on_hold("q1", "")
    maillog.placed_on_hold("q2", "milter: spam score 12")
    maillog.released_from_hold("q2")
    maillog.deleted("q3")
    maillog.requeued("q4")
    maillog.due_taken(2, "/var/spool/mailgate")
    maillog.held_skipped("q1")
    assert lines(log) == [
        "q1: placed on hold",
        "q2: placed on hold, reason=milter: spam score 12",
        "q2: released from hold",
        "q3: removed",
        "q4: requeued",
        "2 message(s) marked due in /var/spool/mailgate/due: attempting now",
        "q1: on hold, not attempted",
    ]


def test_level_names_filter(log: Path) -> None:
    maillog.setup("gw.example", LogSettings(file=log, level="notice"))
    maillog.stopping(10)  # info
    maillog.rcpt_flood("[192.0.2.1]")  # notice
    maillog.restart_needed()  # warning
    maillog.setup("gw.example", LogSettings(file=log, level="warning"))
    maillog.rcpt_flood("[192.0.2.1]")
    maillog.session_failed("[192.0.2.1]", RuntimeError("x"))  # error
    assert lines(log) == [
        "[192.0.2.1]: Possible SMTP RCPT flood, throttling.",
        "listen, spool_dir, workers and [metrics] listen changes take effect only after a restart",
        "session with [192.0.2.1] failed: RuntimeError('x')",
    ]


def test_library_warnings_are_bridged_by_level(log: Path) -> None:
    maillog.setup("gw.example", LogSettings(file=log, level="error"))
    logging.getLogger("asyncio").warning("slow callback")
    logging.getLogger("asyncio").error("unclosed transport")
    assert lines(log) == ["asyncio: unclosed transport"]


def test_next_hop_name() -> None:
    assert maillog.next_hop_name("mx.example", "192.0.2.2") == "mx.example. [192.0.2.2]"
    assert maillog.next_hop_name("192.0.2.2", "192.0.2.2") == "[192.0.2.2]"


def test_no_call_site_formats_a_line() -> None:
    pattern = re.compile(r"maillog\.(info|warning|error|notice|debug|_log|_writer)\b")
    found = [
        f"{p.relative_to(SRC)}:{n}"
        for p in SRC.rglob("*.py")
        if p.name != "maillog.py"
        for n, text in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(text)
    ]
    assert found == []


def test_every_event_has_a_severity_and_every_severity_an_event() -> None:
    events = {name for name, value in vars(maillog).items() if hasattr(value, "__wrapped__")}
    assert events == set(maillog.LEVELS)
    assert set(maillog.LEVELS.values()) <= set(maillog.SYSLOG_SEVERITY)


@pytest.fixture
def syslogd(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    """A datagram socket standing in for syslogd's /dev/log, and its path."""
    path = tmp_path / "log"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5)
    yield server, path
    server.close()
    maillog.setup("localhost")


def test_a_syslog_line_is_what_glibc_sends(syslogd: tuple[socket.socket, Path]) -> None:
    server, path = syslogd
    maillog.setup("gw.example", LogSettings(target="syslog", syslog_socket=path))
    maillog.received("6AOJL6hk004507", "a@b.example", 78, 1, None, "ESMTP", "[192.0.2.3]")
    maillog.reject(None, "check_rcpt", "<u@x>", "[192.0.2.3]", "550 5.7.1 Relaying denied")
    maillog.reload_refused("bad")
    stamp = r"[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d"
    tag = rf"mailgate\[{os.getpid()}\]"
    assert re.fullmatch(
        rf"<22>{stamp} {tag}: 6AOJL6hk004507: from=<a@b.example>, size=78, class=0, "
        r"nrcpts=1, proto=ESMTP, daemon=MTA, relay=\[192.0.2.3\]",
        server.recv(4096).decode(),
    )
    assert re.fullmatch(rf"<21>{stamp} {tag}: ruleset=check_rcpt, .*", server.recv(4096).decode())
    assert re.fullmatch(rf"<19>{stamp} {tag}: reload refused, .*", server.recv(4096).decode())
    maillog.setup("gw.example", LogSettings(target="syslog", syslog_socket=path, facility="local3"))
    maillog.stopping(10)
    assert server.recv(4096).startswith(b"<158>")  # local3 (19) * 8 + info (6)
    # the program name a migrated admin's fail2ban and logwatch look for
    maillog.setup(
        "gw.example", LogSettings(target="syslog", syslog_socket=path, syslog_name="sm-mta")
    )
    maillog.stopping(10)
    assert re.fullmatch(
        rf"<22>{stamp} sm-mta\[{os.getpid()}\]: stopping: .*", server.recv(4096).decode()
    )


def test_the_program_name_is_the_same_in_a_file(tmp_path: Path) -> None:
    log = tmp_path / "maillog"
    maillog.setup("gw.example", LogSettings(file=log, syslog_name="sendmail"))
    try:
        maillog.stopping(10)
    finally:
        maillog.setup("localhost")
    assert re.fullmatch(
        rf"[A-Z][a-z]{{2}} [ \d]\d \d\d:\d\d:\d\d gw sendmail\[{os.getpid()}\]: stopping: .*\n",
        log.read_text(),
    )


def test_a_full_syslog_socket_drops_lines_and_never_blocks(
    syslogd: tuple[socket.socket, Path],
) -> None:
    server, path = syslogd
    sink = SyslogSocket(path)
    sent = sum(sink.write(f"<22>line {i}".encode()) for i in range(200))  # nobody reads
    received = []
    server.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            received.append(server.recv(4096))
    assert len(received) == sent and sink.dropped == 200 - sent
    assert received == [f"<22>line {i}".encode() for i in range(sent)]


def test_a_lost_lines_notice_that_finds_no_room_is_said_again_whole(
    syslogd: tuple[socket.socket, Path],
) -> None:
    """The reader takes one datagram from a full socket: the next line takes that place and
    its notice finds none. The count is not lost with it (CI once saw syslog report "1 line
    lost", the lost notice, after 90 had been): the notice comes with the next line, whole,
    and the statistics count only the mail's lines."""
    server, path = syslogd
    maillog.setup("gw.example", LogSettings(target="syslog", syslog_socket=path))
    before = maillog.lost_lines()
    lines = 0
    while maillog.lost_lines() - before < 5:  # nobody reads: the socket fills, 5 lost
        maillog.stopping(lines)
        lines += 1
    server.recv(4096)  # one place
    maillog.stopping(1001)  # takes it; its notice cannot go
    assert maillog.lost_lines() - before == 5
    server.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            server.recv(4096)
    maillog.stopping(1002)
    server.setblocking(True)
    got = [server.recv(4096).decode().split(": ", 1)[1] for _ in range(2)]
    assert got == [
        "stopping: no new connections; sessions finish their transaction and deliveries in"
        " progress go on for up to 1002 s",
        f"log: 5 lines lost: {path} could not take them",
    ]
    assert maillog.lost_lines() - before == 5


def test_a_restarted_syslogd_is_found_again(tmp_path: Path) -> None:
    path = tmp_path / "log"
    first = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    first.bind(str(path))
    sink = SyslogSocket(path)
    assert sink.write(b"one") and first.recv(100) == b"one"
    first.close()
    path.unlink()  # syslogd stopped: its socket is gone
    assert not sink.write(b"lost") and sink.sock is None
    sink.check()  # what a line in a new second does: still nobody there
    assert not sink.write(b"lost too") and sink.dropped == 2
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as second:
        second.bind(str(path))
        sink.check()
        assert sink.write(b"two") and second.recv(100) == b"two"
        second.close()
        path.unlink()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as third:
            third.bind(str(path))  # restarted at once: the send is refused, reconnects, goes
            third.settimeout(5)
            assert sink.write(b"three") and third.recv(100) == b"three"
    sink.close()


def test_to_lines_are_sendmails() -> None:
    """Checked against sendmail -bD's own (the same deliveries): a literal next hop is
    ``[ip] [ip]``, pri= before relay=, reply= only when the delivery failed."""
    build = maillog.delivery.__wrapped__  # type: ignore[attr-defined]
    sent = build(
        "Q1",
        ["bob@example.org"],
        delay=0,
        xdelay=0,
        mailer="smtp",
        relay="[127.0.0.3]",
        dsn="2.0.0",
        stat="Sent (Ok: queued)",
        reply="250 2.0.0 Ok: queued",
        pri=maillog.priority(38, 1, 0),
    )
    assert sent == (
        "Q1: to=<bob@example.org>, delay=00:00:00, xdelay=00:00:00, mailer=smtp, pri=30038, "
        "relay=[127.0.0.3] [127.0.0.3], dsn=2.0.0, stat=Sent (Ok: queued)"
    )
    failed = build(
        "Q1",
        ["nobody@example.org"],
        delay=0,
        xdelay=0,
        mailer="esmtp",
        relay="mx.example.org. [192.0.2.5]",
        dsn="5.1.1",
        stat="User unknown",
        reply="550 5.1.1 nobody... User unknown",
        pri=maillog.priority(38, 2, 1),
    )
    assert failed == (
        "Q1: to=<nobody@example.org>, delay=00:00:00, xdelay=00:00:00, mailer=esmtp, "
        "pri=150038, relay=mx.example.org. [192.0.2.5], dsn=5.1.1, "
        "reply=550 5.1.1 nobody... User unknown, stat=User unknown"
    )


def test_one_line_lists_the_recipients_of_one_outcome(log: Path) -> None:
    """Sendmail's line for a transaction's three recipients (sendmail -bD relaying to a
    sink: the to= list, then the facts once)."""
    maillog.deliveries(
        "Q1",
        ["u002@example.org", "u001@example.org", "u000@example.org"],
        delay=0,
        xdelay=0,
        mailer="esmtp",
        relay="[127.0.0.1]",
        dsn="2.0.0",
        stat="Sent (Ok: queued)",
        reply="250 2.0.0 Ok: queued",
        pri=maillog.priority(18, 3, 0),
    )
    assert lines(log) == [
        "Q1: to=<u002@example.org>,<u001@example.org>,<u000@example.org>, delay=00:00:00, "
        "xdelay=00:00:00, mailer=esmtp, pri=90018, relay=[127.0.0.1] [127.0.0.1], dsn=2.0.0, "
        "stat=Sent (Ok: queued)"
    ]


HUNDRED = [f"u{i:03d}@example.org" for i in range(99, -1, -1)]


def _log_hundred() -> None:
    """The to= lines of HUNDRED, delivered in one transaction."""
    maillog.deliveries(
        "Q1",
        HUNDRED,
        delay=0,
        xdelay=0,
        mailer="esmtp",
        relay="[127.0.0.1]",
        dsn="2.0.0",
        stat="Sent (Ok: queued)",
        pri=maillog.priority(18, 100, 0),
    )


def test_a_long_list_is_cut_as_sendmails(log: Path) -> None:
    """100 recipients of one transaction, as sendmail -bD logged them: 42, 42 and 16 a
    line (what is left of 1024 less 100 less the rest of the line, cut after a comma), each
    line but the last saying ``[more]``."""
    _log_hundred()
    tail = (
        ", delay=00:00:00, xdelay=00:00:00, mailer=esmtp, pri=3000018, "
        "relay=[127.0.0.1] [127.0.0.1], dsn=2.0.0, stat=Sent (Ok: queued)"
    )

    def listed(addresses: list[str]) -> str:
        return ",".join(f"<{a}>" for a in addresses)

    assert lines(log) == [
        f"Q1: to={listed(HUNDRED[:42])}, [more]{tail}",
        f"Q1: to={listed(HUNDRED[42:84])}, [more]{tail}",
        f"Q1: to={listed(HUNDRED[84:])}{tail}",
    ]


def test_each_cut_line_has_its_recipients_in_the_json_copy(tmp_path: Path) -> None:
    text_file, json_file = tmp_path / "maillog", tmp_path / "maillog.json"
    maillog.setup("gw.example", LogSettings(file=text_file, json=True, json_file=json_file))
    try:
        _log_hundred()
    finally:
        maillog.setup("localhost")
    records = [json.loads(line) for line in json_file.read_text().splitlines()]
    assert [r["text"] for r in records] == lines(text_file)
    assert [r["fields"]["more"] for r in records] == [True, True, False]
    assert [len(r["fields"]["to"]) for r in records] == [42, 42, 16]
    assert [a for r in records for a in r["fields"]["to"]] == HUNDRED


@pytest.mark.parametrize(
    ("lengths", "room", "cut"),
    [
        ([5, 5, 5], 18, [2, 1]),  # <a@b>,… is 7+1+7+1+7 = 23 ≥ 18: cut at the comma at 15
        ([5, 5, 5], 23, [2, 1]),  # 23 ≥ 23: still cut, at the comma at 15
        ([5, 5, 5], 24, [3]),  # shorter than the room: one line
        ([5, 5, 5], 15, [2, 1]),  # a comma exactly at the room counts
        ([5, 5, 5], 14, [1, 1, 1]),
        ([30, 5], 10, [1, 1]),  # an address longer than the room: alone, whole
        ([30], 10, [1]),
        ([5, 5], 0, [1, 1]),
    ],
)
def test_to_lists_cut_after_the_last_comma_within_the_room(
    lengths: list[int], room: int, cut: list[int]
) -> None:
    to = [f"{'a' * (n - 2)}@b" for n in lengths]
    made = maillog.to_lists(to, room)
    assert [len(chunk) for chunk, _more in made] == cut
    assert [more for _chunk, more in made] == [True] * (len(cut) - 1) + [False]
    assert [a for chunk, _more in made for a in chunk] == to


def test_the_json_copy_has_the_text_and_the_facts(tmp_path: Path) -> None:
    text_file, json_file = tmp_path / "maillog", tmp_path / "maillog.json"
    maillog.setup("gw.example", LogSettings(file=text_file, json=True, json_file=json_file))
    try:
        maillog.deliveries(
            "Q1",
            ["bob@example.com", "carol@example.com"],
            delay=61.5,
            xdelay=1,
            mailer="esmtp",
            relay="[192.0.2.9]",
            dsn="2.0.0",
            stat="Sent (ok)",
            reply="250 ok",
        )
        maillog.session_failed("[192.0.2.1]", RuntimeError("x"))
        maillog.starttls_server("[192.0.2.1]", TlsSession("TLSv1.3", "AES", 256, "NOT"))
    finally:
        maillog.setup("localhost")
    texts = lines(text_file)
    records = [json.loads(line) for line in json_file.read_text().splitlines()]
    assert [r["text"] for r in records] == texts
    delivery, failed, tls = records
    assert (delivery["level"], delivery["event"], delivery["qid"]) == ("info", "delivery", "Q1")
    assert delivery["fields"] == {
        "to": ["bob@example.com", "carol@example.com"],
        "delay": 61.5,
        "xdelay": 1,
        "mailer": "esmtp",
        "relay": "[192.0.2.9]",
        "dsn": "2.0.0",
        "stat": "Sent (ok)",
        "reply": "250 ok",
        "ctladdr": None,
        "pri": None,
        "more": False,
    }
    assert datetime.fromisoformat(delivery["time"]).tzinfo is not None
    assert (failed["level"], "qid" in failed) == ("error", False)
    assert failed["fields"] == {"relay": "[192.0.2.1]", "exc": "RuntimeError('x')"}
    assert tls["fields"]["session"] == {
        "version": "TLSv1.3",
        "cipher": "AES",
        "bits": 256,
        "verify": "NOT",
    }
