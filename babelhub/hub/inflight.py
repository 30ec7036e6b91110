"""Keeping JetStream from redelivering what the hub is still working on.

A message the hub took is acknowledged only once its effect is recorded, which can take longer than
the consumer's `ack_wait`: it waits in a busy conversation's mailbox, for the connection's pacer, or
out a channel's Retry-After. JetStream would then deliver it again. The copy would be recognised and
skipped, but it still costs a turn and a place in a bounded mailbox. So every message the hub holds is
registered here, and every third of `ack_wait` the server is told that each one is still in progress
(`+WPI`). After a crash nothing tells it so, and the messages come back `ack_wait` after their last
sign of life.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.msg import Msg

__all__ = ["InFlight"]

log = logging.getLogger("babelhub.inflight")

Settle = Callable[[], Awaitable[None]]


class InFlight:
    def __init__(self, ack_wait: float) -> None:
        self.interval = ack_wait / 3
        self._held: dict[str, Msg] = {}  # by reply subject: one per delivery (Msg is not hashable)

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, msg: Msg) -> tuple[Settle, Settle]:
        """Register `msg`; its `ack` and `term`, which also end the hold."""
        self._held[msg.reply] = msg

        async def ack() -> None:
            self._held.pop(msg.reply, None)
            await msg.ack()

        async def term() -> None:
            self._held.pop(msg.reply, None)
            await msg.term()

        return ack, term

    async def keep_alive(self) -> None:
        """Run until cancelled: every `interval`, tell the server each held message is in progress."""
        while True:
            await asyncio.sleep(self.interval)
            for reply, msg in list(self._held.items()):
                if reply not in self._held:  # settled while an earlier one was being extended
                    continue
                try:
                    await msg.in_progress()
                except nats.errors.Error as exc:  # connection trouble: redelivery is the fallback anyway
                    log.warning("could not extend the ack deadline of %s: %r", msg.subject, exc)
