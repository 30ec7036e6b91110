"""Exotel AgentStream: the WebSocket Exotel opens for a call's Voicebot (bidirectional) or Stream
(unidirectional) applet.

Every message is a JSON text frame; Exotel speaks first and the hub never has to answer.

Inbound (Exotel → hub):

* `connected` yields nothing (the socket is up; `start` follows).
* `start` → `Start`: `start.call_sid` is the call id, `start.stream_sid` the stream id, `start.from` and
  `start.to` the caller and callee, `start.custom_parameters` the parameters (up to three, from the
  applet URL's query), and `start.media_format.sample_rate` the rate of the caller's audio (8000 by
  default; 16000 or 24000 when the applet URL asks with `?sample-rate=`).
* `media` → `Audio`: the base64 `media.payload`, raw 16-bit little-endian mono PCM (the hub's `pcm16`),
  about 100 ms a chunk. The timestamp is `media.timestamp` (milliseconds) counted from the first chunk's.
* `dtmf` → `Dtmf` (`dtmf.digit`); `mark` → `Played` (`mark.name`): Exotel's acknowledgement that the
  audio sent before that mark has been played; `stop` → `Stop` with `stop.reason` (`stopped` when the
  applet ended, `callended` when the caller hung up). Unknown events yield nothing.

Exotel writes `sequence_number`, `chunk`, `timestamp` and `sample_rate` as strings in some examples and
as numbers in others: both are read.

Outbound (hub → Exotel), Voicebot applet only:

* `send_audio` → `media` with `stream_sid` and the base64 payload, in the caller's own format (Exotel
  plays back the format it streams). Exotel wants chunks of 3,200 to 100,000 bytes, in multiples of
  320 bytes: a chunk that is no multiple of 320 leaves a gap in playback. So `outbound_format.frame_ms`
  is the shortest packet of at least 3,200 bytes in whole 320-byte steps (200 ms at 8 kHz, 100 ms at
  16 kHz, 80 ms at 24 kHz), a shorter last packet is padded with silence to the next 320 bytes, and a
  longer one is cut into several messages.
* `mark(name)` → `mark`; `clear()` → `clear` (drops the audio Exotel has not started playing).
  `media`, `mark` and `clear` name the `stream_sid` read from `start`, so nothing is sent before it.
* Exotel has no message to send DTMF or to hang up: `hangup()` yields nothing, and the socket's close
  ends the stream (the call goes on to the applet's next one).

Authentication: the applet's URL may carry Basic credentials (`wss://<API_KEY>:<API_TOKEN>@host/path`),
which Exotel sends as `Authorization: Basic base64(API_KEY:API_TOKEN)`. With the secrets `api_key` and
`api_token` set, `verify` requires exactly that header; without them nothing is checked, and the
connection must be restricted to Exotel's addresses (Exotel's other documented option, IP whitelisting).

Sources: developer.exotel.com "AgentStream WebSocket protocol" (events, audio format, chunk sizes) and
"Working with the Stream and Voicebot Applet" (configuration: authentication, sample rate, custom
parameters; message examples); support.exotel.com article 3000108630 (chunk size window).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any, ClassVar, Final, TypeAlias

import msgspec

from babelhub.audio.frame import AudioFormat
from babelhub.codecs import native
from babelhub.codecs.base import HttpRequest
from babelhub.codecs.settings import Settings
from babelhub.errors import DecodeError
from babelhub.media import support
from babelhub.media.base import Audio, MediaEvent, MediaSession, Played, Start, Stop, WsFrame

__all__ = ["ExotelMedia", "ExotelSecrets", "packet_ms"]

CHANNEL: Final = "exotel_media"
DEFAULT_RATE: Final = 8000
RATES: Final = frozenset({8000, 16000, 24000})
"""The sample rates the applet offers (`?sample-rate=`)."""
CHUNK_STEP: Final = 320
"""Exotel plays chunks in multiples of 320 bytes (10 ms at 16 kHz, 20 ms at 8 kHz)."""
MIN_CHUNK: Final = 3_200
MAX_CHUNK: Final = 100_000
LARGEST_CHUNK: Final = MAX_CHUNK - MAX_CHUNK % CHUNK_STEP
"""The longest chunk sent: at most `MAX_CHUNK` bytes, in whole `CHUNK_STEP`s (the tail of a packet is
padded with silence to the next step)."""
INBOUND_MS: Final = 100
"""Exotel streams the caller's audio about every 100 ms."""
_ENCODINGS: Final = frozenset({"audio/x-raw", "raw"})
"""`media_format.encoding` as Exotel's two documents spell raw PCM."""


class ExotelSecrets(Settings, frozen=True, kw_only=True):
    api_key: str = ""
    """The user name of the Basic credentials in the applet's URL (`wss://<API_KEY>:<API_TOKEN>@…`);
    empty when the endpoint is protected by IP whitelisting instead."""
    api_token: str = ""
    """The password of those credentials."""


def packet_ms(rate: int) -> int:
    """The shortest packet Exotel takes at `rate` Hz (16-bit mono): at least `MIN_CHUNK` bytes, in whole
    `CHUNK_STEP`s."""
    bytes_per_ms = 2 * rate // 1000
    ms = 1
    while (ms * bytes_per_ms) % CHUNK_STEP or ms * bytes_per_ms < MIN_CHUNK:
        ms += 1
    return ms


# ---------------------------------------------------------------------------------------- wire format

Number: TypeAlias = support.Number


class _MediaFormat(msgspec.Struct):
    encoding: str = "audio/x-raw"
    sample_rate: Number = DEFAULT_RATE
    bit_rate: Number = ""


class _StartBody(msgspec.Struct, rename={"caller": "from", "callee": "to"}):
    call_sid: str
    stream_sid: str = ""
    account_sid: str = ""
    caller: str = ""
    callee: str = ""
    custom_parameters: dict[str, str] = {}
    media_format: _MediaFormat = msgspec.field(default_factory=_MediaFormat)


class _Start(msgspec.Struct):
    start: _StartBody
    stream_sid: str = ""
    sequence_number: Number = 0


class _MediaBody(msgspec.Struct):
    payload: str
    chunk: Number = 0
    timestamp: Number | None = None


class _Media(msgspec.Struct):
    media: _MediaBody
    stream_sid: str = ""
    sequence_number: Number = 0


class _DtmfBody(msgspec.Struct):
    digit: str
    duration: Number = 0


class _Dtmf(msgspec.Struct):
    dtmf: _DtmfBody
    stream_sid: str = ""


class _MarkBody(msgspec.Struct):
    name: str


class _Mark(msgspec.Struct):
    mark: _MarkBody
    stream_sid: str = ""


class _StopBody(msgspec.Struct):
    reason: str = ""
    call_sid: str = ""
    account_sid: str = ""


class _Stop(msgspec.Struct):
    stop: _StopBody = msgspec.field(default_factory=_StopBody)
    stream_sid: str = ""


class _OutMedia(msgspec.Struct):
    payload: str


class _SendMedia(msgspec.Struct, tag_field="event", tag="media"):
    stream_sid: str
    media: _OutMedia


class _SendMark(msgspec.Struct, tag_field="event", tag="mark"):
    stream_sid: str
    mark: _MarkBody


class _SendClear(msgspec.Struct, tag_field="event", tag="clear"):
    stream_sid: str




# ---------------------------------------------------------------------------------------- the session


class ExotelMedia(MediaSession):
    """One Exotel AgentStream (Voicebot or Stream applet)."""

    channel: ClassVar[str] = CHANNEL
    outbound_format: AudioFormat = AudioFormat(codec="pcm16", rate=DEFAULT_RATE,
                                                         frame_ms=packet_ms(DEFAULT_RATE))
    acknowledges_marks: ClassVar[bool] = True
    secret_settings: ClassVar[type[Settings]] = ExotelSecrets

    def __init__(self, secrets: Mapping[str, str], options: Mapping[str, Any]) -> None:
        super().__init__(secrets, options)
        self.stream_sid = ""
        self._clock = support.TimestampClock()

    # ------------------------------------------------------------------ the opening request

    def verify(self, request: HttpRequest) -> None:
        """Basic credentials when the connection has them; nothing otherwise (IP whitelisting)."""
        support.check_basic_credentials(request, self.secrets.get("api_key", ""), self.secrets.get("api_token", ""))

    # ------------------------------------------------------------------ inbound

    def receive(self, frame: WsFrame) -> list[MediaEvent]:
        # `connected` and events Exotel adds have no reader: nothing.
        return support.dispatch(self, support.json_frame(frame, "Exotel"), _READERS)

    def _start(self, raw: Any) -> list[MediaEvent]:
        message = native.convert(raw, _Start)
        body = message.start
        inbound = _format(body.media_format)
        self.stream_sid = body.stream_sid or message.stream_sid
        self.inbound_format = inbound
        # Exotel plays back the format it streams, in its own packet size.
        self.outbound_format = AudioFormat(codec="pcm16", rate=inbound.rate, frame_ms=packet_ms(inbound.rate))
        return [Start(call_id=body.call_sid, stream_id=self.stream_sid, caller=body.caller,
                      callee=body.callee, inbound_format=inbound, parameters=body.custom_parameters)]

    def _audio(self, raw: Any) -> list[MediaEvent]:
        media = native.convert(raw, _Media).media
        payload = support.audio_payload(media.payload, "$.media.payload")
        return [Audio(payload=payload, timestamp_us=self._clock.media_time_us(media.timestamp, "$.media.timestamp"))]

    def _dtmf(self, raw: Any) -> list[MediaEvent]:
        return [support.dtmf_event(native.convert(raw, _Dtmf).dtmf.digit, "$.dtmf.digit")]

    def _mark(self, raw: Any) -> list[MediaEvent]:
        return [Played(name=native.convert(raw, _Mark).mark.name)]

    def _stop(self, raw: Any) -> list[MediaEvent]:
        return [Stop(reason=native.convert(raw, _Stop).stop.reason)]

    # ------------------------------------------------------------------ outbound

    def send_audio(self, payload: bytes) -> list[WsFrame]:
        if not self.stream_sid or not payload:
            return []
        return [support.text(_SendMedia(stream_sid=self.stream_sid,
                                 media=_OutMedia(payload=base64.b64encode(chunk).decode("ascii"))))
                for chunk in support.packets(payload, self.outbound_format, CHUNK_STEP, LARGEST_CHUNK)]

    def clear(self) -> list[WsFrame]:
        return [support.text(_SendClear(stream_sid=self.stream_sid))] if self.stream_sid else []

    def mark(self, name: str) -> list[WsFrame]:
        if not self.stream_sid:
            return []
        return [support.text(_SendMark(stream_sid=self.stream_sid, mark=_MarkBody(name=name)))]


_READERS: Final = {
    "start": ExotelMedia._start,
    "media": ExotelMedia._audio,
    "dtmf": ExotelMedia._dtmf,
    "mark": ExotelMedia._mark,
    "stop": ExotelMedia._stop,
}


# ---------------------------------------------------------------------------------------- helpers


def _format(media_format: _MediaFormat) -> AudioFormat:
    if media_format.encoding not in _ENCODINGS:
        raise DecodeError(f"encoding {media_format.encoding!r} is not raw PCM ({', '.join(sorted(_ENCODINGS))})",
                          "$.start.media_format.encoding")
    rate = support.sample_rate(media_format.sample_rate, RATES, "$.start.media_format.sample_rate")
    return AudioFormat(codec="pcm16", rate=rate, frame_ms=INBOUND_MS)
