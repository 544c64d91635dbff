"""``mailgate makemap`` and ``mailgate newaliases``, as the old /etc/mail/Makefile calls them.

The exit statuses are those of Sendmail's programs (tests/test_sendmail_compare.py runs both
on the same input): makemap 65 for bad lines, 64 for usage, 73 for an unknown map type;
newaliases 70 for bad lines.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.gateway import mailgate_command

EXAMPLES = Path(__file__).parent / "data" / "sendmail-examples"


def makemap(cwd: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        mailgate_command("makemap", *args),
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("name", ["access", "mailertable", "virtusertable", "domaintable"])
def test_the_example_tables_pass_as_the_makefile_feeds_them(tmp_path: Path, name: str) -> None:
    shutil.copytree(EXAMPLES, tmp_path, dirs_exist_ok=True)
    done = makemap(tmp_path, "hash", f"{name}.db", stdin=(tmp_path / name).read_text())
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert not (tmp_path / f"{name}.db").exists()  # nothing is built: the text is the table
    if name == "access":  # legal but surely not meant: said, as mailgate check says it
        assert done.stderr.startswith("makemap: warning: access:4: 192.168.0. never matches")
    else:
        assert done.stderr == ""


def test_every_bad_line_is_reported_with_its_line(tmp_path: Path) -> None:
    text = (
        "a.example smtp:[192.0.2.1]\n"
        "b.example\n"  # 2: no value
        "c.example cyrus:host\n"  # 3: no such mailer in mailgate
        "# a comment\n"
        "d.example smtp:[192.0.2.4]\n"
        "e.example\n"  # 6
    )
    done = makemap(tmp_path, "hash", "mailertable", stdin=text)
    assert done.returncode == 65
    assert done.stderr.splitlines() == [
        "makemap: mailertable:2: key 'b.example' has no value",
        "makemap: mailertable:3: c.example: unknown mailer 'cyrus' (expected smtp, esmtp, smtp8,"
        " dsmtp, relay, local, error, uucp, uucp-old, suucp, uucp-new, uucp-dom or uucp-uudom)",
        "makemap: mailertable:6: key 'e.example' has no value",
    ]


def test_access_values_are_checked_as_the_daemon_reads_them(tmp_path: Path) -> None:
    text = "Connect:192.0.2.1 RELAY\nFrom:a@example.org MAYBE\nTo:b.example ERROR:5.7.1:250 x\n"
    done = makemap(tmp_path, "hash", "/etc/mail/access.db", stdin=text)
    assert done.returncode == 65
    errors = done.stderr.splitlines()
    assert [e.split(":")[1:3] for e in errors] == [
        [" /etc/mail/access", "2"],
        [" /etc/mail/access", "3"],
    ]


def test_duplicate_keys_are_errors_as_in_makemap(tmp_path: Path) -> None:
    text = "a.example smtp:[192.0.2.1]\nA.Example smtp:[192.0.2.2]\n"
    plain = makemap(tmp_path, "hash", "mailertable", stdin=text)
    assert plain.returncode == 65
    assert plain.stderr.splitlines() == ["makemap: mailertable:2: key A.Example: duplicate key"]
    # -r: Sendmail's map keeps the last line, mailgate's text read keeps the first: refused.
    replaced = makemap(tmp_path, "-r", "hash", "mailertable", stdin=text)
    assert replaced.returncode == 65
    assert replaced.stderr.splitlines() == [
        "makemap: mailertable:2: key A.Example: duplicate key; with -r Sendmail used this"
        " line, mailgate reads the text and uses line 1: remove one of them"
    ]


def test_usage_types_and_listing(tmp_path: Path) -> None:
    assert makemap(tmp_path, "hash").returncode == 64
    assert makemap(tmp_path, "-t", ":", "hash", "access").returncode == 64
    unknown = makemap(tmp_path, "nosuch", "access", stdin="a b\n")
    assert unknown.returncode == 73
    assert (
        unknown.stderr == "makemap: error opening type nosuch map access: Unknown database type\n"
    )
    listed = makemap(tmp_path, "-l")
    assert listed.returncode == 0 and listed.stdout.split() == [
        "hash",
        "btree",
        "dbm",
        "cdb",
        "implicit",
    ]
    (tmp_path / "access").write_text("# x\nConnect:192.0.2.1 RELAY\nTo:Example.COM OK\n")
    dumped = makemap(tmp_path, "-u", "hash", "access")
    assert dumped.returncode == 0
    assert dumped.stdout == "connect:192.0.2.1\tRELAY\nto:example.com\tOK\n"


def test_a_table_given_that_is_not_the_file_mailgate_reads_is_said(tmp_path: Path) -> None:
    (tmp_path / "access").write_text("Connect:192.0.2.1 RELAY\n")
    done = makemap(tmp_path, "hash", "access", stdin="Connect:192.0.2.2 RELAY\n")
    assert done.returncode == 0
    assert done.stderr == (
        "makemap: warning: access: mailgate reads this file, not the text given on standard"
        " input, which differs from it: copy the new text there\n"
    )


def newaliases(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        mailgate_command("newaliases", "-c", str(config)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_newaliases_checks_the_aliases_of_the_config(tmp_path: Path) -> None:
    config = tmp_path / "mailgate.toml"
    config.write_text("")  # tables_dir: the file's folder
    aliases = tmp_path / "aliases"
    aliases.write_text("postmaster: root\nlist: a, b@example.org,\n  c\n")
    good = newaliases(config)
    assert (good.returncode, good.stderr) == (0, "")
    assert good.stdout == f"{aliases}: 2 aliases (read as text: nothing to rebuild)\n"
    aliases.write_text('postmaster: root\nbad line here\nx: "|"\nok: root\nok: bin\n')
    bad = newaliases(config)
    assert bad.returncode == 70  # sendmail -bi's status for a bad line
    assert bad.stderr.splitlines() == [
        f"newaliases: warning: {aliases}:5: duplicate alias name ok: replaces line 4",
        f"{aliases}:2: 'bad line here': missing ':' after the alias name",
        f"{aliases}:3: x: '|' needs a program",
    ]
    aliases.unlink()
    missing = newaliases(config)
    assert missing.returncode == 0  # as sendmail -bi: said, not an error
    assert (
        missing.stderr == f"newaliases: warning: cannot open {aliases}: No such file or directory\n"
    )
    assert newaliases(tmp_path / "nonexistent.toml").returncode == 78


def test_the_old_makefile_keeps_working(tmp_path: Path) -> None:
    """The Makefile of a Sendmail gateway's /etc/mail, run by make with mailgate's makemap and
    newaliases first in PATH (as small wrappers would install them)."""
    if shutil.which("make") is None:
        pytest.fail("make is missing: .ci/run installs it")
    mail = tmp_path / "mail"
    shutil.copytree(EXAMPLES, mail)
    (mail / "aliases").write_text("postmaster: root\n")
    (mail / "mailgate.toml").write_text("")
    (mail / "Makefile").write_text(
        "all: virtusertable.db access.db domaintable.db mailertable.db aliases.db\n\n"
        "%.db : %\n\t@rm -f $@\n\t@makemap hash $@ < $<\n\n"
        "aliases.db : aliases\n\t@newaliases\n"
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = sys.executable
    for name, extra in (("makemap", ""), ("newaliases", f" -c {mail / 'mailgate.toml'}")):
        wrapper = bin_dir / name
        wrapper.write_text(f'#!/bin/sh\nexec {python} -m mailgate.cli {name}{extra} "$@"\n')
        wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def make() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["make", "-C", str(mail)], capture_output=True, text=True, env=env, timeout=120
        )

    done = make()
    assert done.returncode == 0, done.stderr
    assert f"{mail / 'aliases'}: 1 aliases" in done.stdout
    with (mail / "mailertable").open("a") as f:
        f.write("broken.example\n")
    failed = make()
    assert failed.returncode != 0
    assert "makemap: mailertable:4: key 'broken.example' has no value" in failed.stderr


def test_makemap_of_the_aliases_file_checks_the_aliases_format(tmp_path: Path) -> None:
    done = makemap(tmp_path, "hash", "aliases", stdin="postmaster: root\nbad\n")
    assert done.returncode == 65
    assert done.stderr == "makemap: aliases:2: 'bad': missing ':' after the alias name\n"
