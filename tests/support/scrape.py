"""Reading a gateway's ``[metrics] listen`` endpoint as Prometheus would, and a mixed load
that gives every metric something to count."""

from __future__ import annotations

import http.client
import smtplib

from prometheus_client.parser import text_string_to_metric_families

from tests.support.world import HOP1, World

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def http_get(host: str, port: int, path: str, timeout: float = 10) -> tuple[int, str, str]:
    """(status, content type, body) of ``GET path``."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read().decode()
    finally:
        conn.close()


def scrape(host: str, port: int) -> Samples:
    """Every sample of ``/metrics``, parsed by prometheus_client's parser: (name, labels) →
    value."""
    status, _ctype, body = http_get(host, port, "/metrics")
    assert status == 200, body
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


# The mixed load's parts: addresses the gateway of tests/test_metrics.py routes or refuses.
GOOD_RCPT = "bob@targetdomain1.com"  # relayed to the sink
DEAD_RCPT = "carol@dead.test"  # relayed to a hop where nothing listens: deferred
FOREIGN_RCPT = "eve@foreign.test"  # not relayed for an outside client: 550 relaying denied
BAD_SENDER = "spammer@bad.test"  # access From: REJECT
BIG_BODY = "x" * 70 + "\r\n"  # lines of a message over the test's max_message_size

DEAD_HOP = "127.0.0.8"  # nothing listens there


def mixed_world(*, hop_port: int, dead_port: int, metrics_port: int, workers: int) -> World:
    """A gateway that routes ``send_mix``'s mail: targetdomain1.com to the sink (at HOP1, the
    ``hop1`` fixture's address), dead.test to a dead hop (retried only after an hour),
    ``[metrics] listen`` on ``metrics_port``; a client of world.OUTSIDE may not relay."""
    return World(
        tables={
            "mailertable": (
                f"targetdomain1.com smtp:[{HOP1}]:{hop_port}\n"
                f"dead.test smtp:[{DEAD_HOP}]:{dead_port}\n"
            ),
            "access": "To:targetdomain1.com RELAY\nTo:dead.test RELAY\nFrom:bad.test REJECT\n",
        },
        settings=(
            f"workers = {workers}\n"
            '[smtp]\ngreet_pause = "0s"\ncheck_sender_domain = false\n'
            'max_message_size = "10K"\nconnection_rate_throttle = 0\n'
            '[queue]\nretry_min = "1h"\n'
            f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
        ),
    )


def send_mix(
    host: str, port: int, source: str, *, good: int, dead: int, relay: int, access: int, big: int
) -> None:
    """One connection per transaction from ``source``: ``good`` messages to the sink,
    ``dead`` to the dead hop, ``relay`` refused at RCPT, ``access`` refused at MAIL, ``big``
    refused for their SIZE=."""

    def session() -> smtplib.SMTP:
        return smtplib.SMTP(
            host, port, timeout=30, source_address=(source, 0), local_hostname="client.test"
        )

    body = b"Subject: load\r\n\r\nbody\r\n"
    for rcpt, n in ((GOOD_RCPT, good), (DEAD_RCPT, dead)):
        for _ in range(n):
            with session() as s:
                s.sendmail("alice@example.org", [rcpt], body)
    for _ in range(relay):
        with session() as s:
            try:
                s.sendmail("alice@example.org", [FOREIGN_RCPT], body)
            except smtplib.SMTPRecipientsRefused as exc:
                assert exc.recipients[FOREIGN_RCPT][0] == 550
            else:
                raise AssertionError("relayed to foreign.test")
    for _ in range(access):
        with session() as s:
            try:
                s.sendmail(BAD_SENDER, [GOOD_RCPT], body)
            except smtplib.SMTPSenderRefused as exc:
                assert exc.smtp_code == 550
            else:
                raise AssertionError("access From: REJECT let the sender through")
    big_body = b"Subject: big\r\n\r\n" + BIG_BODY.encode() * 200
    for _ in range(big):
        with session() as s:
            try:
                s.sendmail("alice@example.org", [GOOD_RCPT], big_body)
            except smtplib.SMTPSenderRefused as exc:
                assert exc.smtp_code == 552
            else:
                raise AssertionError("a message over max_message_size was taken")
