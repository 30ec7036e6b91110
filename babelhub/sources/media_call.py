"""The stream actor: one per call on a media socket, between the provider's protocol and NATS.

It turns the caller's audio into `AudioFrame`s on `…audio.<stream>.up`, takes audio for the caller from
`…audio.<stream>.down` (any codec and rate: converted to what the provider plays and cut into its packet
size), paces it out (`babelhub.audio.playout`), obeys `…audio.<stream>.control` and reports on
`…audio.<stream>.events` (`babelhub.audio.protocol`). Nothing of this is persisted: audio is relayed on
core NATS, latency first. Call start and end, DTMF and played marks are also canonical activities on
the caller's conversation, stored the way decoded envelopes are (`Subjects.decoded`, with a dedup id),
so processors see them on `…in.<conversation>` beside the caller's chat.

The stream id is derived from tenant, connection and the provider's call and stream ids: stable for one
call, a safe subject token, and never guessable from another tenant's ids. A `down` frame naming
another stream is ignored and counted; a control operation that cannot be read is kept in the
dead-letter stream, and so is a provider's report that it could not use what the hub sent (`Trouble`,
the first `MAX_TROUBLE_LETTERS` of a call). None of them ends the call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from babelhub import canonical as c
from babelhub.audio import AudioFormat, AudioFrame, Chunker, Converter
from babelhub.audio.frame import FrameWriter
from babelhub.audio.playout import MarkPlayed, Playout, SendAudio, SendMark, Step
from babelhub.audio.protocol import (
    Clear,
    DtmfPressed,
    Hangup,
    Mark,
    Played,
    SendDtmf,
    Started,
    Stopped,
    StreamEvent,
    SubjectKind,
    audio_subject,
    decode_control,
)
from babelhub.errors import DecodeError, EncodeError
from babelhub.media.base import Audio, Dtmf, FlowControl, MediaEvent, MediaSession, Start, Stop, Trouble, WsFrame
from babelhub.media.base import Played as ProviderPlayed
from babelhub.services.connections import ConnectionService
from babelhub.services.context import HubContext
from babelhub.services.deadletters import DeadLetter
from babelhub.services.ingest import NATS_UNAVAILABLE

__all__ = ["CallStream", "stream_id"]

log = logging.getLogger("babelhub.media")

SEND_AHEAD_FRAMES = 3
"""Packets the provider is kept ahead of what it plays: enough to ride out a late wake-up, few enough
that a `clear` leaves little already sent."""

MAX_TROUBLE_LETTERS = 20
"""A call's provider error reports kept as dead letters (and logged); later ones are only counted
(`CallStream.troubles`), so a provider repeating an error cannot flood the dead-letter stream."""

METRICS_BATCH = 50
"""Relayed frames are added to `/metrics` a second of audio at a time, and the rest when the call ends: a
Prometheus increment takes a lock, and a call relays 100 frames a second."""

Send = Callable[[list[WsFrame]], Awaitable[None]]
"""Sends frames to the provider's socket, in order."""


def stream_id(tenant: str, connection: str, call_id: str, provider_stream: str) -> str:
    return c.stable_id("audio-stream", tenant, connection, call_id, provider_stream)


class CallStream:
    """One call's audio between a provider socket (`session`, `send`) and NATS. `handle` takes the
    session's events in order; `close` ends the stream (also when the socket went away). `writable` says
    whether the socket takes a frame now without waiting: audio due at once is then sent straight from
    the `down` subscription, without waking the pacer."""

    def __init__(self, ctx: HubContext, connection: ConnectionService, session: MediaSession, send: Send, *,
                 queue_seconds: float, hang_up: Callable[[str], Coroutine[Any, Any, None]],
                 clock: Callable[[], float] = time.monotonic, writable: Callable[[], bool] = lambda: True) -> None:
        self.ctx = ctx
        self.connection = connection
        self.session = session
        self._send = send
        self._writable = writable
        self._hang_up = hang_up
        self._queue_seconds = queue_seconds
        self._clock = clock
        self.stream = ""
        self._start: Start | None = None
        self._conversation = ""
        self._up_seq = 0
        self._up_media_us = 0
        self.relayed = {"up": 0, "down": 0}
        self.dropped = {"up": 0, "down": 0, "foreign": 0, "unreadable": 0, "unplayed": 0}
        self._playout: Playout | None = None
        self._chunker: Chunker | None = None
        self._converter: Converter | None = None
        self._subscriptions: list[Subscription] = []
        self._up_subject = ""
        self._up_frames: FrameWriter | None = None
        self._wake = asyncio.Event()
        self._sending = asyncio.Lock()
        """Held while frames go to the provider from the pacer or a control operation, so that their
        order is the order they were decided in."""
        self._tasks: list[asyncio.Task[None]] = []
        self._activities: asyncio.Queue[c.Activity | None] = asyncio.Queue()
        self._activity_count = 0
        self._stopped = False
        self.troubles = 0
        """Error reports the provider sent on this call (`Trouble`), kept or not."""
        metrics = ctx.metrics
        self._relayed_up, self._relayed_down = metrics.audio_relayed.labels("up"), metrics.audio_relayed.labels("down")
        self._dropped_up, self._dropped_down = metrics.audio_dropped.labels("up"), metrics.audio_dropped.labels("down")

    # ----------------------------------------------------------------------------- from the provider

    async def handle(self, event: MediaEvent) -> None:
        match event:
            case Start():
                await self._started(event)
            case Audio() if self._start is not None:
                await self._audio_up(event)
            case Dtmf() if self._start is not None:
                await self._event(DtmfPressed(stream=self.stream, digit=event.digit))
                self._activity("dtmf", {"digits": event.digit})
            case ProviderPlayed() if self._start is not None:
                await self._played(event.name, acknowledged=True)
            case FlowControl() if self._playout is not None:
                self._playout.paused = event.paused  # held audio goes again at the pacing's next wake-up
                self._wake.set()
            case Stop():
                await self.close(event.reason or "the provider stopped the stream")
            case Trouble():
                await self._trouble(event)
            case _:
                log.debug("%s: %s before the stream started, ignored", self.connection.id, type(event).__name__)

    async def _started(self, start: Start) -> None:
        if self._start is not None or self._stopped:
            return  # one stream per socket: a repeated start, or one after the end, changes nothing
        connection = self.connection
        self._start = start
        self.stream = stream_id(connection.tenant, connection.id, start.call_id, start.stream_id)
        self._conversation = c.conversation_id(connection.tenant, connection.id, self._caller())
        self._up_subject = self._subject("up")
        self._up_frames = FrameWriter(self.stream, start.inbound_format)
        outbound = self.session.outbound_format
        self._chunker = Chunker(outbound.frame_bytes())
        self._playout = Playout(outbound.frame_ms, int(self._queue_seconds * 1000 / outbound.frame_ms),
                                send_ahead=SEND_AHEAD_FRAMES, acknowledges_marks=self.session.acknowledges_marks,
                                start=self._clock())
        nats = self.ctx.nats
        self._subscriptions = [await nats.subscribe(self._subject("down"), cb=self._audio_down),
                               await nats.subscribe(self._subject("control"), cb=self._control)]
        self._tasks = [asyncio.create_task(self._pace(), name=f"pace-{self.stream}"),
                       asyncio.create_task(self._store_activities(), name=f"activities-{self.stream}")]
        await self._event(Started(
            stream=self.stream, connection=connection.id, channel=connection.channel, conversation=self._conversation,
            call_id=start.call_id, provider_stream=start.stream_id, caller=start.caller, callee=start.callee,
            inbound=start.inbound_format, outbound=outbound, parameters=start.parameters))
        self._activity("call_started", {"callee": start.callee, "parameters": start.parameters})

    def _caller(self) -> str:
        assert self._start is not None
        return self._start.caller or self._start.call_id

    async def _audio_up(self, audio: Audio) -> None:
        assert self._up_frames is not None
        timestamp = audio.timestamp_us if audio.timestamp_us is not None else self._up_media_us
        frame = self._up_frames.frame(self._up_seq, timestamp, audio.payload)
        self._up_seq += 1
        self._up_media_us = timestamp + self._up_frames.duration_us(audio.payload)
        try:
            await self.ctx.nats.publish(self._up_subject, frame)
        except NATS_UNAVAILABLE:
            # Realtime audio is not worth waiting for: a frame NATS cannot take now is gone (the gap in
            # `seq` shows it), and the call goes on.
            self.dropped["up"] += 1
            self._dropped_up.inc()
            return
        self.relayed["up"] += 1
        if self.relayed["up"] % METRICS_BATCH == 0:
            self._relayed_up.inc(METRICS_BATCH)

    async def _trouble(self, trouble: Trouble) -> None:
        """Log the provider's error report and keep it as a dead letter; the call goes on."""
        self.troubles += 1
        if self.troubles > MAX_TROUBLE_LETTERS:
            return
        connection = self.connection
        error = f"{connection.channel} reported error {trouble.code[:40]}: {trouble.reason[:300]}"
        log.warning("%s: %r%s", connection.id, error,
                    "; later reports of this call are not kept" if self.troubles == MAX_TROUBLE_LETTERS else "")
        try:
            await self.ctx.dead_letters.park(DeadLetter(
                stage="media", error=error, tenant=connection.tenant, connection=connection.id,
                subject=f"/media/{connection.id}", body=trouble.report))
        except NATS_UNAVAILABLE as exc:
            log.warning("%s: a provider's error report was not kept: %r", connection.id, exc)

    # ----------------------------------------------------------------------------- from audio services

    async def _audio_down(self, msg: Msg) -> None:
        try:
            frame = AudioFrame.from_bytes(msg.data)
        except DecodeError as exc:
            self.dropped["unreadable"] += 1
            await self._park(f"unreadable audio frame: {exc.reason}", exc.path, msg)
            return
        if frame.stream != self.stream or self._playout is None or self._chunker is None:
            # Frames are published to this stream's subject; one naming another stream is a service's
            # mistake or a try at another call, and is played nowhere.
            self.dropped["foreign"] += 1
            self._dropped_down.inc()
            return
        if not self.session.plays_audio:
            self.dropped["unplayed"] += 1  # a listen-only session: nobody would hear it
            return
        try:
            payload = self._converter_from(frame.format).convert(frame.payload)
        except EncodeError as exc:
            self.dropped["unreadable"] += 1
            await self._park(str(exc), "payload", msg)
            return
        dropped_before, waiting_before = self._playout.dropped, len(self._playout)
        for packet in self._chunker.push(payload):
            self._playout.push_audio(packet)
        if newly_dropped := self._playout.dropped - dropped_before:
            self.dropped["down"] += newly_dropped
            self._dropped_down.inc(newly_dropped)
        if waiting_before:
            # Queued behind other audio, for which the pacer's timer is armed: a backlog (a service
            # sending faster than real time, jitter) costs one wake-up a packet, not two.
            return
        if self._sending.locked() or not self._writable():
            self._wake.set()  # the pacer sends it once the socket and the lock are free
        else:
            await self._send_due()

    async def _send_due(self) -> None:
        """Send what is due now from this task (audio streamed in real time arrives due: no wake-up of the
        pacer, no timer), and leave the pacer to time what is left."""
        assert self._playout is not None
        async with self._sending:
            await self._perform(self._playout.due(self._clock()))
        if self._playout.next_due(self._clock()) is not None:
            self._wake.set()

    def _converter_from(self, source: AudioFormat) -> Converter:
        """The converter of the format the service sends in now, keeping its resampling state from frame
        to frame; only the latest is kept, so a service switching formats cannot make the hub hoard them."""
        if self._converter is None or self._converter.source != source:
            self._converter = Converter(source, self.session.outbound_format)
        return self._converter

    async def _control(self, msg: Msg) -> None:
        try:
            op = decode_control(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self._park(f"unreadable control operation: {exc}", _path_of(exc), msg)
            return
        assert self._playout is not None and self._chunker is not None
        match op:
            case Clear():
                async with self._sending:  # no packet of the cleared audio may follow the provider's clear
                    steps = self._playout.clear(self._clock())
                    self._chunker.clear()
                    await self._send(self.session.clear())
                    await self._perform(steps)
            case Mark() if not self.session.plays_audio:
                # Nothing is played on a listen-only session: the mark is over at once, and says so.
                await self._played(op.name, acknowledged=False, heard=False)
            case Mark():
                self._playout.push_mark(op.name)
                self._wake.set()
            case SendDtmf():
                if not self.session.sends_dtmf:
                    await self._park(f"{self.connection.channel} cannot play DTMF to a call", "$.op", msg)
                    return
                async with self._sending:
                    await self._send(self.session.dtmf(op.digits))
                self._activity("dtmf", {"digits": op.digits}, direction="outbound")
            case Hangup():
                async with self._sending:
                    await self._send(self.session.hangup(op.reason))
                # Not awaited here: ending the stream unsubscribes this very callback's subscription,
                # which would cancel it half-way.
                self._tasks.append(asyncio.create_task(self._hang_up(op.reason or "hung up by an audio service")))

    # --------------------------------------------------------------------------------------- pacing

    async def _pace(self) -> None:
        """Release the queued audio at the provider's frame interval (`Playout`): woken by audio arriving
        at an empty queue that could not be sent at once (`_audio_down`), by control, or by a timer at the
        next packet's time (a timer, not a `wait_for`, which would cost a task per packet)."""
        assert self._playout is not None
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None
        try:
            while True:
                async with self._sending:
                    await self._perform(self._playout.due(self._clock()))
                self._wake.clear()  # what was pushed meanwhile is in next_due below
                if timer is not None:
                    timer.cancel()
                    timer = None
                next_due = self._playout.next_due(self._clock())
                if next_due is not None:  # armed whenever anything waits: see `_audio_down`
                    timer = loop.call_later(max(0.0, next_due - self._clock()), self._wake.set)
                await self._wake.wait()
        finally:
            if timer is not None:
                timer.cancel()

    async def _perform(self, steps: list[Step]) -> None:
        for step in steps:
            match step:
                case SendAudio():
                    await self._send(self.session.send_audio(step.payload))
                    self.relayed["down"] += 1
                    if self.relayed["down"] % METRICS_BATCH == 0:
                        self._relayed_down.inc(METRICS_BATCH)
                case SendMark():
                    await self._send(self.session.mark(step.name))
                case MarkPlayed():
                    await self._played(step.name, acknowledged=False)

    async def _played(self, name: str, *, acknowledged: bool, heard: bool = True) -> None:
        await self._event(Played(stream=self.stream, name=name, acknowledged=acknowledged, heard=heard))
        self._activity("mark", {"name": name, "acknowledged": acknowledged, "heard": heard})

    # ------------------------------------------------------------------------------------------ end

    @property
    def stopped(self) -> bool:
        return self._stopped

    async def close(self, reason: str) -> None:
        """End the stream once: stop pacing and listening, report `stopped`, store the last activity."""
        if self._stopped:
            return
        self._stopped = True
        if self._start is None:
            return
        pacing = self._tasks[0]
        pacing.cancel()
        for subscription in self._subscriptions:
            await subscription.unsubscribe()
        await asyncio.gather(pacing, return_exceptions=True)
        self._relayed_up.inc(self.relayed["up"] % METRICS_BATCH)  # what the batches have not counted yet
        self._relayed_down.inc(self.relayed["down"] % METRICS_BATCH)
        await self._event(Stopped(stream=self.stream, reason=reason, relayed=dict(self.relayed),
                                  dropped=dict(self.dropped)))
        self._activity("call_ended", {"reason": reason})
        self._activities.put_nowait(None)
        await asyncio.gather(self._tasks[1], return_exceptions=True)

    # ---------------------------------------------------------------------------------------- output

    def _subject(self, kind: SubjectKind) -> str:
        return audio_subject(self.ctx.subjects.prefix, self.connection.tenant, self.stream, kind)

    async def _event(self, event: StreamEvent) -> None:
        await self.ctx.nats.publish(self._subject("events"), msgspec.json.encode(event))

    def _activity(self, kind: c.ActivityType, detail: dict[str, Any], direction: c.Direction = "inbound") -> None:
        """Queue a call activity for storage: the audio path never waits for JetStream."""
        assert self._start is not None
        connection, start = self.connection, self._start
        self._activity_count += 1
        caller = self._caller()
        activity = c.Activity(
            id=c.stable_id("call-activity", connection.tenant, connection.id, self.stream, str(self._activity_count)),
            tenant=connection.tenant, direction=direction, ts=c.now(), activity=kind,
            conversation=c.Conversation(id=self._conversation, channel=connection.channel, connection=connection.id,
                                        native_id=caller),
            sender=c.Sender(id=c.sender_id(connection.tenant, connection.id, caller), native_id=caller,
                            handle=start.caller),
            native=c.Native(id=start.call_id),
            detail={"stream": self.stream, "call_id": start.call_id, "provider_stream": start.stream_id, **detail})
        self._activities.put_nowait(activity)

    async def _store_activities(self) -> None:
        while (activity := await self._activities.get()) is not None:
            subject = self.ctx.subjects.decoded(activity.tenant, activity.conversation.id)
            try:
                await self.ctx.publisher.publish(subject, c.encode(activity), dedup=("decoded", activity.id))
            except NATS_UNAVAILABLE as exc:
                log.warning("%s: a %s activity was not stored: %r", self.connection.id, activity.activity, exc)

    async def _park(self, error: str, path: str, msg: Msg) -> None:
        await self.ctx.dead_letters.park(DeadLetter(
            stage="media", error=error, path=path, tenant=self.connection.tenant, connection=self.connection.id,
            subject=msg.subject, body=msg.data))


def _path_of(error: Exception) -> str:
    """msgspec says where a value is wrong as "… - at `$.path`"."""
    _, _, where = str(error).partition(" - at `")
    return where.rstrip("`") or "$"
