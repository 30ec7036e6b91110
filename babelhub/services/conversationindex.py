"""What the history API knows of each conversation: KV bucket `<prefix>_conversation_index`.

One key per conversation, `<tenant>.<conversation>` (a tenant's keys never name another's), holding its
channel, connection, participants, first and last activity, its last message's text (the preview a
search reads) and how many messages it has. Written by the records keeper (`note`) with a
revision-checked update, retried on a conflict (several hub processes share the keeper's consumer; the
record a process wrote last stands for reading it again, `Revisions`); a message is counted once: the
record keeps the history sequence of the last message it counted.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from babelhub import canonical as c
from babelhub.services.kvscan import current_values
from babelhub.services.publisher import Publisher
from babelhub.services.revisions import REMEMBERED_KEYS, Revisions

__all__ = ["MAX_PARTICIPANTS", "MAX_PREVIEW", "ConversationIndex", "ConversationRecord", "Participant", "preview"]

MAX_PARTICIPANTS: Final = 256
"""Participants kept per conversation; the least recently heard goes first (a huge group stays bounded)."""
MAX_PREVIEW: Final = 280
"""Characters kept of the last message's text."""
_ATTEMPTS: Final = 16


class Participant(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    id: str
    """The person's canonical sender id on this connection (the id of their contact, until linked)."""
    native_id: str = ""
    name: str = ""


class ConversationRecord(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    channel: str = ""
    connection: str = ""
    native_id: str = ""
    type: str = "direct"
    participants: list[Participant] = []
    first_activity: datetime
    last_activity: datetime
    last_inbound: datetime | None = None
    """When the hub stored the user's last message (the messaging window runs from it)."""
    last_message_id: str = ""
    preview: str = ""
    message_count: int = 0
    last_seq: int = 0
    """History sequence of the last message counted: one at or below it was counted already."""


def preview(envelope: c.Envelope) -> str:
    """The text a person would read of `envelope`: its text parts and captions, bounded."""
    if not isinstance(envelope, c.Message):
        return ""
    texts: list[str] = []
    for part in envelope.parts:
        if isinstance(part, c.Text | c.Buttons | c.List):
            texts.append(part.text)
        elif isinstance(part, c.Media):
            texts.append(part.caption)
        elif isinstance(part, c.Template):
            texts.append(part.fallback_text)
    return " ".join(text for text in texts if text)[:MAX_PREVIEW]


class ConversationIndex:
    def __init__(self, kv: KeyValue, publisher: Publisher, remembered: int = REMEMBERED_KEYS) -> None:
        self._kv = kv
        self._publisher = publisher
        self._seen: Revisions[ConversationRecord] = Revisions(remembered)
        """The records this process last wrote: the next message of a conversation skips reading its own."""

    async def get(self, tenant: str, conversation: str) -> ConversationRecord | None:
        try:
            entry = await self._kv.get(_key(tenant, conversation))
        except KeyNotFoundError:
            return None
        return msgspec.msgpack.decode(entry.value, type=ConversationRecord) if entry.value else None

    async def all(self, tenant: str) -> list[ConversationRecord]:
        """Every conversation of `tenant` (never another's)."""
        entries = await current_values(self._kv, f"{tenant}.*")
        return [msgspec.msgpack.decode(entry.value or b"", type=ConversationRecord) for entry in entries]

    async def note(self, envelope: c.Message, seq: int, stored_at: datetime) -> None:
        """Count `envelope`, stored at history sequence `seq`, in its conversation's record; an inbound
        one stored at `stored_at` moves the messaging window on (from when the hub heard it, as the
        conversation actor counts it, not from the channel's own timestamp)."""
        key = _key(envelope.tenant, envelope.conversation.id)
        for _ in range(_ATTEMPTS):
            record, revision = self._seen.get(key) or await self._entry(key)
            if record is not None and record.last_seq >= seq:
                return  # counted already (a redelivery)
            noted = _noted(record, envelope, seq, stored_at)
            try:
                revision = await self._publisher.store(self._kv, key, msgspec.msgpack.encode(noted), revision)
            except KeyWrongLastSequenceError:
                self._seen.forget(key)  # another writer came first: read what it wrote
                continue
            self._seen.seen(key, noted, revision)
            return
        raise RuntimeError(f"conversation index {key}: {_ATTEMPTS} revision conflicts in a row")

    async def _entry(self, key: str) -> tuple[ConversationRecord | None, int | None]:
        """The record under `key` and its revision; (None, None) when there is none."""
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return None, None
        if not entry.value:
            return None, None
        return msgspec.msgpack.decode(entry.value, type=ConversationRecord), entry.revision

    async def put(self, tenant: str, record: ConversationRecord) -> None:
        self._seen.forget(_key(tenant, record.id))
        await self._kv.put(_key(tenant, record.id), msgspec.msgpack.encode(record))

    async def remove(self, tenant: str, conversation: str) -> None:
        self._seen.forget(_key(tenant, conversation))
        await self._kv.purge(_key(tenant, conversation))


def _noted(record: ConversationRecord | None, envelope: c.Message, seq: int, stored_at: datetime) -> ConversationRecord:
    conversation, at = envelope.conversation, envelope.ts
    if record is None:
        record = ConversationRecord(id=conversation.id, first_activity=at, last_activity=at)
    participants = record.participants
    sender = envelope.sender
    if envelope.direction == "inbound" and sender is not None and sender.id:
        heard = Participant(id=sender.id, native_id=sender.native_id, name=sender.name)
        participants = [*(p for p in participants if p.id != sender.id), heard][-MAX_PARTICIPANTS:]
    inbound = envelope.direction == "inbound"
    return msgspec.structs.replace(
        record,
        channel=conversation.channel or record.channel, connection=conversation.connection or record.connection,
        native_id=conversation.native_id or record.native_id,
        type=conversation.type if conversation.channel else record.type,
        participants=participants,
        first_activity=min(record.first_activity, at), last_activity=max(record.last_activity, at),
        last_inbound=max(record.last_inbound or stored_at, stored_at) if inbound else record.last_inbound,
        last_message_id=envelope.id if at >= record.last_activity else record.last_message_id,
        preview=preview(envelope) if at >= record.last_activity else record.preview,
        message_count=record.message_count + 1, last_seq=seq)


def _key(tenant: str, conversation: str) -> str:
    return f"{tenant}.{conversation}"
