"""What every media provider shares through `MediaSession` and `babelhub.media.support`: its entry point,
its options read as the `option_settings` it declares, an `outbound_format` each instance may narrow
without changing its class's default, and the hostile frames every provider refuses alike."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

import msgspec
import pytest

from babelhub.audio import AudioFormat
from babelhub.entrypoints import load_class
from babelhub.errors import ConfigError, DecodeError
from babelhub.media import MediaSession, support
from babelhub.media.asterisk import AsteriskMedia
from babelhub.media.client import ClientMedia
from babelhub.media.exotel import ExotelMedia
from babelhub.media.genesys import GenesysMedia
from babelhub.media.plivo import PlivoMedia
from babelhub.media.telnyx import TelnyxMedia
from babelhub.media.twilio import TwilioMedia
from babelhub.media.vonage import VonageMedia
from tests.mediakit import MediaFixtures, refusal_path

PROVIDERS: list[type[MediaSession]] = [AsteriskMedia, ClientMedia, ExotelMedia, GenesysMedia, PlivoMedia, TelnyxMedia,
                                       TwilioMedia, VonageMedia]
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


@pytest.mark.parametrize("provider", [provider for provider in PROVIDERS if provider is not AsteriskMedia],
                         ids=by_channel)
def test_a_frame_nested_too_deeply_as_a_whole_is_refused_at_the_root(provider: type[MediaSession]) -> None:
    """(Asterisk reads a text frame that is no JSON object as a plain-text event line.)"""
    assert refusal_path(provider({}, {}), DEEP) == "$"


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


# --- babelhub.media.support, as every provider uses it


@pytest.mark.parametrize("encoded", ["AAA", "AAAA@@@@", "AAA\u00e9", "AA AA"])
def test_audio_that_is_no_strict_base64_is_refused_at_its_path(encoded: str) -> None:
    with pytest.raises(DecodeError) as caught:
        support.audio_payload(encoded, "$.media.payload")
    assert caught.value.path == "$.media.payload"


@pytest.mark.parametrize(("data", "path"), [
    ('{"digit": 5}', "$.parameters.digit"),
    ("{not json", "$.parameters"),
    ('{"digit": "5", "x": ' + DEEP + "}", "$.parameters"),
])
def test_a_member_kept_raw_is_refused_under_its_path(data: str, path: str) -> None:
    class Digit(msgspec.Struct):
        digit: str

    with pytest.raises(DecodeError) as caught:
        support.decode_frame(data, Digit, "$.parameters")
    assert caught.value.path == path


def test_a_dtmf_digit_is_one_key_of_those_the_provider_sends() -> None:
    assert [support.dtmf_event(key, "$.digit").digit for key in "0123456789*#ABCD"] == list("0123456789*#ABCD")
    for wrong in ("", "11", "E", "a"):
        with pytest.raises(DecodeError, match="0-9, \\*, #, A-D"):
            support.dtmf_event(wrong, "$.digit")
    with pytest.raises(DecodeError, match="one of 0-9, \\*, #, not 'A'"):
        support.dtmf_event("A", "$.digit", support.DTMF_DIGITS - frozenset("ABCD"))


def test_binary_audio_holds_whole_samples_and_is_timed_by_its_bytes() -> None:
    stereo = AudioFormat(codec="mulaw", rate=8000, channels=2)
    audio = support.BinaryAudio()
    with pytest.raises(DecodeError, match="before the start"):
        audio.read(bytes(320), None, "the start")
    with pytest.raises(DecodeError, match="2 bytes a sample"):
        audio.read(bytes(321), stereo, "the start")
    assert audio.read(bytes(320), stereo, "the start").timestamp_us == 0
    audio.skip(1_000_000)
    assert audio.read(bytes(320), stereo, "the start").timestamp_us == 1_020_000


def test_a_timestamp_clock_counts_from_the_first_timestamp() -> None:
    clock = support.TimestampClock()
    assert clock.media_time_us(None, "$.t") is None
    assert [clock.media_time_us(ms, "$.t") for ms in (1_700_000_000_000, "1700000000020", 1_699_999_999_990)] == [
        0, 20_000, 0]
    with pytest.raises(DecodeError) as caught:
        clock.media_time_us("soon", "$.media.timestamp")
    assert caught.value.path == "$.media.timestamp"


def test_outbound_json_is_compact_and_parameters_are_text() -> None:
    assert support.text({"action": "notify", "payload": {"name": "é"}}) == '{"action":"notify","payload":{"name":"é"}}'
    assert [support.parameter_text(value) for value in ("a", 3, True, ["a", 1])] == ["a", "3", "true", '["a",1]']
