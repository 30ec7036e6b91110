"""Background tasks that come back: a task that ends with an unexpected exception is restarted with
exponential backoff and jitter, and its state is kept for `/readyz`.

A task reports that it works by calling `TaskHealth.ok()` (after a poll that went through, a round of
keep-alives), which also resets its backoff. Until then after a crash it stays `failing: <error type>`.
Only the exception's type is shown and logged with where it was raised — an exception's text can carry
a token-bearing URL. `CancelledError` is never caught: cancelling the task stops it for good.
"""

from __future__ import annotations

import asyncio
import logging
import random
import traceback
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["TaskHealth", "supervise"]

log = logging.getLogger("babelhub.tasks")

RUNNING = "running"


class TaskHealth:
    """What one supervised task last reported: `running`, `starting` or `failing: …`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = "starting"
        self.crashes = 0
        """Crashes since the task last reported that it works."""

    @property
    def failing(self) -> bool:
        return self.state.startswith("failing")

    def ok(self) -> None:
        self.state = RUNNING
        self.crashes = 0

    def crashed(self, exc: BaseException, retry_in: float) -> None:
        self.crashes += 1
        self.state = f"failing: {type(exc).__name__} (restart {self.crashes} in {retry_in:.1f}s)"


async def supervise(health: TaskHealth, run: Callable[[TaskHealth], Coroutine[Any, Any, None]], *,
                    backoff_base: float = 0.5, backoff_max: float = 30.0) -> None:
    """Run `run(health)` until cancelled, restarting it after every unexpected end."""
    while True:
        try:
            await run(health)
            exc: BaseException = RuntimeError("the task returned")
        except asyncio.CancelledError:
            raise
        except Exception as caught:
            exc = caught
        retry_in = random.uniform(0.5, 1.0) * min(backoff_max, backoff_base * 2 ** min(health.crashes, 16))
        health.crashed(exc, retry_in)
        log.error("task %s failed with %s at %s; restarting in %.1fs", health.name, type(exc).__name__,
                  _where(exc), retry_in)
        await asyncio.sleep(retry_in)


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame, to find the fault without printing the exception's text."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
