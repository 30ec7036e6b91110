"""Pacing a connection's API calls: the channel's documented rate, and a pause when it says "wait".

Channels meter an account as a whole (Telegram about 30 messages a second, WhatsApp 80, Discord and
Teams 50), while the hub sends for many conversations at once. Each connection therefore has one
`Pacer` that all its conversations pass through before every API call:

* **rate**: calls are spaced to `rate` per second after a burst of one second's worth, the generic
  cell rate algorithm (GCRA). Each caller reserves its slot at once, so callers go in arrival order.
* **pause**: when the channel answers 429 with a Retry-After, every call on the connection waits it
  out, not only the one that was refused; hammering a throttled account only prolongs the throttle.

A pacer lives in one hub process: several processes sending for one account each pace themselves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

__all__ = ["Pacer"]


class Pacer:
    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """`rate`: calls per second (0 = unpaced, only pauses apply). `clock` and `sleep` are the
        event loop's unless a test runs the pacer on time of its own."""
        if rate < 0:
            raise ValueError(f"rate must be 0 or more, not {rate}")
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._interval = 1 / rate if rate else 0.0
        self._burst = max(1.0, rate)  # a quiet connection may send one second's worth at once
        self._next = 0.0  # GCRA's "theoretical arrival time" of the next call
        self._paused_until = 0.0

    def reserve(self) -> float:
        """Take the next slot; the seconds the caller must wait before using it."""
        now = self._clock()
        start = max(now, self._paused_until)
        if not self._interval:
            return start - now
        arrival = max(self._next, start)
        self._next = arrival + self._interval
        allowed_at = arrival - (self._burst - 1) * self._interval
        return max(start, allowed_at) - now

    def pause(self, seconds: float) -> None:
        """Hold every call back for `seconds` from now (a pause never shortens one already running)."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    async def wait(self) -> float:
        """Wait for a slot; the seconds waited. A pause that starts while waiting is waited out too."""
        delay = self.reserve()
        waited = 0.0
        while delay > 0:
            await self._sleep(delay)
            waited += delay
            delay = self._paused_until - self._clock()
        return waited
