"""``[metrics] listen``: the real daemon's /metrics counts for the whole daemon, with one
worker and with two, and /health answers 503 with the reason when the spool is not fine."""

from __future__ import annotations

import calendar
import contextlib
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from mailgate import metrics
from mailgate.delivery.mailers import MAILERS
from mailgate.queue.spool import Spool, qid_time
from mailgate.service import DRAIN_SIGNAL
from tests.support.crash import children_of
from tests.support.gateway import GatewayProcess, free_port
from tests.support.scrape import DEAD_HOP, http_get, mixed_world, scrape, send_mix, value
from tests.support.sink import SinkServer
from tests.support.world import OUTSIDE, GatewayFactory, World, wait_until

# One batch of send_mix: messages to the sink, to the dead hop, refused for relay, access, size.
BATCH = {"good": 3, "dead": 2, "relay": 3, "access": 2, "big": 1}


def healthy(port: int) -> bool:
    try:
        return http_get("127.0.0.1", port, "/health")[0] == 200
    except OSError:  # worker 0 is starting: the master holds the socket, nobody answers yet
        return False


@pytest.mark.parametrize("workers", [1, 2])
def test_counts_are_the_whole_daemons(
    make_gateway: GatewayFactory, hop1: SinkServer, workers: int
) -> None:
    dead_port = free_port(DEAD_HOP)
    port = free_port()
    started = time.time()
    world = mixed_world(hop_port=hop1.port, dead_port=dead_port, metrics_port=port, workers=workers)
    gw = make_gateway(world)
    assert gw.proc is not None
    wait_until(lambda: healthy(port), "every worker listening", 15)
    # With two workers, each batch goes to one of them alone (the other is stopped, so
    # it cannot accept): both rows are written, whoever answers the scrape.
    pids = children_of(gw.proc.pid) if workers > 1 else [gw.proc.pid]
    assert len(pids) == workers
    for batch in range(2):
        stopped = pids[batch] if workers > 1 else None
        if stopped is not None:
            os.kill(stopped, signal.SIGSTOP)
        try:
            send_mix(gw.host, gw.port, OUTSIDE, **BATCH)
        finally:
            if stopped is not None:
                os.kill(stopped, signal.SIGCONT)
    # A to= line is written after its count: once the log has them all, so do the counts.
    wait_until(lambda: gw.log().count("stat=Sent") == 2 * BATCH["good"], "deliveries", 20)
    wait_until(lambda: gw.log().count("stat=Deferred") == 2 * BATCH["dead"], "the deferrals", 20)
    if workers > 1:
        receivers = {
            line.split("mailgate[")[1].split("]")[0]
            for line in gw.log().splitlines()
            if "from=<alice@example.org>" in line
        }
        assert receivers == {str(pid) for pid in pids}
    sessions_closed = wait_until(
        lambda: (
            (s := scrape("127.0.0.1", port))[("mailgate_sessions_open", frozenset())] == 0 and s
        ),
        "every session closed",
        10,
    )
    queue_listed = wait_until(
        lambda: (
            (s := scrape("127.0.0.1", port))[("mailgate_queue_messages", frozenset())]
            == 2 * BATCH["dead"]
            and s
        ),
        "the queue census",
        10,
    )
    elapsed = time.time() - started
    s = sessions_closed
    # One session per transaction (GatewayProcess.start waits on the state file, not a
    # connection).
    sessions = 2 * sum(BATCH.values())
    assert value(s, "mailgate_connections_total", outcome="greeted") == sessions
    for outcome in metrics.CONNECTION_OUTCOMES[1:]:
        assert value(s, "mailgate_connections_total", outcome=outcome) == 0
    assert value(s, "mailgate_messages_received_total") == 2 * (BATCH["good"] + BATCH["dead"])
    refused = {"relay": BATCH["relay"], "access": BATCH["access"], "size": BATCH["big"]}
    for reason in metrics.REJECT_REASONS:
        assert value(s, "mailgate_rejections_total", reason=reason) == 2 * refused.get(reason, 0)
    for status, n in (("delivered", BATCH["good"]), ("deferred", BATCH["dead"]), ("bounced", 0)):
        assert value(s, "mailgate_deliveries_total", mailer="smtp", status=status) == 2 * n
    assert value(s, "mailgate_delivery_latency_seconds_count") == 2 * BATCH["good"]
    assert value(s, "mailgate_delivery_latency_seconds_bucket", le="+Inf") == 2 * BATCH["good"]
    assert value(s, "mailgate_delivery_latency_seconds_sum") > 0
    failures = {
        (dict(labels)["next_hop"], dict(labels)["status"]): n
        for (name, labels), n in s.items()
        if name == "mailgate_next_hop_failures_total"
    }
    dead_hop = f"[{DEAD_HOP}]:{dead_port}"
    assert failures == {(dead_hop, "deferred"): 2 * BATCH["dead"], (dead_hop, "bounced"): 0}
    assert value(s, "mailgate_workers") == workers
    assert value(s, "mailgate_workers_running") == workers
    q = queue_listed
    assert value(q, "mailgate_queue_messages") == 2 * BATCH["dead"]
    assert 0 <= value(q, "mailgate_queue_oldest_age_seconds") <= elapsed + 1


def metrics_gateway(
    make_gateway: GatewayFactory, hop1: SinkServer, workers: int, settings: str = ""
) -> tuple[GatewayProcess, int]:
    """The mixed world's daemon, started (``settings`` merged into its own), and its metrics
    port."""
    port = free_port()
    world = mixed_world(
        hop_port=hop1.port, dead_port=free_port(DEAD_HOP), metrics_port=port, workers=workers
    )
    return make_gateway(world.but(settings=settings)), port


def test_a_restarted_worker_counts_on_from_its_predecessor(
    make_gateway: GatewayFactory, hop1: SinkServer
) -> None:
    gw, port = metrics_gateway(make_gateway, hop1, workers=2)
    assert gw.proc is not None
    wait_until(lambda: healthy(port), "every worker listening", 15)
    first, second = children_of(gw.proc.pid)
    os.kill(first, signal.SIGSTOP)
    try:
        send_mix(gw.host, gw.port, OUTSIDE, good=4, dead=0, relay=0, access=0, big=0)
    finally:
        os.kill(first, signal.SIGCONT)
    wait_until(lambda: gw.log().count("stat=Sent") == 4, "the deliveries", 20)
    # `second` took all four; it dies, and the master starts another in its row.
    os.kill(second, signal.SIGKILL)
    wait_until(
        lambda: second not in (now := children_of(gw.proc.pid)) and len(now) == 2,
        "the worker restarted",
        15,
    )
    wait_until(lambda: healthy(port), "the new worker listening", 15)
    s = scrape("127.0.0.1", port)
    assert value(s, "mailgate_messages_received_total") == 4
    assert value(s, "mailgate_deliveries_total", mailer="smtp", status="delivered") == 4
    assert value(s, "mailgate_workers_running") == 2
    # The state file's count is the table's: the dead worker's four are still in it.
    gw.signal(signal.SIGUSR2)
    state = gw.spool / "mailgate.state.json"
    wait_until(
        lambda: json.loads(state.read_text())["activity"]["received"] == 4,
        "the state file's received count",
        15,
    )


def test_health_says_what_is_wrong(make_gateway: GatewayFactory, hop1: SinkServer) -> None:
    gw, port = metrics_gateway(make_gateway, hop1, workers=1)
    wait_until(lambda: healthy(port), "the daemon listening", 15)
    assert http_get("127.0.0.1", port, "/health") == (200, "text/plain", "ok\n")
    config = gw.config.read_text()
    gw.config.write_text(config.replace("[queue]\n", '[queue]\nmin_free = "1000000G"\n'))
    gw.signal(signal.SIGHUP)
    status, _, body = wait_until(
        lambda: (r := http_get("127.0.0.1", port, "/health"))[0] == 503 and r,
        "503 for min_free",
        10,
    )
    assert "bytes free, below min_free (1073741824000000)" in body
    gw.config.write_text(config)
    gw.signal(signal.SIGHUP)
    wait_until(lambda: healthy(port), "200 again", 10)
    # The spool cannot take a file: incoming/ is not a folder.
    incoming = gw.spool / "incoming"
    incoming.rename(gw.spool / "incoming.aside")
    incoming.write_text("")
    status, _, body = http_get("127.0.0.1", port, "/health")
    assert status == 503
    assert body == f"spool {incoming} is not writable: Not a directory\n"
    incoming.unlink()
    (gw.spool / "incoming.aside").rename(incoming)
    assert http_get("127.0.0.1", port, "/health") == (200, "text/plain", "ok\n")
    assert http_get("127.0.0.1", port, "/nothing")[0] == 404


def test_health_is_503_while_the_node_drains(
    make_gateway: GatewayFactory, hop1: SinkServer
) -> None:
    """New sessions get 421 during a drain: a readiness check must say so too (the listeners
    are still open, so "not listening" does not)."""
    gw, port = metrics_gateway(make_gateway, hop1, workers=1)
    wait_until(lambda: healthy(port), "the daemon listening", 15)
    send_mix(gw.host, gw.port, OUTSIDE, good=0, dead=1, relay=0, access=0, big=0)
    wait_until(gw.queued, "the message for the dead hop queued")  # holds the drain open
    gw.signal(DRAIN_SIGNAL)
    gw.wait_log("draining (mailgate drain)")
    assert http_get("127.0.0.1", port, "/health") == (
        503,
        "text/plain",
        "the daemon is draining (mailgate drain)\n",
    )
    with gw.raw(OUTSIDE) as late:
        assert late.read_reply().code == 421


def test_the_connection_counts_a_per_ip_refusal(
    make_gateway: GatewayFactory, hop1: SinkServer
) -> None:
    gw, port = metrics_gateway(
        make_gateway, hop1, workers=1, settings="[smtp]\nmax_connections_per_ip = 1\n"
    )
    with gw.raw(OUTSIDE) as held:
        assert held.read_reply().code == 220
        with gw.raw(OUTSIDE) as refused:
            reply = refused.read_reply()
            assert (reply.code, reply.enhanced) == (421, "4.3.2")
            refused.wait_closed()
        s = scrape("127.0.0.1", port)
    assert value(s, "mailgate_connections_total", outcome="per_ip_limit") == 1
    assert value(s, "mailgate_rejections_total", reason="throttle") == 1
    # The held session (GatewayProcess.start waits on the state file, not a connection).
    assert value(s, "mailgate_connections_total", outcome="greeted") == 1
    seen = len(gw.log_lines("statistics: "))
    gw.signal(signal.SIGUSR2)
    [line] = wait_until(lambda: gw.log_lines("statistics: ")[seen:], "the statistics line", 10)
    assert "statistics: connections=2, " in line
    assert ", per_ip_limit=1, " in line


def test_a_connection_the_stop_finds_in_its_greet_pause_is_counted(
    make_gateway: GatewayFactory, hop1: SinkServer
) -> None:
    port = free_port()
    world = mixed_world(
        hop_port=hop1.port, dead_port=free_port(DEAD_HOP), metrics_port=port, workers=1
    )
    # No greet pause for the local host: the busy client's message holds the stop open.
    busy_client = "127.0.0.1"
    gw = make_gateway(
        world.but(
            tables={"access": world.tables["access"] + f"GreetPause:{busy_client}  0\n"},
            settings='stop_grace = "60s"\n[smtp]\ngreet_pause = "30s"\n',
        )
    )
    assert gw.proc is not None
    with gw.raw(busy_client) as busy, gw.raw(OUTSIDE) as paused:
        assert busy.read_reply().code == 220
        for line, code in (
            ("EHLO client.test", 250),
            ("MAIL FROM:<alice@example.org>", 250),
            ("RCPT TO:<bob@targetdomain1.com>", 250),
            ("DATA", 354),
        ):
            assert busy.cmd(line).code == code
        busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
        wait_until(
            lambda: value(scrape("127.0.0.1", port), "mailgate_sessions_open") == 2,
            "both sessions open",
            10,
        )
        gw.signal(signal.SIGTERM)
        bye = paused.read_reply()  # in its greet pause: the stop's 421, no greeting
        assert (bye.code, bye.text) == (421, "4.3.2 gateway.example.com Shutting down")
        paused.wait_closed()
        # The message under way holds the stop: the endpoint answers through the drain.
        s = scrape("127.0.0.1", port)
        assert value(s, "mailgate_connections_total", outcome="stopping") == 1
        assert http_get("127.0.0.1", port, "/health") == (
            503,
            "text/plain",
            "the daemon is not listening\n",
        )
        busy.send(b"second half\r\n.\r\n")
        assert busy.read_reply().code == 250
        assert busy.read_reply().code == 421
    assert gw.proc.wait(30) == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_metrics_port_in_use_stops_the_start(make_gateway: GatewayFactory, workers: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        world = mixed_world(hop_port=1, dead_port=1, metrics_port=port, workers=workers)
        gw = make_gateway(world, start=False)
        with pytest.raises(RuntimeError) as failed:
            gw.start()
    assert (
        f"cannot start: [Errno 98] [metrics] listen 127.0.0.1:{port}: Address already in use"
        in str(failed.value)
    )


def test_metrics_are_off_unless_asked_for(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(World())
    assert gw.proc is not None
    assert listening_ports(gw.proc.pid) == {gw.port}


def listening_ports(pid: int) -> set[int]:
    """The TCP ports ``pid`` listens on (its descriptors against /proc/net/tcp)."""
    ports = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A":  # LISTEN
            ports[fields[9]] = int(fields[1].split(":")[1], 16)
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:[") and target[8:-1] in ports:
                found.add(ports[target[8:-1]])
    return found


def test_rows_written_by_two_processes_are_summed() -> None:
    table = metrics.Table(2)
    pids = []
    for index in range(2):
        pid = os.fork()
        if pid == 0:
            row = table.row(index)
            for _ in range(1000 * (index + 1)):
                row.inc(metrics.MESSAGES_RECEIVED)
            row.delivery("esmtp", "temp", 1.0, f"hop{index}.test")
            row.delivery("esmtp", "perm", 1.0, "shared.test")
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    assert table.value(metrics.MESSAGES_RECEIVED) == 3000
    assert table.value(metrics.MESSAGES_RECEIVED, 1) == 2000
    assert table.value(metrics.DELIVERIES.slot("esmtp", "deferred")) == 2
    assert nonzero(table.hop_failures()) == {
        ("hop0.test", "deferred"): 1,
        ("hop1.test", "deferred"): 1,
        ("shared.test", "bounced"): 2,
    }


def nonzero(failures: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    return {key: n for key, n in failures.items() if n}


def test_a_successor_row_keeps_its_counts_and_hop_names() -> None:
    table = metrics.Table(1)
    row = table.row(0)
    row.started(1234, listening=True)
    row.delivery("smtp", "sent", 0.02, "[10.0.0.1]")
    row.delivery("smtp", "temp", 3.0, "[10.0.0.1]")
    table.process_gone(0)
    assert table.value(metrics.PID) == 0 and table.value(metrics.LISTENING) == 0
    successor = table.row(0)
    successor.delivery("smtp", "temp", 3.0, "[10.0.0.1]")
    assert nonzero(table.hop_failures()) == {("[10.0.0.1]", "deferred"): 2}
    assert table.value(metrics.DELIVERIES.slot("smtp", "delivered")) == 1
    # 0.02 s is in the 0.025 bucket (le: less or equal), and only there.
    buckets = [*metrics.LATENCY_BUCKETS, float("inf")]
    counts = [table.value(metrics.LATENCY.base + i) for i in range(len(buckets))]
    assert counts == [int(b == 0.025) for b in buckets]


def test_a_full_hop_table_counts_the_rest_as_other() -> None:
    row = metrics.local_row()
    for i in range(metrics.HOP_ENTRIES + 10):
        row.delivery("esmtp", "temp", 1.0, f"hop{i}.test")
    failures = row.table.hop_failures()
    assert len(failures) == metrics.HOP_ENTRIES * len(metrics.HOP_STATUSES)
    assert failures[("other", "deferred")] == 11
    assert failures[("hop0.test", "deferred")] == 1


def test_the_metrics_know_every_mailer() -> None:
    assert set(metrics.MAILERS) == set(MAILERS)


def test_the_queue_census_counts_names_and_dates_the_oldest(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    made = []
    for _ in range(3):
        qid = spool.new_qid()
        (spool.queue / qid).write_text("")
        (spool.queue / (qid + ".st")).write_text("")
        made.append(qid)
    (spool.queue / "Q0000000000000").write_text("")  # an entry whose name is no date
    count, oldest = spool.census()
    assert count == 4
    assert oldest == min(qid_time(q) or 0 for q in made)
    assert oldest is not None and abs(oldest - time.time()) < 5
    spool.close()


def test_a_qid_dates_its_message() -> None:
    now = calendar.timegm((2026, 11, 25, 12, 0, 30, 0, 0, 0))
    # As Sendmail's: 126 years since 1900, % 60 = 6; November "A", the 25th "P", 12 h "C", 0 min,
    # 0 s; sequence, pid.
    assert qid_time("6APC00" + "00" + "001234", now) == now - 30
    # The year is the latest one with that remainder: "x" (59, 2019 or 2079) seen in 2040 is 2019;
    # "F" (15, 2035) seen in 2040 is 2035.
    new_year = calendar.timegm((2040, 1, 5, 0, 0, 0, 0, 0, 0))
    assert qid_time("xBV000" + "00" + "001234", new_year) == calendar.timegm(
        (2019, 12, 31, 0, 0, 0, 0, 0, 0)
    )
    assert qid_time("FBV000" + "00" + "001234", new_year) == calendar.timegm(
        (2035, 12, 31, 0, 0, 0, 0, 0, 0)
    )
    assert qid_time("not a qid!", now) is None
    assert qid_time("6AZC00" + "00" + "001234", now) is None  # the 35th


def test_the_readme_names_every_metric() -> None:
    from mailgate import exposition
    from mailgate.monitor import Gauges

    text = exposition.text(metrics.Table(1), Gauges(0, 0, None, 0, False)).decode()
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "mailgate_workers_running" in names  # the last one: every # TYPE line was read
    assert [n for n in names if f"`{n}`" not in readme] == []
