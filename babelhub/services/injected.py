"""Canonical envelopes injected by other services (NATS `inject`, Redis streams) for one connection.

An injected envelope enters the hub like a channel's delivery: it is checked here, recorded as a raw
record that only `Ingest.record_canonical` can mark as canonical, and checked again here when the
connection actor decodes that record. Checking twice costs little and means a record stored before a
rule existed still meets it.

The hub owns the header fields that say where an envelope belongs: the tenant and connection are the
ones it was injected for (an envelope naming another is refused), the conversation's id is derived from
the connection and the native chat id (`canonical.conversation_id`), and the envelope's id from its
native id, or its own `id` when it has none (`canonical.message_id`), so that the same injection
retried yields the same envelope and is recorded once.
"""

from __future__ import annotations

import re
from typing import Final

import msgspec

from babelhub import canonical as c
from babelhub.errors import DecodeError

__all__ = ["MAX_ID_CHARS", "dedup_key", "read_injected"]

MAX_ID_CHARS: Final = 256
"""Longest id an injected envelope may carry (its `id`, native id, native chat id, sender's native id)."""

_WELL_FORMED: Final = re.compile(rf"[^\x00-\x1f\x7f]{{1,{MAX_ID_CHARS}}}")
"""Ids become dedup keys, KV keys (hashed) and the `to` of replies: text without control characters."""


def read_injected(data: bytes, tenant: str, connection: str, channel: str, seq: int = 0) -> c.Envelope:
    """The inbound envelope `data` (canonical JSON) as the hub keeps it for `connection` of `tenant`;
    `DecodeError` with the JSON path of the first thing that is wrong."""
    envelope = c.decode(data)
    if envelope.tenant != tenant:
        raise DecodeError(f"the envelope names tenant {envelope.tenant[:64]!r}; it was injected for {tenant!r}",
                          path="$.tenant")
    if isinstance(envelope, c.Status):
        raise DecodeError("only messages and activities can be injected, not statuses", path="$.kind")
    if envelope.direction != "inbound":
        raise DecodeError("an injected envelope is inbound", path="$.direction")
    if isinstance(envelope, c.Message) and envelope.targets:
        raise DecodeError("targets are for outbound messages", path="$.targets")
    conversation = _conversation(envelope.conversation, tenant, connection, channel)
    key = dedup_key(envelope)
    native = envelope.native or c.Native()
    return msgspec.structs.replace(
        envelope, id=c.message_id(tenant, connection, key), conversation=conversation,
        # (`native.id` stays as given: it is the channel's own message id, which replies refer to.)
        native=msgspec.structs.replace(native, seq=seq),
        sender=_sender(envelope.sender, tenant, connection))


def dedup_key(envelope: c.Envelope) -> str:
    """What makes two injections the same one: the native id when there is one, else the envelope's id."""
    native_id = envelope.native.id if envelope.native is not None else ""
    if native_id:
        _check_id(native_id, "$.native.id")
        return native_id
    _check_id(envelope.id, "$.id")
    return envelope.id


def _conversation(given: c.Conversation, tenant: str, connection: str, channel: str) -> c.Conversation:
    _check_id(given.native_id, "$.conversation.native_id")
    if given.connection not in ("", connection):
        raise DecodeError(f"the envelope names connection {given.connection[:64]!r}; it was injected for "
                          f"{connection!r}", path="$.conversation.connection")
    if given.channel not in ("", channel):
        raise DecodeError(f"connection {connection!r} is a {channel} connection", path="$.conversation.channel")
    derived = c.conversation_id(tenant, connection, given.native_id)
    if given.id not in ("", derived):
        raise DecodeError(f"the conversation of native chat {given.native_id[:64]!r} on {connection!r} is "
                          f"{derived!r} (canonical.conversation_id); leave it empty to have it filled in",
                          path="$.conversation.id")
    return msgspec.structs.replace(given, id=derived, connection=connection, channel=channel)


def _sender(sender: c.Sender | None, tenant: str, connection: str) -> c.Sender | None:
    if sender is None or not sender.native_id:
        return sender
    _check_id(sender.native_id, "$.sender.native_id")
    derived = c.sender_id(tenant, connection, sender.native_id)
    if sender.id not in ("", derived):
        raise DecodeError(f"the sender {sender.native_id[:64]!r} on {connection!r} is {derived!r} "
                          "(canonical.sender_id); leave it empty to have it filled in", path="$.sender.id")
    return msgspec.structs.replace(sender, id=derived)


def _check_id(value: str, path: str) -> None:
    if _WELL_FORMED.fullmatch(value) is None:
        problem = "is empty" if not value else (f"is longer than {MAX_ID_CHARS} characters" if len(value) > MAX_ID_CHARS
                                                else "holds control characters")
        raise DecodeError(f"the id {problem}", path=path)
