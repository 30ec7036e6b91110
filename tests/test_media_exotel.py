"""Exotel AgentStream (`babelhub.media.exotel`): every documented message from the fixtures, the outbound
messages' documented shapes and chunk sizes, Basic authentication of the opening request, and hostile
frames."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from babelhub.audio import AudioFormat, Converter
from babelhub.codecs.base import HttpRequest
from babelhub.errors import SignatureError
from babelhub.media import Audio, Dtmf, Played, Start, Stop
from babelhub.media.exotel import ExotelMedia, packet_ms
from tests import mediakit
from tests.mediakit import REPLACEMENTS, MediaFixtures, basic, goertzel, mutated, reads_or_refuses, refusal_path

FIXTURES = MediaFixtures("exotel_media")
STREAM_SID = "0f2b9c3e7a1d4e5f8a6b7c8d9e0f1a2b"
CALL_SID = "b7e2a9c4d1f34a6e8c0d5f2a7b9e1c3d"


def fixture(name: str) -> str:
    return FIXTURES.text(name)


def documented(name: str) -> Any:
    return json.loads(fixture(name))


def started(name: str = "start.json", secrets: dict[str, str] | None = None) -> ExotelMedia:
    exotel = ExotelMedia(secrets or {}, {})
    exotel.receive(fixture(name))
    return exotel


# ------------------------------------------------------------------------------------------------ inbound


def test_connected_says_nothing_and_start_gives_the_call() -> None:
    exotel = ExotelMedia({}, {})
    assert exotel.receive(fixture("connected.json")) == []
    assert exotel.receive(fixture("start.json")) == [Start(
        call_id=CALL_SID, stream_id=STREAM_SID, caller="+919876543210", callee="+918047491899",
        inbound_format=AudioFormat(codec="pcm16", rate=8000, frame_ms=100), parameters={"key1": "value1"})]
    assert exotel.inbound_format == AudioFormat(codec="pcm16", rate=8000, frame_ms=100)


def test_a_16khz_stream_with_numbers_for_numbers_narrows_the_outbound_format() -> None:
    exotel = ExotelMedia({}, {})
    [start] = exotel.receive(fixture("start_16k.json"))
    assert isinstance(start, Start)
    assert start.inbound_format.rate == 16000
    assert start.parameters == {"key1": "value1", "key2": "value2"}
    assert exotel.outbound_format == AudioFormat(codec="pcm16", rate=16000, frame_ms=100)
    assert ExotelMedia.outbound_format == AudioFormat(codec="pcm16", rate=8000, frame_ms=200)


def test_media_gives_the_decoded_payload_timed_from_the_first_chunk() -> None:
    exotel = started()
    payload = base64.b64decode(documented("media.json")["media"]["payload"])
    assert exotel.receive(fixture("media.json")) == [Audio(payload=payload, timestamp_us=0)]
    assert exotel.receive(fixture("media_next.json")) == [Audio(payload=payload, timestamp_us=100_000)]


def test_dtmf_mark_and_both_stop_reasons() -> None:
    exotel = started()
    assert exotel.receive(fixture("dtmf.json")) == [Dtmf(digit="5")]
    assert exotel.receive(fixture("mark.json")) == [Played(name="turn-3-end")]
    assert exotel.receive(fixture("stop.json")) == [Stop(reason="callended")]
    assert exotel.receive(fixture("stop_applet.json")) == [Stop(reason="stopped")]


def test_every_fixture_from_exotel_decodes() -> None:
    exotel = ExotelMedia({}, {})
    for name in FIXTURES.inbound():
        exotel.receive(fixture(name))


def test_unknown_events_are_ignored() -> None:
    assert started().receive('{"event": "transcript", "text": 5}') == []


def test_the_inbound_payload_is_16_bit_little_endian_pcm_as_declared() -> None:
    exotel = ExotelMedia({}, {})
    [start] = exotel.receive(fixture("start.json"))
    [audio] = exotel.receive(fixture("media.json"))
    assert isinstance(start, Start) and isinstance(audio, Audio)
    assert len(audio.payload) == start.inbound_format.bytes_per_ms() * 100
    # Resampled to 16 kHz through the converter, the fixture's 400 Hz tone is still a 400 Hz tone.
    wide = Converter(start.inbound_format, AudioFormat(codec="pcm16", rate=16000)).convert(audio.payload)
    assert goertzel(wide, 16000, 400) > 3000
    assert goertzel(wide, 16000, 1000) < 300


# ----------------------------------------------------------------------------------------------- outbound


def test_media_mark_and_clear_have_the_documented_shapes() -> None:
    exotel = started()
    payload = base64.b64decode(documented("out_media.json")["media"]["payload"])
    [media] = exotel.send_audio(payload)
    [mark] = exotel.mark("turn-3-end")
    [clear] = exotel.clear()
    assert json.loads(media) == documented("out_media.json")
    assert json.loads(mark) == documented("out_mark.json")
    assert json.loads(clear) == documented("out_clear.json")
    assert ExotelMedia.acknowledges_marks and not ExotelMedia.sends_dtmf
    assert exotel.dtmf("1") == [] and exotel.hangup() == []


@pytest.mark.parametrize(("rate", "ms", "size"), [(8000, 200, 3200), (16000, 100, 3200), (24000, 80, 3840)])
def test_the_packet_is_the_shortest_chunk_exotel_takes(rate: int, ms: int, size: int) -> None:
    assert packet_ms(rate) == ms
    assert AudioFormat(codec="pcm16", rate=rate, frame_ms=ms).frame_bytes() == size
    assert size >= 3200 and size % 320 == 0


def sent_sizes(frames: list[Any]) -> list[int]:
    return [len(base64.b64decode(json.loads(frame)["media"]["payload"])) for frame in frames]


def test_a_short_last_packet_is_padded_with_silence_to_whole_320_byte_steps() -> None:
    exotel = started()
    [frame] = exotel.send_audio(b"\x01\x02" * 500)  # 1,000 bytes
    sent = base64.b64decode(json.loads(frame)["media"]["payload"])
    assert len(sent) == 1280
    assert sent[:1000] == b"\x01\x02" * 500 and sent[1000:] == bytes(280)


def test_a_packet_over_100_kb_is_cut_into_chunks_exotel_takes() -> None:
    sizes = sent_sizes(started().send_audio(bytes(250_000)))
    assert sum(sizes) == 250_240
    assert all(size <= 100_000 and size % 320 == 0 for size in sizes)


def test_before_start_nothing_can_be_sent() -> None:
    exotel = ExotelMedia({}, {})
    assert exotel.send_audio(bytes(3200)) == [] and exotel.mark("m") == [] and exotel.clear() == []


# ------------------------------------------------------------------------------------------ hostile input


@pytest.mark.parametrize(("frame", "path"), [
    ('"media"', "$"),
    ('{"event": ["media"]}', "$.event"),
    ('{"event": "media", "media": {"payload": 3200}}', "$.media.payload"),
    ('{"event": "media", "media": {"payload": "AAAA****"}}', "$.media.payload"),
    ('{"event": "media", "media": {"payload": "AAA\u00e9"}}', "$.media.payload"),
    ('{"event": "start", "start": {"call_sid": "c", "media_format": {"sample_rate": "fast"}}}',
     "$.start.media_format.sample_rate"),
    ('{"event": "media", "media": {"timestamp": "later", "payload": "AAAA"}}', "$.media.timestamp"),
    ('{"event": "start", "start": {"call_sid": "c", "stream_sid": "s", "media_format": {"sample_rate": "11025"}}}',
     "$.start.media_format.sample_rate"),
    ('{"event": "start", "start": {"call_sid": "c", "media_format": {"encoding": "audio/x-mulaw"}}}',
     "$.start.media_format.encoding"),
    ('{"event": "start", "start": {"call_sid": "c", "custom_parameters": {"k": 1}}}',
     "$.start.custom_parameters[...]"),
    ('{"event": "start", "start": {"stream_sid": "s"}}', "$.start"),
    ('{"event": "dtmf", "dtmf": {"digit": "E"}}', "$.dtmf.digit"),
    ('{"event": "mark", "mark": "turn-3-end"}', "$.mark"),
    ('{"event": "stop", "stop": {"reason": 1}}', "$.stop.reason"),
])
def test_a_malformed_frame_is_a_decode_error_naming_the_path(frame: str, path: str) -> None:
    assert refusal_path(started(), frame) == path


# ---------------------------------------------------------------------------------------- authentication


SECRETS = {"api_key": "a1b2c3d4e5f6a7b8c9d0", "api_token": "f0e9d8c7b6a5f4e3d2c1"}


def opening(authorization: str | None) -> HttpRequest:
    return mediakit.opening("/media/exotel-main", "wss://hub.example.com/media/exotel-main",
                            authorization=authorization)


def test_the_credentials_of_the_applet_url_are_accepted() -> None:
    ExotelMedia(SECRETS, {}).verify(opening(basic(SECRETS["api_key"], SECRETS["api_token"])))


@pytest.mark.parametrize("authorization", [
    None,
    "",
    "Bearer a1b2c3d4e5f6a7b8c9d0",
    basic("a1b2c3d4e5f6a7b8c9d0", "wrong"),
    basic("someone", "f0e9d8c7b6a5f4e3d2c1"),
    "Basic",
])
def test_missing_or_wrong_credentials_are_refused(authorization: str | None) -> None:
    with pytest.raises(SignatureError):
        ExotelMedia(SECRETS, {}).verify(opening(authorization))


def test_without_credentials_configured_the_endpoint_relies_on_ip_whitelisting() -> None:
    ExotelMedia({}, {}).verify(opening(None))


INBOUND = [documented(name) for name in FIXTURES.inbound()]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_member_of_a_documented_message_replaced_by_any_json_reads_or_is_a_decode_error(
        data: st.DataObject) -> None:
    reads_or_refuses(ExotelMedia({}, {}), mutated(data, data.draw(st.sampled_from(INBOUND)), REPLACEMENTS))
