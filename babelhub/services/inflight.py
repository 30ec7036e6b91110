"""Keeping JetStream from redelivering what the hub is still working on — and letting go of what it cannot.

A message the hub took is acknowledged only once its effect is recorded, which can take longer than
the consumer's `ack_wait`: it waits in a busy conversation's mailbox, for the connection's pacer, or
out a channel's Retry-After. JetStream would then deliver it again. The copy would be recognised and
skipped, but it still costs a turn and a place in a bounded mailbox. So every message the hub holds is
registered here, and the server is told that each one held for a third of `ack_wait` is still in
progress (`+WPI`); most are settled sooner and cost no such message. After a crash nothing tells it
so, and the messages come back `ack_wait` after their last sign of life.

A hold ends with the first settlement — `ack`, `term`, or `nak` (hand it back for redelivery, now or
after a delay) — and later ones are ignored: a record whose envelopes were handed back after one of them
could not be saved must not be acknowledged by another that could.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import nats.errors
from nats.aio.msg import Msg

from babelhub.services.supervise import TaskHealth

__all__ = ["Held", "InFlight"]

log = logging.getLogger("babelhub.inflight")


class Held:
    """One delivery the hub holds; settle it once with `ack`, `term` or `nak`."""

    def __init__(self, owner: InFlight, msg: Msg) -> None:
        self._owner = owner
        self.msg = msg

    @property
    def deliveries(self) -> int:
        """How many times JetStream delivered this message (1 the first time)."""
        return int(self.msg.metadata.num_delivered or 1)

    @property
    def seq(self) -> int:
        """The message's stream sequence: the same on every redelivery."""
        return int(self.msg.metadata.sequence.stream)

    async def ack(self) -> None:
        if self._owner._release(self.msg):
            await self.msg.ack()

    async def term(self) -> None:
        if self._owner._release(self.msg):
            await self.msg.term()

    async def nak(self, delay: float = 0.0) -> None:
        """Give the message back: JetStream redelivers it (after `delay` seconds)."""
        if self._owner._release(self.msg):
            await self.msg.nak(delay=delay or None)


class InFlight:
    def __init__(self, ack_wait: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = ack_wait / 3
        """A held message is told "in progress" once it has gone this long without a sign of life."""
        self._clock = clock
        # By reply subject (one per delivery; Msg is not hashable): the message and its last sign of life,
        # oldest first, so a look stops at the first one that is still fresh.
        self._held: dict[str, tuple[Msg, float]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, msg: Msg) -> Held:
        """Register `msg` and keep it alive until it is settled."""
        self._held[msg.reply] = (msg, self._clock())
        return Held(self, msg)

    def _release(self, msg: Msg) -> bool:
        """End the hold; False when it had already ended (the message is settled once)."""
        return self._held.pop(msg.reply, None) is not None

    async def keep_alive(self, health: TaskHealth | None = None) -> None:
        """Run until cancelled: every half `interval`, tell the server that each message held for
        `interval` since its delivery (or its last extension) is in progress. Its ack deadline then never
        comes nearer than half an ack wait; a message settled within `interval`, as most are, costs no
        extension at all."""
        while True:
            if health is not None:
                health.ok()
            await asyncio.sleep(self.interval / 2)
            await self.extend_due()

    async def extend_due(self) -> None:
        """Tell the server that each message held for `interval` or more is in progress."""
        due = self._clock() - self.interval
        stale = []
        for reply, (msg, since) in self._held.items():
            if since > due:
                break
            stale.append((reply, msg))
        for reply, msg in stale:
            if self._held.pop(reply, None) is None:  # settled while an earlier one was being extended
                continue
            self._held[reply] = (msg, self._clock())  # to the end: held ones stay ordered by last sign of life
            try:
                await msg.in_progress()
            except nats.errors.Error as exc:  # connection trouble: redelivery is the fallback anyway
                log.warning("could not extend the ack deadline of %s: %r", msg.subject, exc)
