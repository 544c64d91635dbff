"""Real mail filters from Debian packages, each on loopback with a private configuration in a
folder of its own, for tests/test_milter_peers.py: OpenDKIM (keys and the public key offline,
in a TestPublicKeys file), rspamd in milter mode (its proxy worker scanning by itself, no
Redis, no DNS, a five-name TLD list so that it starts in a second instead of compiling the
9,600 public suffixes for half a minute) and clamav-milter with clamd (one private signature,
for EICAR, in a database folder of its own: no freshclam, no network).

Each is a context manager: ``start`` waits until its socket takes connections, ``stop`` ends
it (SIGTERM, then SIGKILL after a short grace: opendkim takes seven seconds to exit on TERM)
and every process it started. ``missing`` names the program that is not installed, for the
tests' skip reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from types import TracebackType

from tests.support.gateway import accepts, free_port
from tests.support.wait import wait_until

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def _which(*programs: str) -> str | None:
    """The first of ``programs`` not installed (also in /usr/sbin, not always on PATH)."""
    for program in programs:
        if shutil.which(program) is None and not Path("/usr/sbin", program).exists():
            return program
    return None


def _program(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class _Peer:
    grace = 5.0  # seconds between SIGTERM and SIGKILL

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def socket(self) -> str:
        return f"inet:{self.port}@127.0.0.1"

    def _spawn(self, *argv: str, log: str) -> subprocess.Popen[bytes]:
        out = open(self.dir / log, "ab")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(argv, stdout=out, stderr=out, cwd=self.dir, start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

    def _wait_port(self, what: str, timeout: float = 60.0) -> None:
        def up() -> bool:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{what} exited with {proc.returncode}: {self.output()}")
            return accepts("127.0.0.1", self.port)

        wait_until(up, f"{what} to listen on 127.0.0.1:{self.port}", timeout)

    def output(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-3000:] for p in sorted(self.dir.glob("*.out"))
        )

    def start(self) -> _Peer:
        raise NotImplementedError

    def stop(self) -> None:
        """Each process group, last started first: TERM, then KILL after ``grace``."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(self.grace)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        self.procs.clear()

    def __enter__(self) -> _Peer:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class OpenDkim(_Peer):
    """Signs mail from 127.0.0.1 for example.org (selector sel1), verifies the rest."""

    missing = _which("opendkim", "opendkim-genkey")
    grace = 1.0

    def start(self) -> OpenDkim:
        keys = self.dir / "keys"
        keys.mkdir(exist_ok=True)
        subprocess.run(
            [
                _program("opendkim-genkey"),
                "-b",
                "1024",
                "-D",
                str(keys),
                "-d",
                "example.org",
                "-s",
                "sel1",
            ],
            check=True,
            capture_output=True,
        )
        # The TXT record, in TestPublicKeys' "name value" form: verification without DNS.
        record = (keys / "sel1.txt").read_text()
        value = "".join(part for part in record.split('"')[1::2])
        (self.dir / "testkeys").write_text(f"sel1._domainkey.example.org {value}\n")
        conf = self.dir / "opendkim.conf"
        conf.write_text(
            "Syslog no\n"
            "Mode sv\n"
            "Canonicalization relaxed/simple\n"
            "Domain example.org\n"
            "Selector sel1\n"
            f"KeyFile {keys / 'sel1.private'}\n"
            f"Socket inet:{self.port}@127.0.0.1\n"
            f"PidFile {self.dir / 'opendkim.pid'}\n"
            "InternalHosts 127.0.0.1\n"
            "OversignHeaders From\n"
            "RequireSafeKeys false\n"  # pytest's tmp folder is under a world-writable /tmp
            f"TestPublicKeys {self.dir / 'testkeys'}\n"
            "AuthservID gateway.example.com\n"
        )
        self._spawn(_program("opendkim"), "-f", "-x", str(conf), log="opendkim.out")
        self._wait_port("opendkim")
        return self


class Rspamd(_Peer):
    """The proxy worker in milter mode, scanning by itself; GTUBE is refused at score 15."""

    missing = _which("rspamd")

    def start(self) -> Rspamd:
        d = self.dir
        (d / "db").mkdir(exist_ok=True)
        (d / "tld.dat").write_text("com\norg\nnet\nexample\ntest\n")
        conf = d / "rspamd.conf"
        conf.write_text(
            f'options {{ pidfile = "{d}/rspamd.pid"; url_tld = "{d}/tld.dat"; filters = [];\n'
            '  gtube_patterns = "all";\n'
            '  dns { nameserver = ["127.0.0.1:9"]; timeout = 0.5s; retransmits = 1; } }\n'
            f'logging {{ type = "file"; filename = "{d}/rspamd.log"; level = "info"; }}\n'
            "actions { reject = 15; add_header = 6; greylist = 4; }\n"
            f'worker "rspamd_proxy" {{ bind_socket = "127.0.0.1:{self.port}"; milter = yes;\n'
            '  timeout = 30s; count = 1; upstream "local" { default = yes; self_scan = yes; } }\n'
            f'modules {{ path = "/usr/share/rspamd/plugins/"; }}\n'
            'lua = "/usr/share/rspamd/rules/rspamd.lua";\n'
            'milter_headers { use = ["x-spamd-result", "x-spam-status"]; skip_local = false;\n'
            "  skip_authenticated = false; }\n"
        )
        # -i: workers may run as root (CI's user); -f: in the foreground, as our child.
        self._spawn(
            _program("rspamd"),
            "-f",
            "-i",
            "-c",
            str(conf),
            f"--var=DBDIR={d}/db",
            log="rspamd.out",
        )
        self._wait_port("rspamd")
        return self


class ClamavMilter(_Peer):
    """clamd with one private signature (EICAR), clamav-milter rejecting what it finds."""

    missing = _which("clamd", "clamav-milter")
    grace = 1.0

    def start(self) -> ClamavMilter:
        d = self.dir
        db = d / "db"
        db.mkdir(exist_ok=True)
        (db / "mailgate.ndb").write_text(f"Mailgate.Test.EICAR:0:*:{EICAR.hex()}\n")
        sock = d / "clamd.sock"
        (d / "clamd.conf").write_text(
            f"LocalSocket {sock}\nDatabaseDirectory {db}\nForeground yes\n"
            f"LogFile {d}/clamd.log\nPidFile {d}/clamd.pid\nTemporaryDirectory {d}\n"
        )
        (d / "milter.conf").write_text(
            f"MilterSocket inet:{self.port}@127.0.0.1\nClamdSocket unix:{sock}\n"
            f"Foreground yes\nLogFile {d}/milter.log\nPidFile {d}/milter.pid\n"
            f"OnInfected Reject\nRejectMsg Virus %v detected\nAddHeader Replace\n"
            f"TemporaryDirectory {d}\n"
        )
        clamd = self._spawn(_program("clamd"), "-c", str(d / "clamd.conf"), log="clamd.out")
        wait_until(lambda: sock.exists() or clamd.poll() is not None, "clamd's socket", 60)
        self._spawn(_program("clamav-milter"), "-c", str(d / "milter.conf"), log="milter.out")
        self._wait_port("clamav-milter")
        return self
