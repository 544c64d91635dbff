#!/usr/bin/env python3
"""mailgate vs Postfix, Sendmail and OpenSMTPD as the same domain-routing relay gateway, on
loopback.

    python3 bench/relay.py --all                # everything, as in bench/RESULTS.md (the first
                                                # run unpacks Sendmail and OpenSMTPD: peers-install)
    python3 bench/relay.py --cases 1k20 --runs 1
    python3 bench/relay.py --cases 1024:20:5000,rcpt100x10 --relays mailgate,sendmail
    python3 bench/relay.py --latency --rate 400
    python3 bench/relay.py --idle --bigmsg --access --greet

Run as root (the peers' private instances need it). See bench/README.md for what is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import extras
import procstat
import relays
from relays import (
    MailgateRelay,
    OpenSmtpdRelay,
    PostfixRelay,
    Route,
    SendmailRelay,
    SmtpSink,
    free_port,
    run_smtp_source,
    stop_process,
)

BENCH = Path(__file__).resolve().parent
RELAYS = ("mailgate", "postfix", "sendmail", "opensmtpd")
PEERS = RELAYS[1:]


@dataclass(frozen=True)
class Case:
    """One throughput case. ``source``: smtp-source → relay → smtp-sink, one recipient per
    message, one message per connection. ``rcpt``: the Python source sends messages of
    ``rcpts`` recipients spread over ``hops`` domains, each routed to its own next hop (a
    Python sink listening on 127.0.0.11, .12, …, one port), which counts recipients.
    ``deepqueue``: a name only, for the deep-queue case another branch builds."""

    name: str
    kind: str  # "source" | "rcpt" | "deepqueue"
    size: int
    sessions: int
    n: int  # messages
    rcpts: int = 1
    hops: int = 1

    @property
    def label(self) -> str:
        if self.kind == "rcpt":
            return f"{self.rcpts} rcpt → {self.hops} hops / {self.sessions} sess / N={self.n}"
        if self.kind == "deepqueue":
            return "deep queue"
        size = f"{self.size // 1024} KiB" if self.size >= 1024 else f"{self.size} B"
        return f"{size} / {self.sessions} sess / N={self.n}"


NAMED_CASES = {
    c.name: c
    for c in (
        Case("1k20", "source", 1024, 20, 4000),
        Case("100k20", "source", 102400, 20, 2000),
        Case("1k1", "source", 1024, 1, 2000),
        Case("1k200", "source", 1024, 200, 4000),
        Case("rcpt100x10", "rcpt", 1024, 10, 100, rcpts=100, hops=10),
        Case("deepqueue", "deepqueue", 0, 0, 0),
    )
}
# The deep-queue case is built elsewhere (its own branch): not in the default list until then.
DEFAULT_CASES = "1k20,100k20,1k1,1k200,rcpt100x10"
DEFAULT_N_SCALE = "opensmtpd=0.1"


def _n_scale(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in filter(None, text.split(",")):
        kind, eq, factor = item.partition("=")
        if not eq or kind not in RELAYS:
            raise argparse.ArgumentTypeError(f"{item!r}: RELAY=FACTOR, RELAY one of {RELAYS}")
        try:
            out[kind] = float(factor)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: FACTOR is a number") from None
        if not 0 < out[kind] <= 1:
            raise argparse.ArgumentTypeError(f"{item!r}: FACTOR in (0, 1]")
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def cpu_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def start_milter(kind: str, base: Path) -> Any:
    """The filter both relays use, from the tests' own set-up of the Debian packages."""
    sys.path.insert(0, str(BENCH.parent))
    from tests.support.filters import OpenDkim, Rspamd

    cls = OpenDkim if kind == "opendkim" else Rspamd
    if cls.missing:
        raise SystemExit(f"--milter {kind}: {cls.missing} is not installed")
    peer = cls(base / kind).start()
    relays.MILTER_PORT = peer.port
    global FILTER_ROOTS
    FILTER_ROOTS = [proc.pid for proc in peer.procs]
    log(f"milter: {kind} on {peer.socket}")
    return peer


FILTER_ROOTS: list[int] = []  # the filter's processes (--milter): its CPU is reported too


def filter_cpu() -> float:
    return sum(procstat.tree_cpu(pid) for pid in FILTER_ROOTS)


def make_relay(
    kind: str,
    workdir: Path,
    sink_port: int,
    args: argparse.Namespace,
    settings: dict[str, dict[str, str]] | None = None,
    routes: list[Route] | None = None,
) -> Any:
    if kind == "mailgate":
        # Throughput and latency runs use one worker per CPU, as a production gateway on a
        # multi-core machine is configured (Postfix, too, spreads over the cores); the
        # mailgate-only extras keep one process so that their RSS is one process's.
        merged = {"": {"workers": "0"}} if settings is None else {}
        for sec, kv in (settings or {}).items():
            merged.setdefault(sec, {}).update(kv)
        return MailgateRelay(workdir, sink_port, merged, args.pythonpath, routes=routes)
    peer = {"postfix": PostfixRelay, "sendmail": SendmailRelay, "opensmtpd": OpenSmtpdRelay}
    return peer[kind](workdir, sink_port, routes)


# -- throughput --------------------------------------------------------------------------------


def scaled_n(kind: str, n: int, args: argparse.Namespace) -> int:
    """The messages a run of ``kind`` sends: the case's N times the relay's ``--n-scale``."""
    factor = args.n_scale.get(kind, 1.0)
    return n if factor == 1.0 else max(10, round(n * factor))


def throughput_run(kind: str, case: Case, base: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One relay, one case, on a fresh relay and queue in a new folder of ``base``."""
    if case.kind == "rcpt":
        return rcpt_run(kind, replace(case, n=scaled_n(kind, case.n, args)), base, args)
    return source_run(kind, case.size, case.sessions, scaled_n(kind, case.n, args), base, args)


def source_run(
    kind: str, size: int, sessions: int, n: int, base: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """One relay, one case: warm up, then smtp-source N messages and wait for the sink."""
    work = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=base))
    sink = SmtpSink(work)
    res: dict[str, Any] = {"relay": kind, "size": size, "sessions": sessions, "n": n}
    relay: Any = None
    try:
        relay = make_relay(kind, work / "relay", sink.port, args)
        relay.start()
        # Warm-up (not measured): Postfix forks its daemons on demand, mailgate imports lazily.
        warm = min(200, max(20, n // 20))
        w = run_smtp_source(relay.port, warm, min(sessions, warm), size, timeout=120)
        if not sink.counter.wait(warm, timeout=120, stall=30):
            raise RuntimeError(
                f"warm-up: {sink.count}/{warm} arrived; source said {w['output_tail']!r}"
            )
        time.sleep(0.5)
        root = relay.root
        cpu0 = procstat.tree_cpu(root)
        split0, filter0 = procstat.cpu_split(procstat.tree(root)), filter_cpu()
        busy0, all0 = cpu_busy(), procstat.snapshot_all()
        with procstat.Sampler(root) as sampler:
            src = run_smtp_source(relay.port, n, sessions, size, timeout=args.max_seconds, stall=30)
            sent = int(src["sent"])
            sink.counter.wait(warm + sent, timeout=args.max_seconds, stall=30)
            cpu1 = procstat.tree_cpu(root)
            split1, filter1 = procstat.cpu_split(procstat.tree(root)), filter_cpu()
            busy1, all1 = cpu_busy(), procstat.snapshot_all()
            ours = set(procstat.tree(root)) | set(procstat.tree(os.getpid()))
            ours |= {p for pid in FILTER_ROOTS for p in procstat.tree(pid)}
        arrivals = sink.counter.times[warm : warm + sent]
        received = len(arrivals)
        t0 = float(src["start"])
        res.update(
            {
                "sent": sent,
                "received": received,
                "lost": sent - received,
                "stalled": src["stalled"],
                "source_rc": src["rc"],
                "accept_s": float(src["wall"]),
                "accept_rate": sent / float(src["wall"]),
                "e2e_s": (arrivals[-1] - t0) if arrivals else float("nan"),
                "cpu_s": cpu1 - cpu0,
                "cpu_per_1000": (cpu1 - cpu0) / max(1, received) * 1000,
                "user_per_1000": (split1[0] - split0[0]) / max(1, received) * 1000,
                "sys_per_1000": (split1[1] - split0[1]) / max(1, received) * 1000,
                "filter_cpu_per_1000": (filter1 - filter0) / max(1, received) * 1000,
                "peak_rss_mb": sampler.peak_rss / 2**20,
                "peak_pss_mb": sampler.peak_pss / 2**20,
                "peak_procs": sampler.peak_procs,
                "machine_busy_pct": 100 * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]),
            }
        )
        other_s, top = procstat.foreign_cpu(all0, all1, ours)
        span = max(1e-9, time.time() - t0)
        res["others_cores"] = other_s / span  # other people's processes, in cores
        res["others_top"] = [f"{name}[{pid}] {sec / span:.2f}" for sec, pid, name in top]
        res["e2e_rate"] = received / res["e2e_s"] if arrivals else 0.0
        # 250 → arrival, rank-matched: the k-th 250 against the k-th arrival (smtp-source
        # gives no per-message identity; exact per-message figures come from --latency).
        lat = [a - s for a, s in zip(arrivals, src["times"], strict=False)]
        res["lat_rank_p50_ms"] = percentile(lat, 50) * 1000
        res["lat_rank_p99_ms"] = percentile(lat, 99) * 1000
        # smtp-source stops at the first session that fails (refused, 4xx/5xx, dropped):
        # such a run is not a clean one, whatever arrived.
        res["short"] = n - sent if src["rc"] != 0 or sent < n else 0
        if src["stalled"] or res["lost"] or res["short"]:
            res["note"] = f"source output: {src['output_tail'][-300:]!r}"
            res["log_tail"] = relay.log_tail()
    except Exception as exc:
        res["error"] = repr(exc)
        if relay is not None:
            res["log_tail"] = relay.log_tail()
    finally:
        # Did the sink die under us (exit status, its last words)?
        res["sink_exit"] = sink.proc.poll()
        if res["sink_exit"] is not None:
            res["sink_tail"] = sink.counter.text_tail[-300:]
        if relay is not None:
            relay.stop()
        sink.stop()
        finish(work, res, args)
    return res


def rcpt_run(kind: str, case: Case, base: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Messages of ``case.rcpts`` recipients over ``case.hops`` domains, each domain routed to
    its own next hop: the Python sink on 127.0.0.11…, one port; it prints the running
    recipient count after each message (so arrival times are known) and keeps, per
    Message-Id, the recipients that arrived. lost = recipients accepted − recipients arrived."""
    work = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=base))
    port = free_port()
    hosts = [f"127.0.0.{11 + i}" for i in range(case.hops)]
    routes: list[Route] = [(f"hop{i + 1}.example", h, port) for i, h in enumerate(hosts)]
    warm = 5
    total = (warm + case.n) * case.rcpts
    tool = [sys.executable, str(BENCH / "smtpbench.py")]
    arr_file = work / "arrivals.json"
    sink = subprocess.Popen(
        [
            *tool,
            "sink",
            "--host",
            ",".join(hosts),
            "--port",
            str(port),
            "--rcpt-count",
            str(total),
            "--progress",
            "--timeout",
            str(args.max_seconds + 120),
            "--out",
            str(arr_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=relays.own_session(),
    )
    relays.prioritize(sink.pid)
    counter = relays.CounterReader(sink, "rcpt=")
    res: dict[str, Any] = {
        "relay": kind,
        "size": case.size,
        "sessions": case.sessions,
        "n": case.n,
        "rcpts": case.rcpts,
        "hops": case.hops,
    }
    relay: Any = None
    try:
        for h in hosts:
            relays.wait_banner(port, 10, sink, host=h)
        relay = make_relay(kind, work / "relay", port, args, routes=routes)
        relay.start()
        domains = ",".join(d for d, _, _ in routes)
        source = [
            *tool,
            "source",
            "--port",
            str(relay.port),
            "--rate",
            "0",
            "--rcpts",
            str(case.rcpts),
            "--domains",
            domains,
            "--size",
            str(case.size),
        ]
        subprocess.run(
            [
                *source,
                "--count",
                str(warm),
                "--sessions",
                "1",
                "--run",
                "warm",
                "--out",
                str(work / "warm.json"),
            ],
            timeout=120,
            check=False,
            capture_output=True,
        )
        if not counter.wait(warm * case.rcpts, timeout=120, stall=30):
            raise RuntimeError(f"warm-up: {counter.count}/{warm * case.rcpts} recipients arrived")
        time.sleep(0.5)
        root = relay.root
        cpu0 = procstat.tree_cpu(root)
        split0, filter0 = procstat.cpu_split(procstat.tree(root)), filter_cpu()
        busy0, all0 = cpu_busy(), procstat.snapshot_all()
        sent_file = work / "sent.json"
        t0 = time.time()
        with procstat.Sampler(root) as sampler:
            done = subprocess.run(
                [
                    *source,
                    "--count",
                    str(case.n),
                    "--sessions",
                    str(case.sessions),
                    "--run",
                    "m",
                    "--timeout",
                    str(args.max_seconds),
                    "--out",
                    str(sent_file),
                ],
                timeout=args.max_seconds + 60,
                check=False,
                capture_output=True,
            )
            sent_log = json.loads(sent_file.read_text())
            sent = len(sent_log["sent"]) * case.rcpts
            stalled = not counter.wait(warm * case.rcpts + sent, timeout=args.max_seconds, stall=30)
            cpu1 = procstat.tree_cpu(root)
            split1, filter1 = procstat.cpu_split(procstat.tree(root)), filter_cpu()
            busy1, all1 = cpu_busy(), procstat.snapshot_all()
            ours = set(procstat.tree(root)) | set(procstat.tree(os.getpid()))
        arrivals = counter.times[warm * case.rcpts : warm * case.rcpts + sent]
        received = len(arrivals)
        messages = len(sent_log["sent"])
        wall = float(sent_log["end"]) - t0
        res.update(
            {
                "sent": sent,
                "received": received,
                "lost": sent - received,
                "messages": messages,
                "stalled": stalled,
                "source_rc": done.returncode,
                "source_errors": sent_log["errors"][:5],
                "accept_s": wall,
                "accept_rate": messages / wall,
                "e2e_s": (arrivals[-1] - t0) if arrivals else float("nan"),
                "cpu_s": cpu1 - cpu0,
                "cpu_per_1000": (cpu1 - cpu0) / max(1, messages) * 1000,
                # The split per message, as the source runs give it (the report's table).
                "user_per_1000": (split1[0] - split0[0]) / max(1, messages) * 1000,
                "sys_per_1000": (split1[1] - split0[1]) / max(1, messages) * 1000,
                "filter_cpu_per_1000": (filter1 - filter0) / max(1, messages) * 1000,
                "peak_rss_mb": sampler.peak_rss / 2**20,
                "peak_pss_mb": sampler.peak_pss / 2**20,
                "peak_procs": sampler.peak_procs,
                "machine_busy_pct": 100 * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]),
                "lat_rank_p50_ms": float("nan"),
                "lat_rank_p99_ms": float("nan"),
            }
        )
        # messages whose every recipient arrived, per unit of time (recipients / rcpts)
        res["e2e_rate"] = received / case.rcpts / res["e2e_s"] if arrivals else 0.0
        other_s, top = procstat.foreign_cpu(all0, all1, ours)
        span = max(1e-9, time.time() - t0)
        res["others_cores"] = other_s / span
        res["others_top"] = [f"{name}[{pid}] {sec / span:.2f}" for sec, pid, name in top]
        res["short"] = case.n - messages
        if stalled or res["lost"] or res["short"]:
            res["note"] = f"source errors: {sent_log['errors'][:3]!r}"
            res["log_tail"] = relay.log_tail()
    except Exception as exc:
        res["error"] = repr(exc)
        if relay is not None:
            res["log_tail"] = relay.log_tail()
    finally:
        if relay is not None:
            relay.stop()
        stop_process(sink, 10)
        finish(work, res, args)
    return res


def finish(work: Path, res: dict[str, Any], args: argparse.Namespace) -> None:
    """Remove a run's temp dir; one that failed is kept (maillog, queue) for a look."""
    if "error" in res or res.get("lost") or res.get("stalled") or res.get("short"):
        kept = Path(args.workdir) / f"mailgate-bench-failed-{work.name}"
        with contextlib.suppress(OSError):
            shutil.move(str(work), kept)
            res["kept"] = str(kept)
    elif not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the runs that finished; lost is the worst run's."""
    done = [r for r in runs if "error" not in r]
    ok = [r for r in done if not r["lost"] and not r["stalled"] and not r.get("short")]
    out: dict[str, Any] = {
        "runs": len(runs),
        "ok_runs": len(ok),
        "errors": [r["error"] for r in runs if "error" in r]
        + [f"lost {r['lost']}" for r in done if r["lost"]]
        + [f"{r['short']} not sent: {r.get('note', '')[:150]}" for r in done if r.get("short")],
    }
    if not ok:
        return out
    for key in (
        "accept_rate",
        "e2e_rate",
        "cpu_per_1000",
        "user_per_1000",
        "sys_per_1000",
        "filter_cpu_per_1000",
        "peak_rss_mb",
        "peak_pss_mb",
        "lat_rank_p50_ms",
        "lat_rank_p99_ms",
        "machine_busy_pct",
        "accept_s",
        "e2e_s",
        "others_cores",
    ):
        out[key] = statistics.median(r[key] for r in ok)
    for key in SPREAD:  # the spread: smallest and largest of the clean runs
        out[key + "_min"] = min(r[key] for r in ok)
        out[key + "_max"] = max(r[key] for r in ok)
    out["lost"] = max(r["lost"] for r in done)  # the worst run, clean or not
    out["stalled"] = any(r["stalled"] for r in done)
    return out


SPREAD = ("accept_rate", "e2e_rate", "cpu_per_1000", "peak_rss_mb")


def parse_cases(text: str) -> list[Case]:
    """Names of NAMED_CASES (``1k20``, ``rcpt100x10``, …; ``NAME:N`` changes N) or
    ``SIZE:SESSIONS:N`` for an smtp-source case."""
    cases = []
    for part in text.split(","):
        name, _, count = part.partition(":")
        if name in NAMED_CASES:
            case = NAMED_CASES[name]
            if count:
                case = Case(**{**asdict(case), "n": int(count)})
            cases.append(case)
            continue
        size, sessions, n = (int(x) for x in part.split(":"))
        cases.append(Case(f"{size}:{sessions}", "source", size, sessions, n))
    return cases


def run_throughput(args: argparse.Namespace, base: Path, report: dict[str, Any]) -> None:
    out: list[dict[str, Any]] = []
    for case in parse_cases(args.cases):
        if case.kind == "deepqueue":
            log("  deepqueue: not built on this branch (the deep-queue case is its own)")
            continue
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in args.relays}
        for i in range(args.runs):
            # Interleaved: repetition i runs every relay once, in --relays order, so a drift
            # of the machine's load during the case hits every relay alike.
            for kind in args.relays:
                if sum("error" in r or r["stalled"] or r.get("short") for r in runs[kind]) >= 2:
                    continue  # failed twice in this case: do not spend minutes again
                r = throughput_run(kind, case, base, args)
                runs[kind].append(r)
                log(f"  {kind:9} {case.name} run {i + 1}: " + brief(r))
        entry = {
            **asdict(case),
            "label": case.label,
            "relays": {k: {"summary": summarize(v), "runs": v} for k, v in runs.items()},
        }
        out.append(entry)
        report["throughput"] = out
        save(report, args)
    report["throughput"] = out


def brief(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"ERROR {r['error'][:300]} (kept: {r.get('kept')})"
    return (
        f"accept {r['accept_rate']:.0f}/s e2e {r['e2e_rate']:.0f}/s "
        f"sent {r['sent']} lost {r['lost']} cpu/1k {r['cpu_per_1000']:.2f}s "
        f"rss {r['peak_rss_mb']:.0f}MB p99(rank) {r['lat_rank_p99_ms']:.0f}ms"
        + (" STALLED" if r["stalled"] else "")
    )


# -- latency at a fixed rate -------------------------------------------------------------------


def latency_run(
    kind: str,
    rate: float,
    seconds: float,
    sessions: int,
    size: int,
    base: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Python source at ``rate`` msgs/s → relay → Python sink; exact 250 → arrival per message
    (joined on the Message-Id the source generated)."""
    work = Path(tempfile.mkdtemp(prefix=f"lat-{kind}-", dir=base))
    n = max(1, int(rate * seconds))
    sink_port = free_port()
    arr_file, sent_file = work / "arrivals.json", work / "sent.json"
    tool = [sys.executable, str(BENCH / "smtpbench.py")]
    sink = subprocess.Popen(
        [
            *tool,
            "sink",
            "--port",
            str(sink_port),
            "--count",
            str(n + 50),
            "--timeout",
            str(seconds + 120),
            "--out",
            str(arr_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=relays.own_session(),
    )
    relays.prioritize(sink.pid)
    relay = make_relay(kind, work / "relay", sink_port, args)
    res: dict[str, Any] = {"relay": kind, "rate": rate, "n": n, "sessions": sessions, "size": size}
    try:
        assert sink.stdout is not None
        if sink.stdout.readline().strip() != b"ready":
            raise RuntimeError("sink did not start")
        relay.start()
        # Warm-up: 50 messages at the same rate, not counted (Message-Ids of run "warm").
        source = [
            *tool,
            "source",
            "--port",
            str(relay.port),
            "--rate",
            str(rate),
            "--sessions",
            str(sessions),
            "--size",
            str(size),
        ]
        subprocess.run(
            [*source, "--count", "50", "--run", "warm", "--out", str(work / "warm.json")],
            timeout=120,
            check=False,
            capture_output=True,
        )
        time.sleep(1)
        root = relay.root
        cpu0 = procstat.tree_cpu(root)
        with procstat.Sampler(root) as sampler:
            subprocess.run(
                [
                    *source,
                    "--count",
                    str(n),
                    "--run",
                    "lat",
                    "--timeout",
                    str(seconds * 3 + 60),
                    "--out",
                    str(sent_file),
                ],
                timeout=seconds * 3 + 120,
                check=False,
                capture_output=True,
            )
            try:
                sink.wait(timeout=60)  # exits once n + 50 arrived
            except subprocess.TimeoutExpired:
                stop_process(sink, 10)  # TERM: it writes what it has
            cpu1 = procstat.tree_cpu(root)
        arrivals = json.loads(arr_file.read_text())["arrivals"]
        sent = json.loads(sent_file.read_text())
        lat = [arrivals[k] - v[1] for k, v in sent["sent"].items() if k in arrivals]
        lag = [v[1] - v[0] for v in sent["sent"].values()]  # due → 250 (source side)
        res.update(
            {
                "sent": len(sent["sent"]),
                "received": len(lat),
                "lost": len(sent["sent"]) - len(lat),
                "source_errors": sent["errors"][:5],
                "achieved_rate": len(sent["sent"]) / max(1e-9, sent["end"] - sent["start"]),
                "p50_ms": percentile(lat, 50) * 1000,
                "p99_ms": percentile(lat, 99) * 1000,
                "max_ms": max(lat) * 1000 if lat else float("nan"),
                "due_to_250_p50_ms": percentile(lag, 50) * 1000,
                "due_to_250_p99_ms": percentile(lag, 99) * 1000,
                "cpu_per_1000": (cpu1 - cpu0) / max(1, len(lat)) * 1000,
                "peak_rss_mb": sampler.peak_rss / 2**20,
            }
        )
    except Exception as exc:
        res["error"] = repr(exc)
    finally:
        relay.stop()
        stop_process(sink, 10)
        finish(work, res, args)
    return res


def run_latency(args: argparse.Namespace, base: Path, report: dict[str, Any]) -> None:
    rate = args.rate
    basis = "--rate"
    if not rate:
        peak = None
        for case in report.get("throughput", []):
            if case["size"] == 1024 and case["sessions"] == 20:
                s = case["relays"].get("mailgate", {}).get("summary", {})
                if "e2e_rate" in s:
                    # Sustainable peak: a relay cannot keep accepting faster than it delivers.
                    peak = min(s["e2e_rate"], s["accept_rate"])
        if peak is None:
            log(
                "latency: no measured mailgate peak (run with --cases incl. 1024:20:N, "
                "or give --rate); skipped"
            )
            return
        rate = round(0.8 * peak)
        basis = f"80% of mailgate's 1 KiB/20-session peak ({peak:.0f}/s)"
    out = {"rate": rate, "basis": basis, "relays": {}}
    for kind in args.relays:
        r = latency_run(kind, rate, args.latency_seconds, 20, 1024, base, args)
        out["relays"][kind] = r
        log(
            f"  latency {kind:8} at {rate}/s: "
            + (
                f"ERROR {r['error']}"
                if "error" in r
                else f"p50 {r['p50_ms']:.1f}ms p99 {r['p99_ms']:.1f}ms max {r['max_ms']:.0f}ms "
                f"lost {r['lost']} achieved {r['achieved_rate']:.0f}/s"
            )
        )
    report["latency"] = out
    save(report, args)


# -- report ------------------------------------------------------------------------------------


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    pf = subprocess.run(
        ["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    mg = MailgateRelay.__new__(MailgateRelay)
    mg.pythonpath = args.pythonpath
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    version = mg.version()
    with contextlib.suppress(Exception):  # which commit of which tree, and is it modified?
        tree = Path(version.split()[-1]).parent.parent
        git = ["git", "-C", str(tree)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        version += f" (git {head}{', with uncommitted changes' if dirty else ''})"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postfix": pf,
        "sendmail": relays.package_version(relays.SENDMAIL_TREE, "sendmail-bin"),
        "opensmtpd": relays.package_version(relays.OPENSMTPD_TREE, "opensmtpd"),
        "mailgate": version,
        "loadavg_at_start": load,
        "command": "python3 " + " ".join([os.path.relpath(__file__), *sys.argv[1:]]),
    }


def save(report: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


def log(text: str) -> None:
    print(text, flush=True)


def fmt(v: Any, spec: str = ".0f") -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "—"
    return format(v, spec) if isinstance(v, int | float) else str(v)


def ratio(a: Any, b: Any) -> str:
    try:
        return f"{a / b:.2f}×"
    except (TypeError, ZeroDivisionError):
        return "—"


def spread(s: dict[str, Any], key: str, spec: str = ".0f") -> str:
    """``median (min–max)`` of the clean runs."""
    if key + "_min" not in s:
        return fmt(s.get(key), spec)
    return f"{fmt(s[key], spec)} ({fmt(s[key + '_min'], spec)}–{fmt(s[key + '_max'], spec)})"


def best_peer(sums: dict[str, dict[str, Any]]) -> str | None:
    """The peer with the highest median end-to-end rate (the one mailgate must beat)."""
    done = [k for k in PEERS if sums.get(k, {}).get("ok_runs")]
    return max(done, key=lambda k: sums[k]["e2e_rate"]) if done else None


def throughput_markdown(report: dict[str, Any]) -> list[str]:
    runs = report["args"]["runs"]
    lines = [
        f"#### Throughput (medians of {runs} interleaved runs per relay, (min–max) of the runs)",
        "",
        "smtp-source → relay → smtp-sink, one recipient, one message per connection; the "
        "recipient case: Python source → relay → Python sink on 10 addresses. Rates in "
        "messages/s; CPU = the relay's process tree, ms per message; RSS = sum over the tree.",
        "",
        "| case | relay | accept msg/s | end-to-end msg/s | lost (worst run) | CPU ms/msg"
        " | peak RSS MB (PSS) | 250→sink p50/p99 ms (rank-matched) | machine busy % |"
        " others' load (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = []
    for case in report["throughput"]:
        label = case["label"]
        sums = {k: v["summary"] for k, v in case["relays"].items()}
        for kind, s in sums.items():
            if not s.get("ok_runs"):
                err = (s.get("errors") or ["no run"])[0][:120]
                lines.append(f"| {label} | {kind} | failed: {err} | | | | | | | |")
                continue
            bad = "" if s["ok_runs"] == s["runs"] else f" ({s['ok_runs']}/{s['runs']} ok)"
            lines.append(
                f"| {label} | {kind}{bad} | {spread(s, 'accept_rate')} |"
                f" {spread(s, 'e2e_rate')} | {s['lost']}{' STALLED' if s['stalled'] else ''} |"
                f" {spread(s, 'cpu_per_1000', '.2f')} |"
                f" {spread(s, 'peak_rss_mb')} ({fmt(s['peak_pss_mb'])}) |"
                f" {fmt(s['lat_rank_p50_ms'])} / {fmt(s['lat_rank_p99_ms'])} |"
                f" {fmt(s['machine_busy_pct'])} | {fmt(s['others_cores'], '.2f')} |"
            )
        a = sums.get("mailgate", {})
        best = best_peer(sums)
        b = sums.get(best, {}) if best else {}
        per_peer = " | ".join(
            ratio(a.get("e2e_rate"), sums.get(k, {}).get("e2e_rate")) for k in PEERS
        )
        ratios.append(
            f"| {label} | {best or '—'} ({fmt(b.get('e2e_rate'))}/s) |"
            f" {ratio(a.get('e2e_rate'), b.get('e2e_rate'))} |"
            f" {ratio(a.get('accept_rate'), b.get('accept_rate'))} |"
            f" {ratio(a.get('cpu_per_1000'), b.get('cpu_per_1000'))} |"
            f" {ratio(a.get('peak_rss_mb'), b.get('peak_rss_mb'))} | {per_peer} |"
        )
    failures = [
        f"- {c['label']}, {kind} run {i}: "
        + (f"error {r['error'][:200]}" if "error" in r else f"lost {r['lost']}")
        + (" stalled" if r.get("stalled") else "")
        + (f", {r['short']} of N not sent" if r.get("short") else "")
        + (f"; {r['note'][:200]}" if r.get("note") else "")
        + (f"; sink exited ({r['sink_exit']})" if r.get("sink_exit") is not None else "")
        + (f"; kept {r['kept']}" if r.get("kept") else "")
        for c in report["throughput"]
        for kind, v in c["relays"].items()
        for i, r in enumerate(v["runs"], 1)
        if "error" in r or r.get("lost") or r.get("stalled") or r.get("short")
    ]
    if failures:
        lines += [
            "",
            "Runs left out of the medians (failed, lost, stalled, sessions refused):",
            "",
            *failures,
        ]
    lines += [
        "",
        "mailgate against the best peer of each case (highest median end-to-end rate), and its"
        " end-to-end rate against each peer's:",
        "",
        "| case | best peer (its e2e) | mailgate ÷ best: e2e | accept | CPU per msg | peak RSS |"
        + "".join(f" ÷ {k} e2e |" for k in PEERS),
        "|---|---|---|---|---|---|" + "---|" * len(PEERS),
        *ratios,
        "",
        "Per run (grouped by relay; run k of every relay ran in repetition k of the case):",
        "",
        "| case | relay | run | accept/s | e2e/s | sent | lost | CPU ms/msg |"
        " RSS MB | busy % | others' load: top processes (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in report["throughput"]:
        label = case["label"]
        for kind, v in case["relays"].items():
            for i, r in enumerate(v["runs"], 1):
                if "error" in r:
                    lines.append(
                        f"| {label} | {kind} | {i} | error: {r['error'][:150]} | | | | | | | |"
                    )
                    continue
                lines.append(
                    f"| {label} | {kind} | {i} | {fmt(r['accept_rate'])} |"
                    f" {fmt(r['e2e_rate'])} | {r['sent']} | {r['lost']} |"
                    f" {fmt(r['cpu_per_1000'], '.2f')} | {fmt(r['peak_rss_mb'])} |"
                    f" {fmt(r['machine_busy_pct'])} |"
                    f" {', '.join(r['others_top'])} |"
                )
    lines.append("")
    return lines


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"- date: {m['date']}",
        f"- machine: {m['nproc']} cores, {m['cpu']}, Linux {m['kernel']}, Python {m['python']}",
        f"- Postfix {m['postfix']}; Sendmail {m.get('sendmail', '—')}; OpenSMTPD"
        f" {m.get('opensmtpd', '—')}; mailgate {m['mailgate']}",
        f"- extra mailgate settings: {report['args'].get('mailgate_set') or 'none'}",
        f"- milter in every relay's path: {report['args'].get('milter') or 'none'}",
        "- N scaled (each run of that relay sends N × this): "
        + (
            ", ".join(f"{k} × {v:g}" for k, v in (report["args"].get("n_scale") or {}).items())
            or "none"
        ),
        f"- load average when started: {' '.join(m['loadavg_at_start'])}; harness, "
        f"relays, source and sink at nice {report['args'].get('nice', 0)}",
        f"- command: `{m['command']}`",
        "",
    ]
    if report.get("throughput"):
        lines += throughput_markdown(report)
        lines += cpu_split_table(report)
    lat = report.get("latency")
    if lat:
        lines += [
            f"### Latency at {lat['rate']} msgs/s ({lat['basis']}), 1 KiB, ≤ 20 sessions,"
            " Python source → relay → Python sink, exact per-message join",
            "",
            "| relay | sent | lost | achieved msg/s | 250→sink p50 ms | p99 ms | max ms |"
            " CPU s/1000 | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for kind, r in lat["relays"].items():
            if "error" in r:
                lines.append(f"| {kind} | error: {r['error'][:150]} | | | | | | | |")
                continue
            lines.append(
                f"| {kind} | {r['sent']} | {r['lost']} | {fmt(r['achieved_rate'])} |"
                f" {fmt(r['p50_ms'], '.1f')} | {fmt(r['p99_ms'], '.1f')} |"
                f" {fmt(r['max_ms'])} | {fmt(r['cpu_per_1000'], '.2f')} |"
                f" {fmt(r['peak_rss_mb'])} |"
            )
        lines.append("")
    lines += extras.markdown(report)
    return "\n".join(lines) + "\n"


def cpu_split_table(report: dict[str, Any]) -> list[str]:
    """The relays' CPU as user and system time, and the filter's (--milter), per message:
    the filter's is the same work for both relays, and counts in neither's CPU column."""
    lines = [
        "CPU s/1000 msgs, split (medians): the relay's user and system time, and the filter's"
        + (f" ({report['args']['milter']})" if report["args"].get("milter") else ""),
        "",
        "| case | relay | user | system | filter |",
        "|---|---|---|---|---|",
    ]
    for case in report["throughput"]:
        label = f"{case['size'] // 1024} KiB / {case['sessions']} sess"
        for kind, v in case["relays"].items():
            s = v["summary"]
            if not s.get("ok_runs") or "user_per_1000" not in s:
                continue
            lines.append(
                f"| {label} | {kind} | {fmt(s['user_per_1000'], '.2f')} |"
                f" {fmt(s['sys_per_1000'], '.2f')} | {fmt(s['filter_cpu_per_1000'], '.2f')} |"
            )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--all",
        action="store_true",
        help="throughput cases + latency + idle + bigmsg + access + greet",
    )
    ap.add_argument(
        "--cases",
        default=None,
        help=f"case names ({', '.join(NAMED_CASES)}; NAME:N sets N) or SIZE:SESSIONS:N, "
        f"comma-separated (default with --all/--throughput: {DEFAULT_CASES})",
    )
    ap.add_argument("--throughput", action="store_true", help="run the default cases")
    ap.add_argument(
        "--runs", "--repeat", type=int, default=5, help="runs per case and relay (median)"
    )
    ap.add_argument("--relays", default=",".join(RELAYS), help="which relays, in run order")
    ap.add_argument("--latency", action="store_true", help="fixed-rate 250→sink latency run")
    ap.add_argument(
        "--rate",
        type=float,
        default=0,
        help="latency run rate (default: 80%% of mailgate's measured peak)",
    )
    ap.add_argument("--latency-seconds", type=float, default=15)
    ap.add_argument("--idle", action="store_true", help="10,000 idle sessions + polite client")
    ap.add_argument("--idle-count", type=int, default=10_000)
    ap.add_argument("--bigmsg", action="store_true", help="one 100 MB message through mailgate")
    ap.add_argument("--bigmsg-mb", type=int, default=100)
    ap.add_argument("--access", action="store_true", help="1,000,000-line access table")
    ap.add_argument("--access-lines", type=int, default=1_000_000)
    ap.add_argument(
        "--greet", action="store_true", help="greet_pause 5s with 200 new connections/s"
    )
    ap.add_argument("--greet-rate", type=int, default=200)
    ap.add_argument("--greet-seconds", type=float, default=10)
    ap.add_argument(
        "--n-scale",
        type=_n_scale,
        default=_n_scale(DEFAULT_N_SCALE),
        help="RELAY=FACTOR,…: that relay's runs send N × FACTOR messages (default "
        f"{DEFAULT_N_SCALE}: OpenSMTPD delivers ~20 msgs/s to one next hop whatever the load, "
        "so a full N would take an hour; 'opensmtpd=1' for the full N)",
    )
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=300,
        help="bound for one measured run (also: 30 s without progress = stalled)",
    )
    ap.add_argument(
        "--pythonpath",
        default=None,
        help="prepend to PYTHONPATH for mailgate (e.g. another checkout's src)",
    )
    ap.add_argument(
        "--nice",
        type=int,
        default=-10,
        help="run the harness, relays, source and sink at this nice level (as root; 0 = leave it)",
    )
    ap.add_argument(
        "--sched-group",
        choices=("own", "shared"),
        default="shared",
        help="own: each relay, the source and the sink in a session (scheduling "
        "autogroup) of its own, as separately started daemons; shared: all "
        "in the harness's session, as when started from one shell",
    )
    ap.add_argument(
        "--mailgate-set",
        action="append",
        default=[],
        metavar="[SECTION.]KEY=VALUE",
        help="extra mailgate setting for every mailgate started, VALUE in TOML, "
        "e.g. workers=0 or smtp.max_connections=30000, milter.KEY for the --milter "
        "filter's [[milter]] entry (repeatable)",
    )
    ap.add_argument(
        "--no-snapshot",
        action="store_true",
        help="run mailgate from its tree as it is at each start, instead of from "
        "a copy of its package taken when the benchmark starts",
    )
    ap.add_argument(
        "--milter",
        choices=("opendkim", "rspamd"),
        help="one real filter (tests/support/filters.py) in both relays' path: mailgate's"
        " [[milter]], Postfix's smtpd_milters (opendkim signs: the sender is example.org)",
    )
    ap.add_argument("--json", default=None, help="write all results here (JSON)")
    ap.add_argument("--report", default=None, help="write the markdown tables here")
    ap.add_argument(
        "--workdir",
        default="/var/tmp",
        help="where temp dirs go (same disk for both relays' queues)",
    )
    ap.add_argument("--keep", action="store_true", help="keep temp dirs (logs, queues)")
    args = ap.parse_args(argv)
    args.relays = [r for r in args.relays.split(",") if r]
    if any(r not in RELAYS for r in args.relays):
        ap.error(f"--relays: choose from {RELAYS}")
    if args.all:
        args.throughput = args.latency = args.idle = args.bigmsg = True
        args.access = args.greet = True
    if args.throughput and not args.cases:
        args.cases = DEFAULT_CASES
    if not (args.cases or args.latency or args.idle or args.bigmsg or args.access or args.greet):
        ap.error(
            "nothing to do: give --all or some of --throughput/--cases/--latency/--idle/"
            "--bigmsg/--access/--greet"
        )
    if args.cases:
        try:
            parse_cases(args.cases)
        except ValueError:
            ap.error(f"--cases {args.cases}: want names ({', '.join(NAMED_CASES)}) or S:C:N")
    peers = set(args.relays) - {"mailgate"}
    if os.geteuid() != 0 and peers and (args.cases or args.latency):
        ap.error("run as root (the peers' private instances need it)")
    for tool in ("smtp-source", "smtp-sink", "postfix"):
        if not shutil.which(tool):
            ap.error(f"{tool} not found: apt-get install postfix (debconf: No configuration)")
    trees = {
        "sendmail": relays.SENDMAIL_TREE / "usr/libexec/sendmail/sendmail",
        "opensmtpd": relays.OPENSMTPD_TREE / "usr/sbin/smtpd",
    }
    if args.milter and "opensmtpd" in args.relays:
        ap.error("--milter: OpenSMTPD has no milter client (its filters are its own protocol)")
    wanted = [k for k, path in trees.items() if k in peers and (args.cases or args.latency)]
    if any(not trees[kind].exists() for kind in wanted):
        # One command from a fresh clone: the unpacked peers are made here the first time
        # (idempotent, about 2.5 MB from the package registry).
        log("peers: running bench/peers-install (Sendmail and OpenSMTPD, unpacked once)")
        installer = Path(__file__).resolve().parent / "peers-install"
        if subprocess.run([str(installer)], check=False).returncode != 0:
            ap.error(f"{installer} failed (or leave {', '.join(wanted)} out of --relays)")
    for kind in wanted:
        if not trees[kind].exists():
            ap.error(f"{trees[kind]} not found after bench/peers-install")
    for item in args.mailgate_set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--mailgate-set {item}: want [SECTION.]KEY=VALUE")
        sec, _, name = key.strip().rpartition(".")
        relays.EXTRA_SETTINGS.setdefault(sec, {})[name] = value.strip()
    if args.nice and os.geteuid() == 0:
        # Both relays, source, sink and this harness at one priority above other people's
        # busy processes on the machine (see relays.prioritize).
        relays.NICE = args.nice
        relays.prioritize(os.getpid())
    relays.SCHED_GROUP = args.sched_group
    # Room for 10,000 sockets on each side (inherited by mailgate).
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    base = Path(tempfile.mkdtemp(prefix="mailgate-bench-", dir=args.workdir))
    base.chmod(0o755)
    relays.BIN_DIR = base
    report: dict[str, Any] = {"machine": machine_info(args), "args": vars(args)}
    if len(report["machine"]["mailgate"].split()) < 2:
        shutil.rmtree(base, ignore_errors=True)
        ap.error("mailgate is not importable: pip install -e . (or --pythonpath DIR/src)")
    filter_ = start_milter(args.milter, base) if args.milter else None
    if not args.no_snapshot:
        # Pin the code under test: every mailgate of this invocation runs from a copy taken
        # now, even if someone edits the tree meanwhile.
        pkg = Path(report["machine"]["mailgate"].split()[1]).parent
        shutil.copytree(
            pkg, base / "mailgate-src" / "mailgate", ignore=shutil.ignore_patterns("__pycache__")
        )
        args.pythonpath = str(base / "mailgate-src")
        report["machine"]["mailgate"] += f"; snapshot of {pkg} taken at start"
    log(f"bench dir {base}; {report['machine']}")
    started = time.monotonic()
    try:
        if args.cases:
            log("throughput:")
            run_throughput(args, base, report)
        if args.latency:
            log("latency:")
            run_latency(args, base, report)
        extras.run_selected(args, base, report, log)
    finally:
        if filter_ is not None:
            filter_.stop()
        save(report, args)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    report["elapsed_s"] = time.monotonic() - started
    text = markdown(report)
    if args.report:
        Path(args.report).write_text(text)
    save(report, args)
    print()
    print(text)
    log(f"total {report['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
