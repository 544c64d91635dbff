"""One filter's side of an SMTP session, as a sans-IO state machine (MTA side).

``FilterSession`` knows what was negotiated and where the session is: each event method
(``connect``, ``helo``, ``mail``, ``rcpt``, ``data``, ``unknown``, ``header``, ``eoh``,
``body``, ``end_of_message``, ``abort``, ``quit``, ``quit_new_connection``) returns the bytes
to write (its macros first, then the event, or nothing at all when the filter asked not to
get it) and whether a reply must be read before the next event; received bytes go to
``receive_data`` and ``next_reply`` hands out the filter's replies one at a time, each checked
against the event it answers. No sockets, no clock: ``milter/client.py`` does the writing,
reading and timing.

What is checked, as Postfix's ``milter8.c`` does (and Sendmail's ``milter.c`` where they
differ in strictness): a negotiated version of 2..6 whose actions are a subset of the ones
offered; no reply without an event waiting for it; modifications and quarantine only in
answer to end of message, and only those the filter asked for; SKIP only for body chunks;
DISCARD not at connect or HELO; a reply code that is a 4xx or 5xx with a matching enhanced
code. Anything else is :class:`~mailgate.milter.codec.MilterProtocolError`, after which the
connection is useless (the caller applies the filter's default action).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import ClassVar, Final, NamedTuple, TypeAlias

from mailgate.milter import codec
from mailgate.milter.codec import Action, MilterProtocolError, Step
from mailgate.reply import Reply, split_enhanced


class Stage(str):
    """The events, by the names Sendmail's maillog lines give them (``action=``): one
    instance each, told apart by identity. Not an Enum: on Python 3.11 each read of an Enum
    class's member goes through EnumType's ``__getattr__`` hook, about five times a plain
    class attribute's cost, and every event reads several."""

    __slots__ = ()
    NEGOTIATE: ClassVar[Stage]
    CONNECT: ClassVar[Stage]
    HELO: ClassVar[Stage]
    MAIL: ClassVar[Stage]
    RCPT: ClassVar[Stage]
    DATA: ClassVar[Stage]
    UNKNOWN: ClassVar[Stage]
    HEADER: ClassVar[Stage]
    EOH: ClassVar[Stage]
    BODY: ClassVar[Stage]
    EOM: ClassVar[Stage]


_NAMES = ("negotiate", "connect", "helo", "mail", "rcpt", "data", "unknown", "header", "eoh")
for _name in (*_NAMES, "body", "eom"):
    setattr(Stage, _name.upper(), Stage(_name))


# Per stage: its command, the step that says "do not send it", the one that says "no reply".
_STEPS: Final[dict[Stage, tuple[bytes, Step, Step]]] = {
    Stage.CONNECT: (codec.CONNECT, Step.NOCONNECT, Step.NR_CONN),
    Stage.HELO: (codec.HELO, Step.NOHELO, Step.NR_HELO),
    Stage.MAIL: (codec.MAIL, Step.NOMAIL, Step.NR_MAIL),
    Stage.RCPT: (codec.RCPT, Step.NORCPT, Step.NR_RCPT),
    Stage.DATA: (codec.DATA, Step.NODATA, Step.NR_DATA),
    Stage.UNKNOWN: (codec.UNKNOWN, Step.NOUNKNOWN, Step.NR_UNKN),
    Stage.HEADER: (codec.HEADER, Step.NOHDRS, Step.NR_HDR),
    Stage.EOH: (codec.EOH, Step.NOEOH, Step.NR_EOH),
    Stage.BODY: (codec.BODY, Step.NOBODY, Step.NR_BODY),
    Stage.EOM: (codec.BODYEOB, Step(0), Step(0)),  # always sent, always answered
}
_CONNECTION_STAGES: Final = frozenset({Stage.CONNECT, Stage.HELO})
# Header and body packets carry no macros of their own (Sendmail sends none with them).
_MACRO_COMMANDS: Final = frozenset(codec.MACRO_STAGES.values())


class Outgoing(NamedTuple):
    """What an event puts on the wire, and whether its answer must be read now. (A tuple:
    one is made per event, and a frozen dataclass sets each field through
    ``object.__setattr__``.)"""

    data: bytes
    reply: bool

    @property
    def sent(self) -> bool:
        return bool(self.data)


NOTHING: Final = Outgoing(b"", False)


@functools.lru_cache(maxsize=256)
def macro_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """A list of macros as the wire names them (the same lists come on every connection)."""
    return tuple(macro_name(n) for n in names)


def macro_name(name: str) -> str:
    """A macro's name as the wire has it: one letter bare, longer ones in braces."""
    name = name.strip()
    if len(name) > 1 and not name.startswith("{"):
        return "{" + name + "}"
    return name


def smtp_reply(text: str) -> Reply:
    """A filter's reply code (``y``) as an SMTP reply: every line ``ddd`` or ``ddd-`` with the
    same 4xx/5xx code; an enhanced code, if given, in the first line, of the same class.
    Sendmail doubles ``%`` (it uses the text as a format); one ``%%`` is one ``%`` here."""
    lines = text.replace("\r\n", "\n").rstrip("\n").split("\n")
    code = lines[0][:3]
    if not (len(code) == 3 and code[0] in "45" and code.isdigit()):
        raise MilterProtocolError(f"reply code {text[:60]!r} is not a 4xx or 5xx reply")
    texts = []
    enhanced: str | None = None
    for i, line in enumerate(lines):
        if line[:3] != code or line[3:4] not in ("", " ", "-"):
            raise MilterProtocolError(f"reply code {text[:60]!r}: line {i + 1} is not {code}")
        rest = line[4:]
        found, after = split_enhanced(rest)
        if found is not None:
            if found[0] != code[0]:
                raise MilterProtocolError(f"reply code {text[:60]!r}: {found} with {code}")
            if i == 0:
                enhanced = found
            if found == enhanced:
                rest = after
        texts.append(rest.replace("%%", "%"))
    return Reply(int(code), enhanced, "\n".join(texts))


_Plan: TypeAlias = dict[Stage, tuple[bool, bool, bool]]


@functools.lru_cache(maxsize=64)
def _terms(version: int, steps: int, offered: int) -> tuple[Step, Step, int, _Plan, bool]:
    """What a filter's answer to OPTNEG means for each event: the steps in force, the
    events its version does not know, the largest body chunk, and per stage (not sent at
    all, declined, not answered) as plain bools, so that an event does no IntFlag arithmetic
    (each operation is a Python call); HDR_LEADSPC. The same answer comes on every
    connection to a filter: worked out once (the plan is only read)."""
    in_force = Step(steps) & Step(offered)
    # An older filter must not get events its version does not define (Postfix's np_mask).
    known = {2: codec.NOSEND_V2, 3: codec.NOSEND_V3}.get(version, codec.NOSEND_V4)
    not_sent = codec.NOSEND_ALL & ~known
    if version < 6:
        in_force &= codec.NOSEND_ALL | Step.NR_HDR
    chunk = codec.MAX_DATA_64K
    if in_force & Step.MDS_1M:
        chunk = codec.MAX_DATA_1M
    elif in_force & Step.MDS_256K:
        chunk = codec.MAX_DATA_256K
    plan = {
        stage: (
            bool(not_sent & not_wanted),
            bool(in_force & not_wanted),
            bool(in_force & no_reply),
        )
        for stage, (_, not_wanted, no_reply) in _STEPS.items()
    }
    return in_force, not_sent, chunk, plan, bool(in_force & Step.HDR_LEADSPC)


class FilterSession:
    """One filter connection's protocol state, from OPTNEG to QUIT."""

    def __init__(
        self,
        macro_lists: Mapping[bytes, Sequence[str]],
        *,
        actions: Action = codec.ALL_ACTIONS,
        steps: Step = codec.ALL_STEPS,
    ) -> None:
        """``macro_lists``: the macros to send with each event (by its command byte) unless
        the filter names its own in OPTNEG; ``actions`` and ``steps``: what we offer."""
        self.offered_actions = actions
        self.offered_steps = steps
        self.macro_lists = {k: macro_names(tuple(v)) for k, v in macro_lists.items()}
        self.reader = codec.PacketReader()
        self.version = 0
        self.actions = Action(0)
        self.steps = Step(0)
        self.not_sent = Step(0)  # events the filter's (older) version does not know
        self.chunk_size = codec.MAX_DATA_64K
        # Per stage, from the negotiation: (not sent at all, declined, not answered).
        self._plan: _Plan = {}
        self._leadspc = False
        self.awaiting: Stage | None = None
        self.open = False  # negotiated, and the connection not accepted or refused for good
        self.in_message = False  # from MAIL until end of message is answered, or ABORT
        self.message_accepted = False  # the filter wants no more events for this message
        self.skip_body = False  # SKIP was answered to a body chunk

    # -- negotiation ---------------------------------------------------------------------------
    def negotiate(self) -> bytes:
        self.awaiting = Stage.NEGOTIATE
        return codec.encode_optneg(codec.VERSION, self.offered_actions, self.offered_steps)

    def _negotiated(self, answer: codec.Negotiation) -> None:
        if not codec.OLDEST_VERSION <= answer.version <= codec.VERSION:
            raise MilterProtocolError(
                f"protocol version {answer.version} (we speak {codec.OLDEST_VERSION} to "
                f"{codec.VERSION})"
            )
        extra = answer.actions & ~self.offered_actions
        if extra:
            raise MilterProtocolError(
                f"actions 0x{int(answer.actions):x} beyond the 0x{int(self.offered_actions):x} "
                "offered"
            )
        self.version = answer.version
        self.actions = answer.actions
        self.steps, self.not_sent, self.chunk_size, self._plan, self._leadspc = _terms(
            answer.version, int(answer.steps), int(self.offered_steps)
        )
        for command, names in answer.macros.items():
            self.macro_lists[command] = macro_names(names)
        self.open = True

    # -- events --------------------------------------------------------------------------------
    def wants(self, stage: Stage) -> bool:
        """Would ``stage``'s event be sent at all (negotiated, not declined, not past)?"""
        if not self.open or self.awaiting is not None:
            return False
        if stage not in _CONNECTION_STAGES and stage is not Stage.MAIL and self.message_accepted:
            return False
        return not (stage is Stage.BODY and self.skip_body)

    def declines(self, stage: Stage) -> bool:
        """Did the filter ask not to get ``stage``'s events (or does its version not know
        them)? Then there is no point reading what they would carry."""
        not_sent, declined, _ = self._plan.get(stage, (False, False, False))
        return not_sent or declined

    def _event(self, stage: Stage, macros: Mapping[str, str], data: bytes | None) -> Outgoing:
        if self.awaiting is not None:
            raise RuntimeError(f"{stage} while a reply to {self.awaiting} is due")
        if not self.wants(stage):
            return NOTHING
        command = _STEPS[stage][0]
        not_sent, declined, no_reply = self._plan[stage]
        if not_sent:
            return NOTHING
        out = b""
        names = self.macro_lists.get(command, ()) if command in _MACRO_COMMANDS else ()
        pairs = [(n, macros[n]) for n in names if n in macros]
        if pairs:
            # Sent even when the filter declined the event itself (Postfix does the same):
            # a later event may read them.
            out = codec.encode_macros(command, pairs)
        if declined:
            return Outgoing(out, False)
        out += data if data is not None else codec.encode_bare(command)
        reply = not no_reply
        if reply:
            self.awaiting = stage
        return Outgoing(out, reply)

    def connect(
        self, macros: Mapping[str, str], hostname: str, family: bytes, port: int, address: str
    ) -> Outgoing:
        return self._event(
            Stage.CONNECT, macros, codec.encode_connect(hostname, family, port, address)
        )

    def helo(self, macros: Mapping[str, str], name: str) -> Outgoing:
        return self._event(Stage.HELO, macros, codec.encode_helo(name))

    def mail(self, macros: Mapping[str, str], args: Sequence[str]) -> Outgoing:
        self.in_message = True
        self.message_accepted = False
        self.skip_body = False
        return self._event(Stage.MAIL, macros, codec.encode_args(codec.MAIL, args))

    def rcpt(self, macros: Mapping[str, str], args: Sequence[str]) -> Outgoing:
        return self._event(Stage.RCPT, macros, codec.encode_args(codec.RCPT, args))

    def data(self, macros: Mapping[str, str]) -> Outgoing:
        return self._event(Stage.DATA, macros, None)

    def unknown(self, macros: Mapping[str, str], line: str) -> Outgoing:
        return self._event(Stage.UNKNOWN, macros, codec.encode_unknown(line))

    def header(self, name: str, value: str) -> Outgoing:
        """``value`` as it follows the colon in the message (leading space, CRLF folding):
        folded lines go as LF, and one leading space goes unless the filter asked for
        HDR_LEADSPC (Sendmail eats it; Postfix does the same)."""
        value = value.replace("\r\n", "\n")
        if not self._leadspc and value.startswith(" "):
            value = value[1:]
        return self._event(Stage.HEADER, {}, codec.encode_header(name, value))

    def header_value(self, value: str) -> str:
        """A header value from the filter as it goes after the colon in the message: with
        its leading space (added unless HDR_LEADSPC says the filter sends it itself)."""
        return value if self._leadspc else " " + value

    def eoh(self, macros: Mapping[str, str]) -> Outgoing:
        return self._event(Stage.EOH, macros, None)

    def body(self, chunk: bytes) -> Outgoing:
        if len(chunk) > self.chunk_size:
            raise ValueError(f"body chunk of {len(chunk)} bytes (limit {self.chunk_size})")
        return self._event(Stage.BODY, {}, codec.encode_body(chunk))

    def end_of_message(self, macros: Mapping[str, str]) -> Outgoing:
        return self._event(Stage.EOM, macros, None)

    def abort(self) -> bytes:
        """RSET, or a transaction given up before its end: the filter forgets the message."""
        if not self.open or not self.in_message or self.awaiting is not None:
            return b""
        self.in_message = False
        self.message_accepted = False
        return codec.encode_bare(codec.ABORT)

    def quit(self) -> bytes:
        was_open, self.open = self.open, False
        return codec.encode_bare(codec.QUIT) if was_open and self.awaiting is None else b""

    def quit_new_connection(self) -> bytes:
        """QUIT_NC: the filter's session ends and the connection stays for another, whose
        first event is CONNECT; the negotiation holds. Only between transactions."""
        if not self.open or self.in_message or self.awaiting is not None:
            raise RuntimeError("QUIT_NC outside an open, idle filter session")
        self.message_accepted = self.skip_body = False
        return codec.encode_bare(codec.QUIT_NC)

    # -- replies -------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        if self.awaiting is None and data:
            raise MilterProtocolError(f"{len(data)} bytes sent without an event to answer")
        self.reader.feed(data)

    def next_reply(self) -> codec.Reply | None:
        """The next complete reply, checked; None until more bytes arrive. A verdict (or the
        negotiation) ends the wait; progress, quarantine and modifications come before it."""
        stage = self.awaiting
        if stage is None:
            if self.reader.pending:
                raise MilterProtocolError("bytes sent without an event to answer")
            return None
        packet = self.reader.next()
        if packet is None:
            return None
        reply = codec.parse_reply(*packet)
        self._check(stage, reply)
        return reply

    def _check(self, stage: Stage, reply: codec.Reply) -> None:
        if reply is codec.CONTINUE and stage is not Stage.NEGOTIATE:
            # The usual answer (OpenDKIM's to every event), allowed at every stage: what the
            # checks below come to for it, without their isinstance calls.
            self.awaiting = None
            if stage is Stage.EOM:
                self.in_message = self.message_accepted = self.skip_body = False
            return
        if stage is Stage.NEGOTIATE:
            if not isinstance(reply, codec.Negotiation):
                raise MilterProtocolError(f"{type(reply).__name__} instead of OPTNEG")
            self.awaiting = None
            self._negotiated(reply)
            return
        if isinstance(reply, codec.Negotiation):
            raise MilterProtocolError(f"OPTNEG in answer to {stage}")
        if isinstance(reply, codec.Progress):
            return
        if not isinstance(reply, codec.Verdict):
            if stage is not Stage.EOM:
                raise MilterProtocolError(f"{type(reply).__name__} in answer to {stage}")
            needed = codec.required_action(reply)
            if not self.actions & needed:
                raise MilterProtocolError(
                    f"{type(reply).__name__} without having asked for {needed.name}"
                )
            return
        kind = reply.kind
        if kind == "s" and (stage is not Stage.BODY or not self.steps & Step.SKIP):
            raise MilterProtocolError(f"SKIP in answer to {stage}")
        if kind == "d" and stage in _CONNECTION_STAGES:
            raise MilterProtocolError(f"DISCARD in answer to {stage}")
        if kind == "y":
            smtp_reply(reply.reply or "")  # raises if it is not a 4xx/5xx reply
        self.awaiting = None
        if kind == "f" or (stage in _CONNECTION_STAGES and kind in "arty"):
            self.open = False  # accepted or refused for the whole connection
        elif stage is Stage.EOM:
            self.in_message = self.message_accepted = self.skip_body = False
        elif kind == "s":
            self.skip_body = True
        elif kind in "ad" and stage is not Stage.UNKNOWN:
            # No more events for this message (ABORT still ends it on RSET, as Postfix).
            self.message_accepted = True
