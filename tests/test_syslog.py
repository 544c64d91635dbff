"""The maillog through a real syslog daemon (Debian's rsyslogd on a private socket), its JSON
copy, and a log file under rotation.

Through syslog: facility ``mail`` with each line's severity, the tag ``mailgate[pid]``, the
queue id on every line of a message's life (from=, each to=, DSN, removed), and the lines a
``mail.debug /path`` selector in syslog.conf collects. A syslog daemon that stops reading
(SIGSTOP) or is stopped never holds up the mail: lines are dropped and counted, and the
count is logged once syslog takes lines again. A log file renamed by logrotate (with SIGHUP,
with the shipped contrib/mailgate.logrotate and no signal at all, or truncated in place)
loses no line and splits none, with two worker processes writing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.dnsserver import DnsServer
from tests.support.gateway import GatewayProcess, free_port
from tests.support.sink import SinkServer
from tests.support.syslogd import Rsyslog
from tests.support.wait import wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("rsyslogd") is None or shutil.which("logrotate") is None,
    reason="needs Debian's rsyslog and logrotate (.ci/run installs them)",
)

HOP = "127.0.0.5"
CLIENT = "127.0.0.2"  # not the local host: may relay only to targetdomain1.com
LOGROTATE = Path(__file__).resolve().parent.parent / "contrib" / "mailgate.logrotate"
SYSLOG_LINE = re.compile(r"(\w+)\.(\w+) mailgate\[(\d+)\]: (.*)")
FILE_LINE = re.compile(r"[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d gateway mailgate\[\d+\]: \S.*")
# Our level names as rsyslog's %syslogseverity-text% spells them.
SEVERITY_TEXT = {"debug": "debug", "info": "info", "notice": "notice", "warning": "warning"}
SEVERITY_TEXT["error"] = "err"


def gateway(
    directory: Path, dns: DnsServer, port: int, *, log: str | None = None, workers: int = 1
) -> GatewayProcess:
    return GatewayProcess(
        directory,
        dns=dns.address,
        tables={
            "mailertable": (
                f"targetdomain1.com smtp:[{HOP}]:{port}\nexample.org smtp:[{HOP}]:{port}\n"
            ),
            "access": "To:targetdomain1.com RELAY\n",
        },
        settings=(
            f'workers = {workers}\n[smtp]\ngreet_pause = "0s"\ncheck_sender_domain = false\n'
            '[queue]\nretry_min = "1s"\nrun_interval = "2s"\n'
        ),
        log=log,
    )


def syslog_log(syslog: Rsyslog, json_file: Path) -> str:
    return (
        f'target = "syslog"\nsyslog_socket = "{syslog.socket}"\n'
        f'json = true\njson_file = "{json_file}"\n'
    )


def send(gw: GatewayProcess, subject: str, recipients: list[str] | None = None) -> None:
    with gw.smtp(CLIENT) as s:
        s.sendmail(
            "alice@example.org",
            recipients or ["bob@targetdomain1.com"],
            f"Subject: {subject}\r\n\r\nbody\r\n".encode(),
        )


def mailgate_lines(syslog: Rsyslog) -> list[tuple[str, str, int, str]]:
    """(facility, severity, pid, text) of each line mailgate sent."""
    found = []
    for line in syslog.lines():
        m = SYSLOG_LINE.fullmatch(line)
        if m:
            found.append((m.group(1), m.group(2), int(m.group(3)), m.group(4)))
    return found


def json_records(path: Path) -> list[dict[str, object]]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        return []


def life(texts: list[str], qid: str) -> list[str]:
    """The lines of queue id ``qid``, without the id: every line naming it starts with it."""
    mine = [t for t in texts if re.search(rf"\b{qid}\b", t)]
    assert all(t.startswith(f"{qid}: ") for t in mine), mine
    return [t[len(qid) + 2 :] for t in mine]


def kinds(lines: list[str], *starts: str) -> list[str]:
    """Each line as the first of ``starts`` it begins with (or whole when none)."""
    return [next((s for s in starts if line.startswith(s)), line) for line in lines]


def selected(syslog: Rsyslog, gw: GatewayProcess) -> list[str]:
    """The texts of mailgate's lines in the file of syslog.conf's ``mail.debug`` line."""
    assert gw.proc is not None
    try:
        lines = syslog.maillog.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    tag = f" mailgate[{gw.proc.pid}]: "
    return [line.split(tag, 1)[1] for line in lines if tag in line]


def caught_up(syslog: Rsyslog, json_file: Path) -> bool:
    """syslog has every line so far (the JSON copy, a file, has them all)."""
    return len(mailgate_lines(syslog)) == len(json_records(json_file))


def probe(gw: GatewayProcess, seen: Callable[[], bool]) -> Callable[[], bool]:
    """A predicate that has mailgate write a line (USR2: statistics) and then looks."""

    def sent_and_seen() -> bool:
        gw.signal(signal.SIGUSR2)
        return seen()

    return sent_and_seen


def test_lines_reach_syslog_with_facility_severity_and_queue_id(tmp_path: Path) -> None:
    port = free_port(HOP)
    syslog = Rsyslog(tmp_path / "syslog")
    json_file = tmp_path / "maillog.json"
    with (
        DnsServer() as dns,
        SinkServer(HOP, port) as sink,
        syslog,
        gateway(tmp_path / "gw", dns, port, log=syslog_log(syslog, json_file)) as gw,
    ):
        assert gw.proc is not None
        sink.rcpt_reply["bad@targetdomain1.com"] = "550 5.1.1 No such user"
        with gw.smtp(CLIENT) as s:
            s.ehlo()
            s.mail("alice@example.org")
            assert s.rcpt("bob@targetdomain1.com")[0] == 250
            assert s.rcpt("bad@targetdomain1.com")[0] == 250
            assert s.rcpt("nobody@elsewhere.example")[0] == 550
            assert s.data(b"Subject: life\r\n\r\nbody\r\n")[0] == 250
        sink.wait_for(2, timeout=20)  # bob's copy and the bounce to alice
        wait_until(
            lambda: sum(t.endswith(": removed") for *_, t in mailgate_lines(syslog)) == 2,
            "both queue ids removed, in syslog",
            20,
        )
        # An error and a warning: a reload refused, then one that needs a restart.
        good = gw.config.read_text()
        gw.config.write_text(good + "[smtp\n")
        gw.signal(signal.SIGHUP)
        wait_until(
            lambda: any("reload refused" in t for *_, t in mailgate_lines(syslog)),
            "the refused reload in syslog",
        )
        gw.config.write_text(good.replace(f":{gw.port}", f":{free_port()}"))
        gw.signal(signal.SIGHUP)
        wait_until(
            lambda: any("configuration reloaded" in t for *_, t in mailgate_lines(syslog)),
            "the reload in syslog",
        )
        wait_until(
            lambda: (
                caught_up(syslog, json_file)
                and len(selected(syslog, gw)) == len(mailgate_lines(syslog))
            ),
            "both syslog files to have every line",
        )
        lines = mailgate_lines(syslog)
        records = json_records(json_file)
        maillog = selected(syslog, gw)

    assert {(facility, pid) for facility, _, pid, _ in lines} == {("mail", gw.proc.pid)}
    texts = [t for *_, t in lines]
    severity = {t: sev for _, sev, _, t in lines}
    [received] = [t for t in texts if "from=<alice@example.org>" in t]
    qid = received.split(":")[0]
    [dsn] = [t for t in texts if ": DSN: " in t]
    bounce_qid = dsn.split(": ")[1]
    dsn_start = f"{bounce_qid}: DSN: "
    # The RCPT refusal carries the transaction's queue id (made at MAIL, as Sendmail's);
    # the next hop's refusal at RCPT comes before the transaction's line, as Sendmail's.
    starts = ("ruleset=check_rcpt", "from=", "to=<bob@", "to=<bad@", dsn_start, "removed")
    assert kinds(life(texts, qid), *starts) == [
        "ruleset=check_rcpt",
        "from=",
        "to=<bad@",
        "to=<bob@",
        dsn_start,
        "removed",
    ]
    bounce_life = [t for t in texts if t.startswith(f"{bounce_qid}: ")]
    assert kinds([t[len(bounce_qid) + 2 :] for t in bounce_life], "to=<alice@", "removed") == [
        "to=<alice@",
        "removed",
    ]
    [reject] = [t for t in texts if "reject=" in t]
    assert reject.startswith(f"{qid}: ruleset=check_rcpt, arg1=<nobody@elsewhere.example>, relay=")
    assert severity[reject] == "notice"
    assert {severity[t] for t in texts if t.startswith(f"{qid}: ") and t != reject} == {"info"}
    [refused] = [t for t in texts if t.startswith("reload refused")]
    assert severity[refused] == "err"
    restart_only = "listen, spool_dir, workers and [metrics] listen changes"
    [restart] = [t for t in texts if t.startswith(restart_only)]
    assert severity[restart] == "warning"

    assert maillog == texts  # what syslog.conf's "mail.debug /path" line selected

    # The JSON copy: one object per line, the same text and level, the facts by name.
    assert [(SEVERITY_TEXT[str(r["level"])], r["text"]) for r in records] == [
        (sev, t) for _, sev, _, t in lines
    ]
    [from_record] = [r for r in records if r["event"] == "received"]
    assert from_record["qid"] == qid and from_record["pid"] == gw.proc.pid
    fields = from_record["fields"]
    assert isinstance(fields, dict)
    assert (fields["sender"], fields["nrcpts"], fields["proto"]) == (
        "alice@example.org",
        2,
        "ESMTP",
    )
    [bad_record] = [r for r in records if "to=<bad@" in str(r["text"])]
    assert (bad_record["event"], bad_record["qid"]) == ("delivery", qid)
    assert isinstance(bad_record["fields"], dict) and bad_record["fields"]["dsn"] == "5.1.1"
    assert [r.get("qid") for r in records if r["event"] == "removed"] == [qid, bounce_qid]


def lost_in_syslog(syslog: Rsyslog, json_file: Path) -> tuple[list[str], list[str], int]:
    """(texts in syslog, texts in the JSON copy, the count the lost-lines line gave), each
    up to that line. The JSON copy may have had the notice before: when the line that found
    room again took the only place, the notice found none and was said again with the next
    line (``maillog._Writer.write``); the JSON copy's notices are left out."""
    texts = [t for *_, t in mailgate_lines(syslog)]
    [notice] = [t for t in texts if t.startswith("log: ")]
    count = int(notice.split()[1])
    assert notice == f"log: {count} lines lost: {syslog.socket} could not take them"
    json_texts = [str(r["text"]) for r in json_records(json_file)]
    last = len(json_texts) - 1 - json_texts[::-1].index(notice)
    assert all(t == notice for t in json_texts[:last] if t.startswith("log: "))
    kept = [t for t in json_texts[:last] if not t.startswith("log: ")]
    return texts[: texts.index(notice)], kept, count


def one_gap(before: list[str], after: list[str], count: int) -> bool:
    """``after`` is ``before`` less one run of ``count`` lines."""
    return any(before[:i] + before[i + count :] == after for i in range(len(before)))


def test_a_syslog_that_does_not_read_never_stalls_the_mail(tmp_path: Path) -> None:
    """rsyslogd stopped with SIGSTOP: its socket fills (net.unix.max_dgram_qlen datagrams)
    and a blocking send, as glibc's syslog() or logging's SysLogHandler make, would freeze the
    gateway. Here the mail goes on, the lines that did not fit are counted, and the count is
    logged when syslog reads again: syslog has every line of the JSON copy but those."""
    queue_limit = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
    port = free_port(HOP)
    syslog = Rsyslog(tmp_path / "syslog")
    json_file = tmp_path / "maillog.json"
    # 100 long addresses: a message's to= line is cut into a dozen ([more]), 9 addresses
    # to a line, so each message writes more than 10 lines (with from= and removed)
    recipients = [f"{'r' * 60}{i:02d}@targetdomain1.com" for i in range(100)]
    messages = queue_limit // 10 + 1  # more lines than the socket holds
    with (
        DnsServer() as dns,
        SinkServer(HOP, port) as sink,
        syslog,
        gateway(tmp_path / "gw", dns, port, log=syslog_log(syslog, json_file)) as gw,
    ):
        wait_until(lambda: caught_up(syslog, json_file), "syslog to have every line so far")
        syslog.freeze()
        for i in range(messages):
            send(gw, f"m{i}", recipients)  # each gets its 250: smtplib's timeout is 10 s
        sink.wait_for(messages, timeout=30)
        wait_until(
            lambda: sum(r["event"] == "removed" for r in json_records(json_file)) == messages,
            "every message delivered and removed",
            30,
        )
        syslog.thaw()
        wait_until(  # the first line syslog takes again brings the lost-lines line
            probe(gw, lambda: any(t.startswith("log: ") for *_, t in mailgate_lines(syslog))),
            "the lost-lines line in syslog",
            step=0.2,
        )
        texts, json_texts, count = lost_in_syslog(syslog, json_file)
    assert count >= messages * 10 - queue_limit
    assert one_gap(json_texts, texts, count)
    assert json_texts[-1].startswith("statistics: ")
    assert f"log_lines_lost={count}," in json_texts[-1]


def test_a_stopped_syslog_loses_lines_and_counts_them_and_is_found_again(tmp_path: Path) -> None:
    port = free_port(HOP)
    syslog = Rsyslog(tmp_path / "syslog")
    json_file = tmp_path / "maillog.json"
    with (
        DnsServer() as dns,
        SinkServer(HOP, port) as sink,
        syslog,
        gateway(tmp_path / "gw", dns, port, log=syslog_log(syslog, json_file)) as gw,
    ):
        wait_until(lambda: caught_up(syslog, json_file), "syslog to have every line so far")
        syslog.stop()  # it removes its socket
        send(gw, "while syslog is down")
        sink.wait_for(1, timeout=20)
        wait_until(
            lambda: any(r["event"] == "removed" for r in json_records(json_file)),
            "the message delivered and removed",
        )
        syslog.start()
        wait_until(  # mailgate connects again within a second of a line
            probe(
                gw, lambda: any(t.startswith("statistics: ") for *_, t in mailgate_lines(syslog))
            ),
            "mailgate to find syslog again",
            step=0.2,
        )
        send(gw, "after syslog is back")
        sink.wait_for(2, timeout=20)
        wait_until(
            lambda: sum(t.endswith(": removed") for *_, t in mailgate_lines(syslog)) == 1,
            "the second message's life in syslog",
        )
        texts, json_texts, count = lost_in_syslog(syslog, json_file)
        all_texts = [t for *_, t in mailgate_lines(syslog)]
    [down] = [t for t in json_texts if "from=<alice@example.org>" in t]
    assert down not in texts  # its whole life was lost, and counted
    assert one_gap(json_texts, texts, count)
    [back] = [t for t in all_texts if "from=<alice@example.org>" in t]
    qid = back.split(":")[0]
    assert kinds(life(all_texts, qid), "from=", "to=", "removed") == ["from=", "to=", "removed"]


def file_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and "\0" not in text
    lines = text.splitlines()
    assert [line for line in lines if not FILE_LINE.fullmatch(line)] == []
    return lines


def lives(lines: list[str]) -> dict[str, list[str]]:
    """Queue id → the kinds of its message's lines, in order (each line has the queue id)."""
    texts = [line.split("]: ", 1)[1] for line in lines]
    qids = [t.split(":")[0] for t in texts if "from=<alice@example.org>" in t]
    return {qid: kinds(life(texts, qid), "from=", "to=", "removed") for qid in qids}


def wait_removed(path: Path, count: int) -> None:
    wait_until(
        lambda: path.exists() and path.read_text().count(": removed\n") >= count,
        f"{count} messages removed in {path.name}",
        30,
    )


def test_a_renamed_log_file_is_reopened_on_hup_and_no_line_is_lost(tmp_path: Path) -> None:
    """logrotate without copytruncate, two workers: the old file keeps the old lines, the new
    one gets every line after the HUP, each whole."""
    port = free_port(HOP)
    with (
        DnsServer() as dns,
        SinkServer(HOP, port) as sink,
        gateway(tmp_path / "gw", dns, port, workers=2) as gw,
    ):
        wait_until(lambda: "starting daemon" in gw.log(), "both workers")
        for i in range(6):
            send(gw, f"before{i}")
        wait_removed(gw.log_path, 6)
        rotated = gw.log_path.with_name("maillog.1")
        os.rename(gw.log_path, rotated)
        gw.signal(signal.SIGHUP)
        wait_until(
            # The master writes it once both workers have reloaded (and reopened the file).
            lambda: gw.log_path.exists() and "configuration reloaded" in gw.log(),
            "both workers to reload into the new file",
        )
        for i in range(6):
            send(gw, f"after{i}")
        sink.wait_for(12, timeout=30)
        wait_removed(gw.log_path, 6)
    old, new = file_lines(rotated), file_lines(gw.log_path)
    for lines in (old, new):
        assert list(lives(lines).values()) == [["from=", "to=", "removed"]] * 6
    assert not set(lives(old)) & set(lives(new))
    assert "configuration reloaded" not in rotated.read_text()


def test_the_shipped_logrotate_file_needs_no_signal(tmp_path: Path) -> None:
    """contrib/mailgate.logrotate, run by the real logrotate: the file is renamed and made
    again, and mailgate, told nothing, writes into the new one within a second."""
    port = free_port(HOP)
    with (
        DnsServer() as dns,
        SinkServer(HOP, port) as sink,
        gateway(tmp_path / "gw", dns, port) as gw,
    ):
        conf = tmp_path / "logrotate.conf"
        conf.write_text(
            LOGROTATE.read_text().replace("/var/log/mailgate/maillog", str(gw.log_path))
        )
        for i in range(3):
            send(gw, f"before{i}")
        wait_removed(gw.log_path, 3)
        subprocess.run(
            ["logrotate", "-f", "-s", str(tmp_path / "logrotate.state"), str(conf)],
            check=True,
            timeout=30,
        )
        rotated = gw.log_path.with_name("maillog.1")  # delaycompress
        assert rotated.exists() and not gw.log_path.exists()  # nocreate: mailgate makes it
        wait_until(
            probe(gw, lambda: "statistics: " in gw.log()), "a line in the new file", step=0.2
        )
        for i in range(3):
            send(gw, f"after{i}")
        sink.wait_for(6, timeout=30)
        wait_removed(gw.log_path, 3)
    old, new = file_lines(rotated), file_lines(gw.log_path)
    assert list(lives(old).values()) == [["from=", "to=", "removed"]] * 3
    assert list(lives(new).values()) == [["from=", "to=", "removed"]] * 3


def test_a_log_truncated_in_place_goes_on_at_its_start(tmp_path: Path) -> None:
    """logrotate's copytruncate: with O_APPEND the next line is at the start of the emptied
    file, not behind a hole of NUL bytes as large as the old file."""
    with DnsServer() as dns, gateway(tmp_path / "gw", dns, free_port(HOP)) as gw:
        gw.wait_log("starting daemon")
        os.truncate(gw.log_path, 0)
        gw.signal(signal.SIGUSR2)
        gw.wait_log("statistics: ")
        [line] = file_lines(gw.log_path)
        assert "statistics: " in line
