"""The relays under test and the C sink/source, each started and stopped by the harness.

- ``MailgateRelay``: ``python -m mailgate.cli serve`` on a fresh config/spool in a temp dir.
- ``PostfixRelay``: a private Postfix instance (own main.cf/master.cf/queue in a temp dir,
  started with ``postfix -c DIR start``), never touching /etc/postfix.
- ``SendmailRelay``: Debian's Sendmail 8.17 from the tree ``bench/peers-install`` unpacks (never
  installed), a sendmail.cf built from a mailertable mc, ``sendmail -C cf -bD`` as root.
- ``OpenSmtpdRelay``: Debian's OpenSMTPD 6.8 from the same kind of tree, ``smtpd -d -f conf``
  in a mount namespace whose /var/spool, /var/lib and /run are folders of the run.
- ``SmtpSink``: Postfix's ``smtp-sink -c``; a reader thread timestamps every counter update, so
  the arrival time of the k-th message is known without writing anything to disk.
- ``run_smtp_source``: ``smtp-source -c`` with the same kind of reader (time of the k-th 250).

Everything listens on and connects to 127.0.0.0/8 only (127.0.0.1; the 100-recipient case's
next hops on 127.0.0.11 and up).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import procstat

HOST = "127.0.0.1"
# (domain, next-hop address, port): what every relay's mailertable/transport routes where.
Route = tuple[str, str, int]


def single_route(sink_port: int) -> list[Route]:
    return [("bench.example", HOST, sink_port)]


NICE = 0  # set by relay.py --nice
# set by relay.py --sched-group: "own" puts each relay, the source and the sink in a session
# (so a scheduling autogroup) of its own; "shared" keeps them all in the harness's one.
SCHED_GROUP = "shared"


def own_session() -> bool:
    return SCHED_GROUP == "own"


# relay.py --mailgate-set: {"section": {"key": "toml value"}}, "" = top level; applied last;
# "milter" goes to the --milter filter's [[milter]] entry.
EXTRA_SETTINGS: dict[str, dict[str, str]] = {}
# relay.py --milter: the port of the one filter both relays use (mailgate's [[milter]],
# Postfix's smtpd_milters), default action tempfail in both.
MILTER_PORT: int | None = None
BIN_DIR: Path | None = None  # set by relay.py: private copies of smtp-sink / smtp-source


def tool(name: str) -> str:
    """``smtp-sink``/``smtp-source`` run from a private copy named ``bench-sink`` /
    ``bench-source``: on a shared machine someone else's ``pkill smtp-sink`` (seen here) would
    otherwise kill our next hop in the middle of a run."""
    path = shutil.which(name) or name
    if BIN_DIR is None:
        return path
    copy = BIN_DIR / name.replace("smtp-", "bench-")
    if not copy.exists():
        shutil.copy2(path, copy)
    return str(copy)


def prioritize(pid: int) -> None:
    """Give a process we started the benchmark's priority. With autogroup scheduling (on
    here) a nice value counts only inside the process's session group, so the group's nice
    (/proc/PID/autogroup) is set too: both relays, source and sink then weigh the same, and
    more than other people's busy processes."""
    if not NICE or pid <= 0:
        return
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, NICE)
    with contextlib.suppress(OSError), open(f"/proc/{pid}/autogroup", "w") as f:
        f.write(str(NICE))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_banner(
    port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None, host: str = HOST
) -> None:
    """Until something on ``host:port`` sends a 220 greeting."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                data = s.recv(512)
                if data.startswith(b"220"):
                    with contextlib.suppress(OSError):
                        s.sendall(b"QUIT\r\n")
                        s.recv(512)
                    return
                last = data.decode("ascii", "replace")
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise RuntimeError(f"no 220 greeting on port {port}: {last}")


def wait_listening(port: int, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port}")


class CounterReader:
    """Reads a process's stdout in a thread; every integer after ``key`` (or every bare integer
    when ``key`` is empty) is a running count; stores the time at which each count was first
    seen, so ``times[k-1]`` is when the k-th event was reported."""

    def __init__(self, proc: subprocess.Popen[bytes], key: str = "") -> None:
        self.proc = proc
        self.pattern = re.compile((re.escape(key) if key else r"(?:^|[\r\n])") + r"(\d+)")
        self.times: list[float] = []
        self.text_tail = ""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def count(self) -> int:
        return len(self.times)

    def _run(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        pending = ""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            now = time.time()
            pending += chunk.decode("ascii", "replace")
            # Keep the last partial record for the next read.
            cut = max(pending.rfind("\r"), pending.rfind("\n"))
            if cut < 0:
                continue
            done, pending = pending[: cut + 1], pending[cut + 1 :]
            for m in self.pattern.finditer(("\n" if not self.times else "\r") + done):
                value = int(m.group(1))
                while len(self.times) < value:
                    self.times.append(now)
            self.text_tail = (self.text_tail + done)[-2000:]

    def wait(self, target: int, timeout: float, stall: float) -> bool:
        """Until ``count >= target``; False after ``timeout`` or ``stall`` s without progress."""
        deadline = time.monotonic() + timeout
        last, last_change = self.count, time.monotonic()
        while time.monotonic() < deadline:
            n = self.count
            if n >= target:
                return True
            if n != last:
                last, last_change = n, time.monotonic()
            elif time.monotonic() - last_change > stall:
                return False
            time.sleep(0.01)
        return self.count >= target


class SmtpSink:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc = subprocess.Popen(
            [tool("smtp-sink"), "-u", "root", "-c", "-m", "1000", f"{HOST}:{self.port}", "1024"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            start_new_session=own_session(),
        )
        prioritize(self.proc.pid)
        self.counter = CounterReader(self.proc, "mesg=")
        wait_banner(self.port, 10, self.proc)

    @property
    def count(self) -> int:
        return self.counter.count

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """TERM, then KILL after ``grace`` seconds; only this process."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)


def run_smtp_source(
    port: int, n: int, sessions: int, size: int, timeout: float, stall: float = 30.0
) -> dict[str, object]:
    """``smtp-source -c -s C -m N -l S``; returns wall time, count and the 250 times."""
    cmd = [
        tool("smtp-source"),
        "-c",
        "-s",
        str(sessions),
        "-m",
        str(n),
        "-l",
        str(size),
        "-f",
        "sender@example.org",
        "-t",
        "user@bench.example",
        f"{HOST}:{port}",
    ]
    start = time.time()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=own_session()
    )
    prioritize(proc.pid)
    counter = CounterReader(proc)
    deadline = time.monotonic() + timeout
    stalled = False
    last, last_change = 0, time.monotonic()
    while proc.poll() is None:
        if time.monotonic() > deadline:
            stalled = True
            break
        if counter.count != last:
            last, last_change = counter.count, time.monotonic()
        elif time.monotonic() - last_change > stall:
            stalled = True
            break
        time.sleep(0.01)
    end = time.time()
    if stalled:
        stop_process(proc, 2)
    proc.wait(10)
    counter.thread.join(5)
    return {
        "cmd": " ".join(cmd),
        "wall": end - start,
        "start": start,
        "end": end,
        "sent": counter.count,
        "times": counter.times,
        "rc": proc.returncode,
        "stalled": stalled,
        "output_tail": counter.text_tail[-500:],
    }


# -- mailgate ----------------------------------------------------------------------------------


class MailgateRelay:
    name = "mailgate"

    def __init__(
        self,
        workdir: Path,
        sink_port: int,
        settings: dict[str, dict[str, str]],
        pythonpath: str | None = None,
        wrapper: tuple[str, ...] = (),
        routes: list[Route] | None = None,
    ) -> None:
        self.dir = workdir
        self.wrapper = wrapper  # a command the daemon runs under (valgrind, for instructions.py)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.sink_port = sink_port
        self.pythonpath = pythonpath
        sections: dict[str, dict[str, str]] = {
            "smtp": {
                "greet_pause": '"0s"',
                "check_sender_domain": "false",
                "max_connections_per_ip": "0",
                # Sendmail's ConnectionRateThrottle default (100/s) would cap a
                # one-message-per-connection load at 100 msgs/s; Postfix has no
                # such limit by default.
                "connection_rate_throttle": "0",
            },
            "queue": {"max_deliveries": "200"},
            "log": {"file": f'"{self.dir / "maillog"}"'},
        }
        for sec, kv in [*settings.items(), *EXTRA_SETTINGS.items()]:
            if sec != "milter":  # the [[milter]] entry's, below
                sections.setdefault(sec, {}).update(kv)
        text = (
            f'hostname = "gateway.example.com"\nlisten = ["{HOST}:{self.port}"]\n'
            f'spool_dir = "spool"\n'
        )
        text += "".join(f"{k} = {v}\n" for k, v in sections.pop("", {}).items())
        for sec, kv in sections.items():
            text += f"\n[{sec}]\n" + "".join(f"{k} = {v}\n" for k, v in kv.items())
        if MILTER_PORT is not None:
            text += (
                f'\n[[milter]]\nname = "bench"\nsocket = "inet:{MILTER_PORT}@{HOST}"\n'
                'default_action = "tempfail"\n'
            )
            text += "".join(f"{k} = {v}\n" for k, v in EXTRA_SETTINGS.get("milter", {}).items())
        self.config = self.dir / "mailgate.toml"
        self.config.write_text(text)
        routes = routes or single_route(sink_port)
        (self.dir / "mailertable").write_text(
            "".join(f"{d} smtp:[{h}]:{p}\n" for d, h, p in routes)
        )
        (self.dir / "access").write_text("".join(f"To:{d} RELAY\n" for d, _, _ in routes))
        self.proc: subprocess.Popen[bytes] | None = None

    def log_tail(self, chars: int = 800) -> str:
        return tail(self.dir / "maillog", chars) + tail(self.dir / "stderr.log", chars)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def start(self, greeting: bool = True, timeout: float = 30) -> MailgateRelay:
        """Start; ready once it greets (or, with ``greeting=False`` for a greet_pause
        config, once it accepts a connection)."""
        self.log = open(self.dir / "stderr.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "mailgate.cli", "serve", "-c", str(self.config)],
            stdout=self.log,
            stderr=self.log,
            cwd=self.dir,
            env=self.env(),
            start_new_session=own_session(),
        )
        prioritize(self.proc.pid)
        try:
            if greeting:
                wait_banner(self.port, timeout, self.proc)
            else:
                wait_listening(self.port, timeout, self.proc)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(
                f"mailgate did not start: {exc}: {(self.dir / 'stderr.log').read_text()[-2000:]}"
            ) from exc
        return self

    @property
    def root(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def version(self) -> str:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "import mailgate, importlib.metadata as m;"
                "print(m.version('mailgate'), mailgate.__file__)",
            ],
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=30,
        )
        return out.stdout.strip()

    def stop(self) -> None:
        if self.proc is not None:
            # A daemon whose event loop is stuck never handles TERM: KILL after 15 s.
            stop_process(self.proc, 15)
            self.log.close()


# -- Postfix -----------------------------------------------------------------------------------

MASTER_CF_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
        -o syslog_name=postfix/$service_name
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixRelay:
    """A private Postfix instance: ``postfix -c DIR/etc start``; nothing under /etc/postfix.

    As root, ``postfix -c`` accepts any config directory (the alternate_config_directories
    check applies to unprivileged and set-gid callers only). ``postfix start`` runs
    ``post-install create-missing`` which creates the queue directories with the right
    owners; data_directory must exist and belong to mail_owner beforehand. Services run
    unchrooted (chroot column "n") so the instance needs no copied /etc files.
    """

    name = "postfix"

    def __init__(self, workdir: Path, sink_port: int, routes: list[Route] | None = None) -> None:
        self.dir = workdir
        self.etc = workdir / "etc"
        self.queue = workdir / "queue"
        self.data = workdir / "data"
        for d in (self.etc, self.queue, self.data):
            d.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data, "postfix", "postfix")
        for d in (workdir, *workdir.parents):
            if str(d) in ("/", "/var", "/var/tmp", "/tmp"):
                break
            d.chmod(0o755)  # mail_owner must reach the queue
        self.port = free_port()
        self.maillog = workdir / "maillog"
        routes = routes or single_route(sink_port)
        (self.etc / "transport").write_text("".join(f"{d} smtp:[{h}]:{p}\n" for d, h, p in routes))
        (self.etc / "main.cf").write_text(f"""\
# Private benchmark instance; durability settings are Postfix's defaults.
compatibility_level = 3.6
config_directory = {self.etc}
queue_directory = {self.queue}
data_directory = {self.data}
maillog_file = {self.maillog}
maillog_file_prefixes = /var, /dev/stdout, {workdir}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.example.com
mydomain = example.com
mydestination =
inet_interfaces = {HOST}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = {", ".join(d for d, _, _ in routes)}
transport_maps = texthash:{self.etc}/transport
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
alias_maps =
alias_database =
biff = no
""")
        if MILTER_PORT is not None:
            with open(self.etc / "main.cf", "a") as f:
                f.write(
                    f"smtpd_milters = inet:{HOST}:{MILTER_PORT}\nmilter_default_action = tempfail\n"
                )
        (self.etc / "master.cf").write_text(
            f"{HOST}:{self.port} inet n - n - - smtpd\n" + MASTER_CF_SERVICES
        )

    def log_tail(self, chars: int = 800) -> str:
        return tail(self.maillog, chars)

    def postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postfix", "-c", str(self.etc), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self) -> PostfixRelay:
        if not own_session():
            # "postfix start" daemonises the master, which calls setsid(); start-fg keeps it
            # in our session, hence in the same scheduling group as everything else.
            self.fg = subprocess.Popen(
                ["postfix", "-c", str(self.etc), "start-fg"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_banner(self.port, 30)
            except RuntimeError:
                self.stop()
                raise
            prioritize(self.root)
            return self
        r = self.postfix("start")
        if r.returncode != 0:
            log = self.maillog.read_text() if self.maillog.exists() else ""
            self.stop()
            raise RuntimeError(f"postfix start failed: {r.stdout}{r.stderr}{log[-2000:]}")
        prioritize(self.root)  # master: its children share its autogroup, inherit its nice
        try:
            wait_banner(self.port, 30)
        except RuntimeError:
            self.stop()
            raise
        return self

    @property
    def root(self) -> int:
        try:
            return int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return -1

    def version(self) -> str:
        r = subprocess.run(
            ["postconf", "-d", "-h", "mail_version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return r.stdout.strip()

    def stop(self) -> None:
        """``postfix -c DIR stop`` (waits for master); then KILL any process of the tree still
        alive (by pid, collected before the stop)."""
        master = self.root
        pids = procstat.tree(master) if master > 0 else []
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.postfix("stop", timeout=60)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.1)
        for p in pids:
            if alive(p):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
        fg = getattr(self, "fg", None)
        if fg is not None:
            stop_process(fg, 10)


def alive(pid: int) -> bool:
    fields = procstat._stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def tail(path: Path, chars: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - chars))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


# -- Sendmail and OpenSMTPD, from unpacked Debian packages (bench/peers-install) ---------------

SENDMAIL_TREE = Path(os.environ.get("MAILGATE_SENDMAIL_TREE", "/opt/mailgate-ci/sendmail"))
OPENSMTPD_TREE = Path(os.environ.get("MAILGATE_OPENSMTPD_TREE", "/opt/mailgate-bench/opensmtpd"))
GATEWAY_NAME = "gateway.example.com"
# The listen backlog every relay gets: mailgate's own (and the kernel's somaxconn here).
# Sendmail's default is 10 (DaemonPortOptions Listen=), OpenSMTPD's a compiled-in 5: with 20
# clients connecting at once the kernel drops the SYNs past it and each such client waits 1 s
# or more to retry (measured: Sendmail 200 messages at 20 sessions in 18 s with Listen=10,
# 1.8 s with 4096). Postfix's is its smtpd process limit, 100.
LISTEN_BACKLOG = 4096


def package_version(tree: Path, package: str) -> str:
    """The Debian version of an unpacked package, from its changelog's first line."""
    changelog = tree / "usr/share/doc" / package / "changelog.Debian.gz"
    with contextlib.suppress(OSError, IndexError), gzip.open(changelog, "rt") as f:
        return f.readline().split("(", 1)[1].split(")", 1)[0]
    return "?"


def child_of(pid: int, timeout: float = 10) -> int:
    """The first child of ``pid`` (the daemon that ``unshare --fork`` started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            if text:
                return int(text[0])
        time.sleep(0.02)
    raise RuntimeError(f"process {pid} started no child")


class _ForegroundDaemon:
    """A daemon run in the foreground under ``unshare``: stopped with TERM, then every process
    of its tree still alive is killed by pid (collected before the TERM)."""

    name = ""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.daemon_pid = -1

    def _start(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.log = open(self.dir / "stderr.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=self.log,
            cwd=self.dir,
            env=env,
            start_new_session=own_session(),
        )
        prioritize(self.proc.pid)
        try:
            wait_banner(self.port, 30, self.proc)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {exc}: {self.log_tail()}") from exc

    @property
    def root(self) -> int:
        return self.daemon_pid

    def log_tail(self, chars: int = 800) -> str:
        return tail(self.dir / "stderr.log", chars)

    def stop(self) -> None:
        if self.proc is None:
            return
        pids = procstat.tree(self.proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.daemon_pid if self.daemon_pid > 0 else self.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.05)
        for p in pids:
            if alive(p):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
        stop_process(self.proc, 10)
        self.log.close()
        self.proc = None


class SendmailRelay(_ForegroundDaemon):
    """Sendmail 8.17 as the same mailertable gateway: a sendmail.cf built with the package's m4
    and cf/ tree from the mc below, ``sendmail -C cf -bD -q1h`` as root (the daemon in the
    foreground, so in our session and process tree).

    Everything else is Sendmail's default: SuperSafe=True (df and qf fsync'd before the 250),
    DeliveryMode=background (a delivery process forked per message), no MaxDaemonChildren, no
    ConnectionRateThrottle (mailgate's is 0 in the bench too); raised: the listen backlog
    (LISTEN_BACKLOG) and the load-average limits QueueLA/RefuseLA (see the mc).
    ``unshare --uts --pid --fork``: the host name is fully qualified inside (Sendmail
    otherwise waits for a domain) and the daemon is the namespace's init, so the delivery
    processes that outlive their SMTP child are reaped by it and their CPU stays in its tree.
    """

    name = "sendmail"

    def __init__(self, workdir: Path, sink_port: int, routes: list[Route] | None = None) -> None:
        super().__init__(workdir)
        tree = SENDMAIL_TREE
        self.sendmail = tree / "usr/libexec/sendmail/sendmail"
        if not self.sendmail.exists():
            raise RuntimeError(f"{self.sendmail} is missing: run bench/peers-install")
        routes = routes or single_route(sink_port)
        ports = {p for _, _, p in routes}
        if len(ports) != 1:
            raise ValueError("the esmtp mailer has one port: give every next hop the same")
        d = self.dir
        queue = d / "mqueue"
        queue.mkdir(mode=0o700, exist_ok=True)
        for name in ("aliases",):
            (d / name).write_text("")
        (d / "service.switch").write_text("hosts files\naliases files\n")
        (d / "hosts").write_text(f"127.0.0.1 localhost\n127.0.0.1 {GATEWAY_NAME}\n")
        defines = {
            "confDOMAIN_NAME": GATEWAY_NAME,
            "MAIL_SETTINGS_DIR": f"{d}/",
            "QUEUE_DIR": str(queue),
            "ALIAS_FILE": f"{d}/aliases",
            "confPID_FILE": f"{d}/sendmail.pid",
            "confSERVICE_SWITCH_FILE": f"{d}/service.switch",
            "confHOSTS_FILE": f"{d}/hosts",
            "confDONT_PROBE_INTERFACES": "True",
            "confDONT_BLAME_SENDMAIL": "TrustStickyBit",  # /var/tmp is 1777
            "ESMTP_MAILER_ARGS": f"TCP $h {ports.pop()}",
            # Its load-average limits (8 and 12 × CPUs = 16 and 24 here) trip on the bench's
            # own load on two cores: 200 sessions are 200 processes, in D state while they
            # fsync, plus source and sink; past RefuseLA it closes its listening socket and
            # smtp-source's next connect is refused. mailgate, Postfix and OpenSMTPD have no
            # load-average limit, so neither has it here.
            "confQUEUE_LA": "1000",
            "confREFUSE_LA": "1000",
        }
        mc = (
            "divert(0)dnl\nOSTYPE(`linux')dnl\n"
            + "".join(f"define(`{k}', `{v}')dnl\n" for k, v in defines.items())
            + "FEATURE(`no_default_msa')dnl\n"
            # mailgate's check_sender_domain = false in the bench: the sender is not looked up
            + "FEATURE(`accept_unresolvable_domains')dnl\n"
            + f"FEATURE(`mailertable', `hash {d}/mailertable')dnl\n"
            + f"FEATURE(`access_db', `hash -T<TMPF> {d}/access')dnl\n"
            + f"DAEMON_OPTIONS(`Port={self.port}, Addr={HOST}, Name=MTA, "
            + f"Listen={LISTEN_BACKLOG}')dnl\n"
            + "MAILER(`local')dnl\nMAILER(`smtp')dnl\n"
        )
        if MILTER_PORT is not None:  # F=T: tempfail when the filter is unavailable
            mc += f"INPUT_MAIL_FILTER(`bench', `S=inet:{MILTER_PORT}@{HOST}, F=T')dnl\n"
        (d / "bench.mc").write_text(mc)
        cf_dir = tree / "usr/share/sendmail/cf"
        built = subprocess.run(
            [str(tree / "usr/bin/m4"), f"-D_CF_DIR_={cf_dir}/", f"{cf_dir}/m4/cf.m4", "bench.mc"],
            capture_output=True,
            text=True,
            cwd=d,
            timeout=60,
            check=False,
        )
        if built.returncode != 0:
            raise RuntimeError(f"m4 failed: {built.stderr}")
        self.cf = d / "sendmail.cf"
        self.cf.write_text(built.stdout)
        self.env = {**os.environ, "LD_LIBRARY_PATH": str(tree / "usr/lib/x86_64-linux-gnu")}
        tables = {
            "mailertable": "".join(f"{dom} esmtp:[{h}]\n" for dom, h, _ in routes),
            "access": "".join(f"To:{dom} RELAY\n" for dom, _, _ in routes),
        }
        for name, text in tables.items():
            subprocess.run(
                [str(tree / "usr/libexec/sendmail/makemap"), "-C", str(self.cf), "hash", name],
                input=text,
                capture_output=True,
                text=True,
                cwd=d,
                env=self.env,
                timeout=60,
                check=True,
            )

    def start(self) -> SendmailRelay:
        inner = f"hostname {GATEWAY_NAME} && exec {self.sendmail} -C {self.cf} -bD -q1h"
        self._start(["unshare", "--uts", "--pid", "--fork", "sh", "-c", inner], self.env)
        assert self.proc is not None
        self.daemon_pid = child_of(self.proc.pid)
        prioritize(self.daemon_pid)
        return self

    def version(self) -> str:
        return package_version(SENDMAIL_TREE, "sendmail-bin")


OPENSMTPD_USERS = ("opensmtpd", "opensmtpq")  # Debian's names for _smtpd / _smtpq


class OpenSmtpdRelay(_ForegroundDaemon):
    """OpenSMTPD 6.8 as the same gateway: ``smtpd -d -f DIR/smtpd.conf`` as root (foreground,
    its log on stderr into DIR/stderr.log). Its paths are compiled in (/var/spool/smtpd, the
    privsep chroot /var/lib/opensmtpd/empty, /run/smtpd.sock), so it runs in a mount namespace
    where /var/spool, /var/lib and /run are folders of the run, on the same disk as the other
    relays' queues. It needs the users opensmtpd and opensmtpq (bench/peers-install makes them,
    as the package's postinst does). Its queue fsyncs each message before the 250; there is no
    setting for it."""

    name = "opensmtpd"

    def __init__(self, workdir: Path, sink_port: int, routes: list[Route] | None = None) -> None:
        super().__init__(workdir)
        self.smtpd = OPENSMTPD_TREE / "usr/sbin/smtpd"
        if not self.smtpd.exists():
            raise RuntimeError(f"{self.smtpd} is missing: run bench/peers-install")
        for user in OPENSMTPD_USERS:
            try:
                pwd.getpwnam(user)
            except KeyError:
                raise RuntimeError(f"user {user} is missing: run bench/peers-install") from None
        routes = routes or single_route(sink_port)
        d = self.dir
        self.mounts = {"/var/spool": d / "spool", "/var/lib": d / "lib", "/run": d / "run"}
        for m in self.mounts.values():
            m.mkdir(mode=0o755, exist_ok=True)
        # Its resolver (libasr) asks DNS before /etc/hosts for the client's PTR; this machine's
        # name server stops answering after a burst (a 5 s stall every ~12 sessions). The
        # other relays look nothing up in DNS here (Sendmail: hosts files; mailgate and Postfix
        # route to IP literals), so neither does it: hosts file only.
        (d / "resolv.conf").write_text("lookup file\n")
        self.mounts["/etc/resolv.conf"] = d / "resolv.conf"
        (d / "lib/opensmtpd/empty").mkdir(parents=True, exist_ok=True)
        conf = f"listen on {HOST} port {self.port} hostname {GATEWAY_NAME}\n"
        for i, (_dom, h, p) in enumerate(routes):
            conf += f'action "hop{i}" relay host smtp://{h}:{p}\n'
        for i, (dom, _h, _p) in enumerate(routes):
            conf += f'match from local for domain "{dom}" action "hop{i}"\n'
        self.conf = d / "smtpd.conf"
        self.conf.write_text(conf)

    def start(self) -> OpenSmtpdRelay:
        binds = " && ".join(f"mount --bind {src} {dst}" for dst, src in self.mounts.items())
        inner = f"{binds} && exec {self.smtpd} -d -f {self.conf}"
        env = dict(os.environ)
        shim = OPENSMTPD_TREE / "listen_backlog.so"
        if shim.exists():  # its compiled-in listen backlog of 5, raised to LISTEN_BACKLOG
            # and TCP_NODELAY on its SMTP client's sockets (bench/listen_backlog.c says why)
            env.update(
                LD_PRELOAD=str(shim),
                BENCH_LISTEN_BACKLOG=str(LISTEN_BACKLOG),
                BENCH_TCP_NODELAY="1",
            )
        self._start(["unshare", "--mount", "sh", "-c", inner], env)
        assert self.proc is not None
        self.daemon_pid = self.proc.pid  # unshare and sh exec: the same process
        return self

    def version(self) -> str:
        return package_version(OPENSMTPD_TREE, "opensmtpd")
