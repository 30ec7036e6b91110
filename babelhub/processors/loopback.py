"""The `audio_loopback` processor transport: a built-in audio service that plays every call's audio
back to the caller, so that `make run` shows realtime audio working end to end (the page's microphone
button: browser → hub → NATS → this service → NATS → hub → the speaker).

It is an audio service like yours (`babelhub.audio.AudioService`) on the hub's NATS connection: it
learns of each of its tenant's calls from their `started` event, listens to the call's `up` frames and
publishes each on `down`, until the call's `stopped` event. Hub processes that all run it share each
call's frames as one queue group, so every frame is played back once.
"""

from __future__ import annotations

import asyncio
import contextlib

from babelhub.audio import AudioFrame, AudioService
from babelhub.audio.protocol import Started, Stopped
from babelhub.audio.service import Feed
from babelhub.plugins import ProcessorTransport, Services
from babelhub.services.config import Processor
from babelhub.services.supervise import TaskHealth

__all__ = ["AudioLoopback"]


class AudioLoopback(ProcessorTransport):
    name = "audio_loopback"

    def __init__(self, processor: Processor, services: Services) -> None:
        super().__init__(processor, services)
        self._calls: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.services.spawn(f"audio-loopback-{self.processor.id}", self._follow_calls)

    async def stop(self) -> None:
        for call in list(self._calls):
            call.cancel()
        await asyncio.gather(*self._calls, return_exceptions=True)

    async def _follow_calls(self, health: TaskHealth) -> None:
        ctx = self.services.ctx
        service = AudioService(ctx.nats, ctx.subjects.prefix, self.processor.tenant)
        async with service.calls() as calls:
            health.ok()
            async for started in calls:
                call = asyncio.create_task(self._play_back(service, started), name=f"loopback-{started.stream}")
                self._calls.add(call)
                call.add_done_callback(self._calls.discard)

    async def _play_back(self, service: AudioService, started: Started) -> None:
        stream = started.stream
        async with service.listen(stream, queue=f"loopback-{self.processor.id}") as frames, \
                service.events(stream) as events:
            echo = asyncio.create_task(_echo(service, stream, frames), name=f"loopback-echo-{stream}")
            try:
                async for event in events:
                    if isinstance(event, Stopped):
                        return
            finally:
                echo.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await echo


async def _echo(service: AudioService, stream: str, frames: Feed[AudioFrame]) -> None:
    async for frame in frames:
        await service.play(stream, frame)
