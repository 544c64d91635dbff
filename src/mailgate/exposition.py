"""The /metrics text: the metrics table and the gauges as prometheus_client's metric
families, written by its ``generate_latest`` (escaping and number formatting are the
library's). Imported by ``monitor.py`` at the first scrape."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from mailgate import metrics
from mailgate.monitor import Gauges

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _Collector:
    """The table and the gauges as prometheus_client's metric families."""

    def __init__(self, table: metrics.Table, gauges: Gauges, now: float) -> None:
        self.table = table
        self.gauges = gauges
        self.now = now

    def collect(self) -> Iterator[Metric]:
        table = self.table
        for family in metrics.FAMILIES:
            if family.kind == "histogram":
                yield self._histogram(family)
                continue
            counter = CounterMetricFamily(family.name, family.help, labels=family.labels)
            for i, values in enumerate(family.values):
                counter.add_metric(values, table.value(family.base + i))
            yield counter
        hops = CounterMetricFamily(
            "mailgate_next_hop_failures",
            "Failed deliveries (recipients of maillog to= lines) to SMTP next hops,"
            " by next hop and status",
            labels=("next_hop", "status"),
        )
        for (hop, status), n in sorted(table.hop_failures().items()):
            hops.add_metric((hop, status), n)
        yield hops
        yield from self._milters()
        yield from self._gauges()

    def _milters(self) -> Iterator[Metric]:
        names = self.table.named(metrics.MILTERS)
        verdicts = CounterMetricFamily(
            "mailgate_milter_verdicts",
            "Filters' answers ([[milter]]), by filter, stage and verdict (failed: the filter"
            " failed there and its default_action applied)",
            labels=("milter", "stage", "verdict"),
        )
        failures = CounterMetricFamily(
            "mailgate_milter_failures",
            "Filters that failed ([[milter]]), by filter and reason",
            labels=("milter", "reason"),
        )
        for name, counts in names.items():
            for (kind, *values), n in zip(metrics.MILTERS.counts, counts, strict=True):
                family = verdicts if kind == "verdict" else failures
                family.add_metric((name, *values), n)
        yield verdicts
        yield failures

    def _histogram(self, family: metrics.Family) -> Metric:
        table = self.table
        buckets, total = [], 0
        bounds = [*family.buckets, float("inf")]
        for i, bound in enumerate(bounds):
            total += table.value(family.base + i)
            buckets.append((_le(bound), float(total)))
        histogram = HistogramMetricFamily(family.name, family.help)
        histogram.add_metric(
            [], buckets, sum_value=table.value(family.base + len(bounds)) / 1_000_000
        )
        return histogram

    def _gauges(self) -> Iterator[Metric]:
        g, table = self.gauges, self.table
        running = sum(1 for r in range(table.rows) if table.value(metrics.PID, r))
        oldest = 0.0 if g.queue_oldest is None else max(0.0, self.now - g.queue_oldest)
        for name, help, value in (
            ("mailgate_sessions_open", "SMTP sessions open now", g.sessions_open),
            ("mailgate_queue_messages", "Messages in the queue", g.queue_messages),
            (
                "mailgate_queue_oldest_age_seconds",
                "Age of the oldest queued message (0 when the queue is empty)",
                oldest,
            ),
            (
                "mailgate_spool_free_bytes",
                "Free space in the spool's file system",
                g.spool_free_bytes,
            ),
            ("mailgate_stress_mode", "1 while stress mode is on", int(g.stress)),
            ("mailgate_workers", "Worker processes configured", table.rows),
            ("mailgate_workers_running", "Worker processes running", running),
        ):
            yield GaugeMetricFamily(name, help, value=value)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def text(table: metrics.Table, gauges: Gauges) -> bytes:
    """The whole /metrics answer."""
    return generate_latest(_Collector(table, gauges, time.time()))
