"""What a conversation remembers per message: one KV key per fact, written once, expiring by itself.

A conversation's snapshot holds only small fixed-size state. What grows with every message lives beside
it, in the same `conversations` bucket, under the conversation's key:

* `<key>.m.<digest>`: an envelope applied here → its native message id ("" when it has none). The key's
  presence is what recognises a redelivery, or a channel's late retry, of that envelope.
* `<key>.t.<digest>`: a thread's canonical id → the channel's id of the thread.
* `<key>.o.<digest>`: the id a codec derives from the native id of a message we sent
  (`canonical.message_id`) → the id the app gave that message. A reply, reaction or status that names
  our message by its native id finds the app's id here.

`<digest>` is a hash of the id, so any id fits a key. Each key is written once, when the fact is learnt,
with a per-message TTL (`RETENTION`; nats-server 2.11 or later, and `provision` lets the bucket take it):
the server drops it by itself, and no checkpoint rewrites what earlier messages taught. A checkpoint
writes the facts of the turns since the previous one, so its cost does not grow with the conversation.

Facts are collected during turns (`put`) and written together by `flush`. Reads go through a bounded
cache of what this activation wrote or read, absences included: the actor is its keys' only writer while
it holds the conversation, so the cache cannot go stale.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import OrderedDict
from collections.abc import Iterable

import msgspec
from nats.js.api import PubAck
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from babelhub import canonical as c
from babelhub.services.publisher import Publisher

__all__ = ["MAX_ID_BYTES", "RETENTION", "Fact", "Learnt", "Memory"]

log = logging.getLogger("babelhub.conversation")

RETENTION = 30 * 24 * 3600.0
"""How long a learnt fact is kept after it was written. A reply, reaction or edit naming a message older
than this finds no native id (a reply is then sent as a plain message), a status for it keeps the id the
codec gave it, and a redelivery of an envelope older than this is no longer recognised."""

MAX_ID_BYTES = 128
"""A native or canonical message id longer than this is not remembered (a clipped id would name another
message); real ones are far shorter (a WhatsApp wamid is ~60 characters)."""

_CACHE_SIZE = 4096
_ACK_TIMEOUT = 5.0


class Fact(enum.Enum):
    """The kinds of per-message keys, by the token that names them in a key."""

    MESSAGE = "m"
    THREAD = "t"
    OURS = "o"
    STATE = "s"
    """The furthest delivery state published for a message: statuses only move forward."""


class Learnt(msgspec.Struct, array_like=True, frozen=True):
    """One fact learnt and not written yet (the snapshot keeps it until it is, see `Memory.pending`)."""

    fact: Fact
    digest: str
    """The hash of the id the fact is about (`Memory.digest`)."""
    value: str


class Memory:
    """One conversation's per-message keys: look facts up, learn new ones, and `flush` them."""

    def __init__(self, kv: KeyValue, bucket: str, publisher: Publisher, key: str,
                 retention: float = RETENTION) -> None:
        self._kv = kv
        self._bucket = bucket
        self._publisher = publisher
        self._key = key
        self._retention = retention
        self._cache: OrderedDict[tuple[Fact, str], str | None] = OrderedDict()
        self._unwritten: dict[tuple[Fact, str], str] = {}

    @staticmethod
    def digest(item: str) -> str:
        """How an id appears in a key: a fixed-length hash, whatever the id."""
        return c.stable_id("id", item)

    def key(self, fact: Fact, digest: str) -> str:
        return f"{self._key}.{fact.value}.{digest}"

    async def get(self, fact: Fact, item: str) -> str | None:
        """What is known of `item`, or None: from what this activation learnt or read, else from KV."""
        if not item:
            return None
        slot = (fact, self.digest(item))
        unwritten = self._unwritten.get(slot)
        if unwritten is not None:
            return unwritten
        cached = self._cache.get(slot, ...)
        if cached is not ...:
            self._cache.move_to_end(slot)
            return cached
        value = await self._read(fact, slot[1])
        self._remember(slot, value)
        return value

    def known(self, fact: Fact, item: str) -> str | None:
        """What this activation learnt or read of `item` (no I/O): None when it does not know."""
        slot = (fact, self.digest(item))
        unwritten = self._unwritten.get(slot)
        return unwritten if unwritten is not None else self._cache.get(slot)

    async def get_many(self, fact: Fact, items: Iterable[str]) -> dict[str, str]:
        """The known values of those of `items` that have one ("" included)."""
        found: dict[str, str] = {}
        for item in dict.fromkeys(items):
            value = await self.get(fact, item)
            if value is not None:
                found[item] = value
        return found

    def put(self, fact: Fact, item: str, value: str) -> None:
        """Learn `item` → `value`, to be written by the next `flush`. A value longer than `MAX_ID_BYTES`
        is no id a channel uses: it is not kept."""
        if item and len(value.encode()) <= MAX_ID_BYTES:
            self._learn((fact, self.digest(item)), value)

    def pending(self) -> list[Learnt]:
        """The facts learnt since the last `flush`, in the order they were learnt."""
        return [Learnt(fact, digest, value) for (fact, digest), value in self._unwritten.items()]

    def restore(self, facts: Iterable[Learnt]) -> None:
        """Learn again facts that an earlier activation recorded and may not have written."""
        for fact in facts:
            self._learn((fact.fact, fact.digest), fact.value)

    async def flush(self) -> None:
        """Write every fact learnt since the last flush, together, and wait for the server's acks.
        Raises when a write failed; the facts then stay for the next try (a fact written twice is the
        same fact)."""
        if not self._unwritten:
            return
        written = dict(self._unwritten)
        acks: list[asyncio.Future[PubAck]] = []
        try:
            for slot, value in written.items():
                acks.append(await self._publisher.put_expiring(self._bucket, self.key(*slot), value.encode(),
                                                               ttl=self._retention))
            _, unanswered = await asyncio.wait(acks, timeout=_ACK_TIMEOUT)
        finally:
            for ack in acks:
                ack.cancel()  # no-op once answered; else the write may or may not be stored: it is sent again
        for slot, ack in zip(written, acks, strict=True):
            if ack not in unanswered and ack.exception() is None and self._unwritten.get(slot) == written[slot]:
                del self._unwritten[slot]
        if unanswered or self._unwritten:
            raise TimeoutError(f"{len(self._unwritten)} facts of {self._key} were not written")

    def _learn(self, slot: tuple[Fact, str], value: str) -> None:
        if self._cache.get(slot, ...) == value and slot not in self._unwritten:
            return  # known, and written already
        self._remember(slot, value)
        self._unwritten[slot] = value

    async def _read(self, fact: Fact, digest: str) -> str | None:
        try:
            entry = await self._kv.get(self.key(fact, digest))
        except NotFoundError:  # never written, expired, or deleted
            return None
        try:
            return (entry.value or b"").decode()
        except UnicodeDecodeError:
            log.warning("conversation %s: an unreadable %s fact is ignored", self._key, fact.name.lower())
            return None

    def _remember(self, slot: tuple[Fact, str], value: str | None) -> None:
        self._cache[slot] = value
        self._cache.move_to_end(slot)
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
