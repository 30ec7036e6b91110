"""Plivo Audio Streaming: the WebSocket Plivo opens for a call's `<Stream>` XML element.

Every message is a JSON text frame; Plivo speaks first and the hub never has to answer.

Inbound (Plivo → hub):

* `start` (once) → `Start`: `start.callId` is the call id, `start.streamId` the stream id,
  `start.mediaFormat` (`encoding` `audio/x-mulaw` or `audio/x-l16`, `sampleRate`) the caller's format,
  and the `<Stream extraHeaders>` pairs (`extra_headers`, `key=value` separated by `;` or `,`) the
  parameters. Plivo gives no caller or callee numbers on the socket (only to `statusCallbackUrl`).
* `media` → `Audio`, the base64 `media.payload` decoded (about 20 ms a chunk). Only the `inbound` track
  (the caller) is audio for the hub: a stream with `audioTrack="both"` also forks what Plivo plays,
  which would echo the hub's own voice back to it, so that track yields nothing. The timestamp is
  `media.timestamp` (milliseconds) counted from the first chunk's.
* `dtmf` → `Dtmf` (`dtmf.digit`).
* `playedStream` → `Played` (`name`): Plivo's acknowledgement that the audio sent before a
  `checkpoint` has been played.
* `clearedAudio` (the acknowledgement of `clearAudio`) and unknown events yield nothing. Plivo sends no
  stop message: the stream ends when the socket closes.

Outbound (hub → Plivo), on bidirectional streams only (`<Stream bidirectional="true">`):

* `send_audio` → `playAudio` with `media.contentType`, `media.sampleRate` and the base64 payload. Plivo
  plays only the stream's own `contentType` and rate, so `outbound_format` becomes the caller's format
  once `start` is read (µ-law 8 kHz before, Plivo's recommended `contentType`); packets are 20 ms.
* `mark(name)` → `checkpoint`; `clear()` → `clearAudio`; `dtmf(digits)` → `sendDTMF` (digits 0-9, *,
  #, A-D). `checkpoint` and `clearAudio` name the `streamId` read from `start`, so they are empty before it.
* `hangup()` has no message: the socket's close ends the stream, and the call then ends or goes on
  with the next XML element as `keepCallAlive` says (a hang-up as such is a REST API call).

`audio/x-l16` is 16-bit linear PCM, read as little-endian (the hub's `pcm16`): Plivo's documentation
does not state the byte order, and its own guides hand the payload to speech services as `linear16`.

Authentication: Plivo signs the WebSocket's opening GET with `X-Plivo-Signature-V3` (and, for a
subaccount, `X-Plivo-Signature-Ma-V3`) and `X-Plivo-Signature-V3-Nonce`: base64(HMAC-SHA256(auth token,
`<scheme://host/path>[?<query sorted by name>].<nonce>`)). `verify` checks it with the connection's
`auth_token` against the URL Plivo called (the request's `url`, set from the option `public_url` behind a
proxy); a `https://` spelling of the `wss://` URL Plivo signed is accepted too. The signature holds no
time: a replayed opening request is not caught here.

Limits (Plivo): 64 KB a WebSocket message; about 60 s of audio buffered for playback.

Sources: plivo.com/docs "Audio Streaming Guide" (signature validation, limits, content types), "Audio
Streaming Protocol Reference" (event schemas), "Stream Event Protocol" (`sendDTMF`), the `<Stream>` XML
element; plivo-python `utils/signature_v3.py` (the signed string).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Final, TypeAlias
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import msgspec

from babelhub.audio.frame import AudioCodec, AudioFormat
from babelhub.codecs import native
from babelhub.codecs.base import HttpRequest
from babelhub.codecs.settings import Settings
from babelhub.errors import DecodeError, EncodeError, SignatureError
from babelhub.media import support
from babelhub.media.base import Audio, MediaEvent, MediaSession, Played, Start, WsFrame

__all__ = ["PlivoMedia", "PlivoSecrets"]

CHANNEL: Final = "plivo_media"
PACKET_MS: Final = 20
"""Plivo's chunks are about 20 ms; the hub's packets to it are the same."""

#: `mediaFormat.encoding` / `playAudio` `contentType` ↔ the hub's codec, and the rates Plivo allows.
_CODECS: Final[dict[str, AudioCodec]] = {"audio/x-mulaw": "mulaw", "audio/x-l16": "pcm16"}
_CONTENT_TYPES: Final[dict[AudioCodec, str]] = {codec: name for name, codec in _CODECS.items()}
_RATES: Final[dict[AudioCodec, frozenset[int]]] = {"mulaw": frozenset({8000}), "pcm16": frozenset({8000, 16000})}
_SIGNATURE_HEADERS: Final = ("x-plivo-signature-v3", "x-plivo-signature-ma-v3")
_NONCE_HEADER: Final = "x-plivo-signature-v3-nonce"
#: The WebSocket URL Plivo signs (`wss://`) may be known to the hub by its HTTP spelling.
_WS_SCHEMES: Final = {"https": "wss", "http": "ws", "wss": "https", "ws": "http"}


class PlivoSecrets(Settings, frozen=True, kw_only=True):
    auth_token: str
    """The account's (or subaccount's) Auth Token: Plivo signs the stream's opening request with it
    (`X-Plivo-Signature-V3`)."""


# ---------------------------------------------------------------------------------------- wire format

Number: TypeAlias = support.Number
"""Plivo documents numbers (`sequenceNumber`, `sampleRate`) as JSON numbers; some messages carry them as
strings."""


class _MediaFormat(msgspec.Struct, rename="camel"):
    encoding: str
    sample_rate: Number


class _StartBody(msgspec.Struct, rename="camel"):
    call_id: str
    stream_id: str
    media_format: _MediaFormat
    account_id: str = ""
    tracks: list[str] = []


class _Start(msgspec.Struct, rename="camel"):
    start: _StartBody
    sequence_number: Number = 0
    extra_headers: str = msgspec.field(default="", name="extra_headers")


class _MediaBody(msgspec.Struct):
    payload: str
    track: str = "inbound"
    timestamp: Number | None = None
    chunk: Number = 0


class _Media(msgspec.Struct, rename="camel"):
    media: _MediaBody
    stream_id: str = ""
    sequence_number: Number = 0


class _DtmfBody(msgspec.Struct):
    digit: str
    track: str = "inbound"
    timestamp: Number | None = None


class _Dtmf(msgspec.Struct, rename="camel"):
    dtmf: _DtmfBody
    stream_id: str = ""


class _PlayedStream(msgspec.Struct, rename="camel"):
    name: str
    stream_id: str = ""


class _PlayAudioMedia(msgspec.Struct, rename="camel"):
    content_type: str
    sample_rate: int
    payload: str


class _PlayAudio(msgspec.Struct, tag_field="event", tag="playAudio"):
    media: _PlayAudioMedia


class _Checkpoint(msgspec.Struct, tag_field="event", tag="checkpoint", rename="camel"):
    stream_id: str
    name: str


class _ClearAudio(msgspec.Struct, tag_field="event", tag="clearAudio", rename="camel"):
    stream_id: str


class _SendDtmf(msgspec.Struct, tag_field="event", tag="sendDTMF"):
    dtmf: str




# ---------------------------------------------------------------------------------------- the session


class PlivoMedia(MediaSession):
    """One Plivo audio stream."""

    channel: ClassVar[str] = CHANNEL
    outbound_format: AudioFormat = AudioFormat(codec="mulaw", rate=8000, frame_ms=PACKET_MS)
    acknowledges_marks: ClassVar[bool] = True
    sends_dtmf: ClassVar[bool] = True
    secret_settings: ClassVar[type[Settings]] = PlivoSecrets

    def __init__(self, secrets: Mapping[str, str], options: Mapping[str, Any]) -> None:
        super().__init__(secrets, options)
        self.stream_id = ""
        self._clock = support.TimestampClock()

    # ------------------------------------------------------------------ the opening request

    def verify(self, request: HttpRequest) -> None:
        auth_token = self.secrets.get("auth_token", "")
        if not auth_token:
            raise SignatureError("no auth_token configured for this Plivo connection")
        nonce = request.headers.get(_NONCE_HEADER, "")
        given = [request.headers[name] for name in _SIGNATURE_HEADERS if request.headers.get(name)]
        if not nonce or not given:
            raise SignatureError("missing X-Plivo-Signature-V3 or X-Plivo-Signature-V3-Nonce header")
        if not request.url:
            raise SignatureError("the URL Plivo called is unknown: set the connection option public_url")
        offered = [part.strip() for header in given for part in header.split(",")]
        for url in _url_spellings(request.url):
            expected = _signature(auth_token, url, nonce)
            if any(hmac.compare_digest(candidate.encode(), expected.encode()) for candidate in offered):
                return
        raise SignatureError("X-Plivo-Signature-V3 does not match the URL and nonce")

    # ------------------------------------------------------------------ inbound

    def receive(self, frame: WsFrame) -> list[MediaEvent]:
        # clearedAudio (which acknowledges a clearAudio) and events Plivo adds have no reader: nothing.
        return support.dispatch(self, support.json_frame(frame, "Plivo"), _READERS)

    def _start(self, raw: Any) -> list[MediaEvent]:
        message = native.convert(raw, _Start)
        body = message.start
        inbound = _format(body.media_format)
        self.stream_id = body.stream_id
        self.inbound_format = inbound
        self.outbound_format = inbound  # Plivo plays only the stream's own format
        return [Start(call_id=body.call_id, stream_id=body.stream_id, inbound_format=inbound,
                      parameters=_extra_headers(message.extra_headers))]

    def _audio(self, raw: Any) -> list[MediaEvent]:
        media = native.convert(raw, _Media).media
        if media.track != "inbound":
            return []
        payload = support.audio_payload(media.payload, "$.media.payload")
        return [Audio(payload=payload, timestamp_us=self._clock.media_time_us(media.timestamp, "$.media.timestamp"))]

    def _dtmf(self, raw: Any) -> list[MediaEvent]:
        return [support.dtmf_event(native.convert(raw, _Dtmf).dtmf.digit, "$.dtmf.digit")]

    def _played(self, raw: Any) -> list[MediaEvent]:
        return [Played(name=native.convert(raw, _PlayedStream).name)]

    # ------------------------------------------------------------------ outbound

    def send_audio(self, payload: bytes) -> list[WsFrame]:
        audio = self.outbound_format
        media = _PlayAudioMedia(content_type=_CONTENT_TYPES[audio.codec], sample_rate=audio.rate,
                                payload=base64.b64encode(payload).decode("ascii"))
        return [support.text(_PlayAudio(media=media))]

    def clear(self) -> list[WsFrame]:
        return [support.text(_ClearAudio(stream_id=self.stream_id))] if self.stream_id else []

    def mark(self, name: str) -> list[WsFrame]:
        return [support.text(_Checkpoint(stream_id=self.stream_id, name=name))] if self.stream_id else []

    def dtmf(self, digits: str) -> list[WsFrame]:
        if not digits or not set(digits) <= support.DTMF_DIGITS:
            raise EncodeError(f"DTMF digits must be 0-9, *, # or A-D, not {digits!r}")
        return [support.text(_SendDtmf(dtmf=digits))]


_READERS: Final = {
    "start": PlivoMedia._start,
    "media": PlivoMedia._audio,
    "dtmf": PlivoMedia._dtmf,
    "playedStream": PlivoMedia._played,
}


# ---------------------------------------------------------------------------------------- helpers


def _format(media_format: _MediaFormat) -> AudioFormat:
    codec = _CODECS.get(media_format.encoding)
    if codec is None:
        raise DecodeError(f"encoding {media_format.encoding!r} is none of {', '.join(_CODECS)}",
                          "$.start.mediaFormat.encoding")
    rate = support.sample_rate(media_format.sample_rate, _RATES[codec], "$.start.mediaFormat.sampleRate")
    return AudioFormat(codec=codec, rate=rate, frame_ms=PACKET_MS)


def _extra_headers(text: str) -> dict[str, str]:
    """`<Stream extraHeaders>` as pairs: Plivo's examples separate them by `;` (`userId=1;tier=gold`) and
    by `,` (`test1=12,test2=123`); values may be percent-encoded."""
    pairs: dict[str, str] = {}
    for item in re.split(r"[;,]", text):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            pairs[key.strip()] = unquote(value.strip())
    return pairs


def _url_spellings(url: str) -> list[str]:
    """The URL, and the same with its WebSocket ↔ HTTP scheme (`wss://` ↔ `https://`)."""
    parts = urlsplit(url)
    other = _WS_SCHEMES.get(parts.scheme)
    return [url, urlunsplit(parts._replace(scheme=other))] if other else [url]


def _signature(auth_token: str, url: str, nonce: str) -> str:
    """Plivo's V3 signature of a GET: the URL without its query, then `?` and the query's pairs sorted by
    name (each name's values sorted) joined by `&` when there is a query, then `.` and the nonce."""
    parts = urlsplit(url)
    signed = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    values: dict[str, list[str]] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        values.setdefault(key, []).append(value)
    query = "&".join(f"{key}={value}" for key in sorted(values) for value in sorted(values[key]))
    if query:
        signed += "?" + query
    digest = hmac.new(auth_token.encode(), f"{signed}.{nonce}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()
