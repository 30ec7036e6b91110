"""Erasing a person: their messages, raw records, identities and conversations, wherever the hub keeps them.

For each conversation the contact was heard in: a conversation that is only theirs (a direct one, or one
where nobody else spoke) is purged whole, by subject, from the history, the messages stream (inbound,
outbound and decoded copies) and the statuses stream, and leaves the index; in a group conversation only
the messages they sent are deleted, one by one by sequence, from the history and the messages stream, and
they leave its participants. The raw record each of their inbound messages was decoded from (its
`native.seq`) is deleted from the raw stream. Then the contact and its identities are forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from babelhub import canonical as c
from babelhub.errors import DecodeError
from babelhub.services.broker import Subjects
from babelhub.services.contacts import Contact, Contacts
from babelhub.services.conversationindex import ConversationIndex, ConversationRecord
from babelhub.services.historystore import HistoryStore

__all__ = ["Erased", "Erasure"]


class Erased(msgspec.Struct, frozen=True, kw_only=True):
    """What erasing a contact removed."""

    id: str
    conversations: int = 0
    """Conversations removed whole (only theirs)."""
    messages: int = 0
    """Their messages removed from the history (in group conversations and in those removed whole)."""
    raw_records: int = 0
    identities: int = 0


@dataclass
class _Tally:
    conversations: int = 0
    messages: int = 0
    raw_records: int = 0


@dataclass
class Erasure:
    js: JetStreamContext
    subjects: Subjects
    store: HistoryStore
    index: ConversationIndex
    contacts: Contacts

    async def erase(self, tenant: str, contact: Contact) -> Erased:
        theirs = {identity.id for identity in contact.identities} | {contact.id}
        tally = _Tally()
        for conversation in contact.conversations:
            record = await self.index.get(tenant, conversation)
            if record is not None and _only_theirs(record, theirs):
                await self._erase_whole(tenant, conversation, tally)
            else:  # a group, or one the index no longer knows: only what they sent can be known to be theirs
                await self._erase_theirs(tenant, conversation, record, theirs, tally)
        await self.contacts.forget(tenant, contact)
        return Erased(id=contact.id, conversations=tally.conversations, messages=tally.messages,
                      raw_records=tally.raw_records, identities=len(contact.identities))

    async def _erase_whole(self, tenant: str, conversation: str, tally: _Tally) -> None:
        raw: set[int] = set()
        async for stored in self.store.oldest_first(tenant, conversation):
            tally.messages += 1
            raw |= _raw_seqs(stored.data, None)
        await self.store.purge_conversation(tenant, conversation)
        p = self.subjects.prefix
        await self.js.purge_stream(self.subjects.stream_name("messages"), subject=f"{p}.{tenant}.*.*.{conversation}")
        await self.js.purge_stream(self.subjects.stream_name("statuses"),
                                   subject=self.subjects.status(tenant, conversation))
        tally.raw_records += await self._delete_raw(raw)
        await self.index.remove(tenant, conversation)
        tally.conversations += 1

    async def _erase_theirs(self, tenant: str, conversation: str, record: ConversationRecord | None,
                            theirs: set[str], tally: _Tally) -> None:
        raw: set[int] = set()
        erased_ids: set[str] = set()
        async for stored in self.store.oldest_first(tenant, conversation):
            if _sender(stored.data) in theirs:
                await self.store.delete(stored.seq)
                erased_ids.add(_id(stored.data))
                raw |= _raw_seqs(stored.data, theirs)
        tally.messages += len(erased_ids)
        await self._delete_from_messages(tenant, conversation, theirs)
        tally.raw_records += await self._delete_raw(raw)
        if record is not None:
            await self.index.put(tenant, msgspec.structs.replace(
                record, participants=[p for p in record.participants if p.id not in theirs],
                preview="" if record.last_message_id in erased_ids else record.preview,
                message_count=max(0, record.message_count - len(erased_ids))))

    async def _delete_from_messages(self, tenant: str, conversation: str, theirs: set[str]) -> None:
        """Their envelopes in the messages stream (the applied and the decoded copies)."""
        stream, seq = self.subjects.stream_name("messages"), 0
        subject = f"{self.subjects.prefix}.{tenant}.*.*.{conversation}"
        while True:
            try:
                found = await self.js.get_msg(stream, seq=seq + 1, subject=subject, next=True)
            except NotFoundError:
                return
            if found.seq is None:
                return
            seq = found.seq
            if _sender(found.data or b"") in theirs:
                await _delete(self.js, stream, seq)

    async def _delete_raw(self, seqs: set[int]) -> int:
        stream = self.subjects.stream_name("raw")
        return sum([await _delete(self.js, stream, seq) for seq in sorted(seqs)])


def _only_theirs(record: ConversationRecord, theirs: set[str]) -> bool:
    return record.type == "direct" or all(participant.id in theirs for participant in record.participants)


def _envelope(data: bytes) -> c.Envelope | None:
    try:
        return c.decode(data)
    except DecodeError:
        return None


def _sender(data: bytes) -> str:
    envelope = _envelope(data)
    return envelope.sender.id if envelope is not None and envelope.sender is not None else ""


def _id(data: bytes) -> str:
    envelope = _envelope(data)
    return envelope.id if envelope is not None else ""


def _raw_seqs(data: bytes, theirs: set[str] | None) -> set[int]:
    """The raw record an inbound envelope was decoded from (of one of `theirs`, unless None)."""
    envelope = _envelope(data)
    if envelope is None or envelope.direction != "inbound" or envelope.native is None or not envelope.native.seq:
        return set()
    if theirs is not None and (envelope.sender is None or envelope.sender.id not in theirs):
        return set()
    return {envelope.native.seq}


async def _delete(js: JetStreamContext, stream: str, seq: int) -> int:
    try:
        return 1 if await js.delete_msg(stream, seq) else 0
    except NotFoundError:
        return 0
