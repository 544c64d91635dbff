"""maillog: each event's exact line, level names, the logging bridge, and no call site that
formats a line itself."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate import maillog
from mailgate.tls import Session as TlsSession

SRC = Path(__file__).resolve().parent.parent / "src" / "mailgate"


@pytest.fixture
def log(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "maillog"
    maillog.setup("gw.example", path, "debug")
    yield path
    maillog.setup("localhost", None, "info")


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
    maillog.worker_exited(1, 42, 9)
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
        "worker 1 (pid 42) exited with status 9; restarting it",
    ]


def test_queue_tool_lines_are_postsupers(log: Path) -> None:
    maillog.placed_on_hold("q1", "")
    maillog.placed_on_hold("q2", "milter: spam score 12")
    maillog.released_from_hold("q2")
    maillog.removed("q3")
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
    maillog.setup("gw.example", log, "notice")
    maillog.stopping()  # info
    maillog.rcpt_flood("[192.0.2.1]")  # notice
    maillog.restart_needed()  # warning
    maillog.setup("gw.example", log, "WARNING")
    maillog.rcpt_flood("[192.0.2.1]")
    maillog.session_failed("[192.0.2.1]", RuntimeError("x"))  # error
    assert lines(log) == [
        "[192.0.2.1]: Possible SMTP RCPT flood, throttling.",
        "listen and spool_dir changes take effect only after a restart",
        "session with [192.0.2.1] failed: RuntimeError('x')",
    ]


def test_library_warnings_are_bridged_by_level(log: Path) -> None:
    maillog.setup("gw.example", log, "error")
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
