"""Genesys Cloud AudioHook: the WebSocket protocol (version 2) behind AudioHook Monitor and Audio Connector.

Genesys Cloud is the protocol's *client*: it opens the WebSocket to the hub (the *server*) for a
conversation and speaks first. Text frames are JSON messages, every one with `version` ("2"), `id` (the
session id, also sent as the `Audiohook-Session-Id` header), `type`, `seq` (the sender's own counter,
1, 2, 3, … without gaps) and `parameters`; the client adds `serverseq` (the last server `seq` it has
seen) and `position` (the stream position as an ISO 8601 duration, `PT12.34S`), the server adds
`clientseq` (the last client `seq` it has read). Binary frames are audio.

Inbound (client → server) maps to events:

* `open` → `Start`: `call_id` = `parameters.conversationId`, `stream_id` = the session `id`, `caller` /
  `callee` = `participant.ani` / `participant.dnis`, `parameters` = the Architect action's
  `inputVariables` plus `genesys.organizationId`, `genesys.participantId`, `genesys.aniName` and
  `genesys.language` where given. The hub answers with `opened`, choosing the first offered medium that is
  PCMU at 8,000 Hz (the only encoding taken here); Monitor offers external+internal (stereo, interleaved
  in the order of `channels`), external or internal alone, so `inbound_format` is µ-law 8 kHz with 1 or
  2 channels. An `open` that offers no PCMU raises `DecodeError` at `$.parameters.media`.
* binary frames → `Audio`, timestamped by counting samples since `open` (plus the gaps a `discarded` or
  `resumed` message reports).
* `dtmf` (Audio Connector) → `Dtmf`; `playback_completed` (Audio Connector) → `Played` for every mark
  set since the last one; `close` → `Stop` (reason `end`, `error`, `disconnect`, `reconnect`) and the
  hub's `closed`; `ping` → the hub's `pong`.
* `paused`, `resumed`, `discarded`, `update`, `error`, `playback_started` and unknown types → nothing.

The counters are checked as the protocol requires: a `seq` that is not the next one, a `serverseq`
beyond what the hub sent, an `id` other than the request's `Audiohook-Session-Id` (or the first
message's), or a `position` that is no duration raises `DecodeError` naming the field.

Outbound (server → client): `send_audio` sends the packet as one binary frame of PCMU 8 kHz mono. Only
Audio Connector (bidirectional) plays it to the caller; AudioHook Monitor is listen-only and silently
drops what the server sends, so a Monitor session (option `monitor`, or one that takes the `internal`
channel, which Audio Connector never streams) has `plays_audio` false and is sent no audio and no
`barge_in`; the hub reports its marks at once as not heard. Packets are 200 ms (1,600 bytes): the
client rate-limits messages (it answers floods with `error` 429), and fewer larger frames stay well
under it. `clear` sends an `event` with a `barge_in` entity (Genesys stops the audio it has queued);
`mark` sends nothing and is
acknowledged by the next `playback_completed` (right away, with the next frame read, when no audio is
waiting to be played, or when `clear` has dropped it); `hangup` sends `disconnect` (reason
`completed`), to which Genesys answers with `close`. There is no DTMF towards the call.

Authentication (`verify`): the `X-API-KEY` header must be the connection's `api_key`. When the
integration has a client secret (`client_secret`, base64 as Genesys shows it), the opening request must
also carry an HTTP Message Signature (RFC 9421, `Signature-Input` / `Signature`) with HMAC-SHA256 keyed
by the decoded secret, `keyid` = the API key, covering `@request-target`, `@authority` and the
`audiohook-organization-id`, `audiohook-session-id`, `audiohook-correlation-id` and `x-api-key` headers,
created at most `SIGNATURE_MAX_AGE_SECONDS` before the request arrived (and not after it, give or take
`CLOCK_SKEW_SECONDS`) and not expired.

Options: `supported_languages` (a list of language codes), answered in `opened` when the `open` asks
for it (`supportedLanguages: true`); none by default. `monitor` (false by default): the connection is an
AudioHook Monitor integration, listen-only.

Cannot do: play DTMF, audio other than PCMU 8 kHz (`L16` offers are passed over), audio back on
AudioHook Monitor, acknowledge marks on Monitor (it never plays anything), resume a broken connection
(AudioHook does not re-establish sessions).

Sources: developer.genesys.cloud/devapps/audiohook (protocol reference, session walkthrough with the
signed request example, features: Monitor and Audio Connector), help.mypurecloud.com "Audio Connector
overview", and Genesys's own AudioHook and Audio Connector sample servers (purecloudlabs,
GenesysCloudBlueprints) for the message types.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar, Final
from urllib.parse import urlencode, urlsplit

import msgspec

from babelhub.audio.frame import AudioFormat
from babelhub.codecs.base import HttpRequest
from babelhub.codecs.settings import ConnectionOptions, Settings
from babelhub.errors import DecodeError, SignatureError
from babelhub.media import support
from babelhub.media.base import MediaEvent, MediaSession, Played, Start, Stop, WsFrame

__all__ = ["CLOCK_SKEW_SECONDS", "SIGNATURE_MAX_AGE_SECONDS", "GenesysMedia", "GenesysOptions", "GenesysSecrets"]

CHANNEL: Final = "genesys_media"
PROTOCOL_VERSION: Final = "2"
RATE: Final = 8000
OUTBOUND_FRAME_MS: Final = 200
SIGNATURE_MAX_AGE_SECONDS: Final = 10
"""How long after it was signed an opening request is still taken (Genesys signs just before connecting)."""
CLOCK_SKEW_SECONDS: Final = 3
"""Tolerated difference between Genesys's clock and the hub's."""
SIGNED_COMPONENTS: Final = frozenset({
    "@request-target", "@authority", "audiohook-organization-id", "audiohook-session-id",
    "audiohook-correlation-id", "x-api-key",
})
"""What the signature must cover, as Genesys signs it."""


class GenesysSecrets(Settings, frozen=True, kw_only=True):
    api_key: str
    """The AudioHook / Audio Connector integration's API Key: Genesys sends it as `X-API-KEY`."""
    client_secret: str = ""
    """The integration's Client Secret (base64, as Genesys shows it): when set, the opening request
    must carry a valid HTTP Message Signature made with it."""


class GenesysOptions(ConnectionOptions, frozen=True, kw_only=True):
    supported_languages: list[str] = []
    """The language codes answered in `opened` when the `open` asks for them (`supportedLanguages`)."""
    monitor: bool = False
    """The connection is an AudioHook Monitor integration: listen-only, whatever media it negotiates. (A
    session that takes the `internal` channel is one in any case: Audio Connector streams only the
    external one.)"""


# --- wire format (client → server messages; only the fields read here)


class _Message(msgspec.Struct, frozen=True):
    version: str
    id: str
    type: str
    seq: int
    serverseq: int = 0
    position: str = "PT0S"
    parameters: msgspec.Raw = msgspec.Raw(b"{}")


class _Participant(msgspec.Struct, frozen=True):
    id: str = ""
    ani: str = ""
    aniName: str = ""
    dnis: str = ""


class _Medium(msgspec.Struct, frozen=True):
    type: str
    format: str
    channels: list[str]
    rate: int


class _Open(msgspec.Struct, frozen=True):
    conversationId: str
    media: list[_Medium]
    organizationId: str = ""
    participant: _Participant = msgspec.field(default_factory=_Participant)
    language: str = ""
    supportedLanguages: bool = False
    inputVariables: dict[str, str] = {}


class _Close(msgspec.Struct, frozen=True):
    reason: str = ""


class _Dtmf(msgspec.Struct, frozen=True):
    digit: str


class _Gap(msgspec.Struct, frozen=True):
    """`discarded` and `resumed`: audio the client dropped (`discarded` long, from `start`)."""

    start: str = "PT0S"
    discarded: str = "PT0S"


_DURATION: Final = re.compile(r"PT(?P<seconds>[0-9]+(?:\.[0-9]+)?)S")


def _duration_us(value: str, path: str) -> int:
    """An AudioHook duration (`PT1.25S`) in microseconds."""
    match = _DURATION.fullmatch(value)
    if match is None:
        raise DecodeError(f"a duration is written PT<seconds>S, not {value[:40]!r}", path)
    try:
        return int(Decimal(match.group("seconds")) * 1_000_000)
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
        raise DecodeError("unreadable duration", path) from None


class GenesysMedia(MediaSession):
    """One AudioHook session (one WebSocket from Genesys Cloud)."""

    channel: ClassVar[str] = CHANNEL
    outbound_format: AudioFormat = AudioFormat(codec="mulaw", rate=RATE, channels=1,
                                                         frame_ms=OUTBOUND_FRAME_MS)
    acknowledges_marks: ClassVar[bool] = True
    secret_settings: ClassVar[type[Settings]] = GenesysSecrets
    option_settings: ClassVar[type[Settings]] = GenesysOptions
    settings: GenesysOptions

    def __init__(self, secrets: Mapping[str, str], options: Mapping[str, Any]) -> None:
        super().__init__(secrets, options)
        self.session_id = ""
        self._client_seq = 0
        self._server_seq = 0
        self._open = False
        self._closed = False
        self._caller_audio = support.BinaryAudio()
        self._marks: list[str] = []  # set since audio was last sent and not yet acknowledged
        self._marks_played: list[str] = []  # set while nothing was waiting to be played
        self._audio_unplayed = False

    # --- opening request

    def verify(self, request: HttpRequest) -> None:
        api_key = self.secrets.get("api_key", "")
        given = request.headers.get("x-api-key", "")
        if not api_key:
            raise SignatureError("no api_key configured for this Genesys AudioHook connection")
        if not given:
            raise SignatureError("missing X-API-KEY header")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise SignatureError("X-API-KEY is not this connection's API key")
        client_secret = self.secrets.get("client_secret", "")
        if client_secret:
            _verify_signature(request, api_key, client_secret)
        # Every message must then carry the session id the request announced.
        self.session_id = request.headers.get("audiohook-session-id", "")

    # --- inbound

    def receive(self, frame: WsFrame) -> list[MediaEvent]:
        if isinstance(frame, bytes):
            events = self._audio(frame)
        else:
            message = support.decode_frame(frame, _Message)
            self._check_counters(message)
            events = self._dispatch(message)
        # Marks set while no audio was waiting to be played are played already: reported with this frame.
        played: list[MediaEvent] = [Played(name=name) for name in self._marks_played]
        self._marks_played.clear()
        return played + events

    def _audio(self, payload: bytes) -> list[MediaEvent]:
        if self._closed:
            raise DecodeError("audio after 'close'", "$")
        return [self._caller_audio.read(payload, self.inbound_format, "the session was opened ('open')")]

    def _check_counters(self, message: _Message) -> None:
        if message.version != PROTOCOL_VERSION:
            raise DecodeError(f"AudioHook protocol version {PROTOCOL_VERSION!r} expected", "$.version")
        if message.seq != self._client_seq + 1:
            raise DecodeError(f"seq must be {self._client_seq + 1}, the one after the last message's",
                              "$.seq")
        if not 0 <= message.serverseq <= self._server_seq:
            raise DecodeError(f"serverseq must be 0-{self._server_seq}: the hub has sent no later message",
                              "$.serverseq")
        if self.session_id and message.id != self.session_id:
            raise DecodeError("the id is not this session's (Audiohook-Session-Id, then the first message's)",
                              "$.id")
        _duration_us(message.position, "$.position")
        self.session_id = message.id
        self._client_seq = message.seq

    def _dispatch(self, message: _Message) -> list[MediaEvent]:
        match message.type:
            case "open":
                return self._on_open(message)
            case "ping":
                self._reply("pong", {})
            case "close":
                return self._on_close(message)
            case "dtmf":
                return self._on_dtmf(message)
            case "playback_completed":
                played, self._marks = self._marks, []
                self._audio_unplayed = False
                return [Played(name=name) for name in played]
            case "discarded" | "resumed":
                gap = support.decode_frame(message.parameters, _Gap, "$.parameters")
                self._caller_audio.skip(_duration_us(gap.discarded, "$.parameters.discarded"))
        return []

    def _on_open(self, message: _Message) -> list[MediaEvent]:
        if self._open:
            raise DecodeError("a second 'open' in one session", "$.type")
        opening = support.decode_frame(message.parameters, _Open, "$.parameters")
        medium = next((medium for medium in opening.media if _takes(medium)), None)
        if medium is None:
            raise DecodeError("none of the offered media is PCMU at 8000 Hz", "$.parameters.media")
        self._open = True
        self.inbound_format = AudioFormat(codec="mulaw", rate=RATE, channels=len(medium.channels), frame_ms=20)
        self.plays_audio = not (self.settings.monitor or "internal" in medium.channels)
        opened: dict[str, Any] = {"media": [msgspec.to_builtins(medium)], "startPaused": False}
        if opening.supportedLanguages:
            opened["supportedLanguages"] = list(self.settings.supported_languages)
        self._reply("opened", opened)
        return [Start(call_id=opening.conversationId, stream_id=message.id, caller=opening.participant.ani,
                      callee=opening.participant.dnis, inbound_format=self.inbound_format,
                      parameters=_start_parameters(opening))]

    def _on_close(self, message: _Message) -> list[MediaEvent]:
        close = support.decode_frame(message.parameters, _Close, "$.parameters")
        self._closed = True
        self._reply("closed", {})
        return [Stop(reason=close.reason)]

    def _on_dtmf(self, message: _Message) -> list[MediaEvent]:
        digit = support.decode_frame(message.parameters, _Dtmf, "$.parameters").digit
        return [support.dtmf_event(digit, "$.parameters.digit")]

    # --- outbound

    def send_audio(self, payload: bytes) -> list[WsFrame]:
        if not self._open or self._closed or not self.plays_audio or not payload:
            return []
        self._audio_unplayed = True
        return [bytes(payload)]

    def clear(self) -> list[WsFrame]:
        if not self._open or self._closed or not self.plays_audio:
            return []
        # The audio before the pending marks is dropped, not played: they are over all the same, and are
        # reported with the next frame read (as Twilio returns its marks on a clear).
        self._marks_played.extend(self._marks)
        self._marks.clear()
        self._audio_unplayed = False
        return [self._message("event", {"entities": [{"type": "barge_in", "data": {}}]})]

    def mark(self, name: str) -> list[WsFrame]:
        # AudioHook has no marks of its own: Genesys says `playback_completed` once it has played all the
        # audio it was sent, which acknowledges every mark set since.
        if self._audio_unplayed:
            self._marks.append(name)
        else:
            self._marks_played.append(name)
        return []

    def hangup(self, reason: str = "") -> list[WsFrame]:
        if not self._open or self._closed:
            return []
        parameters = {"reason": "completed", "info": reason} if reason else {"reason": "completed"}
        return [self._message("disconnect", parameters)]

    def _reply(self, kind: str, parameters: dict[str, Any]) -> None:
        self._replies.append(self._message(kind, parameters))

    def _message(self, kind: str, parameters: dict[str, Any]) -> str:
        self._server_seq += 1
        return support.text({"version": PROTOCOL_VERSION, "type": kind, "seq": self._server_seq,
                             "clientseq": self._client_seq, "id": self.session_id, "parameters": parameters})


def _takes(medium: _Medium) -> bool:
    return (medium.type == "audio" and medium.format == "PCMU" and medium.rate == RATE
            and 1 <= len(medium.channels) <= 2)


def _start_parameters(opening: _Open) -> dict[str, str]:
    parameters = dict(opening.inputVariables)
    known = {"genesys.organizationId": opening.organizationId, "genesys.participantId": opening.participant.id,
             "genesys.aniName": opening.participant.aniName, "genesys.language": opening.language}
    parameters.update({name: value for name, value in known.items() if value})
    return parameters


# --- HTTP Message Signatures (RFC 9421) over the opening request


def _verify_signature(request: HttpRequest, api_key: str, client_secret: str) -> None:
    inputs = request.headers.get("signature-input", "")
    signatures = request.headers.get("signature", "")
    if not inputs or not signatures:
        raise SignatureError("missing Signature-Input / Signature headers (the connection has a client_secret)")
    try:
        label, components, params = _first_signature_input(inputs)
        signature = _signature_value(signatures, label)
        key = base64.b64decode(client_secret, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise SignatureError(f"unreadable signature headers: {exc}") from None
    _check_signature_params(params, api_key, request.received_at)
    missing = SIGNED_COMPONENTS - {name for name, _ in components}
    if missing:
        raise SignatureError(f"the signature does not cover {', '.join(sorted(missing))}")
    base = _signature_base(request, components, _serialize_signature_params(components, params))
    expected = hmac.new(key, base.encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, signature):
        raise SignatureError("the Signature does not match the request")


def _check_signature_params(params: dict[str, Any], api_key: str, now: float) -> None:
    if params.get("alg", "hmac-sha256") != "hmac-sha256":
        raise SignatureError("only alg hmac-sha256 is taken")
    keyid = params.get("keyid")
    if not isinstance(keyid, str) or not hmac.compare_digest(keyid.encode(), api_key.encode()):
        raise SignatureError("the signature's keyid is not the X-API-KEY")
    created = params.get("created")
    if not isinstance(created, int) or isinstance(created, bool):
        raise SignatureError("the signature has no created time")
    if created > now + CLOCK_SKEW_SECONDS:
        raise SignatureError("the signature was created in the future")
    if created + SIGNATURE_MAX_AGE_SECONDS + CLOCK_SKEW_SECONDS < now:
        raise SignatureError(f"the signature is older than {SIGNATURE_MAX_AGE_SECONDS} s: stale or replayed")
    expires = params.get("expires")
    if isinstance(expires, int) and expires < now - CLOCK_SKEW_SECONDS:
        raise SignatureError("the signature has expired")


def _signature_base(request: HttpRequest, components: list[tuple[str, dict[str, Any]]], signature_params: str) -> str:
    lines = []
    for name, component_params in components:
        if component_params:
            raise SignatureError(f"component parameters are not supported ({name})")
        lines.append(f'"{name}": {_component_value(request, name)}')
    lines.append(f'"@signature-params": {signature_params}')
    return "\n".join(lines)


def _component_value(request: HttpRequest, name: str) -> str:
    url = urlsplit(request.url) if request.url else None
    path = (url.path if url else request.path) or "/"
    query = url.query if url else urlencode(request.query)
    match name:
        case "@request-target":
            return f"{path}?{query}" if query else path
        case "@authority":
            authority = url.netloc if url else request.headers.get("host", "")
            if not authority:
                raise SignatureError("the request's authority is unknown: set the connection option public_url")
            return authority.lower()
        case "@method":
            return request.method.upper()
        case "@path":
            return path
        case "@query":
            return f"?{query}"
        case "@scheme" if url:
            return url.scheme.lower()
        case "@target-uri" if url:
            return request.url
        case _ if name.startswith("@"):
            raise SignatureError(f"cannot resolve the signed component {name}")
    value = request.headers.get(name)
    if value is None:
        raise SignatureError(f"the signed header {name} is missing")
    return " ".join(value.strip().split("\r\n"))


# The two headers are RFC 8941 Dictionaries. Genesys writes `sig1=("@request-target" …);keyid="…";…` and
# `sig1=:<base64>:`; what is read here is that grammar, strictly (anything else is refused).

_KEY: Final = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_STRING: Final = re.compile(r'"((?:[^"\\]|\\["\\])*)"')
_INTEGER: Final = re.compile(r"-?[0-9]{1,15}")
_TOKEN: Final = re.compile(r"[A-Za-z*][A-Za-z0-9!#$%&'*+\-.^_`|~:/]*")
_BYTES: Final = re.compile(r":([A-Za-z0-9+/=]*):")


class _Reader:
    """Reads an RFC 8941 structured field from left to right."""

    def __init__(self, text: str) -> None:
        self.text = text.strip()
        self.at = 0

    def done(self) -> bool:
        return self.at >= len(self.text)

    def expect(self, char: str) -> None:
        if not self.text.startswith(char, self.at):
            raise ValueError(f"{char!r} expected at character {self.at}")
        self.at += 1

    def skip_spaces(self) -> None:
        while self.text.startswith(" ", self.at):
            self.at += 1

    def match(self, pattern: re.Pattern[str]) -> re.Match[str] | None:
        found = pattern.match(self.text, self.at)
        if found:
            self.at = found.end()
        return found

    def key(self) -> str:
        found = self.match(_KEY)
        if found is None:
            raise ValueError(f"a key expected at character {self.at}")
        return found.group()

    def bare_item(self) -> Any:
        if found := self.match(_STRING):
            return re.sub(r"\\(.)", r"\1", found.group(1))
        if found := self.match(_BYTES):
            return base64.b64decode(found.group(1), validate=True)
        if self.text.startswith("?1", self.at) or self.text.startswith("?0", self.at):
            self.at += 2
            return self.text[self.at - 1] == "1"
        if found := self.match(_INTEGER):
            return int(found.group())
        if found := self.match(_TOKEN):
            return _Token(found.group())
        raise ValueError(f"an item expected at character {self.at}")

    def parameters(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        while self.text.startswith(";", self.at):
            self.at += 1
            self.skip_spaces()
            name = self.key()
            if self.text.startswith("=", self.at):
                self.at += 1
                params[name] = self.bare_item()
            else:
                params[name] = True
        return params

    def member_separator(self) -> None:
        self.skip_spaces()
        if not self.done():
            self.expect(",")
            self.skip_spaces()


class _Token(str):
    """An RFC 8941 token (serialized bare, unlike a string)."""


def _first_signature_input(header: str) -> tuple[str, list[tuple[str, dict[str, Any]]], dict[str, Any]]:
    """The first signature of `Signature-Input`: its label, covered components and parameters."""
    reader = _Reader(header)
    label = reader.key()
    reader.expect("=")
    reader.expect("(")
    components: list[tuple[str, dict[str, Any]]] = []
    reader.skip_spaces()
    while not reader.text.startswith(")", reader.at):
        name = reader.bare_item()
        if not isinstance(name, str) or isinstance(name, _Token):
            raise ValueError("covered components must be strings")
        if name in {component for component, _ in components}:
            raise ValueError(f"component {name} is listed twice")
        components.append((name, reader.parameters()))
        if not reader.text.startswith(")", reader.at):
            reader.expect(" ")
            reader.skip_spaces()
    reader.expect(")")
    params = reader.parameters()
    reader.member_separator()  # further signatures may follow; the first is the one checked
    return label, components, params


def _signature_value(header: str, label: str) -> bytes:
    reader = _Reader(header)
    while not reader.done():
        name = reader.key()
        reader.expect("=")
        value = reader.bare_item()
        reader.parameters()
        if name == label:
            if not isinstance(value, bytes):
                raise ValueError("the signature must be a byte sequence")
            return value
        reader.member_separator()
    raise ValueError(f"no signature labelled {label}")


def _serialize_signature_params(components: list[tuple[str, dict[str, Any]]], params: dict[str, Any]) -> str:
    """`@signature-params` as RFC 9421 has it: the inner list re-serialized from what was parsed, so a
    signer that is not strict about the serialization does not pass."""
    inner = " ".join(_serialize_string(name) + _serialize_params(component) for name, component in components)
    return f"({inner}){_serialize_params(params)}"


def _serialize_params(params: dict[str, Any]) -> str:
    return "".join(f";{name}" if value is True else f";{name}={_serialize_item(value)}"
                   for name, value in params.items())


def _serialize_item(value: Any) -> str:
    if isinstance(value, bool):
        return "?1" if value else "?0"
    if isinstance(value, _Token | int):
        return str(value)
    if isinstance(value, bytes):
        return f":{base64.b64encode(value).decode()}:"
    return _serialize_string(value)


def _serialize_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
