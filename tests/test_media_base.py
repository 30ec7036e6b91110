"""What every media provider shares through `MediaSession` and `babelhub.media.support`: its entry point,
its options read as the `option_settings` it declares, an `outbound_format` each instance may narrow
without changing its class's default, and the hostile frames every provider refuses alike."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

import pytest

from babelhub.entrypoints import load_class
from babelhub.errors import ConfigError
from babelhub.media import MediaSession
from babelhub.media.asterisk import AsteriskMedia
from babelhub.media.exotel import ExotelMedia
from babelhub.media.genesys import GenesysMedia
from babelhub.media.plivo import PlivoMedia
from babelhub.media.telnyx import TelnyxMedia
from babelhub.media.twilio import TwilioMedia
from babelhub.media.vonage import VonageMedia
from tests.mediakit import MediaFixtures, refusal_path

PROVIDERS: list[type[MediaSession]] = [AsteriskMedia, ExotelMedia, GenesysMedia, PlivoMedia, TelnyxMedia, TwilioMedia,
                                       VonageMedia]
DEEP = "[" * 100_000 + "]" * 100_000
"""JSON nested past Python's recursion limit, which msgspec would raise as RecursionError."""


def by_channel(provider: type[MediaSession]) -> str:
    return provider.channel


@pytest.mark.parametrize("provider", PROVIDERS, ids=by_channel)
def test_the_entry_point_names_this_class(provider: type[MediaSession]) -> None:
    (point,) = entry_points(group="babelhub.media", name=provider.channel)
    assert point.load() is provider
    base: Any = MediaSession  # abstract: load_class only checks the subclass
    assert load_class("babelhub.media", provider.channel, base, "media stream") is provider


def test_every_provider_is_installed() -> None:
    assert sorted(point.name for point in entry_points(group="babelhub.media")) == sorted(map(by_channel, PROVIDERS))


@pytest.mark.parametrize("provider", PROVIDERS, ids=by_channel)
@pytest.mark.parametrize("frame", [
    pytest.param("{not json", id="invalid JSON"),
    pytest.param('{"event": "media", "x": ' + DEEP + "}", id="a member nested too deeply"),
    pytest.param('{"version": "2", "type": "ping", "parameters": ' + DEEP + "}", id="parameters nested too deeply"),
    pytest.param(bytes(320), id="binary before the stream started or where text is expected"),
])
def test_a_hostile_frame_is_refused_at_the_root(provider: type[MediaSession], frame: str | bytes) -> None:
    assert refusal_path(provider({}, {}), frame) == "$"


@pytest.mark.parametrize("provider", PROVIDERS, ids=by_channel)
def test_an_unknown_option_is_refused_naming_it(provider: type[MediaSession]) -> None:
    with pytest.raises(ConfigError, match=rf"{provider.channel} options: .*unknown field `bidirectional_codek`"):
        provider({}, {"bidirectional_codek": "PCMU"})


@pytest.mark.parametrize("provider", PROVIDERS, ids=by_channel)
def test_public_url_is_an_option_of_every_provider(provider: type[MediaSession]) -> None:
    session = provider({}, {"public_url": "wss://hub.example.com/media/main"})
    assert session.outbound_format == provider.outbound_format


@pytest.mark.parametrize(("channel", "options", "complaint"), [
    ("asterisk_media", {"answer": "yes"}, r"asterisk_media options\.answer: Expected `bool`"),
    ("genesys_media", {"supported_languages": "en-US"}, r"genesys_media options\.supported_languages: Expected"),
    ("telnyx_media", {"bidirectional_codec": "G729"}, r"telnyx_media options\.bidirectional_codec"),
])
def test_a_mistyped_option_is_refused_naming_it(channel: str, options: dict[str, Any], complaint: str) -> None:
    (provider,) = [provider for provider in PROVIDERS if provider.channel == channel]
    with pytest.raises(ConfigError, match=complaint):
        provider({}, options)


def test_an_instance_narrows_its_own_outbound_format_not_its_class() -> None:
    default = PlivoMedia.outbound_format
    session = PlivoMedia({}, {})
    session.receive(MediaFixtures("plivo_media").text("start_l16_16k.json"))
    assert session.outbound_format.rate == 16000 and session.outbound_format.codec == "pcm16"
    assert PlivoMedia.outbound_format == default and PlivoMedia({}, {}).outbound_format == default
