"""Vonage Voice WebSocket (`babelhub.media.vonage`): the documented messages in, binary L16 and the
clear/notify actions out, the signed opening request, and hostile frames."""

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
from babelhub.errors import DecodeError, SignatureError
from babelhub.media import Audio, Dtmf, Played, Start
from babelhub.media.vonage import VonageMedia
from tests import mediakit
from tests.mediakit import MediaFixtures, crossings, reads_or_refuses, refusal_path, tone
from tests.strategies import json_values

FIXTURES = MediaFixtures("vonage_media")
NOW = 1_790_000_000.0
SECRET = "vonage-signature-secret-0123456789"


def fixture(name: str) -> str:
    return FIXTURES.text(name)


def started(name: str = "websocket_connected.json") -> VonageMedia:
    session = VonageMedia({}, {})
    session.receive(fixture(name))
    return session


# --------------------------------------------------------------------------------------- inbound


def test_websocket_connected_starts_the_stream_with_the_ncco_headers_as_parameters() -> None:
    session = VonageMedia({}, {})
    (start,) = session.receive(fixture("websocket_connected.json"))
    wideband = AudioFormat(codec="pcm16", rate=16000, frame_ms=20)
    assert start == Start(call_id="", inbound_format=wideband,
                          parameters={"language": "en-GB", "caller-id": "447700900123"})
    assert session.inbound_format == session.outbound_format == wideband
    assert session.outbound_format.frame_bytes() == 640


def test_the_call_headers_become_the_call_and_its_parties_and_8k_narrows_the_format() -> None:
    session = VonageMedia({}, {})
    (start,) = session.receive(fixture("websocket_connected_call_headers.json"))
    assert isinstance(start, Start)
    assert (start.call_id, start.caller, start.callee) == ("aaaaaaaa-bbbb-cccc-dddd-0123456789ab", "447700900000",
                                                           "447700900001")
    assert start.parameters == {"language": "en-GB"}
    assert session.outbound_format == AudioFormat(codec="pcm16", rate=8000, frame_ms=20)
    assert session.outbound_format.frame_bytes() == 320
    assert VonageMedia.outbound_format.rate == 16000  # narrowed on the instance only


def test_a_header_that_is_no_string_is_kept_as_its_json() -> None:
    session = VonageMedia({}, {})
    (start,) = session.receive(json.dumps({"event": "websocket:connected", "content-type": "audio/l16;rate=16000",
                                           "retries": 3, "vip": True, "tags": ["a", "b"]}))
    assert isinstance(start, Start)
    assert start.parameters == {"retries": "3", "vip": "true", "tags": '["a","b"]'}


def test_a_second_websocket_connected_changes_nothing() -> None:
    session = started()
    assert session.receive(fixture("websocket_connected_call_headers.json")) == []
    assert session.inbound_format is not None and session.inbound_format.rate == 16000


def test_dtmf_notify_and_cleared_fixtures() -> None:
    session = started()
    assert session.receive(fixture("websocket_dtmf.json")) == [Dtmf(digit="5")]
    assert session.receive(fixture("websocket_notify.json")) == [Played(name="reply-1")]
    assert session.receive(fixture("websocket_cleared.json")) == []


def test_a_notify_babelhub_did_not_ask_for_and_unknown_events_yield_nothing() -> None:
    session = started()
    assert session.receive('{"event":"websocket:notify","payload":{"other":1}}') == []
    assert session.receive('{"event":"websocket:notify"}') == []
    assert session.receive('{"event":"websocket:something-new","x":1}') == []


def test_binary_audio_is_l16_with_its_media_time_counted() -> None:
    session = started()
    first, second = tone(440, 16000, 20), tone(440, 16000, 20)
    assert session.receive(first) == [Audio(payload=first, timestamp_us=0)]
    assert session.receive(second) == [Audio(payload=second, timestamp_us=20_000)]


def test_the_caller_audio_is_in_the_declared_format() -> None:
    """A 440 Hz tone sent as Vonage sends it (L16, 16 kHz) and converted from the format the session
    declares to G.711 µ-law at 8 kHz and back is still a 440 Hz tone."""
    session = started()
    assert session.inbound_format is not None
    to_mulaw = Converter(session.inbound_format, AudioFormat(codec="mulaw", rate=8000))
    to_linear = Converter(AudioFormat(codec="mulaw", rate=8000), AudioFormat(codec="pcm16", rate=8000))
    heard = b""
    for _ in range(50):  # one second, frame by frame
        (audio,) = session.receive(tone(440, 16000, 20))
        assert isinstance(audio, Audio) and len(audio.payload) == 640
        heard += to_linear.convert(to_mulaw.convert(audio.payload))
    assert len(heard) == 16000  # one second of 8 kHz pcm16
    assert 860 <= crossings(heard) <= 900  # 440 Hz: 880 zero crossings a second


# -------------------------------------------------------------------------------------- outbound


def test_send_audio_writes_one_binary_message_per_20_ms_frame() -> None:
    session = started("websocket_connected_call_headers.json")  # 8 kHz: 320-byte frames
    frame = tone(300, 8000, 20)
    assert session.send_audio(frame) == [frame]
    two_and_a_bit = tone(300, 8000, 50)
    frames = session.send_audio(two_and_a_bit)
    assert [len(f) for f in frames] == [320, 320, 320]
    sent = [f for f in frames if isinstance(f, bytes)]
    assert len(sent) == 3  # binary messages, not text
    assert b"".join(sent)[:len(two_and_a_bit)] == two_and_a_bit
    assert sent[-1][160:] == bytes(160)  # the short last frame is padded with silence


def test_clear_and_mark_are_the_documented_actions_and_the_mark_comes_back_as_played() -> None:
    session = started()
    (clear,) = session.clear()
    assert json.loads(clear) == {"action": "clear"}
    (mark,) = session.mark("answer-7")
    sent = json.loads(mark)
    assert sent == {"action": "notify", "payload": {"name": "answer-7"}}
    # Vonage echoes the payload once the audio before it has played.
    echoed = json.dumps({"event": "websocket:notify", "payload": sent["payload"]})
    assert session.receive(echoed) == [Played(name="answer-7")]
    assert VonageMedia.acknowledges_marks and not VonageMedia.sends_dtmf
    assert session.dtmf("123") == [] and session.hangup() == []


# ------------------------------------------------------------------------------------- hostile


@pytest.mark.parametrize(("frame", "path"), [
    ("{not json", "$"),
    ("[1, 2]", "$"),
    ('{"event": 5}', "$.event"),
    ('{"event":"websocket:dtmf","digit":5}', "$.digit"),
    ('{"event":"websocket:dtmf","digit":"X"}', "$.digit"),
    ('{"event":"websocket:dtmf","digit":"5","duration":"long"}', "$.duration"),
    ('{"event":"websocket:notify","payload":"reply-1"}', "$.payload"),
    ('{"event":"websocket:notify","payload":{"name":7}}', "$.payload.name"),
    ('{"event":"websocket:connected","content-type":"audio/l16;rate=16000","x":' + "[" * 100_000 + "]" * 100_000
     + "}", "$"),
])
def test_malformed_text_raises_decode_error_with_the_path(frame: str, path: str) -> None:
    assert refusal_path(started(), frame) == path


@pytest.mark.parametrize("content_type", [
    '"audio/l16;rate=44100"', '"audio/pcmu;rate=8000"', '"audio/l16"', "16000", "null",
])
def test_an_unusable_content_type_raises_decode_error(content_type: str) -> None:
    session = VonageMedia({}, {})
    frame = '{"event":"websocket:connected","content-type":' + content_type + "}"
    assert refusal_path(session, frame) == "$.content-type"
    assert session.inbound_format is None


def test_websocket_connected_without_content_type_names_it() -> None:
    with pytest.raises(DecodeError) as caught:
        VonageMedia({}, {}).receive('{"event":"websocket:connected"}')
    assert caught.value.path == "$" and "content-type" in caught.value.reason


def test_binary_before_websocket_connected_is_refused() -> None:
    with pytest.raises(DecodeError, match="before the websocket:connected"):
        VonageMedia({}, {}).receive(bytes(640))


def test_odd_length_audio_is_refused() -> None:
    with pytest.raises(DecodeError, match="2 bytes a sample"):
        started().receive(bytes(641))


# -------------------------------------------------------------------------------------- verify


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(claims: dict[str, Any], secret: str = SECRET, alg: str = "HS256") -> str:
    head = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(signature)}"


def opening(authorization: str | None) -> HttpRequest:
    return mediakit.opening("/media/vonage", received_at=NOW, authorization=authorization)


CLAIMS = {"iat": int(NOW) - 2, "jti": "c5ba8f24-1a14-4c10-bfdf-3fbe8ce511b5", "iss": "Vonage",
          "api_key": "aaaaaaaa", "application_id": "aaaaaaaa-bbbb-cccc-dddd-0123456789ab"}


def test_a_request_signed_with_the_signature_secret_is_accepted() -> None:
    VonageMedia({"signature_secret": SECRET}, {}).verify(opening(f"Bearer {token(CLAIMS)}"))


@pytest.mark.parametrize(("authorization", "reason"), [
    (None, "missing Authorization"),
    ("Basic dXNlcjpwYXNz", "missing Authorization"),
    (f"Bearer {token(CLAIMS, secret='another-secret')}", "signature"),
    (f"Bearer {token(CLAIMS, alg='none')}", "not HS256"),
    (f"Bearer {token({**CLAIMS, 'iat': int(NOW) - 3600})}", "issued"),
    (f"Bearer {token({**CLAIMS, 'iat': 'yesterday'})}", "no iat"),
    (f"Bearer {token({k: v for k, v in CLAIMS.items() if k != 'iat'})}", "no iat"),
    (f"Bearer {token({**CLAIMS, 'exp': int(NOW) - 3600})}", "expired"),
    ("Bearer not-a-jwt", "not a JWT"),
    ("Bearer !!!.e30.AAAA", "not JSON"),
])
def test_a_forged_stale_or_missing_token_is_refused(authorization: str | None, reason: str) -> None:
    with pytest.raises(SignatureError, match=reason):
        VonageMedia({"signature_secret": SECRET}, {}).verify(opening(authorization))


def test_a_tampered_claim_breaks_the_signature() -> None:
    head, _, signature = token(CLAIMS).split(".")
    forged = b64url(json.dumps({**CLAIMS, "iat": int(NOW)}).encode())
    with pytest.raises(SignatureError, match="signature"):
        VonageMedia({"signature_secret": SECRET}, {}).verify(opening(f"Bearer {head}.{forged}.{signature}"))


def test_a_custom_authorization_value_must_match_exactly() -> None:
    session = VonageMedia({"authorization": "Bearer abc123"}, {})
    session.verify(opening("Bearer abc123"))
    for wrong in (None, "Bearer abc124", "bearer abc123"):
        with pytest.raises(SignatureError):
            session.verify(opening(wrong))


def test_without_configured_secrets_the_socket_is_not_checked() -> None:
    VonageMedia({}, {}).verify(opening(None))


# --------------------------------------------------------------------------------------- fuzzing

EVENTS = ["websocket:connected", "websocket:dtmf", "websocket:notify", "websocket:cleared", "other"]


@settings(max_examples=200, deadline=None)
@given(event=st.sampled_from(EVENTS), fields=st.dictionaries(
    st.sampled_from(["content-type", "digit", "duration", "payload", "uuid", "from", "x"]), json_values, max_size=4),
    before=st.booleans())
def test_any_message_is_events_or_a_decode_error(event: str, fields: dict[str, Any], before: bool) -> None:
    """Whatever a socket sends, the session answers with events or a DecodeError: nothing else escapes
    to crash the stream's actor."""
    session = VonageMedia({}, {}) if before else started()
    reads_or_refuses(session, json.dumps({"event": event, **fields}))


@settings(max_examples=200, deadline=None)
@given(frame=st.text(max_size=200) | st.binary(max_size=700))
def test_any_frame_is_events_or_a_decode_error(frame: str | bytes) -> None:
    reads_or_refuses(started(), frame)


def test_a_refusal_names_no_secret() -> None:
    for secrets, header in (({"signature_secret": SECRET}, f"Bearer {token(CLAIMS, secret='guess')}"),
                           ({"authorization": "Bearer abc123"}, "Bearer abc124")):
        with pytest.raises(SignatureError) as caught:
            VonageMedia(secrets, {}).verify(opening(header))
        assert not any(value in str(caught.value) for value in secrets.values())
        assert "abc124" not in str(caught.value)
