"""Abuse, end to end (issue 9, 4.5): the real daemon on loopback, attacked from outside.

- The open-relay matrix: every address form the rule in tests/support/abuse.py generates
  (chains of local, relayed and foreign domains joined by ``%``, ``!`` and quoted ``@``/``%``/
  ``!``, with source routes, literals, upper case, trailing dots, unqualified and bare forms),
  sent from every class of client (outside with each PTR status, relay IP, relay PTR name,
  localhost); each reply is checked, and each accepted recipient is followed to the sink of
  its next hop. Nothing may ever reach a foreign sink from an outside client.
- SMTP smuggling: bare LF / bare CR / NUL around the dot inside a message that is then
  properly ended, followed by a smuggled transaction; and bare LF / CR in command lines.
- Overlong command and text lines, command floods (memory read from /proc), slowloris,
  2,000 silent connections while a polite client is served, nmap's smtp-open-relay.

Distinct 127.x source addresses are distinct clients (127.0.0.1 is the local host). Times
are hang guards only; nothing asserts "fast enough".
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.support.abuse import (
    ABUSE_DNS,
    ACCEPT,
    ACCEPT_ONCE,
    CLIENTS,
    DENY,
    DOMAINS,
    FOREIGN,
    FOREIGN_SINKS,
    INVALID_LOCAL,
    INVALID_ROUTE,
    OUTSIDE_CLIENTS,
    TOKEN_RE,
    ClientClass,
    Form,
    Sinks,
    abuse_world,
    address_forms,
    raise_nofile,
    reset_peak_rss,
)
from tests.support.edge import open_fds, proc_status, silent_sockets, wait_idle
from tests.support.gateway import GatewayProcess
from tests.support.rawsmtp import RawReply, RawSmtp
from tests.support.world import HOSTNAME, GatewayFactory, World, message, stays, wait_until

DNS_RECORDS = ABUSE_DNS
MATRIX_SMTP = (
    "[smtp]\n"
    'greet_pause = "0s"\n'
    "bad_rcpt_throttle = 0\n"  # thousands of refused RCPTs in one session, unthrottled
    "max_bad_rcpts = 0\n"
    "max_recipients = 5000\n"
    "connection_rate_throttle = 0\n"
)


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sinks() -> Iterator[Sinks]:
    s = Sinks().start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def world(sinks: Sinks) -> World:
    return abuse_world(sinks).but(settings=MATRIX_SMTP)


@pytest.fixture(scope="module")
def gw(module_gateway: GatewayFactory, world: World) -> GatewayProcess:
    """The gateway every test here but slowloris and the connection crowd talks to."""
    return module_gateway(world, host="127.0.0.10")


# == 1. The open-relay matrix ==================================================================
FORMS = address_forms()


def family_group(form: Form) -> str:
    return form.family.split("+", 1)[0]


GROUPS = sorted({family_group(f) for f in FORMS})


def sender_of(client: ClientClass) -> str:
    return f"{client.name}@sender.example"


@dataclass
class Matrix:
    replies: dict[tuple[str, str], RawReply] = field(default_factory=dict)  # (client, rcpt)
    # (client, token) -> [(sink, RCPT TO as the sink got it)]
    delivered: dict[tuple[str, str], list[tuple[str, str]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    local: Counter[str] = field(default_factory=Counter)  # client -> Maildir messages
    foreign_transactions: dict[str, list[str]] = field(default_factory=dict)
    bounces: int = 0
    data_replies: dict[str, int] = field(default_factory=dict)


def _run_client(gw: GatewayProcess, client: ClientClass, matrix: Matrix) -> None:
    with RawSmtp(gw.host, gw.port, source=client.ip, timeout=60) as c:
        assert c.read_reply().code == 220
        assert c.cmd("EHLO client.example.net").code == 250
        assert c.cmd(f"MAIL FROM:<{sender_of(client)}>").code == 250
        accepted = 0
        for i in range(0, len(FORMS), 200):
            chunk = FORMS[i : i + 200]
            c.send(b"".join(f"RCPT TO:{f.rcpt}\r\n".encode() for f in chunk))
            for form, reply in zip(chunk, c.read_replies(len(chunk)), strict=True):
                matrix.replies[client.name, form.rcpt] = reply
                accepted += reply.code == 250
        if accepted:
            assert c.cmd("DATA").code == 354
            c.send(message(f"matrix {client.name}", frm=sender_of(client)) + b".\r\n")
            matrix.data_replies[client.name] = c.read_reply().code
        assert c.cmd("QUIT").code == 221


@pytest.fixture(scope="module")
def matrix(gw: GatewayProcess, sinks: Sinks) -> Matrix:
    """Every form from every client class, one transaction per class; then every accepted
    recipient followed to the sinks (the queue must empty: all delivered or bounced)."""
    result = Matrix()
    for client in CLIENTS:
        _run_client(gw, client, result)
    wait_until(lambda: not gw.queued(), "the gateway's queue to empty", 90, step=0.2)
    senders = {sender_of(c): c.name for c in CLIENTS}
    for name, sink in sinks.servers.items():
        for msg in list(sink.messages):
            if name == "bounces" or not msg.mail_from:
                result.bounces += 1
                continue
            who = senders[msg.mail_from]
            for rcpt in msg.rcpt_tos:
                for token in {t.lower() for t in TOKEN_RE.findall(rcpt)}:
                    result.delivered[who, token].append((name, rcpt))
    for name in FOREIGN_SINKS:
        for t in list(sinks[name].transactions):
            result.foreign_transactions.setdefault(t.mail_from, []).extend(t.rcpt_tos)
    new = gw.maildir / "alice" / "new"
    for path in new.iterdir() if new.exists() else ():
        m = re.search(rb"\r?\nSubject: matrix (\S+)\r?\n", path.read_bytes())
        if m:
            result.local[m.group(1).decode()] += 1
    return result


def _reply_problem(form: Form, client: ClientClass, reply: RawReply) -> str | None:
    expect = form.expect(client)
    shown = form.rcpt  # Sendmail quotes the address as the client wrote it
    if expect in (ACCEPT, ACCEPT_ONCE):
        ok = reply.code == 250 and reply.enhanced == "2.1.5"
    elif expect == DENY:
        ok = (
            reply.code == client.denied_code
            and reply.enhanced == client.denied_dsn
            and reply.text.startswith(f"{client.denied_dsn} {shown}... {client.denied_text}")
        )
    elif expect == INVALID_ROUTE:
        ok = reply.first == f"553 5.1.3 {shown}... Invalid route address"
    else:
        assert expect == INVALID_LOCAL
        ok = reply.first == f"553 5.1.3 {shown}... Invalid local part"
    return None if ok else f"{form.rcpt}: expected {expect}, got {reply.first!r}"


def _report(problems: list[str], total: int, what: str) -> str:
    shown = "\n  ".join(problems[:25])
    more = f"\n  ... and {len(problems) - 25} more" if len(problems) > 25 else ""
    return f"{len(problems)} of {total} {what}:\n  {shown}{more}"


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("client", CLIENTS, ids=[c.name for c in CLIENTS])
def test_relay_matrix_replies(matrix: Matrix, client: ClientClass, group: str) -> None:
    """Each form of one family from one client class gets the reply the rule predicts:
    250 where the final destination may be reached, the relay-denied reply of the client's
    PTR status where it may not, 553 5.1.3 for a route address or an address literal in a
    local part."""
    forms = [f for f in FORMS if family_group(f) == group]
    problems = [
        p for f in forms if (p := _reply_problem(f, client, matrix.replies[client.name, f.rcpt]))
    ]
    assert not problems, _report(problems, len(forms), f"{group} forms from {client.why}")


@pytest.mark.parametrize("client", CLIENTS, ids=[c.name for c in CLIENTS])
def test_relay_matrix_deliveries(matrix: Matrix, client: ClientClass) -> None:
    """Every recipient the gateway accepted went, once, to the next hop of the first
    destination that is not the gateway itself (exactly as ``user@host`` when the gateway
    resolved all the routing); nothing refused went anywhere; nothing bounced."""
    problems: list[str] = []
    local_wanted = 0
    for form in FORMS:
        reply = matrix.replies[client.name, form.rcpt]
        got = matrix.delivered.get((client.name, form.token.lower()), []) if form.token else []
        if reply.code != 250:
            if got:
                problems.append(f"{form.rcpt} was refused ({reply.first}) but went to {got}")
            continue
        if form.expect(client) not in (ACCEPT, ACCEPT_ONCE):
            continue  # a wrong acceptance: test_relay_matrix_replies reports it
        if not form.token:
            local_wanted += form.hop == "local"
            continue
        if form.expect(client) == ACCEPT_ONCE:
            if len(got) != 1:
                problems.append(f"{form.rcpt} delivered {len(got)} times: {got}")
            continue
        want = [(form.hop, form.delivered_as)] if form.delivered_as else None
        if (
            len(got) != 1
            or got[0][0] != form.hop
            or (want and [(s, r.lower()) for s, r in got] != [(h, a.lower()) for h, a in want])
        ):
            problems.append(
                f"{form.rcpt}: expected at {form.hop}"
                f"{f' as {form.delivered_as}' if form.delivered_as else ''}, "
                f"got {got}"
            )
    if local_wanted and matrix.local[client.name] != 1:
        problems.append(
            f"{local_wanted} local recipients (alice): "
            f"{matrix.local[client.name]} Maildir messages, expected 1"
        )
    assert matrix.bounces == 0, f"{matrix.bounces} bounce(s): an accepted recipient failed"
    assert not problems, _report(problems, len(FORMS), f"forms from {client.why}")


FOREIGN_NAMES = tuple(d.name for d in DOMAINS if d.kind == FOREIGN)


def test_nothing_from_outside_reaches_or_names_a_foreign_host(matrix: Matrix) -> None:
    """Whatever the replies were: no transaction from an outside client ever reached the MX
    of a foreign domain or a foreign address literal, not even an unfinished one; and no
    recipient it got through names a foreign host (which a next hop might route to)."""
    for client in OUTSIDE_CLIENTS:
        assert matrix.foreign_transactions.get(sender_of(client), []) == [], client.name
        routed = [
            rcpt
            for (who, _), got in matrix.delivered.items()
            if who == client.name
            for _, rcpt in got
            if any(n in rcpt.lower() for n in FOREIGN_NAMES)
        ]
        assert routed == [], f"{client.name}: handed on with foreign routing: {routed[:10]}"
    # ... while the relay clients' did (the sinks are live: this check can fail)
    for client in CLIENTS:
        if client.may_relay:
            assert matrix.foreign_transactions.get(sender_of(client)), client.name


def test_matrix_size() -> None:
    """The rule generates a matrix, not a hand list: every link type, nested and decorated,
    from every class of client. (Floors, not counts: the rule may grow.)"""
    assert len(FORMS) >= 1500
    assert len(CLIENTS) >= 6
    denied = [f for f in FORMS if f.expect(OUTSIDE_CLIENTS[0]) == DENY]
    assert len(denied) >= 1000
    assert {f.family for f in FORMS} >= {
        "pair-pct",
        "pair-bang",
        "pair-qat",
        "pair-qpct",
        "pair-qbang",
        "nested",
        "plain+srcroute",
        "pair-pct+upper",
        "pair-pct+dot",
        "pair-pct+bare",
        "invalid-route",
        "escaped-at",
        "escaped-pct-bang",
        "unqualified-qat",
    }


# == 2. SMTP smuggling, checked at the sink ====================================================
SMUGGLER = "127.0.0.2"  # an outside client: it may send to targetdomain1.com only
EVIL = b"MAIL FROM:<evil@sender.example>\r\nRCPT TO:<smuggled@targetdomain1.com>\r\nDATA\r\n"

# name -> (what stands where a message end might be read, refused by the gateway?)
SMUGGLE_VARIANTS: dict[str, tuple[bytes, bool]] = {
    "lf.lf": (b"\n.\n", True),
    "lf.crlf": (b"\n.\r\n", True),
    "crlf.lf": (b"\r\n.\n", True),
    "cr.cr": (b"\r.\r", True),
    "cr.crlf": (b"\r.\r\n", True),
    "crlf.cr": (b"\r\n.\r", True),
    "crlf.cr-crlf": (b"\r\n.\r\r\n", True),
    "lf-lf.lf-lf": (b"\n\n.\n\n", True),
    "cr-lf.lf-cr": (b"\r\n.\n\r", True),
    "crlf-nul.crlf": (b"\r\n\x00.\r\n", True),
    "crlf.nul-crlf": (b"\r\n.\x00\r\n", True),
    "crlf-nul-lf.crlf": (b"\r\n\x00\n.\r\n", True),
    # legitimate: a stuffed dot line and lines that merely start with a dot or hold one
    "crlf..crlf": (b"\r\n..\r\n", False),
    "crlf-space.crlf": (b"\r\n .\r\n", False),
    "crlf.x-crlf": (b"\r\n.x\r\n", False),
}


def _smuggle(
    gw: GatewayProcess, name: str, variant: bytes, *, bytewise: bool, in_header: bool
) -> tuple[list[tuple[int, str]], str]:
    subject = (
        f"smuggle {name} {'bytewise' if bytewise else 'whole'}{' header' if in_header else ''}"
    )
    head = (
        f"From: <smuggler@sender.example>\r\nTo: <victim@targetdomain1.com>\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@sender.example>\r\n"
        f"Subject: {subject}"
    ).encode()
    first = head if in_header else head + b"\r\n\r\nfirst part"
    smuggled = EVIL + f"Subject: smuggled {subject}\r\n\r\nevil\r\n".encode()
    with RawSmtp(gw.host, gw.port, source=SMUGGLER, timeout=20) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert c.read_reply().code == 220
        assert c.cmd("EHLO smuggler.example").code == 250
        assert c.cmd("MAIL FROM:<smuggler@sender.example>").code == 250
        assert c.cmd("RCPT TO:<victim@targetdomain1.com>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(first)
        if bytewise:  # every byte around the dot in a segment of its own
            for byte in variant:
                c.send(bytes([byte]))
                time.sleep(0.005)
        else:
            c.send(variant)
        c.send(smuggled + b".\r\nQUIT\r\n")
        transcript = c.wait_closed(timeout=20)
    return replies_of(transcript), subject


def replies_of(transcript: bytes) -> list[tuple[int, str]]:
    """(code, last line) of each complete reply in a raw server transcript."""
    out: list[tuple[int, str]] = []
    for line in transcript.split(b"\r\n"):
        text = line.decode("utf-8", "surrogateescape")
        if len(text) >= 3 and text[:3].isdigit() and text[3:4] in ("", " "):
            out.append((int(text[:3]), text))
    return out


def _smuggled_anywhere(sinks: Sinks) -> list[str]:
    found = []
    for name, sink in sinks.servers.items():
        for t in list(sink.transactions):
            if t.mail_from == "evil@sender.example" or "smuggled@targetdomain1.com" in t.rcpt_tos:
                found.append(f"{name}: transaction {t}")
        found += [
            f"{name}: command {c!r}"
            for c in list(sink.commands)
            if "evil@sender.example" in c or "smuggled@" in c
        ]
    return found


@pytest.mark.parametrize("in_header", [False, True], ids=["body", "header"])
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("name", list(SMUGGLE_VARIANTS))
def test_smuggling_variant_is_one_message_or_none(
    gw: GatewayProcess, sinks: Sinks, name: str, bytewise: bool, in_header: bool
) -> None:
    """A message holding a fake end of data, a smuggled transaction and then the real end:
    the gateway answers exactly one end of data (refusing the message when the fake end has
    a bare CR/LF or a NUL), and the sink gets exactly that one message or none: never the
    smuggled one, not even as commands (the gateway re-stuffs a dot line it relays)."""
    variant, refused = SMUGGLE_VARIANTS[name]
    replies, subject = _smuggle(gw, name, variant, bytewise=bytewise, in_header=in_header)
    codes = [code for code, _ in replies]
    assert len(codes) == 2 and codes[1] == 221, f"one end-of-data reply, then QUIT: {replies}"
    msgid = f"<{subject.replace(' ', '-')}@sender.example>"
    if refused:
        # a NUL is refused as such (5.6.0), a bare CR or LF as smuggling (5.6.11)
        status = "5.6.0" if b"\0" in variant else "5.6.11"
        assert replies[0][1].startswith(f"550 {status} "), replies
        assert not gw.log_lines("from=<smuggler@sender.example>", f"msgid={msgid}")
    else:
        assert codes[0] == 250, replies
        [msg] = sinks["td1"].wait_subject(subject)
        assert msg.rcpt_tos == ["victim@targetdomain1.com"]
        # the smuggled commands arrived as text of the one message
        assert EVIL in msg.data, msg.data
        if name == "crlf..crlf":  # a dot line of its own: the gateway stuffed it again
            assert b"\r\n.\r\n" + EVIL in msg.data, msg.data
        assert len(gw.log_lines("from=<smuggler@sender.example>", f"msgid={msgid}")) == 1
    assert not gw.log_lines("from=<evil@sender.example>")
    assert _smuggled_anywhere(sinks) == []


def test_smuggling_never_reached_any_sink_after_all_variants(
    gw: GatewayProcess, sinks: Sinks
) -> None:
    """After every variant (in any order): a sentinel is delivered, nothing is left in the
    queue, and no sink ever saw the smuggled sender or recipient."""
    with gw.smtp(SMUGGLER) as s:
        s.sendmail(
            "smuggler@sender.example",
            ["victim@targetdomain1.com"],
            message("smuggle sentinel", frm="smuggler@sender.example"),
        )
    sinks["td1"].wait_subject("smuggle sentinel")
    wait_until(lambda: not gw.queued(), "the queue to empty", 30)
    assert _smuggled_anywhere(sinks) == []
    for name, sink in sinks.servers.items():
        assert not [
            m
            for m in list(sink.messages)
            if b"Subject: smuggled " in m.data.split(b"\r\n\r\n", 1)[0]
        ], name


# -- bare LF / bare CR in command lines ----------------------------------------------------------
# (name, well-formed commands first, then the offending bytes). After the offending line the
# gateway must answer one 5xx and close; nothing of that line (or after it) is acted on.
BARE_COMMANDS = [
    ("mail-lf", [], b"MAIL FROM:<bare@sender.example>\n"),
    ("mail-cr-noop", [], b"MAIL FROM:<bare@sender.example>\rNOOP\r\n"),
    ("mail-cr-crlf", [], b"MAIL FROM:<bare@sender.example>\r\r\n"),
    (
        "noop-lf-rcpt",
        ["MAIL FROM:<bare@sender.example>"],
        b"NOOP\nRCPT TO:<bare-lf@targetdomain1.com>\r\n",
    ),
    (
        "noop-cr-rcpt",
        ["MAIL FROM:<bare@sender.example>"],
        b"NOOP\rRCPT TO:<bare-cr@targetdomain1.com>\r\n",
    ),
    (
        "rcpt-lf-in-address",
        ["MAIL FROM:<bare@sender.example>"],
        b"RCPT TO:<bare\n@targetdomain1.com>\r\n",
    ),
    (
        "data-lf",
        ["MAIL FROM:<bare@sender.example>", "RCPT TO:<bare-lf@targetdomain1.com>"],
        b"DATA\nSubject: bare lf data\r\n\r\nhi\r\n.\r\n",
    ),
    (
        "whole-transaction-lf",
        [],
        b"EHLO bare.example\nMAIL FROM:<bare@sender.example>\nRCPT TO:<bare-lf@targetdomain1.com>"
        b"\nDATA\nSubject: bare lf transaction\n\nhi\n.\nQUIT\n",
    ),
    ("rset-lf-quit", [], b"RSET\nQUIT\r\n"),
]


@pytest.mark.parametrize(
    ("name", "before", "bad"), BARE_COMMANDS, ids=[b[0] for b in BARE_COMMANDS]
)
def test_bare_lf_or_cr_in_a_command_line_is_refused_and_closes(
    gw: GatewayProcess, sinks: Sinks, name: str, before: list[str], bad: bytes
) -> None:
    logged = len(gw.log_lines(f"[{SMUGGLER}]", "smuggling"))
    with RawSmtp(gw.host, gw.port, source=SMUGGLER, timeout=10) as c:
        assert c.read_reply().code == 220
        assert c.cmd("EHLO bare.example").code == 250
        for line in before:
            assert c.cmd(line).code == 250, line
        c.send(bad)
        try:
            transcript = c.wait_closed(timeout=3)
        except AssertionError:
            transcript = c.pending(0.2)
            pytest.fail(f"the connection stayed open after {bad!r}; got {transcript!r}")
    bare = "CR" if "-cr" in name else "LF"  # the first bare character of the line
    assert replies_of(transcript) == [(521, f"521 5.5.2 {HOSTNAME} Error: bare <{bare}> received")]
    wait_until(
        lambda: len(gw.log_lines(f"[{SMUGGLER}]", "smuggling")) == logged + 1,
        "one maillog line about the refused command line",
        5,
    )
    assert not [m for m in list(sinks["td1"].messages) if m.mail_from == "bare@sender.example"]
    # Nothing was accepted: only Sendmail's from= of a transaction left open, no message.
    assert not [
        line for line in gw.log_lines("from=<bare@sender.example>") if "size=0," not in line
    ]


# == 3. Overlong lines =========================================================================
def _session(gw: GatewayProcess, source: str = SMUGGLER, timeout: float = 20) -> RawSmtp:
    c = RawSmtp(gw.host, gw.port, source=source, timeout=timeout)
    assert c.read_reply().code == 220
    assert c.cmd("EHLO long.example").code == 250
    return c


def test_command_line_limit_is_2048_and_an_overlong_line_is_not_acted_on(
    gw: GatewayProcess,
) -> None:
    with _session(gw) as c:  # max_command_line's default: Sendmail's MAXLINE, Postfix's limit
        assert c.cmd(b"NOOP" + b" " * (2048 - 6)).code == 250  # 2048 octets with CRLF
        assert c.cmd(b"NOOP" + b" " * (2048 - 5)).first == "500 5.5.0 Command line too long"
        # a MAIL padded past the limit is not a MAIL; the session goes on
        long_mail = f"MAIL FROM:<{'a' * 2100}@sender.example>"
        assert c.cmd(long_mail).first == "500 5.5.0 Command line too long"
        assert c.cmd("RCPT TO:<x@targetdomain1.com>").code == 503
        # ... nor is a command hidden past the limit of one line
        assert c.cmd(b"RSET" + b" " * 2100 + b"QUIT").first == "500 5.5.0 Command line too long"
        assert c.cmd("NOOP").code == 250
        assert c.cmd("QUIT").code == 221


@pytest.fixture
def fresh_gw(make_gateway: GatewayFactory, world: World) -> GatewayProcess:
    """A daemon of its own for a memory measurement: memory an earlier test made the
    allocator keep would hide growth (it is reused before the peak RSS moves)."""
    g = make_gateway(world, host="127.0.0.15")
    with g.smtp("127.0.0.2") as s:  # warm-up: the code paths of a transaction
        s.sendmail(
            "warm@sender.example",
            ["warm@targetdomain1.com"],
            message("fresh warm-up", frm="warm@sender.example"),
        )
    wait_until(lambda: not g.queued(), "the warm-up delivery", 20)
    return g


def _peak_growth_kb(pid: int, action: object) -> int:
    """VmHWM growth of ``pid`` while ``action()`` runs (peak RSS reset first, as root)."""
    assert callable(action)
    if not reset_peak_rss(pid):
        pytest.skip("cannot reset the daemon's peak RSS (/proc/PID/clear_refs)")
    before = proc_status(pid, "VmRSS")
    action()
    return proc_status(pid, "VmHWM") - before


def test_a_10_mib_command_line_costs_no_memory_and_gets_one_reply(fresh_gw: GatewayProcess) -> None:
    gw = fresh_gw
    assert gw.proc is not None
    with _session(gw) as c:

        def blast() -> None:
            chunk = b"N" * 65536
            for _ in range(160):
                c.send(chunk)
            c.send(b"\r\nNOOP\r\n")
            assert c.read_reply().first == "500 5.5.0 Command line too long"
            assert c.read_reply().code == 250  # the next line is a command again

        grew = _peak_growth_kb(gw.proc.pid, blast)
        assert c.cmd("QUIT").code == 221
    assert grew < 8 * 1024, f"peak RSS grew by {grew} kB for a 10 MiB line"


def _send_message(c: RawSmtp, subject: str, body: bytes) -> RawReply:
    assert c.cmd("MAIL FROM:<long@sender.example>").code == 250
    assert c.cmd("RCPT TO:<long@targetdomain1.com>").code == 250
    assert c.cmd("DATA").code == 354
    frm, to = "long@sender.example", "long@targetdomain1.com"
    c.send(message(subject, frm=frm, to=to, body=body) + b".\r\n")
    return c.read_reply()


def test_long_text_lines_are_accepted_and_folded_on_the_way_out(
    gw: GatewayProcess, sinks: Sinks
) -> None:
    """As Sendmail and Postfix: any line length is accepted (max_text_line = 0, the default),
    and no line over 998 octets leaves for a next hop: longer ones are broken with CRLF SPACE
    (Postfix's smtp_line_length_limit), so removing those gives the original back."""
    ok_line = b"x" * 998 + b"\r\n"
    long_line = b"y" * 999 + b"\r\n"
    huge_line = b"z" * (5 << 20) + b"\r\n"
    with _session(gw) as c:
        assert _send_message(c, "line 998", ok_line).code == 250
        assert _send_message(c, "line 999", long_line).code == 250
        assert _send_message(c, "line 5 MiB", huge_line).code == 250
        assert c.cmd("QUIT").code == 221
    [msg] = sinks["td1"].wait_subject("line 998")
    assert msg.data.endswith(b"\r\n\r\n" + ok_line)
    for subject, line in (("line 999", long_line), ("line 5 MiB", huge_line)):
        [msg] = sinks["td1"].wait_subject(subject, timeout=30)
        assert max(len(x) for x in msg.data.split(b"\r\n")) <= 998
        assert msg.data.replace(b"\r\n ", b"").endswith(b"\r\n\r\n" + line)


# == 4. Command floods =========================================================================
def test_thousands_of_unknown_commands_421_after_max_bad_commands(gw: GatewayProcess) -> None:
    with _session(gw) as c:
        with contextlib.suppress(OSError):  # it may close before the last of them arrive
            c.send(b"XYZZY\r\n" * 5000)
        replies = replies_of(c.wait_closed(timeout=20))
    assert [code for code, _ in replies[:25]] == [500] * 25
    assert replies[25][0] == 421 and replies[25][1].endswith(
        " Too many bad commands; closing connection"
    )
    assert len(replies) == 26


def test_unknown_commands_between_noop_and_rset_still_count(gw: GatewayProcess) -> None:
    with _session(gw) as c:
        with contextlib.suppress(OSError):
            c.send(b"NOOP\r\nRSET\r\nXYZZY\r\n" * 3000)
        replies = replies_of(c.wait_closed(timeout=20))
    assert [code for code, _ in replies].count(500) == 25
    assert replies[-1][0] == 421
    # 25 rounds answered, then the NOOP and RSET of the 26th, whose XYZZY gets the 421
    assert len(replies) == 3 * 25 + 3


def test_pipelined_noop_rset_flood_is_answered_in_bounded_memory(fresh_gw: GatewayProcess) -> None:
    """20,000 harmless pipelined commands from a client that reads its replies: every one is
    answered, in order, and the daemon's peak memory hardly moves."""
    gw = fresh_gw
    assert gw.proc is not None
    n = 10000
    with _session(gw) as c:
        got: list[int] = []

        def reader() -> None:
            with contextlib.suppress(Exception):
                for _ in range(2 * n):
                    got.append(c.read_reply().code)

        def flood() -> None:
            t = threading.Thread(target=reader)
            t.start()
            c.send(b"NOOP\r\nRSET\r\n" * n)
            t.join(60)

        grew = _peak_growth_kb(gw.proc.pid, flood)
        assert got == [250] * (2 * n)
        assert c.cmd("QUIT").code == 221
    assert grew < 16 * 1024, f"peak RSS grew by {grew} kB"


def test_pipelined_flood_from_a_client_that_never_reads_is_bounded(
    fresh_gw: GatewayProcess,
) -> None:
    """A client pipelines 200,000 HELPs (1.2 MB) and reads nothing. Each reply is ~300 bytes:
    unless the gateway stops reading while its replies cannot be sent (as a blocking writer,
    Sendmail or Postfix, does), it buffers 60 MB for this one client."""
    gw = fresh_gw
    assert gw.proc is not None
    pid = gw.proc.pid
    with _session(gw) as c:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

        def flood() -> None:
            c.sock.setblocking(False)
            data = memoryview(b"HELP\r\n" * 200000)
            last = time.monotonic()
            while data and time.monotonic() - last < 3:  # 3 s without progress: stalled
                try:
                    sent = c.sock.send(data[:65536])
                except BlockingIOError:
                    time.sleep(0.01)
                    continue
                data = data[sent:]
                last = time.monotonic()
            wait_idle(pid, quiet=1.0)  # it has worked through what it has read

        grew = _peak_growth_kb(pid, flood)
    assert grew < 32 * 1024, f"peak RSS grew by {grew} kB for one client's replies"


# == 5. Slowloris ==============================================================================
SLOW_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def slow(module_gateway: GatewayFactory, world: World) -> GatewayProcess:
    smtp = f'[smtp]\ncommand_timeout = "{SLOW_TIMEOUT}s"\n'
    return module_gateway(world.but(settings=smtp), host="127.0.0.11")


def test_slowloris_dribbling_a_byte_a_second_is_closed_by_the_command_timeout(
    slow: GatewayProcess, sinks: Sinks
) -> None:
    """20 clients each send one byte of a command line per second: the command timeout runs
    from the start of the line, not from the last byte, so each is cut off with 421 4.4.2
    long before its line is complete; a polite client is served meanwhile."""
    line = b"MAIL FROM:<slowloris@sender.example>\r\n"
    clients = [
        RawSmtp(slow.host, slow.port, source=f"127.0.13.{i + 1}", timeout=10) for i in range(20)
    ]
    try:
        for c in clients:
            assert c.read_reply().code == 220
        sent = [0] * len(clients)
        closed: dict[int, bytes] = {}
        polite_sent: list[bool] = []

        def dribble_round() -> bool:
            """One more byte from each dribbler still open; True once none is."""
            for i, c in enumerate(clients):
                if i in closed:
                    continue
                try:
                    c.send(line[sent[i] : sent[i] + 1])
                    sent[i] += 1
                except OSError:
                    closed[i] = c.pending(0.1)
                    continue
                got = c.pending(0.0)
                if got or c.eof:
                    closed[i] = got + (b"" if c.eof else c.wait_closed(timeout=5))
            if not polite_sent:
                with slow.smtp("127.0.0.2") as s:
                    s.sendmail(
                        "polite@sender.example",
                        ["polite@targetdomain1.com"],
                        message("polite during slowloris", frm="polite@sender.example"),
                    )
                polite_sent.append(True)
            return len(closed) == len(clients)

        # a byte a second (the pace under test); 30 s: a hang guard, a line takes 39 s
        wait_until(
            dribble_round, lambda: f"{len(clients) - len(closed)} dribblers to be closed", 30, 1.0
        )
    finally:
        for c in clients:
            c.close()
    for i, transcript in closed.items():
        assert transcript.startswith(b"421 4.4.2 "), transcript
        assert sent[i] < len(line), "the whole line went through before the timeout"
    sinks["td1"].wait_subject("polite during slowloris")
    assert slow.log_lines("timeout waiting for input from", "during command")


# == 6. 2,000 silent connections while a polite client is served ===============================
CROWD = 2000


@pytest.fixture(scope="module")
def crowd_gw(module_gateway: GatewayFactory, sinks: Sinks) -> GatewayProcess:
    # the rate throttle would make 2,000 connections take 20 s to be accepted; the command
    # timeout (a hang guard here) is longer than the test
    smtp = (
        '[smtp]\nconnection_rate_throttle = 0\ncommand_timeout = "120s"\n'
        "max_connections_per_ip = 20\n"
    )
    # both ends need the descriptors: the daemon inherits this process's limit (it does not
    # raise its own; a soft limit of 1024 would stop it at ~1,000 sessions: EMFILE)
    if not raise_nofile(CROWD + 512):
        pytest.skip(f"RLIMIT_NOFILE hard limit below {CROWD + 512}")
    # One process: the test counts the descriptors and memory of the daemon's pid.
    return module_gateway(
        abuse_world(sinks).but(settings="workers = 1\n" + smtp), host="127.0.0.12"
    )


def test_2000_half_open_connections_while_a_polite_client_is_served(
    crowd_gw: GatewayProcess, sinks: Sinks
) -> None:
    gw = crowd_gw
    assert gw.proc is not None
    pid = gw.proc.pid
    with gw.smtp("127.0.0.2") as s:  # warm-up: every code path used once
        s.sendmail(
            "polite@sender.example",
            ["polite@targetdomain1.com"],
            message("crowd warm-up", frm="polite@sender.example"),
        )
    sinks["td1"].wait_subject("crowd warm-up")
    wait_until(lambda: not gw.queued(), "the warm-up's delivery to be done")
    fds0 = min(open_fds(pid) for _ in range(5))
    rss0 = proc_status(pid, "VmRSS")
    # 20 per address (max_connections_per_ip) from 100 addresses
    sources = [f"127.0.14.{i // 20 + 1}" for i in range(CROWD)]
    with silent_sockets(gw.host, gw.port, sources):
        wait_until(
            lambda: open_fds(pid) >= fds0 + CROWD - 5,
            f"the daemon to accept {CROWD} connections",
            60,
        )
        rss1 = proc_status(pid, "VmRSS")
        with gw.smtp("127.0.0.2", timeout=30) as s:
            s.sendmail(
                "polite@sender.example",
                ["polite@targetdomain1.com"],
                message("polite in the crowd", frm="polite@sender.example"),
            )
        sinks["td1"].wait_subject("polite in the crowd")
    # all closed by the clients: the daemon lets go of every one of them
    wait_until(lambda: open_fds(pid) <= fds0 + 5, f"the daemon's fds to return to {fds0} (+5)", 60)
    grew_mb = (rss1 - rss0) / 1024
    assert grew_mb < 30 * CROWD / 1000, f"RSS grew by {grew_mb:.1f} MB for {CROWD} sessions"


# == 7. nmap's smtp-open-relay =================================================================
NMAP = shutil.which("nmap")


def _nmap(gw: GatewayProcess, source: str) -> str:
    assert NMAP is not None
    out = subprocess.run(
        [
            NMAP,
            "-Pn",
            "-n",
            "-p",
            str(gw.port),
            "-S",
            source,
            "-e",
            "lo",
            "--script",
            "+smtp-open-relay",
            gw.host,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "smtp-open-relay" in out.stdout, out.stdout
    return out.stdout


@pytest.mark.skipif(NMAP is None, reason="nmap is not installed (bash .ci/run installs it)")
def test_nmap_smtp_open_relay_from_outside_and_from_a_relay_client(gw: GatewayProcess) -> None:
    """From a non-relay source (``-S 127.0.0.2 -e lo``; without -S the kernel picks
    127.0.0.1, the local host, which may relay) nmap reports no open relay; from the relay IP
    127.0.0.3 it reports one, with every one of its 16 forms but the two "u@b@ours" ones
    accepted (the probe works; relay clients are unaffected). nmap never sends DATA: nothing
    is queued."""
    outside = _nmap(gw, "127.0.0.2")
    assert "Server is an open relay" not in outside
    assert re.search(r"smtp-open-relay: Server doesn't seem to be an open relay", outside), outside
    inside = _nmap(gw, "127.0.0.3")
    # every form works from a relay client but the two "u@b@ours" ones (553 5.1.3)
    m = re.search(r"Server is an open relay \((\d+)/(\d+) tests\)", inside)
    assert m and int(m.group(1)) == int(m.group(2)) - 2, inside
    rejects = gw.log_lines("ruleset=check_rcpt", "relay=[127.0.0.2]", "relaytest")
    assert rejects and all("reject=5" in line for line in rejects)
    assert not gw.log_lines("ruleset=check_rcpt", "relay=[127.0.0.3]", "Relaying denied")
    stays(lambda: gw.queued() == [], "nothing queued", 0.3)
