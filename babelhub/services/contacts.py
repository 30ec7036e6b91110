"""The people a tenant's conversations were with: KV bucket `<prefix>_contacts`.

A contact is one person; each of their channel identities (a connection + the channel's user id, whose
canonical sender id names it) belongs to exactly one contact. The records keeper makes a contact the
first time it hears an identity (its id is the identity's sender id) and keeps the conversations it
was heard in. Linking (`link`) moves another contact's identities and conversations into one and
deletes the other: one person across channels.

Keys: `<tenant>.c.<contact>` the contact, `<tenant>.i.<sender id>` the contact a linked identity now
belongs to (an identity with no such key is its own contact's). Writes are revision-checked and
retried on a conflict; the contact a process wrote last stands for reading it again (`Revisions`).
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

__all__ = ["MAX_CONVERSATIONS", "Contact", "Contacts", "Identity"]

MAX_CONVERSATIONS: Final = 1000
"""Conversations kept per contact (the oldest heard goes first)."""
_ATTEMPTS: Final = 16


class Identity(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    id: str
    """The canonical sender id: tenant + connection + the channel's user id."""
    connection: str = ""
    channel: str = ""
    native_id: str = ""
    name: str = ""
    handle: str = ""


class Contact(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str = ""
    identities: list[Identity] = []
    conversations: list[str] = []
    first_seen: datetime
    last_seen: datetime


class Contacts:
    def __init__(self, kv: KeyValue, publisher: Publisher, remembered: int = REMEMBERED_KEYS) -> None:
        self._kv = kv
        self._publisher = publisher
        self._seen: Revisions[Contact] = Revisions(remembered)
        """The contacts this process last wrote: the next message of a person skips reading theirs."""

    async def get(self, tenant: str, contact_id: str) -> Contact | None:
        found = await self._entry(_contact_key(tenant, contact_id))
        return found[0] if found is not None else None

    async def all(self, tenant: str) -> list[Contact]:
        entries = await current_values(self._kv, f"{tenant}.c.*")
        return [msgspec.msgpack.decode(entry.value or b"", type=Contact) for entry in entries]

    async def owner(self, tenant: str, sender_id: str) -> str:
        """The contact `sender_id`'s identity belongs to."""
        try:
            entry = await self._kv.get(_identity_key(tenant, sender_id))
        except KeyNotFoundError:
            return sender_id
        return entry.value.decode() if entry.value else sender_id

    async def heard(self, message: c.Message) -> None:
        """The sender of an inbound `message` was heard in its conversation."""
        sender, conversation = message.sender, message.conversation
        if sender is None or not sender.id or sender.role != "user":
            return
        identity = Identity(id=sender.id, connection=conversation.connection, channel=conversation.channel,
                            native_id=sender.native_id, name=sender.name, handle=sender.handle)
        contact_id = await self.owner(message.tenant, sender.id)
        key = _contact_key(message.tenant, contact_id)
        for _ in range(_ATTEMPTS):
            found = self._seen.get(key) or await self._entry(key)
            contact = found[0] if found is not None else Contact(id=contact_id, first_seen=message.ts,
                                                                 last_seen=message.ts)
            contact = _with_heard(contact, identity, conversation.id, message.ts)
            try:
                revision = await self._publisher.store(self._kv, key, msgspec.msgpack.encode(contact),
                                                       found[1] if found is not None else None)
            except KeyWrongLastSequenceError:
                self._seen.forget(key)  # another writer came first: read what it wrote
                continue
            self._seen.seen(key, contact, revision)
            return
        raise RuntimeError(f"contact {key}: {_ATTEMPTS} revision conflicts in a row")

    async def link(self, tenant: str, contact_id: str, other_id: str) -> Contact | None:
        """Move `other_id`'s identities and conversations into `contact_id` and delete `other_id`; None
        when either is not one of `tenant`'s contacts."""
        self._seen.forget(_contact_key(tenant, contact_id))
        self._seen.forget(_contact_key(tenant, other_id))
        for _ in range(_ATTEMPTS):
            found, other = await self._entry(_contact_key(tenant, contact_id)), await self.get(tenant, other_id)
            if found is None or other is None:
                return None
            merged = _merged(found[0], other)
            try:
                await self._publisher.store(self._kv, _contact_key(tenant, contact_id), msgspec.msgpack.encode(merged),
                                            found[1])
            except KeyWrongLastSequenceError:
                continue
            for identity in other.identities:
                await self._kv.put(_identity_key(tenant, identity.id), contact_id.encode())
            await self._kv.purge(_contact_key(tenant, other_id))
            return merged
        raise RuntimeError(f"contact {contact_id}: {_ATTEMPTS} revision conflicts in a row")

    async def forget(self, tenant: str, contact: Contact) -> None:
        """Delete `contact` and every trace of its identities."""
        self._seen.forget(_contact_key(tenant, contact.id))
        for identity in contact.identities:
            await self._kv.purge(_identity_key(tenant, identity.id))
        await self._kv.purge(_contact_key(tenant, contact.id))

    async def _entry(self, key: str) -> tuple[Contact, int] | None:
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return None
        if not entry.value or entry.revision is None:
            return None
        return msgspec.msgpack.decode(entry.value, type=Contact), entry.revision


def _with_heard(contact: Contact, identity: Identity, conversation: str, at: datetime) -> Contact:
    identities = [identity if known.id == identity.id else known for known in contact.identities]
    if identity.id not in {known.id for known in contact.identities}:
        identities.append(identity)
    conversations = [*(known for known in contact.conversations if known != conversation), conversation]
    return msgspec.structs.replace(
        contact, name=identity.name or contact.name, identities=identities,
        conversations=conversations[-MAX_CONVERSATIONS:],
        first_seen=min(contact.first_seen, at), last_seen=max(contact.last_seen, at))


def _merged(contact: Contact, other: Contact) -> Contact:
    known = {identity.id for identity in contact.identities}
    theirs = [conversation for conversation in other.conversations if conversation not in contact.conversations]
    conversations = [*contact.conversations, *theirs]
    return msgspec.structs.replace(
        contact, name=contact.name or other.name,
        identities=[*contact.identities, *(identity for identity in other.identities if identity.id not in known)],
        conversations=conversations[-MAX_CONVERSATIONS:],
        first_seen=min(contact.first_seen, other.first_seen), last_seen=max(contact.last_seen, other.last_seen))


def _contact_key(tenant: str, contact_id: str) -> str:
    return f"{tenant}.c.{contact_id}"


def _identity_key(tenant: str, sender_id: str) -> str:
    return f"{tenant}.i.{sender_id}"
