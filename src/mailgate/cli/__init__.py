"""The ``mailgate`` command: argument parsing and output only; the work is elsewhere.

One module per group of subcommands (``service``, ``queue``, ``routing``, ``migrate``), what
they share in ``common``, the parser and ``main`` in ``parser``."""

from mailgate.cli.common import STOP_MARGIN
from mailgate.cli.parser import build_parser, main, run_subcommand

__all__ = ["STOP_MARGIN", "build_parser", "main", "run_subcommand"]
