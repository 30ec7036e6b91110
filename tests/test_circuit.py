"""A connection's circuit breaker on time the test controls: one probe at a time, backoff, resume,
deadline, shutdown."""

from __future__ import annotations

import asyncio

import pytest

from babelhub.services.circuit import Circuit, Pass


class SteppedClock:
    """Virtual time for many sleepers at once: a sleep ends only when the test moves time past its end."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (self.now + seconds, woken)
        self._sleepers.append(entry)
        try:
            await woken
        finally:
            self._sleepers.remove(entry)

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        for until, woken in list(self._sleepers):
            if until <= self.now and not woken.done():
                woken.set_result(None)
        await settle()


async def settle() -> None:
    """Let every task that can run, run."""
    for _ in range(20):
        await asyncio.sleep(0)


def circuit_on(clock: SteppedClock, base_delay: float = 0.5, max_delay: float = 4.0) -> Circuit:
    return Circuit(base_delay=base_delay, max_delay=max_delay, clock=clock, sleep=clock.sleep)


def waiting_callers(circuit: Circuit, count: int, deadline: float) -> list[asyncio.Task[Pass | None]]:
    return [asyncio.create_task(circuit.admit(deadline), name=f"caller-{n}") for n in range(count)]


def admitted(tasks: list[asyncio.Task[Pass | None]]) -> list[Pass | None]:
    return [task.result() for task in tasks if task.done()]


async def test_a_closed_circuit_lets_every_call_through_at_once() -> None:
    circuit = circuit_on(SteppedClock())
    assert [await circuit.admit(deadline=2000) for _ in range(5)] == [Pass.CALL] * 5
    assert circuit.probes == 0


async def test_a_failure_opens_it_and_one_probe_at_a_time_tests_the_channel_until_it_answers() -> None:
    clock = SteppedClock()
    circuit = circuit_on(clock)
    circuit.record(await circuit.admit(deadline=5000) or Pass.CALL, answered=False)  # a 503
    assert circuit.state == "open"
    callers = waiting_callers(circuit, 4, deadline=5000)
    await settle()
    assert admitted(callers) == []  # nobody goes while it is open

    await clock.advance(0.5)
    assert admitted(callers) == [Pass.PROBE]  # exactly one probe, the others keep waiting
    circuit.record(Pass.PROBE, answered=False)  # still down: open again, for twice as long
    await clock.advance(0.5)
    assert admitted(callers) == [Pass.PROBE]
    await clock.advance(0.5)
    assert admitted(callers) == [Pass.PROBE, Pass.PROBE]
    circuit.record(Pass.PROBE, answered=True)  # the channel is back: everyone goes
    await settle()
    assert sorted(admitted(callers), key=str) == [Pass.CALL, Pass.CALL, Pass.PROBE, Pass.PROBE]
    assert circuit.state == "closed" and circuit.probes == 2


async def test_pauses_between_probes_double_up_to_the_cap() -> None:
    clock = SteppedClock()
    circuit = circuit_on(clock, base_delay=0.5, max_delay=4.0)
    circuit.record(Pass.CALL, answered=False)
    pauses = []
    for _ in range(6):
        pauses.append(circuit.open_until - clock.now)
        await clock.advance(circuit.open_until - clock.now)
        assert await circuit.admit(deadline=10_000) is Pass.PROBE
        circuit.record(Pass.PROBE, answered=False)
    assert pauses == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


async def test_a_retry_after_longer_than_the_backoff_is_waited_for() -> None:
    clock = SteppedClock()
    circuit = circuit_on(clock)
    circuit.record(Pass.CALL, answered=False, retry_after=7)
    assert circuit.open_until == clock.now + 7
    # A call that was under way when it opened reports its own Retry-After: a longer one still holds.
    circuit.record(Pass.CALL, answered=False, retry_after=9)
    assert circuit.open_until == clock.now + 9
    assert circuit.failed_probes == 0  # neither was a probe


async def test_a_refusal_shows_the_channel_is_up_and_closes_it() -> None:
    clock = SteppedClock()
    circuit = circuit_on(clock)
    circuit.record(Pass.CALL, answered=False)
    await clock.advance(0.5)
    assert await circuit.admit(deadline=2000) is Pass.PROBE
    circuit.record(Pass.PROBE, answered=True)  # a 400: that message fails, the others may go
    assert circuit.state == "closed"
    assert await circuit.admit(deadline=2000) is Pass.CALL


async def test_a_call_gives_up_at_its_deadline_while_the_channel_stays_down() -> None:
    clock = SteppedClock()
    circuit = circuit_on(clock)
    circuit.record(Pass.CALL, answered=False)
    soon, later = circuit.admit(deadline=clock.now + 0.3), circuit.admit(deadline=clock.now + 60)
    early, late = asyncio.create_task(soon), asyncio.create_task(later)
    await clock.advance(0.3)
    assert early.done() and early.result() is None  # too late: the caller fails the message
    assert not late.done()
    await clock.advance(0.2)
    assert late.result() is Pass.PROBE
    assert await circuit.admit(deadline=clock.now) is None  # a deadline already past never waits


async def test_best_effort_calls_never_wait_and_never_probe() -> None:
    clock = SteppedClock()
    circuit = circuit_on(clock)
    assert await circuit.admit(deadline=None) is Pass.CALL
    circuit.record(Pass.CALL, answered=False)
    await clock.advance(10)
    assert await circuit.admit(deadline=None) is None
    assert circuit.probes == 0


async def test_a_cancelled_probe_hands_its_turn_to_the_next_caller() -> None:
    clock = SteppedClock()
    circuit = circuit_on(clock)
    circuit.record(Pass.CALL, answered=False)
    callers = waiting_callers(circuit, 2, deadline=5000)
    await clock.advance(0.5)
    assert admitted(callers) == [Pass.PROBE]
    circuit.release(Pass.PROBE)  # the probing call was cancelled before the channel answered
    await settle()
    assert admitted(callers) == [Pass.PROBE, Pass.PROBE]


async def test_stopping_releases_waiting_calls_without_an_outcome() -> None:
    clock = SteppedClock()
    circuit = circuit_on(clock)
    circuit.record(Pass.CALL, answered=False)
    waiting = asyncio.create_task(circuit.admit(deadline=5000))
    await settle()
    circuit.stop()
    await settle()
    assert waiting.cancelled()  # the message stays unacknowledged: neither sent nor failed
    circuit.record(Pass.PROBE, answered=True)
    assert await circuit.admit(deadline=5000) is Pass.CALL  # a closed circuit still lets calls finish


def test_pauses_must_be_positive_and_ordered() -> None:
    with pytest.raises(ValueError, match="base_delay"):
        Circuit(base_delay=0)
    with pytest.raises(ValueError, match="max_delay"):
        Circuit(base_delay=5, max_delay=1)
