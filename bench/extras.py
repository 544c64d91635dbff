"""mailgate-only measurements: idle sessions, one huge message, a huge access table, greet pause.

Each starts its own mailgate (and smtp-sink next hop) in a temp dir, bounded in time, on
127.0.0.1 only, and returns a dict for the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import procstat
from relays import HOST, MailgateRelay, SmtpSink
from smtpbench import install_uvloop, make_message, read_reply, send_one

Log = Callable[[str], None]


def rss_kib(pid: int) -> int:
    """The RSS of ``pid``'s process tree (the master and its workers: ``workers = 0`` is one
    per CPU), as `procstat.Sampler` sums its peak: the same measure before and after."""
    return sum(procstat.rss_bytes(p) for p in procstat.tree(pid)) // 1024


class Mailgate:
    """smtp-sink + mailgate with extra settings, as a context manager."""

    def __init__(
        self,
        base: Path,
        name: str,
        args: Any,
        settings: dict[str, dict[str, str]],
        greeting: bool = True,
    ) -> None:
        self.greeting = greeting
        self.work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))
        self.args = args
        self.sink = SmtpSink(self.work)
        self.relay = MailgateRelay(self.work / "relay", self.sink.port, settings, args.pythonpath)

    def __enter__(self) -> Mailgate:
        try:
            self.relay.start(greeting=self.greeting)
        except Exception:
            self.sink.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.relay.stop()
        self.sink.stop()
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)


# -- 10,000 idle sessions ----------------------------------------------------------------------


async def _open_idle(
    port: int,
    count: int,
    parallel: int,
    deadline: float,
) -> tuple[list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], list[str]]:
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    errors: list[str] = []
    sem = asyncio.Semaphore(parallel)

    async def one() -> None:
        async with sem:
            if time.monotonic() > deadline:
                return
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(HOST, port), 30)
                if await asyncio.wait_for(read_reply(r), 30) != 220:
                    raise ConnectionError("no 220")
                w.write(b"EHLO idle.example.net\r\n")
                if await asyncio.wait_for(read_reply(r), 30) != 250:
                    raise ConnectionError("EHLO refused")
                held.append((r, w))
            except (OSError, ConnectionError, TimeoutError) as exc:
                if len(errors) < 20:
                    errors.append(repr(exc))

    await asyncio.gather(*(one() for _ in range(count)))
    return held, errors


async def _idle(port: int, pid: int, count: int) -> dict[str, Any]:
    # Warm the polite path first so the baseline includes what any session loads.
    await send_one(HOST, port, make_message("idle", 0, 1024), 10)
    await asyncio.sleep(0.5)
    base_kib = rss_kib(pid)
    t0 = time.monotonic()
    held, errors = await _open_idle(port, count, 500, time.monotonic() + 180)
    open_s = time.monotonic() - t0
    await asyncio.sleep(1)
    held_kib = rss_kib(pid)
    # A polite client, while all of them are held: a full transaction, relayed to the sink.
    t = time.monotonic()
    polite_error = None
    try:
        await send_one(HOST, port, make_message("idle", 1, 1024), 10)
    except (OSError, ConnectionError, TimeoutError) as exc:
        polite_error = repr(exc)
    polite_s = time.monotonic() - t
    # Are they all still there? NOOP on every one, count the 250s.
    for _r, w in held:
        w.write(b"NOOP\r\n")

    async def noop(r: asyncio.StreamReader) -> bool:
        try:
            return await asyncio.wait_for(read_reply(r), 60) == 250
        except (OSError, ConnectionError, TimeoutError):
            return False

    alive = sum(await asyncio.gather(*(noop(r) for r, _w in held)))
    peak_kib = procstat.status_kib(pid, "VmHWM")
    for _r, w in held:
        w.close()
    return {
        "wanted": count,
        "held": len(held),
        "alive_after_noop": alive,
        "open_errors": errors[:5],
        "open_s": open_s,
        "rss_base_mb": base_kib / 1024,
        "rss_held_mb": held_kib / 1024,
        "rss_per_conn_kib": (held_kib - base_kib) / max(1, len(held)),
        "vmhwm_mb": peak_kib / 1024,
        "polite_s": polite_s,
        "polite_error": polite_error,
    }


def idle(args: Any, base: Path, log: Log) -> dict[str, Any]:
    settings = {
        "smtp": {"max_connections": str(args.idle_count + 2000), "max_connections_per_ip": "0"}
    }
    with Mailgate(base, "idle", args, settings) as mg:
        install_uvloop()
        res = asyncio.run(_idle(mg.relay.port, mg.relay.root, args.idle_count))
    log(
        f"  idle: held {res['held']}/{res['wanted']} (alive {res['alive_after_noop']}), "
        f"{res['rss_per_conn_kib']:.1f} KiB/conn, RSS {res['rss_held_mb']:.0f} MB, "
        f"polite {res['polite_s'] * 1000:.0f} ms"
    )
    return res


# -- one 100 MB message ------------------------------------------------------------------------


def _send_big(port: int, mb: int) -> float:
    """One message of ``mb`` MiB body through a blocking socket; returns seconds to the 250."""
    line = b"Z" * 76 + b"\r\n"
    chunk = line * (2**20 // len(line))
    with socket.create_connection((HOST, port), timeout=120) as s:
        f = s.makefile("rb")

        def reply() -> int:
            while True:
                ln = f.readline()
                if not ln:
                    raise ConnectionError("closed")
                if ln[3:4] != b"-":
                    return int(ln[:3])

        def cmd(text: bytes, want: int) -> None:
            s.sendall(text)
            got = reply()
            if got != want:
                raise ConnectionError(f"{text[:40]!r}: {got}")

        t = time.monotonic()
        if reply() != 220:
            raise ConnectionError("no greeting")
        size = len(chunk) * mb
        cmd(b"EHLO big.example.net\r\n", 250)
        cmd(f"MAIL FROM:<sender@example.org> SIZE={size}\r\n".encode(), 250)
        cmd(b"RCPT TO:<user@bench.example>\r\n", 250)
        cmd(b"DATA\r\n", 354)
        s.sendall(b"Subject: big\r\nMessage-Id: <big@bench.example>\r\n\r\n")
        for _ in range(mb):
            s.sendall(chunk)
        cmd(b".\r\n", 250)
        took = time.monotonic() - t
        with contextlib.suppress(OSError):
            s.sendall(b"QUIT\r\n")
        return took


def bigmsg(args: Any, base: Path, log: Log) -> dict[str, Any]:
    settings = {"smtp": {"max_message_size": '"200M"'}}
    with Mailgate(base, "big", args, settings) as mg:
        pid = mg.relay.root
        asyncio.run(send_one(HOST, mg.relay.port, make_message("big", 0, 1024), 10))
        mg.sink.counter.wait(1, 30, 30)
        time.sleep(0.5)
        base_kib = rss_kib(pid)
        with procstat.Sampler(pid, interval=0.02, pss_every=1000) as sampler:
            accept_s = _send_big(mg.relay.port, args.bigmsg_mb)
            t = time.monotonic()
            delivered = mg.sink.counter.wait(2, 300, 60)
            relay_s = time.monotonic() - t
        res = {
            "mb": args.bigmsg_mb,
            "accept_s": accept_s,
            "delivered": delivered,
            "relay_after_250_s": relay_s,
            "rss_base_mb": base_kib / 1024,
            "rss_peak_mb": sampler.peak_rss / 2**20,
            "growth_mb": sampler.peak_rss / 2**20 - base_kib / 1024,
            "vmhwm_mb": procstat.status_kib(pid, "VmHWM") / 1024,
        }
    log(
        f"  bigmsg: {res['mb']} MiB accepted in {accept_s:.1f}s, delivered={delivered}, "
        f"RSS growth {res['growth_mb']:.1f} MB (peak {res['rss_peak_mb']:.0f} MB)"
    )
    return res


# -- 1,000,000-line access table ---------------------------------------------------------------

ACCESS_PROBE = r"""
import json, os, sys, time
from pathlib import Path
from mailgate.tables.access import AccessTable

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

path, probes_path, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
before = rss()
t = time.perf_counter()
table = AccessTable.load(path)
load_s = time.perf_counter() - t
after = rss()
probes = open(probes_path).read().split()
connect = table.connect
hits = sum(1 for ip in probes if connect(ip, None) is not None)
t = time.perf_counter()
for _ in range(rounds):
    for ip in probes:
        connect(ip, None)
took = time.perf_counter() - t
print(json.dumps({"entries": len(table), "load_s": load_s, "rss_growth_mb": (after - before) / 1024,
                  "lookups": rounds * len(probes), "lookup_s": took,
                  "lookups_per_s": rounds * len(probes) / took, "hit_fraction": hits / len(probes),
                  "warnings": len(table.warnings)}))
"""


def write_access(path: Path, lines: int, rng: random.Random) -> list[str]:
    """``lines`` distinct keys: 40% ``Connect:`` IPs, up to 32,768 untagged IP prefixes, host
    names (``Connect:``) to 60% in all, 20% ``From:`` addresses, 20% ``To:`` domains. The keys
    are strings only: no address in them is ever contacted. Returns 100,000 probe IPs, half
    of them in the table, half covered by nothing."""
    n_ip = lines * 2 // 5
    n_pre = min(lines // 20, 32_768)
    n_host = lines * 3 // 5 - n_ip - n_pre
    n_from = lines // 5
    n_to = lines - n_ip - n_pre - n_host - n_from
    ips = []
    with open(path, "w") as f:
        f.write("# generated by bench/extras.py\n")
        for i in range(n_ip):  # 127.0-99.x.y: full addresses
            ip = f"127.{i // 65536 % 100}.{i // 256 % 256}.{i % 256}"
            ips.append(ip)
            f.write(f"Connect:{ip}\tREJECT\n")
        for i in range(n_pre):  # 127.100-227.x: 3-octet prefixes
            f.write(f"127.{100 + i // 256}.{i % 256}\tRELAY\n")
        for i in range(n_host):
            f.write(f"Connect:host{i}.clients{i % 1000}.example\tOK\n")
        for i in range(n_from):
            f.write(f"From:user{i}@sender{i % 50_000}.example\tREJECT\n")
        for i in range(n_to):
            f.write(f"To:dest{i}.example\tRELAY\n")
    probes = rng.sample(ips, min(50_000, len(ips)))
    probes += [
        f"127.{228 + rng.randrange(28)}.{rng.randrange(256)}.{rng.randrange(256)}"
        for _ in range(100_000 - len(probes))
    ]  # 127.228-255: in no entry
    rng.shuffle(probes)
    return probes


def access(args: Any, base: Path, log: Log) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="access-", dir=base))
    try:
        table = work / "access"
        probes = write_access(table, args.access_lines, random.Random(1))
        (work / "probes").write_text("\n".join(probes))
        mg = MailgateRelay.__new__(MailgateRelay)
        mg.pythonpath = args.pythonpath
        r = subprocess.run(
            [sys.executable, "-c", ACCESS_PROBE, str(table), str(work / "probes"), "10"],
            capture_output=True,
            text=True,
            timeout=600,
            env=mg.env(),
            check=False,
        )
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-2000:])
        res: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
        res["lines"] = args.access_lines
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    log(
        f"  access: {res['entries']} entries loaded in {res['load_s']:.2f}s "
        f"(+{res['rss_growth_mb']:.0f} MB), {res['lookups_per_s'] / 1000:.0f}k lookups/s"
    )
    return res


# -- greet pause 5 s under 200 new connections per second --------------------------------------


async def _greet(port: int, pid: int, rate: int, seconds: float, pause: float) -> dict[str, Any]:
    n = int(rate * seconds)
    delays: list[float] = []
    codes: dict[str, int] = {}
    errors: list[str] = []
    start = time.monotonic() + 0.1

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        t = time.monotonic()
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(HOST, port), 30)
        except (OSError, TimeoutError) as exc:
            errors.append(repr(exc))
            return
        try:
            line = await asyncio.wait_for(r.readline(), pause + 30)
            delays.append(time.monotonic() - t)
            code = line[:3].decode("ascii", "replace") or "closed"
            codes[code] = codes.get(code, 0) + 1
            w.write(b"QUIT\r\n")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(r.readline(), 5)
        except (OSError, TimeoutError) as exc:
            errors.append(repr(exc))
        finally:
            w.close()

    await asyncio.gather(*(one(i) for i in range(n)))
    return {
        "connections": n,
        "greeted_220": codes.get("220", 0),
        "codes": codes,
        "errors": errors[:5],
        "n_errors": len(errors),
        "delay_min_s": min(delays) if delays else None,
        "delay_median_s": statistics.median(delays) if delays else None,
        "delay_max_s": max(delays) if delays else None,
    }


def greet(args: Any, base: Path, log: Log) -> dict[str, Any]:
    pause = 5.0
    settings = {"smtp": {"greet_pause": '"5s"', "max_connections": "20000"}}
    with Mailgate(base, "greet", args, settings, greeting=False) as mg:
        pid = mg.relay.root
        base_kib = rss_kib(pid)
        install_uvloop()
        with procstat.Sampler(pid, interval=0.05, pss_every=1000) as sampler:
            res = asyncio.run(
                _greet(mg.relay.port, pid, args.greet_rate, args.greet_seconds, pause)
            )
        res.update(
            {
                "rate": args.greet_rate,
                "seconds": args.greet_seconds,
                "pause_s": pause,
                "rss_base_mb": base_kib / 1024,
                "rss_peak_mb": sampler.peak_rss / 2**20,
            }
        )
    log(
        f"  greet: {res['greeted_220']}/{res['connections']} got 220 after "
        f"{res['delay_min_s']:.2f}–{res['delay_max_s']:.2f}s, peak RSS {res['rss_peak_mb']:.0f} MB"
    )
    return res


# -- glue --------------------------------------------------------------------------------------


def run_selected(args: Any, base: Path, report: dict[str, Any], log: Log) -> None:
    for flag, name, fn in (
        ("idle", "idle", idle),
        ("bigmsg", "bigmsg", bigmsg),
        ("access", "access", access),
        ("greet", "greet", greet),
    ):
        if getattr(args, flag):
            log(f"{name}:")
            try:
                report[name] = fn(args, base, log)
            except Exception as exc:
                report[name] = {"error": repr(exc)}
                log(f"  {name}: ERROR {exc!r}")


def markdown(report: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if not any(k in report for k in ("idle", "bigmsg", "access", "greet")):
        return out
    out += ["### mailgate alone", "", "| test | result | target |", "|---|---|---|"]
    r = report.get("idle")
    if r:
        out.append(
            "| idle sessions (EHLO, then wait) | "
            + (
                f"error: {r['error'][:150]}"
                if "error" in r
                else f"{r['held']}/{r['wanted']} held, {r['alive_after_noop']} answered NOOP "
                f"after; RSS {r['rss_base_mb']:.0f} → {r['rss_held_mb']:.0f} MB = "
                f"{r['rss_per_conn_kib']:.1f} KiB/connection; opened in {r['open_s']:.1f} s; "
                f"polite client's whole transaction {r['polite_s'] * 1000:.0f} ms"
                + (f" ({r['polite_error']})" if r["polite_error"] else "")
            )
            + " | all held, < 25 KiB each, polite < 1 s |"
        )
    r = report.get("bigmsg")
    if r:
        out.append(
            "| one big message | "
            + (
                f"error: {r['error'][:150]}"
                if "error" in r
                else f"{r['mb']} MiB: 250 after {r['accept_s']:.1f} s, at the sink "
                f"{r['relay_after_250_s']:.1f} s later (delivered: {r['delivered']}); RSS "
                f"{r['rss_base_mb']:.0f} → peak {r['rss_peak_mb']:.0f} MB = growth "
                f"{r['growth_mb']:.1f} MB"
            )
            + " | growth < 32 MB |"
        )
    r = report.get("access")
    if r:
        out.append(
            "| access table | "
            + (
                f"error: {r['error'][:150]}"
                if "error" in r
                else f"{r['lines']:,} lines ({r['entries']:,} entries) loaded in "
                f"{r['load_s']:.2f} s (+{r['rss_growth_mb']:.0f} MB RSS); `.connect(ip, None)`: "
                f"{r['lookups_per_s']:,.0f} lookups/s ({r['hit_fraction']:.0%} hits)"
            )
            + " | load < 3 s, ≥ 500k lookups/s |"
        )
    r = report.get("greet")
    if r:
        out.append(
            "| greet_pause 5 s | "
            + (
                f"error: {r['error'][:150]}"
                if "error" in r
                else f"{r['connections']} connections at {r['rate']}/s: {r['greeted_220']} got 220 "
                f"after {r['delay_min_s']:.2f} / {r['delay_median_s']:.2f} / {r['delay_max_s']:.2f}"
                f" s (min/median/max), {r['n_errors']} errors, replies {r['codes']}; RSS "
                f"{r['rss_base_mb']:.0f} → peak {r['rss_peak_mb']:.0f} MB"
            )
            + " | all greeted after ~5 s |"
        )
    out.append("")
    return out
