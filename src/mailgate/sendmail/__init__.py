"""``mailgate sendmail``: Sendmail's command line, for the scripts, cron jobs and programs that
call ``/usr/sbin/sendmail``, ``mailq`` and ``newaliases`` (``mailgate install-sendmail-link``
puts those names in place; ``mailgate`` acts on the name it is called by).

- ``options``: the command line, parsed as Sendmail's getopt takes it (pure).
- ``input``: standard input as the spool holds it: CRLF, up to the lone dot (pure).
- ``submit``: local submission: recipients checked as SMTP checks them, the header section
  stamped, the content into the spool, the daemon told.
- ``command``: which mode does what (most are other ``mailgate`` subcommands), exit statuses.
- ``links``: ``mailgate install-sendmail-link``.
"""

# Here, not in ``command``: every ``mailgate`` command reads them, and ``command`` imports
# local submission (the milter chain, the SMTP session), a third of a queue tool's start.
CONFIG_VARIABLE = "MAILGATE_CONFIG"

# What each name does when ``mailgate`` is called by it (a link to the mailgate command).
PROGRAMS: dict[str, tuple[str, ...]] = {
    "sendmail": (),
    "mailq": ("-bp",),
    "newaliases": ("-bi",),
}
