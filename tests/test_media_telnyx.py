"""Telnyx media streaming: every documented frame read from real-shaped fixtures (µ-law and big-endian
L16 audio), the outbound frames in the documented shape and the codec the options name, hostile frames
refused naming the JSON path, error frames as `Trouble`, and the streaming auth token of the WebSocket request."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from babelhub.audio import AudioFormat, Converter
from babelhub.codecs.base import HttpRequest
from babelhub.errors import ConfigError, DecodeError, SignatureError
from babelhub.media import Audio, Dtmf, Played, Start, Stop, Trouble
from babelhub.media.telnyx import TelnyxMedia
from tests.mediakit import (
    MediaFixtures,
    changed,
    mutated,
    opening,
    reads_or_refuses,
    refusal_path,
    same_shape,
    tone_strength,
)

FIXTURES = MediaFixtures("telnyx_media", suffix=".json")
STREAM_ID = "32DE0DEA-53CB-4B21-89A4-9E1819C043BC"
CALL_CONTROL_ID = "v2:T02llQxIyaRkhfRKxgAP8nY511EhFLizdvdUKJiSw8d6A9BborherQ"
TOKEN = "c3RyZWFtLXRva2VuLWZvci10ZXN0cw"
PCMU_8K = AudioFormat(codec="mulaw", rate=8000, channels=1, frame_ms=20)
L16_16K = AudioFormat(codec="pcm16", rate=16000, channels=1, frame_ms=20)


def text(name: str) -> str:
    return FIXTURES.text(name)


def session(**options: Any) -> TelnyxMedia:
    return TelnyxMedia({"stream_auth_token": TOKEN}, options)


def started(fixture: str = "start", **options: Any) -> TelnyxMedia:
    media = session(**options)
    media.receive(text(fixture))
    return media


# ---------------------------------------------------------------------------------------- inbound


def test_connected_says_nothing() -> None:
    assert session().receive(text("connected")) == []


def test_start_names_the_call_the_parties_the_format_and_parameters() -> None:
    media = session()
    assert media.receive(text("start")) == [Start(
        call_id=CALL_CONTROL_ID, stream_id=STREAM_ID, caller="+13122010094", callee="+13122123456",
        inbound_format=PCMU_8K, parameters={"customer_id": "customer_123"})]
    assert media.inbound_format == PCMU_8K
    assert media.stream_id == STREAM_ID


def test_pcmu_media_is_the_callers_tone() -> None:
    media = started()
    (audio,) = media.receive(text("media"))
    assert isinstance(audio, Audio) and media.inbound_format is not None
    assert audio.payload == base64.b64decode(FIXTURES.json("media")["media"]["payload"])
    assert audio.timestamp_us is None  # Telnyx documents no unit for media.timestamp
    rms, share = tone_strength(Converter(media.inbound_format, AudioFormat(rate=8000)).convert(audio.payload), 8000)
    assert rms > 4000 and share > 0.95


def test_l16_media_arrives_big_endian_and_is_read_as_little_endian_pcm16() -> None:
    media = started("start_l16")
    assert media.inbound_format == L16_16K
    (audio,) = media.receive(text("media_l16"))
    assert isinstance(audio, Audio)
    rms, share = tone_strength(audio.payload, 16000)
    assert rms > 4000 and share > 0.95


def test_the_outbound_track_is_not_the_caller() -> None:
    assert started().receive(text("media_outbound_track")) == []


def test_dtmf_mark_and_stop() -> None:
    media = started()
    assert media.receive(text("dtmf")) == [Dtmf(digit="1")]
    assert media.receive(text("mark")) == [Played(name="some_mark_name")]
    assert media.receive(text("stop")) == [Stop()]


def test_an_error_frame_is_trouble_with_its_code_title_detail_and_the_message() -> None:
    media = started()
    (trouble,) = media.receive(text("error"))
    assert trouble == Trouble(code="100002", reason="unknown_error: An unknown error occurred on the stream",
                              report=trouble.report)
    assert json.loads(trouble.report) == FIXTURES.json("error")


def test_an_error_frame_without_a_detail_is_trouble_with_its_title() -> None:
    frame = json.dumps({"event": "error", "payload": {"code": 100005, "title": "rate_limit_reached"}})
    (trouble,) = started().receive(frame)
    assert isinstance(trouble, Trouble) and (trouble.code, trouble.reason) == ("100005", "rate_limit_reached")


def test_an_unknown_event_is_skipped() -> None:
    assert started().receive(json.dumps({"event": "transcription", "stream_id": STREAM_ID, "x": {}})) == []


# ---------------------------------------------------------------------------------------- outbound


def test_outbound_frames_have_the_documented_shape() -> None:
    media = started()
    packet = bytes(range(160))
    (sent,) = media.send_audio(packet)
    (mark,) = media.mark("reply-1")
    (clear,) = media.clear()
    for frame, documented in ((sent, "outbound_media"), (mark, "outbound_mark"), (clear, "outbound_clear")):
        assert isinstance(frame, str)
        assert same_shape(json.loads(frame), FIXTURES.json(documented)), frame
        assert json.loads(frame)["event"] == FIXTURES.json(documented)["event"]
    assert base64.b64decode(json.loads(sent)["media"]["payload"]) == packet
    assert json.loads(mark)["mark"] == {"name": "reply-1"}


def test_the_outbound_format_is_pcmu_unless_the_options_say_otherwise() -> None:
    assert session().outbound_format == PCMU_8K
    assert session(bidirectional_codec="PCMA").outbound_format == AudioFormat(codec="alaw", rate=8000)
    assert session(bidirectional_codec="L16", bidirectional_sampling_rate=16000).outbound_format == L16_16K
    assert TelnyxMedia.acknowledges_marks and not TelnyxMedia.sends_dtmf
    assert session().dtmf("12") == [] and session().hangup() == []


def test_l16_is_sent_big_endian() -> None:
    media = session(bidirectional_codec="L16", bidirectional_sampling_rate=16000)
    (sent,) = media.send_audio(struct.pack("<2h", 1, -2))
    assert base64.b64decode(json.loads(sent)["media"]["payload"]) == struct.pack(">2h", 1, -2)


@pytest.mark.parametrize(("options", "complaint"), [
    ({"bidirectional_codec": "G729"}, "bidirectional_codec"),
    ({"bidirectional_codec": "PCMU", "bidirectional_sampling_rate": 16000}, "8000 Hz only"),
    ({"bidirectional_sampling_rate": "fast"}, "bidirectional_sampling_rate"),
])
def test_wrong_options_are_refused_naming_them(options: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        session(**options)


# ----------------------------------------------------------------------------------- hostile input


def media_with(**fields: Any) -> str:
    return changed(FIXTURES.json("media"), ("media",), **fields)


def start_with(**fields: Any) -> str:
    return changed(FIXTURES.json("start"), ("start",), **fields)


def start_with_format(**fields: Any) -> str:
    return changed(FIXTURES.json("start"), ("start", "media_format"), **fields)


@pytest.mark.parametrize(("frame", "path"), [
    ("[1, 2]", "$"),
    ('{"event": null}', "$.event"),
    (media_with(payload="no+JhoaJjpzSHxAKBgYJD...IsSbjomGhoqQn1Ic"), "$.media.payload"),
    (media_with(payload="/7ut!pqGg"), "$.media.payload"),
    (media_with(payload=["a"]), "$.media.payload"),
    (json.dumps({"event": "media", "stream_id": STREAM_ID}), "$"),
    (json.dumps({"event": "dtmf", "dtmf": {"digit": "11"}}), "$.dtmf.digit"),
    (json.dumps({"event": "mark", "mark": {}}), "$.mark"),
    (json.dumps({"event": "stop", "stop": []}), "$.stop"),
    (json.dumps({"event": "error", "payload": {"code": "many"}}), "$.payload.code"),
    (start_with(call_control_id=7), "$.start.call_control_id"),
    (start_with(custom_parameters={"a": 1}), "$.start.custom_parameters[...]"),
    (start_with(**{"from": {"phone_number": "+1"}}), "$.start.from"),
    (start_with_format(encoding="G722"), "$.start.media_format.encoding"),
    (start_with_format(sample_rate=1), "$.start.media_format.sample_rate"),
    (start_with_format(channels=0), "$.start.media_format.channels"),
    ("{" * 100_000 + "}" * 100_000, "$"),
])
def test_a_hostile_frame_is_refused_naming_its_path(frame: str | bytes, path: str) -> None:
    assert refusal_path(session(), frame) == path


def test_l16_audio_of_an_odd_length_is_refused() -> None:
    media = started("start_l16")
    with pytest.raises(DecodeError, match="16-bit") as caught:
        media.receive(media_with(payload=base64.b64encode(b"\x00\x01\x02").decode()))
    assert caught.value.path == "$.media.payload"


def test_a_refused_start_leaves_no_stream_behind() -> None:
    media = session()
    with pytest.raises(DecodeError):
        media.receive(start_with_format(encoding="AMR-WB"))
    assert media.stream_id == "" and media.inbound_format is None


# ------------------------------------------------------------------------------- authentication


def websocket_request(token: str | None) -> HttpRequest:
    return opening("/media/telnyx-voice", "wss://media.example.com/media/telnyx-voice",
                   x_telnyx_streaming_auth_token=token)


def test_the_streaming_auth_token_is_accepted() -> None:
    session().verify(websocket_request(TOKEN))


@pytest.mark.parametrize(("token", "reason"), [
    (None, "missing"),
    ("", "missing"),
    (TOKEN[:-1], "does not match"),
    (TOKEN + "x", "does not match"),
])
def test_a_wrong_or_missing_token_is_refused(token: str | None, reason: str) -> None:
    with pytest.raises(SignatureError, match=reason):
        session().verify(websocket_request(token))


def test_without_a_configured_token_nothing_is_checked() -> None:
    TelnyxMedia({}, {}).verify(websocket_request(None))


# ------------------------------------------------------------------------------------ property


INBOUND = ["connected", "start", "start_l16", "media", "media_l16", "media_outbound_track", "dtmf", "mark", "stop",
           "error"]


@given(data=st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_member_replaced_by_any_json_yields_events_or_a_decode_error(data: st.DataObject) -> None:
    frame = mutated(data, FIXTURES.json(data.draw(st.sampled_from(INBOUND))))
    reads_or_refuses(started(data.draw(st.sampled_from(["start", "start_l16"]))), frame)
