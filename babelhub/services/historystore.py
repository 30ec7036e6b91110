"""Every conversation's messages as the history API serves them: the stream `<PREFIX>_HISTORY`.

One subject per conversation, `<prefix>.<tenant>.hist.<conversation>`, each message the canonical
envelope as the messages stream held it (JSON), published with `Nats-Msg-Id` = the envelope's id so a
redelivered one is stored once. A message's place is its stream sequence: new messages always get higher
ones, so a cursor "older than sequence N" names the same page however many messages arrive meanwhile.

Pages are read newest first with direct gets (`allow_direct`, ADR-31): `multi_last` on the
conversation's subject with `up_to_seq` answers the conversation's newest message at or before a
sequence, so one page of `n` costs `n` small requests, however long the conversation is. The stream has
no age limit of its own: retention (`babelhub.services.retention`) purges it per tenant.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

from babelhub import canonical as c
from babelhub.services.broker import Subjects, raise_replicas
from babelhub.services.publisher import Publisher

__all__ = ["SOURCE_SEQ", "HistoryStore", "Stored"]

SOURCE_SEQ: Final = "Babelhub-Source-Seq"
"""Header of a history message: the sequence of the same envelope in the messages stream."""
_DIRECT_TIMEOUT: Final = 5.0
_BATCH_ENDS: Final = frozenset({"204", "404"})
"""A direct get's status at the end of its answer: the batch is over, or nothing was there."""
_STREAM_NAME_IN_USE: Final = 10058


@dataclass(frozen=True)
class Stored:
    """One message of a conversation's history: its sequence there, the envelope (JSON), and the
    envelope's sequence in the messages stream (0 when not known)."""

    seq: int
    data: bytes
    source_seq: int = 0


class HistoryStore:
    def __init__(self, nc: NATS, js: JetStreamContext, publisher: Publisher, subjects: Subjects) -> None:
        self._nc = nc
        self._js = js
        self._publisher = publisher
        self._subjects = subjects
        self.stream = subjects.stream_name("history")

    @classmethod
    async def open(cls, nc: NATS, js: JetStreamContext, publisher: Publisher, subjects: Subjects, *,
                   dedup_window: float, replicas: int) -> HistoryStore:
        """The store, its stream made first (an existing one keeps its settings, and is given at least
        `replicas` copies, as the hub's own streams are)."""
        store = cls(nc, js, publisher, subjects)
        config = StreamConfig(name=store.stream, subjects=[f"{subjects.prefix}.*.hist.*"],
                              retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
                              discard=DiscardPolicy.OLD, duplicate_window=dedup_window, allow_direct=True,
                              num_replicas=replicas)
        try:
            await js.add_stream(config)
        except BadRequestError as exc:
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise
            await raise_replicas(js, store.stream, replicas)
        return store

    def subject(self, tenant: str, conversation: str) -> str:
        return f"{self._subjects.prefix}.{tenant}.hist.{conversation}"

    async def append(self, envelope: c.Envelope, source_seq: int) -> int:
        """Keep `envelope` (once, however often it comes); its sequence in the history."""
        headers = {**self._publisher.headers(), "Nats-Msg-Id": envelope.id, SOURCE_SEQ: str(source_seq)}
        ack = await self._publisher.publish(self.subject(envelope.tenant, envelope.conversation.id),
                                            c.encode(envelope), headers=headers)
        return ack.seq

    async def newest_first(self, tenant: str, conversation: str, before: int, limit: int) -> list[Stored]:
        """Up to `limit` messages of the conversation with a sequence below `before` (0: no bound),
        newest first."""
        subject, found = self.subject(tenant, conversation), list[Stored]()
        if before == 1:
            return found  # nothing comes before the stream's first message
        inbox = self._nc.new_inbox()
        subscription = await self._nc.subscribe(inbox)
        try:
            up_to = before - 1 if before else 0  # 0: the newest there is
            while len(found) < limit:
                stored = await self._last_up_to(subscription, inbox, subject, up_to)
                if stored is None:
                    break
                found.append(stored)
                if stored.seq <= 1:
                    break
                up_to = stored.seq - 1
        finally:
            await subscription.unsubscribe()
        return found

    async def _last_up_to(self, subscription: Subscription, inbox: str, subject: str, up_to: int) -> Stored | None:
        """The newest message on `subject` at or before sequence `up_to` (0: the newest of all)."""
        request: dict[str, object] = {"multi_last": [subject]}
        if up_to:
            request["up_to_seq"] = up_to
        await self._nc.publish(f"$JS.API.DIRECT.GET.{self.stream}", json.dumps(request).encode(), reply=inbox)
        stored: Stored | None = None
        while True:
            msg = await subscription.next_msg(timeout=_DIRECT_TIMEOUT)
            headers = msg.headers or {}
            status = headers.get("Status")
            if status in _BATCH_ENDS:
                return stored
            if status:
                raise nats.errors.Error(f"{self.stream}: a direct get answered {status}")
            stored = Stored(seq=int(headers["Nats-Sequence"]), data=msg.data,
                            source_seq=int(headers.get(SOURCE_SEQ, "0") or 0))

    async def oldest_first(self, tenant: str, conversation: str) -> AsyncIterator[Stored]:
        """Every message of the conversation, oldest first (for erasing a person, not for pages)."""
        subject, seq = self.subject(tenant, conversation), 0
        while True:
            try:
                found = await self._js.get_msg(self.stream, seq=seq + 1, subject=subject, next=True, direct=True)
            except NotFoundError:
                return
            if found.seq is None:
                return
            seq = found.seq
            headers = found.headers or {}
            yield Stored(seq=seq, data=found.data or b"", source_seq=int(headers.get(SOURCE_SEQ, "0") or 0))

    async def delete(self, seq: int) -> None:
        with contextlib.suppress(NotFoundError):  # gone already: erased or purged by another process
            await self._js.delete_msg(self.stream, seq)

    async def purge_conversation(self, tenant: str, conversation: str) -> None:
        await self._js.purge_stream(self.stream, subject=self.subject(tenant, conversation))

    async def count(self, tenant: str, conversation: str) -> int:
        """How many messages the conversation has left."""
        info = await self._js.stream_info(self.stream, subjects_filter=self.subject(tenant, conversation))
        return sum((info.state.subjects or {}).values())
