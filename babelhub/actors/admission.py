"""Handing JetStream messages to actors without ever making a shared consumer wait on one of them.

One push consumer serves every conversation (every connection, for raw records), and nats-py runs its
callback one message at a time. If the callback waited for room in one conversation's mailbox — a chat
whose channel API hangs, an actor that cannot load — every other conversation would wait behind it. So
the callback only ever *offers* a message (`ActorSystem.offer`, which never waits) and, when the
mailbox is full, gives the message back to the server with a `nak` and a growing delay; JetStream keeps
it durably and delivers it again later.

Why a delayed `nak` rather than a per-key overflow queue in memory: the backlog of a stuck conversation
then lives in the stream, not in the process, so memory stays bounded by the mailbox sizes and a stuck
conversation cannot take up the consumer's `max_ack_pending` window (which would stall everyone again);
a crash loses nothing that an overflow queue would have held; and no second bound (what to do when the
overflow is full) is needed.

Order per conversation is kept by remembering, per key, the stream sequences that were turned away: a
later message for a key with an earlier one still out is turned away too, until the earlier ones have
come back and been taken. A remembered sequence expires (`hold_seconds` after it was last turned away)
so a message that never returns — terminated elsewhere, or gone with the stream's limits — cannot stall
its key for ever.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import msgspec

from babelhub.actors.runtime import ActorSystem

__all__ = ["Admission", "Letter", "retry_delay"]

M = TypeVar("M")
Callback = Callable[[], Awaitable[None]]
FailureCallback = Callable[[BaseException], Awaitable[None]]

_RETRY_BASE = 0.1
_RETRY_MAX = 5.0


def retry_delay(deliveries: int) -> float:
    """How long a turned-away message stays with the server before it is delivered again: doubling
    with each delivery, so a long-stuck conversation costs few redeliveries."""
    return float(min(_RETRY_MAX, _RETRY_BASE * 2 ** min(max(deliveries - 1, 0), 10)))


class Letter(msgspec.Struct, Generic[M], frozen=True):
    """One message for one actor, with what to do once it is applied, given up, or handed back."""

    key: str
    message: M
    on_applied: Callback | None = None
    on_failed: FailureCallback | None = None
    on_released: Callback | None = None


class Admission:
    """Which keys have messages out with the server, by stream sequence (see the module docstring)."""

    def __init__(self, hold_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._hold_seconds = hold_seconds
        self._clock = clock
        self._out: dict[str, dict[int, float]] = {}  # key -> {stream sequence: expiry}

    def __len__(self) -> int:
        """How many keys have messages out."""
        return len(self._out)

    def offer(self, system: ActorSystem[M], seq: int, letters: Sequence[Letter[M]]) -> bool:
        """Queue all `letters` (one stream message's worth) or none: False means none was queued, and
        the caller gives the message back to the server."""
        counts = Counter(letter.key for letter in letters)
        if any(self._waits(key, seq) for key in counts) or not all(
                system.has_room(key, count) for key, count in counts.items()):
            for key in counts:
                self.turned_away(key, seq)
            return False
        for key in counts:
            self._taken(key, seq)
        for letter in letters:
            on_released = self._releasing(letter.key, seq, letter.on_released)
            queued = system.offer(letter.key, letter.message, letter.on_applied, letter.on_failed, on_released)
            assert queued, "room was checked above, with no await in between"
        return True

    def forget(self, chosen: Callable[[str], bool]) -> None:
        """Drop what is known of the `chosen` keys' messages out: their consumer starts afresh, and a
        message out before may have been applied by another process since (it would never come back)."""
        for key in [key for key in self._out if chosen(key)]:
            del self._out[key]

    def turned_away(self, key: str, seq: int) -> None:
        self._out.setdefault(key, {})[seq] = self._clock() + self._hold_seconds

    def _waits(self, key: str, seq: int) -> bool:
        """Whether an earlier message of `key` is still out: then `seq` must not overtake it."""
        out = self._out.get(key)
        if not out:
            return False
        now = self._clock()
        for expired in [held for held, expiry in out.items() if expiry < now]:
            del out[expired]
        if not out:
            del self._out[key]
            return False
        return min(out) < seq

    def _taken(self, key: str, seq: int) -> None:
        out = self._out.get(key)
        if out is not None:
            out.pop(seq, None)
            if not out:
                del self._out[key]

    def _releasing(self, key: str, seq: int, on_released: Callback | None) -> Callback:
        """A message handed back by its actor is out again: later ones of its key wait for it."""

        async def released() -> None:
            self.turned_away(key, seq)
            if on_released is not None:
                await on_released()

        return released
