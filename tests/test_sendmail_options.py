"""sendmail's command line as Sendmail's getopt takes it (mailgate.sendmail.options), and the
settings it gives over the config file (config.set_command_line)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate import config
from mailgate.config import ConfigError, Override, load_config
from mailgate.sendmail.options import Invocation, UsageError, parse
from mailgate.sendmail.submit import split_addresses


@pytest.fixture(autouse=True)
def no_command_line() -> Iterator[None]:
    yield
    config.set_command_line([])


def test_crons_command_line() -> None:
    # cronie: /usr/sbin/sendmail -FCronDaemon -i -B8BITMIME -oem user
    inv = parse(["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "alice"])
    assert inv == Invocation(
        full_name="CronDaemon", ignore_dots=True, body="8BITMIME", recipients=["alice"]
    )


def test_flags_bundle_and_arguments_attach_or_follow() -> None:
    assert parse(["-ti", "-fbob@x.org", "-F", "Bob Smith"]) == Invocation(
        extract=True, ignore_dots=True, sender="bob@x.org", full_name="Bob Smith"
    )
    assert parse(["-tif", "bob@x.org"]) == Invocation(
        extract=True, ignore_dots=True, sender="bob@x.org"
    )
    assert parse(["-r", "bob@x.org"]).sender == "bob@x.org"  # -r: the old -f


def test_options_and_addresses_in_any_order_and_double_dash_ends_options() -> None:
    inv = parse(["a@x.org", "-i", "b@x.org", "--", "-c@x.org", "-t"])
    assert inv.recipients == ["a@x.org", "b@x.org", "-c@x.org", "-t"]
    assert inv.ignore_dots and not inv.extract


def test_flags_without_meaning_here_are_taken_and_ignored() -> None:
    argv = ["-odb", "-oem", "-oL9", "-Am", "-Ac", "-X", "/tmp/log", "-h", "17", "-L", "tag"]
    argv += ["-G", "-m", "-n", "-c", "-s", "-T", "-d0.1", "-D", "dbg", "-M", "Xvalue"]
    argv += ["-pESMTP:host", "-Q", "reason", "-e", "p", "-O", "DeliveryMode=b", "u@x.org"]
    assert parse(argv) == Invocation(recipients=["u@x.org"])


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["-Z"], "invalid option -- 'Z'"),
        (["-tZ"], "invalid option -- 'Z'"),
        (["-f"], "option requires an argument -- 'f'"),
        (["-fa@x", "-fb@x"], 'more than one "from" person'),
        (["-bs"], "-bs: mode not supported (use -bm, -bp, -bt, -bv, -bd, -bi)"),
        (
            ["-qfoo"],
            "-qfoo: only -q (run the queue once), -qRdomain, -qIqid and -q<interval> are supported",
        ),
        (
            ["-qSroot"],
            "-qS: only with -bp; a queue run takes only -q, -qRdomain, -qIqid and -q<interval>",
        ),
        (
            ["-qQ", "-v"],
            "-qQ: only with -bp; a queue run takes only -q, -qRdomain, -qIqid and -q<interval>",
        ),
        (
            ["-q!Rexample.com"],
            "-q!: only with -bp; a queue run takes only -q, -qRdomain, -qIqid and -q<interval>",
        ),
        (["-qlater"], '-qlater: bad duration \'later\': use e.g. "30m", "5s", "1h30m"'),
        (["-B9BIT"], "-B9BIT: illegal body type (7BIT or 8BITMIME)"),
        (["-Nsometimes"], "-Nsometimes: use never, or success, failure, delay"),
        (["-Rall"], "-Rall: use full or hdrs"),
        (["-OMaxMessageSize=ten"], "-OMaxMessageSize=ten: 'ten' is not a number"),
    ],
)
def test_what_sendmail_refuses_is_a_usage_error(argv: list[str], error: str) -> None:
    with pytest.raises(UsageError) as info:
        parse(argv)
    assert str(info.value) == error


def test_modes_and_the_queue() -> None:
    assert parse(["-bp"]).mode == "mailq"
    assert parse(["-bt"]).mode == "route"
    assert parse(["-bv", "a@x.org"]).mode == "verify"
    assert parse(["-bd"]).mode == "daemon"
    assert parse(["-bD"]).mode == "serve"
    assert parse(["-qR@example.com", "-qIkB21F600031166"]) == Invocation(
        run_queue=True,
        queue_domains=["example.com"],
        queue_recipients=["@example.com"],
        queue_ids=["kB21F600031166"],
    )
    # -bp's selections, before or after it: as written, "!" kept for the negated ones.
    assert parse(["-qSeve", "-q!Rexample.org", "-bp", "-qQ", "-qIAB", "-v"]) == Invocation(
        mode="mailq",
        run_queue=True,
        verbose=True,
        queue_senders=["eve"],
        queue_recipients=["!example.org"],
        queue_ids=["AB"],
        quarantined=True,
    )
    assert parse(["-bi"]).mode == "newaliases"
    assert parse(["-I"]).mode == "newaliases"
    # A bare -q runs the queue once: -q -v is two flags, not -q with "-v".
    assert parse(["-q", "-v"]) == Invocation(run_queue=True, verbose=True)
    assert parse(["-bd", "-q30m"]) == Invocation(mode="daemon", queue_interval="30m")


def test_dsn_flags_become_the_envelopes_parameters() -> None:
    inv = parse(["-N", "success,failure", "-R", "hdrs", "-V", "id 1+"])
    assert (inv.notify, inv.ret, inv.envid) == ("SUCCESS,FAILURE", "HDRS", "id+201+2B")


def test_long_and_short_options_map_to_settings() -> None:
    inv = parse(["-oi", "-O", "MaxMessageSize=1000", "-OTimeout.queuereturn=2d/4h"])
    inv2 = parse(["-oQ/var/spool/mg", "-O", "PrivacyOptions=authwarnings, novrfy"])
    assert inv.ignore_dots
    assert inv.overrides == [
        Override("smtp", "max_message_size", 1000, "-OMaxMessageSize=1000"),
        Override("queue", "max_age", "2d", "-OTimeout.queuereturn=2d/4h"),
    ]
    assert inv2.overrides == [
        Override("", "spool_dir", "/var/spool/mg", "-oQ/var/spool/mg"),
        Override(
            "smtp", "privacy", ["authwarnings", "novrfy"], "-OPrivacyOptions=authwarnings, novrfy"
        ),
    ]
    assert not parse(["-O", "IgnoreDots=false", "-oi", "-OIgnoreDots=no"]).ignore_dots


def test_command_line_settings_stand_over_the_files_in_every_read(tmp_path: Path) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text('spool_dir = "from-file"\n[smtp]\nmax_message_size = "50M"\n')
    config.set_command_line(
        [
            Override("smtp", "max_message_size", 1000, "-OMaxMessageSize=1000"),
            Override("", "spool_dir", "rel", "-oQrel"),
            Override("queue", "run_interval", "5m", "-q5m"),
        ]
    )
    for _ in range(2):  # the first read and a reload alike
        cfg = load_config(path)
        assert cfg.smtp.max_message_size == 1000
        assert cfg.spool_dir == Path.cwd() / "rel"  # relative to where the command runs
        assert cfg.queue.run_interval == 300


def test_a_bad_command_line_value_names_the_option(tmp_path: Path) -> None:
    config.set_command_line([Override("queue", "run_interval", "0s", "-q0s")])
    with pytest.raises(ConfigError) as info:
        load_config(None)
    assert str(info.value) == "-q0s: [queue] run_interval: must be more than 0 seconds"


def test_only_settings_that_exist_can_be_set() -> None:
    with pytest.raises(ValueError, match=r"-Ox: no setting \[smtp\] nothing"):
        config.set_command_line([Override("smtp", "nothing", 1, "-Ox")])


@pytest.mark.parametrize(
    ("text", "addresses"),
    [
        ("alice", ["alice"]),
        ('Bob <bob@x.org>, "Smith, Carol" <carol@x.org>', ["bob@x.org", "carol@x.org"]),
        ("dave@x.org (Dave, at work), eve@x.org", ["dave@x.org", "eve@x.org"]),
        ("team: a@x.org, b@x.org;, c@x.org", ["a@x.org", "b@x.org", "c@x.org"]),
        ("undisclosed-recipients:;", []),
        ('"john doe"@x.org', ['"john doe"@x.org']),
        ("@hub.x.org:u@x.org", ["@hub.x.org:u@x.org"]),
        # What is no address stays whole, for the check to refuse: nothing is repaired.
        ("a@b@c", ["a@b@c"]),
        ("bob@", ["bob@"]),
        ("a b c", ["a b c"]),
    ],
)
def test_recipient_lists_split_as_rfc_5322_writes_them(text: str, addresses: list[str]) -> None:
    assert split_addresses(text) == addresses
