"""Several worker processes: they share the listener and the spool, the master forwards HUP,
and a kill -9 of the master takes the workers with it without losing acknowledged mail."""

from __future__ import annotations

import os
import re
import selectors
import signal
import time
from pathlib import Path

from tests.support.crash import children_of
from tests.support.gateway import GatewayProcess, free_port
from tests.support.rawsmtp import RawSmtp
from tests.support.world import HOP1 as HOP
from tests.support.world import GatewayFactory, SinkFactory, World, wait_until


def world(port: int, settings: str = "") -> World:
    return World(
        tables={
            "mailertable": f"targetdomain1.com smtp:[{HOP}]:{port}\n",
            "access": "To:targetdomain1.com RELAY\n",
        },
        settings=(
            'workers = 2\n[smtp]\ngreet_pause = "0s"\ncheck_sender_domain = false\n'
            '[queue]\nretry_min = "1s"\nrun_interval = "2s"\n'
        ),
    ).but(settings=settings)


def worker_starts(gw: GatewayProcess) -> int:
    """The workers' start lines (the daemon's own, the master's, comes once)."""
    return len(re.findall(r"\]: worker \d+ started$", gw.log(), re.M))


def send(gw: GatewayProcess, subject: str) -> None:
    with gw.smtp("127.0.0.2") as s:
        s.sendmail(
            "alice@example.org",
            ["bob@targetdomain1.com"],
            f"Subject: {subject}\r\n\r\nbody\r\n".encode(),
        )


def test_two_workers_share_the_work_and_reload_together(
    make_gateway: GatewayFactory, make_sink: SinkFactory
) -> None:
    sink = make_sink(HOP)
    gw = make_gateway(world(sink.port))
    assert gw.proc is not None
    wait_until(lambda: len(children_of(gw.proc.pid)) >= 2, "both workers", 10)
    workers = children_of(gw.proc.pid)
    assert len(workers) == 2
    for i in range(20):
        send(gw, f"m{i}")
    assert len(sink.wait_for(20, timeout=15)) == 20
    log = gw.log()
    senders = {
        line.split("mailgate[")[1].split("]")[0]
        for line in log.splitlines()
        if "from=<alice@example.org>" in line
    }
    assert senders <= {str(w) for w in workers}
    gw.signal(signal.SIGHUP)
    # One line for the daemon, from the master, once both workers have the new config.
    wait_until(lambda: "configuration reloaded" in gw.log(), "both workers to reload")
    time.sleep(0.5)
    log = gw.log()
    assert [
        ln.split("mailgate[")[1].split("]")[0] for ln in log.splitlines() if "reloaded" in ln
    ] == [str(gw.proc.pid)]


def test_kill_9_of_the_master_ends_the_workers_and_mail_survives(
    make_gateway: GatewayFactory, make_sink: SinkFactory
) -> None:
    sink = make_sink(HOP, start=False)
    gw = make_gateway(world(sink.port))
    assert gw.proc is not None
    master = gw.proc.pid
    wait_until(lambda: len(children_of(master)) >= 2, "both workers", 10)
    workers = children_of(master)
    for i in range(6):
        send(gw, f"queued{i}")  # the next hop is down: all six wait in the queue
    gw.wait_log("stat=Deferred")
    gw.kill9()
    wait_until(
        lambda: not any(Path(f"/proc/{w}").exists() for w in workers),
        "the workers to die with the master",
        10,
    )
    assert not any(
        Path(f"/proc/{w}").exists()
        and "Z" not in Path(f"/proc/{w}/stat").read_text().split(")")[1][:3]
        for w in workers
    )
    sink.start()
    gw.start()
    msgs = sink.wait_for(6, timeout=20)
    assert sorted(m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in msgs) == [
        f"queued{i}".encode() for i in range(6)
    ]
    gw.stop()
    assert os.path.isdir(gw.spool / "queue")


def test_a_worker_restarted_after_a_reload_runs_the_reloaded_tables(
    make_gateway: GatewayFactory, make_sink: SinkFactory
) -> None:
    """A relay grant removed by HUP must stay removed when a worker dies and is restarted: the
    master starts new workers with the last config that passed its check, not the first."""
    gw = make_gateway(world(make_sink(HOP).port))
    assert gw.proc is not None
    wait_until(lambda: worker_starts(gw) >= 2, "both workers to start")
    with gw.smtp("127.0.0.2") as s:
        s.ehlo()
        s.mail("alice@example.org")
        assert s.rcpt("bob@targetdomain1.com")[0] == 250
    (gw.dir / "access").write_text("")  # targetdomain1.com is no longer relayed
    gw.signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in gw.log(), "both workers to reload")
    for worker in children_of(gw.proc.pid):
        os.kill(worker, signal.SIGKILL)
    wait_until(lambda: worker_starts(gw) >= 4, "both workers to be restarted", 15)
    assert worker_starts(gw) == 4  # two at the start, two restarted
    for _ in range(10):  # both new workers answer (the kernel spreads the connections)
        with gw.smtp("127.0.0.2") as s:
            s.ehlo()
            s.mail("alice@example.org")
            code, text = s.rcpt("bob@targetdomain1.com")
            assert (code, text.split(b"... ")[-1][:15]) == (550, b"Relaying denied"), text


def test_connection_limits_count_the_whole_daemon(
    make_gateway: GatewayFactory, make_sink: SinkFactory
) -> None:
    """With two workers, max_connections_per_ip counts the sessions of both (shared memory),
    and the sessions of a worker that is killed stop counting with it."""
    gw = make_gateway(world(make_sink(HOP).port, "[smtp]\nmax_connections_per_ip = 3\n"))
    assert gw.proc is not None
    wait_until(lambda: worker_starts(gw) >= 2, "both workers to start")
    held = []
    replies = []
    for _ in range(8):
        c = RawSmtp(gw.host, gw.port, source="127.0.0.2")
        replies.append(c.read_reply())
        held.append(c)
    codes = [r.code for r in replies]
    assert codes.count(220) == 3 and codes.count(421) == 5, codes
    assert all(r.first == "421 4.3.2 Too many open connections." for r in replies if r.code == 421)
    for c in held:
        c.close()

    def three_admitted() -> list[RawSmtp] | None:
        conns = [RawSmtp(gw.host, gw.port, source="127.0.0.2") for _ in range(3)]
        if [c.read_reply().code for c in conns] == [220, 220, 220]:
            return conns
        for c in conns:
            c.close()
        return None

    # The closed sessions end and give their counts back ...
    keep = wait_until(three_admitted, "the closed sessions' counts to be given back")
    # ... and so does a worker killed while it holds sessions.
    for worker in children_of(gw.proc.pid):
        os.kill(worker, signal.SIGKILL)
    for c in keep:
        c.close()
    wait_until(lambda: worker_starts(gw) >= 4, "both workers to be restarted", 15)
    again = [RawSmtp(gw.host, gw.port, source="127.0.0.2") for _ in range(3)]
    assert [c.read_reply().code for c in again] == [220, 220, 220]
    for c in again:
        c.close()


def test_a_restarted_worker_frees_what_the_dead_one_left_in_trash(
    make_gateway: GatewayFactory, make_sink: SinkFactory
) -> None:
    """A worker killed before its cleaner unlinked its delivered files leaves them in trash/;
    no start-up recovery runs for a worker alone, so its replacement's cleaner frees them."""
    sink = make_sink(HOP)
    gw = make_gateway(world(sink.port))
    assert gw.proc is not None
    wait_until(lambda: worker_starts(gw) >= 2, "both workers to start")
    send(gw, "before")
    assert len(sink.wait_for(1, timeout=15)) == 1
    left = [gw.spool / "trash" / name for name in ("0000000000dead", "0000000000dead.st")]
    for p in left:  # as a killed worker leaves them: renamed out of queue/, not unlinked
        p.write_bytes(b"delivered\r\n")
    victim = children_of(gw.proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: worker_starts(gw) >= 3, "the worker to be restarted", 15)
    wait_until(lambda: not any(p.exists() for p in left), "trash/ to be emptied", 10)
    send(gw, "after")
    assert len(sink.wait_for(2, timeout=15)) == 2


def greeted(conns: list[RawSmtp], seconds: float) -> list[RawSmtp]:
    """Those of ``conns`` that got their 220 within ``seconds`` (the rest wait, unanswered)."""
    waiting = {c.sock: c for c in conns}
    got: list[RawSmtp] = []
    with selectors.DefaultSelector() as sel:
        for sock in waiting:
            sel.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + seconds
        while waiting and (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                c = waiting.pop(key.fileobj)  # type: ignore[call-overload]
                sel.unregister(key.fileobj)
                assert c.read_reply().code == 220
                got.append(c)
    return got


def test_the_connection_ceiling_is_the_whole_daemons_on_plain_and_proxy_listeners(
    make_gateway: GatewayFactory, make_sink: SinkFactory
) -> None:
    """max_connections = 4 with two workers: a fifth connection waits unanswered, whichever
    worker would take it, and behind a PROXY listener too (the sessions its headers name
    count, not the proxy's connections); one session ending lets one more in."""
    proxied = free_port()
    gw = make_gateway(world(make_sink(HOP).port, "[smtp]\nmax_connections = 4\n"), start=False)
    gw.config.write_text(
        gw.config.read_text()
        + f'[[listener]]\naddress = "127.0.0.1:{proxied}"\nproxy_protocol = "v1"\n'
        'proxy_trusted = ["127.0.0.1"]\n'
    )
    gw.start()
    for port, header in ((gw.port, False), (proxied, True)):
        conns = []
        for n in range(8):
            c = RawSmtp(gw.host, port)
            if header:
                c.send(f"PROXY TCP4 192.0.2.{n + 1} 127.0.0.1 40000 25\r\n".encode())
            conns.append(c)
        try:
            first = greeted(conns, 1.5)
            assert len(first) == 4, port
            first[0].close()  # one session of the four ends: one of the four waiting gets in
            rest = [c for c in conns if c not in first]
            assert len(greeted(rest, 3.0)) == 1, port
        finally:
            for c in conns:
                c.close()


def test_the_last_statistics_line_is_the_daemons_when_it_stops(
    make_gateway: GatewayFactory,
) -> None:
    """The master writes it once the workers are gone, with what they last reported: the two
    messages a dead next hop left queued."""
    gw = make_gateway(world(free_port(HOP)))
    assert gw.proc is not None
    for i in range(2):
        send(gw, f"kept {i}")
    wait_until(lambda: len(gw.log_lines("stat=Deferred")) == 2, "both deferred")
    gw.stop()
    lines = gw.log_lines("statistics: ")
    assert lines and f"mailgate[{gw.proc.pid}]: " in lines[-1], lines
    assert "messages_received=2, " in lines[-1] and ", queued=2, delivering=0" in lines[-1]


def test_a_hung_worker_is_killed_after_stop_grace_and_its_mail_stays(
    make_gateway: GatewayFactory, make_sink: SinkFactory
) -> None:
    """A worker that cannot stop (SIGSTOP here; a process stuck in the kernel is the same)
    would keep the master, and the listening port, for ever: it is killed stop_grace + 5 s
    after the stop began, with a line that says so, and mail it acknowledged is delivered
    by the next daemon."""
    sink = make_sink(HOP, start=False)
    gw = make_gateway(world(sink.port, 'stop_grace = "1s"\n'))
    assert gw.proc is not None
    master = gw.proc.pid
    wait_until(lambda: len(children_of(master)) >= 2, "both workers", 10)
    for i in range(4):
        send(gw, f"held{i}")  # the next hop is down: they wait in the queue
    gw.wait_log("stat=Deferred")
    hung, other = children_of(master)
    os.kill(hung, signal.SIGSTOP)
    started = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    gw.proc.wait(20)
    took = time.monotonic() - started
    assert 1 + 5 <= took < 1 + 5 + 5, took  # stop_grace + 5 s, and a pass of the loop
    assert not Path(f"/proc/{hung}").exists()
    log = gw.log()
    index = "0" if f"worker 0 (pid {hung})" in log else "1"
    hung_line = f"worker {index} (pid {hung}) has not stopped 6 s after the stop began: killing it"
    assert hung_line in log
    assert f"worker {index} (pid {hung}) killed by signal 9\n" in log
    assert f"(pid {other}) killed" not in log  # the other one stopped in time
    sink.start()
    gw.start()
    msgs = sink.wait_for(4, timeout=20)
    assert len(msgs) == 4
