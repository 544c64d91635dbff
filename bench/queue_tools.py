"""The queue tools on a large deferred queue: mailq (time to its first line and in all), mailq
--json, qshape, requeue --all, hold and delete of 1,000 messages read from stdin; the peak
RSS of each command.

    PYTHONPATH=src python3 bench/queue_tools.py                       # 100,000 messages
    PYTHONPATH=src python3 bench/queue_tools.py --messages 300000 --before /work/main/src

The queue is built in the real on-disk format through the Spool API (``IncomingMessage``: the
envelope line, the content, the seal; the link into ``queue/``; a status file as a deferral
writes it: one attempt, each recipient's last error, the next attempt an hour away) but without
the daemon's fsync per message and per status file: one ``sync`` at the end instead, so that
100,000 messages take seconds, not the disk's fsync rate. Messages: 1 to 3 recipients in 200
domains (a few large, many small), arrival spread over the last 3 days, 1 to 4 KiB each.

Each command runs as ``python -m mailgate.cli … -c <config>`` (no daemon: nothing else
touches the queue), with the page cache warm (the queue was just written; the figures are
CPU and system-call cost, not disk reads). ``--before SRC`` also times mailq from another
source tree (the code before, which read and sorted the whole queue before printing).
``requeue --all`` runs last: it leaves a marker per message in ``due/`` (no daemon here to
take them). Everything is in a temp folder under ``--workdir``, removed at the end unless
``--keep``.

``--node`` also starts the daemon on that queue (its metrics listener on loopback, with a
token) and runs ``mailq --node``, ``mailq --json --node`` and ``qshape --node`` against it:
the same listings read over ``/queue`` and ``/qshape``; the daemon's own peak RSS before and
after them is printed too (what streaming the queue costs the node).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import procstat
from mailgate.queue.spool import Envelope, QueueStatus, Recipient, Spool

MAILGATE_SRC = Path(__file__).resolve().parent.parent / "src"
REFUSED = "Deferred: 451 4.4.1 Connection refused by [192.0.2.7]"


def build_queue(spool: Spool, n: int, seed: int = 1) -> float:
    """``n`` deferred messages; returns the seconds it took."""
    rng = random.Random(seed)
    domains = [f"dest{i}.example" for i in range(200)]
    weights = [1.0 / (i + 1) for i in range(200)]  # a few large domains, many small ones
    now = time.time()
    started = time.monotonic()
    for _ in range(n):
        rcpts = [
            f"user{rng.randrange(1000)}@{d}"
            for d in dict.fromkeys(rng.choices(domains, weights, k=rng.randint(1, 3)))
        ]
        env = Envelope(
            qid=spool.new_qid(),
            sender=f"sender{rng.randrange(500)}@example.org",
            recipients=[Recipient(r, r) for r in rcpts],
            arrival=now - rng.uniform(0, 3 * 86400),
            client_ip="192.0.2.10",
        )
        incoming = spool.open_incoming(env)
        incoming.write(b"Subject: bench\r\n\r\n" + b"x" * rng.randint(1024, 4096) + b"\r\n")
        incoming.seal(lock=False)
        os.link(incoming.path, spool.queue / env.qid)
        incoming.committed(spool.queue / env.qid, keep_fd=False)
        status = QueueStatus(
            attempts=1,
            last_attempt=now - 60,
            next_attempt=now + 3600,
            last_message=REFUSED,
        )
        for r in rcpts:
            status.of(r).last_error = REFUSED
        (spool.queue / f"{env.qid}.st").write_bytes(status.to_json())
        os.unlink(spool.incoming / env.qid)
    os.sync()
    return time.monotonic() - started


@dataclass
class Run:
    command: str
    seconds: float
    first_line: float | None  # seconds until the first line of output, if any
    output_lines: int
    peak_rss_kib: int
    status: int


def run(label: str, argv: list[str], src: Path, stdin: bytes | None = None) -> Run:
    """``argv`` under ``src``'s mailgate; stdout read as it comes, never kept."""
    env = dict(os.environ, PYTHONPATH=str(src))
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailgate.cli", *argv],
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    if stdin is not None:
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
    assert proc.stdout is not None
    # Peak RSS: VmHWM, sampled until the process ends (getrusage's ru_maxrss would count
    # this bench's own memory too: Linux keeps the high-water mark across the exec).
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], procstat.status_kib(proc.pid, "VmHWM"))

    sampler = threading.Thread(target=sample)
    sampler.start()
    first: float | None = None
    lines = 0
    try:
        while chunk := os.read(proc.stdout.fileno(), 1 << 16):
            if first is None and b"\n" in chunk:
                first = time.monotonic() - started
            lines += chunk.count(b"\n")
        # Its last peak: read before reaping it (a zombie has no VmHWM line).
        while proc.poll() is None and os.path.exists(f"/proc/{proc.pid}/status"):
            peak[0] = max(peak[0], procstat.status_kib(proc.pid, "VmHWM"))
            if done.wait(0.005):
                break
        proc.wait()
    finally:
        done.set()
        sampler.join()
    seconds = time.monotonic() - started
    return Run(label, seconds, first, lines, peak[0], proc.returncode)


def over_the_node(work: Path, config: Path, cfg: list[str]) -> tuple[list[Run], tuple[int, int]]:
    """The daemon on the queue, its metrics listener with a token; the --node runs, and the
    daemon's VmHWM before and after them."""
    port = free_port()
    token = work / "cluster.token"
    token.write_text("bench-token-0123456789abcdef\n")
    token.chmod(0o600)
    text = config.read_text().replace("127.0.0.1:2525", f"127.0.0.1:{free_port()}")
    metrics = f'[metrics]\nlisten = "127.0.0.1:{port}"\ntoken_file = "{token}"\n'
    config.write_text(text.replace("[log]", metrics + "[log]"))
    env = dict(os.environ, PYTHONPATH=str(MAILGATE_SRC))
    daemon = subprocess.Popen(
        [sys.executable, "-m", "mailgate.cli", "serve", *cfg],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        started = time.monotonic()
        while not healthy(port):  # answers once the queue is recovered (it starts after that)
            if daemon.poll() is not None or time.monotonic() - started > 300:
                raise RuntimeError("the daemon did not come up")
            time.sleep(0.2)
        print(f"daemon up on the queue in {time.monotonic() - started:.1f} s", flush=True)
        before = procstat.status_kib(daemon.pid, "VmHWM")
        node = ["--node", f"127.0.0.1:{port}"]
        runs = [
            run("mailq --node", ["mailq", *node, *cfg], MAILGATE_SRC),
            run("mailq --json --node", ["mailq", "--json", *node, *cfg], MAILGATE_SRC),
            run("qshape --node", ["qshape", *node, *cfg], MAILGATE_SRC),
        ]
        after = procstat.status_kib(daemon.pid, "VmHWM")
    finally:
        daemon.terminate()
        daemon.wait(60)
    return runs, (before, after)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--before", type=Path, help="another source tree to time mailq from")
    p.add_argument("--keep", action="store_true", help="keep the temp folder")
    p.add_argument("--json", type=Path, help="write the figures here too")
    p.add_argument("--node", action="store_true", help="also through a daemon's /queue")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="mailgate-queuetools-", dir=args.workdir))
    try:
        config = work / "mailgate.toml"
        config.write_text(
            'hostname = "gw.example.com"\nlisten = ["127.0.0.1:2525"]\n'
            f'spool_dir = "{work / "spool"}"\n[log]\nfile = "{work / "maillog"}"\n'
        )
        spool = Spool(work / "spool")
        build = build_queue(spool, args.messages)
        spool.close()
        print(f"built {args.messages:,} deferred messages in {build:.1f} s ({work})", flush=True)
        qids = sorted(p.name for p in (work / "spool" / "queue").iterdir() if "." not in p.name)
        some = "".join(q + "\n" for q in qids[:: max(1, len(qids) // 1000)][:1000]).encode()
        cfg = ["-c", str(config)]
        runs = []
        if args.before:
            runs.append(run("mailq (before)", ["mailq", *cfg], args.before.resolve()))
        for label, cmd, stdin in (
            ("mailq", ["mailq", *cfg], None),
            ("mailq --json", ["mailq", "--json", *cfg], None),
            ("qshape", ["qshape", *cfg], None),
            ("qshape --by sender", ["qshape", "--by", "sender", *cfg], None),
        ):
            runs.append(run(label, cmd, MAILGATE_SRC, stdin))
        daemon_rss: tuple[int, int] | None = None
        if args.node:
            node_runs, daemon_rss = over_the_node(work, config, cfg)
            runs += node_runs
        for label, cmd, stdin in (
            ("hold 1,000 (stdin)", ["hold", "--reason", "bench", "-", *cfg], some),
            ("delete 1,000 (stdin)", ["delete", "-", *cfg], some),
            ("requeue --all", ["requeue", "--all", *cfg], None),
        ):
            runs.append(run(label, cmd, MAILGATE_SRC, stdin))
        print("\n| command | total (s) | first line (s) | lines out | peak RSS (MiB) | exit |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in runs:
            first = f"{r.first_line:.2f}" if r.first_line is not None else "—"
            print(
                f"| `{r.command}` | {r.seconds:.2f} | {first} | {r.output_lines:,} | "
                f"{r.peak_rss_kib / 1024:.1f} | {r.status} |"
            )
        if daemon_rss is not None:
            before, after = daemon_rss
            print(
                f"\nthe daemon's peak RSS: {before / 1024:.1f} MiB before the --node runs, "
                f"{after / 1024:.1f} MiB after"
            )
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "messages": args.messages,
                        "build_s": build,
                        "runs": [r.__dict__ for r in runs],
                        "daemon_peak_rss_kib": daemon_rss,
                    },
                    indent=2,
                )
            )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
