"""[[milter]] tables: what they read as, and each mistake as `file:line: message`."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate.config import ConfigError, MilterSocket, parse_config

PATH = Path("/etc/mailgate/mailgate.toml")
GOOD = """listen = ["127.0.0.1:25", "127.0.0.1:587"]
[[milter]]
name = "rspamd"
socket = "inet:11332@127.0.0.1"
[[milter]]
name = "opendkim"
socket = "unix:opendkim.sock"
default_action = "accept"
listen = ["127.0.0.1:587"]
eom_timeout = "1m"
connect_macros = ["j", "{client_addr}"]
"""


def test_tables_in_order_with_their_settings() -> None:
    rspamd, dkim = parse_config(GOOD, PATH, PATH.parent).milter
    assert (rspamd.name, rspamd.socket, rspamd.default_action) == (
        "rspamd",
        MilterSocket("inet", host="127.0.0.1", port=11332),
        "tempfail",
    )
    assert (rspamd.connect_timeout, rspamd.read_timeout, rspamd.eom_timeout) == (30, 30, 300)
    assert dkim.socket == MilterSocket("unix", path="/etc/mailgate/opendkim.sock")
    assert (dkim.default_action, dkim.listen, dkim.eom_timeout) == (
        "accept",
        (("127.0.0.1", 587),),
        60,
    )
    assert dkim.connect_macros == ("j", "{client_addr}")


@pytest.mark.parametrize(
    "socket",
    ["inet:11332@127.0.0.1", "inet:127.0.0.1:11332", "inet6:11332@[::1]", "local:/run/x.sock"],
)
def test_the_socket_spellings(socket: str) -> None:
    text = f'[[milter]]\nname = "x"\nsocket = "{socket}"\n'
    assert parse_config(text, PATH, PATH.parent).milter[0].socket.kind in ("inet", "unix")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            GOOD.replace("inet:11332@127.0.0.1", "inet:nowhere"),
            "4: milter[1].socket: bad milter socket",
        ),
        (GOOD.replace('"accept"', '"maybe"'), '8: milter[2].default_action: must be "tempfail"'),
        (
            GOOD.replace('name = "opendkim"', 'name = "rspamd"'),
            "6: milter[2].name: 'rspamd' is the name of an earlier",
        ),
        (
            GOOD.replace('name = "opendkim"', 'name = "open dkim"'),
            "6: milter[2].name: 'open dkim' is not a filter name: letters, digits, '-', '_', '.'",
        ),
        (GOOD.replace('socket = "unix:opendkim.sock"\n', ""), "5: milter[2]: needs a socket"),
        (GOOD.replace('eom_timeout = "1m"', "eom = 1"), "10: milter[2].eom: unknown setting"),
        (
            GOOD.replace('["127.0.0.1:587"]\neom', '["127.0.0.1:26"]\neom'),
            "9: milter[2].listen: 127.0.0.1:26 is not one of the listeners",
        ),
        (GOOD.replace('"{client_addr}"', '"client addr"'), "11: milter[2].connect_macros:"),
        ('[milter]\nname = "x"\n', "milter: must be tables, each under its own [[milter]] line"),
    ],
)
def test_mistakes(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(text, PATH, PATH.parent)
    assert error in str(raised.value), str(raised.value)
