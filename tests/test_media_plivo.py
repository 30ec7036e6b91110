"""Plivo Audio Streaming (`babelhub.media.plivo`): every documented message from the fixtures, the
outbound messages' documented shapes, the V3 signature of the opening request, and hostile frames."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from babelhub.audio import AudioFormat, Converter
from babelhub.codecs.base import HttpRequest
from babelhub.errors import EncodeError, SignatureError
from babelhub.media import Audio, Dtmf, Played, Start
from babelhub.media.plivo import PlivoMedia
from tests.mediakit import REPLACEMENTS, MediaFixtures, goertzel, mutated, reads_or_refuses, refusal_path

FIXTURES = MediaFixtures("plivo_media")
AUTH_TOKEN = "MjFhZTZhYzc0ZWQzYmI3ZTU5NDBjNDQxYzdlZTc4"
CALL_ID = "3f8a2c1e-9b4d-4e7a-8c21-5d6f7a8b9c0d"
STREAM_ID = "b21c7e9a-4f3d-4a8b-9e6c-1d2e3f4a5b6c"


def fixture(name: str) -> str:
    return FIXTURES.text(name)


def documented(name: str) -> Any:
    return json.loads(fixture(name))


def session() -> PlivoMedia:
    return PlivoMedia({"auth_token": AUTH_TOKEN}, {})


def started(name: str = "start.json") -> PlivoMedia:
    plivo = session()
    plivo.receive(fixture(name))
    return plivo


# ------------------------------------------------------------------------------------------------ inbound


def test_start_gives_the_call_the_stream_the_format_and_the_extra_headers() -> None:
    plivo = session()
    assert plivo.receive(fixture("start.json")) == [Start(
        call_id=CALL_ID, stream_id=STREAM_ID, inbound_format=AudioFormat(codec="mulaw", rate=8000, frame_ms=20),
        parameters={"userId": "12345", "sessionId": "abc-xyz"})]
    assert plivo.inbound_format == AudioFormat(codec="mulaw", rate=8000, frame_ms=20)


def test_a_linear_16khz_stream_narrows_the_outbound_format_to_its_own() -> None:
    plivo = session()
    assert PlivoMedia.outbound_format.codec == "mulaw"
    [start] = plivo.receive(fixture("start_l16_16k.json"))
    assert isinstance(start, Start)
    assert start.inbound_format == AudioFormat(codec="pcm16", rate=16000, frame_ms=20)
    assert start.parameters == {"test1": "12", "test2": "123"}
    assert plivo.outbound_format == AudioFormat(codec="pcm16", rate=16000, frame_ms=20)
    sent = json.loads(plivo.send_audio(bytes(640))[0])
    assert sent["media"]["contentType"] == "audio/x-l16"
    assert sent["media"]["sampleRate"] == 16000
    assert PlivoMedia.outbound_format.codec == "mulaw"  # the class default is untouched


def test_media_gives_the_decoded_payload_timed_from_the_first_chunk() -> None:
    plivo = started()
    payload = base64.b64decode(documented("media.json")["media"]["payload"])
    assert plivo.receive(fixture("media.json")) == [Audio(payload=payload, timestamp_us=0)]
    assert plivo.receive(fixture("media_next.json")) == [Audio(payload=payload, timestamp_us=20_000)]


def test_the_outbound_track_is_not_the_callers_audio() -> None:
    assert started().receive(fixture("media_outbound_track.json")) == []


def test_dtmf_played_stream_and_cleared_audio() -> None:
    plivo = started()
    assert plivo.receive(fixture("dtmf.json")) == [Dtmf(digit="5")]
    assert plivo.receive(fixture("played_stream.json")) == [Played(name="greeting-complete")]
    assert plivo.receive(fixture("cleared_audio.json")) == []


def test_every_fixture_from_plivo_decodes() -> None:
    plivo = session()
    for name in FIXTURES.inbound():
        plivo.receive(fixture(name))


def test_unknown_events_are_ignored_for_plivos_future_messages() -> None:
    assert started().receive('{"event": "transcript", "sequenceNumber": 90, "text": 5}') == []


def test_the_inbound_payload_is_mulaw_as_declared_a_tone_decodes_to_the_tone() -> None:
    plivo = session()
    [start] = plivo.receive(fixture("start.json"))
    assert isinstance(start, Start)
    [audio] = plivo.receive(fixture("media.json"))
    assert isinstance(audio, Audio)
    linear = Converter(start.inbound_format, AudioFormat(codec="pcm16", rate=8000)).convert(audio.payload)
    assert len(linear) == 2 * 160
    assert goertzel(linear, 8000, 1000) > 3000  # the fixture's 1 kHz tone, amplitude 8000
    assert goertzel(linear, 8000, 400) < 300
    assert goertzel(linear, 8000, 2500) < 300


# ----------------------------------------------------------------------------------------------- outbound


def test_play_audio_has_the_documented_shape() -> None:
    plivo = started()
    payload = base64.b64decode(documented("out_play_audio.json")["media"]["payload"])
    [frame] = plivo.send_audio(payload)
    assert isinstance(frame, str)
    assert json.loads(frame) == documented("out_play_audio.json")


def test_checkpoint_clear_audio_and_send_dtmf_have_the_documented_shapes() -> None:
    plivo = started()
    [checkpoint] = plivo.mark("greeting-complete")
    [clear] = plivo.clear()
    [dtmf] = plivo.dtmf("1234#")
    assert json.loads(checkpoint) == documented("out_checkpoint.json")
    assert json.loads(clear) == documented("out_clear_audio.json")
    assert json.loads(dtmf) == documented("out_send_dtmf.json")
    assert PlivoMedia.acknowledges_marks and PlivoMedia.sends_dtmf


def test_before_start_there_is_no_stream_to_mark_or_clear() -> None:
    plivo = session()
    assert plivo.mark("m") == [] and plivo.clear() == []
    assert plivo.send_audio(bytes(160))  # playAudio names no stream
    assert plivo.hangup() == []


def test_dtmf_refuses_what_is_no_keypad_digit() -> None:
    with pytest.raises(EncodeError, match="DTMF"):
        started().dtmf("12x")


# ------------------------------------------------------------------------------------------ hostile input


@pytest.mark.parametrize(("frame", "path"), [
    ("[1, 2]", "$"),
    ('{"event": 5}', "$.event"),
    ('{"event": "media", "media": {"track": "inbound", "payload": 160}}', "$.media.payload"),
    ('{"event": "media", "media": {"track": "inbound", "payload": "AAAA@@@@"}}', "$.media.payload"),
    ('{"event": "media", "media": {"track": "inbound", "payload": "AAA\u00e9"}}', "$.media.payload"),
    ('{"event": "media", "media": {"track": "inbound", "timestamp": "soon", "payload": "AAAA"}}',
     "$.media.timestamp"),
    ('{"event": "media"}', "$"),
    ('{"event": "start", "start": {"callId": "c", "streamId": "s", "mediaFormat": {"encoding": "audio/x-mulaw",'
     ' "sampleRate": 16000}}}', "$.start.mediaFormat.sampleRate"),
    ('{"event": "start", "start": {"callId": "c", "streamId": "s", "mediaFormat": {"encoding": "audio/ogg",'
     ' "sampleRate": 8000}}}', "$.start.mediaFormat.encoding"),
    ('{"event": "start", "start": {"callId": 7, "streamId": "s", "mediaFormat": {}}}', "$.start.callId"),
    ('{"event": "start", "start": {"callId": "c", "streamId": "s", "mediaFormat": {"encoding": "audio/x-l16",'
     ' "sampleRate": "fast"}}}', "$.start.mediaFormat.sampleRate"),
    ('{"event": "dtmf", "dtmf": {"digit": "55"}}', "$.dtmf.digit"),
    ('{"event": "dtmf", "dtmf": {"digit": 5}}', "$.dtmf.digit"),
    ('{"event": "playedStream", "name": ["a"]}', "$.name"),
])
def test_a_malformed_frame_is_a_decode_error_naming_the_path(frame: str, path: str) -> None:
    assert refusal_path(started(), frame) == path


# ------------------------------------------------------------------------------------------- the signature


URL = "wss://hub.example.com/media/plivo-main?tenant=acme&lang=en"


def signed(url: str, nonce: str, token: str = AUTH_TOKEN) -> str:
    """X-Plivo-Signature-V3 as Plivo's documentation and plivo-python compute it for a GET, written out
    by hand for this URL: the query sorted by name, then `.` and the nonce."""
    base = "wss://hub.example.com/media/plivo-main?lang=en&tenant=acme"
    assert url.startswith("wss://hub.example.com/media/plivo-main?")
    return base64.b64encode(hmac.new(token.encode(), f"{base}.{nonce}".encode(), hashlib.sha256).digest()).decode()


def opening(headers: dict[str, str], url: str = URL) -> HttpRequest:
    return HttpRequest(method="GET", path="/media/plivo-main", query={"tenant": "acme", "lang": "en"},
                       headers=headers, url=url)


def test_a_correctly_signed_opening_request_is_accepted() -> None:
    nonce = "31627424758254063224"
    session().verify(opening({"x-plivo-signature-v3": signed(URL, nonce), "x-plivo-signature-v3-nonce": nonce}))


def test_the_signature_may_be_one_of_several_and_the_hub_may_know_the_url_as_https() -> None:
    nonce = "5187256101"
    headers = {"x-plivo-signature-v3": f"c29tZXRoaW5nIGVsc2U=, {signed(URL, nonce)}",
               "x-plivo-signature-v3-nonce": nonce}
    session().verify(opening(headers, url=URL.replace("wss://", "https://")))


def test_a_subaccounts_ma_signature_is_accepted() -> None:
    nonce = "77"
    session().verify(opening({"x-plivo-signature-ma-v3": signed(URL, nonce), "x-plivo-signature-v3-nonce": nonce}))


@pytest.mark.parametrize("headers", [
    {},
    {"x-plivo-signature-v3-nonce": "1"},
    {"x-plivo-signature-v3": signed(URL, "1")},
    {"x-plivo-signature-v3": signed(URL, "1"), "x-plivo-signature-v3-nonce": "2"},
    {"x-plivo-signature-v3": signed(URL, "1", token="another token"), "x-plivo-signature-v3-nonce": "1"},
])
def test_a_forged_or_missing_signature_is_refused(headers: dict[str, str]) -> None:
    with pytest.raises(SignatureError):
        session().verify(opening(headers))


def test_a_signature_for_another_url_is_refused() -> None:
    nonce = "9"
    headers = {"x-plivo-signature-v3": signed(URL, nonce), "x-plivo-signature-v3-nonce": nonce}
    with pytest.raises(SignatureError):
        session().verify(opening(headers, url="wss://hub.example.com/media/plivo-other?lang=en&tenant=acme"))


def test_without_an_auth_token_or_a_known_url_nothing_verifies() -> None:
    nonce = "3"
    headers = {"x-plivo-signature-v3": signed(URL, nonce), "x-plivo-signature-v3-nonce": nonce}
    with pytest.raises(SignatureError, match="auth_token"):
        PlivoMedia({}, {}).verify(opening(headers))
    with pytest.raises(SignatureError, match="public_url"):
        session().verify(opening(headers, url=""))


def hand_signed(signed_string: str, token: str = AUTH_TOKEN) -> str:
    return base64.b64encode(hmac.new(token.encode(), signed_string.encode(), hashlib.sha256).digest()).decode()


def test_a_url_without_a_query_is_signed_without_a_question_mark() -> None:
    url = "wss://hub.example.com/media/plivo-main"
    headers = {"x-plivo-signature-v3": hand_signed(f"{url}.42"), "x-plivo-signature-v3-nonce": "42"}
    session().verify(opening(headers, url=url))


def test_a_repeated_query_name_is_signed_with_its_values_sorted() -> None:
    url = "wss://hub.example.com/media/plivo-main?b=2&a=1&a=0"
    expected = "wss://hub.example.com/media/plivo-main?a=0&a=1&b=2.42"
    headers = {"x-plivo-signature-v3": hand_signed(expected), "x-plivo-signature-v3-nonce": "42"}
    session().verify(opening(headers, url=url))


INBOUND = [documented(name) for name in FIXTURES.inbound()]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_member_of_a_documented_message_replaced_by_any_json_reads_or_is_a_decode_error(
        data: st.DataObject) -> None:
    reads_or_refuses(PlivoMedia({}, {}), mutated(data, data.draw(st.sampled_from(INBOUND)), REPLACEMENTS))
