"""A real Prometheus (Debian's) scrapes the gateway every second under a bounded load, and
every query of every panel of contrib/grafana-mailgate.json gives data through its HTTP API."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.support.gateway import free_port
from tests.support.scrape import DEAD_HOP, mixed_world, send_mix
from tests.support.sink import SinkServer
from tests.support.world import OUTSIDE, GatewayFactory, wait_until

PROMETHEUS = shutil.which("prometheus")
DASHBOARD = Path(__file__).parent.parent / "contrib" / "grafana-mailgate.json"

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus is missing")


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, expr) for every target, with Grafana's variables as a dashboard with
    every instance selected would send them."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$instance", ".+")
            out.append((panel["title"], expr))
    return out


class Prometheus:
    """``prometheus`` on loopback with a temp config and storage; stopped by pid."""

    def __init__(self, directory: Path, target: str) -> None:
        directory.mkdir(parents=True)
        self.port = free_port()
        config = directory / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: mailgate\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        assert PROMETHEUS is not None
        self.log = open(directory / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=self.log,
        )

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read()
        except OSError:
            return 0, b""

    def query(self, expr: str) -> list[dict[str, object]]:
        status, body = self.get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert status == 200, body
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        result: list[dict[str, object]] = answer["data"]["result"]
        return result

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def has_data(result: list[dict[str, object]]) -> bool:
    """A vector with at least one number (a quantile of no deliveries would be NaN)."""
    for series in result:
        value = series["value"]
        assert isinstance(value, list)
        if not math.isnan(float(value[1])):
            return True
    return False


def scraped_received(prometheus: Prometheus) -> float:
    result = prometheus.query("sum(mailgate_messages_received_total)")
    return float(result[0]["value"][1]) if result else 0.0  # type: ignore[index]


def test_every_panel_of_the_dashboard_has_data(
    tmp_path: Path, make_gateway: GatewayFactory, hop1: SinkServer
) -> None:
    queries = panel_queries()
    assert len(queries) >= 14
    port = free_port()
    gw = make_gateway(
        mixed_world(hop_port=hop1.port, dead_port=free_port(DEAD_HOP), metrics_port=port, workers=2)
    )
    prometheus = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{port}")
    try:
        wait_until(lambda: prometheus.get("/-/ready")[0] == 200, "Prometheus ready", 60)
        missing: list[tuple[str, str]] = queries
        # A bounded load: rounds of the mixed traffic until every query has data (each
        # round spans scrapes; rate() needs two samples of a change), at most 40 rounds.
        for received in range(6, 6 * 41, 6):  # 5 good and 1 dead message a round
            send_mix(gw.host, gw.port, OUTSIDE, good=5, dead=1, relay=2, access=1, big=1)
            wait_until(
                lambda n=received: scraped_received(prometheus) >= n,
                "a scrape after the round",
                15,
            )
            missing = [(t, e) for t, e in missing if not has_data(prometheus.query(e))]
            if not missing:
                break
        assert missing == []
        up = prometheus.query('up{job="mailgate"}')
        assert [s["value"][1] for s in up] == ["1"]  # type: ignore[index]
    finally:
        prometheus.stop()
