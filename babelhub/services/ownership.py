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
import contextlib
import logging
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Protocol

import msgspec
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BadRequestError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from babelhub.services import kvscan
from babelhub.services.broker import Subjects, bucket_stream, partition_of, raise_replicas
from babelhub.services.ingest import NATS_UNAVAILABLE
from babelhub.services.supervise import TaskHealth

__all__ = ["Lease", "Ownership", "PartitionWork", "lease_bucket", "member_id", "partition_of"]

log = logging.getLogger("babelhub.ownership")




_TAKES_AT_ONCE = 4
"""Partitions begun together: each makes its consumers afresh (a few JetStream API calls, each a
replicated write on a cluster), so a process taking over many is not held up one by one, nor floods
the servers."""


def member_id() -> str:
    """A hub's name among the others: host, process id and a random part (two hubs may share a process,
    as in tests), in the characters a KV key allows."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}")


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


class PartitionWork(Protocol):
    """What ownership drives: the work of each partition, begun when it is taken and ended when it is
    given up."""

    async def take(self, partition: int) -> None:
        """Begin the work of `partition` (raises when it cannot: it is offered again later)."""

    async def give_up(self, partitions: set[int], *, lost: bool) -> None:
        """End the work of `partitions`: at once when the lease is `lost` (another process may take it
        any moment), else finishing what is under way (before the lease is handed over)."""


class Ownership:
    """Leases are kept by rounds (`round`, every `interval`); the work is begun and ended by a task of
    its own (`match_work`), so that beginning many partitions (consumers to make on a busy cluster) never
    delays a renewal, and a lease that runs out stops its work at that moment."""

    def __init__(self, kv: KeyValue, member: str, partitions: int, ttl: float, *,
                 work: PartitionWork | None = None) -> None:
        self.kv = kv
        self.member = member
        self.partitions = partitions
        self.ttl = ttl
        self.margin = ttl / 4
        """How long before the server could expire a lease this process stops counting it as held."""
        self.interval = ttl / 4
        """Time between two rounds (renew, release, take): a lease is renewed a few times per `ttl`."""
        self.leases: dict[int, Lease] = {}
        self.work = work
        self.working: set[int] = set()
        """The partitions whose work is begun: held ones, until they are given up."""
        self.releasing: set[int] = set()
        """Held partitions that belong to another member now: handed over by `match_work`."""
        self.closing = False
        """Set by `release`: nothing is taken, renewed or begun any more."""
        self._changing = asyncio.Lock()
        """Held while work is begun or ended, so that those steps never interleave."""
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------------------------ asking

    def owns(self, partition: int) -> bool:
        """Whether this process may handle `partition` now (its lease is held and not near expiry)."""
        lease = self.leases.get(partition)
        return lease is not None and time.monotonic() < lease.valid_until

    def held(self) -> set[int]:
        return {partition for partition in self.leases if self.owns(partition)}

    # ------------------------------------------------------------------------------------ running

    async def run(self, health: TaskHealth) -> None:
        """Keep membership and leases, and the work matched to them, until cancelled; `release` hands
        everything over at once."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._keep_work_matched(), name=f"ownership-work-{self.member}")
            while True:
                await self.round()
                health.ok()
                await asyncio.sleep(self.interval)

    async def round(self) -> None:
        """One round: renew what is held (all at once: that is what keeps the leases), announce this
        member, mark for handover what is another's, take what is free and this member's."""
        if self.closing:
            return
        await asyncio.gather(*(self._renew(partition) for partition in list(self.leases)))
        try:
            await self._announce()
            members = await self._members()
        except NATS_UNAVAILABLE as exc:
            log.warning("member %s cannot reach the leases bucket: %r", self.member, exc)
            members = []  # no view of the others: hold on to what is held while it lasts, take nothing
        if members and not self.closing:
            mine = {partition for partition in range(self.partitions) if self._assigned(partition, members)}
            self.releasing = set(self.leases) - mine
            await asyncio.gather(*(self._take(partition) for partition in sorted(mine - set(self.leases))))
        self._changed.set()

    async def release(self) -> None:
        """Graceful stop: end the work, give every lease back and leave, so the others take over at once."""
        self.closing = True
        async with self._changing:
            await self._hand_over(set(self.leases))
        try:
            await self.kv.delete(self._member_key(self.member))
        except NATS_UNAVAILABLE as exc:  # the entry expires anyway
            log.warning("could not remove member %s: %r", self.member, exc)

    # ------------------------------------------------------------------------------------ work

    async def _keep_work_matched(self) -> None:
        """Match the work after each round, and whenever a lease runs out (a renewal that did not get
        through in time), whatever the rounds are waiting for."""
        while True:
            ends = [lease.valid_until for lease in self.leases.values() if lease.partition in self.working]
            wait = max(0.0, min(ends, default=time.monotonic() + self.interval) - time.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._changed.wait()
            self._changed.clear()
            await self.match_work()

    async def match_work(self) -> None:
        """End at once the work of what is no longer held; hand over what is another's; begin the work
        of what is held, `_TAKES_AT_ONCE` partitions at a time (looking for lost leases before each batch)."""
        async with self._changing:
            if self.closing:
                return  # `release` ends the work
            await self._give_up_lost()
            await self._hand_over(self.releasing & set(self.leases))
            new = sorted(self.held() - self.working - self.releasing)
            for start in range(0, len(new), _TAKES_AT_ONCE):
                await self._give_up_lost()
                await self._begin([partition for partition in new[start:start + _TAKES_AT_ONCE]
                                   if self.owns(partition)])

    async def _begin(self, partitions: list[int]) -> None:
        if self.work is None:
            self.working.update(partitions)
            return
        results = await asyncio.gather(*(self.work.take(partition) for partition in partitions),
                                       return_exceptions=True)
        for partition, result in zip(partitions, results, strict=True):
            if isinstance(result, Exception):  # offered again after the next round, while the lease is held
                log.error("member %s could not begin partition %d: %r", self.member, partition, result)
            elif isinstance(result, BaseException):
                raise result
            else:
                self.working.add(partition)

    async def _give_up_lost(self) -> None:
        lost = self.working - self.held()
        if not lost:
            return
        log.warning("member %s stops partitions %s: their leases ran out", self.member, sorted(lost))
        for partition in lost:
            self.leases.pop(partition, None)
        self.working -= lost
        if self.work is not None:
            await self.work.give_up(lost, lost=True)

    async def _hand_over(self, partitions: set[int]) -> None:
        """Hand `partitions` over: their work ends (what is under way is finished), then their leases
        are deleted, so whoever takes them next starts after this process stopped."""
        ending = partitions & self.working
        self.working -= ending
        if ending and self.work is not None:
            await self.work.give_up(ending, lost=False)
        await asyncio.gather(*(self._delete_lease(partition) for partition in partitions))
        self.releasing -= partitions

    # ------------------------------------------------------------------------------------ steps

    def _assigned(self, partition: int, members: list[str]) -> bool:
        return bool(members) and members[partition % len(members)] == self.member

    async def _announce(self) -> None:
        await self.kv.put(self._member_key(self.member), self._holder())

    async def _members(self) -> list[str]:
        members = {key.removeprefix("m.") for key in await kvscan.keys(self.kv, "m.>")}
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
        lease = self.leases.get(partition)
        if lease is None:  # handed over meanwhile
            return
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
            self.leases.pop(partition, None)
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

    async def _delete_lease(self, partition: int) -> None:
        lease = self.leases.pop(partition, None)
        if lease is None:
            return
        try:
            await self.kv.delete(self._lease_key(partition), last=lease.revision)
        except (KeyWrongLastSequenceError, *NATS_UNAVAILABLE) as exc:  # lost meanwhile, or NATS unreachable: it expires
            log.warning("member %s could not release partition %d: %r", self.member, partition, exc)

    @staticmethod
    def _lease_key(partition: int) -> str:
        return f"p.{partition}"

    @staticmethod
    def _member_key(member: str) -> str:
        return f"m.{member}"
