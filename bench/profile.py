"""A profile of one mailgate worker relaying N messages, with or without a filter in its path.

    python3 bench/profile.py --pythonpath src --milter opendkim --tool perf -o /tmp/mg.perf
    perf report -i /tmp/mg.perf --sort dso --stdio -n
    python3 bench/profile.py --pythonpath src --milter opendkim --tool py-spy -o /tmp/mg.raw

One worker (``workers = 1``), 1 KiB messages (``--size``) from smtp-source over 20 sessions, as
``instructions.py`` and ``relay.py``'s first case; 200 messages warm it up first, then the
profiler attaches to the worker for the N that are measured. ``perf record -F 999`` gives
samples by shared object (CPython, the kernel, uvloop): about one sample per millisecond of
CPU; ``py-spy record --format raw`` gives Python stacks (collapsed, one line per stack).
Run it under the bench lock: it is a load run.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import relay
import relays


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pythonpath", required=True, help="the checkout's src/")
    ap.add_argument("--milter", choices=("opendkim", "rspamd"), help="one real filter")
    ap.add_argument("--tool", choices=("perf", "py-spy"), default="perf")
    ap.add_argument("-n", type=int, default=2000, help="messages measured")
    ap.add_argument("--size", type=int, default=1024, help="message size in bytes")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args(argv)
    if shutil.which(args.tool) is None:
        print(f"{args.tool} is not installed", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="mailgate-profile-", dir="/var/tmp"))
    relays.BIN_DIR = root
    filter_ = relay.start_milter(args.milter, root) if args.milter else None
    sink = relays.SmtpSink(root)
    daemon = relays.MailgateRelay(
        root / "mailgate", sink.port, {"": {"workers": "1"}}, pythonpath=args.pythonpath
    )
    try:
        daemon.start(timeout=120)
        assert daemon.proc is not None
        relays.run_smtp_source(daemon.port, 200, 20, args.size, timeout=300)
        sink.counter.wait(200, timeout=120, stall=30)
        pid = str(daemon.proc.pid)
        if args.tool == "perf":
            command = ["perf", "record", "-F", "999", "-p", pid, "-o", args.output]
        else:
            command = ["py-spy", "record", "-r", "200", "--nonblocking", "--pid", pid]
            command += ["-o", args.output, "--format", "raw"]
        profiler = subprocess.Popen(command)
        time.sleep(1)  # attached
        started = time.monotonic()
        result = relays.run_smtp_source(daemon.port, args.n, 20, args.size, timeout=600)
        profiler.send_signal(signal.SIGINT)
        profiler.wait(60)
        seconds = time.monotonic() - started
        print(f"{result['sent']} messages in {seconds:.1f} s; profile in {args.output}")
    finally:
        if daemon.proc is not None:
            relays.stop_process(daemon.proc, grace=60)
            daemon.log.close()
        sink.stop()
        if filter_ is not None:
            filter_.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
