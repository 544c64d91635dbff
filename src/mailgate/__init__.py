"""mailgate: a mail gateway with Sendmail's tables and a modern surface."""

__version__ = "0.1.0"
