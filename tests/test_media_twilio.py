"""Twilio Media Streams: every documented message read from real-shaped fixtures, the outbound messages
in the documented shape with the stream's `streamSid`, hostile frames refused naming the JSON path, and
the X-Twilio-Signature of the WebSocket request."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from babelhub.audio import AudioFormat, Converter
from babelhub.codecs.base import HttpRequest
from babelhub.errors import DecodeError, EncodeError, SignatureError
from babelhub.media import Audio, Dtmf, Played, Start, Stop
from babelhub.media.twilio import TwilioMedia
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

FIXTURES = MediaFixtures("twilio_media", suffix=".json")
STREAM_SID = "MZ18ad3ab5a668481ce02b83e7395059f0"
CALL_SID = "CA0f2b6a9e4c1d7e8f90a1b2c3d4e5f6a7"
AUTH_TOKEN = "12345678901234567890123456789012"
STREAM_URL = "wss://media.example.com/media/twilio-voice"
MULAW_8K = AudioFormat(codec="mulaw", rate=8000, channels=1, frame_ms=20)


def text(name: str, **changes: Any) -> str:
    """A fixture's frame as Twilio sends it; `changes` replace top-level members."""
    if not changes:
        return FIXTURES.bytes(name).decode("utf-8")
    return json.dumps(FIXTURES.json(name) | changes)


def session() -> TwilioMedia:
    return TwilioMedia({"auth_token": AUTH_TOKEN}, {})


def started() -> TwilioMedia:
    media = session()
    media.receive(text("start"))
    return media


def twilio_signature(url: str, token: str = AUTH_TOKEN) -> str:
    """Twilio's signature of a request with no POST fields, written out from its docs."""
    return base64.b64encode(hmac.new(token.encode(), url.encode(), hashlib.sha1).digest()).decode()


def websocket_request(url: str, signature: str | None) -> HttpRequest:
    return opening("/media/twilio-voice", url, x_twilio_signature=signature)


# ---------------------------------------------------------------------------------------- inbound


def test_connected_says_nothing() -> None:
    assert session().receive(text("connected")) == []


def test_start_names_the_call_the_stream_its_format_and_parameters() -> None:
    media = session()
    assert media.receive(text("start")) == [Start(
        call_id=CALL_SID, stream_id=STREAM_SID, inbound_format=MULAW_8K,
        parameters={"FirstName": "Jane", "LastName": "Doe", "RemoteParty": "Bob"})]
    assert media.inbound_format == MULAW_8K
    assert media.stream_sid == STREAM_SID


def test_a_real_calls_start_media_and_mark_are_read() -> None:
    media = session()
    (start,) = media.receive(text("log_start"))
    assert isinstance(start, Start)
    assert (start.call_id, start.stream_id) == ("CA3c95a2a6bba5fde93a5dea01e388e8fb",
                                                "9e7ee906-377b-408f-a852-eebfb834422a")
    assert start.parameters == {"aCutomParameter": "aCustomValue that was set in TwiML"}
    (audio,) = media.receive(text("log_media"))
    assert isinstance(audio, Audio)
    assert len(audio.payload) == 160  # 20 ms of µ-law at 8 kHz
    assert audio.timestamp_us == 52_000
    assert media.receive(text("log_mark")) == [Played(name="Repeat message 0")]


def test_media_is_the_callers_mulaw_audio_with_its_timestamp() -> None:
    (audio,) = started().receive(text("media"))
    assert isinstance(audio, Audio)
    assert audio.payload == base64.b64decode(FIXTURES.json("media")["media"]["payload"])
    assert audio.timestamp_us == 5_000


def test_the_audio_is_in_the_declared_format_a_tone_decodes_to_a_tone() -> None:
    media = started()
    (audio,) = media.receive(text("media"))
    assert isinstance(audio, Audio) and media.inbound_format is not None
    pcm = Converter(media.inbound_format, AudioFormat(codec="pcm16", rate=8000)).convert(audio.payload)
    # The fixture is 20 ms of a 400 Hz tone: correlating with a 400 Hz sine finds nearly all its energy.
    rms, share = tone_strength(pcm, 8000)
    assert rms > 4000 and share > 0.95


def test_the_outbound_track_of_a_listen_only_stream_is_not_the_caller() -> None:
    assert started().receive(text("media_outbound_track")) == []


def test_dtmf_mark_and_stop() -> None:
    media = started()
    assert media.receive(text("dtmf")) == [Dtmf(digit="1")]
    assert media.receive(text("mark")) == [Played(name="my label")]
    assert media.receive(text("stop")) == [Stop()]


def test_an_unknown_event_is_skipped() -> None:
    assert started().receive(json.dumps({"event": "transcription", "streamSid": STREAM_SID, "x": [1]})) == []


# ---------------------------------------------------------------------------------------- outbound


def test_outbound_messages_have_the_documented_shape_and_echo_the_stream_sid() -> None:
    media = started()
    packet = bytes(range(160))
    (sent,) = media.send_audio(packet)
    (mark,) = media.mark("reply-1")
    (clear,) = media.clear()
    for frame, documented in ((sent, "outbound_media"), (mark, "outbound_mark"), (clear, "outbound_clear")):
        assert isinstance(frame, str)
        message = json.loads(frame)
        assert same_shape(message, FIXTURES.json(documented)), frame
        assert message["event"] == FIXTURES.json(documented)["event"]
        assert message["streamSid"] == STREAM_SID
    assert base64.b64decode(json.loads(sent)["media"]["payload"]) == packet
    assert json.loads(mark)["mark"] == {"name": "reply-1"}


def test_the_outbound_format_is_mulaw_8khz_in_20ms_packets() -> None:
    assert TwilioMedia.outbound_format == MULAW_8K
    assert TwilioMedia.outbound_format.frame_bytes() == 160
    assert TwilioMedia.acknowledges_marks and not TwilioMedia.sends_dtmf
    assert session().dtmf("12") == [] and session().hangup() == []


def test_each_stream_echoes_its_own_sid() -> None:
    first, second = started(), session()
    second.receive(text("log_start"))
    assert json.loads(first.clear()[0])["streamSid"] == STREAM_SID
    assert json.loads(second.clear()[0])["streamSid"] == "9e7ee906-377b-408f-a852-eebfb834422a"


def test_nothing_is_sent_before_the_start_names_the_stream() -> None:
    media = session()
    for send in (lambda: media.send_audio(b"\xff" * 160), media.clear, lambda: media.mark("m")):
        with pytest.raises(EncodeError, match="streamSid"):
            send()


# ----------------------------------------------------------------------------------- hostile input


def media_with(**fields: Any) -> str:
    return changed(FIXTURES.json("media"), ("media",), **fields)


def start_with(**fields: Any) -> str:
    return changed(FIXTURES.json("start"), ("start",), **fields)


def start_with_format(**fields: Any) -> str:
    return changed(FIXTURES.json("start"), ("start", "mediaFormat"), **fields)


@pytest.mark.parametrize(("frame", "path"), [
    ("[1, 2]", "$"),
    ('{"event": 7}', "$.event"),
    (media_with(payload="no+JhoaJjpz..."), "$.media.payload"),
    (media_with(payload="/7ut!pqGg"), "$.media.payload"),
    (media_with(payload=12), "$.media.payload"),
    (media_with(timestamp="five"), "$.media.timestamp"),
    (media_with(timestamp="-20"), "$.media.timestamp"),
    (json.dumps({"event": "media", "streamSid": STREAM_SID}), "$"),
    (json.dumps({"event": "dtmf", "dtmf": {"digit": "x"}}), "$.dtmf.digit"),
    (json.dumps({"event": "dtmf", "dtmf": {"digit": 1}}), "$.dtmf.digit"),
    (json.dumps({"event": "mark", "mark": {"name": ["a"]}}), "$.mark.name"),
    (json.dumps({"event": "stop", "stop": "now"}), "$.stop"),
    (text("start", start={"streamSid": STREAM_SID}), "$.start"),
    (start_with_format(encoding="audio/l16"), "$.start.mediaFormat.encoding"),
    (start_with_format(sampleRate=0), "$.start.mediaFormat.sampleRate"),
    (start_with_format(channels=100), "$.start.mediaFormat.channels"),
    (start_with(customParameters={"a": {"b": 1}}), "$.start.customParameters[...]"),
])
def test_a_hostile_frame_is_refused_naming_its_path(frame: str | bytes, path: str) -> None:
    assert refusal_path(session(), frame) == path


def test_a_refused_start_leaves_no_stream_behind() -> None:
    media = session()
    with pytest.raises(DecodeError):
        media.receive(start_with_format(encoding="audio/l16"))
    assert media.stream_sid == "" and media.inbound_format is None


# ------------------------------------------------------------------------------------ signature


def test_a_request_signed_with_the_auth_token_is_accepted() -> None:
    session().verify(websocket_request(STREAM_URL, twilio_signature(STREAM_URL)))


@pytest.mark.parametrize(("called", "signed"), [
    ("wss://media.example.com/media/twilio-voice", "wss://media.example.com:443/media/twilio-voice"),
    ("wss://media.example.com:443/media/twilio-voice", "wss://media.example.com/media/twilio-voice"),
])
def test_the_url_is_accepted_with_or_without_its_default_port(called: str, signed: str) -> None:
    session().verify(websocket_request(called, twilio_signature(signed)))


@pytest.mark.parametrize(("request_", "reason"), [
    (websocket_request(STREAM_URL, None), "missing"),
    (websocket_request(STREAM_URL, ""), "missing"),
    (websocket_request(STREAM_URL, twilio_signature(STREAM_URL, token="another token")), "does not match"),
    (websocket_request(STREAM_URL + "/other", twilio_signature(STREAM_URL)), "does not match"),
    (websocket_request("wss://media.example.com:8443/media/twilio-voice", twilio_signature(STREAM_URL)),
     "does not match"),
    (websocket_request("", twilio_signature(STREAM_URL)), "public_url"),
])
def test_a_forged_or_missing_signature_is_refused(request_: HttpRequest, reason: str) -> None:
    with pytest.raises(SignatureError, match=reason):
        session().verify(request_)


def test_without_an_auth_token_nothing_is_accepted() -> None:
    with pytest.raises(SignatureError, match="auth_token"):
        TwilioMedia({}, {}).verify(websocket_request(STREAM_URL, twilio_signature(STREAM_URL, token="")))


def test_a_request_with_a_body_is_refused() -> None:
    signed = websocket_request(STREAM_URL, twilio_signature(STREAM_URL))
    with pytest.raises(SignatureError, match="body"):
        session().verify(HttpRequest(method="GET", headers=signed.headers, url=STREAM_URL, body=b"x=1"))


# ------------------------------------------------------------------------------------ property


INBOUND = ["connected", "start", "media", "media_outbound_track", "dtmf", "mark", "stop", "log_start", "log_media"]


@given(data=st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_member_replaced_by_any_json_yields_events_or_a_decode_error(data: st.DataObject) -> None:
    reads_or_refuses(started(), mutated(data, FIXTURES.json(data.draw(st.sampled_from(INBOUND)))))
