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

``--milter`` puts one real filter in the daemon's path, as ``relay.py --milter`` does (the
filter runs natively, outside callgrind: the count is mailgate's own instructions).

Under callgrind the daemon runs about 50 times slower, so the timeouts of a run are long; the
batching of fsyncs and writes differs from a real run, so the figure is a relative one: compare
checkouts measured by the same command, not against ``relay.py``'s CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import relay
import relays

_TOTAL = re.compile(rb"^(?:summary|totals): (\d+)", re.MULTILINE)


def run_once(workdir: Path, pythonpath: str, n: int, sessions: int, size: int) -> int:
    """Instructions the daemon executed while starting, relaying ``n`` messages, stopping."""
    workdir.mkdir(parents=True)
    sink = relays.SmtpSink(workdir)
    out = workdir / "callgrind.out"
    relay = relays.MailgateRelay(
        workdir / "mailgate",
        sink.port,
        {"": {"workers": "1"}},
        pythonpath=pythonpath,
        wrapper=("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "-q"),
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
            relays.stop_process(relay.proc, grace=600)
            relay.log.close()
        sink.stop()
    found = _TOTAL.search(out.read_bytes())
    if found is None:
        raise RuntimeError(f"no instruction total in {out}")
    return int(found.group(1))


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
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="mailgate-instr-", dir="/var/tmp"))
    relays.BIN_DIR = root
    per_msg: dict[str, list[float]] = {p: [] for p in args.pythonpath}
    filter_ = relay.start_milter(args.milter, root) if args.milter else None
    try:
        for r in range(args.rounds):
            for i, path in enumerate(args.pythonpath):
                base = root / f"r{r}-c{i}"
                small = run_once(base / "small", path, args.small, args.sessions, args.size)
                large = run_once(base / "large", path, args.large, args.sessions, args.size)
                cost = (large - small) / (args.large - args.small)
                per_msg[path].append(cost)
                print(f"round {r + 1} {path}: {cost / 1e6:.3f} M instructions per message")
    finally:
        if filter_ is not None:
            filter_.stop()
        if args.keep:
            print(f"callgrind outputs kept under {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    for path, costs in per_msg.items():
        print(f"{path}: median {statistics.median(costs) / 1e6:.3f} M instructions per message")
    if args.json:
        args.json.write_text(json.dumps(per_msg, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
