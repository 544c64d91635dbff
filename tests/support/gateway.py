"""Run the real ``mailgate serve`` daemon as a child process on loopback, for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from types import TracebackType

from mailgate import runstate
from tests.support.rawsmtp import RawSmtp
from tests.support.wait import wait_until


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def accepts(host: str, port: int) -> bool:
    """Does something listen at ``host:port`` (a connection is accepted, then closed)?"""
    try:
        socket.create_connection((host, port), timeout=0.5).close()
    except OSError:
        return False
    return True


def common_port(*hosts: str) -> int:
    """A TCP port free on each of ``hosts`` (servers that share one delivery port)."""
    for _ in range(100):
        port = free_port(hosts[0])
        try:
            for host in hosts[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free on all of {hosts}")


def mailgate_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mailgate.cli", *args]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        mailgate_command(*args), capture_output=True, text=True, timeout=timeout, check=False
    )


class GatewayProcess:
    """``mailgate serve -c <dir>/mailgate.toml`` with tables written into ``dir``."""

    def __init__(
        self,
        directory: Path,
        *,
        dns: str | None,
        hostname: str = "gateway.example.com",
        tables: dict[str, str] | None = None,
        settings: str = "",
        host: str = "127.0.0.1",
        port: int | None = None,
        ipv6: bool = False,
        log: str | None = None,
    ) -> None:
        """``settings`` is merged into the daemon's own (see :func:`merge_settings`): a key
        given there replaces the default here. ``port``: a free one unless given. ``ipv6``:
        also listen on [::1]:``port6``. ``log``: the ``[log]`` section's lines instead of
        ``file`` = `log_path`."""
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port(host)
        self.port6 = free_port("::1") if ipv6 else None
        self.log_path = self.dir / "maillog"
        self.proc: subprocess.Popen[bytes] | None = None
        for name, text in (tables or {}).items():
            (self.dir / name).write_text(text)
        listen = f'"{host}:{self.port}"' + (f', "[::1]:{self.port6}"' if ipv6 else "")
        dns_line = f'nameservers = ["{dns}"]\ntimeout = "2s"\n' if dns else ""
        self.config = self.dir / "mailgate.toml"
        self.config.write_text(
            merge_settings(
                f'hostname = "{hostname}"\nlisten = [{listen}]\nspool_dir = "spool"\n'
                f'[dns]\n{dns_line}[local]\nmaildir_root = "maildir"\n'
                "[log]\n" + (log if log is not None else f'file = "{self.log_path}"\n'),
                settings,
            )
        )

    @property
    def spool(self) -> Path:
        return self.dir / "spool"

    @property
    def maildir(self) -> Path:
        return self.dir / "maildir"

    def start(self, timeout: float = 15.0) -> GatewayProcess:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.stderr = open(self.dir / "stderr.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            mailgate_command("serve", "-c", str(self.config)),
            stdout=self.stderr,
            stderr=self.stderr,
            env=env,
            cwd=self.dir,
        )
        self._log_at_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        wait_until(self._listening, "mailgate to listen", timeout)
        return self

    def _listening(self) -> bool:
        """Ready: the state file says so. With workers the master binds the sockets before
        it forks, so a connection is accepted (into the backlog) before any worker serves,
        and a test that went on at once would signal workers that are still starting."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"mailgate exited with {self.proc.returncode}: "
                f"{(self.dir / 'stderr.log').read_text()}"
            )
        state = self._state_file()
        if state is None:  # no pid file, so no state file: a listening socket will do
            return accepts(self.host, self.port)
        found = runstate.read(state)
        if found is None:  # not written yet
            return False
        if found.pid == self.proc.pid:
            return found.phase == "ready"
        # A killed daemon's file that this one could not replace (the spool's disk is full):
        # its start line. No connection: a test may count them.
        with contextlib.suppress(OSError), open(self.log_path, "rb") as log:
            log.seek(self._log_at_start)
            return b"starting daemon (mailgate)" in log.read()
        return False

    def _state_file(self) -> Path | None:
        top = tomllib.loads(self.config.read_text())
        pid_file = top.get("pid_file", f"{top.get('spool_dir', 'spool')}/mailgate.pid")
        return runstate.state_path(self.dir / pid_file) if pid_file else None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.stderr.close()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.stderr.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        """The maillog once it holds ``text``."""
        return wait_until(
            lambda: text in (log := self.log()) and log,
            lambda: f"{text!r} in the maillog:\n{self.log()}",
            timeout,
        )

    def recovered(self) -> int:
        """The queued messages the start-up passes found ("recovered N queued message(s)";
        with workers, each its share)."""
        return sum(int(n) for n in re.findall(r"recovered (\d+) queued message", self.log()))

    def log_lines(self, *needles: str) -> list[str]:
        """The maillog lines that hold every one of ``needles``."""
        return [line for line in self.log().splitlines() if all(n in line for n in needles)]

    def smtp(
        self, source: str = "127.0.0.1", timeout: float = 10, helo: str = "client.example.net"
    ) -> smtplib.SMTP:
        """An smtplib client connected from ``source`` (another 127.x is another client)."""
        return smtplib.SMTP(
            self.host, self.port, timeout=timeout, source_address=(source, 0), local_hostname=helo
        )

    def raw(self, source: str = "127.0.0.1", timeout: float = 10) -> RawSmtp:
        """A raw client (tests/support/rawsmtp.py) connected from ``source``."""
        return RawSmtp(self.host, self.port, source=source, timeout=timeout)

    def queued(self) -> list[str]:
        q = self.spool / "queue"
        if not q.exists():
            return []
        return sorted(p.name for p in q.iterdir() if not p.name.endswith((".st", ".tmp")))

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def merge_settings(*fragments: str) -> str:
    """TOML fragments as one document: the root keys, then each ``[section]`` once with the
    keys every fragment gave it; a key given again replaces the earlier one (in its place).
    Each ``[[array]]`` entry stays an entry of its own, in the order given."""
    sections: dict[str, dict[str, str]] = {"": {}}
    entries = 0
    for fragment in fragments:
        section = ""
        for line in fragment.splitlines():
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            if text.startswith("[["):
                entries += 1
                section = f"{text}\0{entries}"
                sections[section] = {}
                continue
            if text.startswith("["):
                section = text
                sections.setdefault(section, {})
                continue
            key, eq, _ = text.partition("=")
            if not eq:
                raise ValueError(f"not a 'key = value' line (one line each here): {line!r}")
            sections[section][key.strip()] = text
    out = list(sections.pop("").values())
    for name, lines in sections.items():
        out += [name.partition("\0")[0], *lines.values()]
    return "\n".join(out) + "\n"
