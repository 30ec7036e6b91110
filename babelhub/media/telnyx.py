"""Telnyx media streaming: the WebSocket Telnyx opens to a Call Control `stream_url` (or a TeXML
`<Stream>`), bidirectional when the stream is started with `stream_bidirectional_mode: "rtp"`.

Inbound, every message is a JSON text frame with an `event`:

* `connected` → nothing;
* `start` → `Start`: `start.call_control_id` is the call, the top-level `stream_id` the stream,
  `start.from` / `start.to` the parties, `start.custom_parameters` the stream's custom parameters,
  `start.media_format` the caller's audio: `PCMU` (µ-law) or `PCMA` (A-law) at 8000 Hz, `L16`
  (16-bit linear PCM, in network byte order as RTP carries it: turned into little-endian `pcm16`
  here) or `OPUS`, at the `sample_rate` it names. G.722 and AMR-WB cannot be read: a stream started
  with `stream_codec` `G722` or `AMR-WB` is refused at its start message;
* `media` → `Audio`: `media.payload`, a base64 RTP payload without its header. Telnyx does not
  document the unit of `media.timestamp`, so the hub counts media time itself. The `outbound` track
  of a `both_tracks` stream is what the call plays, not the caller: it yields nothing;
* `dtmf` → `Dtmf` (`dtmf.digit`);
* `mark` → `Played` (`mark.name`): Telnyx returns a mark once the media before it has played, at
  once when nothing is queued, and every queued one when a `clear` drops the media;
* `stop` → `Stop`;
* `error` (`payload.code`, `title`, `detail`: 100003 malformed frame, 100004 invalid media, 100005
  rate limit, …) reports a frame the hub sent → `Trouble` with the code, the title and detail, and the
  message; the stream goes on.

Any other event yields nothing; a known event whose fields do not fit raises `DecodeError` naming the
JSON path.

Outbound (RTP bidirectional mode), messages name no stream: `send_audio` → a `media` message with
the packet in base64 (20 ms packets; Telnyx takes 20 ms to 30 s), `mark` → a `mark` message, `clear`
→ a `clear` message. The packets are in the codec and rate the stream was started with
(`stream_bidirectional_codec`, `stream_bidirectional_sampling_rate`), which Telnyx does not repeat on
the socket: the connection's options `bidirectional_codec` (`PCMU` default, `PCMA`, `L16`) and
`bidirectional_sampling_rate` (8000 default; 16000 or 24000 for L16) must say the same. Telnyx's
default `mp3` mode plays whole MP3 files, at most one a second, which live audio cannot use. The
stream cannot play DTMF or hang up: both are Call Control commands (`send_dtmf`, `hangup`) outside the
socket, and closing the socket ends the stream, not the call.

Authentication: when the stream is started with a `stream_auth_token`, Telnyx sends it in the
`x-telnyx-streaming-auth-token` header of the WebSocket request (and in the `connected` frame); the
connection's secret `stream_auth_token` then must match it. Without that secret nothing is checked:
restrict such a connection by network (TeXML `<Stream>` has no token).

Sources: Telnyx docs "Media Streaming over WebSockets" (programmable voice guide: frames, bidirectional
RTP and MP3 modes, codecs, mark, clear, DTMF and error frames with their codes), the AsyncAPI
reference "Stream call media over WebSocket" (connected frame and its auth-token header, start frame
with custom parameters), the Call Control "Streaming start" command and the TeXML `<Stream>` verb
(codecs and sampling rates).
"""

from __future__ import annotations

import base64
from array import array
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Final, Literal

import msgspec

from babelhub.audio.frame import AudioCodec, AudioFormat
from babelhub.codecs import native
from babelhub.codecs.base import HttpRequest
from babelhub.codecs.settings import ConnectionOptions, Settings
from babelhub.errors import ConfigError, DecodeError, SignatureError
from babelhub.media import support
from babelhub.media.base import Audio, MediaEvent, MediaSession, Played, Start, Stop, Trouble, WsFrame

__all__ = ["TelnyxMedia", "TelnyxMediaOptions", "TelnyxMediaSecrets", "TelnyxStreamError"]

FORMAT: Final = AudioFormat(codec="mulaw", rate=8000, channels=1, frame_ms=20)
"""PCMU at 8000 Hz, Telnyx's default bidirectional codec, 20 ms at a time."""

_ENCODINGS: Final[dict[str, AudioCodec]] = {"PCMU": "mulaw", "PCMA": "alaw", "L16": "pcm16", "OPUS": "opus"}
"""`start.media_format.encoding` values this module reads, as `AudioFormat` codecs."""
_TOKEN_HEADER: Final = "x-telnyx-streaming-auth-token"


class TelnyxMediaSecrets(Settings, frozen=True, kw_only=True):
    stream_auth_token: str = ""
    """The `stream_auth_token` the stream is started with; Telnyx sends it with the WebSocket request.
    Empty: the request is not checked."""


class TelnyxMediaOptions(ConnectionOptions, frozen=True, kw_only=True):
    bidirectional_codec: Literal["PCMU", "PCMA", "L16"] = "PCMU"
    """The `stream_bidirectional_codec` the stream is started with: the codec the hub plays."""
    bidirectional_sampling_rate: Literal[8000, 16000, 24000] = 8000
    """The `stream_bidirectional_sampling_rate` the stream is started with (16000 or 24000 for L16 only)."""


class TelnyxStreamError(msgspec.Struct, frozen=True):
    """An `error` frame: Telnyx could not use something the hub sent."""

    code: int = 0
    title: str = ""
    detail: str = ""


class TelnyxMedia(MediaSession):
    """One Telnyx media stream; the format it plays comes from the connection's options."""

    channel: ClassVar[str] = "telnyx_media"
    outbound_format: AudioFormat = FORMAT
    acknowledges_marks: ClassVar[bool] = True
    secret_settings: ClassVar[type[Settings]] = TelnyxMediaSecrets
    option_settings: ClassVar[type[Settings]] = TelnyxMediaOptions
    settings: TelnyxMediaOptions

    def __init__(self, secrets: Mapping[str, str], options: Mapping[str, Any]) -> None:
        super().__init__(secrets, options)
        # The instance narrows the class's default to the codec the stream was started with.
        self.outbound_format = _outbound_format(self.settings)
        self.stream_id = ""
        """The stream's id from the `start` message."""

    def verify(self, request: HttpRequest) -> None:
        """The `x-telnyx-streaming-auth-token` header must be the connection's `stream_auth_token`."""
        expected = self.secrets.get("stream_auth_token", "")
        if not expected:
            return
        given = request.headers.get(_TOKEN_HEADER, "")
        if not given:
            raise SignatureError("missing x-telnyx-streaming-auth-token header")
        if not native.same_secret(given, expected):
            raise SignatureError("x-telnyx-streaming-auth-token does not match the stream_auth_token")

    def receive(self, frame: WsFrame) -> list[MediaEvent]:
        return support.dispatch(self, support.json_frame(frame, "Telnyx media streaming"), _READERS)

    def send_audio(self, payload: bytes) -> list[WsFrame]:
        if self.outbound_format.codec == "pcm16":
            payload = _swap_bytes(payload)  # RTP's L16 is big-endian
        media = _OutMedia(payload=base64.b64encode(payload).decode("ascii"))
        return [support.text(_OutMediaMessage(media=media))]

    def clear(self) -> list[WsFrame]:
        return [support.text(_OutClearMessage())]

    def mark(self, name: str) -> list[WsFrame]:
        return [support.text(_OutMarkMessage(mark=_Mark(name=name)))]

    # ---------------------------------------------------------------------------------- inbound

    def _start(self, raw: Any) -> list[MediaEvent]:
        message = native.convert(raw, _StartMessage)
        start, audio = message.start, message.start.media_format
        codec = _ENCODINGS.get(audio.encoding)
        if codec is None:
            raise DecodeError(f"audio encoded as {audio.encoding!r} cannot be read: start the stream with "
                              "stream_codec PCMU, PCMA, L16 or OPUS", path="$.start.media_format.encoding")
        self.stream_id = message.stream_id
        self.inbound_format = msgspec.structs.replace(FORMAT, codec=codec, rate=audio.sample_rate,
                                                      channels=audio.channels)
        return [Start(call_id=start.call_control_id, stream_id=message.stream_id, caller=start.from_,
                      callee=start.to, inbound_format=self.inbound_format, parameters=start.custom_parameters)]

    def _media(self, raw: Any) -> list[MediaEvent]:
        media = native.convert(raw, _MediaMessage).media
        if media.track == "outbound":
            return []  # what the call plays (a stream of both tracks), not the caller
        payload = support.audio_payload(media.payload, "$.media.payload")
        if self.inbound_format is not None and self.inbound_format.codec == "pcm16":
            if len(payload) % 2:
                raise DecodeError("L16 audio must hold whole 16-bit samples", path="$.media.payload")
            payload = _swap_bytes(payload)
        return [Audio(payload=payload)]

    def _dtmf(self, raw: Any) -> list[MediaEvent]:
        return [support.dtmf_event(native.convert(raw, _DtmfMessage).dtmf.digit, "$.dtmf.digit")]

    def _mark(self, raw: Any) -> list[MediaEvent]:
        return [Played(name=native.convert(raw, _MarkMessage).mark.name)]

    def _stop(self, raw: Any) -> list[MediaEvent]:
        native.convert(raw, _StopMessage)
        return [Stop()]

    def _error(self, raw: Any) -> list[MediaEvent]:
        error = native.convert(raw, _ErrorMessage).payload
        reason = f"{error.title}: {error.detail}" if error.detail else error.title
        return [Trouble(code=str(error.code), reason=reason, report=msgspec.json.encode(raw))]


_READERS: Final = {
    "start": TelnyxMedia._start,
    "media": TelnyxMedia._media,
    "dtmf": TelnyxMedia._dtmf,
    "mark": TelnyxMedia._mark,
    "stop": TelnyxMedia._stop,
    "error": TelnyxMedia._error,
}


def _outbound_format(chosen: TelnyxMediaOptions) -> AudioFormat:
    """The format the connection's options say the stream plays; `ConfigError` names a wrong option."""
    codec = _ENCODINGS[chosen.bidirectional_codec]
    if codec != "pcm16" and chosen.bidirectional_sampling_rate != 8000:
        raise ConfigError(f"telnyx_media options: {chosen.bidirectional_codec} plays at 8000 Hz only "
                          f"(bidirectional_sampling_rate is {chosen.bidirectional_sampling_rate})")
    return msgspec.structs.replace(FORMAT, codec=codec, rate=chosen.bidirectional_sampling_rate)


def _swap_bytes(payload: bytes) -> bytes:
    """16-bit samples with their two bytes swapped (big-endian ↔ little-endian)."""
    samples = array("h", payload[: len(payload) - len(payload) % 2])
    samples.byteswap()
    return samples.tobytes()



# ------------------------------------------------------------------------------------ wire format


class _MediaFormat(msgspec.Struct):
    encoding: str
    sample_rate: Annotated[int, msgspec.Meta(ge=8000, le=48000)]
    channels: Annotated[int, msgspec.Meta(ge=1, le=8)] = 1


class _StartBody(msgspec.Struct):
    call_control_id: str
    media_format: _MediaFormat
    from_: str = msgspec.field(default="", name="from")
    to: str = ""
    user_id: str = ""
    call_session_id: str = ""
    custom_parameters: dict[str, str] = {}


class _StartMessage(msgspec.Struct):
    start: _StartBody
    stream_id: str = ""


class _Media(msgspec.Struct):
    payload: str
    track: str = "inbound"


class _MediaMessage(msgspec.Struct):
    media: _Media


class _DtmfBody(msgspec.Struct):
    digit: str


class _DtmfMessage(msgspec.Struct):
    dtmf: _DtmfBody


class _Mark(msgspec.Struct):
    name: str


class _MarkMessage(msgspec.Struct):
    mark: _Mark


class _StopBody(msgspec.Struct):
    call_control_id: str = ""


class _StopMessage(msgspec.Struct):
    stop: _StopBody = msgspec.field(default_factory=_StopBody)


class _ErrorMessage(msgspec.Struct):
    payload: TelnyxStreamError = msgspec.field(default_factory=TelnyxStreamError)


class _OutMedia(msgspec.Struct):
    payload: str


class _OutMediaMessage(msgspec.Struct, tag_field="event", tag="media"):
    media: _OutMedia


class _OutMarkMessage(msgspec.Struct, tag_field="event", tag="mark"):
    mark: _Mark


class _OutClearMessage(msgspec.Struct, tag_field="event", tag="clear"):
    pass
