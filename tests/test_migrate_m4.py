"""The m4 subset of sendmail.mc files: quoting, dnl, comments, arguments, lines."""

from __future__ import annotations

import pytest

from mailgate.migrate.m4 import Call, McSyntaxError, Text, parse


def calls(text: str) -> list[tuple[str, tuple[str, ...], int, int]]:
    return [
        (n.name, n.args, n.line, n.end_line) for n in parse(text, "t.mc") if isinstance(n, Call)
    ]


def test_the_quoting_forms_of_one_feature_are_the_same_call() -> None:
    forms = [
        "FEATURE(`greet_pause',`5000')dnl\n",
        "FEATURE(greet_pause, 5000)\n",
        "FEATURE( `greet_pause' ,\n\t5000)\n",
        "FEATURE(``greet_pause'', `5'`000')\n",
    ]
    for text in forms:
        assert [(c[0], tuple(a.strip() for a in c[1])) for c in calls(text)] == [
            ("FEATURE", ("greet_pause", "5000"))
        ], text


def test_quotes_protect_commas_and_parentheses() -> None:
    assert calls("DAEMON_OPTIONS(`Port=smtp, Name=MTA')dnl\n") == [
        ("DAEMON_OPTIONS", ("Port=smtp, Name=MTA",), 1, 1)
    ]
    assert calls("define(`x', (a, b) c)\n") == [("define", ("x", "(a, b) c"), 1, 1)]
    assert calls("define(`x', `a)b')\n") == [("define", ("x", "a)b"), 1, 1)]


def test_empty_arguments_are_kept() -> None:
    assert calls("FEATURE(`access_db', , `skip')dnl\n") == [
        ("FEATURE", ("access_db", "", "skip"), 1, 1)
    ]


def test_dnl_deletes_to_the_end_of_the_line_also_inside_arguments() -> None:
    text = (
        "define(`confPRIVACY_FLAGS',dnl a comment, with a comma\n`novrfy,noexpn')dnl\nMAILER(smtp)"
    )
    assert calls(text) == [
        ("define", ("confPRIVACY_FLAGS", "novrfy,noexpn"), 1, 2),
        ("MAILER", ("smtp",), 3, 3),
    ]
    assert calls("dnl FEATURE(promiscuous_relay)\nMAILER(local)dnl\n") == [
        ("MAILER", ("local",), 2, 2)
    ]


def test_comments_and_quoted_text_are_not_calls() -> None:
    nodes = parse("# FEATURE(promiscuous_relay)\n`FEATURE(promiscuous_relay)'\n", "t.mc")
    assert nodes == [Text("FEATURE(promiscuous_relay)", 2, 2)]


def test_words_are_text_unless_a_parenthesis_follows_or_they_are_bare_macros() -> None:
    nodes = parse("LOCAL_CONFIG\nKfoo hash /etc/mail/foo\nFEATURE (x)\n", "t.mc")
    assert nodes == [
        Call("LOCAL_CONFIG", (), 1, 1, parens=False),
        Text("Kfoo hash /etc/mail/foo", 2, 2),
        Text("FEATURE (x)", 3, 3),
    ]


def test_changequote_changes_the_quotes_of_what_follows() -> None:
    text = "changequote([,])dnl\ndefine([confX], [a,`b'])dnl\nchangequote()define(`y',`z')\n"
    assert calls(text) == [
        ("changequote", ("[", "]"), 1, 1),
        ("define", ("confX", "a,`b'"), 2, 2),
        ("changequote", ("",), 3, 3),
        ("define", ("y", "z"), 3, 3),
    ]


def test_a_multi_line_call_spans_its_lines() -> None:
    text = "divert(0)\nINPUT_MAIL_FILTER(`f',\n  `S=unix:/run/f.sock,\n   F=T')dnl\n"
    assert calls(text)[1] == ("INPUT_MAIL_FILTER", ("f", "S=unix:/run/f.sock,\n   F=T"), 2, 4)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("divert(0)\n\nFEATURE(`mailertable,`x')\nMAILER(smtp)\n", 3, "quoted string"),
        ("MAILER(smtp)\nFEATURE(`mailertable'\nMAILER(local)dnl\n", 2, "FEATURE("),
        ("define(`x', (a, b)\n", 1, "define("),
    ],
)
def test_where_m4_would_stop_the_error_names_the_line_that_opened_it(
    text: str, line: int, words: str
) -> None:
    with pytest.raises(McSyntaxError) as info:
        parse(text, "t.mc")
    assert info.value.path == "t.mc"
    assert info.value.line == line
    assert words in info.value.message
