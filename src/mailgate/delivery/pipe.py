"""Program delivery (aliases ``"|command"``), as Sendmail's prog mailer: ``/bin/sh -c command``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from mailgate.delivery.local import (
    CHUNK,
    LfConverter,
    LocalDeliveryError,
    return_path_header,
)
from mailgate.reply import Reply

EX_TEMPFAIL = 75
_STDERR_KEEP = 4096  # enough for the first line; the rest is drained and dropped
_STDERR_GRACE = 1.0  # a backgrounded grandchild may hold stderr open after the shell exits


async def _read_stderr(stream: asyncio.StreamReader, kept: bytearray) -> None:
    """Keep the start of stderr and drain the rest, so the program never blocks on a full pipe."""
    while chunk := await stream.read(CHUNK):
        if len(kept) < _STDERR_KEEP:
            kept += chunk[: _STDERR_KEEP - len(kept)]


async def _feed(proc: asyncio.subprocess.Process, source: Path, offset: int, sender: str) -> None:
    stdin = proc.stdin
    assert stdin is not None
    conv = LfConverter()
    f = open(source, "rb")  # noqa: SIM115 - closed in finally, after reads in worker threads
    try:
        f.seek(offset)
        stdin.write(return_path_header(sender))
        while True:
            # File reads may block on a cold cache; keep them off the event loop.
            chunk = await asyncio.to_thread(f.read, CHUNK)
            if not chunk:
                break
            stdin.write(conv.feed(chunk))
            await stdin.drain()
        stdin.write(conv.flush())
        await stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        # The program may legitimately exit without reading everything; its exit code decides.
        pass
    finally:
        f.close()
        stdin.close()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await stdin.wait_closed()


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Signals the program's exit at once, independent of its pipes."""

    def __init__(self, exited: asyncio.Future[None], loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=CHUNK, loop=loop)
        self._exited = exited

    def process_exited(self) -> None:
        super().process_exited()
        if not self._exited.done():
            self._exited.set_result(None)


def _kill(proc: asyncio.subprocess.Process) -> None:
    # The shell runs in its own session: kill the whole group, or a child would live on.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _first_line(data: bytes | bytearray) -> str:
    for line in data.decode("utf-8", "replace").splitlines():
        text = "".join(c for c in line if c >= " " and c != "\x7f").strip()
        if text:
            return text[:400]
    return ""


async def deliver_program(
    command: str,
    source: Path,
    offset: int,
    *,
    sender: str,
    recipient: str,
    timeout: float = 600,
) -> None:
    """Pipe the message into ``/bin/sh -c command`` and judge the result by its exit status.

    stdin gets ``Return-Path: <sender>`` then the content with LF line ends; the environment
    holds only ``PATH``, ``HOME``, ``SHELL``, ``SENDER`` and ``RECIPIENT``; the working folder
    is ``/``.  Exit 0 = delivered; 75 (EX_TEMPFAIL) or death by a signal = temporary (451);
    any other status = permanent ``554 5.3.0`` with the first line of stderr.  After
    ``timeout`` seconds the program (its whole process group) is killed: temporary.
    Raises LocalDeliveryError.
    """
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/",
        "SHELL": "/bin/sh",
        "SENDER": sender,
        "RECIPIENT": recipient,
    }
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()
    try:
        transport, protocol = await loop.subprocess_exec(
            lambda: _Protocol(exited, loop),
            "/bin/sh",
            "-c",
            command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd="/",
            start_new_session=True,
        )
    except (OSError, ValueError) as exc:
        raise LocalDeliveryError(Reply(451, "4.3.0", f"Cannot run program: {exc}")) from exc
    proc = asyncio.subprocess.Process(transport, protocol, loop)

    assert proc.stderr is not None
    stderr = bytearray()
    err_task = asyncio.create_task(_read_stderr(proc.stderr, stderr))
    try:
        try:
            async with asyncio.timeout(timeout):
                await _feed(proc, source, offset, sender)
                # Not proc.wait(): it also waits for stderr to close, which a
                # backgrounded grandchild may keep open long after the program exited.
                await asyncio.shield(exited)
        except TimeoutError:
            _kill(proc)
            raise LocalDeliveryError(
                Reply(451, "4.3.0", f"Program timed out after {timeout:g} s: {command}")
            ) from None
        except OSError as exc:  # the spool file vanished or could not be read
            _kill(proc)
            raise LocalDeliveryError(Reply(451, "4.3.0", f"Cannot read message: {exc}")) from exc
        except BaseException:
            # Cancelled (shutdown): never leave an orphan program behind.
            _kill(proc)
            raise
        # On timeout wait_for cancels the reader; what it kept so far is enough.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(err_task, _STDERR_GRACE)
    finally:
        err_task.cancel()
        transport.close()  # frees the pipes; the child is reaped by the loop's watcher
    status = transport.get_returncode()
    assert status is not None
    if status == 0:
        return
    line = _first_line(stderr)
    if status < 0:
        text = f"Program died with signal {-status}"
        raise LocalDeliveryError(Reply(451, "4.3.0", f"{text}: {line}" if line else text))
    if status == EX_TEMPFAIL:
        raise LocalDeliveryError(
            Reply(451, "4.3.0", line or "Program reported a temporary failure")
        )
    raise LocalDeliveryError(Reply(554, "5.3.0", line or f"unknown mailer error {status}"))
