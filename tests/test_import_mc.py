"""``mailgate import-mc``: sendmail.mc → mailgate.toml, loaded back with mailgate's own reader.

The example of the Sendmail gateway first (every line maps, the tables' warnings are those of
``mailgate check``, the result serves mail), then hand-made variants: each FEATURE of the
example alone, unknown lines, unsafe features, quoting, milters, listeners, the tables.
The comparison with real Sendmail built from the same mc is tests/test_sendmail_compare.py.
"""

from __future__ import annotations

import re
import shutil
import smtplib
import socket
import subprocess
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailgate.cli import main
from mailgate.config import Config, load_config, parse_config
from mailgate.migrate.m4 import McSyntaxError
from mailgate.migrate.mc import convert
from mailgate.migrate.toml import render
from tests.support.gateway import free_port, mailgate_command, run_cli
from tests.support.wait import wait_until

EXAMPLES = Path(__file__).parent / "data" / "sendmail-examples"
TABLES = ("access", "mailertable", "local-host-names", "virtusertable", "domaintable")


@dataclass
class Imported:
    status: int
    toml: str
    stderr: str
    path: Path  # where the TOML was written

    @property
    def text(self) -> str:
        """The TOML with its wrapped comment lines joined, for looking for a sentence."""
        return re.sub(r"\n# {1,5}(?=\S)", " ", self.toml)

    @property
    def config(self) -> Config:
        return load_config(self.path)

    def findings(self, kind: str = "warning") -> list[str]:
        prefix = f"{kind}: "
        return [ln[len(prefix) :] for ln in self.stderr.splitlines() if ln.startswith(prefix)]


def import_mc(
    tmp: Path,
    mc: str,
    tables: dict[str, str] | None = None,
    *options: str,
    capsys: pytest.CaptureFixture[str],
) -> Imported:
    mail = tmp / "mail"
    mail.mkdir(exist_ok=True)
    for name, text in (tables or {}).items():
        (mail / name).write_text(text)
    (mail / "sendmail.mc").write_text(mc)
    capsys.readouterr()
    status = main(["import-mc", str(mail / "sendmail.mc"), *options])
    out, err = capsys.readouterr()
    path = tmp / "mailgate.toml"
    path.write_text(out)
    return Imported(status, out, err, path)


def example(tmp: Path) -> Path:
    mail = tmp / "mail"
    shutil.copytree(EXAMPLES, mail)
    return mail


# --- the example ------------------------------------------------------------------------


def test_the_example_becomes_a_config_that_loads_with_what_it_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mail = example(tmp_path)
    capsys.readouterr()
    status = main(["import-mc", str(mail / "sendmail.mc")])
    out, err = capsys.readouterr()
    assert status == 0
    (tmp_path / "mailgate.toml").write_text(out)
    cfg = load_config(tmp_path / "mailgate.toml")
    assert cfg.listen == (("0.0.0.0", 25),)
    assert cfg.relay_hosts_only is True
    assert cfg.tables_dir == mail
    assert cfg.smtp.greet_pause == 5.0
    assert cfg.smtp.privacy == ("authwarnings", "novrfy", "noexpn", "noverb")
    assert cfg.smtp.bad_rcpt_throttle == 1
    assert cfg.smtp.connection_rate_throttle == 100
    # What the mc does not say stays as Sendmail had it where mailgate's default agrees.
    assert cfg.smtp.check_sender_domain is True
    assert cfg.smtp.require_qualified_sender is True
    assert cfg.access.blocklist_recipients is False
    assert cfg.queue.warn_after == 4 * 3600 and cfg.queue.max_age == 5 * 86400
    # Syslog as before, under the name the admin's fail2ban and logwatch know
    assert (cfg.log.target, cfg.log.syslog_name) == ("syslog", "sm-mta")
    # No line of the mc is left unmapped: every finding is about the tables.
    findings = [ln for ln in err.splitlines() if ln.startswith(("warning:", "refused:", "error:"))]
    assert len(findings) == 7
    assert all(f.startswith(f"warning: {mail}/") for f in findings)
    assert not [f for f in findings if f.startswith(f"warning: {mail / 'sendmail.mc'}:")]
    assert err.splitlines()[-1].endswith("7 warnings, 0 refused, 0 errors")


def test_every_line_of_the_example_is_accounted_for_and_every_setting_names_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mail = example(tmp_path)
    main(["import-mc", str(mail / "sendmail.mc")])
    out = capsys.readouterr().out
    listing = out.split("# --- sendmail.mc, line by line", 1)[1]
    for n, line in enumerate((mail / "sendmail.mc").read_text().splitlines(), 1):
        assert f"# sendmail.mc:{n}: {line}\n" in listing, line
    # Each key is preceded by the mc line that decides it.
    blocks = out.split("\n\n")
    decided = {
        "greet_pause": "FEATURE(`greet_pause',5000)dnl",
        "privacy": "define(`confPRIVACY_FLAGS',`authwarnings,novrfy,noexpn,noverb')dnl",
        "bad_rcpt_throttle": "define(`confBAD_RCPT_THROTTLE', `1')dnl",
        "connection_rate_throttle": "define(`confCONNECTION_RATE_THROTTLE', `100')dnl",
        "relay_hosts_only": "FEATURE(relay_hosts_only)dnl",
        "listen": "DAEMON_OPTIONS(`Port=smtp, Name=MTA')dnl",
    }
    for key, line in decided.items():
        (block,) = [b for b in blocks if re.search(rf"^{key} = ", b, re.M)]
        assert re.search(rf"^# sendmail\.mc:\d+: {re.escape(line)}$", block, re.M), block


def test_the_tables_warnings_are_those_of_mailgate_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mail = example(tmp_path)
    main(["import-mc", str(mail / "sendmail.mc")])
    out, err = capsys.readouterr()
    (tmp_path / "mailgate.toml").write_text(out)
    imported = sorted(ln for ln in err.splitlines() if ln.startswith("warning: "))
    checked = run_cli("check", "-c", str(tmp_path / "mailgate.toml"))
    assert checked.returncode == 0, checked.stderr
    assert imported == sorted(ln for ln in checked.stdout.splitlines() if ln.startswith("warning:"))
    access, mt = mail / "access", mail / "mailertable"
    assert any(
        w.startswith(f"warning: {access}:4: 192.168.0. never matches") and "write 192.168.0 " in w
        for w in imported
    )
    for n in (1, 2, 3):
        assert any(
            w.startswith(f"warning: {mt}:{n}: targetdomain{n}.com: local-host-names")
            for w in imported
        )
    assert len(imported) == 7
    # The same warnings close the TOML file, as comments.
    assert f"warning: {access}:4: 192.168.0. never matches" in re.sub(r"\n# (?=\S)", " ", out)


def test_the_imported_example_serves_mail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Done when: the example and its tables turn into a working config in one command. Only
    what a test must change is changed: the address (loopback, a free port) and the folders."""
    mail = example(tmp_path)
    main(["import-mc", str(mail / "sendmail.mc")])
    toml = capsys.readouterr().out
    port = free_port()
    replaced = {
        "listen": f'["127.0.0.1:{port}"]',
        "spool_dir": f'"{tmp_path / "spool"}"',
        "maildir_root": f'"{tmp_path / "maildir"}"',
        "target": f'"file"\nfile = "{tmp_path / "maillog"}"',  # not the machine's syslog
    }
    for key, value in replaced.items():
        toml, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", toml, flags=re.M)
        assert n == 1, key
    toml = 'hostname = "gateway.example.com"\n' + toml.replace(
        "[smtp]\n", "[smtp]\ncheck_sender_domain = false\n", 1
    )
    assert tomllib.loads(toml)["tables_dir"] == str(mail)
    config = tmp_path / "mailgate.toml"
    config.write_text(toml)
    (tmp_path / "maildir" / "alice").mkdir(parents=True)  # a local user: a Maildir folder

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    proc = subprocess.Popen(
        mailgate_command("serve", "-c", str(config)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        wait_until(listening, "the imported config's listener", 15)
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:  # greet pause: 5 s
            s.ehlo("client.example.org")
            assert s.vrfy("postmaster")[0] == 252  # novrfy
            s.mail("sender@example.org")
            # targetdomain1.com is in local-host-names: local, as in Sendmail (§18.3).
            assert s.rcpt("alice@targetdomain1.com")[0] == 250
            assert s.rcpt("nobody-here@targetdomain1.com")[0] == 550
            assert s.data(b"Subject: imported\r\n\r\nhello\r\n")[0] == 250
        new = tmp_path / "maildir" / "alice" / "new"
        wait_until(lambda: new.is_dir() and any(new.iterdir()), "delivery to the Maildir", 30)
        (message,) = list(new.iterdir())
        assert b"Subject: imported" in message.read_bytes()
    finally:
        proc.terminate()
        proc.wait(20)


# --- each FEATURE and define of the example, alone -----------------------------------------

ALONE = [
    ("FEATURE(relay_hosts_only)dnl", lambda c: c.relay_hosts_only, True),
    ("MAILER(smtp)dnl", lambda c: c.relay_hosts_only, False),  # Sendmail's default
    ("FEATURE(`greet_pause',5000)dnl", lambda c: c.smtp.greet_pause, 5.0),
    ("FEATURE(`greet_pause',`1500')dnl", lambda c: c.smtp.greet_pause, 1.5),
    ("MAILER(smtp)dnl", lambda c: c.smtp.greet_pause, 0.0),  # no FEATURE(greet_pause)
    (
        "define(`confPRIVACY_FLAGS',`authwarnings,novrfy,noexpn,noverb')dnl",
        lambda c: c.smtp.privacy,
        ("authwarnings", "novrfy", "noexpn", "noverb"),
    ),
    ("MAILER(smtp)dnl", lambda c: c.smtp.privacy, ("authwarnings",)),
    ("define(`confBAD_RCPT_THROTTLE', `1')dnl", lambda c: c.smtp.bad_rcpt_throttle, 1),
    ("MAILER(smtp)dnl", lambda c: c.smtp.bad_rcpt_throttle, 0),
    (
        "define(`confCONNECTION_RATE_THROTTLE', `100')dnl",
        lambda c: c.smtp.connection_rate_throttle,
        100,
    ),
    ("MAILER(smtp)dnl", lambda c: c.smtp.connection_rate_throttle, 0),
    ("DAEMON_OPTIONS(`Port=smtp, Name=MTA')dnl", lambda c: c.listen, (("0.0.0.0", 25),)),
    ("FEATURE(`blocklist_recipients')", lambda c: c.access.blocklist_recipients, True),
    ("define(`confTO_QUEUEWARN', `2h')", lambda c: c.queue.warn_after, 7200.0),
    ("define(`confTO_QUEUERETURN', `3d')", lambda c: c.queue.max_age, 3 * 86400.0),
    ("define(`confTO_COMMAND', `10')", lambda c: c.smtp.command_timeout, 600.0),  # minutes
    ("define(`confTO_DATABLOCK', `1h30m')", lambda c: c.smtp.data_timeout, 5400.0),
    ("define(`confMAX_MESSAGE_SIZE', `10000000')", lambda c: c.smtp.max_message_size, 10000000),
    ("define(`confALLOW_BOGUS_HELO', `True')", lambda c: c.smtp.allow_bogus_helo, True),
    ("define(`confALLOW_BOGUS_HELO')", lambda c: c.smtp.allow_bogus_helo, True),
    ("define(`confALLOW_BOGUS_HELO', `False')", lambda c: c.smtp.allow_bogus_helo, False),
    ("MAILER(smtp)dnl", lambda c: c.smtp.allow_bogus_helo, False),
    ("define(`confMAX_RCPTS_PER_MESSAGE', `500')", lambda c: c.smtp.max_recipients, 500),
    ("define(`confMAX_RCPTS_PER_MESSAGE', `0')", lambda c: c.smtp.max_recipients, 100),
    ("define(`confDOMAIN_NAME', `mx.example.com')", lambda c: c.hostname, "mx.example.com"),
    (
        "define(`confHELO_NAME', `out.example.com')",
        lambda c: c.delivery.helo_name,
        "out.example.com",
    ),
    (
        "CLIENT_OPTIONS(`Family=inet, Addr=192.0.2.44')",
        lambda c: c.delivery.bind_address,
        "192.0.2.44",
    ),
    (
        "define(`confDOUBLE_BOUNCE_ADDRESS', `mailops@example.com')",
        lambda c: c.queue.double_bounce_address,
        "mailops@example.com",
    ),
    ("define(`confDOUBLE_BOUNCE_ADDRESS', `')", lambda c: c.queue.double_bounce_address, ""),
    ("define(`confLOG_LEVEL', `9')", lambda c: c.log.level, "info"),
    ("define(`confLOG_LEVEL', `5')", lambda c: c.log.level, "notice"),
]


@pytest.mark.parametrize(
    ("line", "get", "value"), ALONE, ids=[f"{n}:{a[0]}" for n, a in enumerate(ALONE)]
)
def test_one_line_alone(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    line: str,
    get: Callable[[Config], object],
    value: object,
) -> None:
    result = import_mc(
        tmp_path, f"divert(0)dnl\nFEATURE(no_default_msa)dnl\n{line}\n", capsys=capsys
    )
    assert result.status == 0, result.stderr
    assert result.findings() == []
    assert get(result.config) == value


@pytest.mark.parametrize(
    ("line", "table"),
    [
        ("FEATURE(`mailertable',`dbm /etc/mail/mailertable')dnl", "mailertable"),
        ("FEATURE(`mailertable',`hash -o /etc/mail/mailertable')dnl", "mailertable"),
        ("FEATURE(virtusertable)dnl", "virtusertable"),
        ("FEATURE(domaintable)dnl", "domaintable"),
        ("FEATURE(access_db)", "access"),
        ("FEATURE(`access_db', `hash -T<TMPF> -o /etc/mail/access')", "access"),
    ],
)
def test_a_table_feature_reads_the_table_from_the_mail_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, table: str
) -> None:
    result = import_mc(tmp_path, f"FEATURE(no_default_msa)\n{line}\n", capsys=capsys)
    assert result.status == 0 and result.findings() == []
    assert result.config.tables_dir == tmp_path / "mail"
    assert f"mailgate reads {tmp_path / 'mail' / table} as text" in result.text


def test_a_table_sendmail_read_elsewhere_is_named_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mc = (
        "FEATURE(no_default_msa)\n"
        "FEATURE(`mailertable', `hash /var/lib/mail/routes')\n"
        "FEATURE(`virtusertable', `hash /etc/mail/virtual')\n"
        "FEATURE(`access_db', `ldap -1 -v sendmailMTAMapValue')\n"
    )
    result = import_mc(tmp_path, mc, capsys=capsys)
    mail = tmp_path / "mail"
    assert result.findings() == [
        f"{mail}/sendmail.mc:2: FEATURE(mailertable): Sendmail read /var/lib/mail/routes,"
        f" mailgate reads {mail}/mailertable: copy the file there",
        f"{mail}/sendmail.mc:3: FEATURE(virtusertable): Sendmail read /etc/mail/virtual,"
        f" mailgate reads {mail}/virtusertable: rename the file",
        f"{mail}/sendmail.mc:4: FEATURE(access_db) is a ldap map, not a file: mailgate reads"
        f" {mail}/access as text; export the map there (makemap -u prints a hash map)",
    ]


def test_domain_generic_is_read_as_its_file_has_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = import_mc(
        tmp_path,
        "FEATURE(no_default_msa)\nDOMAIN(generic)dnl\n",
        {"local-host-names": "a.example\n"},
        capsys=capsys,
    )
    assert result.status == 0 and result.findings() == []
    # FEATURE(use_cw_file) comes with it: local-host-names is not "a file Sendmail ignored".
    assert "FEATURE(use_cw_file) (local-host-names)" in result.text
    assert "MaxHeadersLength 32768: mailgate's fixed limit is the same" in result.text


# --- lines the importer cannot map ----------------------------------------------------------


def test_each_line_it_cannot_map_is_a_warning_naming_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mc = "\n".join(
        [
            "divert(0)dnl",  # 1
            "FEATURE(no_default_msa)dnl",  # 2
            "FEATUR(relay_hosts_only)dnl",  # 3: a typo
            "FEATURE(`no_such_feature')dnl",  # 4
            "define(`confPRIVACY_FLAG', `novrfy')dnl",  # 5: a typo
            "define(`confREFUSE_LA', `12')dnl",  # 6: no equivalent
            "MAILER(procmail)dnl",  # 7
            "DOMAIN(`berkeley-only')dnl",  # 8
            "FEATURE(dnsbl, `bl.example.org')dnl",  # 9
            "stray text",  # 10
            "LOCAL_CONFIG",  # 11
            "Kmymap hash /etc/mail/mymap",  # 12
            "FEATURE(relay_hosts_only)dnl",  # 13: mapped again
            "define(`SMART_HOST', `[hub.example.com]')dnl",  # 14
            "MASQUERADE_AS(`example.com')dnl",  # 15
            "",
        ]
    )
    result = import_mc(tmp_path, mc, capsys=capsys)
    assert result.status == 0
    mc_path = f"{tmp_path / 'mail' / 'sendmail.mc'}"
    lines = [int(w[len(mc_path) + 1 :].split(":")[0]) for w in result.findings()]
    assert lines == [3, 4, 5, 6, 7, 8, 9, 10, 11, 14, 15]
    found = dict(zip(lines, result.findings(), strict=True))
    assert "FEATUR(…) is no macro of Sendmail's cf" in found[3]
    assert "not a Sendmail feature" in found[4]
    assert "confPRIVACY_FLAG: not a Sendmail option (misspelt?)" in found[5]
    assert "confREFUSE_LA: mailgate does not look at the load average" in found[6]
    assert "MAILER(procmail): mailgate has no procmail mailer" in found[7]
    assert "mailgate has no DNS block lists" in found[9]
    assert "text outside any macro" in found[10]
    assert "LOCAL_CONFIG: raw sendmail.cf rules and classes (lines 11-12)" in found[11]
    assert "add the line '.  relay:[hub.example.com]' to mailertable" in found[14]
    assert result.config.relay_hosts_only is True
    # The TOML says it too, under the line it is about.
    assert (
        "# sendmail.mc:10: stray text\n#     not mapped\n#     warning: text outside" in result.toml
    )


def test_table_files_sendmail_ignored_but_mailgate_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tables = {
        "virtusertable": "info@a.example root\n",
        "access": "GreetPause:192.0.2.7 0\n",
        "local-host-names": "a.example\n",
    }
    result = import_mc(
        tmp_path, "FEATURE(no_default_msa)\nFEATURE(access_db)\n", tables, capsys=capsys
    )
    mail = tmp_path / "mail"
    assert (
        f"{mail}/virtusertable: 1 entries, but {mail}/sendmail.mc has no FEATURE(virtusertable):"
        " Sendmail ignored this file, mailgate reads it; move it away if it is not meant"
    ) in result.findings()
    assert any(w.startswith(f"{mail}/local-host-names: 1 entries") for w in result.findings())
    assert (
        f"{mail}/access:1: GreetPause:192.0.2.7: Sendmail ignored it without"
        " FEATURE(greet_pause); mailgate pauses this client"
    ) in result.findings()


def test_a_table_mailgate_cannot_load_fails_the_import(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = import_mc(
        tmp_path,
        "FEATURE(no_default_msa)\nFEATURE(mailertable)\n",
        {"mailertable": "a.example smtp:[192.0.2.1]\nb.example\n"},
        capsys=capsys,
    )
    assert result.status == 1
    assert result.findings("error") == [
        f"{tmp_path / 'mail' / 'mailertable'}:2: key 'b.example' has no value (mailgate check"
        " refuses this table)"
    ]


# --- unsafe features ---------------------------------------------------------------------


@pytest.mark.parametrize("allow", [False, True])
def test_promiscuous_relay_is_refused_even_with_allow_unsafe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], allow: bool
) -> None:
    options = ("--allow-unsafe",) if allow else ()
    result = import_mc(
        tmp_path,
        "FEATURE(no_default_msa)\nFEATURE(`promiscuous_relay')dnl\n",
        None,
        *options,
        capsys=capsys,
    )
    assert result.status == 1
    (refusal,) = result.findings("refused")
    assert refusal.startswith(
        f"{tmp_path / 'mail' / 'sendmail.mc'}:2: FEATURE(promiscuous_relay) is refused"
    )
    assert "open relay" in refusal and "--allow-unsafe does not change that" in refusal
    # The config is still written, and it is not an open relay: nothing in it relays more.
    cfg = result.config
    assert cfg.relay_hosts_only is False  # Sendmail's default without relay_hosts_only
    assert "# refused: FEATURE(promiscuous_relay)" not in result.toml
    assert "#     refused: FEATURE(promiscuous_relay) is refused" in result.toml


@pytest.mark.parametrize(
    ("feature", "get"),
    [
        ("accept_unresolvable_domains", lambda c: c.smtp.check_sender_domain),
        ("accept_unqualified_senders", lambda c: c.smtp.require_qualified_sender),
    ],
)
def test_an_unsafe_feature_stays_off_unless_allowed(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    feature: str,
    get: Callable[[Config], object],
) -> None:
    mc = f"FEATURE(no_default_msa)\nFEATURE(`{feature}')dnl\n"
    refused = import_mc(tmp_path, mc, capsys=capsys)
    assert refused.status == 1
    (refusal,) = refused.findings("refused")
    assert f"FEATURE({feature}) is refused: it accepts" in refusal
    assert "run the import with --allow-unsafe to take the risk" in refusal
    assert get(refused.config) is True
    allowed = import_mc(tmp_path, mc, None, "--allow-unsafe", capsys=capsys)
    assert allowed.status == 0
    assert allowed.findings("refused") == []
    (warning,) = allowed.findings()
    assert f"FEATURE({feature}) imported because of --allow-unsafe: it accepts" in warning
    assert get(allowed.config) is False


@pytest.mark.parametrize("feature", ["loose_relay_check", "relay_local_from", "relay_mail_from"])
def test_relaying_on_forgeable_facts_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], feature: str
) -> None:
    result = import_mc(
        tmp_path,
        f"FEATURE(no_default_msa)\nFEATURE({feature})\n",
        None,
        "--allow-unsafe",
        capsys=capsys,
    )
    assert result.status == 1
    (refusal,) = result.findings("refused")
    assert f"FEATURE({feature}) is refused" in refusal


def test_a_commented_out_open_relay_is_no_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mc = (
        "FEATURE(no_default_msa)\n"
        "dnl FEATURE(promiscuous_relay)\n"
        "# FEATURE(promiscuous_relay)\n"
        "define(`confX_COMMENT', `FEATURE(promiscuous_relay)')dnl\n"
    )
    result = import_mc(tmp_path, mc, capsys=capsys)
    assert result.findings("refused") == []
    assert result.status == 0


# --- quoting and m4 ------------------------------------------------------------------------


def test_quoting_variants_give_the_same_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    variants = [
        "FEATURE(`greet_pause',`2500')dnl\ndefine(`confPRIVACY_FLAGS', `novrfy,noexpn')dnl\n",
        "FEATURE(greet_pause, 2500)\ndefine(confPRIVACY_FLAGS, ``novrfy,noexpn'')\n",
        "FEATURE(`greet_pause', dnl the pause\n  `2500')\n"
        "define(`confPRIVACY_FLAGS',dnl\n`novrfy,noexpn')dnl\n",
        "changequote([,])dnl\nFEATURE([greet_pause],[2500])dnl\n"
        "define([confPRIVACY_FLAGS],[novrfy, noexpn])dnl\n",
        "define(`PAUSE', `2500')dnl\nFEATURE(`greet_pause', PAUSE)dnl\n"
        "define(`confPRIVACY_FLAGS', `novrfy noexpn')dnl\n",
    ]
    for mc in variants:
        result = import_mc(tmp_path, "FEATURE(no_default_msa)\n" + mc, capsys=capsys)
        assert result.status == 0 and result.findings() == [], (mc, result.stderr)
        cfg = result.config
        assert (cfg.smtp.greet_pause, cfg.smtp.privacy) == (2.5, ("novrfy", "noexpn")), mc


def test_the_last_define_wins_as_in_m4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mc = (
        "FEATURE(no_default_msa)\n"
        "define(`confBAD_RCPT_THROTTLE', `1')dnl\n"
        "define(`confBAD_RCPT_THROTTLE', `3')dnl\n"
        "define(`confMAX_MESSAGE_SIZE', `1000')dnl\n"
        "undefine(`confMAX_MESSAGE_SIZE')dnl\n"
    )
    result = import_mc(tmp_path, mc, capsys=capsys)
    assert result.config.smtp.bad_rcpt_throttle == 3
    assert result.config.smtp.max_message_size == 50 * 1024 * 1024
    assert (
        "# sendmail.mc:2: define(`confBAD_RCPT_THROTTLE', `1')dnl\n#     replaced by line 3"
        in result.toml
    )


def test_ifdef_takes_the_branch_m4_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mc = (
        "FEATURE(no_default_msa)\n"
        "define(`confBAD_RCPT_THROTTLE', `2')dnl\n"
        "ifdef(`confBAD_RCPT_THROTTLE',\n"
        "  `FEATURE(relay_hosts_only)', `FEATURE(promiscuous_relay)')dnl\n"
        "ifdef(`confMAX_MESSAGE_SIZE',\n"
        "  `FEATURE(promiscuous_relay)', `FEATURE(greet_pause, 700)')dnl\n"
    )
    result = import_mc(tmp_path, mc, capsys=capsys)
    assert result.status == 0 and result.findings("refused") == []
    assert result.config.relay_hosts_only is True
    assert result.config.smtp.greet_pause == pytest.approx(0.7)


@pytest.mark.parametrize(
    ("mc", "line"),
    [
        ("FEATURE(no_default_msa)\nFEATURE(`mailertable,`hash /etc/mail/mailertable')\n", 2),
        ("FEATURE(no_default_msa)\n\nDAEMON_OPTIONS(`Port=smtp'\nMAILER(smtp)\n", 3),
    ],
)
def test_an_mc_m4_would_fail_on_is_an_error_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mc: str, line: int
) -> None:
    result = import_mc(tmp_path, mc, capsys=capsys)
    assert result.status == 2
    assert result.toml == ""
    assert result.stderr.startswith(
        f"error: {tmp_path / 'mail' / 'sendmail.mc'}:{line}: end of file"
    )


@pytest.mark.parametrize("where", ["mail dir", "confCT_FILE"])
def test_use_ct_file_becomes_the_trusted_users(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    """Class t from its file, beside Sendmail's own root and daemon: who may use sendmail -f
    without an X-Authentication-Warning."""
    users = "# who may set the sender\nmailman\nwww-data  listmaster\nroot\n"
    if where == "mail dir":
        mc, tables = (
            "FEATURE(no_default_msa)\nFEATURE(`use_ct_file')dnl\n",
            {"trusted-users": users},
        )
    else:
        ct = tmp_path / "elsewhere" / "trusted"
        ct.parent.mkdir()
        ct.write_text(users)
        mc = (
            f"FEATURE(no_default_msa)\ndefine(`confCT_FILE', `{ct}')dnl\n"
            "FEATURE(`use_ct_file')dnl\n"
        )
        tables = {}
    result = import_mc(tmp_path, mc, tables, capsys=capsys)
    assert result.status == 0 and result.findings() == []
    assert result.config.submission.trusted_users == (
        "root",
        "daemon",
        "mailman",
        "www-data",
        "listmaster",
    )


def test_use_ct_file_without_its_file_is_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = import_mc(
        tmp_path, "FEATURE(no_default_msa)\nFEATURE(`use_ct_file')dnl\n", capsys=capsys
    )
    (warning,) = result.findings()
    assert "FEATURE(use_ct_file): cannot read " in warning and "root and daemon only" in warning
    assert result.config.submission.trusted_users == ("root", "daemon")


# --- listeners, milters ------------------------------------------------------------------


def test_daemon_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mc = (
        "FEATURE(`no_default_msa')dnl\n"
        "DAEMON_OPTIONS(`Family=inet,  Name=MTA-v4, Port=smtp, Addr=192.0.2.25')dnl\n"
        "DAEMON_OPTIONS(`Family=inet6, Name=MTA-v6, Port=25, Addr=2001:db8::25')dnl\n"
        "DAEMON_OPTIONS(`Family=inet,  Name=MSP-v4, Port=submission, M=Ea, Addr=127.0.0.1')dnl\n"
        "DAEMON_OPTIONS(`Port=2525, Name=Alt, M=E')dnl\n"
    )
    result = import_mc(tmp_path, mc, capsys=capsys)
    assert result.config.listen == (("192.0.2.25", 25), ("2001:db8::25", 25), ("0.0.0.0", 2525))
    mc_path = tmp_path / "mail" / "sendmail.mc"
    assert result.findings() == [
        f"{mc_path}:4: DAEMON_OPTIONS(Family=inet,  Name=MSP-v4, Port=submission, M=Ea,"
        " Addr=127.0.0.1): port 587 requires SMTP AUTH (M=a), which mailgate does not offer;"
        " not imported",
        f"{mc_path}:5: DAEMON_OPTIONS(Port=2525, Name=Alt, M=E): M=E refused ETRN there;"
        " mailgate answers ETRN on every port",
    ]


def test_without_no_default_msa_port_587_is_served_and_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = import_mc(tmp_path, "MAILER(smtp)\n", capsys=capsys)
    assert result.config.listen == (("0.0.0.0", 25), ("0.0.0.0", 587))
    (warning,) = result.findings()
    assert "Sendmail listened on port 587 too" in warning and "without SMTP AUTH" in warning


@pytest.mark.parametrize(("flags", "action"), [(", F=T", "tempfail"), (", F=R", "reject")])
def test_a_milter_becomes_a_milter_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: str, action: str
) -> None:
    mc = (
        "FEATURE(no_default_msa)\n"
        f"INPUT_MAIL_FILTER(`clamav', `S=local:/run/clamav/milter.ctl{flags}, T=S:4m;R:4m')dnl\n"
        "define(`confMILTER_MACROS_CONNECT', `j, `{client_addr}'')dnl\n"
    )
    result = import_mc(tmp_path, mc, capsys=capsys)
    assert result.status == 0 and result.findings() == []
    assert (
        "[[milter]]\n"
        'name = "clamav"\n'
        'socket = "local:/run/clamav/milter.ctl"\n'
        f'default_action = "{action}"\n'
        'connect_timeout = "5m"\n'
        'send_timeout = "4m"\n'
        'read_timeout = "4m"\n'
        'eom_timeout = "5m"\n'
        'connect_macros = ["j", "{client_addr}"]\n'
    ) in result.toml
    [milter] = result.config.milter
    assert (milter.name, str(milter.socket), milter.default_action) == (
        "clamav",
        "unix:/run/clamav/milter.ctl",
        action,
    )
    assert (milter.connect_timeout, milter.send_timeout, milter.read_timeout) == (300, 240, 240)
    assert milter.connect_macros == ("j", "{client_addr}")


def test_a_milter_without_flags_is_accepted_unfiltered_as_in_sendmail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mc = (
        "FEATURE(no_default_msa)\n"
        "INPUT_MAIL_FILTER(`rspamd', `S=inet:11332@localhost')dnl\n"
        "INPUT_MAIL_FILTER(`opendkim', `S=inet:8891@localhost, F=T')dnl\n"
    )
    result = import_mc(tmp_path, mc, capsys=capsys)
    (warning,) = result.findings()
    assert warning.startswith(f"{tmp_path / 'mail' / 'sendmail.mc'}:2: mail filter rspamd:")
    assert 'default_action = "accept" as in Sendmail' in warning
    assert [(m.name, m.default_action) for m in result.config.milter] == [
        ("rspamd", "accept"),
        ("opendkim", "tempfail"),
    ]


def test_the_milter_lines_say_what_each_became(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each INPUT_MAIL_FILTER is a table of its own (m4's macro appends to the list: no line
    replaces another), and the list's and the macros' define lines say what they set."""
    mc = (
        "FEATURE(no_default_msa)\n"
        "define(`confMILTER_MACROS_CONNECT', `j, {client_addr}')dnl\n"
        "INPUT_MAIL_FILTER(`rspamd', `S=inet:11332@localhost, F=T')dnl\n"
        "INPUT_MAIL_FILTER(`opendkim', `S=inet:8891@localhost, F=T')dnl\n"
        "INPUT_MAIL_FILTER(`clamav', `S=unix:/run/clamav-milter.sock, F=R')dnl\n"
        "define(`confINPUT_MAIL_FILTERS', `opendkim, rspamd')dnl\n"
    )
    result = import_mc(tmp_path, mc, capsys=capsys)
    assert [m.name for m in result.config.milter] == ["opendkim", "rspamd"]
    assert "replaced by line" not in result.toml
    notes = result.toml.split("line by line")[1]
    for line, said in [
        (2, "connect_macros of every [[milter]] table"),
        (3, "a [[milter]] table, default_action = tempfail"),
        (4, "a [[milter]] table, default_action = tempfail"),
        (5, "mail filter clamav: defined, not used (not in confINPUT_MAIL_FILTERS)"),
        (6, "the [[milter]] tables, in this order: opendkim, rspamd"),
    ]:
        at = notes.index(f"# sendmail.mc:{line}: ")
        assert notes[at:].split("\n")[1] == f"#     {said}", (line, notes[at:])


def test_a_milter_without_a_name_or_socket_is_refused_and_the_rest_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mc = (
        "FEATURE(no_default_msa)\n"
        "INPUT_MAIL_FILTER(`', `S=inet:11332@localhost, F=T')dnl\n"
        "INPUT_MAIL_FILTER(`opendkim', `S=inet:8891@localhost, F=T')dnl\n"
        "INPUT_MAIL_FILTER(`nosocket', `F=T')dnl\n"
    )
    result = import_mc(tmp_path, mc, capsys=capsys)
    assert result.status == 1
    mc_path = tmp_path / "mail" / "sendmail.mc"
    assert result.findings("refused") == [
        f"{mc_path}:2: INPUT_MAIL_FILTER without a filter name: not imported",
        f"{mc_path}:4: mail filter nosocket: S=: expected a non-empty string: not imported",
    ]
    assert [m.name for m in result.config.milter] == ["opendkim"]


def test_privacy_flags_mailgate_does_not_act_on_are_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mc = "FEATURE(no_default_msa)\ndefine(`confPRIVACY_FLAGS', `goaway,noetrn,bogus')dnl\n"
    result = import_mc(tmp_path, mc, capsys=capsys)
    assert result.config.smtp.privacy == ("goaway", "noetrn")
    assert [w.split(": ", 2)[2] for w in result.findings()] == [
        "goaway is kept but mailgate does not act on it: VRFY, EXPN and VERB are refused"
        " anyway; the other goaway flags are not acted on",
        "noetrn is kept but mailgate does not act on it: ETRN is still answered",
        "bogus is no privacy flag mailgate knows; left out",
    ]


# --- any mc: a config that loads, or m4's own error ---------------------------------------

_PIECES = [
    "FEATURE(", "define(", "DAEMON_OPTIONS(", "MAILER(", "INPUT_MAIL_FILTER(", "ifdef(",
    "undefine(", "changequote(", "LOCAL_CONFIG", "dnl", "divert(-1)", "`", "'", "(", ")",
    ",", "\n", " ", "#", "[", "]", "greet_pause", "relay_hosts_only", "promiscuous_relay",
    "access_db", "confPRIVACY_FLAGS", "confTO_COMMAND", "confMAX_MESSAGE_SIZE",
    "confDOMAIN_NAME", "confBAD_RCPT_THROTTLE", "Port=", "Addr=", "Family=inet6", "M=Ea",
    "smtp", "5000", "-1", "99999", "1h30m", "x", "S=unix:/s, F=T", "/etc/mail/",
]  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_PIECES), max_size=40).map("".join))
def test_any_mc_gives_a_config_that_loads_or_m4s_error(mc: str) -> None:
    """Never a TOML that mailgate refuses, whatever the mc: each value was checked by its
    setting's own converter, and what does not fit is a warning."""
    try:
        conv = convert(mc, "sendmail.mc", mail_dir=Path("/etc/mail"), tables=None)
    except McSyntaxError as exc:
        assert exc.line is not None
        return
    cfg = parse_config(render(conv), Path("/etc/mail/mailgate.toml"), Path("/etc/mail"))
    assert cfg.tables_dir == Path("/etc/mail")
    assert all(f.line is None or 1 <= f.line <= mc.count("\n") + 1 for f in conv.findings)


def test_a_mail_dir_that_does_not_exist_fails_the_import(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-dir"
    result = import_mc(
        tmp_path, "FEATURE(no_default_msa)\n", None, "--mail-dir", str(missing), capsys=capsys
    )
    assert result.status == 1
    assert result.findings("error") == [f"{missing}: no such directory: the tables are read there"]
