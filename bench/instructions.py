"""Instructions per relayed message, counted by valgrind's callgrind.

CPU seconds per message move by ±10–30 % from run to run on this shared VM (other processes,
frequency, cache), so a 5 % change in the code's cost cannot be seen in them. The number of
instructions the daemon executes per message barely moves: callgrind counts them whatever
else runs on the machine. Each checkout relays ``--small`` and then ``--large`` messages in two
separate daemon runs (one worker process, the same config and load as ``relay.py``'s
1 KiB / 20 sessions case); the difference of the two totals over the difference of the counts
is the cost of one message, start-up and shutdown cancelled out.

    python3 bench/instructions.py --pythonpath /tmp/old/src --pythonpath src
    python3 bench/instructions.py --pythonpath src --milter opendkim

``--syscalls`` counts system calls instead (``strace -f -c`` over the master and its worker),
per message and per call name, the same way: the small run's counts subtracted from the large
one's.

``--milter`` puts one real filter in the daemon's path, as ``relay.py --milter`` does (the
filter runs natively, outside callgrind: the count is mailgate's own instructions).

Under callgrind the daemon runs about 50 times slower, so the timeouts of a run are long; the
batching of fsyncs and writes differs from a real run, so the figure is a relative one: compare
checkouts measured by the same command, not against ``relay.py``'s CPU seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import relay
import relays

_TOTAL = re.compile(rb"^(?:summary|totals): (\d+)", re.MULTILINE)


def run_once(
    workdir: Path, pythonpath: str, n: int, sessions: int, size: int, *, syscalls: bool = False
) -> dict[str, int]:
    """Instructions (``{"total": n}``), or system calls by name and ``total``, that the daemon
    made while starting, relaying ``n`` messages, stopping."""
    workdir.mkdir(parents=True)
    sink = relays.SmtpSink(workdir)
    out = workdir / ("strace.out" if syscalls else "callgrind.out")
    wrapper = (
        ("strace", "-f", "-c", "-U", "name,calls", "-o", str(out))
        if syscalls
        else ("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "-q")
    )
    relay = relays.MailgateRelay(
        workdir / "mailgate",
        sink.port,
        {"": {"workers": "1"}},
        pythonpath=pythonpath,
        wrapper=wrapper,
    )
    try:
        relay.start(timeout=600)
        result = relays.run_smtp_source(relay.port, n, sessions, size, timeout=1800, stall=300)
        if result["sent"] != n:
            raise RuntimeError(f"smtp-source sent {result['sent']} of {n}: {result}")
        deadline = time.monotonic() + 600
        while sink.count < n and time.monotonic() < deadline:
            time.sleep(0.5)
        if sink.count < n:
            raise RuntimeError(f"the sink got {sink.count} of {n}")
    finally:
        if relay.proc is not None:
            if syscalls:  # strace passes no SIGTERM on: the daemon under it gets it
                _signal_children(relay.proc.pid)
            relays.stop_process(relay.proc, grace=600)
            relay.log.close()
        sink.stop()
    if syscalls:
        return _strace_counts(out.read_text())
    found = _TOTAL.search(out.read_bytes())
    if found is None:
        raise RuntimeError(f"no instruction total in {out}")
    return {"total": int(found.group(1))}


def _signal_children(pid: int) -> None:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(child), signal.SIGTERM)


def _strace_counts(summary: str) -> dict[str, int]:
    """``strace -c -U name,calls``'s table as {name: calls}, its total line included."""
    counts = {}
    for line in summary.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].isdigit():
            counts[fields[0]] = int(fields[1])
    if "total" not in counts:
        raise RuntimeError(f"no total in the strace summary:\n{summary}")
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pythonpath", action="append", required=True, help="a checkout's src/")
    ap.add_argument("--small", type=int, default=200)
    ap.add_argument("--large", type=int, default=1200)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=1, help="rounds, checkouts interleaved")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the callgrind outputs")
    ap.add_argument("--syscalls", action="store_true", help="count system calls (strace)")
    ap.add_argument("--milter", choices=("opendkim", "rspamd"), help="one real filter in the path")
    ap.add_argument(
        "--milter-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the filter's [[milter]] entry, VALUE in TOML (repeatable)",
    )
    args = ap.parse_args(argv)
    for item in args.milter_set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--milter-set {item}: want KEY=VALUE")
        relays.EXTRA_SETTINGS.setdefault("milter", {})[key.strip()] = value.strip()
    tool = "strace" if args.syscalls else "valgrind"
    if shutil.which(tool) is None:
        print(f"{tool} is not installed (apt-get install {tool})", file=sys.stderr)
        return 2
    unit = "system calls" if args.syscalls else "M instructions"
    scale = 1.0 if args.syscalls else 1e6
    root = Path(tempfile.mkdtemp(prefix="mailgate-instr-", dir="/var/tmp"))
    relays.BIN_DIR = root
    per_msg: dict[str, list[float]] = {p: [] for p in args.pythonpath}
    filter_ = relay.start_milter(args.milter, root) if args.milter else None
    try:
        for r in range(args.rounds):
            for i, path in enumerate(args.pythonpath):
                base = root / f"r{r}-c{i}"
                small = run_once(
                    base / "small",
                    path,
                    args.small,
                    args.sessions,
                    args.size,
                    syscalls=args.syscalls,
                )
                large = run_once(
                    base / "large",
                    path,
                    args.large,
                    args.sessions,
                    args.size,
                    syscalls=args.syscalls,
                )
                span = args.large - args.small
                cost = (large["total"] - small["total"]) / span
                per_msg[path].append(cost)
                print(f"round {r + 1} {path}: {cost / scale:.3f} {unit} per message")
                if args.syscalls:
                    by_name = {
                        name: (calls - small.get(name, 0)) / span for name, calls in large.items()
                    }
                    shown = sorted(by_name.items(), key=lambda kv: -kv[1])
                    print("  " + ", ".join(f"{k} {v:.2f}" for k, v in shown if abs(v) >= 0.05))
    finally:
        if filter_ is not None:
            filter_.stop()
        if args.keep:
            print(f"callgrind outputs kept under {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    for path, costs in per_msg.items():
        print(f"{path}: median {statistics.median(costs) / scale:.3f} {unit} per message")
    if args.json:
        args.json.write_text(json.dumps(per_msg, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
