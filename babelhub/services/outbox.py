"""Where every processor's outbound envelope enters the hub, whatever carried it (REST, an HTTP reply,
the processor WebSocket, a Redis stream, NATS request/reply).

`Outbox.submit` checks the envelope against the tenant that sent it, gives it its id, and stores it on
the conversation's `out` subject (JetStream), where the conversation actor takes it up like a reply
published on NATS. What it answers is what the sender may rely on: once `submit` returns, the message
is stored and will be sent (or reported `failed`).

* **Filled in**: a JSON object may leave out `kind` (a message), `id`, `tenant` (the sender's), `ts`
  (now) and `direction` (what is submitted here is outbound, whatever it says); a conversation named by
  connection and chat gets its id (`canonical.conversation_id`).
* **Refused** (`Refusal`, with the HTTP status, a code, and the JSON path): what is not an outbound
  message or activity, another tenant's tenant id, an id that is not one KV key token
  (`history.MESSAGE_ID`), a connection the tenant does not have (404, as if it did not exist), a
  conversation id its connection and chat do not derive.
* **Rendered**: a `template` part whose `name` is one of the tenant's stored templates becomes what the
  channel of each connection the message goes to takes (`babelhub.services.rendering`); what cannot be
  rendered (a missing variable, an inactive version) is refused with the path of the part's field.
* **Not forever**: a message `hops` processor round trips deep, past `routing.MAX_HOPS`, is a loop: it
  is refused (508 `loop_detected`) and kept as a dead letter, never silently dropped.
* **Tracked**: a message taken here starts its status history with `accepted`
  (`babelhub.services.history`), so its sender can follow it by id (`GET /v1/messages/{id}`).
* **Once**: an `Idempotency-Key` makes the id (the same key, the same id), and is remembered for a day
  (`IDEMPOTENCY_SECONDS`) in the `<prefix>_idempotency` KV bucket: the same key again answers the first
  id with `duplicate: true` and sends nothing. Without a key, the id (given or made) is the stream's
  dedup key for `hub.dedup_window_seconds`.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Mapping
from typing import Any, NoReturn

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from babelhub import canonical as c
from babelhub.errors import DecodeError, PayloadTooLarge
from babelhub.services.broker import BUCKETS
from babelhub.services.context import HubContext
from babelhub.services.deadletters import DeadLetter
from babelhub.services.history import MESSAGE_ID, MessageHistory, is_message_id
from babelhub.services.ingest import NATS_UNAVAILABLE
from babelhub.services.rendering import HUB_META
from babelhub.services.routing import HOPS_HEADER, MAX_HOPS, ORIGIN_HEADER
from babelhub.services.templates import TemplateError

__all__ = ["IDEMPOTENCY_SECONDS", "MAX_IDEMPOTENCY_KEY", "Accepted", "Outbox", "Refusal"]

log = logging.getLogger("babelhub.outbox")

IDEMPOTENCY_SECONDS = BUCKETS["idempotency"]
MAX_IDEMPOTENCY_KEY = 255
"""Characters of an `Idempotency-Key` (Stripe's limit): a longer one is refused."""


class Refusal(Exception):
    """Why a submitted envelope was not taken: an HTTP status, a machine-readable code, words, and the
    JSON path of what is wrong (empty when it is the whole request)."""

    def __init__(self, status: int, code: str, message: str, path: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.path = path

    def body(self) -> dict[str, Any]:
        """The one error shape of the hub's APIs."""
        return {"error": {"code": self.code, "message": self.message, "path": self.path}}


class Accepted(msgspec.Struct, frozen=True, kw_only=True):
    """What `submit` answers: the message's id, its conversation, and its first status."""

    id: str
    conversation: str
    status: c.State = "accepted"
    duplicate: bool = False
    """The same idempotency key was submitted before: nothing new was stored."""


class _Remembered(msgspec.Struct, frozen=True):
    id: str
    conversation: str


class Outbox:
    def __init__(self, ctx: HubContext, idempotency: KeyValue, history: MessageHistory | None = None) -> None:
        self.ctx = ctx
        self._idempotency = idempotency
        self._history = history

    async def submit(self, tenant: str, body: bytes, *, idempotency_key: str = "", origin: str = "",
                     hops: int = 0) -> Accepted:
        """Check, complete and store one outbound envelope (JSON) of `tenant`. `origin` names the processor
        it comes from and `hops` how many processor round trips led to it (`babelhub.services.routing`).
        Raises `Refusal`; NATS errors when NATS cannot take it now (the sender may try again)."""
        if len(idempotency_key) > MAX_IDEMPOTENCY_KEY or not idempotency_key.isprintable():
            raise Refusal(400, "invalid_idempotency_key",
                          f"an Idempotency-Key is at most {MAX_IDEMPOTENCY_KEY} printable characters")
        key = f"{tenant}.{c.stable_id('idempotency', tenant, idempotency_key)}" if idempotency_key else ""
        if key and (earlier := await self._remembered(key)) is not None:
            return Accepted(id=earlier.id, conversation=earlier.conversation, duplicate=True)
        envelope = await self._rendered(self._checked(tenant, _completed(body, tenant, idempotency_key)))
        if hops > MAX_HOPS:
            await self._stop_loop(envelope, origin, hops)
        stored = await self._store(envelope, origin, hops)
        if key:
            await self._remember(key, _Remembered(envelope.id, envelope.conversation.id))
        if not stored.duplicate:
            await self._track(envelope)
        return stored

    async def _track(self, message: c.Message | c.Activity) -> None:
        """Start the message's history. The message is stored already, so failing here must not tell
        the sender it was not taken (a retry without a key would send it twice): its first status,
        recorded from the statuses stream, starts the history instead."""
        if self._history is None:
            return
        try:
            await self._history.accepted(message.tenant, message.id, message.conversation.id)
        except (*NATS_UNAVAILABLE, RuntimeError) as exc:
            log.warning("message %s is stored, but its history could not be started: %r", message.id, exc)

    def _checked(self, tenant: str, envelope: c.Envelope) -> c.Message | c.Activity:
        if not isinstance(envelope, c.Message | c.Activity):
            raise Refusal(400, "invalid", "processors send messages or activities, not statuses", "$.kind")
        if envelope.tenant != tenant:
            raise Refusal(400, "forbidden_tenant", f"the credential belongs to tenant {tenant!r}", "$.tenant")
        if not is_message_id(envelope.id):
            raise Refusal(400, "invalid", f"an id must match {MESSAGE_ID} (letters, digits, '-' and '_')", "$.id")
        named = envelope.conversation
        if named.connection and not self._owns(tenant, named.connection):
            raise _no_connection(named.connection, "$.conversation.connection")
        if isinstance(envelope, c.Message):
            for index, target in enumerate(envelope.targets):
                if not self._owns(tenant, target.connection):
                    raise _no_connection(target.connection, f"$.targets[{index}].connection")
        chat_named = named.native_id and named.connection
        if chat_named and named.id != c.conversation_id(tenant, named.connection, named.native_id):
            raise Refusal(400, "conversation_mismatch", (
                f"conversation id {named.id!r} is not the one connection {named.connection!r} and chat "
                f"{named.native_id!r} derive"), "$.conversation.id")
        if not named.id:
            raise Refusal(400, "invalid", "name the conversation: its id, or its connection and native_id",
                          "$.conversation")
        return envelope

    async def _rendered(self, envelope: c.Message | c.Activity) -> c.Message | c.Activity:
        """`envelope` with its stored templates rendered (`babelhub.services.rendering`); the hub's own meta
        keys are not an app's to set."""
        if not isinstance(envelope, c.Message):
            return envelope
        if any(key in envelope.meta for key in HUB_META):
            envelope = msgspec.structs.replace(
                envelope, meta={key: value for key, value in envelope.meta.items() if key not in HUB_META})
        renderer = self.ctx.renderer
        if renderer is None or not renderer.pending(envelope):
            return envelope
        try:
            return await renderer.rendered(envelope)
        except TemplateError as exc:
            raise Refusal(exc.status, exc.code, exc.message, exc.path) from None

    async def _stop_loop(self, envelope: c.Message | c.Activity, origin: str, hops: int) -> NoReturn:
        """A message that went through processors more than `MAX_HOPS` times is a loop: kept and reported."""
        error = (f"loop stopped: this message followed {hops} processor round trips (at most {MAX_HOPS}); "
                 f"last from processor {origin or 'unknown'!r}")
        await self.ctx.dead_letters.park(DeadLetter(
            stage="processor", error=error, tenant=envelope.tenant,
            subject=self.ctx.subjects.outbound(envelope.tenant, envelope.conversation.id), body=c.encode(envelope)))
        raise Refusal(508, "loop_detected", error)

    def _owns(self, tenant: str, connection_id: str) -> bool:
        connection = self.ctx.connections.get(connection_id)
        return connection is not None and connection.tenant == tenant

    async def _store(self, envelope: c.Message | c.Activity, origin: str, hops: int) -> Accepted:
        ctx = self.ctx
        subject = ctx.subjects.outbound(envelope.tenant, envelope.conversation.id)
        headers = ctx.publisher.headers(dedup=(envelope.id,))
        if origin:
            headers[ORIGIN_HEADER] = origin[:64]
        if hops:
            headers[HOPS_HEADER] = str(hops)
        try:
            ack = await ctx.publisher.publish(subject, c.encode(envelope), headers=headers)
        except PayloadTooLarge as exc:
            raise Refusal(413, "too_large", str(exc)) from None
        return Accepted(id=envelope.id, conversation=envelope.conversation.id, duplicate=bool(ack.duplicate))

    async def _remembered(self, key: str) -> _Remembered | None:
        try:
            entry = await self._idempotency.get(key)
        except KeyNotFoundError:
            return None
        return msgspec.msgpack.decode(entry.value, type=_Remembered) if entry.value else None

    async def _remember(self, key: str, remembered: _Remembered) -> None:
        """Written after the message is stored: a crash in between leaves the stream's dedup window to
        absorb a retry with the same key (its id is the key's)."""
        # A concurrent submit with the same key may have written it first: the same id either way.
        with contextlib.suppress(KeyWrongLastSequenceError):
            await self._idempotency.create(key, msgspec.msgpack.encode(remembered))


def _no_connection(connection: str, path: str) -> Refusal:
    return Refusal(404, "not_found", f"no connection {connection!r}", path)


def _completed(body: bytes, tenant: str, idempotency_key: str) -> c.Envelope:
    """The envelope `body` describes, with what a sender may leave out filled in (see the module)."""
    try:
        document = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise Refusal(400, "invalid", f"malformed JSON: {exc}", "$") from None
    if not isinstance(document, dict):
        raise Refusal(400, "invalid", "expected an object (a canonical envelope)", "$")
    defaults: Mapping[str, Any] = {
        "kind": "message",
        "tenant": tenant,
        "ts": c.now().isoformat(),
        "id": c.stable_id("idempotency", tenant, idempotency_key) if idempotency_key
        else c.stable_id("submitted", tenant, secrets.token_hex(16)),
    }
    document = {**defaults, **document, "direction": "outbound"}
    conversation = document.get("conversation")
    if isinstance(conversation, dict) and "id" not in conversation:
        connection, chat = conversation.get("connection"), conversation.get("native_id")
        named = isinstance(connection, str) and isinstance(chat, str) and connection and chat
        conversation["id"] = c.conversation_id(tenant, str(connection), str(chat)) if named else ""
    if idempotency_key:
        document["id"] = defaults["id"]  # the key decides the id: a retry cannot store a second message
    try:
        return c.decode(msgspec.json.encode(document))
    except DecodeError as exc:
        raise Refusal(400, "invalid", exc.reason, exc.path) from None
