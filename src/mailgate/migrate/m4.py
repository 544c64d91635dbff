"""The m4 that ``sendmail.mc`` files are written in, read into macro calls with their lines.

Not an m4 interpreter: nothing is expanded but ``dnl``, and no file is included. What it keeps
of m4 is what decides how an mc file splits into calls and arguments:

- quoting: `` `text' ``, nested to any depth; the quotes are removed (all levels: the
  argument is what the macro finally sees), ``changequote`` changes them;
- ``dnl`` deletes up to and including the next newline, also inside an argument list
  (``define(`confX',dnl`` newline ``value)``);
- a macro call is a name followed at once by ``(``; arguments are split at commas outside
  quotes and nested parentheses, and lose their leading white space;
- ``#`` starts a comment up to the end of the line (outside quotes and arguments);
- any other text is kept as `Text` (m4 would copy it into sendmail.cf).

A few Sendmail macros take no arguments (``LOCAL_CONFIG``, ``MAILER_DEFINITIONS``…): those
names are calls when written bare; any other bare word is text.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailgate.errors import SourceError

__all__ = ["BARE_MACROS", "Call", "McSyntaxError", "Node", "Text", "parse"]

# Sendmail cf macros used without parentheses (cf/m4/cfhead.m4).
BARE_MACROS = frozenset(
    {
        "LOCAL_CONFIG",
        "LOCAL_NET_CONFIG",
        "LOCAL_RULESETS",
        "LOCAL_RULE_0",
        "LOCAL_RULE_1",
        "LOCAL_RULE_2",
        "LOCAL_RULE_3",
        "LOCAL_SRV_FEATURES",
        "LOCAL_CLT_FEATURES",
        "LOCAL_TRY_TLS",
        "LOCAL_TLS_CLIENT",
        "LOCAL_TLS_SERVER",
        "LOCAL_TLS_RCPT",
        "LOCAL_TLS_CONN",
        "LOCAL_STARTTLS",
        "LOCAL_DNSBL",
        "MAILER_DEFINITIONS",
        "divert",
        "undivert",
    }
)


class McSyntaxError(SourceError):
    """An mc file m4 itself would fail on (a quote or an argument list left open)."""


@dataclass(frozen=True)
class Call:
    """``name(args…)`` from ``line`` to ``end_line``; ``parens`` False for a bare macro."""

    name: str
    args: tuple[str, ...]
    line: int
    end_line: int
    parens: bool = True

    def arg(self, n: int) -> str:
        """Argument ``n`` (0-based) without surrounding white space; ``""`` when absent."""
        return self.args[n].strip() if n < len(self.args) else ""


@dataclass(frozen=True)
class Text:
    """Text outside any macro on one line, which m4 copies into sendmail.cf."""

    text: str
    line: int
    end_line: int


Node = Call | Text


def _is_name_start(c: str) -> bool:
    return c.isascii() and (c.isalpha() or c == "_")


def _is_name_char(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c == "_")


class _Lexer:
    def __init__(self, text: str, path: str) -> None:
        self.s = text
        self.path = path
        self.pos = 0
        self.line = 1
        self.lq = "`"
        self.rq = "'"

    def error(self, line: int, message: str) -> McSyntaxError:
        return McSyntaxError(self.path, line, message)

    def advance(self, n: int = 1) -> str:
        chunk = self.s[self.pos : self.pos + n]
        self.line += chunk.count("\n")
        self.pos += n
        return chunk

    def at(self, token: str) -> bool:
        return bool(token) and self.s.startswith(token, self.pos)

    def name(self) -> str:
        start = self.pos
        while self.pos < len(self.s) and _is_name_char(self.s[self.pos]):
            self.pos += 1
        return self.s[start : self.pos]

    def skip_line(self) -> None:
        """``dnl`` and ``#``: up to and including the newline."""
        end = self.s.find("\n", self.pos)
        self.advance((len(self.s) if end < 0 else end + 1) - self.pos)

    def quoted(self) -> str:
        """The quoted string at ``pos``, every level of quotes removed."""
        start_line = self.line
        self.advance(len(self.lq))
        depth = 1
        out: list[str] = []
        while True:
            if self.pos >= len(self.s):
                raise self.error(
                    start_line,
                    f"end of file inside a quoted string: the {self.lq} here has no"
                    f" closing {self.rq}",
                )
            if self.at(self.rq):
                self.advance(len(self.rq))
                depth -= 1
                if depth == 0:
                    return "".join(out)
            elif self.at(self.lq):
                self.advance(len(self.lq))
                depth += 1
            else:
                out.append(self.advance())

    def arguments(self, name: str, start_line: int) -> tuple[str, ...]:
        """The argument list after ``name(``, to its closing parenthesis."""
        self.advance()  # "("
        args: list[str] = []
        buf: list[str] = []
        depth = 0
        leading = True
        while True:
            if self.pos >= len(self.s):
                raise self.error(
                    start_line,
                    f"end of file inside the arguments of {name}(: a ) is missing",
                )
            c = self.s[self.pos]
            if leading and c in " \t\n":
                self.advance()
                continue
            leading = False
            if self.at(self.lq):
                buf.append(self.quoted())
            elif _is_name_start(c):
                word = self.name()
                if word == "dnl":
                    self.skip_line()
                    leading = not buf
                else:
                    buf.append(word)
            elif c == "(":
                depth += 1
                buf.append(self.advance())
            elif c == ")" and depth:
                depth -= 1
                buf.append(self.advance())
            elif c == ")":
                self.advance()
                args.append("".join(buf))
                return tuple(args)
            elif c == "," and not depth:
                self.advance()
                args.append("".join(buf))
                buf = []
                leading = True
            else:
                buf.append(self.advance())

    def changequote(self, args: tuple[str, ...]) -> None:
        # GNU m4: no argument restores ` and '; a missing end quote is '.
        lq = args[0] if args else ""
        rq = args[1] if len(args) > 1 else ""
        if not lq:
            self.lq, self.rq = "`", "'"
        else:
            self.lq, self.rq = lq, rq or "'"

    def nodes(self) -> list[Node]:
        out: list[Node] = []
        text: list[str] = []
        text_line = 0

        def flush() -> None:
            if text and "".join(text).strip():
                out.append(Text("".join(text).strip(), text_line, self.line))
            text.clear()

        while self.pos < len(self.s):
            c = self.s[self.pos]
            if c == "\n":
                flush()
                self.advance()
            elif c in " \t\r\f":
                if text:
                    text.append(c)
                self.advance()
            elif self.at(self.lq):
                if not text:
                    text_line = self.line
                text.append(self.quoted())
            elif c == "#":
                flush()
                self.skip_line()
            elif _is_name_start(c):
                line = self.line
                word = self.name()
                if word == "dnl":
                    flush()
                    self.skip_line()
                elif self.pos < len(self.s) and self.s[self.pos] == "(":
                    flush()
                    args = self.arguments(word, line)
                    if word == "changequote":
                        self.changequote(args)
                    out.append(Call(word, args, line, self.line))
                elif word in BARE_MACROS:
                    flush()
                    out.append(Call(word, (), line, line, parens=False))
                else:
                    if not text:
                        text_line = line
                    text.append(word)
            else:
                if not text:
                    text_line = self.line
                text.append(self.advance())
        flush()
        return out


def parse(text: str, path: str) -> list[Node]:
    """The macro calls and stray text of an mc file, in order; `McSyntaxError` where m4
    itself would stop (a quote or an argument list open at the end of the file)."""
    return _Lexer(text, path).nodes()
