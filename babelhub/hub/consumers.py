"""The hub's JetStream consumers, which feed the actors: raw records to the connection actors (decode),
decoded envelopes and processors' messages to the conversation actors (apply, send).

Work is split into partitions (`babelhub.services.ownership`): this process consumes only the
partitions it holds, each through two durable push consumers with explicit acks — `raw-<p>` (the raw
records of the connections in partition p) and `conversations-<p>` (the decoded and outbound messages of
its conversations, in one stream order). Taking a partition starts them from the first message not
acknowledged, so what a dead owner held comes again at once, in order (what it had applied is
recognised and skipped); giving one up stops them and the partition's actors.

nats-py runs one callback at a time per subscription, in stream order, and a callback never waits for an
actor: a message whose actor has no room (or an earlier message of whose key is still out) goes back to
the server for later, so one busy conversation never holds back another. `max_ack_pending` bounds what
the server hands out per partition: backpressure.

Every message's subject is checked before anything else: a raw record must name a configured
connection of its tenant, and a message must name a configured tenant and a well-formed conversation
id that its envelope repeats. What fails is kept in the dead-letter stream and never redelivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from babelhub import canonical
from babelhub.actors.admission import Admission, Letter, retry_delay
from babelhub.actors.connection import RawDelivery
from babelhub.actors.conversation import ConversationMessage, Inbound, Outbound, actor_key
from babelhub.actors.runtime import ActorSystem
from babelhub.codecs.base import HttpRequest
from babelhub.errors import DecodeError
from babelhub.services.context import HubContext
from babelhub.services.deadletters import DeadLetter
from babelhub.services.ids import conversation_id_error, is_conversation_id
from babelhub.services.inflight import Held, InFlight

__all__ = ["MAX_ACK_PENDING", "Consumers"]

SETUP_TIMEOUT = 20.0
"""Seconds a JetStream API request made while setting up may take: when several hubs start at once on a
cluster, its meta leader answers slowly, and a start given up for that is a hub that never comes up."""
MAX_ACK_PENDING = 20_000
"""Messages the server hands out unacknowledged at most, over all partitions (each has at least
`PARTITION_ACK_PENDING`)."""
PARTITION_ACK_PENDING = 100
"""(A bound per partition that grows with fewer partitions keeps the total near `MAX_ACK_PENDING`: more
messages out only means more of them turned away by full mailboxes and redelivered.)"""

Handler = Callable[[Msg], Coroutine[Any, Any, None]]
OnLeave = Callable[[int], Awaitable[None]]
Subscription = JetStreamContext.PushSubscription


class Consumers:
    """The `PartitionWork` of a hub process (`Ownership` begins and ends it), and the consumers its
    plug-ins share with the other processes (`consume`)."""

    def __init__(self, ctx: HubContext, tenants: set[str], ack_wait_seconds: float, handover_seconds: float,
                 decoders: ActorSystem[RawDelivery], conversations: ActorSystem[ConversationMessage]) -> None:
        self.ctx = ctx
        self.tenants = tenants
        self.ack_wait_seconds = ack_wait_seconds
        self.handover_seconds = handover_seconds
        """How long a handed-over partition's actors may take to finish what they hold."""
        self._decoders = decoders
        self._conversations = conversations
        self.inflight = InFlight(ack_wait_seconds)
        """What the consumers hold unacknowledged, kept alive while the actors work on it."""
        # Per consumer kind: which keys have messages handed back to the server, to keep each key's order.
        self._admissions = {"raw": Admission(), "conversations": Admission()}
        self._partitions: dict[int, list[Subscription]] = {}
        self._shared: list[Subscription] = []
        self._followers: list[_Follower] = []

    # ------------------------------------------------------------------------------- partitions

    async def take(self, partition: int) -> None:
        """Begin consuming `partition` (both of its consumers or neither)."""
        prefix, opened = self.ctx.subjects.prefix, []
        self._admissions["raw"].forget(functools.partial(self._connection_in, {partition}))
        self._admissions["conversations"].forget(functools.partial(self._conversation_in, {partition}))
        try:
            opened.append(await self._open("raw", f"raw-{partition}", [f"{prefix}.*.raw.{partition}.*.*"],
                                           self._on_raw))
            opened.append(await self._open(
                "messages", f"conversations-{partition}",
                [f"{prefix}.*.conv.{partition}.*", f"{prefix}.*.out.{partition}.*"], self._on_message))
            for follower in self._followers:
                opened.append(await self._open_follower(follower, partition))
        except BaseException:
            await _unsubscribe(opened)
            raise
        self._partitions[partition] = opened

    async def give_up(self, partitions: set[int], *, lost: bool) -> None:
        """Stop consuming `partitions` and stop their actors: at once when the lease is lost (their
        unsaved work is redelivered to the next owner), else letting them finish for a moment."""
        for partition in partitions:
            await _unsubscribe(self._partitions.pop(partition, []))
            for follower in self._followers:
                if follower.on_leave is not None:
                    await follower.on_leave(partition)
        grace = 0.0 if lost else self.handover_seconds
        await asyncio.gather(
            self._conversations.stop_where(functools.partial(self._conversation_in, partitions), grace),
            self._decoders.stop_where(functools.partial(self._connection_in, partitions), grace))

    def _conversation_in(self, partitions: set[int], key: str) -> bool:
        tenant, _, conversation = key.partition(".")
        return self.ctx.subjects.partition(tenant, conversation) in partitions

    def _connection_in(self, partitions: set[int], key: str) -> bool:
        connection = self.ctx.connections.get(key)
        return connection is None or self.ctx.subjects.partition(connection.tenant, key) in partitions

    async def _open(self, role: str, durable: str, filters: list[str], handler: Handler,
                    after: int = 0) -> Subscription:
        """Bind to the durable consumer `durable`, made or remade so that it delivers to this process
        from its first unacknowledged message. A previous owner's deliveries in flight are not waited for
        (its ack wait): the consumer is made afresh from its acknowledged floor. A new one starts after
        stream sequence `after` (0: from the start)."""
        js, stream = self.ctx.js, self.ctx.subjects.stream_name(role)
        per_partition = max(PARTITION_ACK_PENDING, MAX_ACK_PENDING // self.ctx.subjects.partitions)
        config = self._config(durable, per_partition, filter_subjects=filters, deliver_policy=DeliverPolicy.ALL)
        try:
            info = await js.consumer_info(stream, durable)
        except NotFoundError:
            info = None
        if info is not None:
            await js.delete_consumer(stream, durable)
            after = info.ack_floor.stream_seq if info.ack_floor is not None else 0
        if after:
            config.deliver_policy, config.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, after + 1
        await js.add_consumer(stream, config)
        # The client's own queue never drops (that would break order until `ack_wait` redelivers): the
        # server's `max_ack_pending` is the bound.
        return await js.subscribe_bind(stream, config, durable, cb=handler, manual_ack=True,
                                       pending_msgs_limit=MAX_ACK_PENDING)

    def _config(self, durable: str, max_ack_pending: int, **settings: Any) -> ConsumerConfig:
        return ConsumerConfig(
            # A subject of its own each time: a previous owner still subscribed to the old one gets nothing.
            durable_name=durable, deliver_subject=f"_HUB.{self.ctx.subjects.prefix}.{durable}.{secrets.token_hex(8)}",
            ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait_seconds, max_ack_pending=max_ack_pending,
            flow_control=True, idle_heartbeat=5.0, **settings)

    # ------------------------------------------------------------------------------- followers

    async def follow(self, stream: str, subject: str, durable: str, handler: Handler, *,
                     on_leave: OnLeave | None = None) -> None:
        """Consume `subject` (`<prefix>.<tenant>.<kind>.>` of `stream`) partition by partition, where this
        process holds them: one durable consumer `<durable>-<partition>` each, opened with the partition's
        own consumers and stopped with them (then `on_leave(partition)`: what the follower still holds of
        it goes back). So each conversation's messages are handled by one process at a time, in their
        order, and what a process that died held comes again to the next owner."""
        prefix, tenant, kind, _ = subject.split(".", 3)
        # A consumer of all partitions by this name (the processor had a transport that shares one) is
        # retired; partitions' consumers made for the first time start where it stood.
        after = await _retire(self.ctx.js, self.ctx.subjects.stream_name(stream), durable)
        follower = _Follower(stream, f"{prefix}.{tenant}.{kind}.{{partition}}.>", durable, handler, on_leave, after)
        self._followers.append(follower)
        for partition in list(self._partitions):
            self._partitions[partition].append(await self._open_follower(follower, partition))

    async def _open_follower(self, follower: _Follower, partition: int) -> Subscription:
        return await self._open(follower.stream, f"{follower.durable}-{partition}",
                                [follower.subject.format(partition=partition)], follower.handler, follower.after)

    # ------------------------------------------------------------------------------- shared

    async def consume(self, stream: str, subject: str, durable: str, handler: Handler) -> None:
        """A durable push consumer with explicit acks on `stream`, filtered to `subject`, shared by every
        hub process that consumes it (a queue group: each message goes to one of them)."""
        js, name = self.ctx.js, self.ctx.subjects.stream_name(stream)
        config = self._config(durable, MAX_ACK_PENDING, filter_subject=subject, deliver_policy=DeliverPolicy.ALL,
                              deliver_group=durable)
        # Made while the hub starts, when a cluster's meta leader may be busy with other hubs' streams.
        try:
            info = await js.consumer_info(name, durable, timeout=SETUP_TIMEOUT)
        except NotFoundError:
            await js.add_consumer(name, config, timeout=SETUP_TIMEOUT)
        else:
            if info.config.deliver_group != durable:  # made by a hub that served it alone: shared from now on
                await js.add_consumer(name, dataclasses.replace(info.config, deliver_group=durable,
                                                                deliver_subject=config.deliver_subject),
                                      timeout=SETUP_TIMEOUT)
            config = (await js.consumer_info(name, durable, timeout=SETUP_TIMEOUT)).config
        self._shared.append(await js.subscribe_bind(name, config, durable, cb=handler, manual_ack=True,
                                                    pending_msgs_limit=MAX_ACK_PENDING))

    async def stop(self) -> None:
        """Stop taking messages; what is held unacknowledged is redelivered to the next owner."""
        await _unsubscribe(self._shared)
        for partition in list(self._partitions):
            await _unsubscribe(self._partitions.pop(partition))

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
                               trace=dict(msg.headers or {}))
        # Handed back (its actor stopped before it was done with it): delivered again now.
        await self._hand_over(self._decoders, "raw", held, Letter(connection_id, delivery, on_released=held.nak))

    def _raw_subject(self, subject: str) -> tuple[str, str]:
        """The tenant and connection a stored raw subject names
        (`<prefix>.<tenant>.raw.<partition>.<channel>.<connection>`); an empty connection when they are
        not a configured pair."""
        tokens = subject.removeprefix(self.ctx.subjects.prefix + ".").split(".")
        tenant = tokens[0] if tokens[0] in self.tenants else ""
        if len(tokens) != 5 or not tenant:
            return tenant, ""
        connection = self.ctx.connections.get(tokens[4])
        if connection is None or connection.tenant != tenant or connection.channel != tokens[3]:
            return tenant, ""
        return tenant, connection.id

    # ------------------------------------------------------------------------ conversations' messages

    async def _on_message(self, msg: Msg) -> None:
        """A decoded envelope (`conv`) or a processor's message (`out`): check it names this subject's
        tenant and conversation, then hand it to the conversation's actor."""
        tokens = msg.subject.removeprefix(self.ctx.subjects.prefix + ".").split(".")
        stage = "processor" if tokens[1:2] == ["out"] else "apply"
        tenant = tokens[0] if tokens[0] in self.tenants else ""
        if not tenant:
            await self._refuse(msg, stage, f"{tokens[0][:64]!r} is not a configured tenant")
            return
        conversation = ".".join(tokens[3:])
        if not is_conversation_id(conversation):
            await self._refuse(msg, stage, conversation_id_error(conversation), tenant)
            return
        try:
            envelope = canonical.decode(msg.data)
            if envelope.tenant != tenant or envelope.conversation.id != conversation:
                raise DecodeError(f"the subject names tenant {tenant!r} and conversation {conversation!r}",
                                  path="$.conversation.id" if envelope.tenant == tenant else "$.tenant")
        except DecodeError as exc:
            await self.ctx.dead_letters.park(DeadLetter(stage=stage, error=exc.reason, path=exc.path,
                                                        tenant=tenant, subject=msg.subject, body=msg.data))
            await msg.term()
            return

        held = self.inflight.hold(msg)

        async def failed(exc: BaseException) -> None:
            await self.ctx.dead_letters.park(DeadLetter(stage="send" if stage == "processor" else stage,
                                                        error=repr(exc), tenant=tenant, subject=msg.subject,
                                                        body=msg.data))
            await held.term()

        trace = dict(msg.headers or {})
        # When JetStream first stored it (what an earlier activation may have applied; for a send, its
        # deadline's start) and where (what comes before it).
        metadata = msg.metadata
        message: ConversationMessage
        if stage == "apply":
            message = Inbound(envelope, trace, metadata.timestamp.timestamp())
        else:
            message = Outbound(envelope, trace, metadata.timestamp.timestamp(), metadata.sequence.stream)
        # Keyed by the subject's tenant: naming another tenant's conversation id reaches an empty actor.
        await self._hand_over(self._conversations, "conversations", held,
                              Letter(actor_key(tenant, conversation), message, held.ack, failed, held.nak))

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


@dataclasses.dataclass(frozen=True)
class _Follower:
    stream: str
    subject: str
    """The stored subject, with `{partition}` where the partition goes."""
    durable: str
    handler: Handler
    on_leave: OnLeave | None
    after: int
    """Where a partition's consumer made for the first time starts (the retired shared consumer's floor)."""


async def _retire(js: JetStreamContext, stream: str, durable: str) -> int:
    """Delete the consumer `durable` if there is one; its acknowledged floor (0: none)."""
    try:
        info = await js.consumer_info(stream, durable)
    except NotFoundError:
        return 0
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(stream, durable)
    return info.ack_floor.stream_seq if info.ack_floor is not None else 0


async def _retry_later(held: Held) -> None:
    await held.nak(retry_delay(held.deliveries))


async def _unsubscribe(subscriptions: list[Subscription]) -> None:
    for subscription in subscriptions:
        try:
            await subscription.unsubscribe()
        except Exception:  # the connection may be gone already: the server forgets the interest anyway
            continue
