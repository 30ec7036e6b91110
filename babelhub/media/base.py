"""The media stream contract: what one telephony provider's WebSocket protocol module implements.

A provider (Twilio Media Streams, Telnyx, Plivo, Vonage, Exotel, Asterisk, Genesys AudioHook) opens a
WebSocket to the hub for each call and streams the caller's audio over it; the hub streams audio back
on the same socket. A `MediaSession` is one such socket's protocol, kept pure like a channel codec: it
turns each frame the provider sends into `MediaEvent`s and each thing the hub wants to say into the
frames the provider expects, and never does I/O. Its state (the provider's stream id, sequence
numbers, the negotiated format) lives in the instance, one per socket.

Audio crosses this boundary as bytes in the session's formats (`inbound_format` for the caller's,
`outbound_format` for what the provider plays), already cut into the provider's packet size; the hub
converts and paces around it (`babelhub.audio`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, TypeAlias, TypeVar

import msgspec

from babelhub.audio.frame import AudioFormat
from babelhub.codecs.base import HttpRequest
from babelhub.codecs.settings import ConnectionOptions, NoSecrets, Settings
from babelhub.errors import ConfigError

__all__ = ["Audio", "Dtmf", "FlowControl", "MediaEvent", "MediaSession", "Played", "Start", "Stop", "Trouble",
           "WsFrame", "read_options"]

S = TypeVar("S", bound=Settings)

WsFrame: TypeAlias = str | bytes
"""One WebSocket message: text (str) or binary (bytes)."""


class _Event(msgspec.Struct, frozen=True, kw_only=True):
    pass


class Start(_Event, tag="start", frozen=True, kw_only=True):
    """The call's stream began: who calls whom, and how its audio is encoded."""

    call_id: str
    """The provider's id of the call (Twilio `callSid`, Telnyx `call_control_id`, …)."""
    stream_id: str = ""
    """The provider's id of this media stream, where it has one besides the call's."""
    caller: str = ""
    """The calling party (a phone number in E.164, a SIP URI), as the provider gives it."""
    callee: str = ""
    inbound_format: AudioFormat
    """How the caller's audio arrives."""
    parameters: dict[str, str] = {}
    """Custom parameters the call's set-up passed to the stream (Twilio `<Parameter>`, …)."""


class Audio(_Event, tag="audio", frozen=True, kw_only=True):
    """A piece of the caller's audio, in the session's `inbound_format`."""

    payload: bytes
    timestamp_us: int | None = None
    """Media time of its first sample since the stream began, when the provider says; else counted."""


class Dtmf(_Event, tag="dtmf", frozen=True, kw_only=True):
    digit: str
    """One of 0-9, *, #, A-D."""


class Played(_Event, tag="played", frozen=True, kw_only=True):
    """The provider has played all audio sent before the mark `name` (its playback acknowledgement)."""

    name: str


class Stop(_Event, tag="stop", frozen=True, kw_only=True):
    """The stream ended (the call hung up, or the provider closed the stream)."""

    reason: str = ""


class Trouble(_Event, tag="trouble", frozen=True, kw_only=True):
    """The provider reports that it could not use something the hub sent (an error frame). The stream
    goes on; the hub logs the report and keeps it as a dead letter."""

    code: str
    """The provider's code of the error (Telnyx `payload.code`, …)."""
    reason: str
    """What the provider says went wrong: its title and detail."""
    report: bytes = b""
    """The provider's message as read (JSON), kept in the dead letter."""


class FlowControl(_Event, tag="flow", frozen=True, kw_only=True):
    """The provider asks the hub to stop sending audio (`paused`: its buffer is nearly full, and what
    comes now would be dropped) or to go on (`paused=False`). The hub holds the call's outbound audio
    meanwhile, in its queue of bounded length."""

    paused: bool


MediaEvent: TypeAlias = Start | Audio | Dtmf | Played | Stop | Trouble | FlowControl


class MediaSession(ABC):
    """One provider's media WebSocket, one instance per socket. Subclasses set `channel` and implement
    `receive` and `send_audio`; the rest have defaults for providers that lack the feature."""

    channel: ClassVar[str]
    """The connection `channel` that names this provider (`twilio_media`, …)."""
    outbound_format: AudioFormat
    """What the provider plays, and the packet size it wants (`frame_ms`): the class sets the default,
    which each instance copies and may narrow (from its options, or once the stream has started, for a
    provider that negotiates the format)."""
    acknowledges_marks: ClassVar[bool] = False
    """True when the provider reports that audio before a mark was played; otherwise the hub reports a
    mark as played when it has paced out the audio before it."""
    sends_dtmf: ClassVar[bool] = False
    """True when the hub can send DTMF tones to the call through this protocol."""
    secret_settings: ClassVar[type[Settings]] = NoSecrets
    """The connection's `secrets` this provider reads (to verify the socket's opening request)."""
    option_settings: ClassVar[type[Settings]] = ConnectionOptions
    """The connection's `options` this provider reads: a subclass of `ConnectionOptions`, read into
    `settings` when the session is made."""

    def __init__(self, secrets: Mapping[str, str], options: Mapping[str, Any]) -> None:
        self.secrets = secrets
        self.options = options
        self.settings = read_options(self.channel, self.option_settings, options)
        """The connection's `options` as this provider's `option_settings` declare them."""
        self.outbound_format = type(self).outbound_format
        self._replies: list[WsFrame] = []
        """Frames `replies` hands out next: a subclass appends its protocol's answers while it reads."""
        self.inbound_format: AudioFormat | None = None
        """Known once the stream has started."""
        self.plays_audio = True
        """False for a listen-only session (one the provider plays nothing of, such as AudioHook Monitor),
        known once the stream has started: the hub then sends it no audio and reports each mark at once
        as not heard."""

    def verify(self, request: HttpRequest) -> None:  # noqa: B027
        """Raise `SignatureError` unless the WebSocket's opening request comes from the provider.
        Default: not signed (restrict such a connection by network)."""

    def opening(self) -> list[WsFrame]:
        """Frames the hub sends as soon as the socket is open, before the provider says anything."""
        return []

    @abstractmethod
    def receive(self, frame: WsFrame) -> list[MediaEvent]:
        """The events in one frame from the provider; raise `DecodeError` naming the path if unreadable.
        A frame that only keeps the protocol going (a keep-alive) yields nothing."""

    def replies(self) -> list[WsFrame]:
        """Frames the protocol requires in answer to what `receive` just read (an `opened` to an `open`,
        a `pong` to a `ping`); taken once, then empty."""
        replies, self._replies = self._replies, []
        return replies

    @abstractmethod
    def send_audio(self, payload: bytes) -> list[WsFrame]:
        """The frames that play one packet of `payload` (in `outbound_format`, `frame_ms` long)."""

    def clear(self) -> list[WsFrame]:
        """The frames that drop audio the provider has buffered and not played yet (barge-in)."""
        return []

    def mark(self, name: str) -> list[WsFrame]:
        """The frames that ask the provider to acknowledge when the audio sent so far has been played
        (`acknowledges_marks`); none otherwise."""
        return []

    def dtmf(self, digits: str) -> list[WsFrame]:
        """The frames that play `digits` as DTMF tones to the call (`sends_dtmf`); none otherwise."""
        return []

    def hangup(self, reason: str = "") -> list[WsFrame]:
        """The frames that end the stream from the hub's side, before the socket is closed."""
        return []


def read_options(channel: str, struct: type[S], options: Mapping[str, Any]) -> S:
    """A connection's `options` as `struct`; a `ConfigError` names the first unknown, mistyped or unfitting
    one. Strict, as the config's check is: a value must already be of the declared type."""
    try:
        return msgspec.convert(dict(options), struct)
    except msgspec.ValidationError as exc:
        reason, _, where = str(exc).partition(" - at `$")
        raise ConfigError(f"{channel} options{where.rstrip('`')}: {reason}") from None
