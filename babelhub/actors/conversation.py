"""The conversation actor: one per conversation, the single writer of its state.

Inbound envelopes (decoded by the connection actors, stored on the conversation's `conv` subject) are
applied in order and handed on to processors on
`<prefix>.<tenant>.in.<conversation>`; statuses go to `…status.<conversation>`. Outbound messages from
processors (`…out.<conversation>`) are sent to the conversation's own chat, or fanned out: a target in
another conversation is re-published on that conversation's `out` subject, so its own actor sends it,
durably and in its order.

State is kept in two parts, so that a checkpoint costs the same whatever the conversation's age. The
snapshot (participants, messaging window, numbered-choice map, the reply API base) has a fixed bound and
is written to JetStream KV with a revision check: a conflict means another owner wrote first, and this
activation stops rather than overwrite it. What each message teaches — which envelopes were applied,
the canonical↔native id map — is written once per fact, as keys of their own that expire by themselves
(`babelhub.actors.memory`). A checkpoint writes the snapshot first, when it changed (`SNAPSHOT_LAG_SECONDS`),
carrying the facts learnt since the previous one, then those facts: a crash in between loses none of them.

Actors and their snapshots are keyed by tenant + conversation (`actor_key`), and an outbound envelope is
applied only when the connections it names belong to its tenant and its conversation id is the one its
connection and native chat id derive: a processor of one tenant never reaches another tenant's chat or
state, whatever ids it writes.
"""

from __future__ import annotations

import functools
import logging
import time
from datetime import UTC, datetime, timedelta
from datetime import time as dt_time
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
import nats.errors
from nats.js.api import RawStreamMsg
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError

from babelhub import canonical as c
from babelhub.actors.memory import MAX_ID_BYTES, Fact, Learnt, Memory
from babelhub.actors.runtime import Actor
from babelhub.codecs.base import REPLY_API_BASE, EncodeContext
from babelhub.codecs.degrade import resolve_choice
from babelhub.codecs.settings import QuietHours, WindowTemplate
from babelhub.errors import DecodeError, PayloadTooLarge
from babelhub.services.connections import ConnectionService, Progress
from babelhub.services.context import HubContext
from babelhub.services.deadletters import DeadLetter
from babelhub.services.failover import (
    FAILOVER,
    FAILOVER_OF_META,
    FAILOVER_TO_META,
    failover_copy,
    failover_error,
    timer_id,
)
from babelhub.services.routing import HOPS_HEADER, MAX_HOPS, hops_of
from babelhub.services.scheduling import HELD_ID_META, Held, released_id
from babelhub.services.telemetry import span
from babelhub.services.templates import TemplateError, for_connection

__all__ = ["MAX_SNAPSHOT_BYTES", "OUTSIDE_WINDOW", "SNAPSHOT_LAG_SECONDS", "TIME_ZONE_META", "URGENT_META",
           "WINDOW_META", "WINDOW_TEMPLATE_META", "ConversationActor", "ConversationState", "Inbound",
           "NotHeld", "Outbound", "SnapshotConflict", "actor_key"]

log = logging.getLogger("babelhub.conversation")

# Conversation state is bounded in bytes, whatever a channel or a processor sends (issue 7 §3):
_MAX_KEY_BYTES = 32
"""Longer participant ids are kept as their hash."""
_MAX_NAME_BYTES = 128
"""Participant names are clipped to this (at a character boundary)."""
_MAX_PARTICIPANTS = 256
"""The most recently heard participants are kept."""
_MAX_CONVERSATION_BYTES = 512
_MAX_API_BASE_BYTES = 512
_MAX_CHOICES_BYTES = 16 * 1024
"""A numbered menu bigger than this keeps its first options (a reply naming a later one arrives as text)."""
_FRESH_SECONDS = 60.0
"""A message younger than this (by its envelope's time) in a new stream message is not looked up in the
conversation's memory (`ConversationActor._may_repeat`): for an inbound one, ingest's dedup window
(`hub.dedup_window_seconds`, 10 minutes by default; keep it above this) has absorbed any retry of it."""
_MAX_JOURNAL = 256
"""Facts a snapshot carries at most (each under 180 bytes: a 24-character digest and an id of at most
`memory.MAX_ID_BYTES`). A checkpoint with more — a catch-up of many earlier messages in one turn — writes
them before the snapshot instead: a crash in between may then lose the snapshot's side of those turns."""
_MAX_TEMPLATE_BYTES = 1024
"""A conversation's window template larger than this is refused (it is kept in the bounded snapshot)."""
OUTSIDE_WINDOW = "outside_window"
WINDOW_TEMPLATE_META = "babelhub.window_template"
"""Message meta naming `{name, language, params}`: the template this conversation sends outside the
channel's messaging window (remembered; overrides the connection's `options.window_template`)."""
URGENT_META = "babelhub.urgent"
"""Message meta `true`: sent at once, whatever the connection's quiet hours."""
TIME_ZONE_META = "babelhub.time_zone"
"""Message meta naming the recipient's IANA time zone (remembered for the conversation), for quiet hours."""
WINDOW_META = "babelhub.window"
"""Meta the hub adds to a message it replaced by a template: why, and by which."""
SNAPSHOT_LAG_SECONDS = 5.0
"""How long the snapshot may be left behind a conversation in full flow. A turn that only moves its
progress marks (`ConversationState.in_seq`, `out_seq`, `last_inbound`) writes its facts, not the
snapshot. The marks only spare reads: a message stored before the activation began is looked up whatever
they say (`ConversationActor._may_repeat`), so after a crash older marks cost a few more reads, never a
message. The snapshot is written when anything else changes, by the first checkpoint this long after
the previous one, and when the actor passivates."""
MAX_SNAPSHOT_BYTES = 128 * 1024
"""The largest snapshot written, whatever the conversation's age. The per-item limits above bound it:
conversation 0.5 KiB + reply API base 0.5 KiB + participants 256 x (24 + 128 bytes + ~6 header) ≈ 40 KiB +
choices 16 KiB + journal 256 x ~180 B ≈ 45 KiB, about 102 KiB; far below NATS's default 1 MiB
`max_payload`, so a checkpoint never fails for size. A conversation with one participant and no menu
writes a few hundred bytes."""


class Inbound(msgspec.Struct, frozen=True):
    envelope: c.Envelope
    trace: dict[str, str] = {}
    stored_at: float | None = None
    """Unix time JetStream first stored the decoded envelope; None = now."""


class Outbound(msgspec.Struct, frozen=True):
    envelope: c.Envelope
    trace: dict[str, str] = {}
    stored_at: float | None = None
    """Unix time JetStream first stored the message (its send deadline counts from there); None = now."""
    seq: int = 0
    """Its sequence in the messages stream; 0 = not known."""


ConversationMessage = Inbound | Outbound


def actor_key(tenant: str, conversation: str) -> str:
    """The key of a conversation's actor and snapshot: one tenant's ids never name another's state.
    Tenant ids cannot hold a dot (config), so the key splits back unambiguously."""
    return f"{tenant}.{conversation}"


class ConversationState(msgspec.Struct, kw_only=True):
    """What a conversation remembers between messages (msgpack in KV; evolves additively)."""

    tenant: str = ""
    conversation: c.Conversation | None = None
    api_base: str = ""
    last_inbound: float = 0.0
    """Unix time of the user's last message, for messaging windows."""
    participants: dict[str, str] = {}
    choices: dict[str, Any] = {}
    out_seq: int | None = None
    """Stream sequence of the latest outbound message taken up; None in snapshots from before it was kept."""
    in_seq: int = 0
    """Raw-record sequence of the latest inbound envelope applied: one at or before it may be a repeat."""
    time_zone: str = ""
    """The recipient's IANA time zone, as the app named it (`TIME_ZONE_META`), for quiet hours."""
    window_template: c.Template | None = None
    """The template the app named for this conversation (`WINDOW_TEMPLATE_META`), sent in place of free-form
    messages outside the channel's messaging window."""
    journal: list[Learnt] = []
    """Facts learnt by the turns this snapshot records, written to their own keys right after it; the next
    activation writes them again in case it did not get that far."""


class _EarlierState(msgspec.Struct, kw_only=True):
    """What snapshots written before the facts had keys of their own kept of them (read once, then moved)."""

    native_ids: dict[str, str] = {}
    aliases: dict[str, str] = {}
    applied: list[str] = []


class SnapshotConflict(RuntimeError):
    """Another owner wrote this conversation's snapshot first: never overwrite it, stop."""

    fatal = True


class NotHeld(RuntimeError):
    """This process no longer holds the conversation's partition: another may be sending for it."""

    fatal = True


class ConversationActor(Actor[ConversationMessage]):
    def __init__(self, key: str, hub: HubContext) -> None:
        super().__init__(key)
        self.tenant, _, self.conversation_id = key.partition(".")
        self.hub = hub
        self.partition = hub.subjects.partition(self.tenant, self.conversation_id)
        self.state = ConversationState()
        self.memory = Memory(hub.snapshots, hub.subjects.bucket("conversations"), hub.publisher, key)
        self._revision: int | None = None
        self._natives: dict[str, str] = {}
        """Native ids learnt for envelopes of the turn under way, recorded when they are applied."""
        self._activated_at = time.time()
        self._dirty = False
        """The snapshot must be written at the next checkpoint."""
        self._moved = False
        """Only the progress marks changed since the snapshot was written (`SNAPSHOT_LAG_SECONDS`)."""
        self._saved_at = time.monotonic()
        self._stored_at: float | None = None  # when the current turn's outbound message was stored
        self._hops = 0
        """The current turn's outbound message's hop count, carried to the copies it fans out to."""
        self._caught_up = False  # the earlier outbound messages were looked for once in this activation
        self._ledger: dict[str, Progress] = {}
        """The send ledger: messages whose channel calls (some or all) succeeded, until the facts that
        count them as applied are written. Kept under its own small key, written after each such call."""
        self._ledger_revision: int | None = None

    # --------------------------------------------------------------------------------- lifecycle

    async def on_activate(self) -> None:
        await self._load_ledger()
        try:
            entry = await self.hub.snapshots.get(self.key)
        except NotFoundError:
            self.state.out_seq = 0  # a new conversation: every outbound message stored for it is still to do
            return
        if entry.value:
            self.state = msgspec.msgpack.decode(entry.value, type=ConversationState)
            self._revision = entry.revision
            self.memory.restore(self.state.journal)
            self._move_earlier_state(msgspec.msgpack.decode(entry.value, type=_EarlierState))

    def _move_earlier_state(self, earlier: _EarlierState) -> None:
        """A snapshot from before the facts had keys of their own: its id maps and applied ids become
        facts (written at the next checkpoint), and the snapshot is rewritten without them."""
        for canonical_id, native_id in earlier.native_ids.items():
            self.memory.put(Fact.THREAD, canonical_id, native_id)  # a lookup falls back to these
        for derived, ours in earlier.aliases.items():
            self.memory.put(Fact.OURS, derived, ours)
        for envelope_id in earlier.applied:
            self.memory.put(Fact.MESSAGE, envelope_id, "")
        self._dirty = self._dirty or bool(earlier.native_ids or earlier.aliases or earlier.applied)

    async def save_snapshot(self, journal: list[Learnt] | None = None) -> None:
        """The first half of a checkpoint: the snapshot, with the facts not written yet (all of them by
        default) as its journal."""
        self.state.journal = self.memory.pending() if journal is None else journal
        data = msgspec.msgpack.encode(self.state)
        try:
            self._revision = await self.hub.publisher.store(self.hub.snapshots, self.key, data, last=self._revision)
        except KeyWrongLastSequenceError as exc:
            raise SnapshotConflict(f"conversation {self.key} was written by another owner") from exc
        self._dirty = self._moved = False
        self._saved_at = time.monotonic()

    async def checkpoint(self) -> None:
        if self._dirty or (self._moved and time.monotonic() - self._saved_at >= SNAPSHOT_LAG_SECONDS):
            journal = self.memory.pending()
            if len(journal) > _MAX_JOURNAL:
                await self.memory.flush()
                journal = []
            await self.save_snapshot(journal)
        await self.memory.flush()
        self.state.journal = []
        for message_id in [m for m in self._ledger if await self._applied(m)]:
            del self._ledger[message_id]  # the saved snapshot keeps it from a resend now

    async def on_passivate(self) -> None:
        """Progress marks the last checkpoint left to lag are written before the activation ends; if
        that fails they only cost reads later."""
        if not self._moved:
            return
        try:
            await self.save_snapshot([])
        except Exception as exc:
            log.warning("conversation %s: its progress marks were not saved: %r", self.key, exc)

    # ----------------------------------------------------------------------------------- turns

    async def receive(self, message: ConversationMessage) -> None:
        envelope = message.envelope
        if await self._applied(envelope.id, look_up=self._may_repeat(message)):
            return
        match message:
            case Inbound():
                with span("conversation.inbound", message.trace, conversation=self.key):
                    await self._inbound(envelope, message.stored_at)
                self._advance_in(_raw_seq(envelope))
            case Outbound():
                await self._take_earlier_outbound(message.seq)
                await self._apply_outbound(message)
        self._mark_applied(envelope.id)

    async def _apply_outbound(self, message: Outbound) -> None:
        self._stored_at = message.stored_at
        if message.seq > (self.state.out_seq or 0):
            self.state.out_seq = message.seq
            self._moved = True
        hops = self._hops = hops_of(message.trace)
        if hops > MAX_HOPS:  # published straight on NATS: the Outbox did not see it
            await self._refuse(message.envelope, c.Error(code="loop_detected", message=(
                f"loop stopped: this message followed {hops} processor round trips (at most {MAX_HOPS})")))
            return
        with span("conversation.outbound", message.trace, conversation=self.key):
            await self._outbound(message.envelope)

    async def _take_earlier_outbound(self, seq: int) -> None:
        """Apply first, in order, this conversation's outbound messages stored before `seq` and not applied
        yet. After a crash, JetStream redelivers what was in flight only once its ack wait has passed, while
        messages stored since come at once: without this, a newer reply would overtake older ones.
        Within one activation messages come in stream order (a full mailbox turns later ones away too, and
        what the hub holds is kept from redelivery), so the stream is read on the first outbound turn only."""
        if self._caught_up or not seq or self.state.out_seq is None:
            return  # done, not from the stream, or a snapshot from before sequences were kept
        subjects = self.hub.subjects
        stream = subjects.stream_name("messages")
        subject = subjects.stored(subjects.outbound(self.tenant, self.conversation_id), self.partition)
        cursor = self.state.out_seq + 1
        while cursor < seq:
            try:
                stored = await self.hub.js.get_msg(stream, seq=cursor, subject=subject, next=True)
            except NotFoundError:
                break
            except nats.errors.Error as exc:  # order is kept on a best-effort basis when NATS is in trouble
                log.warning("conversation %s: could not look for earlier messages: %r", self.key, exc)
                return
            if stored.seq is None or stored.seq >= seq:
                break
            cursor = stored.seq + 1
            earlier = self._stored_outbound(stored)
            if earlier is None or await self._applied(earlier.envelope.id):
                continue
            try:
                await self._apply_outbound(earlier)
            except Exception:  # its own delivery comes later, and is parked if it fails again
                log.exception("conversation %s: an earlier outbound message failed", self.key)
                return
            self._mark_applied(earlier.envelope.id)
        self._caught_up = True

    def _stored_outbound(self, stored: RawStreamMsg) -> Outbound | None:
        """An outbound message read back from the stream, if it is a valid one of this conversation
        (anything else is refused, and parked, when its own delivery comes)."""
        try:
            envelope = c.decode(stored.data or b"")
        except DecodeError:
            return None
        if envelope.tenant != self.tenant or envelope.conversation.id != self.conversation_id:
            return None
        stored_at = stored.time.timestamp() if stored.time is not None else None
        return Outbound(envelope, dict(stored.headers or {}), stored_at, stored.seq or 0)

    async def _inbound(self, envelope: c.Envelope, stored_at: float | None = None) -> None:
        self._learn(envelope, stored_at)
        match envelope:
            case c.Status():
                status = msgspec.structs.replace(envelope, message_id=await self._status_target(envelope))
                if (not await self._failover_settled(status)
                        and await self._moves_forward(status.message_id, status.state)):
                    await self._publish(self.hub.subjects.status(self.tenant, self.conversation_id), status)
            case c.Message():
                echo = await self._own_echo(envelope)
                if echo:
                    await self._stop_echo(envelope, echo)
                else:
                    resolved = self._resolve(await self._translate(envelope))
                    await self._publish(self.hub.subjects.inbound(self.tenant, self.conversation_id), resolved)
            case c.Activity():
                await self._publish(self.hub.subjects.inbound(self.tenant, self.conversation_id), envelope)
        connection = self._connection()
        if connection is not None:
            await connection.after_inbound(envelope, self._context(connection, {}))

    async def _own_echo(self, message: c.Message) -> str:
        """Why an inbound message is the hub hearing itself, or "": its sender is the account of another of
        the tenant's connections on this channel (`identities`: two connections in one chat), or it is a
        message this conversation sent, echoed back by the channel (what the connection's own account
        wrote otherwise — a person typing in the business app — is handed on as the codec reports it).
        Only what the channel reports its own account sent (direction `outbound`) is looked up: no read per
        user message in full flow, and a receipt kept as a message (it names our native id) is handed on."""
        sender = message.sender
        if sender is not None and sender.native_id:
            for connection in self.hub.connections.values():
                if (connection.tenant == self.tenant and connection.channel == message.conversation.channel
                        and connection.id != message.conversation.connection
                        and sender.native_id in connection.settings.identities):
                    return f"sent by connection {connection.id!r}'s own account ({sender.native_id})"
        native = message.native
        if message.direction != "outbound" or native is None or not native.id:
            return ""
        ours = await self.memory.get(Fact.OURS, c.message_id(self.tenant, message.conversation.connection, native.id))
        return f"the channel's echo of message {ours}, which the hub sent" if ours else ""

    async def _stop_echo(self, message: c.Message, why: str) -> None:
        """An echo of the hub's own message is not handed to processors (two of them, or one and itself,
        would answer each other without end): kept as a dead letter, with the reason, and logged."""
        log.warning("conversation %s: inbound %s not handed to processors: %s", self.key, message.id, why)
        await self.hub.dead_letters.park(DeadLetter(
            stage="loop", error=f"loop stopped: {why}", tenant=self.tenant,
            subject=self.hub.subjects.inbound(self.tenant, self.conversation_id), body=c.encode(message)))

    async def _outbound(self, envelope: c.Envelope) -> None:
        refusal = self._refusal(envelope)
        if refusal is not None:
            await self._refuse(envelope, refusal)
            return
        self._adopt(envelope.tenant, envelope.conversation)
        if isinstance(envelope, c.Message):
            rendered = await self._rendered(envelope)
            if rendered is None:
                return
            envelope = self._as_released(rendered)
            if await self._failover_due(envelope):
                return
            if await self._cancels(envelope) or await self._held(envelope):
                return
        match envelope:
            case c.Message(targets=[]):
                await self._send_here(envelope)
            case c.Message():
                await self._fan_out(envelope)
            case c.Activity():
                connection = self._connection()
                if connection is not None:
                    natives = await self._natives_of(_references(envelope))
                    await connection.send_activity(envelope, self._context(connection, natives))
            case c.Status():
                await self.hub.dead_letters.park(DeadLetter(
                    stage="apply", error="processors send messages or activities, not statuses",
                    tenant=envelope.tenant, body=c.encode(envelope)))

    async def _rendered(self, message: c.Message) -> c.Message | None:
        """`message` with the stored templates it names rendered, when it came straight from an app on NATS
        (the outbox renders what it takes); None when it cannot be: then it is refused, naming the path."""
        renderer = self.hub.renderer
        if renderer is None or not renderer.pending(message):
            return message
        try:
            return await renderer.rendered(message)
        except TemplateError as exc:
            await self._refuse(message, c.Error(code=exc.code, message=f"{exc.path}: {exc.message}"))
            return None

    async def _fan_out(self, message: c.Message) -> None:
        for target in message.targets:
            target_id = c.conversation_id(message.tenant, target.connection, target.to)
            connection = self._own_connection(target.connection)
            if connection is None:
                await self._refuse(message, _forbidden_connection(self.tenant, target.connection))
                continue
            there = c.Conversation(id=target_id, channel=connection.channel, connection=connection.id,
                                   native_id=target.to)
            forwarded = for_connection(msgspec.structs.replace(message, targets=[], conversation=there), connection.id)
            if target_id == self.conversation_id:
                await self._send_here(forwarded)
                continue
            if self.state.conversation is None or connection.id != self.state.conversation.connection:
                forwarded = _without_file_ids(forwarded)
            headers = self.hub.publisher.headers(dedup=(message.id, target_id))
            if self._hops:  # a copy in another chat is the same round trip: a loop through targets is counted
                headers[HOPS_HEADER] = str(self._hops)
            await self.hub.publisher.publish(self.hub.subjects.outbound(message.tenant, target_id),
                                             c.encode(forwarded), headers=headers)

    async def _send_here(self, message: c.Message) -> None:
        connection = self._connection()
        if connection is None or self.state.conversation is None:
            await self._refuse(message, c.Error(
                code="unknown_conversation", message="the conversation has no channel chat to send to yet"))
            return
        natives = await self._natives_of(_references(message))
        message = _without_unknown_references(message, natives)
        windowed = self._within_window(message, connection)
        if isinstance(windowed, c.Error):
            await self._status(message, "failed", error=windowed)
            return
        message = windowed
        if not self.hub.holds(self.partition):
            raise NotHeld(f"conversation {self.key}: its partition is no longer held by this process")
        with span("conversation.send", channel=connection.channel):
            # While the channel fails this waits (the circuit), holding the conversation's later messages
            # back in order; JetStream keeps the unacknowledged message, so a crash means redelivery.
            sent = await connection.send(message, self._context(connection, natives), stored_at=self._stored_at,
                                         progress=self._ledger.get(message.id),
                                         on_progress=functools.partial(self._record_progress, message.id))
        for native_id in sent.native_ids:
            self._natives[message.id] = native_id
            derived = c.message_id(message.tenant, self.state.conversation.connection, native_id)
            self.memory.put(Fact.OURS, derived, message.id)
        if sent.choices:
            self.state.choices = _fitting_choices(sent.choices)
            self._dirty = True
        if sent.ok:
            await self._arm_failover(message, connection)  # first: once `sent` is told, the timer is running
            await self._status(message, "sent", native_id=next(iter(sent.native_ids), ""))
        elif connection.settings.failover is not None and not sent.native_ids:
            await self._fail_over(message, connection, sent.error)
        else:
            await self._status(message, "failed", error=sent.error)

    # -------------------------------------------------------------------------------- failover

    async def _arm_failover(self, message: c.Message, connection: ConnectionService) -> None:
        """A message sent on a connection with a failover: hold a timer (a copy of it, durably) that sends
        it via the other connection unless it is delivered first (`babelhub.services.failover`)."""
        failover, scheduler = connection.settings.failover, self.hub.scheduler
        if failover is None or scheduler is None:
            return
        timer = msgspec.structs.replace(message, id=timer_id(message.id),
                                        meta={**message.meta, FAILOVER_OF_META: message.id})
        await scheduler.hold(timer.id, Held(
            due=self.hub.clock() + failover.after_seconds, tenant=self.tenant, conversation=self.conversation_id,
            partition=self.partition, reason=FAILOVER, envelope=c.encode(timer)))

    async def _failover_due(self, message: c.Message) -> bool:
        """A released failover timer: fail over unless the message got far enough in the meantime.
        False for any other message."""
        original_id = message.meta.get(FAILOVER_OF_META)
        if not isinstance(original_id, str) or message.id != timer_id(original_id):
            return False
        connection = self._own_connection(message.conversation.connection) or self._connection()
        reached = await self.memory.get(Fact.STATE, original_id)
        if connection is None or (reached and not _later_state(reached, "failed")) or reached == "failed":
            log.debug("conversation %s: no failover for %s (%s)", self.key, original_id, reached)
            return True
        meta = {key: value for key, value in message.meta.items() if key != FAILOVER_OF_META}
        await self._fail_over(msgspec.structs.replace(message, id=original_id, meta=meta), connection, None)
        return True

    async def _failover_settled(self, status: c.Status) -> bool:
        """A channel's status of a message with a failover timer: `delivered` (or later) drops the timer; a
        `failed` fails over at once, and is reported by `_fail_over` (True: not published as it came)."""
        scheduler, connection = self.hub.scheduler, self._connection()
        if scheduler is None or connection is None or connection.settings.failover is None or not status.message_id:
            return False
        if status.state in ("delivered", "read", "played"):
            await scheduler.take(self.tenant, timer_id(status.message_id))
            return False
        if status.state != "failed":
            return False
        timer = await scheduler.take(self.tenant, timer_id(status.message_id))
        if timer is None:
            return False
        message = c.decode(timer.envelope)
        if not isinstance(message, c.Message):
            return False
        meta = {key: value for key, value in message.meta.items() if key != FAILOVER_OF_META}
        await self._fail_over(msgspec.structs.replace(message, id=status.message_id, meta=meta), connection,
                              status.error)
        return True

    async def _fail_over(self, message: c.Message, connection: ConnectionService, cause: c.Error | None) -> None:
        """Send a copy of `message` via the connection's failover connection (to the recipient its meta
        names, else the same chat id), through that conversation's own outbound path, then report
        `message` `failed` with code `failover`, naming the copy. Done again after a crash, the copy's
        publish is deduplicated by its derived id."""
        failover = connection.settings.failover
        target = self._own_connection(failover.to) if failover is not None else None
        if failover is None or target is None or self.state.conversation is None:
            await self._status(message, "failed", error=cause)
            return
        named = message.meta.get(FAILOVER_TO_META)
        to = named if isinstance(named, str) and named else self.state.conversation.native_id
        copy = _without_file_ids(failover_copy(message, target.id, target.channel, to))
        await self.hub.publisher.publish(self.hub.subjects.outbound(self.tenant, copy.conversation.id),
                                         c.encode(copy), dedup=(copy.id,))
        log.info("conversation %s: message %s sent again via connection %s as %s", self.key, message.id,
                 target.id, copy.id)
        await self._status(message, "failed", error=failover_error(failover.after_seconds, copy, cause))

    def _as_released(self, message: c.Message) -> c.Message:
        """A held message the scheduler released, under the id the app gave it (its statuses name that
        one); any other message as it is."""
        original = message.meta.get(HELD_ID_META)
        if not isinstance(original, str) or message.id != released_id(original):
            return message
        meta = {key: value for key, value in message.meta.items() if key != HELD_ID_META}
        return msgspec.structs.replace(message, id=original, meta=meta)

    async def _cancels(self, message: c.Message) -> bool:
        """A message made only of `delete` parts naming held messages cancels them (each reported
        `deleted`, `cancelled`), and goes no further."""
        scheduler = self.hub.scheduler
        targets = [part.target for part in message.parts if isinstance(part, c.Delete)]
        if scheduler is None or not targets or len(targets) != len(message.parts):
            return False
        cancelled = [await scheduler.cancel(self.tenant, target) for target in targets]
        return all(cancelled)

    async def _held(self, message: c.Message) -> bool:
        """Hold `message` for later when its `send_at` is ahead, or its connection's quiet hours are on
        (unless it is urgent): stored durably by the scheduler, reported `queued`."""
        scheduler = self.hub.scheduler
        if scheduler is None:
            return False
        now = self.hub.clock()
        due, reason = 0.0, ""
        if message.send_at is not None and message.send_at.timestamp() > now:
            due, reason = message.send_at.timestamp(), "send_at"
        elif message.meta.get(URGENT_META) is not True:
            due, reason = self._quiet_until(message, now), "quiet_hours"
        if not due:
            return False
        await scheduler.hold(message.id, Held(
            due=due, tenant=self.tenant, conversation=self.conversation_id, partition=self.partition,
            reason=reason, envelope=c.encode(message)))
        await self._status(message, "queued")
        return True

    def _quiet_until(self, message: c.Message, now: float) -> float:
        """When the quiet hours of the message's connection end, if `now` is inside them; else 0. They are
        read in the recipient's time zone when the conversation knows it (`TIME_ZONE_META`)."""
        connection = self._own_connection(message.conversation.connection or (
            self.state.conversation.connection if self.state.conversation is not None else ""))
        configured = connection.settings.options.get("quiet_hours") if connection is not None else None
        if configured is None:
            return 0.0
        quiet = msgspec.convert(configured, QuietHours)
        zone = self._recipient_zone(message) or quiet.time_zone
        return quiet_until(quiet.start, quiet.end, ZoneInfo(zone), now)

    def _recipient_zone(self, message: c.Message) -> str:
        """The recipient's IANA time zone, as the app named it in meta (remembered for the conversation)."""
        named = message.meta.get(TIME_ZONE_META)
        if isinstance(named, str) and named != self.state.time_zone and _known_zone(named):
            self.state.time_zone = named
            self._dirty = True
        return self.state.time_zone

    def _within_window(self, message: c.Message, connection: ConnectionService) -> c.Message | c.Error:
        """`message` as it may be sent in the channel's messaging window: as it is while the window is open
        (or the channel has none, or it is all templates); else replaced by the conversation's or the
        connection's window template; else the error it fails with (`outside_window`)."""
        template = self._window_template(message)
        if isinstance(template, c.Error):
            return template
        hours = connection.codec.capabilities.window_hours
        if not hours or not self.state.last_inbound or all(isinstance(part, c.Template) for part in message.parts):
            return message  # no window, or none known: a chat the hub never heard the user in is the channel's call
        closed_at = self.state.last_inbound + hours * 3600
        if self.hub.clock() < closed_at:
            return message
        template = template or _configured_template(connection)
        closed = f"it closed at {datetime.fromtimestamp(closed_at, UTC).isoformat()}"
        if template is None:
            return c.Error(code=OUTSIDE_WINDOW, message=(
                f"{connection.channel} takes free-form messages only within {hours} h of the user's last message; "
                f"{closed}. Send a template part, or configure one: the connection's options.window_template "
                f"= {{name, language, params}}, or meta {WINDOW_TEMPLATE_META!r} on a message of the conversation"))
        meta = {**message.meta, WINDOW_META: {"closed": closed, "replaced_by": template.name}}
        return msgspec.structs.replace(message, parts=[template], meta=meta)

    def _window_template(self, message: c.Message) -> c.Template | c.Error | None:
        """The template the message (or an earlier one of the conversation) named for outside the window;
        a named one is remembered for the conversation. An unreadable one is an error."""
        named = message.meta.get(WINDOW_TEMPLATE_META)
        if named is None:
            return self.state.window_template
        try:
            template = msgspec.convert(named, WindowTemplate)
        except msgspec.ValidationError as exc:
            return c.Error(code="invalid_window_template", message=f"meta {WINDOW_TEMPLATE_META!r}: {exc}")
        chosen = c.Template(name=template.name, language=template.language, params=template.params)
        if len(msgspec.msgpack.encode(chosen)) > _MAX_TEMPLATE_BYTES:
            return c.Error(code="invalid_window_template",
                           message=f"meta {WINDOW_TEMPLATE_META!r}: larger than {_MAX_TEMPLATE_BYTES} bytes")
        if chosen != self.state.window_template:
            self.state.window_template = chosen
            self._dirty = True
        return chosen

    async def _record_progress(self, message_id: str, progress: Progress) -> None:
        """A channel call of `message_id` succeeded: write it down before anything else happens, so a
        crash from here on cannot make the hub send it again. The window left is the channel's call itself
        (the channel took it, the hub died before this line): the request's idempotency key covers it
        where the channel honours one."""
        self._ledger[message_id] = progress
        data = msgspec.msgpack.encode(self._ledger)
        key = self._ledger_key()
        try:
            self._ledger_revision = await self.hub.publisher.store(self.hub.snapshots, key, data,
                                                                   last=self._ledger_revision)
        except KeyWrongLastSequenceError as exc:
            raise SnapshotConflict(f"conversation {self.key}'s sends were recorded by another owner") from exc
        except (nats.errors.Error, PayloadTooLarge) as exc:  # the message may be sent again after a crash
            log.warning("conversation %s: could not record a send: %r", self.key, exc)

    async def _load_ledger(self) -> None:
        try:
            entry = await self.hub.snapshots.get(self._ledger_key())
        except NotFoundError:
            return
        self._ledger_revision = entry.revision
        if entry.value:
            self._ledger = msgspec.msgpack.decode(entry.value, type=dict[str, Progress])

    def _ledger_key(self) -> str:
        return f"{self.key}.sending"

    # ---------------------------------------------------------------------------------- helpers

    def _learn(self, envelope: c.Envelope, stored_at: float | None = None) -> None:
        """Take in what an inbound envelope says about the conversation. The user's last message is
        timed by when the hub stored it (`stored_at`, else now), not by the channel's clock."""
        self._adopt(envelope.tenant, envelope.conversation)
        reply_base = envelope.meta.get(REPLY_API_BASE)
        if (isinstance(reply_base, str) and reply_base != self.state.api_base
                and len(reply_base.encode()) <= _MAX_API_BASE_BYTES):
            self.state.api_base = reply_base
            self._dirty = True
        self._learn_native_id(envelope)
        if envelope.native is not None and envelope.native.thread and envelope.thread:
            self.memory.put(Fact.THREAD, envelope.thread, envelope.native.thread)
        if envelope.sender is not None and envelope.sender.role == "user":
            self._hear(envelope.sender)
            self.state.last_inbound = max(self.state.last_inbound, stored_at or self.hub.clock())
            self._moved = True

    def _advance_in(self, seq: int) -> None:
        if seq > self.state.in_seq:
            self.state.in_seq = seq
            self._moved = True

    def _learn_native_id(self, envelope: c.Envelope) -> None:
        """Note an inbound envelope's own native id, recorded with it when it is applied (a reply to it
        names that id). A status's native id is the message it reports on (one we sent), never its own.
        Native ids lead back to canonical ids only for messages we sent (`Fact.OURS`): an inbound
        envelope that repeats one of those (an edit, a receipt kept as `unsupported`) never takes it."""
        native = envelope.native
        if isinstance(envelope, c.Status) or native is None or not native.id or envelope.direction != "inbound":
            return
        self._natives[envelope.id] = native.id

    async def _status_target(self, status: c.Status) -> str:
        """The app's id of the message a status reports on, when it is one we sent; else the codec's."""
        if not status.native_id:
            return status.message_id
        derived = c.message_id(status.tenant, status.conversation.connection, status.native_id)
        return await self.memory.get(Fact.OURS, derived) or status.message_id

    def _refusal(self, envelope: c.Envelope) -> c.Error | None:
        """Why a processor's envelope may not be applied here, or None. The subject's tenant was checked
        against the envelope's before it reached this actor; what is left is what the envelope names."""
        named = envelope.conversation
        if envelope.tenant != self.tenant:
            return c.Error(code="forbidden_tenant", message=f"this conversation belongs to tenant {self.tenant!r}")
        if named.connection and self._own_connection(named.connection) is None:
            return _forbidden_connection(self.tenant, named.connection)
        if named.native_id and named.id != c.conversation_id(self.tenant, named.connection, named.native_id):
            return c.Error(code="conversation_mismatch", message=(
                f"conversation id {named.id!r} is not the one connection {named.connection!r} and chat "
                f"{named.native_id!r} derive (canonical.conversation_id)"))
        return None

    async def _refuse(self, envelope: c.Envelope, error: c.Error) -> None:
        """Keep what was refused in the dead-letter stream and tell the processor why (`failed`)."""
        await self.hub.dead_letters.park(DeadLetter(
            stage="processor", error=f"{error.code}: {error.message}", tenant=self.tenant,
            subject=self.hub.subjects.outbound(self.tenant, self.conversation_id), body=c.encode(envelope)))
        if isinstance(envelope, c.Message | c.Activity):
            await self._status(envelope, "failed", error=error)

    def _own_connection(self, connection_id: str) -> ConnectionService | None:
        """The connection named, if it is one of this conversation's tenant's (others are invisible)."""
        connection = self.hub.connections.get(connection_id)
        return connection if connection is not None and connection.tenant == self.tenant else None

    def _adopt(self, tenant: str, conversation: c.Conversation) -> None:
        """Remember which chat this conversation is, the first time we are told."""
        if (self.state.conversation is None and conversation.connection and conversation.native_id
                and len(msgspec.msgpack.encode(conversation)) <= _MAX_CONVERSATION_BYTES):
            self.state.tenant = tenant
            self.state.conversation = conversation
            self._dirty = True

    async def _translate(self, message: c.Message) -> c.Message:
        """Ids that point at messages we sent, rewritten to the ids the app gave those messages."""
        aliases = await self.memory.get_many(Fact.OURS, _references(message))
        if not aliases:
            return message
        parts: list[c.Part] = []
        for part in message.parts:
            match part:
                case c.Reaction(target=target) | c.Edit(target=target) | c.Delete(target=target) if target in aliases:
                    part = msgspec.structs.replace(part, target=aliases[target])
                case c.Action(source=source) if source in aliases:
                    part = msgspec.structs.replace(part, source=aliases[source])
            parts.append(part)
        return msgspec.structs.replace(
            message,
            parts=parts,
            reply_to=aliases.get(message.reply_to, message.reply_to),
            thread=aliases.get(message.thread, message.thread),
        )

    def _resolve(self, envelope: c.Message) -> c.Message:
        """A reply "2" (or an option's title) to a numbered menu becomes an `action` part as well."""
        if not self.state.choices:
            return envelope
        texts = [part for part in envelope.parts if isinstance(part, c.Text)]
        if len(texts) != 1 or len(envelope.parts) != 1:
            return envelope
        action = resolve_choice(texts[0].text, self.state.choices)
        if action is None:
            return envelope
        return msgspec.structs.replace(envelope, parts=[*envelope.parts, action])

    async def _natives_of(self, canonical_ids: list[str]) -> dict[str, str]:
        """The native ids known for `canonical_ids`: the messages applied here, else the threads."""
        natives = {key: value for key, value in (await self.memory.get_many(Fact.MESSAGE, canonical_ids)).items()
                   if value}
        missing = [canonical_id for canonical_id in canonical_ids if canonical_id not in natives]
        natives.update(await self.memory.get_many(Fact.THREAD, missing))
        return natives

    def _connection(self) -> ConnectionService | None:
        """This conversation's connection; None until the conversation knows its chat."""
        if self.state.conversation is None:
            return None
        return self._own_connection(self.state.conversation.connection)

    def _context(self, connection: ConnectionService, natives: dict[str, str]) -> EncodeContext:
        """How to encode for this chat; `natives`: the native ids of the canonical ids the envelope names."""
        assert self.state.conversation is not None
        return connection.encode_context(self.state.conversation.native_id, natives, api_base=self.state.api_base)

    def _hear(self, sender: c.Sender) -> None:
        """Remember a participant (most recent last), with a bounded name, among a bounded number."""
        participants = self.state.participants
        key = _short_key(sender.id)
        name = _clip(sender.name, _MAX_NAME_BYTES)
        if participants and next(reversed(participants)) == key and participants[key] == name:
            return  # the one heard last, again: nothing to write
        participants.pop(key, None)
        participants[key] = name
        while len(participants) > _MAX_PARTICIPANTS:
            del participants[next(iter(participants))]
        self._dirty = True

    async def _applied(self, envelope_id: str, look_up: bool = True) -> bool:
        """Whether the envelope was applied here (within `memory.RETENTION`): then it is skipped. Without
        `look_up`, only what this activation learnt or read is asked (no I/O)."""
        if look_up:
            return await self.memory.get(Fact.MESSAGE, envelope_id) is not None
        return self.memory.known(Fact.MESSAGE, envelope_id) is not None

    def _may_repeat(self, message: ConversationMessage) -> bool:
        """Whether `message` may repeat an envelope applied before this activation learnt of it, and must
        be looked up (what this activation applied it knows without a read).

        A message may repeat when it was stored before this activation began (what an earlier one, or a
        process that died, may have applied: the snapshot's progress marks may lag behind it), when its
        stream message is not newer than every one applied here (a JetStream redelivery, or one handed back
        and taken later), or when its envelope is older than `_FRESH_SECONDS` (a channel's retry after
        ingest's dedup window, a poller that reads an update again, an app that publishes an old answer
        again). An outbound envelope made before this activation began may also repeat (an app publishing
        its answer again after the hub restarted). The rest — a conversation in full flow — are new, and
        cost no read. What this leaves out: an app that makes an answer afresh, with the id of one applied
        in an earlier activation, less than a minute after the hub restarted."""
        envelope = message.envelope
        made = envelope.ts.timestamp()
        if made < time.time() - _FRESH_SECONDS:
            return True
        if message.stored_at is not None and message.stored_at < self._activated_at:
            return True
        if isinstance(message, Outbound):
            return (not message.seq or self.state.out_seq is None or message.seq <= self.state.out_seq
                    or made < self._activated_at)
        seq = _raw_seq(envelope)
        return not seq or seq <= self.state.in_seq

    def _mark_applied(self, envelope_id: str) -> None:
        """Record the envelope as applied, with the native id it brought or was sent as, if any."""
        native_id = self._natives.pop(envelope_id, "")
        self.memory.put(Fact.MESSAGE, envelope_id, native_id if len(native_id.encode()) <= MAX_ID_BYTES else "")

    async def _moves_forward(self, message_id: str, state: c.State, look_up: bool = True) -> bool:
        """Whether `state` keeps `message_id`'s delivery moving forward (then it is remembered as reached):
        a `delivered` after `read` is not published; `failed` only before `delivered`. Without `look_up`
        only what this activation knows is asked (the hub's own statuses of a message being applied now:
        no read per message in full flow)."""
        if not message_id:
            return True
        known = self.memory.known(Fact.STATE, message_id)
        reached = await self.memory.get(Fact.STATE, message_id) if look_up and known is None else known
        if reached and not _later_state(reached, state):
            log.debug("conversation %s: status %s after %s for %s not published", self.key, state, reached, message_id)
            return False
        self.memory.put(Fact.STATE, message_id, state)
        return True

    async def _status(self, message: c.Message | c.Activity, state: c.State, native_id: str = "",
                      error: c.Error | None = None) -> None:
        if not await self._moves_forward(message.id, state, look_up=False):
            return
        status = c.Status(
            id=c.stable_id("status", message.id, state),
            tenant=message.tenant,
            conversation=self.state.conversation or message.conversation,
            ts=c.now(),
            direction="outbound",
            message_id=message.id,
            native_id=native_id,
            state=state,
            error=self._masked(error),
        )
        await self._publish(self.hub.subjects.status(self.tenant, self.conversation_id), status)

    def _masked(self, error: c.Error | None) -> c.Error | None:
        """A channel's error (an exception's repr, an echoed URL) never hands a secret to the processor."""
        if error is None or not self.hub.mask:
            return error
        return msgspec.json.decode(self.hub.mask.data(msgspec.json.encode(error)), type=c.Error)

    async def _publish(self, subject: str, envelope: c.Envelope) -> None:
        await self.hub.publisher.publish(subject, c.encode(envelope), dedup=(envelope.id,))


_STATE_ORDER: dict[str, int] = {"accepted": 0, "queued": 1, "sent": 2, "delivered": 3, "read": 4, "played": 5}
"""How far each state of a message's delivery is; `failed` and `deleted` are handled apart."""


def _later_state(reached: str, state: str) -> bool:
    """Whether `state` comes after `reached`, or repeats it (the channel confirming what the hub said): a
    real later failure may follow `sent` (the channel could not deliver), never `delivered`; nothing but
    `deleted` follows `failed`; nothing follows `deleted`."""
    if state == reached:
        return True
    if reached == "deleted":
        return False
    if state == "deleted":
        return True
    if reached == "failed":
        return False
    if state == "failed":
        return _STATE_ORDER.get(reached, 0) < _STATE_ORDER["delivered"]
    return _STATE_ORDER.get(state, 0) > _STATE_ORDER.get(reached, 0)


def quiet_until(start: str, end: str, zone: ZoneInfo, now: float) -> float:
    """When quiet hours from `start` to `end` ("HH:MM", local time in `zone`; over midnight when `end`
    is earlier) end, if Unix time `now` is inside them; else 0."""
    local = datetime.fromtimestamp(now, zone)
    begins, ends = dt_time.fromisoformat(start), dt_time.fromisoformat(end)
    moment = local.time().replace(tzinfo=None)
    inside = begins <= moment < ends if begins < ends else (moment >= begins or moment < ends)
    if begins == ends or not inside:
        return 0.0
    day = local.date() if moment < ends else local.date() + timedelta(days=1)
    return datetime.combine(day, ends, tzinfo=zone).timestamp()


def _known_zone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _configured_template(connection: ConnectionService) -> c.Template | None:
    """The connection's `options.window_template` (checked against `WindowTemplate` when the config was read)."""
    configured = connection.settings.options.get("window_template")
    if configured is None:
        return None
    template = msgspec.convert(configured, WindowTemplate)
    return c.Template(name=template.name, language=template.language, params=template.params)


def _forbidden_connection(tenant: str, connection: str) -> c.Error:
    """The same answer whether the connection is another tenant's or does not exist: nothing leaks."""
    return c.Error(code="forbidden_connection", message=f"tenant {tenant!r} has no connection {connection!r}")


def _without_file_ids(message: c.Message) -> c.Message:
    """A channel's file ids mean nothing to another connection: keep only what can be fetched (url,
    bytes). Media left with neither are then dropped, and recorded, by degradation."""

    def media(item: c.Media) -> c.Media:
        return msgspec.structs.replace(item, file_id="") if item.file_id else item

    def card(item: c.Card) -> c.Card:
        return msgspec.structs.replace(item, media=media(item.media)) if item.media is not None else item

    parts: list[c.Part] = []
    for part in message.parts:
        match part:
            case c.Media():
                part = media(part)
            case c.Card():
                part = card(part)
            case c.Carousel():
                part = msgspec.structs.replace(part, cards=[card(item) for item in part.cards])
        parts.append(part)
    return msgspec.structs.replace(message, parts=parts)


def _raw_seq(envelope: c.Envelope) -> int:
    """The raw record's stream sequence an inbound envelope was decoded from (0: not known)."""
    return envelope.native.seq if envelope.native is not None else 0


def _short_key(item: str) -> str:
    """How an id is kept in bounded state: as it is when short, else its hash."""
    return item if len(item.encode()) <= _MAX_KEY_BYTES else c.stable_id("id", item)


def _references(envelope: c.Envelope) -> list[str]:
    """The canonical message ids an envelope names: the message it answers, its thread, the targets of its
    reactions, edits and deletions, the source of a choice, and the message an activity is about."""
    found = [envelope.reply_to, envelope.thread]
    if isinstance(envelope, c.Message):
        for part in envelope.parts:
            match part:
                case c.Reaction(target=target) | c.Edit(target=target) | c.Delete(target=target):
                    found.append(target)
                case c.Action(source=source):
                    found.append(source)
    elif isinstance(envelope, c.Activity) and isinstance(envelope.detail.get("message_id"), str):
        found.append(envelope.detail["message_id"])
    return [item for item in dict.fromkeys(found) if item]


def _without_unknown_references(message: c.Message, natives: dict[str, str]) -> c.Message:
    """A reply to (or thread of) a message this chat never saw — a fan-out copy from another channel,
    an id the app made up — is sent as a plain message, and the dropped reference is recorded."""
    dropped = {name: value for name, value in (("reply_to", message.reply_to), ("thread", message.thread))
               if value and value not in natives}
    if not dropped:
        return message
    meta = {**message.meta, "babelhub.unknown_references": dropped}
    return msgspec.structs.replace(message, meta=meta, **{name: "" for name in dropped})


def _clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, at a character boundary."""
    return text.encode()[:limit].decode(errors="ignore")


def _fitting_choices(choices: dict[str, Any]) -> dict[str, Any]:
    """The first options of a numbered menu that fit `_MAX_CHOICES_BYTES`."""
    kept: dict[str, Any] = {}
    size = 0
    for number, choice in choices.items():
        size += len(msgspec.msgpack.encode([number, choice]))
        if size > _MAX_CHOICES_BYTES:
            break
        kept[number] = choice
    return kept
