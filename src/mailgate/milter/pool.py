"""Idle filter connections kept between SMTP sessions, for filters with ``reuse_connections``.

Sendmail and Postfix open one connection per filter for each SMTP session and close it at the
end. The protocol can keep it: SMFIC_QUIT_NC (``K``, "quit, a new connection follows") ends
the filter's session, the negotiation holds, and the next event on that connection is a new
CONNECT. For a filter that takes it, that saves the TCP connection, the OPTNEG round trip and
the filter's own set-up of every SMTP session. Not every filter does, and one that does not
cannot tell us: rspamd's proxy starts over whatever state it was in; libmilter's filters
(OpenDKIM, clamav-milter) take it only right after an end of message they answered
*continue*, and after an *accept* (OpenDKIM's answer to every message it signs) their state
machine ignores it, and the CONNECT that follows, which then gets no answer. So reuse is off
unless a ``[[milter]]`` sets ``reuse_connections``, and a reused connection that fails is a
failure like any other: the filter's default action from that stage on, and its
``Milter (name): …`` line.

``take(settings)`` hands out the filter's most recently kept connection that is still up (one
the filter closed while it was idle is dropped, not used; that is no failure: nothing was
sent on it for this session). ``release(client)`` at the end of an SMTP session sends QUIT_NC
and keeps the connection if the filter is between transactions and fewer than
``reuse_connections`` of its connections are idle; otherwise it sends QUIT and closes, as
without the setting. A kept connection closes after ``IDLE_SECONDS`` unused. The pool is per
process (each worker has its own) and keyed by the filter's settings: after a reload that
changes them, the old connections are not taken again and time out.
"""

from __future__ import annotations

import asyncio
from typing import Final

from mailgate.config import MilterSettings
from mailgate.milter.client import FilterClient

# Unused this long, a kept connection closes: shorter than the filters' own idle timeouts
# (rspamd's proxy 120 s by default, libmilter's 7,210 s), so that we close it, not they.
IDLE_SECONDS: Final = 10.0

_idle: dict[MilterSettings, list[tuple[FilterClient, asyncio.TimerHandle]]] = {}


def take(settings: MilterSettings) -> FilterClient | None:
    """A kept connection to this filter, on this loop and still up, or None."""
    if not settings.reuse_connections:
        # None kept (``release`` keeps none for it), and no look-up: the settings' hash is
        # their dataclass __hash__ over every field, computed again on each call.
        return None
    kept = _idle.get(settings)
    if not kept:
        return None
    loop = asyncio.get_running_loop()
    while kept:
        client, timer = kept.pop()
        timer.cancel()
        if client.loop is loop and client.reusable():
            client.reused = True
            return client
        client.close()
    return None


def release(client: FilterClient) -> None:
    """The SMTP session is over: keep the connection for the next one, or QUIT and close."""
    settings = client.settings
    limit = settings.reuse_connections
    if not limit or not client.reusable() or client.loop is None:
        client.quit()
        return
    kept = _idle.setdefault(settings, [])
    if len(kept) >= limit:
        client.quit()
        return
    client.quit_new_connection()
    timer = client.loop.call_later(IDLE_SECONDS, _expire, settings, client)
    kept.append((client, timer))


def _expire(settings: MilterSettings, client: FilterClient) -> None:
    kept = _idle.get(settings, [])
    for i, (held, _) in enumerate(kept):
        if held is client:
            del kept[i]
            break
    client.quit()


def idle(settings: MilterSettings) -> int:
    """How many connections to this filter are kept now."""
    return len(_idle.get(settings, ()))
