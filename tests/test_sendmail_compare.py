"""mailgate, configured by ``mailgate import-mc``, against real Sendmail built from the same mc.

Debian's sendmail-bin, sendmail-cf and m4 (8.17.1.9), unpacked by ``.ci/sendmail-tree`` (as
``.ci/run`` does), never installed. For the example mc and hand-made variants, decision by
decision: where each address goes (``sendmail -bt`` ``/parse`` against ``mailgate route``),
which clients may relay to which recipients (the ``check_rcpt`` ruleset against
``mailgate.policy``), the greet pause per client, and each option the mc sets (the ``O`` lines
of the built sendmail.cf against the imported config). The makemap and newaliases of the same
package are compared with mailgate's on the same input.
"""

from __future__ import annotations

import pwd
import re
import shutil
import smtplib
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mailgate.address import normalize
from mailgate.config import Config
from mailgate.migrate.mc import sendmail_seconds
from mailgate.migrate.sendmail_names import CONF_NAMES, FEATURES, MAILERS, OPTIONS
from mailgate.policy import Client, client_may_relay, connect_decision, may_relay_to, relay_denied
from mailgate.routing import rewrite_domain
from mailgate.snapshot import Snapshot, load_snapshot
from tests.support import sendmail
from tests.support.gateway import GatewayProcess, free_port, mailgate_command
from tests.support.rawsmtp import ConnectionClosedByPeer, RawSmtp
from tests.support.sendmail import HOSTNAME, SendmailBuild
from tests.support.sink import SinkServer
from tests.support.syslogd import Rsyslog
from tests.support.wait import wait_until

pytestmark = pytest.mark.skipif(sendmail.available() is not None, reason=str(sendmail.available()))

EXAMPLES = Path(__file__).parent / "data" / "sendmail-examples"


def imported(tmp: Path, mc: str, tables: Path) -> Path:
    """``mailgate import-mc`` of ``mc`` with ``tables`` as the mail dir; $j as Sendmail's."""
    mc_path = tmp / "sendmail.mc"
    mc_path.write_text(mc)
    done = subprocess.run(
        mailgate_command("import-mc", "--mail-dir", str(tables), str(mc_path)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    config = tmp / "mailgate.toml"
    own = re.search(r"^hostname = ", done.stdout, re.M)
    config.write_text(done.stdout if own else f'hostname = "{HOSTNAME}"\n' + done.stdout)
    return config


def mailgate_routes(config: Path, addresses: list[str]) -> dict[str, str]:
    done = subprocess.run(
        mailgate_command("route", "-c", str(config), *addresses),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = done.stdout.splitlines()
    assert len(lines) == len(addresses), done.stdout + done.stderr
    return {a: line[len(a) + 2 :].split("  [")[0] for a, line in zip(addresses, lines, strict=True)}


def _canon(route: str) -> tuple[str, str, str]:
    """``mailer M, host H, user U`` → (M, H, U) with host names in canonical form (lower
    case, no trailing dot: -bt has no DNS to canonify them, the SMTP server does, §1)."""
    m = re.fullmatch(r"mailer (\S+), (?:host (\S+), )?user (.*)", route)
    assert m is not None, route
    mailer, host, user = m.group(1), m.group(2) or "", m.group(3)
    if mailer == "local":
        host = ""
    local, at, domain = user.rpartition("@")
    user = f"{local}@{domain.lower().rstrip('.')}" if at else user
    return mailer, host.lower().rstrip("."), user


def _is_account(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def assert_same_routes(build: SendmailBuild, config: Path, addresses: list[str]) -> None:
    ours = mailgate_routes(config, addresses)
    for address, route in zip(addresses, build.parse(*addresses), strict=True):
        theirs = _canon(route)
        if theirs[0] == "local" and not _is_account(theirs[2]):
            # Sendmail's ruleset 0 says "local"; its RCPT check then answers User unknown.
            assert ours[address].startswith("mailer error, 550 5.1.1 "), (address, ours[address])
            assert ours[address].endswith("... User unknown"), (address, ours[address])
            continue
        assert _canon(ours[address]) == theirs, address


# Addresses of semantics §1, §5: routing forms, literals, local names, case, trailing dots.
# Not the short host name ("u@gateway"): Sendmail's class w takes it from the node name,
# which is the full name in the test's UTS namespace.
ADDRESSES = [
    "u@example.net",
    "U@Example.NET.",
    "u@sub.targetdomain1.com",
    "x@[192.0.2.1]",
    "u@[IPv6:2001:db8::1]",
    "root@gateway.example.com",
    "root@targetdomain1.com",
    "root",
    "root@localhost",
    '"root"@gateway.example.com',
    '"u@other.example"@gateway.example.com',
    "other.example!u@gateway.example.com",
    "u%example.net@gateway.example.com",
    "targetdomain1.com!root",
    "<@example.net:root@gateway.example.com>",
    "example.net!u",
    "u%example.net@targetdomain1.com",
    "u@targetdomain1.com",
    "u@targetdomain3.com",
    "u@TargetDomain2.COM.",
    "u%targetdomain1.com@gateway.example.com",
]

# (client IP, PTR status, PTR name, recipient)
RELAY_CASES = [
    (ip, status, name, rcpt)
    for ip, status, name in [
        ("192.168.1.1", "FAIL", None),  # access: 192.168.1.1 RELAY
        ("192.168.1.2", "OK", "relay2.example.org"),
        ("192.168.0.5", "FAIL", None),  # the guide's "192.168.0." key never matches
        ("192.168.1.3", "FAIL", None),
        ("192.0.2.10", "OK", "client.example.org"),
        ("192.0.2.10", "TEMP", None),
        ("127.0.0.1", "OK", "localhost"),
    ]
    for rcpt in [
        "u@example.net",
        "root@targetdomain1.com",
        "root@gateway.example.com",
        "u%example.net@targetdomain1.com",
        "u@sub.targetdomain1.com",
        "x@[192.0.2.1]",
        "u@targetdomain2.com",
    ]
]


def assert_same_relay_decisions(build: SendmailBuild, snapshot: Snapshot) -> None:
    ctx, cfg = snapshot.routing, snapshot.config
    verdicts = build.check_rcpt(*RELAY_CASES)
    for (ip, status, name, rcpt), theirs in zip(RELAY_CASES, verdicts, strict=True):
        client = Client(ip, status, name)
        mailbox = rewrite_domain(normalize(rcpt, ctx.is_local), ctx.tables)
        relays = client_may_relay(client, snapshot.tables, cfg.relay_hosts_only)
        if relays or may_relay_to(mailbox, ctx, cfg.relay_hosts_only):
            assert theirs.accepted, (ip, status, rcpt, theirs)
        else:
            reply = relay_denied(f"<{rcpt}>", client)
            assert (theirs.code, theirs.dsn) == (reply.code, reply.enhanced), (ip, status, rcpt)


def assert_same_options(build: SendmailBuild, cfg: Config) -> set[str]:
    """Each option the built sendmail.cf sets, against the imported setting it maps to; the
    names of the options compared."""
    options = build.options()
    checks = {
        "PrivacyOptions": lambda v: tuple(re.split(r"[\s,]+", v)) == cfg.smtp.privacy,
        "BadRcptThrottle": lambda v: int(v) == cfg.smtp.bad_rcpt_throttle,
        "ConnectionRateThrottle": lambda v: int(v) == cfg.smtp.connection_rate_throttle,
        "MaxMessageSize": lambda v: int(v) == cfg.smtp.max_message_size,
        "MaxRecipientsPerMessage": lambda v: int(v) == cfg.smtp.max_recipients,
        "MaxDaemonChildren": lambda v: int(v) == cfg.smtp.max_connections,
        "Timeout.command": lambda v: sendmail_seconds(v) == cfg.smtp.command_timeout,
        "Timeout.datablock": lambda v: sendmail_seconds(v) == cfg.smtp.data_timeout,
        "Timeout.queuewarn": lambda v: sendmail_seconds(v) == cfg.queue.warn_after,
        "Timeout.queuereturn": lambda v: sendmail_seconds(v) == cfg.queue.max_age,
        "Timeout.connect": lambda v: sendmail_seconds(v) == cfg.delivery.connect_timeout,
        "HeloName": lambda v: v == cfg.delivery.helo_name,
        "MaxHeadersLength": lambda v: int(v) == 32768,
    }
    compared = set()
    for name, check in checks.items():
        for value in options.get(name, []):
            assert check(value), (name, value)
            compared.add(name)
    listened = set()
    for spec in options["DaemonPortOptions"]:
        fields = {
            k.strip()[:1].upper(): v.strip()
            for k, _, v in (f.partition("=") for f in spec.split(","))
        }
        if "a" in fields.get("M", ""):
            continue  # needs SMTP AUTH: not imported, and said so
        port = {"smtp": 25, "submission": 587}.get(fields.get("P", "smtp")) or int(fields["P"])
        family = fields.get("F", "inet")
        listened.add((fields.get("A", "0.0.0.0" if family == "inet" else "::"), port))
    assert listened == set(cfg.listen)
    return compared | {"DaemonPortOptions"}


def assert_same_greet_pause(build: SendmailBuild, snapshot: Snapshot, clients: list[str]) -> None:
    for ip, theirs in zip(clients, build.greet_pause(*clients), strict=True):
        ours = connect_decision(Client(ip), snapshot.tables, snapshot.config).greet_pause
        assert round(ours * 1000) == theirs, ip


def test_the_example_decides_as_sendmail_built_from_it(tmp_path: Path) -> None:
    mc = (EXAMPLES / "sendmail.mc").read_text()
    build = SendmailBuild(tmp_path / "sendmail", mc, EXAMPLES)
    config = imported(tmp_path, mc, EXAMPLES)
    snapshot = load_snapshot(config)
    assert_same_routes(build, config, ADDRESSES)
    assert_same_relay_decisions(build, snapshot)
    assert assert_same_options(build, snapshot.config) == {
        "PrivacyOptions",
        "BadRcptThrottle",
        "ConnectionRateThrottle",
        "MaxHeadersLength",
        "Timeout.queuewarn",  # Sendmail's cf writes its defaults, 4h and 5d: mailgate's too
        "Timeout.queuereturn",
        "DaemonPortOptions",
    }
    assert_same_greet_pause(build, snapshot, ["192.0.2.10", "192.168.1.1", "127.0.0.1"])


def test_the_guides_intent_routes_by_mailertable_as_sendmail(tmp_path: Path) -> None:
    """The example without its local-host-names (what the guide meant): the mailertable
    routes, and To: RELAY lets anyone relay to the three domains and nowhere else."""
    tables = tmp_path / "mail"
    shutil.copytree(EXAMPLES, tables)
    (tables / "local-host-names").write_text("")
    mc = (EXAMPLES / "sendmail.mc").read_text()
    build = SendmailBuild(tmp_path / "sendmail", mc, tables)
    config = imported(tmp_path, mc, tables)
    extra = [
        "u@targetdomain1.com",
        "u@TargetDomain2.COM.",
        "u@targetdomain3.com",
        "v@sub.targetdomain3.com",
    ]
    assert_same_routes(build, config, ADDRESSES + extra)
    assert build.parse("u@targetdomain3.com") == [
        "mailer smtp, host [192.168.0.1], user u@targetdomain3.com"
    ]
    assert_same_relay_decisions(build, load_snapshot(config))


VARIANT = """\
divert(0)dnl
OSTYPE(`linux')dnl
define(`confDOMAIN_NAME', `gateway.example.com')dnl
FEATURE(`no_default_msa')dnl
DAEMON_OPTIONS(`Family=inet, Name=MTA-v4, Port=smtp, Addr=127.0.0.1')dnl
DAEMON_OPTIONS(`Family=inet, Name=MSP-v4, Port=submission, M=Ea, Addr=127.0.0.1')dnl
DAEMON_OPTIONS(`Port=2525, Name=Alt')dnl
define(`confPRIVACY_FLAGS',dnl
`authwarnings,novrfy')dnl
define(`confBAD_RCPT_THROTTLE',`3')dnl
define(`confCONNECTION_RATE_THROTTLE', `15')dnl
define(`confMAX_MESSAGE_SIZE', `10485760')dnl
define(`confMAX_RCPTS_PER_MESSAGE', `250')dnl
define(`confMAX_DAEMON_CHILDREN', `40')dnl
define(`confTO_COMMAND', `10m')dnl
define(`confTO_DATABLOCK', `90')dnl
define(`confTO_QUEUEWARN', `2h')dnl
define(`confTO_QUEUERETURN', `3d12h')dnl
define(`confTO_CONNECT', `45s')dnl
define(`confHELO_NAME', `out.example.com')dnl
FEATURE(`use_cw_file')dnl
FEATURE(`access_db', `hash -T<TMPF> -o /etc/mail/access')dnl
FEATURE(`greet_pause', `2500')dnl
FEATURE(`mailertable', `hash -o /etc/mail/mailertable')dnl
FEATURE(`virtusertable')dnl
MAILER(`local')dnl
MAILER(`smtp')dnl
"""

VARIANT_TABLES = {
    "access": (
        "Connect:192.0.2.20 RELAY\n"
        "198.51.100 RELAY\n"
        "To:relayed.example RELAY\n"
        "GreetPause:192.0.2.7 0\n"
        "GreetPause:192.0.2.8 1500\n"
        "GreetPause:192.0.2 700\n"
    ),
    "mailertable": ("relayed.example smtp:[192.0.2.33]\n.sub.example.org relay:hub.example.org\n"),
    "local-host-names": "virt.example.com\n",
    "virtusertable": "info@virt.example.com root\n@virt.example.com %1@relayed.example\n",
}


def test_a_hand_made_variant_decides_as_sendmail_built_from_it(tmp_path: Path) -> None:
    tables = tmp_path / "mail"
    tables.mkdir()
    for name, text in VARIANT_TABLES.items():
        (tables / name).write_text(text)
    build = SendmailBuild(tmp_path / "sendmail", VARIANT, tables)
    config = imported(tmp_path, VARIANT, tables)
    snapshot = load_snapshot(config)
    cfg = snapshot.config
    assert cfg.listen == (("127.0.0.1", 25), ("0.0.0.0", 2525))
    assert cfg.smtp.data_timeout == 90 * 60  # a bare number is minutes, as for Sendmail
    assert cfg.queue.max_age == 3.5 * 86400
    assert assert_same_options(build, cfg) == {
        "PrivacyOptions",
        "BadRcptThrottle",
        "ConnectionRateThrottle",
        "MaxMessageSize",
        "MaxRecipientsPerMessage",
        "MaxDaemonChildren",
        "Timeout.command",
        "Timeout.datablock",
        "Timeout.queuewarn",
        "Timeout.queuereturn",
        "Timeout.connect",
        "HeloName",
        "DaemonPortOptions",
    }
    assert_same_greet_pause(build, snapshot, ["192.0.2.7", "192.0.2.8", "192.0.2.9", "203.0.113.1"])
    addresses = [
        "u@relayed.example",
        "u@a.sub.example.org",
        "u@sub.example.org",
        "info@virt.example.com",
        "root@virt.example.com",
        "u@example.net",
    ]
    assert_same_routes(build, config, addresses)
    for ip, rcpt, accepted in [
        ("192.0.2.20", "u@example.net", True),
        ("198.51.100.7", "u@example.net", True),
        ("203.0.113.1", "u@relayed.example", True),
        ("203.0.113.1", "u@sub.relayed.example", True),  # no relay_hosts_only: subdomains too
        ("203.0.113.1", "u@example.net", False),
    ]:
        ctx = snapshot.routing
        ours = client_may_relay(Client(ip), snapshot.tables, cfg.relay_hosts_only) or may_relay_to(
            normalize(rcpt, ctx.is_local), ctx, cfg.relay_hosts_only
        )
        (theirs,) = build.check_rcpt((ip, "FAIL", None, rcpt))
        assert theirs.accepted is accepted, (ip, rcpt)
        assert ours is accepted, (ip, rcpt)


# --- the names the importer knows ---------------------------------------------------------


def test_the_importers_sendmail_names_are_those_of_the_package() -> None:
    cf = sendmail.CF_DIR
    assert {p.stem for p in (cf / "feature").glob("*.m4")} == FEATURES
    assert {p.stem for p in (cf / "mailer").glob("*.m4")} == MAILERS
    proto = (cf / "m4" / "proto.m4").read_text()
    assert (
        dict((c, o) for o, c in re.findall(r"_OPTION\(([^,]*), *`(conf[A-Z0-9_]*)'", proto))
        == OPTIONS
    )
    used = set()
    for path in (cf / "m4").glob("*.m4"):
        used |= set(re.findall(r"conf[A-Z0-9_]+", path.read_text()))
    assert used - {"confTO_"} <= CONF_NAMES


# --- sendmail -bv ---------------------------------------------------------------------------

# Permanent refusals by enhanced code (Sendmail's dsntoexitstat picks the exit status from
# it); the temporary ones Sendmail's -bv calls deliverable to its error mailer, exit 0,
# where ours says why and exits EX_TEMPFAIL (docs/migrating-from-sendmail.md).
VERIFY_CODES = ["5.0.0", "5.1.0", "5.1.1", "5.1.2", "5.1.3", "5.1.4", "5.1.8", "5.2.2", "5.2.3"]
VERIFY_CODES += ["5.3.0", "5.4.0", "5.4.4", "5.4.6", "5.4.7", "5.5.0", "5.6.0", "5.7.1", "5.9.9"]


def test_verify_answers_and_exits_as_sendmails(tmp_path: Path) -> None:
    """``sendmail -bv`` over the same tables: the same line for each address (routes,
    aliases, refusals), and the exit status of each refusal, which Sendmail derives from its
    enhanced code."""
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "mailertable").write_text(
        "example.org smtp:[192.0.2.99]\n.sub.example relay:hub.example\n"
        # no keyword in a mailertable, and without a DSN the error mailer's EX_UNAVAILABLE
        "ut.example error:nouser No such user here\nun.example error:unavailable 550 Not here\n"
        + "".join(
            f"d{i}.example error:{code}:550 text {code}\n" for i, code in enumerate(VERIFY_CODES)
        )
    )
    (tables / "aliases").write_text("postmaster: root\nstaff: root, bob@example.org\n")
    # a virtusertable's keyword is the exit status (nouser: 67); a rewrite is named as given
    (tables / "virtusertable").write_text(
        "fwd@virt.example bob@example.org\n@virt.example error:nouser 550 No such virtual user\n"
    )
    (tables / "local-host-names").write_text("virt.example\n")
    (tables / "domaintable").write_text("old.example example.org\n")
    mc = (
        "FEATURE(`mailertable', `hash /etc/mail/mailertable')dnl\n"
        "FEATURE(`virtusertable', `hash /etc/mail/virtusertable')dnl\n"
        "FEATURE(`domaintable', `hash /etc/mail/domaintable')dnl\n"
        "FEATURE(`use_cw_file')dnl\nMAILER(local)\nMAILER(smtp)\n"
    )
    build = SendmailBuild(tmp_path / "sendmail", mc, tables)
    config = tmp_path / "mailgate.toml"
    config.write_text(f'hostname = "{HOSTNAME}"\ntables_dir = "{tables}"\n')
    addresses = ["bob@example.org", "a@b.sub.example", "staff", "postmaster", "nosuch"]
    addresses += ["a@ut.example", "a@un.example", "fwd@virt.example", "FWD@virt.example"]
    addresses += ["zz@virt.example", "u@old.example"]
    addresses += [f"u@d{i}.example" for i in range(len(VERIFY_CODES))]
    for address in addresses:
        theirs = build.run("-bv", address)
        ours = subprocess.run(
            mailgate_command("sendmail", "-C", str(config), "-bv", address),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert (ours.stdout, ours.returncode) == (theirs.stdout, theirs.returncode), address


# --- makemap and newaliases ---------------------------------------------------------------

MAKEMAP_INPUTS = {
    "good": "a.example smtp:[192.0.2.1]\nb.example smtp:[192.0.2.2]\n",
    "no value": "a.example smtp:[192.0.2.1]\nb.example\n",
    "duplicate": "a.example smtp:[192.0.2.1]\nA.EXAMPLE smtp:[192.0.2.2]\n",
}


@pytest.mark.parametrize("case", list(MAKEMAP_INPUTS))
def test_makemap_exits_as_sendmails(tmp_path: Path, case: str) -> None:
    build = SendmailBuild(tmp_path / "sendmail", "MAILER(smtp)\n", EXAMPLES)
    theirs = build.makemap("hash", "mailertable", MAKEMAP_INPUTS[case])
    ours = subprocess.run(
        mailgate_command("makemap", "hash", "mailertable"),
        input=MAKEMAP_INPUTS[case],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert ours.returncode == theirs.returncode, (theirs.stderr, ours.stderr)
    # Both name the same lines.
    assert re.findall(r"line (\d+)", theirs.stderr) == re.findall(r"mailertable:(\d+)", ours.stderr)


def test_makemap_usage_and_types_exit_as_sendmails(tmp_path: Path) -> None:
    build = SendmailBuild(tmp_path / "sendmail", "MAILER(smtp)\n", EXAMPLES)
    for args in (["hash"], ["nosuch", "mailertable"]):
        theirs = subprocess.run(
            [str(sendmail.MAKEMAP), "-C", str(build.cf), *args],
            input="a b\n",
            capture_output=True,
            text=True,
            env=sendmail.env(),
            cwd=tmp_path,
            timeout=60,
            check=False,
        )
        ours = subprocess.run(
            mailgate_command("makemap", *args),
            input="a b\n",
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
            check=False,
        )
        assert ours.returncode == theirs.returncode, args


@pytest.mark.parametrize(
    "aliases",
    ["postmaster: root\nlist: a, b@example.org,\n  c\n", "postmaster: root\nbad line here\n"],
)
def test_newaliases_exits_as_sendmails(tmp_path: Path, aliases: str) -> None:
    build = SendmailBuild(tmp_path / "sendmail", "MAILER(local)\n", EXAMPLES)
    (build.dir / "aliases").write_text(aliases)
    theirs = build.run("-bi")
    (tmp_path / "aliases").write_text(aliases)
    (tmp_path / "mailgate.toml").write_text("")
    ours = subprocess.run(
        mailgate_command("newaliases", "-c", str(tmp_path / "mailgate.toml")),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ours.returncode == theirs.returncode, (theirs.stdout, theirs.stderr, ours.stderr)


# -- the same SMTP dialogue to both daemons ------------------------------------------------------

_DIALOGUE_MC = """\
OSTYPE(`linux')dnl
DAEMON_OPTIONS(`Port={port},Addr=127.0.0.1, Name=MTA')dnl
define(`confMAX_MESSAGE_SIZE', `1000')dnl
define(`confPRIVACY_FLAGS', `authwarnings,novrfy,noexpn,noverb')dnl
FEATURE(`mailertable', `hash /etc/mail/mailertable')dnl
MAILER(`smtp')dnl
"""


def _dialogue(port: int, lines: list[bytes]) -> list[str]:
    """Each line sent alone after EHLO, with the first line of each reply; after a close, the
    rest are not sent."""
    out = []
    with RawSmtp("127.0.0.1", port) as c:
        assert c.read_reply().code == 220
        assert c.cmd("EHLO client.example.net").code == 250
        for line in lines:
            try:
                c.send(line + b"\r\n")
                out.append(c.read_reply().first)
            except (ConnectionClosedByPeer, OSError):
                break
    return out


def test_refusals_word_for_word_as_sendmails_daemon(tmp_path: Path) -> None:
    """The replies to commands RFC 821 had and we do not do, to a message over the size limit
    (declared, then sent), and to a flood of unknown commands, from the real ``sendmail -bD``
    and from mailgate with the same limit, compared line by line."""
    port = free_port("127.0.0.1")
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "mailertable").write_text("example.org smtp:[127.0.0.1]\n")
    build = SendmailBuild(tmp_path / "sendmail", _DIALOGUE_MC.format(port=port), tables)
    sender = f"alice@{HOSTNAME}"
    lines = [
        b"HELO two words",  # Sendmail's HELO name check
        b"EHLO bad_name!#$",
        b"EHLO " + b"a" * 300,
        b"EHLO [192.0.2.1]",
        b"EHLO client.example.net",
        b"RCPT TO:<bob@example.org>",
        b"DATA",
        b"VRFY alice",
        b"EXPN alice",
        f"MAIL FROM:<{sender}>".encode(),
        f"MAIL FROM:<{sender}>".encode(),
        b"DATA",
        b"RSET",
        b"MAIL FROM:<alice@[127.0.0.1]>",
        b"RSET",
        b"TURN",
        b"TURN " + b"x" * 150 + b"y" * 150,  # repeated shortened, as Sendmail's shortenstring
        b"  NOOP",  # blanks before the verb, a tab after it
        b"NOOP\tnow",
        b"\tMAIL\tFROM:<" + sender.encode() + b">",
        b"RSET",
        b"FROB nicate",
        b"frob   Nicate  twice",  # repeated as written
        b"  ",
        b"HELP nosuch",
        f"SEND FROM:<{sender}>".encode(),
        b"SOML",
        b"SAML",
        f"MAIL FROM:<{sender}> SIZE=5000".encode(),
        f"MAIL FROM:<{sender}>".encode(),
        b"RCPT TO:<bob@example.org>",
        b"DATA",
        b"Subject: big\r\n\r\n" + b"x" * 70 + (b"\r\n" + b"x" * 70) * 40 + b"\r\n.",
        b"RSET",
        *(f"JUNK{i}".encode() for i in range(30)),
    ]
    with build.daemon(port):
        theirs = _dialogue(port, lines)
    gw = GatewayProcess(
        tmp_path / "mailgate",
        dns=None,
        hostname=HOSTNAME,
        tables={"mailertable": "example.org smtp:[127.0.0.1]\n"},
        settings='[smtp]\ngreet_pause = "0s"\nmax_message_size = 1000\n',
    )
    try:
        ours = _dialogue(gw.start().port, lines)
    finally:
        gw.stop()
    assert theirs[-1] == f"421 4.7.0 {HOSTNAME} Too many bad commands; closing connection"
    assert [r[:3] for r in theirs].count("500") == 25
    assert ours == theirs


# -- the same queue listed by both: sendmail -bp [-v] [-qQ] [-qR…] --------------------------------

_QUEUE_MC = """\
OSTYPE(`linux')dnl
DAEMON_OPTIONS(`Port={port},Addr=127.0.0.1, Name=MTA')dnl
define(`SMTP_MAILER_ARGS', `TCP $h {down}')dnl
FEATURE(`mailertable', `hash /etc/mail/mailertable')dnl
FEATURE(`access_db', `hash /etc/mail/access')dnl
FEATURE(`accept_unresolvable_domains')dnl
MAILER(`smtp')dnl
"""
# (sender, recipients, content, MAIL parameters): a body of two lines, the null sender, an
# 8-bit body, a recipient longer than the 38 characters the short listing prints of one.
_QUEUED: list[tuple[str, list[str], bytes, list[str]]] = [
    (
        "alice@client.example.net",
        ["bob@example.org", "carol@example.org"],
        b"Subject: one\r\nFrom: alice@client.example.net\r\n\r\nline one\r\nline two\r\n",
        [],
    ),
    ("", ["dave@example.org"], b"Subject: two\r\n\r\n" + b"x" * 100 + b"\r\n", []),
    (
        "eve@client.example.net",
        ["a.rather.long.local.part.indeed@example.org"],
        "Subject: 8bit\r\n\r\nh\u00e9llo\r\n".encode(),
        ["BODY=8BITMIME"],
    ),
]
_ID = re.compile(r"^([0-9A-Za-z]{14})[ *]")


def _send_queued(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.example.net")
        for sender, rcpts, content, params in _QUEUED:
            s.sendmail(sender, rcpts, content, mail_options=params)


def _blocks(listing: str) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """(the lines before the entries, each entry's lines by its sender, the lines after), the
    queue ids, times, priorities and the queue folder made the same for both."""
    head: list[str] = []
    entries: dict[str, list[str]] = {}
    tail: list[str] = []
    current: list[str] | None = None
    for line in listing.splitlines():
        if _ID.match(line):
            line = "QID" + line[14:]
            line = re.sub(r"(\w\w\w )?\w\w\w [ \d]\d \d\d:\d\d", "TIME", line)
            line = re.sub(r"^(QID.{9}) +\d+([ +])TIME", r"\1 PRI\2TIME", line)  # -v's
            current = entries.setdefault(line.rsplit(" ", 1)[1], [])
            current.append(line)
        elif line.startswith("\t\tTotal requests: "):
            current = None
            tail.append(line)
        elif current is not None:
            current.append(line)
        else:
            head.append(re.sub(r"^(\t\t)?/\S+", r"\1QUEUE", line))
    return head, entries, tail


def _wait_listing(run: Callable[[], str], deferred: int) -> str:
    deadline = time.monotonic() + 60
    while True:
        text = run()
        if text.count("(Deferred") >= deferred or time.monotonic() > deadline:
            return text
        time.sleep(0.3)


def test_the_queue_listing_is_sendmails(tmp_path: Path) -> None:
    """The same mail, deferred by a next hop that refuses connections, in the real Sendmail's
    queue and in ours: ``sendmail -bp``, ``-bp -v``, ``-bp -qR…``, and, with one message
    quarantined (held), ``-bp`` and ``-bp -qQ``, compared line by line but for the queue ids,
    times, the queue folder and the priority's figure (it counts the message's size, which
    has each one's own Received: field)."""
    port, down = free_port("127.0.0.1"), free_port("127.0.0.1")
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "mailertable").write_text("example.org smtp:[127.0.0.1]\n")
    (tables / "access").write_text("Connect:127.0.0.1 RELAY\n")
    build = SendmailBuild(tmp_path / "sendmail", _QUEUE_MC.format(port=port, down=down), tables)
    with build.daemon(port):
        _send_queued(port)
        _wait_listing(lambda: build.run("-bp").stdout, len(_QUEUED))
    listings = {"plain": ["-bp"], "verbose": ["-bp", "-v"], "R": ["-bp", "-qRdave"]}
    theirs = {name: build.run(*args).stdout for name, args in listings.items()}
    gw = GatewayProcess(
        tmp_path / "mailgate",
        dns=None,
        hostname=HOSTNAME,
        tables={"mailertable": f"example.org smtp:[127.0.0.1]:{down}\n"},
        # FEATURE(accept_unresolvable_domains): the sender domains have no DNS here.
        settings='[smtp]\ngreet_pause = "0s"\ncheck_sender_domain = false\n'
        '[queue]\nrun_interval = "1h"\n',
    )

    def ours(*args: str) -> str:
        done = subprocess.run(
            mailgate_command("sendmail", "-C", str(gw.config), *args),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    try:
        _send_queued(gw.start().port)
        _wait_listing(lambda: ours("-bp"), len(_QUEUED))
        mine = {name: ours(*args) for name, args in listings.items()}
        for name in theirs:
            assert _blocks(mine[name]) == _blocks(theirs[name]), name
        # Held: out of the listing, in the quarantine listing with the reason.
        qid = next(line[:14] for line in mine["plain"].splitlines() if line.endswith("<>"))
        their_qid = next(line[:14] for line in theirs["plain"].splitlines() if line.endswith("<>"))
        assert build.run("-Qspam score 12", f"-qI{their_qid}").returncode == 0
        held = subprocess.run(
            mailgate_command("hold", "-c", str(gw.config), "--reason", "spam score 12", qid),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert held.returncode == 0, held.stderr
        held_listings: dict[str, str] = {}
        for args in (["-bp"], ["-bp", "-qQ"], ["-bp", "-v", "-qQ"], ["-bp", "-qSnobody"]):
            held_listings[" ".join(args)] = their = build.run(*args).stdout
            assert _blocks(ours(*args)) == _blocks(their), args
    finally:
        gw.stop()
    # What was compared has what it should: sizes of the bodies with LF line ends (as
    # Sendmail's df file), a recipient cut to 38 characters, the verbose columns, the
    # quarantine reason, an empty selection.
    plain = _blocks(theirs["plain"])[1]
    assert plain["<>"][0] == "QID      101 TIME <>"
    assert plain["<alice@client.example.net>"][0] == "QID       18 TIME <alice@client.example.net>"
    assert (
        plain["<eve@client.example.net>"][-1] == "\t\t\t\t\t <a.rather.long.local.part.indeed@examp"
    )
    assert _blocks(theirs["verbose"])[0][1].startswith("-----Q-ID----- --Size-- -Priority-")
    assert "\t\t\t\t\t\t<dave@example.org>" in _blocks(theirs["verbose"])[1]["<>"]
    assert list(_blocks(held_listings["-bp"])[1]) == [
        "<alice@client.example.net>",
        "<eve@client.example.net>",
    ] or list(_blocks(held_listings["-bp"])[1]) == [
        "<eve@client.example.net>",
        "<alice@client.example.net>",
    ]
    assert _blocks(held_listings["-bp -qQ"])[1]["<>"][1] == "     QUARANTINE: spam score 12"
    assert _blocks(held_listings["-bp -qSnobody"]) == (
        ["QUEUE is empty"],
        {},
        ["\t\tTotal requests: 0"],
    )


# -- the same deliveries from both: the to= lines ---------------------------------------------

_RELAY_MC = """\
OSTYPE(`linux')dnl
DAEMON_OPTIONS(`Port={port},Addr=127.0.0.1, Name=MTA')dnl
define(`ESMTP_MAILER_ARGS', `TCP $h {sink}')dnl
FEATURE(`access_db', `hash /etc/mail/access')dnl
FEATURE(`mailertable', `hash /etc/mail/mailertable')dnl
MAILER(`smtp')dnl
"""

# example.org: the sink, which refuses u001 (550) and u003 (451) at RCPT; data.example: a
# sink that defers every message at its end (451: for a 5xx, Sendmail's stat= is its
# sysexits text, "Service unavailable", where ours is the reply); down.example: nothing
# listens there.
_DELIVERIES = {
    "refused at RCPT": [f"u{i:03d}@example.org" for i in range(5)],
    "a hundred": [f"n{i:03d}@example.org" for i in range(100)],
    "refused after DATA": [f"u{i:03d}@data.example" for i in range(3)],
    "connection refused": [f"u{i:03d}@down.example" for i in range(3)],
}
_LISTED = re.compile(r"@(?:example\.org|data\.example|down\.example)>")


def _to_lines(texts: list[str]) -> list[list[str]]:
    """The to= lines for the test's recipients (not the bounces' own), a list for each
    message (their order: Sendmail's deliveries run at once), without the queue id and with
    the delays and the priority's number masked: Sendmail's message has no Received: of
    ours, so its size, which the priority holds, is another."""
    out: dict[str, list[str]] = {}
    for text in texts:
        qid, _, line = text.partition(": ")
        if line.startswith("to=") and _LISTED.search(line.split(", delay=")[0]):
            out.setdefault(qid, []).append(re.sub(r"(delay|xdelay|pri)=[\d:]+", r"\1=N", line))
    return sorted(out.values())


def _send_each(port: int, order: int) -> None:
    """Each message of ``_DELIVERIES`` in its own transaction; its recipients in ``order``."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("client.example.net")
        for subject, rcpts in _DELIVERIES.items():
            body = f"Subject: {subject}\r\n\r\nhello\r\n".encode()
            c.sendmail(f"alice@{HOSTNAME}", rcpts[::order], body)


def test_to_lines_as_sendmails_daemon(tmp_path: Path) -> None:
    """The same four messages relayed by the real ``sendmail -bD`` (its syslog lines read
    from a private rsyslogd) and by mailgate, to the same sinks: the to= lines alike, word
    for word but the queue id, the delays and the priority's number. One line for the
    recipients of one transaction with one outcome (a connection refused, a refusal after
    DATA, the accepted ones); each refused at RCPT on a line of its own, before it; a
    hundred cut into lines with ``[more]``. Sendmail sends a message's RCPTs, and lists
    them, in the reverse of the order they came in, mailgate in that order: Sendmail is
    given them reversed."""
    port = free_port("127.0.0.1")
    expected = sum(len(r) for r in _DELIVERIES.values())
    with SinkServer("127.0.0.1") as sink, SinkServer("127.0.0.3", sink.port) as refusing:
        sink.rcpt_reply["u001@example.org"] = "550 5.1.1 No such user"
        sink.rcpt_reply["u003@example.org"] = "451 4.3.0 Try again later"
        refusing.data_reply = "451 4.3.0 Not now"
        tables = tmp_path / "tables"
        tables.mkdir()
        (tables / "mailertable").write_text(
            "example.org esmtp:[127.0.0.1]\ndata.example esmtp:[127.0.0.3]\n"
            "down.example esmtp:[127.0.0.2]\n"
        )
        (tables / "access").write_text("Connect:127.0.0.1 RELAY\n")
        build = SendmailBuild(
            tmp_path / "sendmail", _RELAY_MC.format(port=port, sink=sink.port), tables
        )

        def listed(texts: list[str]) -> int:
            lines = [line for message in _to_lines(texts) for line in message]
            return sum(line.split(", delay=")[0].count("<") for line in lines)

        with Rsyslog(tmp_path / "syslog") as syslog:
            with build.daemon(port, syslog=syslog.socket):
                _send_each(port, -1)
                wait_until(
                    lambda: listed([ln.split(": ", 1)[1] for ln in syslog.lines()]) >= expected,
                    "Sendmail's to= lines",
                    30,
                )
            theirs = _to_lines([ln.split(": ", 1)[1] for ln in syslog.lines()])
        gw = GatewayProcess(
            tmp_path / "mailgate",
            dns=None,
            hostname=HOSTNAME,
            tables={
                "mailertable": (
                    f"example.org esmtp:[127.0.0.1]:{sink.port}\n"
                    f"data.example esmtp:[127.0.0.3]:{sink.port}\n"
                    f"down.example esmtp:[127.0.0.2]:{sink.port}\n"
                ),
                "access": "Connect:127.0.0.1 RELAY\n",
            },
            settings='[smtp]\ngreet_pause = "0s"\n',
        )
        with gw:
            _send_each(gw.port, 1)
            wait_until(
                lambda: listed([ln.split(": ", 1)[1] for ln in gw.log_lines(" to=")]) >= expected,
                "mailgate's to= lines",
                30,
            )
            ours = _to_lines([ln.split(": ", 1)[1] for ln in gw.log_lines(" to=")])
    assert sorted(sum(", [more], " in line for line in message) for message in ours) == [0, 0, 0, 2]
    assert ours == theirs


# -- the same sessions from both: the lines a session writes ----------------------------------

_SESSION_MC = """\
OSTYPE(`linux')dnl
DAEMON_OPTIONS(`Port={port},Addr=127.0.0.1, Name=MTA')dnl
define(`confPRIVACY_FLAGS', `authwarnings,novrfy,noexpn,noverb')dnl
FEATURE(`access_db', `hash /etc/mail/access')dnl
FEATURE(`mailertable', `hash /etc/mail/mailertable')dnl
MAILER(`local')dnl
MAILER(`smtp')dnl
"""
_SENDER = f"alice@{HOSTNAME}"
_MESSAGE = "Subject: t\r\nMessage-Id: <m1@client.example.net>\r\n\r\nbody\r\n."
# Each client its own address; None: the client closes instead of the next command.
_SESSIONS: dict[str, list[str | None]] = {
    "127.0.0.61": [
        "MAIL FROM:<spammer@bad.example>",
        f"MAIL FROM:<{_SENDER}>",
        "RCPT TO:<b@example.org>",
        "DATA",
        _MESSAGE,
        "MAIL FROM:<spammer@bad.example>",
        "QUIT",
    ],
    "127.0.0.62": [f"MAIL FROM:<{_SENDER}>", "QUIT"],  # Connect: REJECT
    "127.0.0.63": ["MAIL FROM:<spammer@bad.example>", "RSET", "QUIT"],
    "127.0.0.64": ["MAIL FROM:<spammer@bad.example>", None],
    "127.0.0.65": ["NOOP", "QUIT"],
    "127.0.0.66": ["VRFY root", "EXPN root", "ETRN example.org", "QUIT"],
    "127.0.0.67": [
        f"MAIL FROM:<{_SENDER}>",
        f"RCPT TO:<nosuch@{HOSTNAME}>",
        "RCPT TO:<b@elsewhere.example>",
        "RCPT TO:<b@example.org>",
        "HELO again.example.net",
        "QUIT",
    ],
    "127.0.0.68": [f"MAIL FROM:<{_SENDER}>", "RCPT TO:<b@example.org>", None],
}


def _run_sessions(port: int) -> None:
    for ip, commands in _SESSIONS.items():
        with RawSmtp("127.0.0.1", port, source=ip) as c:
            c.read_reply()
            c.cmd("EHLO client.example.net")
            for command in commands:
                if command is None:
                    break
                c.cmd(command)
        time.sleep(0.2)  # each session's lines before the next one's


def _session_lines(texts: list[str]) -> dict[str, list[str]]:
    """Per client, the lines of its session (those naming it, and those with a queue id of
    theirs), deliveries left out; queue ids numbered in order of appearance, so that which
    lines share one is compared; a message's size and msgid masked (ours has our Received:)."""
    out: dict[str, list[str]] = {}
    for ip in _SESSIONS:
        qids: list[str] = []
        for text in texts:
            if f"[{ip}]" in text and re.match(r"[0-9A-Za-x]{14}: ", text):
                qids.append(text[:14])
        lines = []
        for text in texts:
            qid = text[:14] if re.match(r"[0-9A-Za-x]{14}: ", text) else None
            if not (f"[{ip}]" in text or qid in qids) or " to=" in text or ": DSN: " in text:
                continue
            if qid is not None:
                text = f"Q{list(dict.fromkeys(qids)).index(qid)}{text[14:]}"
            if " from=" in text and "msgid=" in text:
                text = re.sub(r"size=\d+", "size=N", re.sub(r"msgid=<[^>]*>", "msgid=M", text))
            lines.append(text)
        out[ip] = lines
    return out


def test_session_lines_as_sendmails_daemon(tmp_path: Path) -> None:
    """The same sessions with the real ``sendmail -bD`` (its syslog read from a private
    rsyslogd) and with mailgate: the lines each writes, word for word but queue ids, sizes
    and msgids. A refused MAIL has the queue id the next transaction takes and a from= line
    of its own (size=0, nrcpts=0) at RSET or the end unless a MAIL is taken after it; a
    client refused at Connect: has its check_relay line with arg1 and arg2; an unknown user
    is Sendmail's "<addr>... User unknown"; VRFY, EXPN and ETRN, the session that asked for
    nothing and the lost input have the envelope's queue id; HELO inside a transaction
    writes its from=."""
    port = free_port("127.0.0.1")
    tables = tmp_path / "tables"
    tables.mkdir()
    mailertable = "example.org smtp:[127.0.0.99]\n"
    access = "To:example.org RELAY\nFrom:spammer@bad.example REJECT\nConnect:127.0.0.62 REJECT\n"
    (tables / "mailertable").write_text(mailertable)
    (tables / "access").write_text(access)
    build = SendmailBuild(tmp_path / "sendmail", _SESSION_MC.format(port=port), tables)
    with Rsyslog(tmp_path / "syslog") as syslog:
        with build.daemon(port, syslog=syslog.socket):
            _run_sessions(port)
            wait_until(
                lambda: "[127.0.0.68] to MTA after rcpt" in "".join(syslog.lines()),
                "Sendmail's last session's lines",
                30,
            )
            time.sleep(0.5)
        theirs = _session_lines([ln.split(": ", 1)[1] for ln in syslog.lines()])
    gw = GatewayProcess(
        tmp_path / "mailgate",
        dns=None,
        hostname=HOSTNAME,
        tables={"mailertable": mailertable, "access": access},
        settings='[smtp]\ngreet_pause = "0s"\nbad_rcpt_throttle = 0\n',
    )
    with gw:
        _run_sessions(gw.port)
        wait_until(lambda: "[127.0.0.68] to MTA after rcpt" in gw.log(), "our lines", 30)
        time.sleep(0.5)
        ours = _session_lines([ln.split(": ", 1)[1] for ln in gw.log().splitlines()])
    assert theirs["127.0.0.61"][0].startswith("Q0: ruleset=check_mail, arg1=<spammer@")
    assert ours == theirs
