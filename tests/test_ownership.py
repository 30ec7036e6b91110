"""Partition ownership over JetStream KV (babelhub/services/ownership.py), on a real nats-server: an
even spread, handover on a graceful stop, takeover after a crash, and never two owners of one partition
at the same moment, which a sampler checks throughout each test."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from babelhub.services.broker import EmbeddedServer, Subjects
from babelhub.services.ownership import Ownership, lease_bucket, partition_of
from babelhub.services.supervise import TaskHealth
from tests.hubkit import eventually, unique_prefix

PARTITIONS = 8
TTL = 1.2


def test_a_conversation_always_lands_in_the_same_partition_and_partitions_fill_evenly() -> None:
    rng = random.Random(7)
    conversations = [f"{rng.getrandbits(64):x}" for _ in range(6400)]
    counts = Counter(partition_of("acme", conversation, 64) for conversation in conversations)
    assert [partition_of("acme", conversation, 64) for conversation in conversations[:50]] == \
           [partition_of("acme", conversation, 64) for conversation in conversations[:50]]
    assert set(counts) == set(range(64)) and min(counts.values()) > 50 and max(counts.values()) < 150
    assert partition_of("acme", "c1", 64) != partition_of("other", "c1", 64) or \
           partition_of("acme", "c2", 64) != partition_of("other", "c2", 64)  # the tenant is part of the key


class Member:
    """One hub process's ownership, on a NATS connection of its own."""

    def __init__(self, name: str, nc: NATS, ownership: Ownership) -> None:
        self.name = name
        self.nc = nc
        self.ownership = ownership
        self.task = asyncio.create_task(ownership.run(TaskHealth(name)), name=f"ownership-{name}")

    async def crash(self) -> None:
        """Stop without a word, as a kill -9 does: nothing is released."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task  # a round never fails: NATS errors are logged, and leases run out by themselves


@pytest.fixture
async def members(nats_server: EmbeddedServer) -> AsyncIterator[Callable[[str], asyncio.Future[Member]]]:
    """`await join(name)`: a member with its own connection, on one leases bucket per test. A sampler
    checks every 10 ms, for the whole test, that no partition is owned by two members at once."""
    subjects = Subjects(unique_prefix())
    joined: list[Member] = []
    overlaps: list[str] = []

    async def join(name: str) -> Member:
        nc = await nats.connect(nats_server.url, max_reconnect_attempts=0)
        kv = await lease_bucket(nc.jetstream(), subjects, TTL)
        member = Member(name, nc, Ownership(kv, name, PARTITIONS, TTL))
        joined.append(member)
        return member

    async def sample() -> None:
        while True:
            for partition in range(PARTITIONS):
                owners = [member.name for member in joined if member.ownership.owns(partition)]
                if len(owners) > 1:
                    overlaps.append(f"partition {partition}: {owners}")
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    yield join  # type: ignore[misc]
    sampler.cancel()
    for member in joined:
        await member.crash()
        with contextlib.suppress(Exception):
            await member.nc.close()
    assert overlaps == []


def spread(*members: Member) -> list[int]:
    return [len(member.ownership.held()) for member in members]


async def test_two_members_split_the_partitions_evenly(members) -> None:  # type: ignore[no-untyped-def]
    a = await members("a")
    await eventually(lambda: spread(a) == [PARTITIONS])
    b = await members("b")
    await eventually(lambda: spread(a, b) == [PARTITIONS // 2, PARTITIONS // 2])
    assert a.ownership.held().isdisjoint(b.ownership.held())


async def test_a_graceful_stop_hands_the_partitions_over(members) -> None:  # type: ignore[no-untyped-def]
    a, b = await members("a"), await members("b")
    await eventually(lambda: spread(a, b) == [PARTITIONS // 2, PARTITIONS // 2])
    await a.crash()
    await a.ownership.release()
    assert spread(a) == [0]
    await eventually(lambda: spread(b) == [PARTITIONS], timeout=4 * b.ownership.interval + 2)


async def test_a_crashed_member_loses_its_partitions_after_the_lease_time(members) -> None:  # type: ignore[no-untyped-def]
    a, b = await members("a"), await members("b")
    await eventually(lambda: spread(a, b) == [PARTITIONS // 2, PARTITIONS // 2])
    tokens = {lease.partition: lease.token for lease in a.ownership.leases.values()}
    await a.crash()
    await eventually(lambda: spread(b) == [PARTITIONS], timeout=TTL + 4 * b.ownership.interval + 2)
    assert spread(a) == [0]  # its leases ran out on its side too
    for partition, token in tokens.items():  # each new owner holds a larger fencing token
        assert b.ownership.leases[partition].token > token


async def test_a_member_cut_off_from_nats_gives_up_before_another_takes_over(members) -> None:  # type: ignore[no-untyped-def]
    a, b = await members("a"), await members("b")
    await eventually(lambda: spread(a, b) == [PARTITIONS // 2, PARTITIONS // 2])
    await a.nc.close()  # a keeps running, but none of its renewals gets through
    await eventually(lambda: spread(b) == [PARTITIONS], timeout=TTL + 4 * b.ownership.interval + 2)
    assert spread(a) == [0]


class AnswersLost(KeyValue):
    """A real bucket whose next `lose` lease writes (create or update) land on the server but whose
    answers never come back, as when the bucket's leader stops between committing and answering."""

    lose = 0

    @classmethod
    def of(cls, kv: KeyValue) -> AnswersLost:
        lossy = cls.__new__(cls)
        lossy.__dict__.update(kv.__dict__)
        return lossy

    async def _lost(self, revision: int) -> int:
        if self.lose:
            self.lose -= 1
            raise nats.errors.TimeoutError
        return revision

    async def create(self, key: str, value: bytes, validate_keys: bool = True, msg_ttl: float | None = None) -> int:
        return await self._lost(await super().create(key, value, validate_keys=validate_keys, msg_ttl=msg_ttl))

    async def update(self, key: str, value: bytes, last: int | None = None, validate_keys: bool = True) -> int:
        return await self._lost(await super().update(key, value, last=last, validate_keys=validate_keys))


async def test_a_lease_write_whose_answer_was_lost_is_recognised_as_its_own(nats_client: NATS) -> None:
    """A take or a renewal that landed though its answer never came is the member's own: the next round
    goes on from it instead of dropping the partition (which would hand it over for nothing)."""
    kv = AnswersLost.of(await lease_bucket(nats_client.jetstream(), Subjects(unique_prefix()), TTL))
    ownership = Ownership(kv, "a", 2, TTL)
    kv.lose = 2  # both takes land, neither answer arrives
    await ownership.round()
    assert ownership.held() == set()
    await ownership.round()  # the takes are found to be its own, and renewed
    assert ownership.held() == {0, 1}
    tokens = {lease.partition: lease.token for lease in ownership.leases.values()}
    kv.lose = 2  # both renewals land, neither answer arrives
    await ownership.round()
    await ownership.round()
    assert ownership.held() == {0, 1}
    assert {lease.partition: lease.token for lease in ownership.leases.values()} == tokens  # never handed over
