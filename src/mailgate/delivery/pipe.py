"""Mailer programs: Sendmail's ``prog`` mailer (aliases ``"|command"``: ``/bin/sh -c
command``) and the programs other mailers run (``delivery.uucp``: uux), through one
``run_mailer``: the message on the program's stdin, its exit status judged as Sendmail's
(``delivery.sysexits``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

from mailgate.delivery.local import (
    CHUNK,
    LfConverter,
    LocalDeliveryError,
    return_path_header,
)
from mailgate.delivery.sysexits import exit_reply
from mailgate.reply import Reply

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"  # a mailer program's PATH
TIMEOUT = 600.0  # seconds a mailer program may run
_STDERR_KEEP = 4096  # enough for the first line; the rest is drained and dropped
_STDERR_GRACE = 1.0  # a backgrounded grandchild may hold stderr open after the shell exits


async def _read_stderr(stream: asyncio.StreamReader, kept: bytearray) -> None:
    """Keep the start of stderr and drain the rest, so the program never blocks on a full pipe."""
    while chunk := await stream.read(CHUNK):
        if len(kept) < _STDERR_KEEP:
            kept += chunk[: _STDERR_KEEP - len(kept)]


async def _feed(proc: asyncio.subprocess.Process, source: Path, offset: int, head: bytes) -> None:
    stdin = proc.stdin
    assert stdin is not None
    conv = LfConverter()
    f = open(source, "rb")  # noqa: SIM115 - closed in finally, after reads in worker threads
    try:
        f.seek(offset)
        stdin.write(head)
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


def find_program(name: str) -> str | None:
    """The file to exec for a mailer's program: a path as written, a bare name looked up in
    the daemon's PATH (None when it is in none of its folders)."""
    return name if "/" in name else shutil.which(name)


async def run_mailer(
    argv: Sequence[str],
    head: bytes,
    source: Path,
    offset: int,
    *,
    name: str,
    env: Mapping[str, str],
    executable: str | None = None,
    timeout: float = TIMEOUT,
) -> None:
    """Run a mailer program and judge it by its exit status, as Sendmail's non-SMTP mailers.

    ``argv`` runs (``executable`` is the file, else ``argv[0]``) in its own session, in
    ``/``, with only ``env``; its stdin gets ``head`` then the content with LF line ends; its
    stdout is dropped and the start of its stderr kept. The exit status means what
    ``sysexits.exit_reply`` says (``name``, the mailer's, is in its texts). A program that
    cannot be started is temporary, as is one still running after ``timeout`` seconds, which
    is killed with its whole process group. Raises LocalDeliveryError.
    """
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()
    program = executable or argv[0]
    try:
        transport, protocol = await loop.subprocess_exec(
            lambda: _Protocol(exited, loop),
            *argv,
            executable=program,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env),
            cwd="/",
            start_new_session=True,
        )
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise LocalDeliveryError(Reply(451, "4.3.0", f"Cannot exec {program}: {why}")) from exc
    proc = asyncio.subprocess.Process(transport, protocol, loop)

    assert proc.stderr is not None
    stderr = bytearray()
    err_task = asyncio.create_task(_read_stderr(proc.stderr, stderr))
    try:
        try:
            async with asyncio.timeout(timeout):
                await _feed(proc, source, offset, head)
                # Not proc.wait(): it also waits for stderr to close, which a
                # backgrounded grandchild may keep open long after the program exited.
                await asyncio.shield(exited)
        except TimeoutError:
            _kill(proc)
            raise LocalDeliveryError(
                Reply(451, "4.3.0", f"mailer {name} timed out after {timeout:g} s")
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
    reply = exit_reply(status, name, _first_line(stderr))
    if reply is not None:
        raise LocalDeliveryError(reply)


async def deliver_program(
    command: str,
    source: Path,
    offset: int,
    *,
    sender: str,
    recipient: str,
    timeout: float = TIMEOUT,
) -> None:
    """Sendmail's ``prog`` mailer: pipe the message into ``/bin/sh -c command``.

    stdin gets ``Return-Path: <sender>`` then the content; the environment holds only
    ``PATH``, ``HOME``, ``SHELL``, ``SENDER`` and ``RECIPIENT``. Exit status, timeout and
    failures to start as ``run_mailer``. Raises LocalDeliveryError.
    """
    env = {
        "PATH": SAFE_PATH,
        "HOME": "/",
        "SHELL": "/bin/sh",
        "SENDER": sender,
        "RECIPIENT": recipient,
    }
    await run_mailer(
        ["/bin/sh", "-c", command],
        return_path_header(sender),
        source,
        offset,
        name="prog",
        env=env,
        timeout=timeout,
    )
