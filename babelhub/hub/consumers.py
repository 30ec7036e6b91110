"""The hub's JetStream consumers, which feed the actors: raw records to the connection actors (decode),
processors' messages to the conversation actors (send).

Each is a durable push consumer with explicit acks. nats-py runs one callback at a time per
subscription, in stream order, and a callback never waits for an actor: a message whose actor has no
room (or an earlier message of whose key is still out) goes back to the server for later, so one busy
conversation never holds back another. `max_ack_pending` bounds what the server hands out: backpressure.

Both check the subject before anything else: a raw record must name a configured connection of its
tenant, and a processor's message must name a configured tenant and a well-formed conversation id that
its envelope repeats. What fails is kept in the dead-letter stream and never redelivered.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from babelhub import canonical
from babelhub.actors.admission import Admission, Letter, retry_delay
from babelhub.actors.connection import RawDelivery
from babelhub.actors.conversation import ConversationMessage, Outbound, actor_key
from babelhub.actors.runtime import ActorSystem
from babelhub.codecs.base import HttpRequest
from babelhub.errors import DecodeError
from babelhub.services.context import HubContext
from babelhub.services.deadletters import DeadLetter
from babelhub.services.ids import conversation_id_error, is_conversation_id
from babelhub.services.inflight import Held, InFlight

__all__ = ["MAX_ACK_PENDING", "Consumers"]

MAX_ACK_PENDING = 20_000

Handler = Callable[[Msg], Coroutine[Any, Any, None]]


class Consumers:
    def __init__(self, ctx: HubContext, tenants: set[str], ack_wait_seconds: float,
                 decoders: ActorSystem[RawDelivery], conversations: ActorSystem[ConversationMessage]) -> None:
        self.ctx = ctx
        self.tenants = tenants
        self.ack_wait_seconds = ack_wait_seconds
        self._decoders = decoders
        self._conversations = conversations
        self.inflight = InFlight(ack_wait_seconds)
        """What the consumers hold unacknowledged, kept alive while the actors work on it."""
        # Per consumer: which keys have messages handed back to the server, to keep each key's order.
        self._admissions = {"raw": Admission(), "outbound": Admission()}
        self._subscriptions: list[JetStreamContext.PushSubscription] = []

    async def consume(self, stream: str, subject: str, durable: str, handler: Handler) -> None:
        """A durable push consumer with explicit acks on `stream`, filtered to `subject`."""
        config = ConsumerConfig(
            durable_name=durable, filter_subject=subject, ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL, ack_wait=self.ack_wait_seconds,
            max_ack_pending=MAX_ACK_PENDING, flow_control=True, idle_heartbeat=5.0,
        )
        subscription = await self.ctx.js.subscribe(
            subject, durable=durable, stream=self.ctx.subjects.stream_name(stream), cb=handler, manual_ack=True,
            config=config, pending_msgs_limit=MAX_ACK_PENDING, flow_control=True, idle_heartbeat=5.0,
        )
        self._subscriptions.append(subscription)

    async def start(self) -> None:
        """Feed raw records to the decoders (connection actors) and processors' messages to the
        conversation actors."""
        prefix = self.ctx.subjects.prefix
        await self.consume("raw", f"{prefix}.*.raw.>", "decoder", self._on_raw)
        await self.consume("messages", f"{prefix}.*.out.>", "sender", self._on_outbound)

    async def stop(self) -> None:
        """Stop taking messages; what is held unacknowledged is redelivered to the next process."""
        for subscription in self._subscriptions:
            try:
                await subscription.unsubscribe()
            except Exception:  # the connection may be gone already: the server forgets the interest anyway
                continue

    # ------------------------------------------------------------------------------ raw records

    async def _on_raw(self, msg: Msg) -> None:
        """A raw record: hand it to its connection actor (it acks when the envelopes are applied)."""
        tenant, connection_id = self._raw_subject(msg.subject)
        if not connection_id:
            await self._refuse(msg, "decode", f"{msg.subject[:200]!r} names no configured connection of a "
                               "configured tenant", tenant)
            return
        try:
            request = msgspec.msgpack.decode(msg.data, type=HttpRequest)
        except msgspec.DecodeError as exc:
            await self.ctx.dead_letters.park(DeadLetter(stage="decode", error=f"unreadable raw record: {exc}",
                                                        connection=connection_id, subject=msg.subject, body=msg.data))
            await msg.term()
            return
        held = self.inflight.hold(msg)
        delivery = RawDelivery(request=request, subject=msg.subject, seq=held.seq, ack=held.ack, term=held.term,
                               retry_later=functools.partial(_retry_later, held), release=held.nak,
                               trace=dict(msg.headers or {}))
        await self._hand_over(self._decoders, "raw", held, Letter(connection_id, delivery))

    def _raw_subject(self, subject: str) -> tuple[str, str]:
        """The tenant and connection a raw subject names (`<prefix>.<tenant>.raw.<channel>.<connection>`);
        an empty connection when they are not a configured pair."""
        tokens = subject.removeprefix(self.ctx.subjects.prefix + ".").split(".")
        tenant = tokens[0] if tokens[0] in self.tenants else ""
        if len(tokens) != 4 or not tenant:
            return tenant, ""
        connection = self.ctx.connections.get(tokens[3])
        if connection is None or connection.tenant != tenant or connection.channel != tokens[2]:
            return tenant, ""
        return tenant, connection.id

    # ------------------------------------------------------------------------- processors' messages

    async def _on_outbound(self, msg: Msg) -> None:
        """A processor's message: check it names this subject's tenant and conversation, then route it."""
        tokens = msg.subject.removeprefix(self.ctx.subjects.prefix + ".").split(".")
        tenant = tokens[0] if tokens[0] in self.tenants else ""
        if not tenant:
            await self._refuse(msg, "processor", f"{tokens[0][:64]!r} is not a configured tenant")
            return
        conversation = ".".join(tokens[2:])
        if not is_conversation_id(conversation):
            await self._refuse(msg, "processor", conversation_id_error(conversation), tenant)
            return
        try:
            envelope = canonical.decode(msg.data)
            if envelope.tenant != tenant or envelope.conversation.id != conversation:
                raise DecodeError(f"the subject names tenant {tenant!r} and conversation {conversation!r}",
                                  path="$.conversation.id" if envelope.tenant == tenant else "$.tenant")
        except DecodeError as exc:
            await self.ctx.dead_letters.park(DeadLetter(stage="processor", error=exc.reason, path=exc.path,
                                                        tenant=tenant, subject=msg.subject, body=msg.data))
            await msg.term()
            return

        held = self.inflight.hold(msg)

        async def failed(exc: BaseException) -> None:
            await self.ctx.dead_letters.park(DeadLetter(stage="send", error=repr(exc), tenant=tenant,
                                                        subject=msg.subject, body=msg.data))
            await held.term()

        # Keyed by the subject's tenant: naming another tenant's conversation id reaches an empty actor.
        # When JetStream first stored it (the send deadline's start) and where (what comes before it).
        outbound = Outbound(envelope, dict(msg.headers or {}), msg.metadata.timestamp.timestamp(),
                            msg.metadata.sequence.stream)
        await self._hand_over(self._conversations, "outbound", held,
                              Letter(actor_key(tenant, conversation), outbound, held.ack, failed, held.nak))

    # ------------------------------------------------------------------------------------ shared

    async def _refuse(self, msg: Msg, stage: str, error: str, tenant: str = "") -> None:
        """A message whose subject names nothing of ours: kept in the dead-letter stream, never redelivered."""
        await self.ctx.dead_letters.park(DeadLetter(stage=stage, error=error, tenant=tenant, subject=msg.subject,
                                                    body=msg.data))
        await msg.term()

    async def _hand_over(self, system: ActorSystem[Any], consumer: str, held: Held, letter: Letter[Any]) -> None:
        """Queue a consumed message for its actor without waiting: when the actor's mailbox is full (or
        an earlier message of its key is still out), the message goes back to the server for later."""
        if not self._admissions[consumer].offer(system, held.seq, [letter]):
            await _retry_later(held)


async def _retry_later(held: Held) -> None:
    await held.nak(retry_delay(held.deliveries))
