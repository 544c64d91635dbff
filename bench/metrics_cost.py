"""The cost of metrics on the hot path: ``bench/relay.py`` runs of mailgate alone, interleaved,
in three variants, and the medians of CPU seconds per 1000 messages.

- ``before``: a checkout without the metrics (``--before DIR``, a ``src`` folder: e.g.
  ``git archive $(git merge-base main HEAD) src | tar -x -C DIR``);
- ``off``: this tree, ``[metrics] listen`` unset (the counting is done all the same: the
  statistics line reads the same row);
- ``on``: this tree with ``[metrics] listen`` set and this script scraping ``/metrics``
  every second during the run (its own CPU is not the relay's).

    python3 bench/metrics_cost.py --before /tmp/before/src --rounds 5 --json /tmp/mc.json

Each round runs every variant once (in order), each run one ``relay.py --cases CASE --runs 1
--relays mailgate`` on a fresh relay and spool. Run as root, on a quiet machine.

CPU time per message swings by tens of per cent on a shared 2-core machine, more than the
3 % asked for. ``--instructions N1,N2`` counts instead what does not depend on the neighbours:
the instructions the daemon executes (valgrind's callgrind, one process) for N1 and for N2
messages from ``smtp-source`` (one session, 1 KiB, relayed to ``smtp-sink``); the difference
divided by N2 - N1 is the cost of one message, without the start-up. No scraping there
(under valgrind a scrape a second would be a scrape every few messages): the cost of a scrape
is measured apart.

    python3 bench/metrics_cost.py --before /tmp/before/src --instructions 100,400
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PORT = 19925  # where the "on" variant's metrics listen (loopback)


def scrape_every_second(stop: threading.Event, counts: list[int]) -> None:
    while not stop.wait(1.0):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=2) as r:
                r.read()
            counts[0] += 1
        except OSError:
            pass  # the relay is not up yet, or between runs


def one_run(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    src = args.before if variant == "before" else str(HERE.parent / "src")
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [
            sys.executable,
            str(HERE / "relay.py"),
            "--cases",
            args.case,
            "--runs",
            "1",
            "--relays",
            "mailgate",
            "--pythonpath",
            src,
            "--json",
            out.name,
        ]
        if variant == "on":
            command += ["--mailgate-set", f'metrics.listen="127.0.0.1:{PORT}"']
        stop, scrapes = threading.Event(), [0]
        scraper = threading.Thread(target=scrape_every_second, args=(stop, scrapes))
        if variant == "on":
            scraper.start()
        try:
            subprocess.run(command, check=True, timeout=900, stdout=subprocess.DEVNULL)
        finally:
            stop.set()
            if scraper.is_alive():
                scraper.join()
        report = json.loads(Path(out.name).read_text())
    run = report["throughput"][0]["relays"]["mailgate"]["runs"][0]
    return {
        "variant": variant,
        "cpu_per_1000": run["cpu_per_1000"],
        "e2e_rate": run.get("e2e_rate"),
        "lost": run["lost"],
        "machine_busy_pct": run.get("machine_busy_pct"),
        "others_cores": run.get("others_cores"),
        "loadavg_at_start": report["machine"]["loadavg_at_start"],
        "scrapes": scrapes[0],
    }


def instructions(variant: str, n: int, args: argparse.Namespace) -> int:
    """Instructions callgrind counts in ``mailgate serve`` (one process) for ``n`` messages."""
    sys.path.insert(0, str(HERE))
    import relays

    work = Path(tempfile.mkdtemp(prefix="mailgate-instr-", dir="/var/tmp"))
    sink = relays.SmtpSink(work)
    settings = {"metrics": {"listen": f'"127.0.0.1:{PORT}"'}} if variant == "on" else {}
    relay = relays.MailgateRelay(
        work / "mailgate",
        sink.port,
        settings,
        args.before if variant == "before" else str(HERE.parent / "src"),
    )
    out = work / "callgrind.out"
    log = open(work / "stderr.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            "-q",
            sys.executable,
            "-m",
            "mailgate.cli",
            "serve",
            "-c",
            str(relay.config),
        ],
        stdout=log,
        stderr=log,
        cwd=relay.dir,
        env=relay.env(),
    )
    try:
        relays.wait_banner(relay.port, 120, proc)
        src = relays.run_smtp_source(relay.port, n, 1, 1024, timeout=600, stall=60)
        sink.counter.wait(n, timeout=600, stall=60)
    finally:
        relays.stop_process(proc, 120)
        sink.stop()
        log.close()
    if int(str(src["sent"])) != n or sink.count < n:
        raise RuntimeError(f"{variant}/{n}: sent {src['sent']}, sink got {sink.count}")
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            total = int(line.split()[1])
            break
    else:
        raise RuntimeError(f"no summary line in {out}")
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return total


def run_instructions(args: argparse.Namespace) -> int:
    low, high = (int(x) for x in args.instructions.split(","))
    results: dict[str, dict[int, int]] = {}
    for variant in ("before", "off", "on"):
        results[variant] = {n: instructions(variant, n, args) for n in (low, high)}
        print(f"{variant}: {results[variant]}", flush=True)
    print("\n| variant | instructions, " + f"{low} msgs | {high} msgs | per message |")
    print("|---|---|---|---|")
    per = {}
    for variant, r in results.items():
        per[variant] = (r[high] - r[low]) / (high - low)
        print(f"| {variant} | {r[low]:,} | {r[high]:,} | {per[variant]:,.0f} |")
    for variant in ("off", "on"):
        print(f"{variant} / before: {per[variant] / per['before']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="src folder of the checkout to compare")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--case", default="1024:20:5000", help="SIZE:SESSIONS:N for relay.py")
    ap.add_argument("--json", default=None)
    ap.add_argument("--instructions", metavar="N1,N2", help="count instructions instead")
    args = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("run as root (relay.py needs it)")
    if args.instructions:
        return run_instructions(args)
    runs = []
    for round in range(args.rounds):
        for variant in ("before", "off", "on"):
            r = one_run(variant, args)
            runs.append(r)
            print(f"round {round + 1} {variant:6}: {r}", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(runs, indent=1))
    print("\n| variant | CPU s / 1000 msgs, per run | median | msgs/s end to end (median) |")
    print("|---|---|---|---|")
    medians = {}
    for variant in ("before", "off", "on"):
        mine = [r for r in runs if r["variant"] == variant]
        cpu = [r["cpu_per_1000"] for r in mine]
        rates = [r["e2e_rate"] for r in mine if r["e2e_rate"]]
        medians[variant] = statistics.median(cpu)
        print(
            f"| {variant} | {', '.join(f'{c:.3f}' for c in cpu)} | {medians[variant]:.3f} |"
            f" {statistics.median(rates):.0f} |"
        )
    for variant in ("off", "on"):
        print(f"{variant} / before: {medians[variant] / medians['before']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
