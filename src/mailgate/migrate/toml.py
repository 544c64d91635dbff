"""A `Conversion` written as ``mailgate.toml``: each setting under the mc lines it comes from.

Top-level keys first, then each ``[section]`` once, in the order of `config.keys()` (TOML
allows no top-level key after a section), then the ``[[milter]]`` tables. After them, all as
comments: the blocks mailgate cannot use yet, the mc line by line with what became of it, the
limits mailgate keeps where Sendmail had none, and the findings.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from mailgate.config import toml_literal
from mailgate.migrate.mc import Assignment, Conversion

__all__ = ["render"]

_WIDTH = 99


def _comment(text: str, indent: str = "") -> list[str]:
    return [
        f"# {indent}{line}".rstrip()
        for line in textwrap.wrap(
            text, _WIDTH - 2 - len(indent), break_long_words=False, break_on_hyphens=False
        )
    ] or ["#"]


def _source_lines(conv: Conversion, line: int, end_line: int, name: str) -> list[str]:
    return [
        f"# {name}:{n}: {text}".rstrip()
        for n, text in zip(range(line, end_line + 1), conv.source(line, end_line), strict=False)
    ]


def _assignment(conv: Conversion, a: Assignment, name: str) -> list[str]:
    out: list[str] = []
    for c in conv.constructs:
        if c.line in a.lines and a.label in c.sets:
            out += _source_lines(conv, c.line, c.end_line, name)
    out += _comment(a.why)
    out.append(f"{a.key} = {toml_literal(a.value)}")
    return out


def render(conv: Conversion) -> str:
    name = Path(conv.mc_path).name
    out = [
        f"# mailgate.toml, imported from {conv.mc_path} by `mailgate import-mc`.",
        *_comment(
            "Each setting names the sendmail.mc lines it comes from; a setting without one is"
            " Sendmail's default where mailgate's differs, or a path of mailgate's own. Check"
            " the file with `mailgate check -c mailgate.toml` before the switch."
        ),
    ]
    section = ""
    for a in conv.assignments:
        if a.section != section:
            section = a.section
            out += ["", f"[{section}]"]
        out += ["", *_assignment(conv, a, name)]
    for block in conv.blocks:
        if block.live:
            out += ["", *_source_lines(conv, block.line, block.line, name), *block.body]
        else:
            out += ["", *_comment(f"{name}:{block.line}: {block.title}: not imported (see below)")]
            out += [f"# {line}" for line in block.body]
    out += ["", f"# --- {name}, line by line " + "-" * max(0, _WIDTH - 22 - len(name))]
    shown: set[int] = set()  # findings written under their construct
    for c in conv.constructs:
        out += _source_lines(conv, c.line, c.end_line, name)
        sets = f"→ {', '.join(c.sets)}" if c.sets else ""
        out += _comment(f"{c.summary} {sets}".strip(), "    ")
        for n, f in enumerate(conv.findings):
            if n not in shown and f.path == conv.mc_path and c.line <= (f.line or 0) <= c.end_line:
                shown.add(n)
                out += _comment(f"{f.kind}: {f.message}", "    ")
    if conv.kept:
        out += ["", "# --- mailgate's limits, kept where Sendmail had none " + "-" * 45]
        for text in conv.kept:
            out += _comment(text)
    rest = [f for n, f in enumerate(conv.findings) if n not in shown]
    if rest:
        out += ["", "# --- the tables, and the file as a whole " + "-" * 57]
        for f in rest:
            out += _comment(f"{f.kind}: {f}")
    return "\n".join(out) + "\n"
