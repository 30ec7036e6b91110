"""Partition ownership: which hub process handles which conversations when several share one NATS.

Conversations hash into a fixed number of partitions (`partition_of`). Each partition has at most one
owner at a time, held by a lease: a key `p.<n>` in the KV bucket `<prefix>_leases`, whose entries the
server removes `ttl` seconds after they were last written (the bucket's max age). A process

* announces itself with a member key `m.<id>` in the same bucket, renewed like a lease;
* takes a free partition with `create` (refused when another process holds it), and renews what it
  holds with `update` checked against the revision it last wrote: a refused renewal means the lease
  was lost, and the partition is dropped at once (unless the lease names this process: then a write of
  its own landed though its answer was lost, and it goes on from there);
* spreads partitions evenly: partition n belongs to the n-th live member (modulo their number, members
  sorted by id); a process releases (deletes) what belongs to another, and takes what is free and its
  own. Nobody ever takes a held lease, so views of the membership that differ for a moment can delay
  a handover, never double it.

**Fencing.** A process counts a lease as its own only until `ttl - margin` after it *sent* the write
that last succeeded; the server keeps the entry until `ttl` after it *stored* that write, which is
later. So a process that cannot renew (cut off from NATS, stalled) stops treating the partition as its
own before the entry expires and anyone else can take it. `Lease.revision`, the KV revision of the
take, grows with every new owner and serves as a fencing token for writes elsewhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BadRequestError, KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError, NotFoundError
from nats.js.kv import KeyValue

from babelhub.services.broker import Subjects, bucket_stream, raise_replicas
from babelhub.services.ingest import NATS_UNAVAILABLE
from babelhub.services.supervise import TaskHealth

__all__ = ["Lease", "Ownership", "lease_bucket", "partition_of"]

log = logging.getLogger("babelhub.ownership")


def partition_of(tenant: str, conversation: str, partitions: int) -> int:
    """The partition of a tenant's conversation: a stable hash, the same in every process and release."""
    digest = hashlib.blake2b(f"{tenant}\0{conversation}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


async def lease_bucket(js: JetStreamContext, subjects: Subjects, ttl: float, replicas: int = 1) -> KeyValue:
    """The leases bucket, made if missing (or given `replicas` copies if it has fewer); its entries expire
    `ttl` seconds after their last write."""
    name = subjects.bucket("leases")
    try:
        bucket = await js.key_value(name)
    except (NotFoundError, BadRequestError):
        return await js.create_key_value(KeyValueConfig(bucket=name, history=1, ttl=ttl, replicas=replicas,
                                                        storage=StorageType.FILE))
    await raise_replicas(js, bucket_stream(name), replicas)
    return bucket


class _Holder(msgspec.Struct, frozen=True):
    """What a lease or member key holds: who wrote it."""

    owner: str


@dataclass
class Lease:
    """A partition this process holds."""

    partition: int
    revision: int
    """The KV revision of the last write: the next renewal must name it."""
    token: int
    """The revision of the take: grows with every new owner (a fencing token)."""
    valid_until: float
    """`time.monotonic()` until which the lease counts as held."""


Listener = Callable[[set[int]], None]


class Ownership:
    def __init__(self, kv: KeyValue, member: str, partitions: int, ttl: float, *,
                 on_change: Listener | None = None) -> None:
        self.kv = kv
        self.member = member
        self.partitions = partitions
        self.ttl = ttl
        self.margin = ttl / 4
        """How long before the server could expire a lease this process stops counting it as held."""
        self.interval = ttl / 4
        """Time between two rounds (renew, release, take): a lease is renewed a few times per `ttl`."""
        self.leases: dict[int, Lease] = {}
        self.on_change = on_change
        """Called with the partitions held, whenever that set changes."""
        self._held: set[int] = set()

    # ------------------------------------------------------------------------------------ asking

    def owns(self, partition: int) -> bool:
        """Whether this process may handle `partition` now (its lease is held and not near expiry)."""
        lease = self.leases.get(partition)
        return lease is not None and time.monotonic() < lease.valid_until

    def held(self) -> set[int]:
        return {partition for partition in self.leases if self.owns(partition)}

    # ------------------------------------------------------------------------------------ running

    async def run(self, health: TaskHealth) -> None:
        """Keep membership and leases until cancelled; `release` hands them over at once."""
        while True:
            await self.round()
            health.ok()
            await asyncio.sleep(self.interval)

    async def round(self) -> None:
        """One round: announce this member, renew what is held, release what is another's, take what
        is free and this member's."""
        try:
            await self._announce()
            members = await self._members()
        except NATS_UNAVAILABLE as exc:
            log.warning("member %s cannot reach the leases bucket: %r", self.member, exc)
            members = []  # no view of the others: hold on to what is held while it lasts, take nothing
        for partition in list(self.leases):
            await self._renew(partition)
        if members:
            mine = {partition for partition in range(self.partitions) if self._assigned(partition, members)}
            for partition in set(self.leases) - mine:
                await self._release(partition)
            for partition in sorted(mine - set(self.leases)):
                await self._take(partition)
        self._drop_expired()
        self._tell()

    async def release(self) -> None:
        """Graceful stop: give every lease back and leave, so the others take over at once."""
        for partition in list(self.leases):
            await self._release(partition)
        try:
            await self.kv.delete(self._member_key(self.member))
        except NATS_UNAVAILABLE as exc:  # the entry expires anyway
            log.warning("could not remove member %s: %r", self.member, exc)
        self._tell()

    # ------------------------------------------------------------------------------------ steps

    def _assigned(self, partition: int, members: list[str]) -> bool:
        return bool(members) and members[partition % len(members)] == self.member

    async def _announce(self) -> None:
        await self.kv.put(self._member_key(self.member), self._holder())

    async def _members(self) -> list[str]:
        try:
            keys = await self.kv.keys()
        except NoKeysError:
            keys = []
        members = {key.removeprefix("m.") for key in keys if key.startswith("m.")}
        return sorted(members | {self.member})

    async def _take(self, partition: int) -> None:
        sent = time.monotonic()
        try:
            revision = await self.kv.create(self._lease_key(partition), self._holder())
        except KeyWrongLastSequenceError:
            landed = await self._own_revision(partition)
            if landed is None:
                return  # held by another process: it releases it, or it expires
            # Our own take landed in an earlier round, its answer lost: renewed now, so that how long it
            # counts as held is measured from a write whose sending time is known.
            self.leases[partition] = Lease(partition, landed, landed, valid_until=0.0)
            await self._renew(partition)
            return
        except NATS_UNAVAILABLE as exc:
            log.warning("member %s could not take partition %d: %r", self.member, partition, exc)
            return
        self.leases[partition] = Lease(partition, revision, revision, sent + self.ttl - self.margin)
        log.info("member %s took partition %d (token %d)", self.member, partition, revision)

    async def _renew(self, partition: int, *, again: bool = True) -> None:
        lease = self.leases[partition]
        sent = time.monotonic()
        try:
            lease.revision = await self.kv.update(self._lease_key(partition), self._holder(), last=lease.revision)
        except KeyWrongLastSequenceError:
            revision = await self._own_revision(partition)
            if revision is not None and again:
                # A renewal whose answer was lost had landed: go on from it.
                lease.revision = revision
                await self._renew(partition, again=False)
                return
            log.warning("member %s lost partition %d", self.member, partition)
            del self.leases[partition]
            return
        except NATS_UNAVAILABLE as exc:  # the lease runs out by itself unless a renewal gets through
            log.warning("member %s could not renew partition %d: %r", self.member, partition, exc)
            return
        lease.valid_until = sent + self.ttl - self.margin

    async def _own_revision(self, partition: int) -> int | None:
        """The revision of `partition`'s lease when it names this member (a write of ours that landed
        though its answer was lost: no other process writes this member's name), else None."""
        try:
            entry = await self.kv.get(self._lease_key(partition))
        except (KeyNotFoundError, *NATS_UNAVAILABLE):
            return None
        if entry.value is None or msgspec.msgpack.decode(entry.value, type=_Holder).owner != self.member:
            return None
        return entry.revision

    def _holder(self) -> bytes:
        return msgspec.msgpack.encode(_Holder(self.member))

    async def _release(self, partition: int) -> None:
        lease = self.leases.pop(partition)
        try:
            await self.kv.delete(self._lease_key(partition), last=lease.revision)
        except (KeyWrongLastSequenceError, *NATS_UNAVAILABLE) as exc:  # lost meanwhile, or NATS unreachable: it expires
            log.warning("member %s could not release partition %d: %r", self.member, partition, exc)

    def _drop_expired(self) -> None:
        for partition in [partition for partition in self.leases if not self.owns(partition)]:
            del self.leases[partition]

    def _tell(self) -> None:
        held = self.held()
        if held != self._held:
            self._held = held
            if self.on_change is not None:
                self.on_change(held)

    @staticmethod
    def _lease_key(partition: int) -> str:
        return f"p.{partition}"

    @staticmethod
    def _member_key(member: str) -> str:
        return f"m.{member}"
