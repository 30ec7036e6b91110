"""Asterisk chan_websocket (`babelhub.media.asterisk`): both control formats in, binary media and the
documented commands out (in the format the channel speaks), Basic credentials, and hostile frames."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from babelhub.audio import AudioFormat, Converter
from babelhub.codecs.base import HttpRequest
from babelhub.errors import DecodeError, EncodeError, SignatureError
from babelhub.media import Audio, Dtmf, FlowControl, Played, Start
from babelhub.media.asterisk import MAX_COMMAND_BYTES, MAX_MEDIA_BYTES, AsteriskMedia
from tests import mediakit
from tests.mediakit import MediaFixtures, basic, crossings, reads_or_refuses, refusal_path, tone
from tests.strategies import json_values

FIXTURES = MediaFixtures("asterisk_media")
ULAW = AudioFormat(codec="mulaw", rate=8000, frame_ms=20)


def fixture(name: str) -> str:
    return FIXTURES.text(name)


def started(name: str = "media_start.json", options: dict[str, Any] | None = None) -> AsteriskMedia:
    session = AsteriskMedia({}, options or {})
    session.receive(fixture(name))
    return session


# --------------------------------------------------------------------------------------- inbound


def test_media_start_in_json_starts_the_stream_with_the_channel_variables() -> None:
    session = AsteriskMedia({}, {})
    (start,) = session.receive(fixture("media_start.json"))
    assert start == Start(call_id="pbx1-123456789.999", stream_id="e226e283-c90a-4ea9-9e37-389000b9ef47",
                          inbound_format=ULAW,
                          parameters={"SOME_CHANNEL_VARIABLE": "some value",
                                      "ANOTHER_CHANNEL_VARIABLE": "some other value"})
    assert session.inbound_format == session.outbound_format == ULAW


def test_media_start_in_plain_text_reads_the_same() -> None:
    session = AsteriskMedia({}, {})
    (start,) = session.receive(fixture("media_start.txt"))
    assert start == Start(call_id="pbx1-123456789.999", stream_id="e226e283-c90a-4ea9-9e37-389000b9ef47",
                          inbound_format=ULAW)


def test_the_first_releases_plain_line_without_channel_id_uses_the_connection_id() -> None:
    session = AsteriskMedia({}, {})
    (start,) = session.receive(fixture("media_start_legacy.txt"))
    assert isinstance(start, Start)
    assert start.call_id == start.stream_id == "e226e283-c90a-4ea9-9e37-389000b9ef47"
    assert start.inbound_format == AudioFormat(codec="alaw", rate=8000, frame_ms=20)


@pytest.mark.parametrize(("format_name", "codec", "rate", "frame_size"), [
    ("ulaw", "mulaw", 8000, 160), ("alaw", "alaw", 8000, 160), ("slin", "pcm16", 8000, 320),
    ("slin16", "pcm16", 16000, 640), ("slin24", "pcm16", 24000, 960), ("slin48", "pcm16", 48000, 1920),
])
def test_each_format_maps_to_the_hub_codec_and_rate(format_name: str, codec: str, rate: int, frame_size: int) -> None:
    session = AsteriskMedia({}, {})
    session.receive(json.dumps({"event": "MEDIA_START", "connection_id": "c1", "format": format_name,
                                "optimal_frame_size": frame_size, "ptime": 20}))
    assert session.inbound_format == AudioFormat(codec=codec, rate=rate, frame_ms=20)  # type: ignore[arg-type]
    assert session.outbound_format.frame_bytes() == frame_size


def test_a_second_media_start_changes_nothing() -> None:
    session = started()
    assert session.receive(fixture("media_start_slin16.json")) == []
    assert session.inbound_format == ULAW


@pytest.mark.parametrize(("name", "events"), [
    ("dtmf_end.json", [Dtmf(digit="5")]),
    ("dtmf_end.txt", [Dtmf(digit="#")]),
    ("media_mark_processed.json", [Played(name="reply-1")]),
    ("media_mark_processed.txt", [Played(name="reply-1")]),
    ("status.json", []), ("status.txt", []),
    ("media_buffering_completed.json", []), ("media_buffering_completed.txt", []),
    ("queue_drained.json", []),
    ("media_xon.json", [FlowControl(paused=False)]), ("media_xon.txt", [FlowControl(paused=False)]),
])
def test_each_event_fixture_maps_to_its_events(name: str, events: list[Any]) -> None:
    assert started().receive(fixture(name)) == events


def test_xoff_and_xon_say_whether_asterisk_takes_audio() -> None:
    for fmt in ("json", "txt"):
        session = started()
        assert not session.paused
        assert session.receive(fixture(f"media_xoff.{fmt}")) == [FlowControl(paused=True)]
        assert session.paused
        assert session.receive(fixture(f"media_xon.{fmt}")) == [FlowControl(paused=False)]
        assert not session.paused


def test_an_error_event_is_kept_and_unknown_events_yield_nothing() -> None:
    session = started()
    assert session.receive(fixture("error.json")) == []
    assert session.last_error == "FLUSH_MEDIA not supported in passthrough mode"
    assert session.receive(fixture("error.txt")) == []
    assert session.last_error == "Unable to parse JSON command"
    assert session.receive('{"event":"SOMETHING_NEW","channel_id":"x"}') == []
    assert session.receive("SOMETHING_NEW a:b") == []
    assert session.receive("MEDIA_MARK_PROCESSED") == []  # a mark without an id is none of ours


def test_binary_media_is_audio_with_its_media_time_counted() -> None:
    session = started("media_start_slin16.json")
    first, second = tone(440, 16000, 20), tone(440, 16000, 20)
    assert session.receive(first) == [Audio(payload=first, timestamp_us=0)]
    assert session.receive(second) == [Audio(payload=second, timestamp_us=20_000)]


def test_ulaw_media_of_a_tone_decodes_to_the_tone() -> None:
    """The caller's audio as Asterisk sends it for `c(ulaw)`: 160-byte µ-law frames; converted from the
    declared format to pcm16 it is the 440 Hz tone it was."""
    session = started()
    to_ulaw = Converter(AudioFormat(codec="pcm16", rate=8000), ULAW)
    assert session.inbound_format is not None
    to_linear = Converter(session.inbound_format, AudioFormat(codec="pcm16", rate=8000))
    heard = b""
    for _ in range(50):
        (audio,) = session.receive(to_ulaw.convert(tone(440, 8000, 20)))
        assert isinstance(audio, Audio) and len(audio.payload) == 160
        heard += to_linear.convert(audio.payload)
    assert 860 <= crossings(heard) <= 900  # 440 Hz: 880 zero crossings in the second


# -------------------------------------------------------------------------------------- outbound


def test_commands_follow_the_json_format_of_media_start() -> None:
    session = started("media_start.json")
    assert [json.loads(frame) for frame in session.clear()] == [{"command": "FLUSH_MEDIA"}]
    assert [json.loads(frame) for frame in session.mark("reply-1")] == [
        {"command": "MARK_MEDIA", "correlation_id": "reply-1"}]
    assert [json.loads(frame) for frame in session.hangup()] == [{"command": "HANGUP"}]
    assert session.dtmf("12") == [] and not AsteriskMedia.sends_dtmf


def test_commands_follow_the_plain_text_format_of_media_start() -> None:
    session = started("media_start.txt")
    assert session.clear() == ["FLUSH_MEDIA"]
    assert session.mark("reply-1") == ["MARK_MEDIA reply-1"]
    assert session.hangup() == ["HANGUP"]


def test_a_mark_comes_back_as_played_in_either_format() -> None:
    for start, answer in (("media_start.json", '{{"event":"MEDIA_MARK_PROCESSED","correlation_id":{}}}'),
                          ("media_start.txt", "MEDIA_MARK_PROCESSED {}")):
        session = started(start)
        (sent,) = session.mark("answer 7 done")
        name = json.loads(sent)["correlation_id"] if start.endswith(".json") else str(sent).partition(" ")[2]
        echoed = answer.format(json.dumps(name) if start.endswith(".json") else name)
        assert session.receive(echoed) == [Played(name="answer 7 done")]
    assert AsteriskMedia.acknowledges_marks


def test_answer_is_sent_after_media_start_when_the_connection_asks() -> None:
    assert started("media_start.json").replies() == []
    session = started("media_start.json", {"answer": True})
    assert [json.loads(frame) for frame in session.replies()] == [{"command": "ANSWER"}]
    assert session.replies() == []  # taken once
    assert started("media_start.txt", {"answer": True}).replies() == ["ANSWER"]


def test_send_audio_sends_whole_frames_padded_with_the_codec_silence() -> None:
    session = started()
    frame = bytes(range(160))
    assert session.send_audio(frame) == [frame]
    (padded,) = session.send_audio(bytes(200))
    assert isinstance(padded, bytes) and len(padded) == 320
    assert padded[200:] == b"\xff" * 120  # µ-law silence, not zero bytes (a loud click in µ-law)


def test_send_audio_stays_under_the_message_limit() -> None:
    session = started("media_start_slin16.json")
    payload = tone(300, 16000, 3000)  # 96000 bytes: more than one message may carry
    frames = session.send_audio(payload)
    sent = [frame for frame in frames if isinstance(frame, bytes)]
    assert len(sent) == len(frames) == 2
    assert all(len(frame) <= MAX_MEDIA_BYTES and len(frame) % 640 == 0 for frame in sent)
    assert b"".join(sent) == payload


# ------------------------------------------------------------------------------------- hostile


@pytest.mark.parametrize("name", ["", "x" * 200, " padded ", "é" * 60])
def test_a_mark_asterisk_would_ignore_or_garble_is_refused(name: str) -> None:
    for start in ("media_start.json", "media_start.txt"):
        with pytest.raises(EncodeError):
            started(start).mark(name)


def test_the_longest_accepted_mark_fits_the_command_limit() -> None:
    session = started("media_start.json")
    longest = "m" * (MAX_COMMAND_BYTES - len('{"command":"MARK_MEDIA","correlation_id":""}'))
    (command,) = session.mark(longest)
    assert len(str(command).encode()) == MAX_COMMAND_BYTES
    with pytest.raises(EncodeError):
        session.mark(longest + "m")


@pytest.mark.parametrize(("frame", "path"), [
    ("   ", "$"),
    ('{"event": ["MEDIA_START"]}', "$.event"),
    ('{"event":"MEDIA_START","connection_id":"c1","format":"ulaw"}', "$"),
    ('{"event":"MEDIA_START","connection_id":"c1","format":"ulaw","optimal_frame_size":"160"}',
     "$.optimal_frame_size"),
    ('{"event":"MEDIA_START","connection_id":"c1","format":"opus","optimal_frame_size":0}', "$.format"),
    ('{"event":"MEDIA_START","connection_id":"c1","format":"g722","optimal_frame_size":160}', "$.format"),
    ('{"event":"MEDIA_START","connection_id":"c1","format":"slin44","optimal_frame_size":1764}', "$.format"),
    ('{"event":"MEDIA_START","connection_id":"c1","format":"ulaw","optimal_frame_size":0}', "$.optimal_frame_size"),
    ('{"event":"MEDIA_START","connection_id":"c1","format":"ulaw","optimal_frame_size":160,"ptime":0}', "$.ptime"),
    ('{"event":"MEDIA_START","connection_id":"c1","format":"ulaw","optimal_frame_size":160,"channel_variables":[]}',
     "$.channel_variables"),
    ("MEDIA_START connection_id:c1 format:ulaw optimal_frame_size:lots", "MEDIA_START.optimal_frame_size"),
    ("MEDIA_START connection_id:c1 format:speex optimal_frame_size:160", "MEDIA_START.format"),
    ("MEDIA_START connection_id:c1 format:ulaw", "MEDIA_START"),
    ("MEDIA_START connection_id:c1 ulaw optimal_frame_size:160", "MEDIA_START"),
    ('{"event":"MEDIA_START","x":' + "[" * 100_000 + "]" * 100_000 + "}", "$"),
])
def test_a_malformed_media_start_raises_decode_error_with_the_path(frame: str, path: str) -> None:
    session = AsteriskMedia({}, {})
    assert refusal_path(session, frame) == path
    assert session.inbound_format is None


@pytest.mark.parametrize(("frame", "path"), [
    ('{"event":"DTMF_END","digit":5}', "$.digit"),
    ('{"event":"DTMF_END","digit":"X"}', "$.digit"),
    ("DTMF_END digit:55", "DTMF_END.digit"),
    ("DTMF_END channel_id:x", "DTMF_END"),
    ('{"event":"MEDIA_MARK_PROCESSED","correlation_id":7}', "$.correlation_id"),
])
def test_a_malformed_event_raises_decode_error_with_the_path(frame: str, path: str) -> None:
    assert refusal_path(started(), frame) == path


def test_binary_before_media_start_is_refused() -> None:
    with pytest.raises(DecodeError, match="before the MEDIA_START"):
        AsteriskMedia({}, {}).receive(bytes(160))


def test_odd_length_slin_is_refused() -> None:
    with pytest.raises(DecodeError, match="2 bytes a sample"):
        started("media_start_slin16.json").receive(bytes(641))


# -------------------------------------------------------------------------------------- verify


def opening(authorization: str | None) -> HttpRequest:
    return mediakit.opening("/media/asterisk", authorization=authorization)


def test_basic_credentials_of_websocket_client_conf_are_checked() -> None:
    session = AsteriskMedia({"username": "asterisk", "password": "s3cret:with-colon"}, {})
    session.verify(opening(basic("asterisk", "s3cret:with-colon")))
    for wrong in (None, basic("asterisk", "guess"), basic("other", "s3cret:with-colon"), "Bearer abc",
                  "Basic not*base64", basic("asterisk", "s3cret:with-colon")[:-2]):
        with pytest.raises(SignatureError):
            session.verify(opening(wrong))


def test_without_credentials_the_socket_is_not_checked() -> None:
    AsteriskMedia({}, {}).verify(opening(None))


# --------------------------------------------------------------------------------------- fuzzing

EVENTS = ["MEDIA_START", "DTMF_END", "MEDIA_MARK_PROCESSED", "MEDIA_XOFF", "MEDIA_XON", "STATUS", "ERROR", "OTHER"]
FIELDS = ["connection_id", "format", "optimal_frame_size", "ptime", "channel_id", "channel_variables", "digit",
          "correlation_id", "error_text"]


@settings(max_examples=200, deadline=None)
@given(event=st.sampled_from(EVENTS), fields=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=5),
       before=st.booleans())
def test_any_json_event_is_events_or_a_decode_error(event: str, fields: dict[str, Any], before: bool) -> None:
    """Whatever Asterisk (or an impostor) sends, the session answers with events or a DecodeError."""
    session = AsteriskMedia({}, {}) if before else started()
    reads_or_refuses(session, json.dumps({"event": event, **fields}))


@settings(max_examples=200, deadline=None)
@given(event=st.sampled_from(EVENTS), rest=st.text(max_size=120), before=st.booleans())
def test_any_plain_text_line_is_events_or_a_decode_error(event: str, rest: str, before: bool) -> None:
    session = AsteriskMedia({}, {}) if before else started("media_start.txt")
    reads_or_refuses(session, f"{event} {rest}")


@settings(max_examples=100, deadline=None)
@given(frame=st.binary(max_size=700))
def test_any_binary_frame_is_audio_or_a_decode_error(frame: bytes) -> None:
    reads_or_refuses(started("media_start_slin16.json"), frame)


def test_a_refusal_names_no_credentials() -> None:
    with pytest.raises(SignatureError) as caught:
        AsteriskMedia({"username": "asterisk", "password": "s3cret"}, {}).verify(opening(basic("asterisk", "guess")))
    assert "s3cret" not in str(caught.value) and "guess" not in str(caught.value)
