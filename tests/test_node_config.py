"""One config for many nodes: ``include`` (node.toml) and ``MAILGATE__`` variables over the
shared file, key by key; errors naming the node file's line or the variable; what
``mailgate check`` says came from where; the generation; ``[metrics] token_file``."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate import cli
from mailgate.config import ConfigError, Origin, env_name, keys, load_config
from mailgate.snapshot import load_snapshot

SHARED = (
    'include = ["node.toml"]\nhostname = "shared.example.com"\nlisten = ["127.0.0.1:2525"]\n'
    '[smtp]\ngreet_pause = "1s"\nmax_recipients = 50\n'
)
NODE = 'hostname = "mx1.example.com"\n\n[smtp]\nmax_recipients = 7\n'


def write(tmp_path: Path, node: str = NODE, shared: str = SHARED) -> Path:
    (tmp_path / "node.toml").write_text(node)
    main = tmp_path / "mailgate.toml"
    main.write_text(shared)
    return main


def test_the_node_file_and_the_environment_replace_the_shared_keys_one_by_one(
    tmp_path: Path,
) -> None:
    main = write(tmp_path, NODE + '[[listener]]\naddress = "127.0.0.1:2600"\n')
    env = {
        "MAILGATE__SMTP__GREET_PAUSE": "2s",
        "MAILGATE__WORKERS": "3",
        "MAILGATE__LISTEN": '["127.0.0.1:2700"]',
        "MAILGATE_CONFIG": "not ours (one underscore)",
    }
    cfg = load_config(main, env)
    assert (cfg.hostname, cfg.smtp.max_recipients, cfg.smtp.greet_pause) == (
        "mx1.example.com",
        7,
        2.0,
    )
    assert cfg.smtp.max_message_size == 50 * 1024**2  # neither file: the default
    assert (cfg.workers, [ls.label for ls in cfg.listeners]) == (
        3,
        ["127.0.0.1:2700", "127.0.0.1:2600"],
    )
    assert cfg.include == (tmp_path / "node.toml",)
    node = tmp_path / "node.toml"
    assert cfg.origins == (
        Origin("hostname", '"mx1.example.com"', f"{node}:1"),
        Origin("[smtp] max_recipients", "7", f"{node}:4"),
        Origin("[[listener]]", "1 table", f"{node}:5"),
        Origin("listen", '["127.0.0.1:2700"]', "environment variable MAILGATE__LISTEN"),
        Origin("[smtp] greet_pause", '"2s"', "environment variable MAILGATE__SMTP__GREET_PAUSE"),
        Origin("workers", "3", "environment variable MAILGATE__WORKERS"),
    )


def test_every_setting_has_a_variable_of_its_own() -> None:
    names = [env_name(k.section, k.name) for k in keys() if not k.array]
    assert len(set(names)) == len(names)
    assert env_name("smtp", "greet_pause") == "MAILGATE__SMTP__GREET_PAUSE"


BAD_NODE_FILES = [
    ("[smtp]\nmax_recipients = 0\n", "{node}:2: smtp.max_recipients: must be at least 1"),
    ('hostnam = "x"\n', "{node}:1: hostnam: unknown setting"),
    (
        '\n[[listener]]\naddress = "x"\n',
        '{node}:3: listener[1].address: bad listen address \'x\': use "ip:port" or "[ipv6]:port"',
    ),
    ('include = ["other.toml"]\n', "{node}:1: include: only the main file includes others"),
    (
        'listen = ["127.0.0.1:2600"]\n[[listener]]\naddress = "127.0.0.1:2600"\n',
        "{node}:3: listener[1].address: 127.0.0.1:2600 is given twice (listen, [[listener]])",
    ),
]


@pytest.mark.parametrize(("node", "expected"), BAD_NODE_FILES)
def test_a_bad_node_file_is_named_with_its_line(tmp_path: Path, node: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, node), {})
    assert str(err.value) == expected.format(node=tmp_path / "node.toml")


def test_a_missing_node_file_is_an_error_at_the_include_line(tmp_path: Path) -> None:
    main = tmp_path / "mailgate.toml"
    main.write_text('hostname = "a.example"\ninclude = ["/nowhere/node.toml"]\n')
    with pytest.raises(ConfigError) as err:
        load_config(main, {})
    assert str(err.value) == f"{main}:2: include: /nowhere/node.toml: no such file"
    (tmp_path / "node.toml").write_text("hostname = \n")
    main.write_text('include = ["node.toml"]\n')
    with pytest.raises(ConfigError) as err:
        load_config(main, {})
    assert str(err.value).startswith(f"{tmp_path / 'node.toml'}:1: TOML syntax: ")


BAD_VARIABLES = [
    (
        "MAILGATE__SMTP__GREET_PAUSE",
        "soon",
        'smtp.greet_pause: bad duration \'soon\': use e.g. "30m", "5s", "1h30m"',
    ),
    ("MAILGATE__HOSTNAME", "not a name", "hostname: 'not a name' is not a valid host name"),
    (
        "MAILGATE__HOSTNAM",
        "x",
        "no such setting (MAILGATE__KEY or MAILGATE__SECTION__KEY, e.g. MAILGATE__HOSTNAME, "
        "MAILGATE__SMTP__GREET_PAUSE)",
    ),
    (
        "MAILGATE__LISTENER__ADDRESS",
        "127.0.0.1:25",
        "[[listener]] tables cannot be given in the environment: put them in a node file",
    ),
    (
        "MAILGATE__MILTER",
        "x",
        "[[milter]] tables cannot be given in the environment: put them in a node file",
    ),
    ("MAILGATE__INCLUDE", '["x.toml"]', "include is read from the main file only"),
]


@pytest.mark.parametrize(("name", "value", "expected"), BAD_VARIABLES)
def test_a_bad_variable_is_named(tmp_path: Path, name: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path), {name: value})
    assert str(err.value) == f"environment variable {name}: {expected}"


def test_check_shows_where_the_values_came_from_and_the_generation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    main = write(tmp_path)
    monkeypatch.setenv("MAILGATE__SMTP__GREET_PAUSE", "0s")
    generation = load_snapshot(main).generation
    assert cli.main(["check", "-c", str(main)]) == 0
    node = tmp_path / "node.toml"
    assert capsys.readouterr().out.splitlines() == [
        f"{main}: OK (0 in local-host-names, 0 in relay-domains; 0 warnings; "
        f"generation {generation})",
        f'  hostname = "mx1.example.com"  from {node}:1',
        f"  [smtp] max_recipients = 7  from {node}:4",
        '  [smtp] greet_pause = "0s"  from environment variable MAILGATE__SMTP__GREET_PAUSE',
    ]


def test_the_generation_moves_with_each_file_and_variable_read(tmp_path: Path) -> None:
    main = write(tmp_path)
    first = load_snapshot(main).generation
    assert load_snapshot(main).generation == first  # nothing changed
    seen = {first}
    for change in (
        lambda: (tmp_path / "mailertable").write_text("example.net  smtp:[192.0.2.1]\n"),
        lambda: (tmp_path / "node.toml").write_text("workers = 2\n" + NODE),
        lambda: main.write_text('stop_grace = "5s"\n' + SHARED),
    ):
        change()
        generation = load_snapshot(main).generation
        assert generation not in seen
        seen.add(generation)
    snapshot = load_snapshot(main)
    assert len(snapshot.generation) == 12
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAILGATE__WORKERS", "2")
        assert load_snapshot(main).generation not in seen


def test_the_token_file_is_read_with_the_config(tmp_path: Path) -> None:
    main = write(tmp_path, shared=SHARED + '[metrics]\ntoken_file = "cluster.token"\n')
    token = tmp_path / "cluster.token"
    line = f"{main}:8: metrics.token_file:"
    short = (
        f"{line} {token} must hold one token of at least 16 printable characters (no blanks), "
        "e.g. from `openssl rand -hex 32`"
    )
    with pytest.raises(ConfigError) as err:
        load_config(main, {})
    assert str(err.value) == f"{line} cannot read {token}: No such file or directory"
    for text, mode, expected in (
        ("a" * 32, 0o644, f"{line} {token} is readable by every user: chmod o-r it"),
        ("short", 0o600, short),
        ("two words of a token", 0o600, short),
    ):
        token.write_text(text + "\n")
        token.chmod(mode)
        with pytest.raises(ConfigError) as err:
            load_config(main, {})
        assert str(err.value) == expected
    token.write_text("0123456789abcdef0123\n")
    assert load_config(main, {}).metrics.token == "0123456789abcdef0123"
    assert "0123456789abcdef" not in repr(load_config(main, {}))
