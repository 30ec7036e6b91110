"""The records keeper: what the history API serves, kept from the messages stream as it fills.

One durable consumer on the messages stream (`KEEPER_CONSUMER`), shared by every hub process, takes each
inbound message a conversation actor applied (`in`) and each outbound message an app sent (`out`), and
keeps it: in the conversation's history (`HistoryStore`), in the conversation index
(`ConversationIndex`), and for an inbound message, in its sender's contact (`Contacts`). Each step is
idempotent (the history dedups by envelope id, the index counts a sequence once, a contact's identity
and conversation are sets), so a redelivery changes nothing; the message is acknowledged after all three.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Final

from nats.aio.msg import Msg

from babelhub import canonical as c
from babelhub.errors import DecodeError
from babelhub.services.contacts import Contacts
from babelhub.services.conversationindex import ConversationIndex
from babelhub.services.deadletters import DeadLetter, DeadLetters
from babelhub.services.historystore import HistoryStore
from babelhub.services.ingest import NATS_UNAVAILABLE

__all__ = ["KEEPER_CONSUMER", "RecordsKeeper"]

log = logging.getLogger("babelhub.keeper")

KEEPER_CONSUMER: Final = "history-records"
_KEPT_KINDS: Final = frozenset({"in", "out"})
_NAK_SECONDS: Final = 1.0


class RecordsKeeper:
    def __init__(self, store: HistoryStore, index: ConversationIndex, contacts: Contacts,
                 dead_letters: DeadLetters) -> None:
        self.store = store
        self.index = index
        self.contacts = contacts
        self._dead_letters = dead_letters

    async def on_message(self, msg: Msg) -> None:
        """Keep one message of the messages stream (stored as `<prefix>.<tenant>.<kind>.<p>.<conversation>`)."""
        tokens = msg.subject.split(".")
        if len(tokens) != 5 or tokens[2] not in _KEPT_KINDS:
            await msg.ack()  # decoded envelopes not applied yet (`conv`): kept once applied, from `in`
            return
        tenant, conversation = tokens[1], tokens[4]
        try:
            envelope = c.decode(msg.data)
        except DecodeError:
            await msg.ack()  # an app's unreadable message: the conversation actor parks it as a dead letter
            return
        if not isinstance(envelope, c.Message) or envelope.conversation.id != conversation:
            await msg.ack()  # activities are not history; a misaddressed message is the actor's to refuse
            return
        if envelope.tenant != tenant:
            await self._park(msg, tenant, f"a message of tenant {envelope.tenant[:64]!r} on another's subject")
            return
        try:
            await self.keep(envelope, msg.metadata.sequence.stream, msg.metadata.timestamp)
        except (*NATS_UNAVAILABLE, RuntimeError) as exc:
            log.warning("message %s not kept in the history yet: %r", envelope.id, exc)
            await msg.nak(delay=_NAK_SECONDS)
            return
        await msg.ack()

    async def keep(self, message: c.Message, source_seq: int, stored_at: datetime) -> None:
        """Keep `message`, stored in the messages stream at `source_seq` at the time `stored_at`."""
        seq = await self.store.append(message, source_seq)
        await self.index.note(message, seq, stored_at)
        if message.direction == "inbound":
            await self.contacts.heard(message)

    async def _park(self, msg: Msg, tenant: str, error: str) -> None:
        await self._dead_letters.park(DeadLetter(stage="history", error=error, path="$.tenant", tenant=tenant,
                                                 subject=msg.subject, body=msg.data))
        await msg.term()
