"""The connection actor: one per configured connection, turning raw records into canonical envelopes.

A raw record is acknowledged only when every envelope it produced was applied by its conversation
actor, so a crash anywhere before that means redelivery (the envelopes' deterministic ids make the
second pass a no-op). A record that does not decode is parked in the dead-letter stream with the
reason and the original bytes, and terminated: it can be replayed after the codec is fixed.

The actor never waits on a conversation: a record whose conversations have no room (a stuck chat) is
handed back to JetStream for later (`babelhub.actors.admission`), so one chat never holds up the others
of its connection.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import msgspec

from babelhub.actors.admission import Admission, Letter
from babelhub.actors.conversation import ConversationMessage, Inbound, actor_key
from babelhub.actors.runtime import Actor, ActorSystem
from babelhub.codecs.base import HttpRequest
from babelhub.errors import DecodeError
from babelhub.services.context import HubContext
from babelhub.services.deadletters import DeadLetter
from babelhub.services.telemetry import carrier, span

__all__ = ["ConnectionActor", "RawDelivery"]

log = logging.getLogger("babelhub.connection")


class RawDelivery(msgspec.Struct, frozen=True, kw_only=True):
    request: HttpRequest
    subject: str
    seq: int
    ack: Callable[[], Awaitable[None]]
    term: Callable[[], Awaitable[None]]
    retry_later: Callable[[], Awaitable[None]]
    """Hand the record back to JetStream, to be delivered again after a delay."""
    release: Callable[[], Awaitable[None]]
    """Hand the record back to JetStream, to be delivered again now."""
    trace: dict[str, str] = {}


class ConnectionActor(Actor[RawDelivery]):
    def __init__(self, key: str, hub: HubContext, conversations: ActorSystem[ConversationMessage],
                 admission: Admission) -> None:
        super().__init__(key)
        self.hub = hub
        self.conversations = conversations
        self.admission = admission

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
            trace = carrier()
        if not envelopes:
            await delivery.ack()
            return
        remaining = len(envelopes)

        async def one_applied() -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                await delivery.ack()

        async def one_failed(exc: BaseException) -> None:
            await self._park(delivery, f"conversation could not apply it: {exc!r}", stage="apply")
            await one_applied()

        letters: list[Letter[ConversationMessage]] = [
            Letter(actor_key(connection.tenant, envelope.conversation.id), Inbound(envelope, trace), one_applied,
                   one_failed, delivery.release)
            for envelope in envelopes]
        if not self.admission.offer(self.conversations, delivery.seq, letters):
            await delivery.retry_later()  # a conversation of this record is full: try again later
            return
        self.hub.metrics.messages_in.labels(connection.channel).inc(len(envelopes))

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
