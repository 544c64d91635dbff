"""Postfix's ``smtp-sink`` as a real next hop for end-to-end tests, dumping every transaction.

    with PostfixSink("127.0.0.5", port, dump_dir, "-8") as sink:   # -8: no 8BITMIME, -e: no ESMTP
        ... deliver ...
        [msg] = sink.wait_for(1, timeout=10)
        msg.mail_args, msg.content

The dump (``-d``) holds what smtp-sink received, line by line with LF ends (CRLF and the
dot-stuffing are undone), after headers of its own (``X-Mail-Args:`` is the MAIL command's
arguments) and a three-line ``Received:``, followed by one empty line of its own.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.support.gateway import accepts
from tests.support.wait import wait_until

SMTP_SINK = shutil.which("smtp-sink") or (
    "/usr/sbin/smtp-sink" if Path("/usr/sbin/smtp-sink").exists() else None
)


@dataclass
class DumpedMessage:
    mail_args: str  # "<a@example.org> SIZE=123 BODY=8BITMIME"
    rcpt_args: list[str]
    proto: str  # SMTP or ESMTP
    content: bytes  # the message with LF line ends

    @property
    def lines(self) -> list[bytes]:
        return self.content.split(b"\n")[:-1]


def parse_dump(data: bytes) -> DumpedMessage | None:
    """One dump file; None while it is still being written."""
    if not data.endswith(b"\n\n"):
        return None
    lines = data[:-1].split(b"\n")
    mail_args, proto, rcpts = "", "", []
    i = 0
    while i < len(lines) and not lines[i].startswith(b"Received: "):
        name, _, value = lines[i].partition(b": ")
        if name == b"X-Mail-Args":
            mail_args = value.decode()
        elif name == b"X-Rcpt-Args":
            rcpts.append(value.decode())
        elif name == b"X-Client-Proto":
            proto = value.decode()
        i += 1
    i += 1
    while i < len(lines) and lines[i][:1] == b"\t":
        i += 1  # the rest of smtp-sink's own Received:
    return DumpedMessage(mail_args, rcpts, proto, b"\n".join(lines[i:]))


class PostfixSink:
    def __init__(self, host: str, port: int, dump_dir: Path, *flags: str) -> None:
        if SMTP_SINK is None:
            raise RuntimeError("smtp-sink is not installed")
        self.host, self.port, self.dir = host, port, dump_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        cmd = [SMTP_SINK, *flags, "-d", f"{self.dir}/%M."]
        if os.geteuid() == 0:
            # As root it insists on a user to run as; stay this one, so it can write the dump.
            cmd += ["-u", pwd.getpwuid(os.geteuid()).pw_name]
        self.cmd = [*cmd, f"{host}:{port}", "32"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> PostfixSink:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(self._listening, "smtp-sink to listen", timeout)
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise RuntimeError(f"smtp-sink exited: {err}")
        return accepts(self.host, self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def messages(self) -> list[DumpedMessage]:
        out = []
        for path in sorted(self.dir.iterdir(), key=lambda p: p.stat().st_mtime_ns):
            msg = parse_dump(path.read_bytes())
            if msg is not None:
                out.append(msg)
        return out

    def wait_for(self, count: int, timeout: float) -> list[DumpedMessage]:
        return wait_until(
            lambda: len(msgs := self.messages()) >= count and msgs,
            lambda: f"{count} messages at smtp-sink (got {len(self.messages())})",
            timeout,
        )

    def __enter__(self) -> PostfixSink:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
