"""The connection pacer, on time the test controls: slots, bursts, pauses."""

from __future__ import annotations

import pytest

from babelhub.services.pacing import Pacer
from tests.hubkit import VirtualClock


def test_a_burst_of_one_seconds_worth_goes_at_once_then_calls_are_spaced() -> None:
    clock = VirtualClock()
    pacer = Pacer(4, clock=clock)
    delays = [pacer.reserve() for _ in range(7)]
    assert delays[:4] == [0, 0, 0, 0]
    assert delays[4:] == pytest.approx([0.25, 0.5, 0.75])  # in arrival order, one slot each


def test_a_quiet_connection_gets_its_burst_back() -> None:
    clock = VirtualClock()
    pacer = Pacer(2, clock=clock)
    assert [pacer.reserve() for _ in range(3)] == pytest.approx([0, 0, 0.5])
    clock.now += 10
    assert [pacer.reserve() for _ in range(3)] == pytest.approx([0, 0, 0.5])


def test_a_pause_holds_every_call_and_is_never_shortened() -> None:
    clock = VirtualClock()
    pacer = Pacer(100, clock=clock)
    pacer.pause(3)
    pacer.pause(1)  # a shorter Retry-After from another call does not end the longer pause
    assert pacer.reserve() == pytest.approx(3)
    clock.now += 3
    assert pacer.reserve() == 0


def test_rate_zero_only_pauses() -> None:
    clock = VirtualClock()
    pacer = Pacer(0, clock=clock)
    assert [pacer.reserve() for _ in range(1000)] == [0] * 1000
    pacer.pause(2)
    assert pacer.reserve() == pytest.approx(2)


def test_a_negative_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="rate"):
        Pacer(-1)


async def test_a_pause_that_starts_while_waiting_is_waited_out() -> None:
    clock = VirtualClock()
    pacer = Pacer(1, clock=clock, sleep=clock.sleep)
    assert await pacer.wait() == 0  # the burst
    started = clock.now
    # The channel says "wait 5 s" while this call sleeps towards its slot, one second away.
    clock.on_sleep.append(lambda: pacer.pause(5))
    assert await pacer.wait() == pytest.approx(5)
    assert clock.now == pytest.approx(started + 5)
