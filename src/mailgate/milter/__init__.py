"""Content filtering through milters (Sendmail's INPUT_MAIL_FILTER, Postfix's smtpd_milters).

``codec`` is the wire format, ``session`` one filter's protocol state (sans-IO), ``client``
the asyncio connection to one filter, ``chain`` the filters of one SMTP session in their
order (what the SMTP session calls), ``message`` the changes filters make to a message
before it is committed, ``hold`` where a quarantined message goes.
"""
