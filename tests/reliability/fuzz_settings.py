"""The hypothesis settings the fuzz suites share: bounded example counts in the normal run,
``MAILGATE_FUZZ_SCALE=N`` for N times as many by hand."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

SCALE = max(1, int(os.environ.get("MAILGATE_FUZZ_SCALE", "1")))


def fuzz_settings(n: int) -> settings:
    return settings(
        max_examples=n * SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
