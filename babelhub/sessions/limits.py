"""What one web chat visitor may take from the hub: open sockets per client address, frames per session.

Both are counted in one hub process; several processes each apply their own limits.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Container

__all__ = ["AddressSlots", "FrameBudgets"]


class AddressSlots:
    """Open sockets per client address, at most `limit` each."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()

    def take(self, address: str) -> bool:
        """Count one more socket from `address`; False (and nothing counted) when it holds `limit` already."""
        if self._open[address] >= self.limit:
            return False
        self._open[address] += 1
        return True

    def release(self, address: str) -> None:
        self._open[address] -= 1
        if self._open[address] <= 0:
            del self._open[address]  # the table holds only addresses with sockets open


class FrameBudgets:
    """A token bucket per key (a session): `burst` frames at once, refilled at `rate` a second."""

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens left, when counted)

    def __len__(self) -> int:
        """How many budgets are remembered (sessions busy lately)."""
        return len(self._buckets)

    def take(self, key: str) -> bool:
        """Spend one frame of `key`'s budget; False when it is spent (then nothing is taken)."""
        now = self._clock()
        tokens = self._tokens(key, now)
        if tokens < 1:
            return False
        self._buckets[key] = (tokens - 1, now)
        return True

    def forget(self, key: str) -> None:
        """Drop `key`'s budget (a socket that closed and will not come back under that key)."""
        self._buckets.pop(key, None)

    def forget_refilled(self, keep: Container[str]) -> None:
        """Drop the buckets that are full again (a new one would be the same), except those in `keep`,
        so the table holds only recently busy sessions."""
        now = self._clock()
        full = [key for key in self._buckets if key not in keep and self._tokens(key, now) >= self.burst]
        for key in full:
            del self._buckets[key]

    def _tokens(self, key: str, now: float) -> float:
        tokens, counted = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - counted) * self.rate)
