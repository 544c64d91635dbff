"""Reload under load: clients send without a pause while the mailertable changes under the
daemon and ``mailgate reload`` runs, once with a broken line (refused, file:line, nothing
changes) and once with a new route. Nothing is refused, nothing is lost (every message is
counted at the two next hops), mail sent after the reload goes to the new hop, and
``mailgate route`` shows the new route.

Two clients: one keeps a single session open across the reloads (a session in progress goes
on under the snapshot it started with), the other connects for each message. Both are bounded
in count, and the test waits with ``wait_until`` only.
"""

from __future__ import annotations

import re
import smtplib
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.gateway import GatewayProcess, free_port, run_cli
from tests.support.sink import SinkServer
from tests.support.wait import wait_until

HOP_A = "127.0.0.5"
HOP_B = "127.0.0.6"
CLIENT = "127.0.0.2"
MAX_PER_CLIENT = 2000  # a hang guard: the test needs a few dozen each
BATCH = 15  # messages each phase waits for


@dataclass
class Sent:
    """What a client sent: each message's number, and whether the reload had returned when
    its transaction began."""

    after_reload: dict[int, bool] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    serial: int = 0

    def next_number(self) -> int:
        with self.lock:
            self.serial += 1
            return self.serial

    def count(self, *, after: bool | None = None) -> int:
        with self.lock:
            return sum(1 for a in self.after_reload.values() if after is None or a == after)


class Client(threading.Thread):
    def __init__(
        self, gw: GatewayProcess, sent: Sent, reloaded: threading.Event, *, persistent: bool
    ) -> None:
        super().__init__(daemon=True)
        self.gw, self.sent, self.reloaded, self.persistent = gw, sent, reloaded, persistent
        self.stop = threading.Event()

    def run(self) -> None:
        session: smtplib.SMTP | None = None
        for _ in range(MAX_PER_CLIENT):
            if self.stop.is_set():
                break
            n = self.sent.next_number()
            after = self.reloaded.is_set()
            body = f"Subject: load {n}\r\nMessage-ID: <load-{n}@example.org>\r\n\r\n{n}\r\n"
            try:
                if session is None:
                    session = self.gw.smtp(CLIENT)
                session.sendmail("alice@example.org", ["bob@targetdomain1.com"], body.encode())
            except (smtplib.SMTPException, OSError) as exc:
                self.sent.failures.append(f"message {n}: {exc!r}")
                session = None
                continue
            with self.sent.lock:
                self.sent.after_reload[n] = after
            if not self.persistent:
                session.quit()
                session = None
        if session is not None:
            session.quit()


def number_of(data: bytes) -> int:
    m = re.search(rb"\r\nSubject: load (\d+)\r\n", data)
    assert m, data[:300]
    return int(m.group(1))


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_under_load_refuses_nothing_loses_nothing_and_reroutes(
    tmp_path: Path, workers: int
) -> None:
    port_a, port_b = free_port(HOP_A), free_port(HOP_B)
    with SinkServer(HOP_A, port_a) as hop_a, SinkServer(HOP_B, port_b) as hop_b:
        gw = GatewayProcess(
            tmp_path / "gw",
            dns=None,
            tables={
                "mailertable": f"targetdomain1.com smtp:[{HOP_A}]:{port_a}\n",
                "access": "To:targetdomain1.com RELAY\n",
            },
            settings=(
                f"workers = {workers}\n"
                '[smtp]\ngreet_pause = "0s"\ncheck_sender_domain = false\n'
                "max_connections_per_ip = 0\nconnection_rate_throttle = 0\n"
            ),
        )
        mailertable = gw.dir / "mailertable"
        sent, reloaded = Sent(), threading.Event()
        with gw:
            wait_until(lambda: (gw.spool / "mailgate.pid").exists(), "the daemon to be ready")
            clients = [Client(gw, sent, reloaded, persistent=p) for p in (True, False)]
            for c in clients:
                c.start()
            try:
                wait_until(lambda: sent.count() >= BATCH, "mail before the reloads", 60)

                # A broken line: refused with its file and line, the old routes stay.
                mailertable.write_text(f"targetdomain1.com smtp:[{HOP_B}]:{port_b}\nbroken\n")
                refused = run_cli("reload", "-c", str(gw.config))
                assert refused.returncode == 1
                assert f"error: {mailertable}:2: " in refused.stderr
                mark = sent.count()
                wait_until(lambda: sent.count() >= mark + BATCH, "mail after the refusal", 60)

                mailertable.write_text(f"targetdomain1.com smtp:[{HOP_B}]:{port_b}\n")
                done = run_cli("reload", "-c", str(gw.config))
                assert done.returncode == 0, done.stderr
                reloaded.set()  # the daemon has answered: every worker runs the new tables
                route = run_cli("route", "-c", str(gw.config), "bob@targetdomain1.com")
                assert f"mailer smtp, host [{HOP_B}]:{port_b}, user bob@targetdomain1.com" in (
                    route.stdout
                )
                wait_until(lambda: sent.count(after=True) >= BATCH, "mail after the reload", 60)
            finally:
                for c in clients:
                    c.stop.set()
                for c in clients:
                    c.join(60)
            assert sent.failures == []
            total = sent.count()
            wait_until(
                lambda: len(hop_a.messages) + len(hop_b.messages) >= total, "every delivery", 60
            )
            # the sink has the last message a moment before the gateway removes it
            wait_until(lambda: gw.queued() == [], "an empty queue", 30)
        at_a = [number_of(m.data) for m in hop_a.messages]
        at_b = [number_of(m.data) for m in hop_b.messages]
        assert sorted(at_a + at_b) == sorted(sent.after_reload)  # each once, none lost
        after = {n for n, a in sent.after_reload.items() if a}
        assert after and after <= set(at_b)
        before_only = set(sent.after_reload) - after
        # Until the reload, the old route: everything sent before the refused reload and
        # between the two went to hop A, unless its first attempt came after the reload.
        assert set(at_a) <= before_only and len(at_a) >= BATCH
        log = gw.log()
        assert log.count("configuration reloaded") == 1  # the master's line for all of them
        assert f"reload refused, keeping the running configuration: {mailertable}:2:" not in log
