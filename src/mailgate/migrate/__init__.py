"""Moving a Sendmail gateway to mailgate: ``sendmail.mc`` → ``mailgate.toml`` and the
``makemap`` / ``newaliases`` checks the old ``/etc/mail/Makefile`` runs.

`m4` reads the m4 subset ``sendmail.mc`` files are written in, `mc` maps each construct to
mailgate settings and findings (a pure function of the parsed file and the tables), `toml`
writes the result, `tablecheck` is ``makemap`` and ``newaliases``.
"""
