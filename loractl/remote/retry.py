"""Retries with exponential backoff for idempotent registry calls (reads, ref listing, resolution)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from .errors import TransientError

T = TypeVar("T")

# Seconds to wait before each retry; tests set it to zeros.
DELAYS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)


def with_retries(call: Callable[[], T]) -> T:
    """Run `call`, retrying after each `TransientError`; the last one propagates with a hint."""
    for delay in DELAYS:
        try:
            return call()
        except TransientError:
            time.sleep(delay)
    return call()  # the last failure propagates, with its hint
