"""The connection actor: one per connection whose partition this process owns, turning its raw records,
in order, into canonical envelopes.

Each envelope is stored on its conversation's `conv` subject (`Subjects.decoded`), from where the
owner of the conversation's partition — this process or another — applies it. A raw record is
acknowledged only when all of its envelopes are stored, so a crash before that means redelivery; the
envelopes' deterministic ids make the second pass a no-op (JetStream's dedup window, then the
conversation's memory of what it applied). A record that does not decode is parked in the dead-letter
stream with the reason and the original bytes, and terminated: it can be replayed after the codec is
fixed. The actor never waits on a conversation, so one stuck chat never holds up its connection.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable

import msgspec

from babelhub import canonical as c
from babelhub.actors.runtime import Actor
from babelhub.codecs.base import HttpRequest
from babelhub.errors import DecodeError, PayloadTooLarge
from babelhub.services.context import HubContext
from babelhub.services.deadletters import DeadLetter
from babelhub.services.ingest import NATS_UNAVAILABLE
from babelhub.services.telemetry import span

__all__ = ["ConnectionActor", "RawDelivery"]

log = logging.getLogger("babelhub.connection")

_MAX_PAUSE = 5.0
"""Longest pause between two tries to store a record's envelopes while NATS cannot take them."""


class RawDelivery(msgspec.Struct, frozen=True, kw_only=True):
    request: HttpRequest
    subject: str
    seq: int
    ack: Callable[[], Awaitable[None]]
    term: Callable[[], Awaitable[None]]
    trace: dict[str, str] = {}


class ConnectionActor(Actor[RawDelivery]):
    def __init__(self, key: str, hub: HubContext) -> None:
        super().__init__(key)
        self.hub = hub

    async def receive(self, delivery: RawDelivery) -> None:
        connection = self.hub.connections.get(self.key)
        if connection is None:
            await self._park(delivery, "no such connection is configured any more")
            return
        with span("decode", delivery.trace, connection=self.key, channel=connection.channel):
            try:
                envelopes = connection.decode(delivery.request, delivery.seq)
            except DecodeError as exc:
                await self._park(delivery, exc.reason, exc.path)
                return
            except Exception as exc:  # a codec bug must cost one record (kept), never the actor
                log.exception("%s: codec failed on raw record %d", self.key, delivery.seq)
                await self._park(delivery, f"codec error: {exc!r}")
                return
            try:
                await self._hand_on_all(envelopes, delivery.seq)
            except PayloadTooLarge as exc:
                await self._park(delivery, str(exc))
                return
        await delivery.ack()
        self.hub.metrics.messages_in.labels(connection.channel).inc(len(envelopes))

    async def _hand_on_all(self, envelopes: list[c.Envelope], seq: int) -> None:
        """Store every envelope of a record, trying again while NATS cannot take them: the connection's
        later records wait meanwhile (in this actor's mailbox, kept alive), so none overtakes this one."""
        for attempt in itertools.count():
            try:
                await asyncio.gather(*(self._hand_on(envelope) for envelope in envelopes))
                return
            except NATS_UNAVAILABLE as exc:
                log.warning("%s: raw record %d waits for NATS: %r", self.key, seq, exc)
                await asyncio.sleep(min(_MAX_PAUSE, 0.1 * 2**attempt))

    async def _hand_on(self, envelope: c.Envelope) -> None:
        """Store a decoded envelope for its conversation's owner (whichever process that is)."""
        subject = self.hub.subjects.decoded(envelope.tenant, envelope.conversation.id)
        await self.hub.publisher.publish(subject, c.encode(envelope), dedup=("decoded", envelope.id))

    async def _park(self, delivery: RawDelivery, error: str, path: str = "", stage: str = "decode") -> None:
        connection = self.hub.connections.get(self.key)
        if connection is not None and stage == "decode":
            self.hub.metrics.decode_failures.labels(connection.channel).inc()
        await self.hub.dead_letters.park(DeadLetter(
            stage=stage, error=error, path=path, tenant=connection.tenant if connection else "",
            connection=self.key, subject=delivery.subject, headers=delivery.request.headers,
            body=delivery.request.body))
        if stage == "decode":
            await delivery.term()
