"""The one way the tests wait for something to happen (chasquid's testlib.WaitFor): poll a
condition until it holds. The timeout is a hang guard, never a timing assertion.

- :func:`wait_until`: the first true value of a predicate; AssertionError after the timeout.
- :func:`poll`: the same, but None after the timeout, for callers that report rather than fail.
- :func:`stays`: a predicate that must hold for a while (nothing arrives that must not); it
  fails the moment it stops holding. Only where no event marks "it would have happened by now".
- :func:`wait_until_async`: :func:`wait_until` inside an event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
What = str | Callable[[], str]  # a callable is asked at failure time: it can show the state


def poll(predicate: Callable[[], T], timeout: float, step: float = 0.05) -> T | None:
    """``predicate()``'s first true value, or None once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(step)


def wait_until(
    predicate: Callable[[], T], what: What, timeout: float = 10.0, step: float = 0.05
) -> T:
    """``predicate()``'s first true value; AssertionError naming ``what`` after ``timeout``."""
    value = poll(predicate, timeout, step)
    if not value:
        raise AssertionError(f"timed out after {timeout:g} s waiting for {_text(what)}")
    return value


def stays(predicate: Callable[[], object], what: What, duration: float, step: float = 0.05) -> None:
    """``predicate()`` holds now and throughout ``duration`` seconds; AssertionError naming
    ``what`` as soon as it does not."""
    deadline = time.monotonic() + duration
    while True:
        if not predicate():
            raise AssertionError(f"no longer true: {_text(what)}")
        if time.monotonic() > deadline:
            return
        time.sleep(step)


async def wait_until_async(
    predicate: Callable[[], T], what: What, timeout: float = 10.0, step: float = 0.01
) -> T:
    """:func:`wait_until` for a coroutine: the loop runs on between the checks."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {_text(what)}")
        await asyncio.sleep(step)


def _text(what: What) -> str:
    return what if isinstance(what, str) else what()
