"""Outbound pacing of one call's audio: what to hand the provider now, and when to look again.

A provider plays audio in real time and buffers what comes early; audio sent far ahead cannot be
taken back quickly by a `clear` on every provider, and a burst may overflow its buffer. So the hub keeps
the call's outbound audio in its own queue and releases one packet per frame interval, keeping the
provider only `send_ahead` packets ahead of what it is playing. A `clear` (barge-in) empties that queue
at once. Marks travel in the queue, in order with the audio around them: a provider that acknowledges
marks gets the mark itself when the audio before it has been released (its own acknowledgement tells
when it was played); for one that does not, the mark is reported played when the audio before it has
been played out by the pacing clock. While the provider asks the hub to wait (`paused`: its flow
control), no packet leaves; they wait in the queue, which still drops its oldest beyond its length.

`Playout` is pure: the caller gives it the time (`now`), so tests run on a virtual clock.
"""

from __future__ import annotations

from collections import deque

import msgspec

__all__ = ["MarkPlayed", "Playout", "SendAudio", "SendMark", "Step"]


class SendAudio(msgspec.Struct, frozen=True):
    payload: bytes


class SendMark(msgspec.Struct, frozen=True):
    """Hand the mark to the provider, which will acknowledge it when played."""

    name: str


class MarkPlayed(msgspec.Struct, frozen=True):
    """The audio before the mark has been played (by the pacing clock: the provider does not say)."""

    name: str


Step = SendAudio | SendMark | MarkPlayed


class _Mark(msgspec.Struct, frozen=True):
    name: str


class Playout:
    """One call's outbound queue: packets of `frame_ms` each, at most `max_frames` of them waiting
    (a push beyond drops the oldest waiting packet)."""

    def __init__(self, frame_ms: int, max_frames: int, *, send_ahead: int = 3, acknowledges_marks: bool = False,
                 start: float = 0.0) -> None:
        self.frame_seconds = frame_ms / 1000
        self.max_frames = max(1, max_frames)
        self.send_ahead = send_ahead
        self.acknowledges_marks = acknowledges_marks
        self.dropped = 0
        """Packets dropped because the queue was full."""
        self.paused = False
        """Set while the provider says it takes no more audio: packets (and the marks behind them) wait."""
        self._queue: deque[bytes | _Mark] = deque()
        self._waiting_audio = 0
        self._played_until = start
        """When the provider will have played everything released so far (by the pacing clock)."""
        self._marks_in_flight: deque[tuple[float, str]] = deque()
        """Emulated marks released, with when the audio before them is played."""

    def __len__(self) -> int:
        """Packets waiting."""
        return self._waiting_audio

    def push_audio(self, packet: bytes) -> None:
        self._queue.append(packet)
        self._waiting_audio += 1
        if self._waiting_audio > self.max_frames:
            self._drop_oldest_audio()

    def push_mark(self, name: str) -> None:
        self._queue.append(_Mark(name))

    def clear(self, now: float) -> list[Step]:
        """Drop every waiting packet (the provider is told to drop what it buffered too): marks waiting
        or in flight are played at once, since no audio before them is left to play."""
        self._played_until = now
        self._waiting_audio = 0
        marks = [item for item in self._queue if isinstance(item, _Mark)]
        self._queue.clear()
        steps: list[Step] = [MarkPlayed(name) for _, name in self._marks_in_flight]
        self._marks_in_flight.clear()
        steps += [SendMark(m.name) if self.acknowledges_marks else MarkPlayed(m.name) for m in marks]
        return steps

    def due(self, now: float) -> list[Step]:
        """What to do at `now`, in order."""
        steps: list[Step] = []
        while self._marks_in_flight and self._marks_in_flight[0][0] <= now:
            steps.append(MarkPlayed(self._marks_in_flight.popleft()[1]))
        ahead_limit = now + self.send_ahead * self.frame_seconds
        while self._queue:
            item = self._queue[0]
            if isinstance(item, _Mark):
                self._queue.popleft()
                steps += self._release_mark(item.name, now)
                continue
            if self.paused or max(self._played_until, now) + self.frame_seconds > ahead_limit + 1e-9:
                break
            self._queue.popleft()
            self._waiting_audio -= 1
            self._played_until = max(self._played_until, now) + self.frame_seconds
            steps.append(SendAudio(item))
        return steps

    def next_due(self, now: float) -> float | None:
        """When `due` will have something new to do (None: nothing until more is pushed)."""
        times: list[float] = []
        if self._marks_in_flight:
            times.append(self._marks_in_flight[0][0])
        if self._queue and not self.paused:
            # A packet goes when the provider is less than send_ahead packets ahead.
            times.append(self._played_until - (self.send_ahead - 1) * self.frame_seconds)
        return max(now, min(times)) if times else None

    def _release_mark(self, name: str, now: float) -> list[Step]:
        if self.acknowledges_marks:
            return [SendMark(name)]
        if self._played_until <= now:
            return [MarkPlayed(name)]
        self._marks_in_flight.append((self._played_until, name))
        return []

    def _drop_oldest_audio(self) -> None:
        for index, item in enumerate(self._queue):
            if not isinstance(item, _Mark):
                del self._queue[index]
                self._waiting_audio -= 1
                self.dropped += 1
                return
