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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="src folder of the checkout to compare")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--case", default="1024:20:5000", help="SIZE:SESSIONS:N for relay.py")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("run as root (relay.py needs it)")
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
