"""One timer per connection for a sequence of waits, each with its own deadline.

A connection waits several times a message (for each command, reply or content block), and
a timer made and cancelled per wait was a ``TimerHandle``, its scheduling and its
cancellation each time. Here the armed timer stays while the deadlines move later (the usual
case: each wait ends long before its timeout); when it fires before the deadline of the wait
in progress it is armed again for that deadline, and only a deadline earlier than the armed
one (a shorter timeout: stress mode, another stage) replaces it. Used by the server
connection (``smtp/server.py``) and the outbound client's protocol (``smtp/client.py``).

A mixin, not an object the connection holds: an object holding the connection's callback
would make every connection a reference cycle, freed only by the garbage collector.
"""

from __future__ import annotations

import asyncio

# A timer may fire this much before its deadline by the loop's clock (uvloop counts whole
# milliseconds): a wait whose deadline is that close has timed out.
TIMER_SLACK = 0.002


class DeadlineWaits:
    """``arm`` before a wait, ``disarm`` after it, ``stop_timer`` when the connection ends;
    ``deadline_expired`` is called (once per wait at most) when the wait in progress reaches
    its deadline."""

    event_loop: asyncio.AbstractEventLoop
    _deadline = 0.0  # of the wait in progress (loop time)
    _waiting = False
    _timer: asyncio.TimerHandle | None = None
    _timer_at = 0.0

    def deadline_expired(self) -> None:
        raise NotImplementedError

    def arm(self, deadline: float) -> None:
        self._deadline = deadline
        self._waiting = True
        timer = self._timer
        if timer is None or self._timer_at > deadline:
            if timer is not None:
                timer.cancel()
            self._timer_at = deadline
            self._timer = self.event_loop.call_at(deadline, self._deadline_reached)

    def disarm(self) -> None:
        self._waiting = False

    def stop_timer(self) -> None:
        """The connection is done: its timer must not keep it alive until it fires."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _deadline_reached(self) -> None:
        self._timer = None
        if not self._waiting:
            return  # between waits: the next one arms its own
        if self.event_loop.time() + TIMER_SLACK >= self._deadline:
            self._waiting = False
            self.deadline_expired()
        else:  # the wait in progress has a later deadline
            self._timer_at = self._deadline
            self._timer = self.event_loop.call_at(self._deadline, self._deadline_reached)
