"""The hub's own media stream protocol, for clients that are not a telephony provider: a browser's
microphone, a mobile app, a SIP gateway of one's own. Audio travels as `babelhub.audio.AudioFrame`s,
the same bytes the audio services see on NATS, so a client needs no codec of the hub's besides the
21-byte header.

Client → hub:

* text `{"type": "start", "call": "<id>", "caller": "<who>", "format": {"codec": "pcm16", "rate": 16000},
  "plays": {…}, "parameters": {…}}` → `Start`. `format` is how the client's audio comes (`AudioFormat`;
  `frame_ms` is informative); `plays`, optional, is the format the client wants back (by default the
  same). `call` (optional: the hub names one) is the call's id, `caller` the canonical sender id of the
  person calling (a web chat visitor's session, an app's user id), so their chat and call share one
  conversation.
* binary: an `AudioFrame` in the declared format → `Audio` (its timestamp kept). A frame in another
  format, or before `start`, raises `DecodeError` naming the field.
* text `{"type": "dtmf", "digits": "12#"}` → one `Dtmf` per digit; `{"type": "played", "mark": "<name>"}`
  → `Played` (the client has played the audio sent before that mark); `{"type": "stop"}` → `Stop`.

Hub → client: binary `AudioFrame`s in `plays`, 20 ms each, stream id = the call's; text
`{"type": "clear"}` (drop what is queued and not played), `{"type": "mark", "name": "<name>"}` (answer
with `played` once the audio before it has been played), `{"type": "dtmf", "digits": "…"}` and
`{"type": "hangup", "reason": "…"}`.

Authentication: none of its own. A connection of this channel is meant for a page served by the hub
(the `Origin` check of `WebSocket /media/{connection}`) or for clients on a trusted network; put it
behind a reverse proxy that authenticates otherwise.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Annotated, Any, Final, assert_never

import msgspec

from babelhub.audio.frame import AudioFormat, AudioFrame
from babelhub.codecs import native
from babelhub.errors import DecodeError, EncodeError
from babelhub.media import support
from babelhub.media.base import Audio, Dtmf, MediaEvent, MediaSession, Played, Start, Stop, WsFrame

__all__ = ["ClientMedia"]

_FRAME_MS: Final = 20


class ClientMedia(MediaSession):
    """One client's call in the hub's own frame protocol."""

    channel = "client_media"
    outbound_format = AudioFormat(codec="pcm16", rate=16000, frame_ms=_FRAME_MS)
    acknowledges_marks = True
    sends_dtmf = True

    def __init__(self, secrets: Mapping[str, str], options: Mapping[str, Any]) -> None:
        super().__init__(secrets, options)
        self.call = ""
        """The call's id, from `start`; the stream id of the frames sent to the client."""
        self._seq = 0
        self._played_us = 0

    def receive(self, frame: WsFrame) -> list[MediaEvent]:
        if isinstance(frame, bytes):
            return self._audio(frame)
        message: _ClientMessage = native.convert(support.json_frame(frame, "a media client"), _CLIENT_MESSAGE)
        match message:
            case _Start():
                return [self._start(message)]
            case _Dtmf():
                return [Dtmf(digit=digit) for digit in message.digits]
            case _Played():
                return [Played(name=message.mark)]
            case _Stop():
                return [Stop(reason=message.reason)]
            case _:
                assert_never(message)

    def send_audio(self, payload: bytes) -> list[WsFrame]:
        plays = self.outbound_format
        frame = AudioFrame(stream=self._call(), seq=self._seq, timestamp=self._played_us, codec=plays.codec,
                           rate=plays.rate, channels=plays.channels, payload=payload)
        self._seq += 1
        per_ms = plays.bytes_per_ms()
        self._played_us += len(payload) * 1000 // per_ms if per_ms else _FRAME_MS * 1000
        return [frame.to_bytes()]

    def clear(self) -> list[WsFrame]:
        return [support.text(_Clear())]

    def mark(self, name: str) -> list[WsFrame]:
        return [support.text(_Mark(name=name))]

    def dtmf(self, digits: str) -> list[WsFrame]:
        return [support.text(_SendDtmf(digits=digits))]

    def hangup(self, reason: str = "") -> list[WsFrame]:
        return [support.text(_Hangup(reason=reason))]

    def _start(self, start: _Start) -> Start:
        if self.call:
            raise DecodeError("the call has started already", path="$.type")
        for field, audio in (("format", start.format), ("plays", start.plays)):
            if audio is not None and not (8000 <= audio.rate <= 48000 and 1 <= audio.channels <= 8):
                raise DecodeError("audio must be 8000-48000 Hz and 1-8 channels", path=f"$.{field}")
        self.call = start.call or uuid.uuid4().hex
        self.inbound_format = start.format
        if start.plays is not None:
            self.outbound_format = msgspec.structs.replace(start.plays, frame_ms=_FRAME_MS)
        return Start(call_id=self.call, stream_id=self.call, caller=start.caller, callee=start.callee,
                     inbound_format=start.format, parameters=start.parameters)

    def _audio(self, data: bytes) -> list[MediaEvent]:
        if self.inbound_format is None:
            raise DecodeError("audio came before the start message", path="$")
        frame = AudioFrame.from_bytes(data)
        declared = self.inbound_format
        if (frame.codec, frame.rate, frame.channels) != (declared.codec, declared.rate, declared.channels):
            raise DecodeError(f"the frame is {frame.codec} {frame.rate} Hz x{frame.channels}, not the "
                              f"{declared.codec} {declared.rate} Hz x{declared.channels} the start declared",
                              path="codec")
        return [Audio(payload=frame.payload, timestamp_us=frame.timestamp)]

    def _call(self) -> str:
        if not self.call:
            raise EncodeError("nothing can be sent to the client before its start message")
        return self.call


# ------------------------------------------------------------------------------------ wire format

_Id = Annotated[str, msgspec.Meta(max_length=64)]
_Digits = Annotated[str, msgspec.Meta(pattern=r"^[0-9*#A-D]{1,32}$")]


class _Start(msgspec.Struct, tag_field="type", tag="start", forbid_unknown_fields=True):
    format: AudioFormat
    call: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{0,64}$")] = ""
    caller: Annotated[str, msgspec.Meta(max_length=256)] = ""
    callee: Annotated[str, msgspec.Meta(max_length=256)] = ""
    plays: AudioFormat | None = None
    parameters: dict[_Id, Annotated[str, msgspec.Meta(max_length=1024)]] = {}


class _Dtmf(msgspec.Struct, tag_field="type", tag="dtmf", forbid_unknown_fields=True):
    digits: _Digits


class _Played(msgspec.Struct, tag_field="type", tag="played", forbid_unknown_fields=True):
    mark: Annotated[str, msgspec.Meta(max_length=128)]


class _Stop(msgspec.Struct, tag_field="type", tag="stop", forbid_unknown_fields=True):
    reason: Annotated[str, msgspec.Meta(max_length=256)] = ""


_ClientMessage = _Start | _Dtmf | _Played | _Stop
_CLIENT_MESSAGE: Final[Any] = _ClientMessage  # a union is no `type[T]` to mypy; msgspec converts into it


class _Clear(msgspec.Struct, tag_field="type", tag="clear"):
    pass


class _Mark(msgspec.Struct, tag_field="type", tag="mark"):
    name: str


class _SendDtmf(msgspec.Struct, tag_field="type", tag="dtmf"):
    digits: str


class _Hangup(msgspec.Struct, tag_field="type", tag="hangup"):
    reason: str = ""

