"""fsync before 250, seen from outside: the real daemon's system calls, traced with strace.

Whatever does the flush (Linux AIO's IOCB_CMD_FSYNC or plain fsync in a thread), the trace
must show, for every accepted message, the spool file's content written, then its flush
requested and completed, and only then the ``250 … <qid>`` written to the client.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from mailgate.queue import fsync as fsync_impl
from tests.support.dnsserver import DnsServer
from tests.support.world import SENDER_DNS, World

DNS_RECORDS = SENDER_DNS


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    probe = subprocess.run(
        ["strace", "-f", "-o", "/dev/null", "true"], capture_output=True, check=False
    )
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _strace_works(), reason="strace is missing or cannot trace")

SYSCALLS = "io_submit,io_getevents,fsync,fdatasync,write,writev,pwrite64,sendto,sendmsg"


def _flushed_before_reply(trace: list[str], qid: str) -> tuple[int, int, int]:
    """(content written, flush completed, 250 written) line numbers for ``qid``."""
    incoming = f"/incoming/{qid}>"
    reply = next(i for i, line in enumerate(trace) if f"250 2.0.0 {qid} Message accepted" in line)
    written = next(
        i
        for i, line in enumerate(trace)
        if re.search(r"\b(write|pwrite64)\(\d+<[^>]*" + re.escape(incoming), line)
    )
    completed = None
    for i, line in enumerate(trace):
        if re.search(r"\bfsync\(\d+<[^>]*" + re.escape(incoming) + r"(\)| <unfinished)", line):
            # A thread's fsync: the line may be split ("<unfinished …>" … "resumed> = 0").
            if line.rstrip().endswith("= 0"):
                completed = i
            else:
                tid = line.split()[0]
                completed = next(
                    j
                    for j in range(i + 1, len(trace))
                    if trace[j].startswith(tid)
                    and "fsync resumed" in trace[j]
                    and trace[j].rstrip().endswith("= 0")
                )
            break
        m = re.search(
            r"aio_data=(0x[0-9a-f]+), aio_lio_opcode=IOCB_CMD_FSYNC, "
            r"aio_fildes=\d+<[^>]*" + re.escape(incoming),
            line,
        )
        if m:
            data = m.group(1)
            completed = next(
                j
                for j in range(i + 1, len(trace))
                if "io_getevents" in trace[j]
                and re.search(r"data=" + data + r", obj=0x[0-9a-f]+, res=0\b", trace[j])
            )
            break
    assert completed is not None, f"no flush of {qid}'s spool file in the trace"
    return written, completed, reply


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.parametrize(
    ("flusher", "idle_session"),
    # "auto" with another session open: Linux AIO; alone: the fsync on the loop (InlineFsync).
    [("auto", True), ("auto", False), ("threads", False)],
)
def test_every_250_follows_the_completed_flush_of_its_file(
    tmp_path: Path, dns: DnsServer, flusher: str, idle_session: bool
) -> None:
    trace_file = tmp_path / "trace"
    world = World(
        # The next hop is down: the messages stay queued, only the reception is traced.
        tables={
            "mailertable": "example.net smtp:[127.0.0.1]:9\n",
            "access": "To:example.net RELAY\n",
        },
        # The default workers (one per CPU), but where the other session must be in the same
        # process as the messages: which fsync runs depends on that process's sessions.
        settings=("workers = 1\n" if idle_session else "")
        + f'[smtp]\ngreet_pause = "0s"\n[queue]\nfsync = "{flusher}"\n',
    )
    with world.gateway(tmp_path / "gw", dns) as gw:
        assert gw.proc is not None
        # With workers, strace -f follows only the children forked after it attached.
        pids = [gw.proc.pid, *_children(gw.proc.pid)]
        tracer = subprocess.Popen(
            [
                "strace",
                "-f",
                "-y",
                "-s",
                "200",
                "-e",
                f"trace={SYSCALLS}",
                "-o",
                str(trace_file),
                *(arg for pid in pids for arg in ("-p", str(pid))),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            assert tracer.stderr is not None
            # strace says "Process N attached" (once per thread) when it has hold of them.
            attached: set[int] = set()
            while not attached >= set(pids):
                line = tracer.stderr.readline()
                assert b"attached" in line, line
                attached.add(int(line.split()[2]))
            idle = gw.smtp() if idle_session else contextlib.nullcontext()
            with idle:
                for n in range(3):
                    with gw.smtp() as s:
                        s.sendmail(
                            "a@example.org",
                            [f"user{n}@example.net"],
                            f"Subject: durable {n}\r\n\r\nbody {n}\r\n",
                        )
        finally:
            tracer.send_signal(signal.SIGINT)  # detach; the daemon runs on
            tracer.wait(20)
        qids = re.findall(r"\b(\w{14}): from=<a@example.org>", gw.log())
        assert len(qids) == 3
        for qid in qids:
            assert (gw.spool / "queue" / qid).exists()  # kept: the hop is down
    trace = trace_file.read_text(errors="replace").splitlines()
    for qid in qids:
        written, completed, reply = _flushed_before_reply(trace, qid)
        assert written < completed < reply, (qid, written, completed, reply)
    if flusher == "auto" and fsync_impl.linux_aio() is not None:
        # Through the kernel while another session is open; alone, on the loop (at least the
        # first: a slow one, as under strace, sends the next ones to the kernel).
        aio = any("IOCB_CMD_FSYNC" in line for line in trace)
        inline = any(re.search(r"\bfsync\(\d+<[^>]*/incoming/", line) for line in trace)
        assert (aio, inline) == (True, False) if idle_session else inline
