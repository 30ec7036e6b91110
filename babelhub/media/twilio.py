"""Twilio Media Streams: the WebSocket Twilio opens for `<Connect><Stream>` (bidirectional) or
`<Start><Stream>` (listen only).

Inbound, every message is a JSON text frame with an `event`:

* `connected` (the protocol's name and version) → nothing;
* `start` → `Start`: `start.callSid` is the call, `start.streamSid` the stream, `start.mediaFormat`
  the caller's audio (always `audio/x-mulaw`, 8000 Hz, mono), `start.customParameters` the TwiML's
  `<Parameter>`s. Twilio's start message does not name the parties: pass `{{From}}` and `{{To}}` as
  `<Parameter>`s, and they arrive in `parameters`;
* `media` → `Audio`: `media.payload` (base64 µ-law), `media.timestamp` (milliseconds since the stream
  began). A `<Start><Stream track="both_tracks">` also streams the `outbound` track, which is what
  the call plays rather than what the caller says: it yields nothing;
* `dtmf` → `Dtmf` (`dtmf.digit`);
* `mark` → `Played` (`mark.name`): Twilio echoes a mark the hub sent once the audio sent before it has
  played, and also when a `clear` dropped that audio;
* `stop` → `Stop`.

Any other event yields nothing (Twilio may add some); a known event whose fields do not fit raises
`DecodeError` naming the JSON path.

Outbound (bidirectional streams only), every message carries the `streamSid` the start message
named, so nothing can be sent before it: `send_audio` → a `media` message with the packet in
base64 (µ-law 8000 Hz mono, no file header; 20 ms packets of 160 bytes, though Twilio takes any
size and queues them), `mark` → a `mark` message, `clear` → a `clear` message (drops the audio queued
and not played yet). Media Streams cannot play DTMF to the call and has no hang-up message: the hub
closes the socket, which ends `<Connect><Stream>`; Twilio then runs the TwiML after it (and hangs up
when there is none).

Authentication: Twilio signs the WebSocket's opening request like its webhooks, an
`X-Twilio-Signature` of base64(HMAC-SHA1(auth token, the `wss://` URL)) — the request is a GET
without a body, and `<Stream>` URLs take no query string. The connection's secret `auth_token`
verifies it; the hub must know the URL Twilio called (the connection option `public_url` behind a
proxy).

Sources: Twilio docs "Media Streams - WebSocket Messages", "TwiML Voice: <Stream>", "Webhooks
security" (signature), and the error pages 31920-31924 (wss only, no query string, the messages a
bidirectional stream accepts).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Final
from urllib.parse import urlsplit

import msgspec

from babelhub.audio.frame import AudioCodec, AudioFormat
from babelhub.codecs import native
from babelhub.codecs.base import HttpRequest
from babelhub.codecs.settings import Settings
from babelhub.errors import DecodeError, EncodeError, SignatureError
from babelhub.media import support
from babelhub.media.base import Audio, MediaEvent, MediaSession, Played, Start, Stop, WsFrame

__all__ = ["TwilioMedia", "TwilioMediaSecrets"]

FORMAT: Final = AudioFormat(codec="mulaw", rate=8000, channels=1, frame_ms=20)
"""What Twilio streams and plays: µ-law 8000 Hz mono; the hub sends it 20 ms at a time."""

_ENCODINGS: Final[dict[str, AudioCodec]] = {"audio/x-mulaw": "mulaw"}
"""`start.mediaFormat.encoding` values Twilio documents, as `AudioFormat` codecs."""
_DEFAULT_PORTS: Final = {"wss": 443, "https": 443, "ws": 80, "http": 80}


class TwilioMediaSecrets(Settings, frozen=True, kw_only=True):
    auth_token: str
    """The account's auth token: Twilio signs the stream's WebSocket request with it
    (`X-Twilio-Signature`)."""


class TwilioMedia(MediaSession):
    """One Twilio Media Stream: its `streamSid` is known from the `start` message on."""

    channel: ClassVar[str] = "twilio_media"
    outbound_format: AudioFormat = FORMAT
    acknowledges_marks: ClassVar[bool] = True
    secret_settings: ClassVar[type[Settings]] = TwilioMediaSecrets

    def __init__(self, secrets: Mapping[str, str], options: Mapping[str, Any]) -> None:
        super().__init__(secrets, options)
        self.stream_sid = ""
        """The stream's id from the `start` message, echoed in every outbound message."""

    def verify(self, request: HttpRequest) -> None:
        """`X-Twilio-Signature` = base64(HMAC-SHA1(auth_token, URL)). Twilio signs the URL it called,
        with or without the default port, so both spellings are accepted, as for its webhooks."""
        auth_token = self.secrets.get("auth_token", "")
        if not auth_token:
            raise SignatureError("no auth_token configured for this Twilio media connection")
        given = request.headers.get("x-twilio-signature", "")
        if not given:
            raise SignatureError("missing X-Twilio-Signature header")
        if not request.url:
            raise SignatureError("the URL Twilio called is unknown: set the connection option public_url")
        if request.body:
            raise SignatureError("the WebSocket request has a body, which no Twilio signature covers")
        for url in _url_spellings(request.url):
            if native.same_secret(given, _signature(auth_token, url)):
                return
        raise SignatureError("X-Twilio-Signature does not match the URL")

    def receive(self, frame: WsFrame) -> list[MediaEvent]:
        text = support.text_frame(frame, "Twilio Media Streams")
        try:
            message = _read_message(text)
        except (msgspec.DecodeError, RecursionError):
            message = None  # the generic path below says what is wrong, and where
        if message is not None and message.event == "media" and message.media is not None:
            return self._media_events(message.media)
        return support.dispatch(self, support.json_frame(text, "Twilio Media Streams"), _READERS)

    def send_audio(self, payload: bytes) -> list[WsFrame]:
        media = _OutMedia(payload=base64.b64encode(payload).decode("ascii"))
        return [support.text(_OutMediaMessage(stream_sid=self._stream(), media=media))]

    def clear(self) -> list[WsFrame]:
        return [support.text(_OutClearMessage(stream_sid=self._stream()))]

    def mark(self, name: str) -> list[WsFrame]:
        return [support.text(_OutMarkMessage(stream_sid=self._stream(), mark=_Mark(name=name)))]

    def _stream(self) -> str:
        if not self.stream_sid:
            raise EncodeError("nothing can be sent to Twilio before its start message names the streamSid")
        return self.stream_sid

    # ---------------------------------------------------------------------------------- inbound

    def _start(self, raw: Any) -> list[MediaEvent]:
        start = native.convert(raw, _StartMessage).start
        audio = start.media_format
        codec = _ENCODINGS.get(audio.encoding)
        if codec is None:
            raise DecodeError(f"unknown audio encoding {audio.encoding!r}", path="$.start.mediaFormat.encoding")
        self.stream_sid = start.stream_sid
        self.inbound_format = msgspec.structs.replace(FORMAT, codec=codec, rate=audio.sample_rate,
                                                      channels=audio.channels)
        return [Start(call_id=start.call_sid, stream_id=start.stream_sid, inbound_format=self.inbound_format,
                      parameters=start.custom_parameters)]

    def _media(self, raw: Any) -> list[MediaEvent]:
        return self._media_events(native.convert(raw, _MediaMessage).media)

    def _media_events(self, media: _Media) -> list[MediaEvent]:
        if media.track == "outbound":
            return []  # what the call plays (a listen-only stream of both tracks), not the caller
        payload = support.audio_payload(media.payload, "$.media.payload")
        return [Audio(payload=payload, timestamp_us=media.timestamp * 1000)]

    def _dtmf(self, raw: Any) -> list[MediaEvent]:
        return [support.dtmf_event(native.convert(raw, _DtmfMessage).dtmf.digit, "$.dtmf.digit")]

    def _mark(self, raw: Any) -> list[MediaEvent]:
        return [Played(name=native.convert(raw, _MarkMessage).mark.name)]

    def _stop(self, raw: Any) -> list[MediaEvent]:
        native.convert(raw, _StopMessage)
        return [Stop()]


_READERS: Final = {
    "start": TwilioMedia._start,
    "media": TwilioMedia._media,
    "dtmf": TwilioMedia._dtmf,
    "mark": TwilioMedia._mark,
    "stop": TwilioMedia._stop,
}


# ------------------------------------------------------------------------------------- signature


def _signature(auth_token: str, url: str) -> str:
    digest = hmac.new(auth_token.encode("utf-8"), url.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def _url_spellings(url: str) -> list[str]:
    """`url` as given, and with its scheme's default port added or removed (another port is part of
    what Twilio signed)."""
    parts = urlsplit(url)
    default = _DEFAULT_PORTS.get(parts.scheme)
    if default is None or parts.username is not None or parts.port not in (None, default):
        return [url]
    host = parts.hostname or ""
    other = host if parts.port else f"{host}:{default}"
    return [url, parts._replace(netloc=other).geturl()]


# ------------------------------------------------------------------------------------ wire format


_Count = Annotated[int, msgspec.Meta(ge=0)]


class _MediaFormat(msgspec.Struct, rename="camel"):
    encoding: str
    sample_rate: Annotated[int, msgspec.Meta(ge=8000, le=48000)]
    channels: Annotated[int, msgspec.Meta(ge=1, le=8)] = 1


class _StartBody(msgspec.Struct, rename="camel"):
    stream_sid: str
    call_sid: str
    media_format: _MediaFormat
    account_sid: str = ""
    tracks: list[str] = []
    custom_parameters: dict[str, str] = {}


class _StartMessage(msgspec.Struct):
    start: _StartBody


class _Media(msgspec.Struct):
    payload: str
    timestamp: _Count = 0
    """Milliseconds since the stream began (a string of digits on the wire)."""
    track: str = "inbound"
    chunk: _Count = 0


class _MediaMessage(msgspec.Struct):
    media: _Media


class _AnyMessage(msgspec.Struct):
    """Any inbound message, read for its `event` and, for the `media` messages that come 50 a second,
    straight into their Struct in the same pass (other events take the generic path: `_READERS`)."""

    event: str
    media: _Media | None = None


_read_message: Final = msgspec.json.Decoder(_AnyMessage, strict=False).decode
"""Lenient as `native.convert` is: Twilio writes `timestamp` and `chunk` as strings of digits."""


class _DtmfBody(msgspec.Struct):
    digit: str
    track: str = "inbound_track"


class _DtmfMessage(msgspec.Struct):
    dtmf: _DtmfBody


class _Mark(msgspec.Struct):
    name: str


class _MarkMessage(msgspec.Struct):
    mark: _Mark


class _StopBody(msgspec.Struct, rename="camel"):
    account_sid: str = ""
    call_sid: str = ""


class _StopMessage(msgspec.Struct):
    stop: _StopBody = msgspec.field(default_factory=_StopBody)


class _OutMedia(msgspec.Struct):
    payload: str


class _OutMediaMessage(msgspec.Struct, tag_field="event", tag="media", rename="camel"):
    stream_sid: str
    media: _OutMedia


class _OutMarkMessage(msgspec.Struct, tag_field="event", tag="mark", rename="camel"):
    stream_sid: str
    mark: _Mark


class _OutClearMessage(msgspec.Struct, tag_field="event", tag="clear", rename="camel"):
    stream_sid: str
