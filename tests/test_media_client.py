"""The hub's own media stream protocol (`babelhub.media.client`): a client's start, audio frames, DTMF,
played marks and stop, and what the hub sends back; hostile frames are refused naming the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from babelhub.audio import AudioFormat, AudioFrame
from babelhub.errors import DecodeError, EncodeError
from babelhub.media.base import Audio, Dtmf, Played, Start, Stop
from babelhub.media.client import ClientMedia

FIXTURES = Path(__file__).parent / "fixtures" / "client_media"


def fixture(name: str) -> str:
    return (FIXTURES / f"{name}.json").read_text("utf-8")


def started() -> ClientMedia:
    session = ClientMedia({}, {})
    session.receive(fixture("start"))
    return session


def frame(**changes: Any) -> bytes:
    fields: dict[str, Any] = {"stream": "web-7f3a9c", "seq": 3, "timestamp": 60_000, "codec": "pcm16",
                              "rate": 16000, "payload": b"\x01\x00" * 320, **changes}
    return AudioFrame(**fields).to_bytes()


def test_start_names_the_call_the_caller_and_the_formats() -> None:
    session = ClientMedia({}, {})
    assert session.receive(fixture("start")) == [Start(
        call_id="web-7f3a9c", stream_id="web-7f3a9c", caller="visitor-42",
        inbound_format=AudioFormat(codec="pcm16", rate=16000, channels=1, frame_ms=20),
        parameters={"page": "/support"})]
    assert session.outbound_format == AudioFormat(codec="pcm16", rate=16000, frame_ms=20)


def test_a_start_without_a_call_id_gets_one_and_plays_what_it_hears_by_default() -> None:
    session = ClientMedia({}, {})
    [start] = session.receive(json.dumps({"type": "start", "format": {"codec": "mulaw", "rate": 8000}}))
    assert isinstance(start, Start) and len(start.call_id) == 32 and start.stream_id == start.call_id
    assert session.outbound_format == ClientMedia.outbound_format


def test_audio_frames_dtmf_played_and_stop() -> None:
    session = started()
    assert session.receive(frame()) == [Audio(payload=b"\x01\x00" * 320, timestamp_us=60_000)]
    assert session.receive(fixture("dtmf")) == [Dtmf(digit="1"), Dtmf(digit="2"), Dtmf(digit="#")]
    assert session.receive(fixture("played")) == [Played(name="answer-1")]
    assert session.receive(fixture("stop")) == [Stop(reason="hung up")]


def test_what_the_hub_sends_is_frames_of_the_call_and_json_commands() -> None:
    session = started()
    first, second = (AudioFrame.from_bytes(session.send_audio(b"\x00\x00" * 320)[0]) for _ in range(2))  # type: ignore[arg-type]
    assert (first.stream, first.seq, first.timestamp, first.codec, first.rate) == ("web-7f3a9c", 0, 0, "pcm16", 16000)
    assert (second.seq, second.timestamp) == (1, 20_000)
    assert [json.loads(text) for text in (*session.clear(), *session.mark("m1"), *session.dtmf("9"),
                                          *session.hangup("done"))] == [
        {"type": "clear"}, {"type": "mark", "name": "m1"}, {"type": "dtmf", "digits": "9"},
        {"type": "hangup", "reason": "done"}]


def test_nothing_is_sent_before_the_start() -> None:
    with pytest.raises(EncodeError):
        ClientMedia({}, {}).send_audio(b"\x00\x00")


@pytest.mark.parametrize(("text", "path"), [
    ("{", "$"),
    ("[" * 100_000, "$"),
    ('{"type": "start"}', "$"),
    ('{"type": "start", "format": {"codec": "speex", "rate": 8000}}', "$.format.codec"),
    ('{"type": "start", "format": {"codec": "pcm16", "rate": 96000}}', "$.format"),
    ('{"type": "start", "format": {"codec": "pcm16", "rate": 16000, "channels": 9}}', "$.format"),
    ('{"type": "start", "format": {"codec": "pcm16", "rate": 16000}, "call": "bh.*.>"}', "$.call"),
    ('{"type": "start", "format": {"codec": "pcm16", "rate": 16000}, "extra": 1}', "$"),
    ('{"type": "dtmf", "digits": "1; DROP"}', "$.digits"),
    ('{"type": "played", "mark": 7}', "$.mark"),
    ('{"type": "teleport"}', "$.type"),
])
def test_a_bad_text_frame_is_refused_naming_its_path(text: str, path: str) -> None:
    with pytest.raises(DecodeError) as refused:
        ClientMedia({}, {}).receive(text)
    assert refused.value.path == path


def test_audio_before_the_start_in_another_format_or_torn_is_refused() -> None:
    with pytest.raises(DecodeError):
        ClientMedia({}, {}).receive(frame())
    session = started()
    with pytest.raises(DecodeError) as other:
        session.receive(frame(codec="mulaw", rate=8000))
    assert other.value.path == "codec"
    with pytest.raises(DecodeError) as torn:
        session.receive(frame()[:10])
    assert torn.value.path == "header"
    with pytest.raises(DecodeError):
        session.receive(fixture("start"))  # a second start
