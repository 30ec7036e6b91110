"""Vonage Voice API WebSocket: a call's audio on a socket Vonage opens from an NCCO `connect` action
whose endpoint is `{"type": "websocket", "uri": ..., "content-type": "audio/l16;rate=16000", "headers": {...}}`.

Inbound, what maps to what:

* the first message, a text `{"event": "websocket:connected", "content-type": "audio/l16;rate=16000", ...}`
  → `Start`. The NCCO endpoint's `headers` arrive as top-level fields of this message; they become
  `parameters`, except three that babelhub reads by convention (Vonage's own message names no call): put
  the answer webhook's `uuid`, `from` and `to` in the headers and they become `call_id`, `caller` and
  `callee`. The rate is the inbound format and the outbound one: 8000 or 16000 Hz as documented (24000
  is accepted too: integrations run Vonage at that rate, though the pages read here do not list it).
* binary messages → `Audio`: 16-bit linear PCM, little-endian, mono, 20 ms each (320 bytes at 8 kHz,
  640 at 16 kHz, 960 at 24 kHz). Vonage gives no timestamp: `timestamp_us` is counted from the bytes.
* `{"event": "websocket:dtmf", "digit": "5", "duration": 260}` → `Dtmf` (one digit per key press).
* `{"event": "websocket:notify", "payload": {"name": ...}}` → `Played`: Vonage echoes the payload of a
  `notify` action once the audio queued before it has played; `mark(name)` sends that payload.
* `{"event": "websocket:cleared"}` (the answer to `clear`) and event types Vonage may add → nothing.
* Vonage sends no stop message: the call's end is the socket closing (the hub reports it).

Outbound: `send_audio` writes the same L16 format as binary messages of exactly one 20 ms frame each (a
short last packet is padded with silence: Vonage wants every message 320/640/960 bytes). Vonage buffers
what is sent ahead of real time (1024 messages, about 20 s, as documented), so the hub may send ahead.
`clear()` is `{"action": "clear"}` (drops what Vonage buffered); `mark(name)` is `{"action": "notify",
"payload": {"name": name}}`.

Authentication: with the endpoint's `"authorization": {"type": "vonage"}` Vonage sends the JWT of its
signed webhooks (`Authorization: Bearer <JWT>`, HS256 with the account's signature secret) on the opening
request; with `{"type": "custom", "value": "..."}` it sends that value verbatim as `Authorization`.
`verify` checks whichever the connection's secrets configure; with neither, every socket is accepted
(restrict the endpoint by network).

What Vonage cannot do over this socket: send DTMF to the call, hang up (both are REST calls of the Voice
API, signed with the application's private key), report a stop reason, carry any codec but L16, or send
the caller's and the other party's audio apart (the socket hears the mix of the call).

Sources: Vonage "WebSockets" guide (developer.vonage.com/en/voice/voice-api/concepts/websockets: the
connect action, `websocket:connected`, binary audio and its sizes, `websocket:dtmf`, writing audio; its
current edition adds the `clear` and `notify` actions and the `websocket:cleared` / `websocket:notify`
events, read here through the AsyncAPI description derived from it), the NCCO reference (websocket
endpoint `content-type`, `headers`, `authorization`), Vonage's signed-webhook guides (the JWT) and the
`WebsocketAuthorization` type of Vonage's Node SDK (`vonage`: "the same JWT used for signed webhooks";
`custom`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping
from typing import Any, ClassVar, Final, TypeGuard

import msgspec

from babelhub.audio.frame import AudioFormat
from babelhub.codecs.base import HttpRequest
from babelhub.codecs.settings import Settings
from babelhub.errors import DecodeError, SignatureError
from babelhub.media import support
from babelhub.media.base import MediaEvent, MediaSession, Played, Start, WsFrame

__all__ = ["VonageMedia", "VonageMediaSecrets"]

CHANNEL: Final = "vonage_media"
FRAME_MS: Final = 20
RATES: Final = frozenset({8000, 16000, 24000})
"""The L16 rates of the endpoint's `content-type` (Vonage documents 8000 and 16000)."""
DTMF_DIGITS: Final = support.DTMF_DIGITS - frozenset("ABCD")
"""The keys Vonage reports (it documents no A-D)."""
TOKEN_MAX_AGE: Final = 300.0
"""Seconds a signed opening request's JWT is accepted after its `iat` (and before, for clock skew): the
socket is opened right after Vonage signs it."""

_CONTENT_TYPE: Final = re.compile(r"\s*audio/l16\s*;\s*rate\s*=\s*(\d{4,5})\s*", re.IGNORECASE)
#: Fields of `websocket:connected` that are Vonage's own, not the NCCO headers.
_PROTOCOL_FIELDS: Final = frozenset({"event", "content-type"})
#: Headers babelhub reads as the call's identity (the answer webhook's names for them).
_CALL_ID, _CALLER, _CALLEE = "uuid", "from", "to"


class VonageMediaSecrets(Settings, frozen=True, kw_only=True):
    """How the socket's opening request is authenticated (set at most one; none: not checked)."""

    signature_secret: str = ""
    """The account's signature secret: with the NCCO endpoint's `"authorization": {"type": "vonage"}`
    Vonage signs the opening request with an HS256 JWT (`Authorization: Bearer`)."""
    authorization: str = ""
    """The exact `Authorization` value of the endpoint's `"authorization": {"type": "custom", "value": ...}`."""


# --- wire format


class _Event(msgspec.Struct, frozen=True):
    """Any text message: its kind only."""

    event: str = ""


class _Connected(msgspec.Struct, frozen=True, rename={"content_type": "content-type"}):
    content_type: str


class _Dtmf(msgspec.Struct, frozen=True):
    digit: str
    duration: int | None = None


class _NotifyPayload(msgspec.Struct, frozen=True):
    name: str = ""


class _Notify(msgspec.Struct, frozen=True):
    payload: _NotifyPayload | None = None


# --- the session


class VonageMedia(MediaSession):
    channel: ClassVar[str] = CHANNEL
    outbound_format: AudioFormat = AudioFormat(codec="pcm16", rate=16000, frame_ms=FRAME_MS)
    acknowledges_marks: ClassVar[bool] = True
    secret_settings: ClassVar[type[Settings]] = VonageMediaSecrets

    def __init__(self, secrets: Mapping[str, str], options: Mapping[str, Any]) -> None:
        super().__init__(secrets, options)
        self._caller_audio = support.BinaryAudio()

    # ------------------------------------------------------------------------------- the handshake

    def verify(self, request: HttpRequest) -> None:
        """The opening request's `Authorization`: Vonage's HS256 JWT when `signature_secret` is set, the
        verbatim custom value when `authorization` is; anything goes when neither is."""
        secret = self.secrets.get("signature_secret", "")
        expected = self.secrets.get("authorization", "")
        if secret:
            _verify_vonage_jwt(request, secret)
        elif expected:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), expected.encode()):
                raise SignatureError("the socket's Authorization header is not the configured one")

    # --------------------------------------------------------------------------------- inbound

    def receive(self, frame: WsFrame) -> list[MediaEvent]:
        if isinstance(frame, bytes):
            return [self._caller_audio.read(frame, self.inbound_format, "the websocket:connected message")]
        kind = support.decode_frame(frame, _Event).event
        if kind == "websocket:connected":
            return self._start(frame)
        if kind == "websocket:dtmf":
            return [support.dtmf_event(support.decode_frame(frame, _Dtmf).digit, "$.digit", DTMF_DIGITS)]
        if kind == "websocket:notify":
            payload = support.decode_frame(frame, _Notify).payload
            # A notify whose payload babelhub did not write (no name) acknowledges no mark of ours.
            return [Played(name=payload.name)] if payload is not None and payload.name else []
        return []  # websocket:cleared, and whatever Vonage adds later

    def _start(self, text: str) -> list[MediaEvent]:
        if self.inbound_format is not None:
            return []  # Vonage sends it once; a repeat may not change the stream's format
        connected = support.decode_frame(text, _Connected)
        audio = AudioFormat(codec="pcm16", rate=_rate(connected.content_type), frame_ms=FRAME_MS)
        headers = support.decode_frame(text, dict[str, Any])
        self.inbound_format = audio
        self.outbound_format = audio  # narrowed to the negotiated rate
        parameters = {name: support.parameter_text(value) for name, value in headers.items()
                      if name not in _PROTOCOL_FIELDS}
        return [Start(call_id=parameters.pop(_CALL_ID, ""), caller=parameters.pop(_CALLER, ""),
                      callee=parameters.pop(_CALLEE, ""), inbound_format=audio, parameters=parameters)]

    # -------------------------------------------------------------------------------- outbound

    def send_audio(self, payload: bytes) -> list[WsFrame]:
        """One binary message per 20 ms frame; a short last frame is padded with silence."""
        size = self.outbound_format.frame_bytes()
        return list(support.packets(payload, self.outbound_format, size, size))

    def clear(self) -> list[WsFrame]:
        return [support.text({"action": "clear"})]

    def mark(self, name: str) -> list[WsFrame]:
        return [support.text({"action": "notify", "payload": {"name": name}})]


def _rate(content_type: str) -> int:
    match = _CONTENT_TYPE.fullmatch(content_type)
    if match is None or int(match.group(1)) not in RATES:
        rates = ", ".join(str(rate) for rate in sorted(RATES))
        raise DecodeError(f"content-type must be audio/l16;rate=<{rates}>, not {content_type[:60]!r}",
                          "$.content-type")
    return int(match.group(1))


# --- the signed opening request


def _verify_vonage_jwt(request: HttpRequest, secret: str) -> None:
    """Vonage's signed-webhook JWT on the opening request: HS256 over `header.claims` with the signature
    secret, issued (`iat`) within `TOKEN_MAX_AGE` of the request, and not expired if it says when."""
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise SignatureError("missing Authorization: Bearer token")
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise SignatureError("token is not a JWT (header.payload.signature)")
    header, claims = _jwt_part(parts[0], "header"), _jwt_part(parts[1], "payload")
    if header.get("alg") != "HS256":
        raise SignatureError(f"token algorithm {header.get('alg')!r} is not HS256")
    expected = hmac.new(secret.encode(), f"{parts[0]}.{parts[1]}".encode("ascii"), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, _b64url(parts[2], "signature")):
        raise SignatureError("token signature does not match the signature secret")
    _check_times(claims, request.received_at or time.time())


def _check_times(claims: Mapping[str, Any], now: float) -> None:
    issued = claims.get("iat")
    if not _is_number(issued):
        raise SignatureError("token has no iat")
    if abs(now - issued) > TOKEN_MAX_AGE:
        raise SignatureError("token was not issued within the last few minutes")
    expires = claims.get("exp")
    if expires is not None and (not _is_number(expires) or now > expires + TOKEN_MAX_AGE):
        raise SignatureError("token has expired")


def _is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and abs(value) < 1e12


def _jwt_part(segment: str, name: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64url(segment, name))
    except (ValueError, RecursionError):
        raise SignatureError(f"token {name} is not JSON") from None
    if not isinstance(value, dict):
        raise SignatureError(f"token {name} is not a JSON object")
    return value


def _b64url(segment: str, name: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except ValueError:  # binascii.Error is a ValueError
        raise SignatureError(f"token {name} is not base64url") from None
