"""The helper for audio services: listen to a call's audio, play audio into it, steer it, follow it.

    service = AudioService(nc, "bh", "acme")
    async with service.calls() as calls:              # every stream of the tenant that starts
        async for started in calls:
            ...
    async for frame in service.listen(stream):         # the caller's audio (`up`)
        await service.play(stream, reply_frame)        # audio to the caller (`down`), any format
    await service.clear(stream)                        # barge-in
    await service.mark(stream, "answer-1")             # a `played` event once heard

Everything travels over core NATS (`babelhub.audio.protocol`): several services may listen to one call
(a recorder and a transcriber), and one may stop and another take over mid-call, since the provider's
socket is held by the hub. A `Feed` subscribes when entered (`async with`) or at its first iteration;
enter it first when what comes must not be missed.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Generic, TypeVar

import msgspec
from nats.aio.client import Client
from nats.aio.subscription import Subscription

from babelhub.audio.frame import AudioFrame
from babelhub.audio.protocol import (
    Clear,
    Control,
    Hangup,
    Mark,
    SendDtmf,
    Started,
    StreamEvent,
    audio_subject,
    decode_event,
)
from babelhub.errors import DecodeError

__all__ = ["AudioService", "Feed"]

log = logging.getLogger("babelhub.audio")

T = TypeVar("T")


class Feed(Generic[T]):
    """A core-NATS subscription read as an async iterator of `T`; what does not parse is skipped."""

    def __init__(self, nc: Client, subject: str, parse: Callable[[bytes], T | None], queue: str = "") -> None:
        self._nc = nc
        self.subject = subject
        self._parse = parse
        self._queue = queue
        self._subscription: Subscription | None = None

    async def open(self) -> Feed[T]:
        """Subscribe, and wait until the server has the subscription."""
        if self._subscription is None:
            self._subscription = await self._nc.subscribe(self.subject, queue=self._queue)
            await self._nc.flush()
        return self

    async def close(self) -> None:
        if self._subscription is not None:
            subscription, self._subscription = self._subscription, None
            await subscription.unsubscribe()

    async def __aenter__(self) -> Feed[T]:
        return await self.open()

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[T]:
        return self._items()

    async def _items(self) -> AsyncIterator[T]:
        await self.open()
        assert self._subscription is not None
        async for msg in self._subscription.messages:
            item = self._parse(msg.data)
            if item is not None:
                yield item


class AudioService:
    """One tenant's audio streams, seen from an audio service."""

    def __init__(self, nc: Client, prefix: str, tenant: str) -> None:
        self.nc = nc
        self.prefix = prefix
        self.tenant = tenant

    def listen(self, stream: str, queue: str = "") -> Feed[AudioFrame]:
        """The caller's audio frames, in order. Services in one `queue` group share the frames (one of
        them gets each); without one, every listener gets every frame."""
        return Feed(self.nc, self._subject(stream, "up"), _frame, queue)

    async def play(self, stream: str, frame: AudioFrame) -> None:
        """Queue `frame` for the caller; its `stream` must be `stream` (the hub ignores any other)."""
        await self.nc.publish(self._subject(stream, "down"), frame.to_bytes())

    def events(self, stream: str = "*") -> Feed[StreamEvent]:
        """A stream's events (`*`: every stream's)."""
        return Feed(self.nc, self._subject(stream, "events"), _event)

    def calls(self) -> Feed[Started]:
        """The `started` events of every stream of the tenant: how a service learns of new calls."""
        return Feed(self.nc, self._subject("*", "events"), _started)

    async def clear(self, stream: str) -> None:
        await self._control(stream, Clear())

    async def mark(self, stream: str, name: str) -> None:
        await self._control(stream, Mark(name=name))

    async def dtmf(self, stream: str, digits: str) -> None:
        await self._control(stream, SendDtmf(digits=digits))

    async def hangup(self, stream: str, reason: str = "") -> None:
        await self._control(stream, Hangup(reason=reason))

    async def _control(self, stream: str, op: Control) -> None:
        await self.nc.publish(self._subject(stream, "control"), msgspec.json.encode(op))

    def _subject(self, stream: str, kind: str) -> str:
        return audio_subject(self.prefix, self.tenant, stream, kind)  # type: ignore[arg-type]


def _frame(data: bytes) -> AudioFrame | None:
    try:
        return AudioFrame.from_bytes(data)
    except DecodeError as exc:
        log.warning("skipped an unreadable audio frame: %s", exc)
        return None


def _event(data: bytes) -> StreamEvent | None:
    try:
        return decode_event(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("skipped an unreadable stream event: %s", exc)
        return None


def _started(data: bytes) -> Started | None:
    event = _event(data)
    return event if isinstance(event, Started) else None
