"""The actor runtime: order, supervision, give-up, passivation, group commit and backpressure."""

from __future__ import annotations

import asyncio
import tracemalloc

import pytest

from babelhub.actors.admission import Admission, Letter
from babelhub.actors.runtime import Actor, ActorSystem
from tests.hubkit import eventually

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


async def test_an_idle_actor_passivates_while_one_ahead_of_it_is_still_busy() -> None:
    journal = Journal()
    gate = asyncio.Event()

    class Slow(Recorder):
        async def receive(self, message: int) -> None:
            if self.key == "busy":
                await gate.wait()
            await super().receive(message)

    actors: ActorSystem[int] = ActorSystem("sweep", lambda key: Slow(key, journal), idle_seconds=0.05)
    await actors.tell("busy", 1)  # told first: the least recently used, and its turn does not end
    await actors.tell("quiet", 1)
    await eventually(lambda: "quiet" in journal.passivations)
    assert "busy" not in journal.passivations
    gate.set()
    await eventually(lambda: "busy" in journal.passivations)
    await actors.stop()
    assert journal.applied == {"busy": [1], "quiet": [1]}


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


class Unloadable(Recorder):
    """An actor whose state cannot be loaded (a corrupt snapshot): `on_activate` always raises."""

    async def on_activate(self) -> None:
        self.journal.activations.append(self.key)
        if self.key.startswith("bad"):
            raise ValueError(f"snapshot of {self.key} is corrupt")
        await super().on_activate()


async def test_an_actor_that_cannot_activate_gives_its_mail_up_and_the_others_go_on() -> None:
    journal = Journal()
    actors: ActorSystem[int] = ActorSystem("unloadable", lambda key: Unloadable(key, journal), max_restarts=3,
                                           backoff_base=0.001, backoff_max=0.002)
    failures: list[tuple[int, str]] = []

    def failed(n: int):  # type: ignore[no-untyped-def]
        async def on_failed(exc: BaseException) -> None:
            failures.append((n, str(exc)))
        return on_failed

    for n in range(3):
        await actors.tell("bad", n, on_failed=failed(n))
        await actors.tell("good", n)
    await eventually(lambda: len(failures) == 3)
    await asyncio.wait_for(actors.stop(), 10)
    assert [n for n, _ in failures] == [0, 1, 2]
    assert all("corrupt" in reason for _, reason in failures)
    assert journal.applied == {"good": [0, 1, 2]}
    assert journal.activations.count("bad") <= 3 * 3  # bounded tries: never an endless retry loop
    assert actors.failures_total == 3


async def test_stop_does_not_wait_for_an_actor_still_trying_to_activate() -> None:
    journal = Journal()
    actors: ActorSystem[int] = ActorSystem("unloadable", lambda key: Unloadable(key, journal), max_restarts=1000,
                                           backoff_base=30.0, backoff_max=30.0)
    released: list[int] = []

    async def on_released() -> None:
        released.append(1)

    await actors.tell("bad", 1, on_released=on_released)
    await eventually(lambda: journal.activations)
    await asyncio.wait_for(actors.stop(), 10)  # without the fix: stuck in the activation retries for ever
    assert released == [1]  # handed back, neither applied nor given up: a later run tries it again


async def test_offer_never_waits_and_a_full_key_does_not_block_another() -> None:
    journal = Journal()
    gate = asyncio.Event()

    class Slow(Recorder):
        async def receive(self, message: int) -> None:
            if self.key == "stuck":
                await gate.wait()
            await super().receive(message)

    actors: ActorSystem[int] = ActorSystem("slow", lambda key: Slow(key, journal), mailbox_size=2)
    offered = [actors.offer("stuck", n) for n in range(3)]  # the first turn starts only at the next await
    await eventually(lambda: actors.has_room("stuck"))  # the first message is in its turn
    offered.append(actors.offer("stuck", 3))
    assert offered == [True, True, False, True]
    assert not actors.offer("stuck", 4) and not actors.has_room("stuck")
    assert [actors.offer("free", n) for n in range(3)] == [True, True, False]  # each key has its own bound
    await eventually(lambda: journal.applied.get("free", []) == [0, 1])
    assert actors.offer("free", 9)
    await eventually(lambda: 9 in journal.applied.get("free", []))
    gate.set()
    await actors.stop()
    assert journal.applied["stuck"] == [0, 1, 3]


async def test_an_abandoned_activation_releases_everything_it_holds() -> None:
    journal = Journal()
    gate = asyncio.Event()

    class Unsaveable(Recorder):
        async def receive(self, message: int) -> None:
            await gate.wait()
            await super().receive(message)

        async def checkpoint(self) -> None:
            raise ConnectionError("store unavailable")

    actors: ActorSystem[int] = ActorSystem("unsaveable", lambda key: Unsaveable(key, journal), max_restarts=2,
                                           backoff_base=0.001, backoff_max=0.002, checkpoint_every=2)
    settled: list[tuple[str, int]] = []

    def settle(kind: str, n: int):  # type: ignore[no-untyped-def]
        async def callback() -> None:
            settled.append((kind, n))
        return callback

    for n in range(4):  # two are applied then the checkpoint fails; two still wait in the mailbox
        await actors.tell("a", n, settle("applied", n), on_released=settle("released", n))
    gate.set()
    await eventually(lambda: len(settled) == 4)
    assert sorted(settled) == [("released", 0), ("released", 1), ("released", 2), ("released", 3)]
    assert actors.active == 0
    await actors.stop()


async def test_stop_cancels_a_turn_that_never_ends_and_releases_its_mail() -> None:
    journal = Journal()
    never = asyncio.Event()

    class Hung(Recorder):
        async def receive(self, message: int) -> None:
            if message == 1:
                await never.wait()  # a channel API that never answers
            await super().receive(message)

    actors: ActorSystem[int] = ActorSystem("hung", lambda key: Hung(key, journal))
    settled: list[tuple[str, int]] = []

    def settle(kind: str, n: int):  # type: ignore[no-untyped-def]
        async def callback() -> None:
            settled.append((kind, n))
        return callback

    for n in range(3):
        await actors.tell("a", n, settle("applied", n), on_released=settle("released", n))
    await actors.tell("b", 0, settle("applied b", 0))
    await eventually(lambda: journal.applied.get("a") == [0])
    await asyncio.wait_for(actors.stop(grace=0.2), 10)
    assert ("applied b", 0) in settled  # the others drained and were saved as usual
    assert sorted(item for item in settled if item[0] == "released") == [("released", 0), ("released", 1),
                                                                         ("released", 2)]


async def test_admission_keeps_each_keys_order_and_lets_other_keys_pass() -> None:
    journal = Journal()
    gate = asyncio.Event()

    class Slow(Recorder):
        async def receive(self, message: int) -> None:
            if self.key == "stuck":
                await gate.wait()
            await super().receive(message)

    now = [0.0]
    admission = Admission(hold_seconds=60.0, clock=lambda: now[0])
    actors: ActorSystem[int] = ActorSystem("slow", lambda key: Slow(key, journal), mailbox_size=1)

    def offer(key: str, seq: int) -> bool:
        return admission.offer(actors, seq, [Letter(key, seq)])

    async def in_turn(key: str) -> None:
        await eventually(lambda: actors.has_room(key))

    try:
        assert offer("stuck", 1)
        await in_turn("stuck")  # 1 is in its turn, waiting for the gate
        assert offer("stuck", 2)  # fills the mailbox
        assert not offer("stuck", 3)  # full: handed back
        assert offer("other", 4)  # another key is not affected
        gate.set()
        await eventually(lambda: journal.applied.get("stuck") == [1, 2])
        assert not offer("stuck", 5)  # there is room again, but 3 is still out: 5 must not overtake it
        assert offer("stuck", 3)  # 3 comes back first
        await eventually(lambda: 3 in journal.applied["stuck"])
        gate.clear()
        assert offer("stuck", 5)  # then 5, whose turn now waits for the gate
        await in_turn("stuck")
        assert offer("stuck", 6)
        assert not offer("stuck", 7)  # full
        now[0] += 30
        assert not offer("stuck", 8)  # 7 is out
        now[0] += 31  # 7 never came back (terminated elsewhere): after its hold it no longer blocks the key
        gate.set()
        await eventually(lambda: journal.applied["stuck"][-1] == 6)
        assert offer("stuck", 8)
    finally:
        gate.set()
        await actors.stop()
    assert journal.applied["stuck"] == [1, 2, 3, 5, 6, 8] and journal.applied["other"] == [4]


def _serving_tasks(system_name: str) -> list[str]:
    return [task.get_name() for task in asyncio.all_tasks() if task.get_name().startswith(f"{system_name}:")]


async def test_an_idle_actor_is_parked_without_a_task_and_its_next_message_wakes_it() -> None:
    journal = Journal()
    actors = system(journal)
    await actors.tell("a", 1)
    await eventually(lambda: journal.checkpoints.get("a") == [1] and not _serving_tasks("test"))
    assert actors.active == 1  # still active: parked, not passivated
    await actors.tell("a", 2)
    await eventually(lambda: journal.checkpoints.get("a") == [1, 2] and not _serving_tasks("test"))
    assert journal.activations == ["a"] and journal.passivations == []  # woken, not activated anew
    await actors.stop()
    assert journal.passivations == ["a"]  # stopping passivates parked actors too
    assert not [task for task in asyncio.all_tasks() if task.get_name().startswith("test ")]  # nor the sweep


async def test_a_sender_that_gives_up_waiting_for_room_leaves_the_room_to_the_next() -> None:
    journal = Journal()
    gate = asyncio.Event()

    class Slow(Recorder):
        async def receive(self, message: int) -> None:
            await gate.wait()
            await super().receive(message)

    actors: ActorSystem[int] = ActorSystem("slow", lambda key: Slow(key, journal), mailbox_size=1)
    await actors.tell("a", 0)
    await eventually(lambda: actors.has_room("a"))  # 0 is in its turn
    await actors.tell("a", 1)  # fills the mailbox
    impatient = asyncio.create_task(actors.tell("a", 2), name="impatient-tell")
    patient = asyncio.create_task(actors.tell("a", 3), name="patient-tell")
    await asyncio.sleep(0.02)
    impatient.cancel()
    gate.set()
    await asyncio.wait_for(patient, 5)
    await actors.stop()
    assert impatient.cancelled() and journal.applied["a"] == [0, 1, 3]


async def test_an_idle_actor_costs_the_runtime_little_memory() -> None:
    """What the runtime itself keeps per idle actor (its cell, mailbox, bookkeeping), measured with
    tracemalloc: an asyncio task, queue or event per idle actor would cost several KB each."""
    class Idle(Actor[int]):
        async def receive(self, message: int) -> None:
            pass

    count = 2000
    actors: ActorSystem[int] = ActorSystem("idle", Idle)
    keys = [f"conversation-{n}" for n in range(count)]  # made before tracing: they are the caller's
    applied: list[int] = []

    async def on_applied() -> None:
        applied.append(1)

    tracemalloc.start()
    try:
        for key in keys:
            await actors.tell(key, 1, on_applied)
        await eventually(lambda: len(applied) == count)
        await asyncio.sleep(0.05)  # every actor idle
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert actors.active == count
    runtime = snapshot.filter_traces([tracemalloc.Filter(True, "*/babelhub/actors/runtime.py"),
                                      tracemalloc.Filter(True, "*/asyncio/*")])
    per_actor = sum(stat.size for stat in runtime.statistics("filename")) / count
    await actors.stop()
    assert per_actor < 2048, f"{per_actor:.0f} bytes per idle actor"
