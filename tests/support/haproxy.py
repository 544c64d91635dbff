"""Debian's real HAProxy, unprivileged on loopback, in front of a gateway's PROXY listeners.

The configuration has no chroot, user, group or stats socket, so it runs as any user; as root
(CI) it is run as ``nobody`` with ``runuser``, from a folder of its own that ``nobody`` can
read (pytest's tmp_path is the test user's alone). ``haproxy -c`` checks the file first, so a
mistake in it fails with HAProxy's own words instead of a hang. With ``netns`` (a
tests/support/netns.py namespace) it runs in that namespace: a balancer on another host.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from tests.support.gateway import accepts
from tests.support.netns import Netns
from tests.support.wait import wait_until

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

GLOBAL = """\
global
    maxconn 256
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
"""


def available() -> bool:
    return os.access(HAPROXY, os.X_OK)


class Haproxy:
    """``haproxy -db -f cfg`` with ``GLOBAL`` and ``sections``; ``frontends``: the
    (host, port) pairs it binds, waited for at start (from here: in a namespace, an address
    of its veth end)."""

    def __init__(
        self, sections: str, frontends: list[tuple[str, int]], netns: Netns | None = None
    ) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="mailgate-haproxy-"))
        self.folder.chmod(0o755)
        self.config = self.folder / "haproxy.cfg"
        self.config.write_text(GLOBAL + sections)
        self.config.chmod(0o644)
        self.frontends = frontends
        self.netns = netns
        self.output = self.folder / "output"
        self.proc: subprocess.Popen[bytes] | None = None

    def _command(self, *args: str) -> list[str]:
        command = [HAPROXY, *args, "-f", str(self.config)]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "nobody", "--", *command]
        return self.netns.command(command) if self.netns is not None else command

    def start(self) -> Haproxy:
        check = subprocess.run(
            self._command("-c"), capture_output=True, text=True, timeout=30, check=False
        )
        assert check.returncode == 0, f"haproxy -c: {check.stdout}{check.stderr}"
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(self._command("-db"), stdout=out, stderr=out)
        wait_until(self._listening, lambda: f"haproxy to listen: {self.log()}", 15)
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with {self.proc.returncode}: {self.log()}")
        return all(accepts(host, port) for host, port in self.frontends)

    def log(self) -> str:
        try:
            return self.output.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Haproxy:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
