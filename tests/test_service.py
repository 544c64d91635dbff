"""Service control: systemd's notifications from the real daemon (one process and a master
with workers), ``serve --daemon`` and its pid file, ``mailgate stop`` / ``reload`` /
``status``, and a stop that lets the sessions and deliveries in progress finish."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate import metrics, pidfile, runstate
from mailgate.master import Master, Worker, WorkerReports
from mailgate.pidfile import AlreadyRunning, PidFile
from mailgate.runstate import Activity, RunState
from mailgate.sdnotify import Notifier, socket_address
from mailgate.service import Lifecycle
from mailgate.snapshot import load_snapshot
from tests.support.gateway import GatewayProcess, free_port, mailgate_command, run_cli
from tests.support.notify import NotifySocket
from tests.support.rawsmtp import RawSmtp
from tests.support.sink import SinkServer
from tests.support.syslogd import Rsyslog
from tests.support.wait import wait_until

HOP = "127.0.0.5"
CLIENT = "127.0.0.2"
MESSAGE = b"Subject: service\r\n\r\nbody\r\n"


def gateway(
    tmp_path: Path, hop_port: int, settings: str = "", *, log: str | None = None
) -> GatewayProcess:
    return GatewayProcess(
        tmp_path / "gw",
        dns=None,
        tables={
            "mailertable": f"targetdomain1.com smtp:[{HOP}]:{hop_port}\n",
            "access": "To:targetdomain1.com RELAY\n",
        },
        settings=settings + '[smtp]\ngreet_pause = "0s"\ncheck_sender_domain = false\n',
        log=log,
    )


def running(pid: int) -> str:
    """How `mailgate status` begins for the default ``workers = 0``: one per CPU we may use."""
    n = len(os.sched_getaffinity(0))
    return (
        f"mailgate: running (pid {pid}, {n} workers, up "
        if n > 1
        else f"mailgate: running (pid {pid}, up "
    )


def cli(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, "-c", str(gw.config))


def dead_pid() -> int:
    """A pid no process has (one that has exited and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- the notify protocol ------------------------------------------------------------------------


def test_notifier_sends_one_datagram_of_fields_to_a_path_socket(tmp_path: Path) -> None:
    with NotifySocket(tmp_path / "notify") as systemd:
        environ = {"NOTIFY_SOCKET": systemd.address, "PATH": "/bin"}
        notifier = Notifier.from_environ(environ)
        assert environ == {"PATH": "/bin"}  # programs we run must not speak for us
        assert notifier.ready("SMTP on 127.0.0.1:25;\nsecond line")
        assert systemd.next() == {
            "READY": "1",
            "STATUS": "SMTP on 127.0.0.1:25; second line",
            "MAINPID": str(os.getpid()),
        }
        assert notifier.reloading("Reloading")
        fields = systemd.next()
        assert fields["RELOADING"] == "1" and fields["STATUS"] == "Reloading"
        assert int(fields["MONOTONIC_USEC"]) > 0


def test_notifier_reaches_an_abstract_socket_and_survives_a_missing_one(tmp_path: Path) -> None:
    name = f"mailgate-test-{os.getpid()}"
    with NotifySocket(abstract=name) as systemd:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert notifier.stopping("Stopping")
        assert systemd.next() == {"STOPPING": "1", "STATUS": "Stopping"}
    assert not notifier.status("the socket is gone")  # dropped, no exception
    assert not Notifier.from_environ({}).ready("nobody listens")
    assert socket_address("relative/path") is None and socket_address("@") is None


# -- the pid file and the state file -----------------------------------------------------------


def test_pid_file_is_claimed_written_atomically_and_refuses_a_second_daemon(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run" / "mailgate.pid"
    first = PidFile(path)
    first.claim()
    # Claimed, not yet listening: a daemon that is starting, with no pid to signal.
    assert pidfile.inspect(path) == pidfile.Holder(exists=True, running=True, pid=None)
    first.write(4242)
    assert path.read_text() == "4242\n"
    assert pidfile.inspect(path) == pidfile.Holder(exists=True, running=True, pid=4242)
    assert [p.name for p in path.parent.iterdir()] == ["mailgate.pid"]  # no temporary left
    with pytest.raises(AlreadyRunning, match=r"already running \(pid 4242, pid file .*\)"):
        PidFile(path).claim()
    first.release()
    assert not path.exists()
    assert pidfile.inspect(path) == pidfile.Holder(exists=False, running=False, pid=None)


def test_a_stale_pid_file_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "mailgate.pid"
    stale = dead_pid()
    path.write_text(f"{stale}\n")
    assert pidfile.inspect(path) == pidfile.Holder(exists=True, running=False, pid=stale)
    taker = PidFile(path)
    taker.claim()
    assert taker.stale_pid == stale
    assert pidfile.inspect(path).pid is None  # never the dead one's pid while we start
    taker.release()


def test_state_file_round_trip_ignores_fields_it_does_not_know(tmp_path: Path) -> None:
    path = runstate.state_path(tmp_path / "mailgate.pid")
    assert path.name == "mailgate.state.json"
    state = RunState(
        pid=7,
        started=1.0,
        config="/etc/mail/mailgate.toml",
        listeners=["0.0.0.0:25", "[::]:25"],
        workers=2,
        phase="ready",
        updated=2.0,
        activity=Activity(sessions=3, received=10, queued=1, delivering=2),
    )
    runstate.write(path, state)
    assert runstate.read(path) == state
    path.write_text(path.read_text().replace('"pid": 7', '"pid": 7, "future_field": 1'))
    assert runstate.read(path) == state
    path.write_text("{not json")
    assert runstate.read(path) is None


# -- the master's account of its workers -------------------------------------------------------


def test_the_master_is_ready_only_when_every_worker_listens(tmp_path: Path) -> None:
    """The master's side of the workers' pipe, fed by `WorkerReports` as a worker would (no
    worker is forked: the order of the reports is the test's to choose). Received mail is
    counted in the workers' rows of the metrics table, as a worker counts it."""
    gw = gateway(tmp_path, free_port(HOP), "workers = 2\n")
    snapshot = load_snapshot(gw.config)
    with NotifySocket(tmp_path / "notify") as systemd:
        lifecycle = Lifecycle(snapshot.config, notifier=Notifier(systemd.address))
        lifecycle.claim()
        master = Master(gw.config, snapshot, 2, lifecycle)
        try:
            master.children = {1001: Worker(0, 0), 1002: Worker(1, 0)}
            WorkerReports(master.events_w, 0).listening()
            master.table.row(1).inc(metrics.MESSAGES_RECEIVED, 5)
            WorkerReports(master.events_w, 1).activity(Activity(2, 5, 7, 0, counted=True))
            master._read_reports()
            assert lifecycle.state.phase == "starting"
            assert pidfile.inspect(gw.spool / "mailgate.pid").pid is None
            WorkerReports(master.events_w, 1).listening()
            master._read_reports()
            assert lifecycle.state.phase == "ready"
            assert systemd.next()["READY"] == "1"
            assert pidfile.inspect(gw.spool / "mailgate.pid").pid == os.getpid()
            master.table.row(0).inc(metrics.MESSAGES_RECEIVED, 3)
            WorkerReports(master.events_w, 0).activity(Activity(1, 3, 6, 1, counted=True))
            master._read_reports()
            # The workers' sum; but each counts the whole queue: not added up.
            assert lifecycle.state.activity == Activity(3, 8, 7, 1, counted=True)
            assert systemd.next()["STATUS"].endswith(
                "; 3 sessions, 7 queued, 1 delivering, 8 received"
            )
            # Worker 1 died: its sessions went with it, its received mail did not.
            del master.children[1002]
            master.table.process_gone(1)
            WorkerReports(master.events_w, 0).activity(Activity(1, 3, 6, 1))
            master._read_reports()
            assert lifecycle.state.activity == Activity(1, 8, 6, 1)  # no census yet
        finally:
            for sock in master.sockets:
                sock.close()
            lifecycle.stopped()


# -- systemd: the real daemon ------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_systemd_hears_ready_reload_counts_and_stopping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    port = free_port(HOP)
    with SinkServer(HOP, port) as sink, NotifySocket(tmp_path / "notify") as systemd:
        monkeypatch.setenv("NOTIFY_SOCKET", systemd.address)
        gw = gateway(tmp_path, port, f"workers = {workers}\n")
        with gw:
            assert gw.proc is not None
            ready = systemd.next_state()
            assert ready["READY"] == "1"
            # The master speaks for the daemon, and only once every worker listens: its start
            # line is the daemon's one, after each worker's own.
            assert ready["MAINPID"] == str(gw.proc.pid)
            log = gw.log()
            [started] = [ln for ln in log.splitlines() if "starting daemon (mailgate)" in ln]
            assert f"mailgate[{gw.proc.pid}]: " in started
            assert started.endswith(f", {workers} workers") == (workers > 1)
            if workers > 1:
                assert all(f"worker {i} started" in log for i in range(workers))
            pid_file = gw.spool / "mailgate.pid"
            assert pid_file.read_text() == f"{gw.proc.pid}\n"
            assert ready["STATUS"].startswith(f"SMTP on 127.0.0.1:{gw.port}")

            with gw.smtp(CLIENT) as s:
                s.sendmail("alice@example.org", ["bob@targetdomain1.com"], MESSAGE)
            sink.wait_for(1, timeout=10)
            gw.signal(signal.SIGUSR2)  # counts now, rather than at the next report
            systemd.next_status("1 received")

            state_before = runstate.read(runstate.state_path(pid_file))
            assert state_before is not None and state_before.reloads == 0
            done = cli(gw, "reload")
            reloaded = f"mailgate: reloaded (pid {gw.proc.pid})\n"
            assert (done.returncode, done.stdout) == (0, reloaded)
            assert "RELOADING" in systemd.next_state()
            assert systemd.next_state()["READY"] == "1"

            # A bad table: the command refuses it with file:line and does not signal.
            (gw.dir / "mailertable").write_text("targetdomain1.com\n")
            refused = cli(gw, "reload")
            assert refused.returncode == 1
            assert f"error: {gw.dir}/mailertable:1: " in refused.stderr
            # The daemon's own check, for a HUP sent by hand: refused, reported, serving.
            gw.signal(signal.SIGHUP)
            assert "RELOADING" in systemd.next_state()
            after = systemd.next_state()
            assert after["READY"] == "1"
            refusal = "last reload refused, previous configuration in force: "
            assert f"{refusal}{gw.dir}/mailertable:1:" in after["STATUS"]
            state = runstate.read(runstate.state_path(pid_file))
            assert state is not None and state.reloads == 2  # the refused command sent nothing
            assert state.reload_error is not None and "mailertable:1:" in state.reload_error
            with gw.smtp(CLIENT) as s:
                s.sendmail("alice@example.org", ["bob@targetdomain1.com"], MESSAGE)
            sink.wait_for(2, timeout=10)  # the old routes still in force

            stopped = cli(gw, "stop")
            assert (stopped.returncode, stopped.stdout) == (
                0,
                f"mailgate: stopped (pid {gw.proc.pid})\n",
            )
            assert systemd.next_state()["STOPPING"] == "1"
            assert gw.proc.wait(10) == 0
        assert not pid_file.exists()
        assert not runstate.state_path(pid_file).exists()


# -- serve --daemon, stop, status --------------------------------------------------------------


@contextlib.contextmanager
def cleanup(gw: GatewayProcess, pid_file: Path | None = None) -> Iterator[None]:
    """A detached daemon is nobody's child: stop it whatever the test did (its workers die
    with it)."""
    pid_file = pid_file or gw.spool / "mailgate.pid"
    try:
        yield
    finally:
        holder = pidfile.inspect(pid_file)
        if holder.running and holder.pid:
            os.kill(holder.pid, signal.SIGKILL)
            pidfile.wait_released(pid_file, 10)


def fds_of(pid: int) -> list[str]:
    return [os.readlink(f"/proc/{pid}/fd/{n}") for n in (0, 1, 2)]


def test_serve_daemon_detaches_and_stop_status_find_it_by_its_pid_file(tmp_path: Path) -> None:
    port = free_port(HOP)
    with SinkServer(HOP, port) as sink:
        gw = gateway(tmp_path, port)
        pid_file = gw.spool / "mailgate.pid"
        assert cli(gw, "status").returncode == 3
        with cleanup(gw):
            started = cli(gw, "serve", "--daemon")  # returns: the daemon let go of our pipes
            assert started.returncode == 0, started.stderr
            pid = int(pid_file.read_text())
            assert started.stdout == f"mailgate: started, pid {pid}\n"
            assert started.stderr == ""  # the log is a file: nothing to warn of
            assert os.getsid(pid) != os.getsid(0)
            assert fds_of(pid) == [os.devnull] * 3
            assert os.readlink(f"/proc/{pid}/cwd") == "/"
            with RawSmtp("127.0.0.1", gw.port, source=CLIENT) as c:
                assert c.read_reply().code == 220
            second = cli(gw, "serve", "--daemon")
            assert second.returncode == 1
            assert f"mailgate: already running (pid {pid}, pid file {pid_file})" in second.stderr

            with gw.smtp(CLIENT) as s:
                s.sendmail("alice@example.org", ["bob@targetdomain1.com"], MESSAGE)
            sink.wait_for(1, timeout=10)
            status = cli(gw, "status")
            assert status.returncode == 0
            lines = status.stdout.splitlines()
            assert lines[0].startswith(running(pid))
            assert lines[1:4] == [
                f"  config     {gw.config} (generation {load_snapshot(gw.config).generation})",
                f"  listening  127.0.0.1:{gw.port}",
                f"  queue      0 messages in {gw.spool / 'queue'}",
            ]

            stopped = cli(gw, "stop")
            assert (stopped.returncode, stopped.stdout) == (0, f"mailgate: stopped (pid {pid})\n")
            assert not pid_file.exists()
            assert (cli(gw, "status").returncode, cli(gw, "stop").returncode) == (3, 0)
            assert cli(gw, "reload").returncode == 7


def test_stop_and_status_find_the_daemon_while_its_config_file_is_broken(
    tmp_path: Path,
) -> None:
    """After an edit the daemon's reload refused, the file no longer loads, but the daemon
    runs on: status (what an admin asks then) and stop find it by the file's pid_file."""
    gw = gateway(tmp_path, free_port(HOP))
    pid_file = tmp_path / "run" / "gw.pid"
    gw.config.write_text(f'pid_file = "{pid_file}"\n' + gw.config.read_text())
    with cleanup(gw, pid_file):
        assert cli(gw, "serve", "--daemon").returncode == 0
        pid = int(pid_file.read_text())
        good = gw.config.read_text()
        gw.config.write_text(
            good + '[[milter]]\nname = "m"\nsocket = "inet:1@127.0.0.1"\n'
            'default_action = "tempfial"\n'
        )
        assert cli(gw, "reload").returncode == 1
        status = cli(gw, "status")
        assert status.returncode == 0, status.stderr
        assert status.stdout.startswith(running(pid))
        (warning,) = status.stderr.splitlines()
        assert warning.startswith(f"mailgate: warning: {gw.config}:")
        assert "default_action" in warning and f"(pid file {pid_file})" in warning
        stopped = cli(gw, "stop")
        assert (stopped.returncode, stopped.stdout) == (0, f"mailgate: stopped (pid {pid})\n")
        assert not pid_file.exists()
        gw.config.write_text("pid_file = [\n")  # not even TOML: nothing to go by
        broken = cli(gw, "status")
        assert broken.returncode == 2 and broken.stderr.startswith(f"mailgate: {gw.config}:")


def test_reload_says_which_changes_only_a_restart_applies(tmp_path: Path) -> None:
    """listen, spool_dir, workers and [metrics] listen are fixed at the start: a reload of a
    file that changes them takes effect for the rest, and says so, with both values."""
    gw = gateway(tmp_path, free_port(HOP))
    with gw:
        assert cli(gw, "reload").stdout.count("\n") == 1  # nothing of the kind: one line
        second, metrics = free_port(), free_port()
        text = gw.config.read_text()
        old_listen = f'listen = ["127.0.0.1:{gw.port}"]'
        assert old_listen in text
        gw.config.write_text(
            text.replace(old_listen, f'listen = ["127.0.0.1:{gw.port}", "127.0.0.1:{second}"]')
            + f'[metrics]\nlisten = "127.0.0.1:{metrics}"\n'
        )
        done = cli(gw, "reload")
        assert done.returncode == 0, done.stderr
        first, warning = done.stdout.splitlines()
        assert first.startswith("mailgate: reloaded (pid ")
        assert warning == (
            "mailgate: warning: these take effect only after a restart (the daemon keeps "
            f"them): listen 127.0.0.1:{gw.port} → 127.0.0.1:{gw.port}, 127.0.0.1:{second}; "
            f"[metrics] listen off → 127.0.0.1:{metrics}"
        )
        gw.wait_log("changes take effect only after a restart")
        # The number of processes is forked at the start too.
        now = len(os.sched_getaffinity(0))
        gw.config.write_text(f"workers = {now + 1}\n" + gw.config.read_text())
        done = cli(gw, "reload")
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[1].endswith(
            f"[metrics] listen off → 127.0.0.1:{metrics}; workers {now} → {now + 1}"
        )


def test_every_command_reads_mailgate_config_without_c(tmp_path: Path) -> None:
    """$MAILGATE_CONFIG, as the sendmail command takes it: a `serve --daemon` started from a
    shell that set it runs that config, not the embedded default on the working folder's
    spool; -c still wins."""
    gw = gateway(tmp_path, free_port(HOP))
    env = {**os.environ, "MAILGATE_CONFIG": str(gw.config)}

    def bare(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            mailgate_command(*args),
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
            check=False,
        )

    assert bare("check").stdout.startswith(f"{gw.config}: OK")
    other = tmp_path / "other.toml"
    other.write_text('hostname = "other.example.com"\n')
    assert bare("check", "-c", str(other)).stdout.startswith(f"{other}: OK")
    with cleanup(gw):
        started = bare("serve", "--daemon")
        assert started.returncode == 0, started.stderr
        pid = int((gw.spool / "mailgate.pid").read_text())
        assert started.stdout == f"mailgate: started, pid {pid}\n"
        assert not (tmp_path / "spool").exists()  # not the embedded default's ./spool
        assert bare("status").returncode == 0
        assert bare("stop").returncode == 0


def test_a_stale_pid_file_is_reported_then_taken_over(tmp_path: Path) -> None:
    gw = gateway(tmp_path, free_port(HOP))
    pid_file = gw.spool / "mailgate.pid"
    pid_file.parent.mkdir(parents=True)
    stale = dead_pid()
    pid_file.write_text(f"{stale}\n")
    status = cli(gw, "status")
    assert (status.returncode, status.stderr) == (
        1,
        f"mailgate: not running, but the stale pid file {pid_file} (pid {stale}) is left\n",
    )
    with cleanup(gw):
        assert cli(gw, "serve", "--daemon").returncode == 0
        assert f"pid file {pid_file} named pid {stale}, which is not running: taken over" in (
            gw.log()
        )
        assert cli(gw, "status").returncode == 0
        assert cli(gw, "stop").returncode == 0


def test_serve_daemon_reports_why_it_could_not_start(tmp_path: Path) -> None:
    gw = gateway(tmp_path, free_port(HOP))
    with socket.socket() as taken, cleanup(gw):
        taken.bind(("127.0.0.1", gw.port))
        taken.listen()
        failed = cli(gw, "serve", "--daemon")
        assert failed.returncode == 1
        assert failed.stderr.startswith("mailgate: cannot start: [Errno 98] Address already in use")
        assert not (gw.spool / "mailgate.pid").exists()


def test_commands_without_a_pid_file_say_so(tmp_path: Path) -> None:
    gw = gateway(tmp_path, free_port(HOP), 'pid_file = ""\n')
    status = cli(gw, "status")
    assert (status.returncode, status.stderr) == (
        4,
        "mailgate: unknown: the configuration has no pid_file\n",
    )
    assert cli(gw, "stop").returncode == 4
    daemon = cli(gw, "serve", "--daemon")
    assert daemon.returncode == 2 and "--daemon needs a pid_file" in daemon.stderr


def test_serve_daemon_warns_when_its_lines_would_go_to_dev_null(tmp_path: Path) -> None:
    gw = gateway(tmp_path, free_port(HOP), log="json = true\n")  # stderr, and JSON on stdout
    with cleanup(gw):
        started = cli(gw, "serve", "--daemon")
        assert started.returncode == 0, started.stderr
        assert started.stderr.splitlines() == [
            'mailgate: warning: [log] target is stderr (no file, not "syslog"): the daemon\'s '
            "log is lost",
            "mailgate: warning: [log] json goes to stdout (no json_file): the daemon's JSON "
            "lines are lost",
        ]
        assert cli(gw, "stop").returncode == 0


@pytest.mark.skipif(shutil.which("rsyslogd") is None, reason="needs Debian's rsyslog")
def test_serve_daemon_logs_to_syslog_without_a_warning(tmp_path: Path) -> None:
    with Rsyslog(tmp_path / "syslog") as syslog:
        log = f'target = "syslog"\nsyslog_socket = "{syslog.socket}"\n'
        # One process: the lines are then the pid file's process's (workers write their own).
        gw = gateway(tmp_path, free_port(HOP), "workers = 1\n", log=log)
        with cleanup(gw):
            started = cli(gw, "serve", "--daemon")
            assert (started.returncode, started.stderr) == (0, "")
            pid = int((gw.spool / "mailgate.pid").read_text())
            started_line = f"mail.info mailgate[{pid}]: starting daemon (mailgate): SMTP on "
            wait_until(
                lambda: any(line.startswith(started_line) for line in syslog.lines()),
                "the detached daemon's first line in syslog",
            )
            assert cli(gw, "stop").returncode == 0
            stopping_line = f"mail.info mailgate[{pid}]: stopping: no new connections"
            wait_until(
                lambda: any(line.startswith(stopping_line) for line in syslog.lines()),
                "the daemon's stopping line in syslog",
            )


def test_serve_daemon_says_on_the_terminal_that_its_log_cannot_be_opened(
    tmp_path: Path,
) -> None:
    gw = gateway(tmp_path, free_port(HOP), log=f'file = "{tmp_path}"\n')  # a folder
    failed = cli(gw, "serve", "--daemon")
    assert failed.returncode == 1
    why = f"[Errno 21] Is a directory: '{tmp_path}'"
    assert failed.stderr == f"mailgate: cannot open the log: {why}\n"
    assert not (gw.spool / "mailgate.pid").exists()


# -- what contrib/ ships --------------------------------------------------------------------

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"


def test_the_sysv_init_script_drives_the_daemon(tmp_path: Path) -> None:
    gw = gateway(tmp_path, free_port(HOP))
    wrapper = tmp_path / "mailgate"  # this checkout's mailgate, where the script expects one
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m mailgate.cli "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "MAILGATE": str(wrapper), "CONFIG": str(gw.config)}

    def init(action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", str(CONTRIB / "mailgate.init"), action],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    with cleanup(gw):
        assert init("status").returncode == 3
        started = init("start")
        assert started.returncode == 0, started.stderr
        pid = int((gw.spool / "mailgate.pid").read_text())
        assert init("start").stdout == "mailgate: already running\n"
        assert init("reload").stdout == f"mailgate: reloaded (pid {pid})\n"
        assert init("restart").returncode == 0
        assert int((gw.spool / "mailgate.pid").read_text()) != pid
        assert init("status").returncode == 0
        assert init("stop").returncode == 0
        assert init("status").returncode == 3
    assert init("bogus").returncode == 2


def test_the_systemd_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    """systemd's own parser, on the unit as shipped but for where mailgate is installed
    (``verify`` wants the programs to exist); a bad key or value is a complaint on stderr."""
    installed = shutil.which("mailgate")
    assert installed is not None
    unit = tmp_path / "mailgate.service"
    unit.write_text(
        (CONTRIB / "mailgate.service").read_text().replace("/usr/local/bin/mailgate", installed)
    )
    checked = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (checked.returncode, checked.stderr) == (0, "")
    text = unit.read_text()
    assert "Type=notify\n" in text and "KillMode=mixed\n" in text
    assert f"ExecReload={installed} reload -c /etc/mail/mailgate.toml\n" in text


# -- a stop that finishes what is in progress --------------------------------------------------


def start_stop(gw: GatewayProcess) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mailgate.cli", "stop", "-c", str(gw.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def refuses_connections(gw: GatewayProcess) -> bool:
    try:
        socket.create_connection((gw.host, gw.port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def open_data(gw: GatewayProcess) -> RawSmtp:
    """A session in the middle of a message's content."""
    c = RawSmtp(gw.host, gw.port, source=CLIENT)
    assert c.read_reply().code == 220
    assert c.cmd("EHLO client.example.net").code == 250
    assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
    assert c.cmd("RCPT TO:<bob@targetdomain1.com>").code == 250
    assert c.cmd("DATA").code == 354
    c.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
    return c


@pytest.mark.parametrize("workers", [1, 2])
def test_stop_finishes_the_message_in_flight_and_its_delivery(tmp_path: Path, workers: int) -> None:
    port = free_port(HOP)
    with SinkServer(HOP, port) as sink:
        gw = gateway(tmp_path, port, f'workers = {workers}\nstop_grace = "60s"\n')
        with gw:
            assert gw.proc is not None
            wait_until(lambda: (gw.spool / "mailgate.pid").exists(), "the daemon to be ready")
            # The 421 comes once the stop command has started and signalled: a hang guard of
            # 30 s, as a loaded machine may take seconds to start a Python program.
            idle = RawSmtp(gw.host, gw.port, source=CLIENT, timeout=30.0)
            assert idle.read_reply().code == 220
            assert idle.cmd("EHLO client.example.net").code == 250
            busy = open_data(gw)
            stop = start_stop(gw)
            # Between transactions: told at once. Nothing new is accepted.
            bye = idle.read_reply()
            assert (bye.code, bye.text) == (421, "4.3.2 gateway.example.com Shutting down")
            idle.wait_closed()
            wait_until(lambda: refuses_connections(gw), "the listener to close")
            # The message under way is finished, acknowledged, and delivered before the exit.
            busy.send(b"second half\r\n.\r\n")
            assert busy.read_reply().code == 250
            assert busy.read_reply().code == 421
            busy.wait_closed()
            out, _ = stop.communicate(timeout=60)
            assert (stop.returncode, out) == (0, f"mailgate: stopped (pid {gw.proc.pid})\n")
            assert gw.proc.wait(10) == 0
        [msg] = sink.messages
        assert b"\r\nSubject: in flight\r\n" in msg.data
        assert msg.data.endswith(b"\r\n\r\nfirst half\r\nsecond half\r\n")
        assert gw.queued() == []
        assert list((gw.spool / "incoming").iterdir()) == []


def test_stop_closes_what_is_left_at_the_deadline(tmp_path: Path) -> None:
    port = free_port(HOP)
    with SinkServer(HOP, port) as sink:
        gw = gateway(tmp_path, port, 'stop_grace = "1s"\n')
        with gw:
            assert gw.proc is not None
            wait_until(lambda: (gw.spool / "mailgate.pid").exists(), "the daemon to be ready")
            stalled = open_data(gw)
            stop = start_stop(gw)
            bye = stalled.read_reply()  # the content never ends; the deadline does
            assert (bye.code, bye.text) == (421, "4.3.2 gateway.example.com Shutting down")
            stalled.wait_closed()
            out, _ = stop.communicate(timeout=60)
            assert stop.returncode == 0, out
            assert gw.proc.wait(10) == 0
        assert "stop: 1 sessions still open at the deadline: closed with 421" in gw.log()
        # Never acknowledged, so never queued; and nothing half-written is left.
        assert sink.messages == [] and gw.queued() == []
        assert list((gw.spool / "incoming").iterdir()) == []
