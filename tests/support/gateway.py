"""Run the real ``mailgate serve`` daemon as a child process on loopback, for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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
        log: str | None = None,
    ) -> None:
        """``log``: the ``[log]`` section's lines (default: ``file`` = `log_path`)."""
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = free_port(host)
        self.log_path = self.dir / "maillog"
        self.proc: subprocess.Popen[bytes] | None = None
        for name, text in (tables or {}).items():
            (self.dir / name).write_text(text)
        dns_line = f'nameservers = ["{dns}"]\ntimeout = "2s"\n' if dns else ""
        self.config = self.dir / "mailgate.toml"
        self.config.write_text(
            f'hostname = "{hostname}"\n'
            f'listen = ["{host}:{self.port}"]\n'
            f'spool_dir = "spool"\n'
            + settings_root(settings)
            + f"[dns]\n{dns_line}"
            + '[local]\nmaildir_root = "maildir"\n'
            + "[log]\n"
            + (log if log is not None else f'file = "{self.log_path}"\n')
            + settings_sections(settings)
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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mailgate exited with {self.proc.returncode}: "
                    f"{(self.dir / 'stderr.log').read_text()}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.5),
            ):
                return self
            time.sleep(0.05)
        raise RuntimeError("mailgate did not start listening")

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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in maillog:\n{self.log()}")

    def smtp(self, source: str = "127.0.0.1", timeout: float = 10) -> smtplib.SMTP:
        """An smtplib client connected from ``source`` (another 127.x is another client)."""
        return smtplib.SMTP(
            self.host,
            self.port,
            timeout=timeout,
            source_address=(source, 0),
            local_hostname="client.example.net",
        )

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


def settings_root(settings: str) -> str:
    """Lines of ``settings`` before its first [section] header (root keys)."""
    out = []
    for line in settings.splitlines():
        if line.strip().startswith("["):
            break
        out.append(line)
    return "\n".join(out) + ("\n" if out else "")


def settings_sections(settings: str) -> str:
    lines = settings.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("["):
            return "\n".join(lines[i:]) + "\n"
    return ""
