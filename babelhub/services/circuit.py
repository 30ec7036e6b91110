"""A connection's circuit breaker: while a channel is down, one probe at a time and everyone else waits.

Without it, every conversation would retry on its own during an outage, each message using up its
attempts and then failing. With it, the first retryable failure (5xx, 429, a network error, a timeout)
*opens* the connection's circuit, and its calls wait instead of failing:

* **closed**: calls go straight through.
* **open**: calls wait until `open_until`.
* **half-open**: the first caller after `open_until` is the *probe*; the others wait for its outcome.
  The channel answering (a success, or a definite refusal such as a 4xx) closes the circuit and every
  waiting call goes; another retryable failure opens it again for twice as long, up to `max_delay`
  (or for the channel's Retry-After when that is longer).

Each call waits only until its own deadline: `admit` says "too late" rather than wait past it. The
callers are conversation actors, so a conversation's messages keep their order while they wait.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from typing import Literal

__all__ = ["Circuit", "Pass"]

State = Literal["closed", "open", "half_open"]


class Pass(enum.Enum):
    """How `admit` let a call through."""

    CALL = "call"
    """The circuit is closed."""
    PROBE = "probe"
    """The one call that tests a channel that failed; its outcome decides for everyone."""


class Circuit:
    def __init__(self, *, base_delay: float = 0.5, max_delay: float = 30.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """`base_delay`: the first pause after a failure, doubled after each failed probe up to
        `max_delay`. `clock` and `sleep` are the event loop's unless a test runs on time of its own."""
        if not 0 < base_delay <= max_delay:
            raise ValueError(f"need 0 < base_delay <= max_delay, not {base_delay} and {max_delay}")
        self.clock = clock
        self._sleep = sleep
        self._base_delay = base_delay
        self._max_delay = max_delay
        self.state: State = "closed"
        self.open_until = 0.0
        self.failed_probes = 0
        self.probes = 0
        """Probes made so far (for metrics and tests)."""
        self._changed = asyncio.Event()
        self._stopping = False

    # ------------------------------------------------------------------------------------- callers

    async def admit(self, deadline: float | None) -> Pass | None:
        """Wait until a call may go; None when it cannot go before `deadline` (on `clock`'s time).
        A `deadline` of None never waits and never probes: for best-effort calls (typing indicators)."""
        while True:
            if self.state == "closed":
                return Pass.CALL
            if self._stopping:
                raise asyncio.CancelledError("the hub is stopping; the message stays unacknowledged")
            now = self.clock()
            if deadline is None or now >= deadline:
                return None
            if self.state == "open" and now >= self.open_until:
                self.state = "half_open"
                self.probes += 1
                return Pass.PROBE
            wake_at = self.open_until if self.state == "open" else deadline
            await self._wait(min(wake_at, deadline) - now)

    def record(self, admitted: Pass, *, answered: bool, retry_after: float | None = None) -> None:
        """The outcome of a call `admit` let through: `answered` = the channel gave a definite answer
        (success or a refusal); otherwise it failed in a way that may pass (`retry_after` if it said)."""
        if answered:
            self._close()
            return
        if admitted is Pass.PROBE:
            self.failed_probes += 1
            self._open(retry_after)
        elif self.state == "closed":
            self._open(retry_after)
        elif retry_after is not None:
            # A call that was already under way when the circuit opened: it does not count as a probe,
            # but the channel's own word on how long to wait still holds.
            self.open_until = max(self.open_until, self.clock() + retry_after)

    def release(self, admitted: Pass) -> None:
        """A call that ended without an outcome (cancelled): a probe hands its turn to the next caller."""
        if admitted is Pass.PROBE and self.state == "half_open":
            self.state = "open"
            self.open_until = self.clock()
            self._announce()

    def stop(self) -> None:
        """The hub is stopping: calls waiting on an open circuit give up their turn (their messages stay
        unacknowledged and come back to the next process); calls on a closed circuit are not affected."""
        self._stopping = True
        self._announce()

    # ------------------------------------------------------------------------------------ internals

    def _open(self, retry_after: float | None) -> None:
        backoff = min(self._max_delay, self._base_delay * 2**self.failed_probes)
        self.state = "open"
        self.open_until = self.clock() + max(backoff, retry_after or 0.0)
        self._announce()

    def _close(self) -> None:
        if self.state != "closed":
            self.state = "closed"
            self.failed_probes = 0
            self._announce()

    def _announce(self) -> None:
        """Wake every waiting caller to look at the new state."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait(self, seconds: float) -> None:
        """Sleep `seconds`, or less if the state changes meanwhile."""
        changed = asyncio.ensure_future(self._changed.wait())
        slept = asyncio.ensure_future(self._sleep(seconds))
        try:
            await asyncio.wait({changed, slept}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            slept.cancel()
