"""Draw every panel of contrib/grafana-mailgate.json from a Prometheus's data, as one picture.

From a Prometheus that scrapes a mailgate (the last ``--minutes``):

    pip install matplotlib
    python3 contrib/dashboard_picture.py --prometheus http://127.0.0.1:9090 --out docs/metrics.png

Or from a run of its own, as docs/metrics.png was made (as root; needs Debian's
``prometheus``, Postfix's ``smtp-sink`` and the test dependencies, for the loopback DNS
server of tests/support):

    python3 contrib/dashboard_picture.py --demo 600 --out docs/metrics.png

``--demo SECONDS`` starts, on loopback only: mailgate from this tree (2 workers, STARTTLS with
a throw-away certificate) relaying ``demo.test`` to ``smtp-sink`` and ``dead.test`` to a port
where nothing listens, a private Prometheus scraping it every 5 s, and a client load for
SECONDS (a new connection per transaction from 127.0.0.2, 5 to 45 a second in a slow wave):
mostly mail for the sink (some over STARTTLS), some for the dead hop (queued, retried every
minute), some refused for relaying, the sender's access entry or its size. Everything it
started is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "contrib" / "grafana-mailgate.json"


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[Any]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=30) as r:
        answer = json.loads(r.read())
    if answer["status"] != "success":
        raise RuntimeError(f"{expr}: {answer}")
    result: list[Any] = answer["data"]["result"]
    return result


def legend(template: str, labels: dict[str, str]) -> str:
    for key, value in labels.items():
        template = template.replace("{{" + key + "}}", value)
    return template


_UNITS = {"reqps": "per second", "s": "seconds", "bytes": "bytes"}


_UNITS = {"reqps": "per second", "s": "seconds", "bytes": "bytes"}


def draw(prometheus: str, minutes: float, out: Path, rate_interval: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    end = time.time()
    start = end - minutes * 60
    step = max(1.0, minutes * 60 / 300)
    rows = math.ceil(len(panels) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(14, 2.9 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        unit = panel["fieldConfig"]["defaults"].get("unit", "")
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", rate_interval)
            expr = expr.replace("$instance", ".+")
            for series in query_range(prometheus, expr, start, end, step):
                points = [(float(t), float(v)) for t, v in series["values"]]
                xs = [matplotlib.dates.date2num(_utc(t)) for t, _ in points]
                ys = [v for _, v in points]
                # A series that stayed at 0 is drawn but not named: the legend shows what moved.
                name = legend(target["legendFormat"], series["metric"]) if any(ys) else None
                ax.plot(xs, ys, linewidth=1.2, label=name)
        ax.set_title(panel["title"], fontsize=10, loc="left")
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.set_ylabel(_UNITS.get(unit, ""), fontsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left", ncol=2, framealpha=0.6)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(
        f"mailgate: contrib/grafana-mailgate.json's panels, {minutes:g} minutes of a run "
        f"(UTC, rate windows {rate_interval})",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


def _utc(t: float) -> Any:
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.UTC)


# -- --demo -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start listening on {port}")


def one_transaction(port: int, kind: str, client_tls: ssl.SSLContext) -> None:
    with smtplib.SMTP(
        "127.0.0.1", port, timeout=30, source_address=("127.0.0.2", 0), local_hostname="demo"
    ) as s:
        body = b"Subject: demo\r\n\r\nhello\r\n"
        if kind == "tls":
            s.starttls(context=client_tls)
        with contextlib.suppress(smtplib.SMTPException):
            if kind == "dead":
                s.sendmail("alice@example.org", ["carol@dead.test"], body)
            elif kind == "relay":
                s.sendmail("alice@example.org", ["eve@foreign.test"], body)
            elif kind == "access":
                s.sendmail("spammer@bad.test", ["bob@demo.test"], body)
            elif kind == "big":
                s.sendmail("alice@example.org", ["bob@demo.test"], body + b"x" * 30000)
            else:
                s.sendmail("alice@example.org", ["bob@demo.test"], body)


CLIENTS = 30  # transactions at once, at most (the per-IP limit, 20, refuses some at the peaks)


def load(port: int, seconds: float, client_tls: ssl.SSLContext) -> None:
    kinds = ["good"] * 14 + ["tls"] * 3 + ["dead", "relay", "relay", "access", "big"]
    started = time.monotonic()
    busy = threading.BoundedSemaphore(CLIENTS)

    def one(kind: str) -> None:
        try:
            one_transaction(port, kind, client_tls)
        except (OSError, smtplib.SMTPException):
            pass
        finally:
            busy.release()

    due = started
    while (now := time.monotonic()) - started < seconds:
        rate = 25 + 20 * math.sin(2 * math.pi * (now - started) / 300)
        due += 1 / rate
        if due > now:
            time.sleep(due - now)
        busy.acquire()
        threading.Thread(target=one, args=(random.choice(kinds),), daemon=True).start()
    for _ in range(CLIENTS):
        busy.acquire()


def demo(seconds: float, out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    import trustme
    from tests.support.dnsserver import DnsServer

    work = Path(tempfile.mkdtemp(prefix="mailgate-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    smtp, metrics, sink, dead, prom = (free_port() for _ in range(5))
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(work / "ca.pem"))
    cert = ca.issue_cert("gateway.example.com", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(work / "cert.pem"))
    (work / "mailertable").write_text(
        f"demo.test smtp:[127.0.0.1]:{sink}\ndead.test smtp:[127.0.0.1]:{dead}\n"
    )
    (work / "access").write_text("To:demo.test RELAY\nTo:dead.test RELAY\nFrom:bad.test REJECT\n")
    try:
        with DnsServer() as dns:
            (work / "mailgate.toml").write_text(
                f'hostname = "gateway.example.com"\nlisten = ["127.0.0.1:{smtp}"]\n'
                'spool_dir = "spool"\nworkers = 2\n'
                '[smtp]\ngreet_pause = "0s"\ncheck_sender_domain = false\n'
                'max_message_size = "20K"\nconnection_rate_throttle = 0\n'
                '[queue]\nretry_min = "1m"\nrun_interval = "1m"\n'
                f'[dns]\nnameservers = ["{dns.address}"]\n'
                '[tls]\ncert_file = "cert.pem"\nkey_file = "cert.pem"\n'
                '[log]\nfile = "maillog"\n'
                f'[metrics]\nlisten = "127.0.0.1:{metrics}"\n'
            )
            (work / "prometheus.yml").write_text(
                "global:\n  scrape_interval: 5s\nscrape_configs:\n  - job_name: mailgate\n"
                f"    static_configs:\n      - targets: ['127.0.0.1:{metrics}']\n"
            )
            log = open(work / "processes.log", "ab")  # noqa: SIM115 - closed below
            sink_bin = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
            procs.append(
                subprocess.Popen(
                    [sink_bin, "-u", "root", "-m", "200", f"127.0.0.1:{sink}", "256"],
                    stdout=log,
                    stderr=log,
                )
            )
            env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "mailgate.cli", "serve", "-c", "mailgate.toml"],
                    cwd=work,
                    env=env,
                    stdout=log,
                    stderr=log,
                )
            )
            procs.append(
                subprocess.Popen(
                    [
                        "prometheus",
                        f"--config.file={work / 'prometheus.yml'}",
                        f"--storage.tsdb.path={work / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{prom}",
                    ],
                    stdout=log,
                    stderr=log,
                )
            )
            wait_port(smtp, "mailgate")
            wait_port(prom, "prometheus")
            client_tls = ssl.create_default_context(cafile=str(work / "ca.pem"))
            print(f"load for {seconds:g} s; work folder {work}", flush=True)
            load(smtp, seconds, client_tls)
            time.sleep(15)  # the last scrapes
            draw(f"http://127.0.0.1:{prom}", seconds / 60 + 0.25, out, "1m")
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--prometheus", help="its URL, e.g. http://127.0.0.1:9090")
    where.add_argument("--demo", type=float, metavar="SECONDS", help="a run of its own")
    ap.add_argument("--minutes", type=float, default=10, help="with --prometheus: how far back")
    ap.add_argument("--rate-interval", default="1m", help="what $__rate_interval becomes")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.demo:
        demo(args.demo, args.out)
    else:
        draw(args.prometheus.rstrip("/"), args.minutes, args.out, args.rate_interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
