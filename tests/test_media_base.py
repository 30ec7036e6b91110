"""What every media provider shares through `MediaSession`: its options read as the `option_settings`
it declares, and an `outbound_format` each instance may narrow without changing its class's default."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

import pytest

from babelhub.errors import ConfigError
from babelhub.media import MediaSession
from babelhub.media.plivo import PlivoMedia
from tests.mediakit import MediaFixtures

PROVIDERS: list[type[MediaSession]] = [point.load() for point in entry_points(group="babelhub.media")]


def test_every_provider_is_installed() -> None:
    assert sorted(provider.channel for provider in PROVIDERS) == [
        "asterisk_media", "exotel_media", "genesys_media", "plivo_media", "telnyx_media", "twilio_media",
        "vonage_media"]


@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda provider: provider.channel)
def test_an_unknown_option_is_refused_naming_it(provider: type[MediaSession]) -> None:
    with pytest.raises(ConfigError, match=rf"{provider.channel} options: .*unknown field `bidirectional_codek`"):
        provider({}, {"bidirectional_codek": "PCMU"})


@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda provider: provider.channel)
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
