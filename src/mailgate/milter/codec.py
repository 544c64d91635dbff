"""The milter wire format, MTA side: packets we send, packets a filter answers with.

Sans-IO and stateless: ``encode_*`` build one framed packet (a 4-byte big-endian length that
counts the command byte, the command byte, its data); :class:`PacketReader` cuts received
bytes into packets; :func:`parse_reply` turns one packet from a filter into its typed reply,
refusing anything that does not follow the protocol (a missing NUL, bytes left over, an
unknown command) with :class:`MilterProtocolError`. Which reply is allowed when is the state
machine's business (``milter/session.py``).

The protocol is Sendmail's libmilter (``include/libmilter/mfdef.h``) as Postfix re-implemented
it (``src/milter/milter8.c``); the values below are theirs.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntFlag
from typing import Final, TypeAlias

VERSION: Final = 6  # the protocol version we speak (Sendmail 8.14+, Postfix 2.6+)
OLDEST_VERSION: Final = 2  # a filter may answer with an older version (Postfix accepts 2..6)

# How long one packet's data may be. A filter that sets SMFIP_MDS_256K or SMFIP_MDS_1M in its
# answer to OPTNEG may send (and be sent) that much; 64 KiB otherwise (libmilter's limits).
MAX_DATA_64K: Final = 65535
MAX_DATA_256K: Final = 256 * 1024 - 1
MAX_DATA_1M: Final = 1024 * 1024 - 1
# The most we ever read into memory for one packet from a filter, whatever it negotiated.
MAX_PACKET: Final = MAX_DATA_1M + 1


class Action(IntFlag):
    """SMFIF_*: what a filter may do at end of message (its OPTNEG answer asks for them)."""

    ADDHDRS = 0x01
    CHGBODY = 0x02
    ADDRCPT = 0x04
    DELRCPT = 0x08
    CHGHDRS = 0x10
    QUARANTINE = 0x20
    CHGFROM = 0x40
    ADDRCPT_PAR = 0x80
    SETSYMLIST = 0x100


ALL_ACTIONS: Final = Action(0x1FF)


class Step(IntFlag):
    """SMFIP_*: the protocol steps a filter does not want, will not answer, and extensions."""

    NOCONNECT = 0x01
    NOHELO = 0x02
    NOMAIL = 0x04
    NORCPT = 0x08
    NOBODY = 0x10
    NOHDRS = 0x20
    NOEOH = 0x40
    NR_HDR = 0x80
    NOUNKNOWN = 0x100
    NODATA = 0x200
    SKIP = 0x400
    RCPT_REJ = 0x800
    NR_CONN = 0x1000
    NR_HELO = 0x2000
    NR_MAIL = 0x4000
    NR_RCPT = 0x8000
    NR_DATA = 0x10000
    NR_UNKN = 0x20000
    NR_EOH = 0x40000
    NR_BODY = 0x80000
    HDR_LEADSPC = 0x100000
    MDS_256K = 0x10000000
    MDS_1M = 0x20000000


# The steps version 6 defines, which we offer (Postfix's MILTER8_V6_PROTO_MASK and the data
# sizes); the "do not send" steps each version knows, for a filter answering with an older one.
ALL_STEPS: Final = Step(0x1FFFFF) | Step.MDS_256K | Step.MDS_1M
NOSEND_V2: Final = Step(0x7F & ~Step.NR_HDR)  # NOCONNECT .. NOEOH
NOSEND_V3: Final = NOSEND_V2 | Step.NOUNKNOWN
NOSEND_V4: Final = NOSEND_V3 | Step.NODATA
NOSEND_ALL: Final = NOSEND_V4

# Commands, MTA → filter.
ABORT: Final = b"A"
BODY: Final = b"B"
CONNECT: Final = b"C"
MACRO: Final = b"D"
BODYEOB: Final = b"E"
HELO: Final = b"H"
HEADER: Final = b"L"
MAIL: Final = b"M"
EOH: Final = b"N"
OPTNEG: Final = b"O"
QUIT: Final = b"Q"
QUIT_NC: Final = b"K"  # quit, a new connection follows on this one (Sendmail 8.14+)
RCPT: Final = b"R"
DATA: Final = b"T"
UNKNOWN: Final = b"U"

# Address families of the CONNECT packet.
FAMILY_UNKNOWN: Final = b"U"
FAMILY_UNIX: Final = b"L"
FAMILY_INET: Final = b"4"
FAMILY_INET6: Final = b"6"

# The macro list numbers of an OPTNEG answer (SMFIM_*), by the command whose macros they are.
MACRO_STAGES: Final[dict[int, bytes]] = {
    0: CONNECT,
    1: HELO,
    2: MAIL,
    3: RCPT,
    4: DATA,
    5: BODYEOB,
    6: EOH,
}

_LONG = struct.Struct("!L")
_HEAD = struct.Struct("!Lc")


class MilterProtocolError(Exception):
    """The filter broke the protocol; the connection cannot be trusted any more."""


# -- MTA → filter ------------------------------------------------------------------------------


def packet(command: bytes, data: bytes = b"") -> bytes:
    """One framed packet."""
    return _HEAD.pack(len(data) + 1, command) + data


def _cstrings(strings: Sequence[str]) -> bytes:
    """Strings as NUL-terminated wire strings, one after the other: joined as text and
    encoded once (one call, not one per string; the events carry dozens of strings). Each
    string is checked for a NUL as ``_text`` does: the joined text has one per string."""
    text = "\0".join(strings) + "\0"
    if text.count("\0") != len(strings):
        raise ValueError(f"NUL in a milter string: {strings!r}")
    return text.encode("utf-8", "surrogateescape")


def _text(value: str) -> bytes:
    """A string as it goes on the wire: UTF-8, and the bytes a client sent in non-UTF-8 (kept
    as surrogates) back as they were. A NUL would end the string early: none can come from
    SMTP (the protocol refuses it), so one here is a bug."""
    data = value.encode("utf-8", "surrogateescape")
    # ``0 in``, not ``b"\0" in``: bytes' ``in`` first tries its operand as an int, and a
    # bytes operand costs a TypeError made (its message formatted) and cleared each time.
    if 0 in data:
        raise ValueError(f"NUL in a milter string: {value!r}")
    return data


def encode_optneg(version: int, actions: int, steps: int) -> bytes:
    return packet(OPTNEG, _LONG.pack(version) + _LONG.pack(actions) + _LONG.pack(steps))


def encode_macros(stage: bytes, macros: Sequence[tuple[str, str]]) -> bytes:
    """The macros of one stage (``stage`` is that event's command byte), name then value."""
    return packet(MACRO, stage + _cstrings([s for pair in macros for s in pair]))


def encode_connect(hostname: str, family: bytes, port: int, address: str) -> bytes:
    data = _text(hostname) + b"\0" + family
    if family != FAMILY_UNKNOWN:
        data += struct.pack("!H", port) + _text(address) + b"\0"
    return packet(CONNECT, data)


def encode_helo(name: str) -> bytes:
    return packet(HELO, _text(name) + b"\0")


def encode_args(command: bytes, args: Sequence[str]) -> bytes:
    """MAIL or RCPT: ``<address>`` then each ESMTP parameter, each its own string."""
    return packet(command, _cstrings(args))


def encode_header(name: str, value: str) -> bytes:
    return packet(HEADER, _cstrings((name, value)))


def encode_body(chunk: bytes) -> bytes:
    return packet(BODY, chunk)


def encode_unknown(line: str) -> bytes:
    return packet(UNKNOWN, _text(line) + b"\0")


def encode_bare(command: bytes) -> bytes:
    """A packet without data: DATA, EOH, end of body, ABORT, QUIT, QUIT_NC."""
    return packet(command)


# -- filter → MTA ------------------------------------------------------------------------------


class PacketReader:
    """Received bytes in, whole packets out (``(command byte, data)``), each checked for its
    length: at least the command byte, at most ``limit`` bytes of data."""

    def __init__(self, limit: int = MAX_PACKET) -> None:
        self.limit = limit
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def pending(self) -> int:
        return len(self._buf)

    def packets(self) -> Iterator[tuple[int, bytes]]:
        while (packet := self.next()) is not None:
            yield packet

    def next(self) -> tuple[int, bytes] | None:
        """The next whole packet, or None until more bytes come."""
        buf = self._buf
        if len(buf) < 4:
            return None
        (length,) = _LONG.unpack_from(buf)
        if length < 1:
            raise MilterProtocolError(f"packet length {length}")
        if length - 1 > self.limit:
            raise MilterProtocolError(f"packet of {length - 1} bytes (limit {self.limit})")
        if len(buf) < 4 + length:
            return None
        command = buf[4]
        data = bytes(buf[5 : 4 + length])
        del buf[: 4 + length]
        return command, data


@dataclass(frozen=True, slots=True)
class Negotiation:
    """A filter's answer to OPTNEG: its version, the actions it wants, the steps it wants
    left out, and the macro lists it wants instead of ours (by the command they go with)."""

    version: int
    actions: Action
    steps: Step
    macros: dict[bytes, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class Verdict:
    """A filter's answer that ends an event: ``c`` continue, ``a`` accept, ``r`` reject,
    ``t`` tempfail, ``d`` discard, ``s`` skip, ``f`` connection failure; ``y`` with its
    ``reply`` text (``"554 5.7.1 text"``, maybe several CRLF-separated lines)."""

    kind: str
    reply: str | None = None


@dataclass(frozen=True, slots=True)
class Progress:
    """``p``: the filter is still working; the MTA's timer starts again."""


@dataclass(frozen=True, slots=True)
class Quarantine:
    """``q``: put the message on hold with this reason (not a verdict: more follows)."""

    reason: str


@dataclass(frozen=True, slots=True)
class AddHeader:
    """``h``: append a header field."""

    name: str
    value: str


@dataclass(frozen=True, slots=True)
class InsertHeader:
    """``i``: insert a header field at ``index`` (0 is the top of the header)."""

    index: int
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ChangeHeader:
    """``m``: change the ``index``-th field named ``name`` (from 1); an empty value deletes it."""

    index: int
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ChangeSender:
    """``e``: a new envelope sender, with ESMTP parameters (one string, may be empty)."""

    address: str
    args: str


@dataclass(frozen=True, slots=True)
class AddRecipient:
    """``+``, or ``2`` (``par``) with ESMTP parameters (one string, may be empty)."""

    address: str
    args: str = ""
    par: bool = False


@dataclass(frozen=True, slots=True)
class DeleteRecipient:
    """``-``"""

    address: str


@dataclass(frozen=True, slots=True)
class ReplaceBody:
    """``b``: the next chunk of the new body; chunks concatenate."""

    chunk: bytes


Modification: TypeAlias = (
    AddHeader
    | InsertHeader
    | ChangeHeader
    | ChangeSender
    | AddRecipient
    | DeleteRecipient
    | ReplaceBody
)
Reply: TypeAlias = Negotiation | Verdict | Progress | Quarantine | Modification


def required_action(reply: Modification | Quarantine) -> Action:
    """The action a filter must have asked for in OPTNEG to send ``reply``."""
    if isinstance(reply, AddRecipient):
        return Action.ADDRCPT_PAR if reply.par else Action.ADDRCPT
    return _REQUIRED[type(reply)]


_REQUIRED: Final[dict[type, Action]] = {
    AddHeader: Action.ADDHDRS,
    InsertHeader: Action.ADDHDRS,
    ChangeHeader: Action.CHGHDRS,
    ChangeSender: Action.CHGFROM,
    DeleteRecipient: Action.DELRCPT,
    ReplaceBody: Action.CHGBODY,
    Quarantine: Action.QUARANTINE,
}


class _Data:
    """The data of one received packet, read field by field; every field must be whole and
    the data used up exactly."""

    def __init__(self, command: str, data: bytes) -> None:
        self.command = command
        self.data = data
        self.pos = 0

    def long(self) -> int:
        if len(self.data) - self.pos < 4:
            raise MilterProtocolError(f"'{self.command}' reply too short")
        (value,) = _LONG.unpack_from(self.data, self.pos)
        self.pos += 4
        return int(value)

    def string(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise MilterProtocolError(f"'{self.command}' reply: string without its NUL")
        value = self.data[self.pos : end].decode("utf-8", "surrogateescape")
        self.pos = end + 1
        return value

    @property
    def more(self) -> bool:
        return self.pos < len(self.data)

    def end(self) -> None:
        if self.more:
            raise MilterProtocolError(
                f"'{self.command}' reply followed by {len(self.data) - self.pos} bytes"
            )


_BARE_VERDICTS: Final = frozenset(b"cartdsf")
# One of each: a reply without data is the same every time (they are frozen).
_VERDICT_OF: Final = {c: Verdict(chr(c)) for c in _BARE_VERDICTS}
CONTINUE: Final = _VERDICT_OF[ord("c")]  # the one continue parse_reply hands out
_PROGRESS: Final = Progress()


def parse_reply(command: int, data: bytes) -> Reply:
    """One packet from a filter as its reply; MilterProtocolError if it is not one."""
    name = chr(command)
    if command in _BARE_VERDICTS or command == ord("p"):
        if data:
            raise MilterProtocolError(f"'{name}' reply followed by {len(data)} bytes")
        return _PROGRESS if name == "p" else _VERDICT_OF[command]
    if name == "b":
        return ReplaceBody(data)
    if name == "y":
        # Not a C string for Postfix (it reads the whole buffer); libmilter sends the NUL.
        text = data[:-1] if data.endswith(b"\0") else data
        if 0 in text:
            raise MilterProtocolError("'y' reply holds a NUL")
        return Verdict("y", text.decode("utf-8", "surrogateescape"))
    fields = _Data(name, data)
    reply: Reply
    if name == "O":
        version, actions, steps = fields.long(), fields.long(), fields.long()
        macros: dict[bytes, tuple[str, ...]] = {}
        while fields.more:
            stage = fields.long()
            names = tuple(fields.string().split())
            if stage in MACRO_STAGES:  # an unknown list number is ignored, as Postfix does
                macros[MACRO_STAGES[stage]] = names
        return Negotiation(version, Action(actions), Step(steps), macros)
    if name == "q":
        reply = Quarantine(fields.string())
    elif name == "h":
        reply = AddHeader(fields.string(), fields.string())
    elif name in "im":
        index = fields.long()
        cls = InsertHeader if name == "i" else ChangeHeader
        reply = cls(index, fields.string(), fields.string())
    elif name in "e2":
        address = fields.string()
        args = fields.string() if fields.more else ""
        reply = (
            ChangeSender(address, args) if name == "e" else AddRecipient(address, args, par=True)
        )
    elif name == "+":
        reply = AddRecipient(fields.string())
    elif name == "-":
        reply = DeleteRecipient(fields.string())
    else:
        raise MilterProtocolError(f"unknown reply {name!r}")
    fields.end()
    return reply
