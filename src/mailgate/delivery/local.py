"""Local delivery: Maildir for local users, mbox append for alias file targets.

The delivery functions are blocking (file I/O and fsync); their mailers (``MaildirMailer``,
``FileMailer`` in ``delivery/mailers.py``) run them in a worker thread.
The spool hands us ``(source, offset)``: the file holding the message and where its content
(CRLF line ends, headers then body) starts.  Content is streamed in 64 KiB chunks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from mailgate.reply import Reply
from mailgate.users import getpw, resolve_local_user

CHUNK = 64 * 1024

# Maildir unique names need a per-process counter; deliveries run in several threads.
_counter = itertools.count(1)
_counter_lock = threading.Lock()

_FROM_ = b"From "


class LocalDeliveryError(Exception):
    """A local delivery failed; ``reply`` says how (4xx: retry later, 5xx: bounce)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply

    @property
    def temporary(self) -> bool:
        return self.reply.is_temporary


# --------------------------------------------------------------------------- line-end conversion


class LfConverter:
    """Streaming CRLF -> LF conversion, optionally quoting ``From `` at line starts (mbox).

    Carries at most a few bytes between chunks (a trailing CR, or a line start that may grow
    into ``From ``), so memory stays bounded whatever the line lengths.
    """

    def __init__(self, *, quote_from: bool = False) -> None:
        self._carry = b""
        self._bol = True  # the next emitted byte starts a line
        self._quote = quote_from
        self.last_byte = b""  # last byte emitted, so callers can terminate the last line

    def feed(self, data: bytes) -> bytes:
        data = self._carry + data
        self._carry = b""
        if data.endswith(b"\r"):
            # Might be the first half of a CRLF split across chunks.
            self._carry = b"\r"
            data = data[:-1]
        data = data.replace(b"\r\n", b"\n")
        if self._quote and data:
            segments = data.split(b"\n")
            for i, seg in enumerate(segments):
                at_bol = i > 0 or self._bol
                if at_bol and seg.startswith(_FROM_):
                    segments[i] = b">" + seg
            last = segments[-1]
            at_bol = len(segments) > 1 or self._bol
            if at_bol and last and len(last) < len(_FROM_) and _FROM_.startswith(last):
                # Too short to decide; re-examine it with the next chunk.
                self._carry = last + self._carry
                segments[-1] = b""
            data = b"\n".join(segments)
        return self._emit(data)

    def flush(self) -> bytes:
        data, self._carry = self._carry, b""
        return self._emit(data)

    def _emit(self, data: bytes) -> bytes:
        if data:
            self._bol = data.endswith(b"\n")
            self.last_byte = data[-1:]
        return data


def iter_content(source: Path, offset: int) -> Iterator[bytes]:
    """Yield the raw message content from ``source`` starting at ``offset``, 64 KiB at a time."""
    with open(source, "rb") as f:
        f.seek(offset)
        while chunk := f.read(CHUNK):
            yield chunk


def iter_lf(source: Path, offset: int, *, quote_from: bool = False) -> Iterator[bytes]:
    """Yield the content with LF line ends (and ``>From `` quoting when asked)."""
    conv = LfConverter(quote_from=quote_from)
    for chunk in iter_content(source, offset):
        if out := conv.feed(chunk):
            yield out
    if out := conv.flush():
        yield out


def _clean(text: str) -> str:
    """Drop control characters so an envelope address cannot inject header lines."""
    return "".join(c for c in text if c >= " " and c != "\x7f")


def return_path_header(return_path: str) -> bytes:
    """``Return-Path: <sender>`` with LF (local files use the local line end)."""
    addr = _clean(return_path).strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1]
    return f"Return-Path: <{addr}>\n".encode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------- Maildir


def _unique_name(hostname: str) -> str:
    """``<sec>.M<usec>P<pid>Q<n>.<host>`` as the Maildir spec describes."""
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    with _counter_lock:
        n = next(_counter)
    # The spec asks for "/" and ":" in the host name to be written as octal escapes.
    host = hostname.replace("/", "\\057").replace(":", "\\072")
    return f"{sec}.M{usec}P{os.getpid()}Q{n}.{host}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _chown(path: Path | int, owner: tuple[int, int] | None) -> None:
    """Best effort: a failed chown must not lose the message (it is still readable by root)."""
    if owner is None:
        return
    with contextlib.suppress(OSError):
        os.chown(path, *owner)


def _os_error_reply(exc: OSError, what: str) -> Reply:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        return Reply(452, "4.3.1", f"{what}: {reason}")
    if exc.errno == errno.EDQUOT:
        return Reply(452, "4.2.2", f"{what}: {reason}")
    return Reply(451, "4.3.0", f"{what}: {reason}")


def deliver_maildir(
    user: str,
    maildir_root: Path,
    source: Path,
    offset: int,
    *,
    hostname: str,
    return_path: str,
    delivered_to: str,
) -> Path:
    """Deliver one message into ``<maildir_root>/<user>/new/`` and return the file's path.

    The user is matched as :func:`resolve_local_user` says; an unknown user raises a permanent
    ``550 5.1.1``.  ``tmp``, ``new`` and ``cur`` are created (mode 0700) if missing.  The file
    gets ``Return-Path`` and ``Delivered-To`` headers, then the content with LF line ends; it
    is fsync'd in ``tmp/``, renamed into ``new/``, and ``new/`` is fsync'd, so the message is
    durable when this returns.  Any OS error (full disk, permissions, a file where the
    mailbox folder should be) raises a temporary ``LocalDeliveryError``.

    Ownership: when running as root, folders and files created here are chowned (best effort)
    to the user's passwd account, or, for a folder-only user, to the owner of its folder.
    """
    name = resolve_local_user(user, maildir_root)
    if name is None:
        raise LocalDeliveryError(Reply(550, "5.1.1", f"<{_clean(delivered_to)}>... User unknown"))
    box = maildir_root / name
    tmp_file: Path | None = None
    try:
        owner: tuple[int, int] | None = None
        if os.geteuid() == 0:
            pw = getpw(name)
            if pw is not None:
                owner = (pw.pw_uid, pw.pw_gid)
            elif os.path.isdir(box):
                st = os.stat(box)
                owner = (st.st_uid, st.st_gid)
        if os.path.lexists(box) and not os.path.isdir(box):
            raise LocalDeliveryError(
                Reply(451, "4.3.0", f"<{_clean(delivered_to)}>... Mailbox {box} is not a folder")
            )
        maildir_root.mkdir(parents=True, exist_ok=True)
        for sub in (box, box / "tmp", box / "new", box / "cur"):
            try:
                sub.mkdir(mode=0o700)
            except FileExistsError:
                continue
            _chown(sub, owner)

        headers = return_path_header(return_path) + (
            f"Delivered-To: {_clean(delivered_to)}\n".encode("utf-8", "surrogateescape")
        )
        # O_EXCL: never overwrite, even if two processes share a pid namespace oddly.
        for _ in range(10):
            unique = _unique_name(hostname)
            tmp_file = box / "tmp" / unique
            try:
                fd = os.open(tmp_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                break
            except FileExistsError:
                tmp_file = None
        else:
            raise LocalDeliveryError(Reply(451, "4.3.0", "Cannot find a unique Maildir name"))
        # Buffered: a raw write may be short, the buffered writer loops until all is written.
        with os.fdopen(fd, "wb", buffering=CHUNK) as f:
            f.write(headers)
            for chunk in iter_lf(source, offset):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
            _chown(f.fileno(), owner)
        final = box / "new" / unique
        os.rename(tmp_file, final)
        tmp_file = None
        _fsync_dir(box / "new")
        return final
    except OSError as exc:
        raise LocalDeliveryError(
            _os_error_reply(exc, f"<{_clean(delivered_to)}>... {box}")
        ) from exc
    finally:
        if tmp_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_file)


# --------------------------------------------------------------------------- mbox file


def _lock(fd: int, timeout: float) -> None:
    """fcntl (POSIX) lock, polled so that a stuck holder gives a temporary error, not a hang."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def deliver_file(
    path: Path, source: Path, offset: int, *, return_path: str, lock_timeout: float = 30.0
) -> None:
    """Append the message to the mailbox file ``path`` in mbox format (alias ``/file`` targets).

    Writes ``From <sender> <ctime>``, ``Return-Path``, the content with LF line ends and lines
    starting ``From `` quoted as ``>From `` (as Sendmail's F=E; ``>From`` lines are left as
    they are), then a blank line.  The file is locked with fcntl while writing, fsync'd, and
    truncated back to its old size if anything fails, so a reader never sees half a message.
    ``/dev/null`` accepts everything.  OS errors raise a temporary ``LocalDeliveryError``.
    """
    if str(path) == os.devnull:
        return
    if not path.is_absolute():
        raise LocalDeliveryError(Reply(554, "5.3.0", f"{path}... Not an absolute file name"))
    sender = _clean(return_path).strip().removeprefix("<").removesuffix(">")
    # The From_ line is split on spaces by readers, so keep the sender one word.
    from_line = f"From {'_'.join(sender.split()) or 'MAILER-DAEMON'} {time.asctime()}\n".encode(
        "utf-8", "surrogateescape"
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as exc:
        raise LocalDeliveryError(_os_error_reply(exc, f"{path}... Cannot open")) from exc
    size: int | None = None
    try:
        _lock(fd, lock_timeout)
        size = os.fstat(fd).st_size
        conv = LfConverter(quote_from=True)
        with os.fdopen(os.dup(fd), "wb", buffering=CHUNK) as f:
            f.write(from_line)
            f.write(return_path_header(return_path))
            for chunk in iter_content(source, offset):
                f.write(conv.feed(chunk))
            f.write(conv.flush())
            if conv.last_byte not in (b"\n", b""):
                f.write(b"\n")
            f.write(b"\n")  # the blank line that separates mbox messages
            f.flush()
            os.fsync(f.fileno())
        size = None
    except OSError as exc:
        if size is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
        raise LocalDeliveryError(_os_error_reply(exc, f"{path}... Cannot write")) from exc
    finally:
        os.close(fd)  # closing releases the fcntl lock
