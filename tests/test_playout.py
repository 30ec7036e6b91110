"""The pacing of a call's outbound audio (`babelhub.audio.playout`), on a virtual clock: packets leave at
the frame interval with a small send-ahead, `clear` drops what waits at once, marks keep their place
among the packets, and a full queue drops its oldest packet."""

from __future__ import annotations

import itertools

from babelhub.audio.playout import MarkPlayed, Playout, SendAudio, SendMark, Step

FRAME = 0.02


def packets(steps: list[Step]) -> list[bytes]:
    return [step.payload for step in steps if isinstance(step, SendAudio)]


def run(playout: Playout, until: float, start: float = 0.0) -> list[tuple[float, Step]]:
    """Drive `playout` as the stream actor does: wake at `next_due`, take what is `due`."""
    now, done = start, []
    while now <= until:
        done += [(now, step) for step in playout.due(now)]
        next_due = playout.next_due(now)
        if next_due is None:
            break
        now = max(next_due, now + 1e-6) if next_due <= now else next_due
    return done


def test_packets_leave_at_the_frame_interval_after_a_small_send_ahead() -> None:
    playout = Playout(20, max_frames=100, send_ahead=3)
    for n in range(10):
        playout.push_audio(bytes([n]))
    sent = run(playout, until=1.0)
    times = [round(at, 6) for at, _ in sent]
    # Three go at once (the provider's small buffer), then one per 20 ms as the provider plays them.
    assert times[:3] == [0.0, 0.0, 0.0]
    assert [round(b - a, 6) for a, b in itertools.pairwise(times[2:])] == [FRAME] * 7
    assert [step.payload for _, step in sent if isinstance(step, SendAudio)] == [bytes([n]) for n in range(10)]


def test_audio_arriving_late_is_sent_at_once_not_bunched_after_a_gap() -> None:
    playout = Playout(20, max_frames=100, send_ahead=3)
    playout.push_audio(b"a")
    assert packets(playout.due(0.0)) == [b"a"]
    playout.push_audio(b"b")  # long after "a" was played: nothing is owed, it goes now
    assert packets(playout.due(1.0)) == [b"b"]


def test_clear_drops_waiting_audio_at_once() -> None:
    playout = Playout(20, max_frames=100, send_ahead=3)
    for n in range(50):
        playout.push_audio(bytes([n]))
    first = packets(playout.due(0.0))
    assert len(first) == 3
    assert playout.clear(0.01) == []
    assert len(playout) == 0
    assert playout.due(0.01) == [] and playout.next_due(0.01) is None
    playout.push_audio(b"new")  # the answer after the barge-in starts right away
    assert packets(playout.due(0.011)) == [b"new"]


def test_an_emulated_mark_is_played_when_the_audio_before_it_has_been_paced_out() -> None:
    playout = Playout(20, max_frames=100, send_ahead=3)
    for n in range(5):
        playout.push_audio(bytes([n]))
    playout.push_mark("end-of-answer")
    playout.push_audio(b"after")
    sent = run(playout, until=1.0)
    played_at = next(at for at, step in sent if step == MarkPlayed("end-of-answer"))
    assert round(played_at, 6) == round(5 * FRAME, 6)  # five packets of 20 ms, played from t=0
    order = [step for _, step in sent]
    assert order.index(SendAudio(b"after")) < order.index(MarkPlayed("end-of-answer"))  # no gap for the mark


def test_an_acknowledged_mark_goes_to_the_provider_right_after_the_audio_before_it() -> None:
    playout = Playout(20, max_frames=100, send_ahead=3, acknowledges_marks=True)
    for n in range(5):
        playout.push_audio(bytes([n]))
    playout.push_mark("m")
    order = [step for _, step in run(playout, until=1.0)]
    assert order == [*(SendAudio(bytes([n])) for n in range(5)), SendMark("m")]


def test_clear_plays_the_marks_waiting_behind_the_dropped_audio() -> None:
    emulated = Playout(20, max_frames=100)
    acknowledged = Playout(20, max_frames=100, acknowledges_marks=True)
    for playout in (emulated, acknowledged):
        for n in range(20):
            playout.push_audio(bytes([n]))
        playout.push_mark("m")
        playout.due(0.0)
    assert emulated.clear(0.01) == [MarkPlayed("m")]
    assert acknowledged.clear(0.01) == [SendMark("m")]  # the provider acknowledges it after its own clear


def test_a_full_queue_drops_the_oldest_packet_and_counts_it() -> None:
    playout = Playout(20, max_frames=4, send_ahead=3)
    playout.push_mark("kept")
    for n in range(7):
        playout.push_audio(bytes([n]))
    assert playout.dropped == 3 and len(playout) == 4
    assert [step for _, step in run(playout, until=1.0)] == [
        MarkPlayed("kept"), *(SendAudio(bytes([n])) for n in range(3, 7))]


def test_while_the_provider_is_paused_nothing_leaves_and_the_queue_stays_bounded() -> None:
    playout = Playout(20, max_frames=4, send_ahead=3, acknowledges_marks=True)  # as Asterisk's
    playout.push_audio(b"before")
    assert playout.due(0.0) == [SendAudio(b"before")]
    playout.paused = True  # the provider's flow control: it takes no more audio for now
    for n in range(6):
        playout.push_audio(bytes([n]))
    playout.push_mark("after")
    assert run(playout, until=1.0, start=0.0) == []  # no packet, and no mark ahead of its audio
    assert playout.next_due(1.0) is None
    assert playout.dropped == 2 and len(playout) == 4  # the oldest went, as when not paused
    playout.paused = False
    sent = run(playout, until=2.0, start=1.0)
    assert [step for _, step in sent] == [*(SendAudio(bytes([n])) for n in range(2, 6)), SendMark("after")]
    # Resumed from now: three at once, then one a frame.
    assert [round(at, 6) for at, _ in sent[:4]] == [1.0, 1.0, 1.0, 1.0 + FRAME]
