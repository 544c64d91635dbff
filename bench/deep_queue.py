"""A deep deferred queue: the next hop is down and N messages wait. Measured for mailgate
(and, with ``--postfix``, for a private Postfix instance on the same count):

- RSS of the daemon with the queue taken on (peak over the whole run, and once settled);
- restart to greeting: a new daemon on the same spool, from its start to its 220;
- ``mailgate mailq`` (``postqueue -p``): seconds to the first line, and in all;
- drain: the hop comes back (an smtp-sink on its port) and the queue is run (SIGUSR1;
  ``postqueue -f``): messages per second at the sink, and whether every one arrived (lost);
- beside it, the live rate (mailgate, ``--live-messages``): a daemon with the same settings
  on a fresh spool in the same parent folder relays 1 KiB messages over 20 sessions from
  smtp-source to an smtp-sink, just before the drain and just after it; the report's
  ``drain_over_live`` is the drain's rate over each;
- how much of the queue the page cache held when the drain began (``fincore`` on a sample).

    PYTHONPATH=src python3 bench/deep_queue.py --messages 100000            # spool-filled
    PYTHONPATH=src python3 bench/deep_queue.py --messages 20000 --fill smtp --postfix

``--fill spool`` (the default) writes the queue with the spool's own code (``IncomingMessage``:
the envelope line, the content, the seal, the link into ``queue/``; then a status file as a
deferral writes it, its time the next attempt an hour away), without the fsync per message: a
million messages in minutes instead of the 17 minutes SMTP would take. ``--fill smtp`` sends
them through SMTP with ``smtp-source`` to the running daemon, whose first attempt of each is
refused (the hop is down), as in the issue; Postfix is always filled that way. One recipient
per message (``user@bench.example``, routed to the hop by mailertable / transport), 1 KiB.
Everything is under ``--workdir`` in a temp folder, removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import procstat
from mailgate.queue.spool import Envelope, QueueStatus, Recipient, Spool, status_due
from relays import (
    HOST,
    CounterReader,
    MailgateRelay,
    PostfixRelay,
    SmtpSink,
    free_port,
    prioritize,
    run_smtp_source,
    stop_process,
    tool,
    wait_banner,
)

ENTRY_START = re.compile(rb"\n[0-9A-Za-z]")
REFUSED = "Deferred: Connection refused by [127.0.0.1]"
SETTINGS = {
    # Deferred mail waits an hour: nothing is retried until the queue is run.
    "queue": {"retry_min": '"1h"', "run_interval": '"1h"', "max_deliveries": "200"},
    "delivery": {"connect_timeout": '"5s"'},
}


def fill_spool(spool: Spool, n: int) -> float:
    """``n`` deferred messages written with the spool's code; returns the seconds it took."""
    now = time.time()
    started = time.monotonic()
    body = b"Subject: deep queue\r\n\r\n" + b"x" * 1000 + b"\r\n"
    for i in range(n):
        rcpt = f"user{i % 1000}@bench.example"
        env = Envelope(
            qid=spool.new_qid(),
            sender="sender@example.org",
            recipients=[Recipient(rcpt, rcpt)],
            arrival=now - 600,
            client_ip="127.0.0.1",
        )
        incoming = spool.open_incoming(env)
        incoming.write(body)
        incoming.seal(lock=False)
        os.link(incoming.path, spool.queue / env.qid)
        incoming.committed(spool.queue / env.qid, keep_fd=False)
        status = QueueStatus(
            attempts=1, last_attempt=now - 60, next_attempt=now + 3600, last_message=REFUSED
        )
        status.of(rcpt).last_error = REFUSED
        path = spool.queue / f"{env.qid}.st"
        path.write_bytes(status.to_json())
        due = status_due(status)
        os.utime(path, (due, due))  # as ``Spool.save_status`` sets it
        os.unlink(spool.incoming / env.qid)
    os.sync()
    return time.monotonic() - started


class Sink:
    """smtp-sink on a given port: the next hop coming back."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.proc = subprocess.Popen(
            [tool("smtp-sink"), "-u", "root", "-c", "-m", "1000", f"{HOST}:{port}", "1024"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
        prioritize(self.proc.pid)
        self.counter = CounterReader(self.proc, "mesg=")
        wait_banner(port, 10, self.proc)

    def stop(self) -> None:
        stop_process(self.proc)


class Rss:
    """Peak and last RSS of a process tree, sampled every 0.1 s; ``root`` may change."""

    def __init__(self) -> None:
        self.root = -1
        self.peak = 0
        self.last = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            if self.root > 0:
                try:
                    rss = sum(procstat.rss_bytes(p) for p in procstat.tree(self.root))
                except Exception:  # the process may be gone between two reads
                    continue
                self.last = rss
                self.peak = max(self.peak, rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def wait_log(path: Path, text: str, timeout: float) -> float | None:
    """Seconds until ``text`` is in the file at ``path`` (None: not within ``timeout``)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if path.exists() and text in path.read_text(errors="replace"):
            return time.monotonic() - started
        time.sleep(0.05)
    return None


def wait_counted(state_file: Path, timeout: float) -> float | None:
    """Seconds until the daemon's state file has the queue's count (None: not within
    ``timeout``, or a version that does not count it)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(state_file.read_text())["activity"].get("counted"):
                return time.monotonic() - started
        time.sleep(0.1)
    return None


def listings(name: str, cold: bool) -> list[str]:
    """The listing runs: twice in a row (the second finds what the first read cached), after
    one from a cold page cache with ``--cold``."""
    return [f"{name}_cold"] * cold + [name, f"{name}_again"]


def drop_caches() -> None:
    """Everything out of the page cache (and the dentry and inode caches): a cold listing."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def profile(root: int, out: Path | None, seconds: float) -> subprocess.Popen[bytes] | None:
    """py-spy on the daemon's processes for the drain's first ``seconds`` (``--profile``:
    collapsed stacks, one file per run)."""
    if out is None:
        return None
    argv = ["py-spy", "record", "--nonblocking", "--subprocesses", "-r", "50", "-f", "raw"]
    argv += ["-d", str(int(min(seconds, 60))), "-p", str(root), "-o", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def timed_start(start: Any) -> float:
    began = time.monotonic()
    start()
    return time.monotonic() - began


def drain(sink: Sink, n: int, run: Any, timeout: float) -> dict[str, Any]:
    """Run the queue and time the sink's arrivals until ``n`` (or ``timeout``, or a stall of
    30 s)."""
    began = time.time()
    run()
    counter = sink.counter
    counter.wait(n, timeout, 30)
    return {"delivered": counter.count, **arrival_rates(counter.times, began)}


def arrival_rates(times: list[float], began: float) -> dict[str, Any]:
    """The sink's arrivals ``times`` (since ``began``): messages per second between their
    5th and 95th percentile (start-up and tail apart), the drain's figure and the live
    rate's alike, and over the whole span."""
    got = len(times)
    if not got:
        return {}
    lo, hi = int(got * 0.05), max(int(got * 0.95) - 1, 0)
    span = times[hi] - times[lo]
    return {
        "first_s": times[0] - began,
        "all_s": times[-1] - began,
        "rate": (hi - lo) / span if span > 0 else None,
        "rate_all": got / (times[-1] - began) if times[-1] > began else None,
    }


def live_rate(
    parent: Path, settings: dict[str, dict[str, str]], n: int, pythonpath: str | None
) -> dict[str, Any]:
    """The live rate beside the drain: a daemon with the drain's settings on a fresh spool in
    ``parent`` (the deep queue's disk), the hop up, ``n`` 1 KiB messages over 20 sessions
    from smtp-source (after a warm-up of 200, as relay.py's throughput runs), the rate at
    the sink between its 5th and 95th percentile as the drain's."""
    work = Path(tempfile.mkdtemp(prefix="mailgate-live-", dir=parent))
    sink = SmtpSink(work)
    relay = MailgateRelay(work / "relay", sink.port, settings, pythonpath=pythonpath)
    out: dict[str, Any] = {"n": n}
    try:
        relay.start()
        warm = 200
        run_smtp_source(relay.port, warm, 20, 1024, timeout=120)
        sink.counter.wait(warm, timeout=120, stall=30)
        time.sleep(0.5)
        src: dict[str, Any] = run_smtp_source(relay.port, n, 20, 1024, timeout=300)
        sent = int(src["sent"])
        sink.counter.wait(warm + sent, timeout=300, stall=30)
        arrivals = sink.counter.times[warm : warm + sent]
        out.update(arrival_rates(arrivals, float(src["start"])))
        out.update(sent=sent, received=len(arrivals), lost=sent - len(arrivals))
        out["accept_rate"] = sent / float(src["wall"])
    finally:
        relay.stop()
        sink.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"live: {out}", flush=True)
    return out


def page_cache(queue: Path, sample: int = 2000) -> dict[str, Any]:
    """How much of the queue is in the page cache: ``fincore`` over a random sample of its
    messages (queue file and status file each), and the machine's Cached figure."""
    with os.scandir(queue) as entries:
        names = [e.name for e in entries if "." not in e.name]
    picked = random.sample(names, min(sample, len(names)))
    files = [str(queue / q) for q in picked] + [str(queue / f"{q}.st") for q in picked]
    resident = pages = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for i in range(0, len(files), 500):
        out = subprocess.run(
            ["fincore", "-b", "-n", "-o", "PAGES,SIZE", *files[i : i + 500]],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        for line in out.splitlines():
            res, size = line.split()
            resident += int(res)
            pages += -(-int(size) // page)
    meminfo = Path("/proc/meminfo").read_text()
    cached = int(re.search(r"^Cached:\s+(\d+)", meminfo, re.M).group(1))  # type: ignore[union-attr]
    return {
        "sampled_messages": len(picked),
        "resident_fraction": resident / pages if pages else None,
        "machine_cached_gib": cached / 2**20,
    }


def mailgate_case(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    hop_port = free_port()
    settings = {**SETTINGS, "": {"workers": str(args.workers)}}
    pythonpath = str(args.src.resolve()) if args.src else None
    relay = MailgateRelay(args.dir or work / "mailgate", hop_port, settings, pythonpath=pythonpath)
    result: dict[str, Any] = {
        "messages": args.messages,
        "fill": args.fill,
        "workers": args.workers,
    }
    rss = Rss()
    maillog = relay.dir / "maillog"
    try:
        if args.dir and (relay.dir / "spool/queue").exists():
            # Topped up to --messages: a drain before took some.
            spool = Spool(relay.dir / "spool")
            missing = args.messages - spool.count()
            if missing > 0:
                result["topped_up"] = missing
                result["top_up_s"] = fill_spool(spool, missing)
            spool.close()
            print(f"using the queue in {relay.dir} (topped up by {max(missing, 0)})", flush=True)
        elif args.fill == "spool":
            spool = Spool(relay.dir / "spool")
            result["fill_s"] = fill_spool(spool, args.messages)
            spool.close()
            print(f"filled {args.messages:,} in {result['fill_s']:.1f} s", flush=True)
            if args.fill_only:
                return result
        else:
            relay.start()
            rss.root = relay.root
            sent = run_smtp_source(relay.port, args.messages, 20, 1024, timeout=1800)
            result["fill_s"] = sent["wall"]
            print(f"sent {sent['sent']:,} in {sent['wall']:.1f} s", flush=True)
            # Every message's first attempt was refused: its status file is written.
            while sum(1 for p in (relay.dir / "spool/queue").iterdir() if p.suffix == ".st") < (
                args.messages
            ):
                time.sleep(0.2)
            relay.stop()
        # Start on the deep queue: to its greeting, then to the end of its first pass (a
        # kept --dir's maillog holds the last run's "recovered" line: emptied first).
        if maillog.exists():
            maillog.write_text("")
        result["start_to_greeting_s"] = timed_start(relay.start)
        rss.root = relay.root
        # The first pass's end (this version), or the start's recovery (before it).
        result["first_pass_s"] = wait_log(maillog, "recovered ", 600 if not args.src else 5)
        time.sleep(1)
        result["rss_settled_mib"] = rss.last / 2**20
        # A restart: TERM, a new daemon on the same spool, to its greeting.
        began = time.monotonic()
        relay.stop()
        result["stop_s"] = time.monotonic() - began
        maillog.write_text("")
        result["restart_to_greeting_s"] = timed_start(relay.start)
        rss.root = relay.root
        wait_log(maillog, "recovered ", 600 if not args.src else 5)
        # The daemon's count of the queue in its state file (this version): what mailq's
        # header and `mailgate status` print for a deep queue.
        result["counted_s"] = wait_counted(relay.dir / "spool/mailgate.state.json", 60)
        cfg = ["-c", str(relay.config)]
        src = Path(__file__).resolve().parent.parent / "src"
        # Twice: the first may read from disk (this VM's page cache is a few GiB), the
        # second finds what the first read still cached where the queue fits.
        for key in () if args.skip_mailq else listings("mailq", args.cold):
            if key.endswith("_cold"):
                drop_caches()
            env = dict(os.environ, PYTHONPATH=str(args.src or src))
            argv = [sys.executable, "-m", "mailgate.cli", "mailq", *cfg]
            result[key] = run_listing(argv, env, args.listing_seconds)
            print(f"{key}: {result[key]}", flush=True)
        if args.live_messages:
            # The live rate just before the drain, the deep queue's daemon stopped meanwhile
            # (then started again, its first pass over): the same settings, a fresh spool
            # on the same disk.
            relay.stop()
            result["live_before"] = live_rate(
                relay.dir.parent, settings, args.live_messages, pythonpath
            )
            maillog.write_text("")
            relay.start()
            rss.root = relay.root
            wait_log(maillog, "recovered ", 600 if not args.src else 5)
            wait_counted(relay.dir / "spool/mailgate.state.json", 60)
        sink = Sink(hop_port, relay.dir)
        try:
            assert relay.proc is not None
            if args.cold_drain:
                drop_caches()
            result["page_cache"] = page_cache(relay.dir / "spool/queue")
            print(f"page cache before the drain: {result['page_cache']}", flush=True)
            spy = profile(relay.root, args.profile, args.drain_seconds)
            result["drain"] = drain(
                sink,
                args.messages,
                lambda: relay.proc.send_signal(signal.SIGUSR1),
                args.drain_seconds,
            )
            if spy is not None:
                spy.wait(60)
            relay.stop()
            # What the attempts under way at the stop delivered counts too.
            time.sleep(1)
            result["drain"]["delivered_by_stop"] = sink.counter.count
        finally:
            sink.stop()
        left = sum(1 for p in (relay.dir / "spool/queue").iterdir() if "." not in p.name)
        result["left_in_queue"] = left
        # Lost: neither delivered nor still queued (the sink counts every message it got).
        result["lost"] = args.messages - result["drain"]["delivered_by_stop"] - left
        result["rss_peak_mib"] = rss.peak / 2**20
        if args.live_messages:
            result["live_after"] = live_rate(
                relay.dir.parent, settings, args.live_messages, pythonpath
            )
            lives = [result[k].get("rate") for k in ("live_before", "live_after")]
            rate = result["drain"].get("rate")
            if rate and all(lives):
                result["drain_over_live"] = [rate / live for live in lives]
                result["drain_over_live_mean"] = rate / (sum(lives) / 2)
    finally:
        rss.stop()
        relay.stop()
    return result


def postfix_case(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    hop_port = free_port()
    relay = PostfixRelay(work / "postfix", hop_port)
    result: dict[str, Any] = {"messages": args.messages, "fill": "smtp"}
    rss = Rss()
    try:
        relay.start()
        rss.root = relay.root
        sent = run_smtp_source(relay.port, args.messages, 20, 1024, timeout=1800)
        result["fill_s"] = sent["wall"]
        print(f"postfix: sent {sent['sent']:,} in {sent['wall']:.1f} s", flush=True)
        deferred = relay.queue / "deferred"

        def count_deferred() -> int:
            return sum(len(files) for _root, _dirs, files in os.walk(deferred))

        while count_deferred() < args.messages:
            time.sleep(0.5)
        time.sleep(1)
        result["rss_settled_mib"] = rss.last / 2**20
        began = time.monotonic()
        relay.stop()
        result["stop_s"] = time.monotonic() - began
        result["restart_to_greeting_s"] = timed_start(relay.start)
        rss.root = relay.root
        env = dict(os.environ)
        for key in listings("postqueue_p", args.cold):
            if key.endswith("_cold"):
                drop_caches()
            q = run_listing(["postqueue", "-c", str(relay.etc), "-p"], env, args.listing_seconds)
            result[key] = q
            print(f"{key}: {q}", flush=True)
        sink = Sink(hop_port, relay.dir)
        try:
            result["drain"] = drain(
                sink,
                args.messages,
                lambda: subprocess.run(["postqueue", "-c", str(relay.etc), "-f"], check=False),
                1800,
            )
        finally:
            sink.stop()
        result["rss_peak_mib"] = rss.peak / 2**20
    finally:
        rss.stop()
        relay.stop()
    return result


def run_listing(argv: list[str], env: dict[str, str], cap: float | None) -> dict[str, Any]:
    """A listing's seconds to its first line and in all, its lines and its entries (lines that
    start with a queue id: ``mailq``'s and ``postqueue -p``'s layouts alike). ``cap``: stop it
    (its process group: mailq's workers too) after that many seconds, the total then None."""
    began = time.monotonic()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, start_new_session=True
    )
    assert proc.stdout is not None
    first = None
    lines = entries = 0
    capped = False
    at_line_start = True
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    while True:
        if cap is not None and time.monotonic() - began > cap:
            capped = True
            os.killpg(proc.pid, signal.SIGKILL)
            break
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        if first is None and b"\n" in chunk:
            first = time.monotonic() - began
        lines += chunk.count(b"\n")
        # An entry's line starts with its id (alphanumeric), the others with blanks, "-" or
        # the queue's path.
        entries += len(ENTRY_START.findall(chunk)) + (at_line_start and chunk[:1].isalnum())
        at_line_start = chunk.endswith(b"\n")
    proc.wait()
    seconds = time.monotonic() - began
    return {
        "total_s": None if capped else seconds,
        "ran_s": seconds,
        "first_line_s": first,
        "lines": lines,
        "entries": entries,
        "entries_per_s": entries / seconds if seconds else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--fill", choices=("spool", "smtp"), default="spool")
    p.add_argument("--postfix", action="store_true", help="Postfix too (filled through SMTP)")
    p.add_argument("--no-mailgate", action="store_true")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--keep", action="store_true")
    p.add_argument("--dir", type=Path, help="mailgate's folder: kept; a queue there is used")
    p.add_argument("--fill-only", action="store_true", help="fill --dir and stop")
    p.add_argument("--src", type=Path, help="run the daemon from this source tree")
    p.add_argument("--skip-mailq", action="store_true")
    p.add_argument("--cold", action="store_true", help="a listing from a cold cache first")
    p.add_argument("--cold-drain", action="store_true", help="the drain from a cold cache")
    p.add_argument("--listing-seconds", type=float, help="stop each listing after this long")
    p.add_argument("--profile", type=Path, help="py-spy the drain's first minute into this")
    p.add_argument("--workers", type=int, default=1, help="mailgate's workers (0: per CPU)")
    p.add_argument("--drain-seconds", type=float, default=1800, help="stop the drain then")
    p.add_argument(
        "--live-messages",
        type=int,
        default=20_000,
        help="the live rate before and after the drain with this many messages (0: not)",
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mailgate-deepq-", dir=args.workdir))
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    try:
        if not args.no_mailgate:
            report["mailgate"] = mailgate_case(args, work)
            print(json.dumps(report["mailgate"], indent=1), flush=True)
            shutil.rmtree(work / "mailgate", ignore_errors=True)
        if args.postfix:
            report["postfix"] = postfix_case(args, work)
            print(json.dumps(report["postfix"], indent=1), flush=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
