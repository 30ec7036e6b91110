"""The actor runtime: order, supervision, give-up, passivation, group commit and backpressure."""

from __future__ import annotations

import asyncio

import pytest

from babelhub.actors.runtime import Actor, ActorSystem

pytestmark = pytest.mark.asyncio


class Journal:
    """What the actors did, shared by a test and its actors (the 'snapshot store' of these tests)."""

    def __init__(self) -> None:
        self.applied: dict[str, list[int]] = {}
        self.checkpoints: dict[str, list[int]] = {}
        self.activations: list[str] = []
        self.passivations: list[str] = []
        self.fail_on: dict[int, int] = {}  # message -> how many more times it raises


class Recorder(Actor[int]):
    def __init__(self, key: str, journal: Journal) -> None:
        super().__init__(key)
        self.journal = journal
        self.state: list[int] = []

    async def on_activate(self) -> None:
        self.journal.activations.append(self.key)
        self.state = list(self.journal.checkpoints.get(self.key, []))

    async def receive(self, message: int) -> None:
        if self.journal.fail_on.get(message, 0) > 0:
            self.journal.fail_on[message] -= 1
            raise ValueError(f"boom on {message}")
        await asyncio.sleep(0)
        self.state.append(message)
        self.journal.applied.setdefault(self.key, []).append(message)

    async def checkpoint(self) -> None:
        self.journal.checkpoints[self.key] = list(self.state)

    async def on_passivate(self) -> None:
        self.journal.passivations.append(self.key)


def system(journal: Journal, **options: float) -> ActorSystem[int]:
    settings: dict[str, float] = {"backoff_base": 0.001, "backoff_max": 0.005, **options}
    return ActorSystem("test", lambda key: Recorder(key, journal), **settings)  # type: ignore[arg-type]


async def test_each_actor_applies_its_messages_in_order_and_acks_after_checkpoint() -> None:
    journal = Journal()
    actors = system(journal)
    acked: list[tuple[str, int, list[int]]] = []

    def ack(key: str, n: int):  # type: ignore[no-untyped-def]
        async def on_applied() -> None:
            # The checkpoint that covers this message was written before its ack.
            acked.append((key, n, list(journal.checkpoints.get(key, []))))
        return on_applied

    for n in range(50):
        for key in ("a", "b", "c"):
            await actors.tell(key, n, ack(key, n))
    await actors.stop()
    for key in ("a", "b", "c"):
        assert journal.applied[key] == list(range(50))
        assert [n for k, n, _ in acked if k == key] == list(range(50))
        assert all(n in covered for k, n, covered in acked if k == key)
    assert sorted(journal.activations) == ["a", "b", "c"]


async def test_a_failing_turn_restarts_from_the_checkpoint_and_then_succeeds() -> None:
    journal = Journal()
    journal.fail_on = {3: 2}
    actors = system(journal)
    for n in range(6):
        await actors.tell("a", n)
    await actors.stop()
    assert journal.applied["a"][-3:] == [3, 4, 5]
    assert journal.activations.count("a") == 3  # first activation + two restarts
    assert actors.restarts_total == 2


async def test_a_message_that_keeps_failing_goes_to_on_failed_and_the_actor_carries_on() -> None:
    journal = Journal()
    journal.fail_on = {1: 100}
    actors = system(journal, max_restarts=2)
    failures: list[BaseException] = []

    async def on_failed(exc: BaseException) -> None:
        failures.append(exc)

    for n in range(3):
        await actors.tell("a", n, on_failed=on_failed)
    await actors.stop()
    assert [str(f) for f in failures] == ["boom on 1"]
    assert journal.checkpoints["a"][-1] == 2
    assert 2 in journal.applied["a"]
    assert actors.failures_total == 1


async def test_idle_actors_passivate_and_reactivate_from_their_checkpoint() -> None:
    journal = Journal()
    actors = system(journal, idle_seconds=0.05)
    await actors.tell("a", 1)
    for _ in range(200):
        if journal.passivations:
            break
        await asyncio.sleep(0.01)
    assert journal.passivations == ["a"] and actors.active == 0
    await actors.tell("a", 2)
    await actors.stop()
    assert journal.activations == ["a", "a"]
    assert journal.checkpoints["a"] == [1, 2]


async def test_the_lru_cap_passivates_the_least_recently_used_actor() -> None:
    journal = Journal()
    actors = system(journal, max_active=2)
    for key in ("a", "b", "c"):
        await actors.tell(key, 1)
    await asyncio.sleep(0.05)
    assert actors.active == 2 and "a" in journal.passivations
    await actors.stop()


async def test_a_full_mailbox_makes_tell_wait() -> None:
    journal = Journal()
    gate = asyncio.Event()

    class Slow(Recorder):
        async def receive(self, message: int) -> None:
            await gate.wait()
            await super().receive(message)

    actors: ActorSystem[int] = ActorSystem("slow", lambda key: Slow(key, journal), mailbox_size=2)
    for n in range(3):  # one in the turn, two in the mailbox
        await actors.tell("a", n)
        await asyncio.sleep(0.01)
    blocked = asyncio.create_task(actors.tell("a", 3), name="blocked-tell")
    await asyncio.sleep(0.05)
    assert not blocked.done()
    gate.set()
    await blocked
    await actors.stop()
    assert journal.applied["a"] == [0, 1, 2, 3]


async def test_an_activation_whose_state_cannot_be_saved_is_given_up_without_acks() -> None:
    journal = Journal()
    broken = {"times": 2}  # the first two checkpoints fail: the activation is abandoned (max_restarts=2)

    class Fragile(Recorder):
        async def checkpoint(self) -> None:
            if broken["times"] > 0:
                broken["times"] -= 1
                raise ConnectionError("store unavailable")
            await super().checkpoint()

    actors: ActorSystem[int] = ActorSystem("fragile", lambda key: Fragile(key, journal), max_restarts=2,
                                           backoff_base=0.001, backoff_max=0.002)
    acked: list[int] = []

    def ack(n: int):  # type: ignore[no-untyped-def]
        async def on_applied() -> None:
            acked.append(n)
        return on_applied

    await actors.tell("a", 1, ack(1))
    for _ in range(200):
        if actors.active == 0:
            break
        await asyncio.sleep(0.01)
    assert actors.active == 0 and acked == []  # given up, nothing acknowledged: JetStream would redeliver
    await actors.tell("a", 1, ack(1))  # the redelivery activates it afresh, and now the store works
    await actors.stop()
    assert acked == [1] and journal.checkpoints["a"] == [1]
    assert journal.activations == ["a", "a"]
