"""Config: the bad-config matrix, the defaults, and README's configuration table.

The matrix is chasquid's ``test/t-20-bad_configs`` in mailgate's terms: each case is a
``mailgate.toml`` text (or a Sendmail table) and the exact ``file:line: message`` it must give,
as ``mailgate check`` prints it and a refused reload logs it. A bad *table* on HUP is
`tests/test_e2e.py::test_sighup_reloads_tables_and_keeps_old_on_error`; a bad *TOML file* on HUP
is `test_a_bad_config_on_hup_is_refused_and_the_running_one_stays` here.
"""

from __future__ import annotations

import pickle
import re
import signal
import smtplib
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest
import trustme

from mailgate.config import (
    AccessSettings,
    Config,
    ConfigError,
    DeliverySettings,
    DnsSettings,
    Key,
    ListenerSettings,
    LocalSettings,
    LogSettings,
    MetricsSettings,
    QueueSettings,
    SmtpSettings,
    TlsSettings,
    keys,
    load_config,
    parse_config,
    setting,
)
from mailgate.errors import SourceError
from mailgate.snapshot import load_snapshot
from mailgate.tables.maps import TableError
from tests.support.gateway import GatewayProcess, run_cli

README = Path(__file__).resolve().parent.parent / "README.md"
MIB = 1024 * 1024

DURATION = 'bad duration {!r}: use e.g. "30m", "5s", "1h30m"'
SIZE = 'bad size {!r}: use e.g. "50M", "100MiB" or a number of bytes'
LISTEN = 'bad listen address {!r}: use "ip:port" or "[ipv6]:port"'
PERCENT = 'expected a percentage such as "80%"'
PAIR = "is needed too: give both cert_file and key_file, or neither"

# (TOML text, line, message): the error is exactly f"{file}:{line}: {message}".
BAD_CONFIGS = [
    # The file's shape: syntax, unknown names, sections that are not tables.
    pytest.param(
        'hostname = "gw.example.com"\nworkers = 2 2\n',
        2,
        "TOML syntax: Expected newline or end of document after a statement (at line 2, column 13)",
        id="toml-syntax",
    ),
    pytest.param(
        'hostname = "gw.example.com"\nlisten = [\n',
        2,
        "TOML syntax: Invalid value (at end of document)",
        id="toml-unfinished",  # tomllib names no line: the last one is where it was left
    ),
    pytest.param('hostnam = "gw.example.com"\n', 1, "hostnam: unknown setting", id="unknown-key"),
    pytest.param(
        '[smtp]\ngreet_pause = "1s"\ngreet_paus = "5s"\n',
        3,
        "smtp.greet_paus: unknown setting",
        id="unknown-key-in-section",
    ),
    pytest.param(
        'workers = 1\n[smpt]\ngreet_pause = "1s"\n',
        2,
        "[smpt]: unknown section",
        id="unknown-section",
    ),
    pytest.param("[hostname]\n", 1, "[hostname]: unknown section", id="key-as-section"),
    pytest.param("smtp = 5\n", 1, "smtp: must be a table ([section])", id="section-not-table"),
    pytest.param(
        '[[queue]]\nfsync = "auto"\n',
        1,
        "queue: must be a table ([section])",
        id="section-array-of-tables",
    ),
    pytest.param(
        "[smtp]\n[smtp.limits]\nmax = 1\n",
        2,
        "smtp.limits: unknown setting",
        id="subtable-in-section",
    ),
    # Lines are found for every way TOML lets a key be written.
    pytest.param(
        '[ smtp ]  # spaced\n"greet_pause" = "soon"\n',
        2,
        "smtp.greet_pause: " + DURATION.format("soon"),
        id="quoted-key",
    ),
    pytest.param(
        'workers = 1\nsmtp.greet_pause = "soon"\n',
        2,
        "smtp.greet_pause: " + DURATION.format("soon"),
        id="dotted-key",
    ),
    pytest.param(
        'workers = 1\nsmtp = { greet_pause = "soon" }\n',
        2,
        "smtp.greet_pause: " + DURATION.format("soon"),
        id="inline-table",
    ),
    pytest.param(
        '# greet_pause = "soon"\n[local]\n[smtp]\n# greet_pause = 1\ngreet_pause = "soon"\n',
        5,
        "smtp.greet_pause: " + DURATION.format("soon"),
        id="commented-lines-skipped",
    ),
    pytest.param(
        'workers = 1  # U+2028 is no line end: \u2028\n[smtp]\ngreet_pause = "soon"\n',
        3,
        "smtp.greet_pause: " + DURATION.format("soon"),
        id="unicode-line-separator",
    ),
    # Each kind of converter, given the wrong type.
    pytest.param(
        'relay_hosts_only = "yes"\n',
        1,
        "relay_hosts_only: expected true or false",
        id="bool-string",
    ),
    pytest.param('workers = "2"\n', 1, "workers: expected a whole number", id="int-string"),
    pytest.param("workers = true\n", 1, "workers: expected a whole number", id="int-bool"),
    pytest.param("workers = 1.5\n", 1, "workers: expected a whole number", id="int-float"),
    pytest.param(
        "[smtp]\ngreet_pause = true\n",
        2,
        'smtp.greet_pause: expected a duration such as "30m" or "5s"',
        id="duration-bool",
    ),
    pytest.param(
        '[smtp]\ngreet_pause = ""\n',
        2,
        'smtp.greet_pause: expected a duration such as "30m" or "5s"',
        id="duration-empty",
    ),
    pytest.param(
        "[smtp]\nmax_message_size = true\n",
        2,
        'smtp.max_message_size: expected a size such as "50M"',
        id="size-bool",
    ),
    pytest.param(
        "[smtp]\nmax_message_size = 1.5\n",
        2,
        "smtp.max_message_size: " + SIZE.format(1.5),
        id="size-float",
    ),
    pytest.param(
        "[smtp]\nstress_threshold = 0.8\n",
        2,
        "smtp.stress_threshold: " + PERCENT,
        id="percentage-fraction",
    ),
    pytest.param(
        "[smtp]\nstress_threshold = true\n",
        2,
        "smtp.stress_threshold: " + PERCENT,
        id="percentage-bool",
    ),
    pytest.param(
        "[delivery]\nbind_address = 5\n",
        2,
        "delivery.bind_address: expected a non-empty string",
        id="string-int",
    ),
    pytest.param(
        '[log]\nlevel = ""\n', 2, "log.level: expected a non-empty string", id="string-empty"
    ),
    pytest.param("hostname = 5\n", 1, "hostname: expected a non-empty string", id="hostname-int"),
    pytest.param("spool_dir = 5\n", 1, "spool_dir: expected a non-empty string", id="path-int"),
    pytest.param('spool_dir = ""\n', 1, "spool_dir: expected a non-empty string", id="path-empty"),
    pytest.param(
        "pid_file = false\n", 1, "pid_file: expected a non-empty string", id="optional-path-bool"
    ),
    pytest.param(
        'listen = "127.0.0.1:25"\n', 1, 'listen: expected a list, e.g. ["a", "b"]', id="list-string"
    ),
    pytest.param(
        '[smtp]\nprivacy = "novrfy"\n',
        2,
        'smtp.privacy: expected a list, e.g. ["a", "b"]',
        id="list-of-flags-string",
    ),
    pytest.param(
        '[dns]\nnameservers = "127.0.0.1"\n',
        2,
        'dns.nameservers: expected a list, e.g. ["a", "b"]',
        id="nameservers-string",
    ),
    pytest.param(
        "[queue]\nfsync = 1\n", 2, "queue.fsync: expected a non-empty string", id="choice-int"
    ),
    # Values of the right type outside what the setting allows.
    pytest.param("workers = -1\n", 1, "workers: must be at least 0", id="int-negative"),
    pytest.param(
        "[smtp]\nmax_recipients = 0\n",
        2,
        "smtp.max_recipients: must be at least 1",
        id="int-below-minimum",
    ),
    pytest.param(
        "[smtp]\nmax_command_line = 100\n",
        2,
        "smtp.max_command_line: must be at least 512",
        id="command-line-below-rfc",
    ),
    pytest.param("[delivery]\nport = 0\n", 2, "delivery.port: must be at least 1", id="port-0"),
    pytest.param(
        '[log]\nsyslog_name = "sm mta"\n',
        2,
        "log.syslog_name: 'sm mta' is not a program name (letters, digits, . _ / -; 32 at most)",
        id="syslog-name-with-a-space",
    ),
    pytest.param(
        "[smtp]\nmax_text_line = 999\n",
        2,
        "smtp.max_text_line: must be 0 (no limit) or 1000 or more",
        id="text-line-below-rfc",
    ),
    pytest.param(
        "[delivery]\nline_length_limit = 77\n",
        2,
        "delivery.line_length_limit: must be 0 (lines are never broken) or between 78 and 998",
        id="line-length-below-78",
    ),
    pytest.param(
        "[delivery]\nline_length_limit = 999\n",
        2,
        "delivery.line_length_limit: must be 0 (lines are never broken) or between 78 and 998",
        id="line-length-above-998",
    ),
    pytest.param(
        "[delivery]\nline_length_limit = -1\n",
        2,
        "delivery.line_length_limit: must be at least 0",
        id="line-length-negative",
    ),
    pytest.param(
        "[queue]\nmin_free = -1\n",
        2,
        "queue.min_free: a size cannot be negative",
        id="size-negative",
    ),
    pytest.param(
        '[queue]\nmin_free = "1.5G"\n',
        2,
        "queue.min_free: " + SIZE.format("1.5G"),
        id="size-fraction",
    ),
    pytest.param(
        '[queue]\nmin_free = "lots"\n', 2, "queue.min_free: " + SIZE.format("lots"), id="size-words"
    ),
    pytest.param(
        '[smtp]\nmax_message_size = "50 MX"\n',
        2,
        "smtp.max_message_size: " + SIZE.format("50 MX"),
        id="size-bad-unit",
    ),
    pytest.param(
        '[queue]\nmax_age = "5 days"\n',
        2,
        "queue.max_age: " + DURATION.format("5 days"),
        id="duration-bad-unit",
    ),
    pytest.param(
        '[queue]\nwarn_after = "1h-30m"\n',
        2,
        "queue.warn_after: " + DURATION.format("1h-30m"),
        id="duration-garbage",
    ),
    pytest.param(
        "[queue]\nretry_min = -5\n",
        2,
        "queue.retry_min: a duration cannot be negative",
        id="duration-negative",
    ),
    pytest.param(
        '[queue]\nrun_interval = "0s"\n',
        2,
        "queue.run_interval: must be more than 0 seconds",
        id="run-interval-zero",
    ),
    pytest.param(
        "[smtp]\nstress_timeout = 0\n",
        2,
        "smtp.stress_timeout: must be more than 0 seconds",
        id="stress-timeout-zero",
    ),
    pytest.param(
        '[smtp]\nstress_threshold = "0%"\n',
        2,
        "smtp.stress_threshold: " + PERCENT,
        id="percentage-zero",
    ),
    pytest.param(
        '[smtp]\nstress_threshold = "101%"\n',
        2,
        "smtp.stress_threshold: " + PERCENT,
        id="percentage-over-100",
    ),
    pytest.param(
        '[smtp]\nstress_threshold = "most%"\n',
        2,
        "smtp.stress_threshold: " + PERCENT,
        id="percentage-words",
    ),
    pytest.param(
        "[smtp]\nstress_threshold = 120\n",
        2,
        "smtp.stress_threshold: " + PERCENT,
        id="percentage-number-over-100",
    ),
    pytest.param(
        '[queue]\nfsync = "sometimes"\n',
        2,
        """queue.fsync: must be "auto" or "threads", not 'sometimes'""",
        id="choice-fsync",
    ),
    pytest.param(
        '[tls]\ndelivery = "always"\n',
        2,
        """tls.delivery: must be "may" or "none", not 'always'""",
        id="choice-tls",
    ),
    pytest.param(
        '[log]\nlevel = "loud"\n',
        2,
        """log.level: must be "debug" or "info" or "notice" or "warning" or "error", """
        """not 'loud'""",
        id="choice-log-level",
    ),
    pytest.param(
        '[log]\ntarget = "journal"\n',
        2,
        """log.target: must be "stderr" or "file" or "syslog", not 'journal'""",
        id="choice-log-target",
    ),
    pytest.param(
        '[log]\ntarget = "syslog"\nfacility = "kern"\n',
        3,
        'log.facility: must be "mail" or "daemon" or "user" or "local0" or "local1" or '
        '"local2" or "local3" or "local4" or "local5" or "local6" or "local7", not \'kern\'',
        id="choice-log-facility",
    ),
    # [log] settings that only make sense together.
    pytest.param(
        '[log]\nlevel = "info"\ntarget = "file"\n',
        3,
        'log.target: is "file": give the file too (file = "/path/maillog")',
        id="log-file-target-without-file",
    ),
    pytest.param(
        '[log]\ntarget = "syslog"\nfile = "maillog"\n',
        3,
        'log.file: is for target = "file", but target is "syslog"',
        id="log-file-with-syslog-target",
    ),
    pytest.param(
        '[log]\njson_file = "maillog.json"\n',
        2,
        "log.json_file: is set, but json is not true",
        id="log-json-file-without-json",
    ),
    pytest.param(
        '[smtp]\nprivacy = ["novrfy", "nosuch"]\n',
        2,
        "smtp.privacy: unknown privacy flag 'nosuch'",
        id="privacy-flag",
    ),
    pytest.param(
        'hostname = "bad_host.example"\n',
        1,
        "hostname: 'bad_host.example' is not a valid host name",
        id="hostname",
    ),
    pytest.param(
        '[delivery]\nhelo_name = "-gw.example"\n',
        2,
        "delivery.helo_name: '-gw.example' is not a valid host name",
        id="helo-name",
    ),
    pytest.param(
        '[queue]\ndouble_bounce_address = "<postmaster@gw.example>"\n',
        2,
        "queue.double_bounce_address: '<postmaster@gw.example>' is not an address"
        " (write user or user@domain, no <>)",
        id="double-bounce-address",
    ),
    # Listen addresses and name servers.
    pytest.param(
        "listen = []\n",
        1,
        "listen: needs at least one address (or a [[listener]] table)",
        id="listen-empty",
    ),
    pytest.param(
        'listen = ["127.0.0.1"]\n', 1, "listen: " + LISTEN.format("127.0.0.1"), id="listen-no-port"
    ),
    pytest.param(
        'listen = ["127.0.0.1:0"]\n',
        1,
        "listen: " + LISTEN.format("127.0.0.1:0"),
        id="listen-port-0",
    ),
    pytest.param(
        'listen = ["127.0.0.1:65536"]\n',
        1,
        "listen: " + LISTEN.format("127.0.0.1:65536"),
        id="listen-port-too-big",
    ),
    pytest.param(
        'listen = ["[::1]"]\n', 1, "listen: " + LISTEN.format("[::1]"), id="listen-v6-no-port"
    ),
    pytest.param(
        'listen = ["127.0.0.1:25", "mail.example.com:25"]\n',
        1,
        "listen: bad listen address 'mail.example.com:25': 'mail.example.com' is not an IP address",
        id="listen-name",
    ),
    pytest.param(
        "listen = [25]\n",
        1,
        'listen: listen entries are strings like "127.0.0.1:2525"',
        id="listen-int",
    ),
    pytest.param(
        '[dns]\nnameservers = ["ns.example.com"]\n',
        2,
        "dns.nameservers: nameserver 'ns.example.com' is not an IP address",
        id="nameserver-name",
    ),
    pytest.param(
        '[dns]\nnameservers = ["127.0.0.1:0"]\n',
        2,
        "dns.nameservers: nameserver '127.0.0.1:0' has a bad port",
        id="nameserver-port-0",
    ),
    pytest.param(
        '[dns]\nnameservers = ["[::1]:dns"]\n',
        2,
        "dns.nameservers: nameserver '[::1]:dns' has a bad port",
        id="nameserver-v6-port",
    ),
    pytest.param(
        "[dns]\nnameservers = [53]\n",
        2,
        'dns.nameservers: nameservers are strings like "127.0.0.1" or "127.0.0.1:5353"',
        id="nameserver-int",
    ),
    # The TLS pair: one half alone (the line is the section's, the missing key has none).
    pytest.param(
        'workers = 1\n[tls]\ncert_file = "cert.pem"\n',
        2,
        "tls.key_file: " + PAIR,
        id="tls-cert-without-key",
    ),
    pytest.param(
        '[tls]\nkey_file = "key.pem"\n', 1, "tls.cert_file: " + PAIR, id="tls-key-without-cert"
    ),
    pytest.param(
        '[tls]\ncert_file = ""\nkey_file = "key.pem"\n',
        2,
        "tls.cert_file: " + PAIR,
        id="tls-cert-empty",
    ),
]


PLAIN = '[[listener]]\naddress = "127.0.0.1:2526"\n'
PROXY_NEEDS_TRUST = (
    "a PROXY listener needs proxy_trusted, the addresses of the proxies allowed to connect "
    '(e.g. ["10.0.0.0/24"]); anyone else is closed before the banner'
)

# The [[listener]] tables: each error names the table (listener[n]) and the line in it.
BAD_LISTENERS = [
    pytest.param(
        PLAIN + '[[listener]]\naddress = "127.0.0.1:2527"\nproxy_protocol = "v2"\n',
        5,
        "listener[2].proxy_protocol: " + PROXY_NEEDS_TRUST,
        id="proxy-without-trusted",
    ),
    pytest.param(
        '[[listener]]\naddress = "127.0.0.1:2527"\nproxy_protocol = "v1"\nproxy_trusted = []\n',
        4,
        "listener[1].proxy_trusted: " + PROXY_NEEDS_TRUST,
        id="proxy-trusted-empty",
    ),
    pytest.param(
        '[[listener]]\naddress = "127.0.0.1:2527"\nproxy_trusted = ["10.0.0.1"]\n',
        3,
        "listener[1].proxy_trusted: is for a PROXY listener: set proxy_protocol too",
        id="trusted-without-proxy",
    ),
    pytest.param(
        '[[listener]]\naddress = "127.0.0.1:2527"\nproxy_protocol = "v3"\n',
        3,
        'listener[1].proxy_protocol: must be "v1" or "v2" or "any", not \'v3\'',
        id="proxy-version",
    ),
    pytest.param(
        '[[listener]]\naddress = "127.0.0.1:2527"\nproxy_protocol = "v2"\n'
        'proxy_trusted = ["0.0.0.0/0"]\n',
        4,
        "listener[1].proxy_trusted: '0.0.0.0/0' trusts every address: anyone could claim to be "
        "any client; list the load balancers' addresses",
        id="trusted-everyone",
    ),
    pytest.param(
        '[[listener]]\naddress = "127.0.0.1:2527"\nproxy_protocol = "v2"\n'
        'proxy_trusted = ["10.0.0.2", "0.0.0.0/1", "128.0.0.0/1"]\n',
        4,
        "listener[1].proxy_trusted: '10.0.0.2/32', '0.0.0.0/1', '128.0.0.0/1' together trust "
        "every address (0.0.0.0/0): anyone could claim to be any client; list the load "
        "balancers' addresses",
        id="trusted-everyone-in-halves",
    ),
    pytest.param(
        '[[listener]]\naddress = "127.0.0.1:2527"\nproxy_protocol = "v2"\n'
        'proxy_trusted = ["10.0.0.1/24"]\n',
        4,
        "listener[1].proxy_trusted: '10.0.0.1/24' has host bits set: did you mean 10.0.0.0/24?",
        id="trusted-host-bits",
    ),
    pytest.param(
        '[[listener]]\naddress = "127.0.0.1:2527"\nproxy_protocol = "v2"\n'
        'proxy_trusted = ["lb.example.com"]\n',
        4,
        "listener[1].proxy_trusted: 'lb.example.com' is not an address or network (CIDR)",
        id="trusted-name",
    ),
    pytest.param(
        '[[listener]]\naddress = "127.0.0.1:2527"\nproxy_protocol = "any"\n'
        'proxy_trusted = ["::1"]\nproxy_timeout = "1s"\n',
        5,
        "listener[1].proxy_timeout: must be at least 3 seconds",
        id="proxy-timeout-short",
    ),
    pytest.param(
        '[[listener]]\nproxy_protocol = "v1"\nproxy_trusted = ["::1"]\n',
        1,
        'listener[1]: needs an address ("ip:port")',
        id="listener-no-address",
    ),
    pytest.param(
        PLAIN + '[smtp]\ngreet_pause = 0\n[[listener]]\naddress = "127.0.0.1:2527"\nmilter = 1\n',
        7,
        "listener[2].milter: unknown setting",
        id="listener-unknown-key",
    ),
    pytest.param(
        'listen = ["127.0.0.1:2526"]\n' + PLAIN,
        3,
        "listener[1].address: 127.0.0.1:2526 is given twice (listen, [[listener]])",
        id="listener-twice",
    ),
    pytest.param(
        '[listener]\naddress = "127.0.0.1:2526"\n',
        1,
        "listener: must be tables, each under its own [[listener]] line",
        id="listener-single-table",
    ),
]


@pytest.mark.parametrize(("text", "line", "message"), BAD_LISTENERS)
def test_bad_listener(tmp_path: Path, text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    assert (err.value.line, err.value.message) == (line, message)


def test_listeners_plain_and_proxied(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        'listen = ["0.0.0.0:25"]\n[[listener]]\naddress = "[::1]:2525"\n'
        '[[listener]]\naddress = "10.0.0.5:2525"\nproxy_protocol = "v2"\n'
        'proxy_trusted = ["10.0.0.0/24", "2001:db8::7"]\n',
    )
    plain, six, proxied = cfg.listeners
    assert (plain.address, plain.proxy_protocol, plain.proxy_trusted) == (("0.0.0.0", 25), None, ())
    assert (six.label, six.proxy_protocol) == ("[::1]:2525", None)
    assert proxied.proxy_protocol == "v2" and proxied.proxy_timeout == 5.0
    assert [str(n) for n in proxied.proxy_trusted] == ["10.0.0.0/24", "2001:db8::7/128"]
    # [[listener]] tables alone replace the default address.
    only = load(tmp_path, PLAIN)
    assert only.listen == () and [ls.label for ls in only.listeners] == ["127.0.0.1:2526"]


def load(tmp_path: Path, text: str) -> Config:
    conf = tmp_path / "mailgate.toml"
    conf.write_text(text)
    return load_config(conf)


@pytest.mark.parametrize(("text", "line", "message"), BAD_CONFIGS)
def test_bad_config(tmp_path: Path, text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    assert str(err.value) == f"{tmp_path / 'mailgate.toml'}:{line}: {message}"
    assert (err.value.line, err.value.message) == (line, message)


def test_the_embedded_config_is_named_in_errors() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config('[smtp]\ngreet_pause = "soon"\n', None, Path("/"))
    assert str(err.value) == (
        "<embedded default config>:2: smtp.greet_pause: " + DURATION.format("soon")
    )


def test_files_that_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "none.toml")
    assert str(err.value) == f"{tmp_path / 'none.toml'}: no such file"
    (tmp_path / "latin1.toml").write_bytes(b'hostname = "caf\xe9.example"\n')
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "latin1.toml")
    assert str(err.value) == (
        f"{tmp_path / 'latin1.toml'}: cannot read: 'utf-8' codec can't "
        "decode byte 0xe9 in position 15: invalid continuation byte"
    )
    assert err.value.line is None
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert str(err.value).startswith(f"{tmp_path}: cannot read: ")


# --- TLS: the pair is loaded when the config is read ----------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_pair(ca: trustme.CA, directory: Path) -> None:
    cert = ca.issue_cert("gateway.example.com")
    (directory / "cert.pem").write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(directory / "key.pem")


def test_tls_pair_relative_to_the_config_file(tmp_path: Path, ca: trustme.CA) -> None:
    write_pair(ca, tmp_path)
    cfg = load(tmp_path, '[tls]\ncert_file = "cert.pem"\nkey_file = "key.pem"\n')
    assert (cfg.tls.cert_file, cfg.tls.key_file) == (tmp_path / "cert.pem", tmp_path / "key.pem")
    assert cfg.tls.server_context is not None


NOT_A_PAIR = "{dir}/{cert} and {dir}/{key} are not a PEM certificate and its key: "


@pytest.mark.parametrize(
    ("cert", "key", "where", "message"),
    [
        pytest.param(
            "none.pem",
            "key.pem",
            "3: tls.cert_file",
            "cannot read {dir}/none.pem: No such file or directory",
            id="missing-cert",
        ),
        pytest.param(
            "cert.pem",
            "none.pem",
            "4: tls.key_file",
            "cannot read {dir}/none.pem: No such file or directory",
            id="missing-key",
        ),
        pytest.param(
            ".",
            "key.pem",
            "3: tls.cert_file",
            "cannot read {dir}: Is a directory",
            id="cert-is-a-directory",
        ),
        pytest.param(
            "cert.pem", "other.pem", "3: tls.cert_file", NOT_A_PAIR, id="key-of-another-cert"
        ),
        pytest.param("junk.pem", "key.pem", "3: tls.cert_file", NOT_A_PAIR, id="not-pem"),
        pytest.param("key.pem", "cert.pem", "3: tls.cert_file", NOT_A_PAIR, id="swapped"),
    ],
)
def test_bad_tls_pair(
    tmp_path: Path, ca: trustme.CA, cert: str, key: str, where: str, message: str
) -> None:
    write_pair(ca, tmp_path)
    trustme.CA().issue_cert("x.example").private_key_pem.write_to_path(tmp_path / "other.pem")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError) as err:
        load(tmp_path, f'[tls]\ndelivery = "may"\ncert_file = "{cert}"\nkey_file = "{key}"\n')
    expected = f"{tmp_path / 'mailgate.toml'}:{where}: " + message.format(
        dir=tmp_path, cert=cert, key=key
    )
    # After "its key: " comes OpenSSL's reason, whose words change between OpenSSL versions.
    if message == NOT_A_PAIR:
        assert str(err.value).startswith(expected) and str(err.value) != expected
    else:
        assert str(err.value) == expected


# --- tables: the same error shape --------------------------------------------------------------

BAD_TABLES = [
    pytest.param(
        "mailertable",
        "ok.example  smtp:[192.0.2.1]\nbad.example  smtp:\n",
        2,
        "bad.example: smtp: needs a host",
        id="mailertable-no-host",
    ),
    pytest.param(
        "mailertable",
        "# routes\nbad_domain!  smtp:[192.0.2.1]\n",
        2,
        "'bad_domain!' is not a domain, .domain or '.'",
        id="mailertable-key",
    ),
    pytest.param(
        "mailertable",
        "lonely.example\n",
        1,
        "key 'lonely.example' has no value",
        id="mailertable-no-value",
    ),
    pytest.param(
        "access",
        "To:example.com RELAY\n127.0.0.8 MAYBE\n",
        2,
        "127.0.0.8: unknown value 'MAYBE' (expected OK, RELAY, REJECT, DISCARD, SKIP or "
        "ERROR:D.S.N:NNN text)",
        id="access-action",
    ),
    pytest.param(
        "access", "Connect: REJECT\n", 1, "Connect:: empty key after the tag", id="access-empty-key"
    ),
    pytest.param(
        "access",
        "GreetPause:10.0.0.1 5s\n",
        1,
        "GreetPause:10.0.0.1: GreetPause value must be milliseconds",
        id="access-greetpause",
    ),
    pytest.param(
        "aliases",
        "postmaster: root\nnocolon root\n",
        2,
        "'nocolon root': missing ':' after the alias name",
        id="aliases-colon",
    ),
    pytest.param(
        "aliases",
        "  root\n",
        1,
        "continuation line without an alias before it",
        id="aliases-continuation",
    ),
    pytest.param(
        "virtusertable",
        "bad-key alice\n",
        1,
        "'bad-key': key must be user@domain or @domain",
        id="virtusertable-key",
    ),
    pytest.param(
        "domaintable",
        "old.example bad_domain!\n",
        1,
        "value 'bad_domain!' is not a domain name",
        id="domaintable-value",
    ),
    pytest.param(
        "local-host-names",
        "good.example\nbad_host!\n",
        2,
        "'bad_host!' is not a valid host name",
        id="local-host-names",
    ),
    pytest.param(
        "relay-domains", "x..y\n", 1, "'x..y' is not a valid host name", id="relay-domains"
    ),
]


@pytest.mark.parametrize(("table", "text", "line", "message"), BAD_TABLES)
def test_bad_table(tmp_path: Path, table: str, text: str, line: int, message: str) -> None:
    (tmp_path / "mailgate.toml").write_text('hostname = "gw.example.com"\n')
    (tmp_path / table).write_text(text)
    with pytest.raises(TableError) as err:
        load_snapshot(tmp_path / "mailgate.toml")
    assert str(err.value) == f"{tmp_path / table}:{line}: {message}"


def test_unreadable_tables(tmp_path: Path) -> None:
    (tmp_path / "mailgate.toml").write_text('hostname = "gw.example.com"\n')
    (tmp_path / "access").write_bytes(b"To:example.com RELAY\n\xff RELAY\n")
    with pytest.raises(TableError) as err:
        load_snapshot(tmp_path / "mailgate.toml")
    assert str(err.value) == f"{tmp_path / 'access'}:2: not valid UTF-8 (byte 21)"
    (tmp_path / "access").unlink()
    (tmp_path / "mailertable").mkdir()
    with pytest.raises(TableError) as err:
        load_snapshot(tmp_path / "mailgate.toml")
    assert str(err.value) == f"{tmp_path / 'mailertable'}: is a directory, not a table file"


def test_one_error_base() -> None:
    for cls in (ConfigError, TableError):
        exc = cls("/etc/mail/x", 7, "bad")
        assert isinstance(exc, SourceError)
        assert str(exc) == "/etc/mail/x:7: bad"
        again = pickle.loads(pickle.dumps(exc))
        assert (type(again), str(again), again.line) == (cls, "/etc/mail/x:7: bad", 7)
        assert str(cls(Path("/etc/mail/x"), None, "no such file")) == "/etc/mail/x: no such file"


# --- mailgate check and a running daemon ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        pytest.param(
            "mailgate.toml",
            'hostname = "gw.example.com"\n[queue]\nmin_free = "lots"\n',
            ":3: queue.min_free: " + SIZE.format("lots"),
            id="config",
        ),
        pytest.param(
            "aliases",
            "postmaster: root\nnocolon root\n",
            ":2: 'nocolon root': missing ':' after the alias name",
            id="table",
        ),
    ],
)
def test_check_prints_the_error_and_fails(
    tmp_path: Path, name: str, text: str, expected: str
) -> None:
    (tmp_path / "mailgate.toml").write_text('hostname = "gw.example.com"\n')
    (tmp_path / name).write_text(text)
    out = run_cli("check", "-c", str(tmp_path / "mailgate.toml"))
    assert out.returncode == 1
    assert out.stderr == f"error: {tmp_path / name}{expected}\n"
    assert out.stdout == ""


def test_check_names_every_broken_table_in_one_run(tmp_path: Path) -> None:
    """Each table's first error, in the order they are loaded, and the good ones not named:
    an admin moving a Sendmail setup fixes them all after one run."""
    (tmp_path / "mailgate.toml").write_text('hostname = "gw.example.com"\n')
    (tmp_path / "access").write_text("To:example.com RELAY\n192.168.1 RELAYX\nbad REJECTX\n")
    (tmp_path / "mailertable").write_text("example.com smtp:[192.0.2.1]\n")
    (tmp_path / "virtusertable").write_text("nokey\n")
    (tmp_path / "aliases").write_text("postmaster: root\nstaff alice\n")
    out = run_cli("check", "-c", str(tmp_path / "mailgate.toml"))
    assert out.returncode == 1
    errors = out.stderr.splitlines()
    assert [e.split(": ")[1] for e in errors] == [
        f"{tmp_path / 'access'}:2",
        f"{tmp_path / 'virtusertable'}:1",
        f"{tmp_path / 'aliases'}:2",
    ]
    assert all(e.startswith("error: ") for e in errors)


def greeting(gw: GatewayProcess) -> str:
    with smtplib.SMTP(timeout=10) as s:
        code, text = s.connect(gw.host, gw.port)
        assert code == 220
        return text.decode().split()[0]


def test_a_bad_config_on_hup_is_refused_and_the_running_one_stays(tmp_path: Path) -> None:
    with GatewayProcess(tmp_path, dns=None, settings='[smtp]\ngreet_pause = "0s"\n') as gw:
        assert greeting(gw) == "gateway.example.com"
        good = gw.config.read_text().replace("gateway.example.com", "renamed.example.com")
        bad = good + '[queue]\nmin_free = "lots"\n'
        gw.config.write_text(bad)
        gw.signal(signal.SIGHUP)
        log = gw.wait_log("reload refused")
        line = bad.count("\n")
        assert (
            f"reload refused, keeping the running configuration: {gw.config}:{line}: "
            f"queue.min_free: {SIZE.format('lots')}"
        ) in log
        assert "configuration reloaded" not in log
        assert greeting(gw) == "gateway.example.com"
        gw.config.write_text(good)  # mended: the next HUP takes it
        gw.signal(signal.SIGHUP)
        gw.wait_log("configuration reloaded")
        assert greeting(gw) == "renamed.example.com"


# --- what a config without the key gives -----------------------------------------------------


def test_defaults_are_the_documented_values(tmp_path: Path) -> None:
    """The values every setting had before it was written once: a guard on the definition."""
    cfg = load(tmp_path, "")
    assert cfg.listen == (("127.0.0.1", 2525),)
    assert (cfg.spool_dir, cfg.tables_dir) == (tmp_path / "spool", tmp_path)
    assert cfg.pid_file == tmp_path / "spool" / "mailgate.pid"
    assert (cfg.relay_hosts_only, cfg.workers, cfg.stop_grace) == (True, 0, 10.0)
    assert cfg.smtp == SmtpSettings(
        greet_pause=5.0,
        max_message_size=50 * MIB,
        max_recipients=100,
        max_command_line=2048,
        max_text_line=0,
        command_timeout=300.0,
        data_timeout=180.0,
        max_bad_commands=25,
        privacy=("authwarnings", "novrfy", "noexpn", "noverb"),
        bad_rcpt_throttle=1,
        bad_rcpt_throttle_delay=1.0,
        max_bad_rcpts=20,
        connection_rate_throttle=100,
        max_connections_per_ip=20,
        max_connections=20000,
        stress_threshold=0.8,
        stress_timeout=10.0,
        forbid_unauth_pipelining=True,
        allow_bogus_helo=False,
        check_sender_domain=True,
        require_qualified_sender=True,
    )
    assert cfg.queue == QueueSettings(
        run_interval=1800.0,
        retry_min=240.0,
        max_age=5 * 86400.0,
        warn_after=4 * 3600.0,
        max_deliveries=200,
        max_per_destination=20,
        fsync="auto",
        min_free=100 * MIB,
    )
    assert cfg.delivery == DeliverySettings(
        connect_timeout=30.0,
        command_timeout=300.0,
        helo_name=None,
        bind_address=None,
        port=25,
        line_length_limit=998,
    )
    assert cfg.dns == DnsSettings(nameservers=None, timeout=5.0)
    assert cfg.local == LocalSettings(maildir_root=tmp_path / "maildir")
    assert cfg.access == AccessSettings(blocklist_recipients=False)
    assert cfg.tls == TlsSettings(cert_file=None, key_file=None, delivery="may")
    assert cfg.tls.server_context is None
    assert cfg.log == LogSettings(file=None, level="info")
    assert cfg.helo_name == cfg.hostname
    # The dataclasses alone give the same (paths not yet resolved against a folder).
    assert SmtpSettings() == cfg.smtp and QueueSettings() == cfg.queue
    assert LocalSettings().maildir_root == Path("maildir")


def test_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        'spool_dir = "q"\ntables_dir = "/etc/mail"\npid_file = "run/gw.pid"\n'
        '[local]\nmaildir_root = "~/mail"\n[log]\nfile = ""\n',
    )
    assert cfg.spool_dir == tmp_path / "q"
    assert cfg.tables_dir == Path("/etc/mail")
    assert cfg.pid_file == tmp_path / "run" / "gw.pid"
    assert cfg.local.maildir_root == Path("~/mail").expanduser()
    assert cfg.log.file is None  # "" = none
    assert load(tmp_path, 'tables_dir = ""\n').tables_dir is None
    embedded = parse_config("", None, tmp_path)
    assert (embedded.tables_dir, embedded.spool_dir) == (None, tmp_path / "spool")


def test_a_path_out_of_the_config_folder_is_shown_without_dots(tmp_path: Path) -> None:
    """``../spool`` from /etc/mail is /etc/spool in every line that names it, resolved as
    the kernel does: through a symbolic link, not by dropping the name before the dots."""
    (tmp_path / "real" / "etc").mkdir(parents=True)
    (tmp_path / "etc").symlink_to(tmp_path / "real" / "etc")
    cfg = load(tmp_path / "etc", 'spool_dir = "../spool"\npid_file = "run/../gw.pid"\n')
    assert cfg.spool_dir == (tmp_path / "real" / "spool").resolve()
    assert cfg.pid_file == (tmp_path / "real" / "etc" / "gw.pid").resolve()


def test_values_are_converted(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        'hostname = "GW.Example.COM."\nlisten = [":25", "[::1]:2525"]\n'
        '[smtp]\ngreet_pause = "1h30m"\nmax_message_size = "10MB"\n'
        'stress_threshold = 50\nprivacy = ["NoVrfy"]\n'
        '[queue]\nfsync = "Threads"\nmin_free = 0\n'
        "[dns]\nnameservers = []\n",
    )
    assert cfg.hostname == "gw.example.com"
    assert cfg.listen == (("0.0.0.0", 25), ("::1", 2525))
    assert (cfg.smtp.greet_pause, cfg.smtp.max_message_size) == (5400.0, 10_000_000)
    assert (cfg.smtp.stress_threshold, cfg.smtp.privacy) == (0.5, ("novrfy",))
    assert (cfg.queue.fsync, cfg.queue.min_free) == ("threads", 0)
    assert cfg.dns.nameservers is None  # an empty list is the system resolver too


# --- the definition and README's table ----------------------------------------------------------


def test_every_field_is_a_setting_or_a_section() -> None:
    plain = {
        cls.__name__: [f.name for f in fields(cls) if not f.metadata]
        for cls in (
            Config,
            SmtpSettings,
            QueueSettings,
            DeliverySettings,
            DnsSettings,
            LocalSettings,
            AccessSettings,
            TlsSettings,
            LogSettings,
            ListenerSettings,
            MetricsSettings,
        )
    }
    assert {k: v for k, v in plain.items() if v} == {
        "Config": ["path", "origins", "digest"],  # what was read, not what to set
        "TlsSettings": ["server_context"],
        "MetricsSettings": ["token"],  # token_file's content
    }
    for key in keys():
        assert key.setting.doc and "\n" not in key.setting.doc, key.label


def test_a_setting_names_its_default() -> None:
    with pytest.raises(TypeError):
        setting(int, None, "no default, no words")


def readme_table(text: str) -> list[tuple[int, list[str], list[str]]]:
    """(line, labels, defaults) of each row of README's configuration table: a row may give
    several keys of one section (`` `[smtp] a` / `b` ``) and as many defaults."""
    rows = []
    lines = text.split("\n")
    start = lines.index("## Configuration reference")
    for no, line in enumerate(lines[start + 1 :], start + 2):
        if line.startswith("## "):
            break
        if not line.startswith("| `"):
            continue
        key_cell, default_cell, _meaning = line[2:].split(" | ", 2)
        names = re.findall(r"`([^`]+)`", key_cell)
        section = re.match(r"\[\[?\w+\]\]? ", names[0])
        labels = [names[0]] + [f"{section.group(0) if section else ''}{n}" for n in names[1:]]
        rows.append((no, labels, default_cell.split(" / ")))
    return rows


def readme_problems(text: str) -> list[str]:
    """What README's table gets wrong about the definition, one line per key."""
    defined = {k.label: k for k in keys()}
    problems, seen = [], set()
    for no, labels, defaults in readme_table(text):
        if len(defaults) == 1:  # `[tls] cert_file` / `key_file` | none: each
            defaults = defaults * len(labels)
        if len(labels) != len(defaults):
            problems.append(f"README.md:{no}: {len(labels)} keys but {len(defaults)} defaults")
            continue
        for label, shown in zip(labels, defaults, strict=True):
            seen.add(label)
            key = defined.get(label)
            if key is None:
                problems.append(f"README.md:{no}: {label}: documented, but no such setting")
            elif not same_default(key, shown):
                problems.append(
                    f"README.md:{no}: {label}: README's default is {shown}, "
                    f"the definition's {key.shown_default}"
                )
    problems += [
        f"README.md: {label}: not in the configuration table "
        f"(its row: | `{label}` | {key.shown_default} | {key.setting.doc} |)"
        for label, key in defined.items()
        if label not in seen
    ]
    return problems


def same_default(key: Key, shown: str) -> bool:
    """README's default for ``key``: the same words, or a TOML value that reads the same."""
    if key.setting.default is None:
        return shown == key.setting.shown
    literal = re.fullmatch(r"`(.+)`", shown)
    if literal is None:
        return False
    try:
        value = tomllib.loads(f"v = {literal.group(1)}")["v"]
        return key.setting.convert(value) == key.setting.convert(key.setting.default)
    except (tomllib.TOMLDecodeError, ValueError, TypeError):
        return False


def test_readme_table_matches_the_definition() -> None:
    problems = readme_problems(README.read_text(encoding="utf-8"))
    assert not problems, "\n".join(problems)


def test_the_readme_check_names_the_key() -> None:
    text = README.read_text(encoding="utf-8")
    row = next(line for line in text.split("\n") if line.startswith("| `[smtp] max_recipients`"))
    no = text.split("\n").index(row) + 1
    assert readme_problems(text.replace(row + "\n", "")) == [
        "README.md: [smtp] max_recipients: not in the configuration table (its row: "
        "| `[smtp] max_recipients` | `100` | more get `452 4.5.3 Too many recipients` |)"
    ]
    assert readme_problems(text.replace(row, row.replace("`100`", "`101`"))) == [
        f"README.md:{no}: [smtp] max_recipients: README's default is `101`, the definition's `100`"
    ]
    assert readme_problems(text.replace(row, row.replace("max_recipients", "max_rcpts"))) == [
        f"README.md:{no}: [smtp] max_rcpts: documented, but no such setting",
        "README.md: [smtp] max_recipients: not in the configuration table (its row: "
        "| `[smtp] max_recipients` | `100` | more get `452 4.5.3 Too many recipients` |)",
    ]
    # Another spelling of the same value is the same default; words must be the definition's.
    assert readme_problems(text.replace('| `"5m"` / `"3m"` |', '| `"300s"` / `"3m"` |')) == []
    assert (
        readme_problems(
            text.replace("| `hostname` | the machine's FQDN |", "| `hostname` | `localhost` |")
        )
        != []
    )


def test_markdown_generator_prints_every_row() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mailgate.config", "--markdown"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stderr == ""
    lines = out.stdout.splitlines()
    assert lines[:2] == ["| key | default | meaning |", "|---|---|---|"]
    generated = "## Configuration reference\n" + out.stdout
    assert readme_problems(generated) == []
    assert [labels for _, labels, _ in readme_table(generated)] == [[k.label] for k in keys()]
