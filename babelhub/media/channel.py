"""Media connections: finding a provider's `MediaSession` by channel name, and the codec-shaped stand-in
that lets the rest of the hub treat a media connection like any other.

A connection whose `channel` names a telephony media stream (`twilio_media`, …) carries calls' audio at
`WebSocket /media/{connection}`, not messages through a channel API. The hub's connection services,
conversation actors and config checks are written against `Codec`; `media_channel` gives them one
that declares the provider's secrets and options, comes in through the `media` source, and refuses every message
sent to it with an `EncodeError` saying why (the message's status becomes `failed` with that reason).
"""

from __future__ import annotations

from functools import cache

from babelhub import canonical as c
from babelhub.codecs.base import (
    Capabilities,
    Codec,
    DecodeContext,
    EncodeContext,
    HttpRequest,
    HttpResponse,
    OutboundRequest,
    SendResult,
)
from babelhub.entrypoints import installed, load_class
from babelhub.errors import DecodeError, EncodeError
from babelhub.media.base import MediaSession

__all__ = ["GROUP", "MEDIA_SOURCE", "MediaChannel", "is_media_channel", "load_provider", "media_channel", "providers"]

GROUP = "babelhub.media"
MEDIA_SOURCE = "media"
"""The inbound source of every media connection."""


def providers() -> list[str]:
    """The channel names of every installed media stream provider."""
    return installed(GROUP)


def is_media_channel(channel: str) -> bool:
    return channel in providers()


def load_provider(channel: str) -> type[MediaSession]:
    """The `MediaSession` class registered for `channel`; LookupError when there is none or its module
    cannot be imported."""
    try:
        return load_class(GROUP, channel, MediaSession, "media stream provider")  # type: ignore[type-abstract]
    except ImportError as exc:
        raise LookupError(f"media stream provider {channel!r} is registered but cannot be loaded: {exc}") from None


class MediaChannel(Codec):
    """What a media connection is to the parts of the hub that speak `Codec`: no raw records to decode,
    no channel API to send to."""

    inbound = MEDIA_SOURCE
    capabilities = Capabilities()
    """Plain text, the least a message can be degraded to before `encode` refuses it."""

    def decode(self, request: HttpRequest, ctx: DecodeContext) -> list[c.Envelope]:
        raise DecodeError(f"{self.channel} connections record no requests: calls come in at /media/{ctx.connection}")

    def encode(self, message: c.Message, ctx: EncodeContext) -> list[OutboundRequest]:
        raise EncodeError(f"{ctx.connection} is a {self.channel} connection: it carries a call's audio, not "
                          "messages (send audio on the call's audio subjects, or the message through a chat "
                          "connection)")

    def parse_response(self, request: OutboundRequest, response: HttpResponse) -> SendResult:
        raise EncodeError(f"{self.channel} connections make no API calls")


@cache
def media_channel(channel: str) -> MediaChannel:
    """The stand-in codec of `channel`'s connections, declaring its provider's secrets and options (one shared
    instance per channel, as codecs are); LookupError when no provider is registered under it."""
    provider = load_provider(channel)
    stand_in = type(f"{provider.__name__}Channel", (MediaChannel,), {
        "channel": provider.channel, "secret_settings": provider.secret_settings,
        "option_settings": provider.option_settings,
        "__doc__": f"The stand-in codec of {provider.channel} connections."})
    return stand_in()  # type: ignore[no-any-return]
