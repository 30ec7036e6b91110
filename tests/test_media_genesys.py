"""Genesys Cloud AudioHook (`babelhub.media.genesys`): every documented client message read from its
fixture, the hub's answers with their counters, the Audio Connector's way back, the signed opening
request (the documentation's own example) and hostile input."""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from babelhub.audio import AudioFormat, Converter
from babelhub.codecs.base import HttpRequest
from babelhub.errors import DecodeError, SignatureError
from babelhub.media import Audio, Dtmf, Played, Start, Stop
from babelhub.media.genesys import GenesysMedia, GenesysSecrets
from tests.mediakit import MediaFixtures, pcm, reads_or_refuses, refusal_path, samples_of, tone, tone_samples

FIXTURES = MediaFixtures("genesys_media")
SESSION = "e160e428-53e2-487c-977d-96989bf5c99d"
API_KEY = "SGVsbG8sIEkgYW0gdGhlIEFQSSBrZXkh"
PCM_8K = AudioFormat(codec="pcm16", rate=8000, channels=1)


def fixture_text(name: str) -> str:
    return FIXTURES.text(name)


def fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(fixture_text(name))
    return loaded


def message(kind: str, seq: int, serverseq: int = 0, parameters: dict[str, Any] | None = None,
            session: str = SESSION, **extra: Any) -> str:
    return json.dumps({"version": "2", "id": session, "type": kind, "seq": seq, "serverseq": serverseq,
                       "position": "PT0S", "parameters": parameters or {}, **extra})


def opened_session(name: str = "open_audio_connector.json") -> tuple[GenesysMedia, list[Any]]:
    session = GenesysMedia({"api_key": API_KEY}, {})
    events = session.receive(fixture_text(name))
    return session, events


def sent(frames: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(frame) for frame in frames]


def frequency(samples: list[int], rate: int = 8000) -> float:
    """The tone's frequency, from its rising zero crossings."""
    crossings = sum(1 for a, b in itertools.pairwise(samples) if a < 0 <= b)
    return crossings * rate / len(samples)


# --- the provider is found by its channel name


def test_the_secrets_are_declared() -> None:
    assert GenesysMedia.secret_settings is GenesysSecrets


# --- inbound: every fixture


def test_open_of_audio_connector_starts_the_call_and_is_answered_with_opened() -> None:
    session, events = opened_session()
    assert events == [Start(
        call_id="090eaa2f-72fa-480a-83e0-8667ff89c0ec", stream_id=SESSION, caller="+1-555-555-1234",
        callee="+1-800-555-6789", inbound_format=AudioFormat(codec="mulaw", rate=8000, channels=1),
        parameters={"customerTier": "gold", "intent": "billing",
                    "genesys.organizationId": "d7934305-0972-4844-938e-9060eef73d05",
                    "genesys.participantId": "883efee8-3d6c-4537-b500-6d7ca4b92fa0",
                    "genesys.aniName": "John Doe", "genesys.language": "en-US"})]
    [opened] = sent(session.replies())
    assert opened == {"version": "2", "type": "opened", "seq": 1, "clientseq": 1, "id": SESSION,
                      "parameters": {"media": [{"type": "audio", "format": "PCMU", "channels": ["external"],
                                                "rate": 8000}], "startPaused": False}}
    assert session.replies() == []  # taken once


def test_open_of_monitor_chooses_the_first_offer_stereo() -> None:
    session, [start] = opened_session("open_monitor_stereo.json")
    assert isinstance(start, Start)
    assert start.inbound_format == AudioFormat(codec="mulaw", rate=8000, channels=2)
    assert session.inbound_format == start.inbound_format
    [opened] = sent(session.replies())
    assert opened["parameters"]["media"] == [{"type": "audio", "format": "PCMU",
                                              "channels": ["external", "internal"], "rate": 8000}]


def test_an_offer_without_pcmu_is_passed_over() -> None:
    offer = fixture("open_monitor_stereo.json")
    offer["parameters"]["media"] = [{"type": "audio", "format": "L16", "channels": ["external"], "rate": 8000},
                                    {"type": "audio", "format": "PCMU", "channels": ["internal"], "rate": 8000}]
    session = GenesysMedia({"api_key": API_KEY}, {})
    [start] = session.receive(json.dumps(offer))
    assert isinstance(start, Start) and start.inbound_format.channels == 1
    assert sent(session.replies())[0]["parameters"]["media"][0]["channels"] == ["internal"]


def test_supported_languages_are_answered_when_asked() -> None:
    offer = fixture("open_audio_connector.json")
    offer["parameters"]["supportedLanguages"] = True
    session = GenesysMedia({"api_key": API_KEY}, {"supported_languages": ["en-US", "es-ES"]})
    session.receive(json.dumps(offer))
    assert sent(session.replies())[0]["parameters"]["supportedLanguages"] == ["en-US", "es-ES"]


def test_ping_is_answered_with_pong_carrying_both_counters() -> None:
    session, _ = opened_session()
    session.replies()
    assert session.receive(fixture_text("ping.json")) == []
    [pong] = sent(session.replies())
    assert pong == {"version": "2", "type": "pong", "seq": 2, "clientseq": 2, "id": SESSION, "parameters": {}}


def test_every_client_message_of_a_session_maps_to_its_events() -> None:
    session, _ = opened_session()
    session.replies()
    expected: dict[str, list[Any]] = {
        "ping.json": [], "dtmf.json": [Dtmf(digit="5")], "playback_started.json": [],
        "playback_completed.json": [], "paused.json": [], "resumed.json": [], "discarded.json": [],
        "update.json": [], "error.json": [], "close.json": [Stop(reason="end")],
    }
    for name, events in expected.items():
        assert session.receive(fixture_text(name)) == events, name
    replies = sent(session.replies())
    assert [(reply["type"], reply["seq"], reply["clientseq"]) for reply in replies] == [
        ("pong", 2, 2), ("closed", 3, 11)]


def test_audio_is_passed_on_with_its_media_time() -> None:
    session, _ = opened_session()
    first, second = bytes(range(160)), bytes(range(80))
    assert session.receive(first) == [Audio(payload=first, timestamp_us=0)]
    assert session.receive(second) == [Audio(payload=second, timestamp_us=20_000)]
    assert session.receive(bytes(8)) == [Audio(payload=bytes(8), timestamp_us=30_000)]


def test_discarded_audio_moves_the_media_time_on() -> None:
    session, _ = opened_session()
    session.receive(bytes(160))  # 20 ms
    for seq, name in enumerate(("ping.json", "dtmf.json", "playback_started.json", "playback_completed.json",
                                "paused.json", "resumed.json", "discarded.json"), start=2):
        assert fixture(name)["seq"] == seq
        session.receive(fixture_text(name))
    # 20 ms heard, 3.2 s not sent while paused, 0.54 s dropped by the client
    assert session.receive(bytes(160)) == [Audio(payload=bytes(160), timestamp_us=20_000 + 3_200_000 + 540_000)]


def test_the_caller_s_mu_law_is_the_declared_format() -> None:
    session, [start] = opened_session()
    assert isinstance(start, Start)
    caller = Converter(PCM_8K, start.inbound_format).convert(tone(440, 8000, 200))
    [audio] = session.receive(caller)
    assert isinstance(audio, Audio)
    heard = Converter(start.inbound_format, PCM_8K).convert(audio.payload)
    assert frequency(samples_of(heard)) == pytest.approx(440, abs=10)


def test_stereo_is_interleaved_in_the_order_of_the_channels() -> None:
    session, [start] = opened_session("open_monitor_stereo.json")
    assert isinstance(start, Start)
    external, internal = tone_samples(440, 8000, 200), tone_samples(1000, 8000, 200)
    interleaved = [sample for pair in zip(external, internal, strict=True) for sample in pair]
    wire = Converter(AudioFormat(codec="pcm16", rate=8000, channels=2), start.inbound_format).convert(pcm(interleaved))
    [audio] = session.receive(wire)
    assert isinstance(audio, Audio)
    heard = Converter(start.inbound_format, AudioFormat(codec="pcm16", rate=8000, channels=2)).convert(audio.payload)
    samples = samples_of(heard)
    assert frequency(samples[0::2]) == pytest.approx(440, abs=10)
    assert frequency(samples[1::2]) == pytest.approx(1000, abs=10)


# --- outbound (Audio Connector)


def test_audio_goes_back_as_binary_pcmu_packets() -> None:
    session, _ = opened_session()
    assert GenesysMedia.outbound_format == AudioFormat(codec="mulaw", rate=8000, channels=1, frame_ms=200)
    packet = bytes(GenesysMedia.outbound_format.frame_bytes())
    assert len(packet) == 1600
    assert session.send_audio(packet) == [packet]


def test_a_monitor_session_is_listen_only_and_an_audio_connector_one_plays() -> None:
    connector, _ = opened_session()
    assert connector.plays_audio
    stereo_monitor, _ = opened_session("open_monitor_stereo.json")  # takes the internal channel
    declared_monitor = GenesysMedia({"api_key": API_KEY}, {"monitor": True})
    declared_monitor.receive(fixture_text("open_audio_connector.json"))
    for monitor in (stereo_monitor, declared_monitor):
        assert not monitor.plays_audio
        assert monitor.send_audio(bytes(1600)) == [] and monitor.clear() == []  # Monitor plays nothing
        assert [sent(monitor.hangup())[0]["type"]] == ["disconnect"]


def test_nothing_is_sent_before_open_or_after_close() -> None:
    session = GenesysMedia({"api_key": API_KEY}, {})
    assert session.send_audio(bytes(1600)) == [] and session.clear() == [] and session.hangup() == []
    session.receive(fixture_text("open_audio_connector.json"))
    session.receive(message("close", 2, 1, {"reason": "end"}))
    assert session.send_audio(bytes(1600)) == [] and session.clear() == [] and session.hangup() == []


def test_clear_is_a_barge_in_event_numbered_after_the_answers() -> None:
    session, _ = opened_session()
    session.replies()
    session.receive(fixture_text("ping.json"))
    session.replies()
    [event] = sent(session.clear())
    assert event == {"version": "2", "type": "event", "seq": 3, "clientseq": 2, "id": SESSION,
                     "parameters": {"entities": [{"type": "barge_in", "data": {}}]}}


def test_hangup_is_a_disconnect_and_genesys_closes() -> None:
    session, _ = opened_session()
    session.replies()
    [disconnect] = sent(session.hangup("caller served"))
    assert disconnect == {"version": "2", "type": "disconnect", "seq": 2, "clientseq": 1, "id": SESSION,
                          "parameters": {"reason": "completed", "info": "caller served"}}
    assert session.receive(message("close", 2, 2, {"reason": "disconnect"})) == [Stop(reason="disconnect")]
    assert sent(session.replies())[0]["type"] == "closed"


def test_playback_completed_acknowledges_the_marks_set_since_audio_was_sent() -> None:
    session, _ = opened_session()
    assert GenesysMedia.acknowledges_marks and not GenesysMedia.sends_dtmf
    session.send_audio(bytes(1600))
    assert session.mark("greeting") == []
    session.send_audio(bytes(1600))
    session.mark("question")
    assert session.receive(message("playback_started", 2, 1)) == []
    assert session.receive(bytes(160))[0] == Audio(payload=bytes(160), timestamp_us=0)
    assert session.receive(message("playback_completed", 3, 1)) == [Played(name="greeting"), Played(name="question")]
    assert session.receive(message("playback_completed", 4, 1)) == []


def test_a_mark_with_nothing_left_to_play_is_played_at_once() -> None:
    session, _ = opened_session()
    session.mark("nothing-sent")
    assert session.receive(bytes(160)) == [Played(name="nothing-sent"), Audio(payload=bytes(160), timestamp_us=0)]


def test_the_hub_plays_no_dtmf() -> None:
    session, _ = opened_session()
    assert session.dtmf("123") == []


# --- hostile input


@pytest.mark.parametrize(("frame", "path"), [
    ("[]", "$"),
    (message("ping", "2"), "$.seq"),  # type: ignore[arg-type]
    (message("ping", 3), "$.seq"),
    (message("ping", 1), "$.seq"),
    (message("ping", 2, serverseq=2), "$.serverseq"),
    (message("ping", 2, serverseq=-1), "$.serverseq"),
    (message("ping", 2, session="30b0e395-84d3-4570-ac13-9a62d8f514c0"), "$.id"),
    (json.dumps({"version": "1", "id": SESSION, "type": "ping", "seq": 2, "serverseq": 0}), "$.version"),
    (json.dumps({"version": "2", "id": SESSION, "type": "ping", "serverseq": 0}), "$"),
    (message("dtmf", 2, 1, {"digit": 5}), "$.parameters.digit"),
    (message("dtmf", 2, 1, {"digit": "55"}), "$.parameters.digit"),
    (message("dtmf", 2, 1, {"digit": "x"}), "$.parameters.digit"),
    (message("close", 2, 1, {"reason": ["end"]}), "$.parameters.reason"),
    (message("discarded", 2, 1, {"start": "PT1S", "discarded": "1.5"}), "$.parameters.discarded"),
    (message("discarded", 2, 1, {"start": "PT1S", "discarded": "PT-1S"}), "$.parameters.discarded"),
    (json.dumps({"version": "2", "id": SESSION, "type": "dtmf", "seq": 2, "serverseq": 1, "parameters": []}),
     "$.parameters"),
    (message("open", 2, 1, fixture("open_audio_connector.json")["parameters"]), "$.type"),
])
def test_a_bad_message_is_refused_naming_its_path(frame: str, path: str) -> None:
    assert refusal_path(opened_session()[0], frame) == path


@pytest.mark.parametrize(("change", "path"), [
    (lambda p: p.pop("conversationId"), "$.parameters"),
    (lambda p: p.update(conversationId=42), "$.parameters.conversationId"),
    (lambda p: p.update(media="PCMU"), "$.parameters.media"),
    (lambda p: p.update(media=[]), "$.parameters.media"),
    (lambda p: p.update(media=[{"type": "audio", "format": "L16", "channels": ["external"], "rate": 8000}]),
     "$.parameters.media"),
    (lambda p: p["media"][0].update(rate="8000"), "$.parameters.media[0].rate"),
    (lambda p: p["participant"].update(ani=15555551234), "$.parameters.participant.ani"),
    (lambda p: p.update(inputVariables={"tier": 1}), "$.parameters.inputVariables[...]"),
])
def test_a_bad_open_is_refused_naming_its_path(change: Any, path: str) -> None:
    offer = fixture("open_audio_connector.json")
    change(offer["parameters"])
    session = GenesysMedia({"api_key": API_KEY}, {})
    assert refusal_path(session, json.dumps(offer)) == path
    assert session.replies() == []


def test_audio_before_open_or_after_close_is_refused() -> None:
    session = GenesysMedia({"api_key": API_KEY}, {})
    with pytest.raises(DecodeError, match="before"):
        session.receive(bytes(160))
    session.receive(fixture_text("open_audio_connector.json"))
    session.receive(message("close", 2, 1, {"reason": "end"}))
    with pytest.raises(DecodeError, match="after"):
        session.receive(bytes(160))


def test_stereo_audio_of_half_a_sample_is_refused() -> None:
    session, _ = opened_session("open_monitor_stereo.json")
    with pytest.raises(DecodeError, match="whole samples"):
        session.receive(bytes(161))


def test_unknown_message_types_are_read_and_counted() -> None:
    session, _ = opened_session()
    assert session.receive(message("reconnected_somewhere", 2, 1, {"what": ["ever"]})) == []
    assert session.receive(message("ping", 3, 1)) == []


# --- the opening request


def signed_request(**changes: Any) -> tuple[HttpRequest, dict[str, str]]:
    document = fixture("connect_request_signed.json")
    secrets = document.pop("_secrets")
    document["headers"].update(changes.pop("headers", {}))
    document.update(changes)
    return HttpRequest(**document), secrets


def sign(request: HttpRequest, secret: str, signature_input: str) -> str:
    """A signature made the way Genesys makes it, for signature inputs other than the documented one."""
    params = signature_input.split("=", 1)[1]
    lines = [f'"@request-target": {request.path}', '"@authority": audiohook.example.com']
    lines += [f'"{name}": {request.headers[name]}' for name in
              ("audiohook-organization-id", "audiohook-session-id", "audiohook-correlation-id", "x-api-key")]
    lines.append(f'"@signature-params": {params}')
    digest = hmac.new(base64.b64decode(secret), "\n".join(lines).encode(), hashlib.sha256).digest()
    return f"sig1=:{base64.b64encode(digest).decode()}:"


def test_the_documented_signed_request_verifies() -> None:
    request, secrets = signed_request()
    GenesysMedia(secrets, {}).verify(request)


def test_without_a_client_secret_the_api_key_alone_is_checked() -> None:
    request, secrets = signed_request(headers={"signature": "sig1=:AAAA:"})
    GenesysMedia({"api_key": secrets["api_key"]}, {}).verify(request)


@pytest.mark.parametrize(("changes", "reason"), [
    ({"headers": {"x-api-key": "bm90IHRoZSBrZXk="}}, "X-API-KEY"),
    ({"headers": {"x-api-key": ""}}, "X-API-KEY"),
    ({"headers": {"signature": "sig1=:NZBwyBHRRyRoeLqy1IzOa9VYBuI8TgMFt2GRDkDvJh4=:"}}, "does not match"),
    ({"headers": {"signature": ""}}, "missing"),
    ({"headers": {"signature-input": ""}}, "missing"),
    ({"headers": {"audiohook-session-id": "e160e428-53e2-487c-977d-96989bf5c99d"}}, "does not match"),
    ({"url": "wss://audiohook.example.com/api/v1/other/ws"}, "does not match"),
    ({"url": "wss://evil.example.com/api/v1/voicebiometrics/ws"}, "does not match"),
    ({"received_at": 1641013200.0 + 60}, "stale"),
    ({"received_at": 1641013200.0 - 60}, "future"),
    ({"headers": {"signature": "sig1=NZBw"}}, "unreadable"),
    ({"headers": {"signature": "sig2=:NZBwyBHRRyRoeLqy1IzOa9VYBuI8TgMFt2GRDkDuJh4=:"}}, "unreadable"),
    ({"headers": {"signature-input": 'sig1=("@request-target");created=1641013200'}}, "keyid"),
])
def test_a_forged_missing_or_stale_signature_is_refused(changes: dict[str, Any], reason: str) -> None:
    request, secrets = signed_request(**changes)
    with pytest.raises(SignatureError, match=reason):
        GenesysMedia(secrets, {}).verify(request)


@pytest.mark.parametrize(("signature_input", "reason"), [
    # signed correctly, but not over what Genesys must sign
    ('sig1=("@request-target" "@authority" "audiohook-organization-id" "audiohook-session-id" "x-api-key");'
     f'keyid="{API_KEY}";alg="hmac-sha256";created=1641013200', "audiohook-correlation-id"),
    # no created time: its age is unknown
    ('sig1=("@request-target" "@authority" "audiohook-organization-id" "audiohook-session-id" '
     f'"audiohook-correlation-id" "x-api-key");keyid="{API_KEY}";alg="hmac-sha256"', "created"),
    ('sig1=("@request-target" "@authority" "audiohook-organization-id" "audiohook-session-id" '
     f'"audiohook-correlation-id" "x-api-key");keyid="{API_KEY}";alg="hmac-sha256";created=1641013200;'
     'expires=1641013190', "expired"),
    ('sig1=("@request-target" "@authority" "audiohook-organization-id" "audiohook-session-id" '
     f'"audiohook-correlation-id" "x-api-key");keyid="{API_KEY}";alg="rsa-pss-sha512";created=1641013200', "alg"),
])
def test_a_signature_over_too_little_or_without_its_limits_is_refused(signature_input: str, reason: str) -> None:
    request, secrets = signed_request(headers={"signature-input": signature_input})
    request, _ = signed_request(headers={"signature-input": signature_input,
                                         "signature": sign(request, secrets["client_secret"], signature_input)})
    with pytest.raises(SignatureError, match=reason):
        GenesysMedia(secrets, {}).verify(request)


def test_a_fresh_signature_of_another_nonce_verifies() -> None:
    signature_input = ('sig1=("@request-target" "@authority" "audiohook-organization-id" "audiohook-session-id" '
                       f'"audiohook-correlation-id" "x-api-key");keyid="{API_KEY}";'
                       'nonce="bm9uY2Utb2YtdGhpcy1yZXF1ZXN0";alg="hmac-sha256";created=1641013199;expires=1641013499')
    request, secrets = signed_request(headers={"signature-input": signature_input})
    request, _ = signed_request(headers={"signature-input": signature_input,
                                         "signature": sign(request, secrets["client_secret"], signature_input)})
    GenesysMedia(secrets, {}).verify(request)


def test_the_api_key_is_required_and_no_secret_is_echoed() -> None:
    request, secrets = signed_request()
    with pytest.raises(SignatureError) as refused:
        GenesysMedia({}, {}).verify(request)
    assert "api_key" in str(refused.value)
    request, _ = signed_request(headers={"x-api-key": "wrong"})
    with pytest.raises(SignatureError) as refused:
        GenesysMedia(secrets, {}).verify(request)
    assert secrets["api_key"] not in str(refused.value) and secrets["client_secret"] not in str(refused.value)


def test_messages_must_carry_the_session_id_of_the_opening_request() -> None:
    request, secrets = signed_request()
    session = GenesysMedia(secrets, {})
    session.verify(request)  # Audiohook-Session-Id: 30b0e395-…
    with pytest.raises(DecodeError) as refused:
        session.receive(fixture_text("open_audio_connector.json"))  # id e160e428-…
    assert refused.value.path == "$.id"
    session = GenesysMedia({"api_key": API_KEY}, {})
    session.verify(signed_request(headers={"audiohook-session-id": SESSION})[0])
    [start] = session.receive(fixture_text("open_audio_connector.json"))
    assert isinstance(start, Start) and start.stream_id == SESSION


def test_a_position_that_is_no_duration_is_refused() -> None:
    session, _ = opened_session()
    with pytest.raises(DecodeError) as refused:
        session.receive(message("ping", 2, 1, position="5 seconds"))
    assert refused.value.path == "$.position"


def test_clear_drops_the_audio_and_ends_its_marks() -> None:
    session, _ = opened_session()
    session.send_audio(bytes(1600))
    session.mark("cut-short")
    session.clear()
    assert session.receive(bytes(160)) == [Played(name="cut-short"), Audio(payload=bytes(160), timestamp_us=0)]
    assert session.receive(message("playback_completed", 2, 1)) == []


# --- whatever arrives, only DecodeError / SignatureError come out

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
MESSAGE_FILES = [name for name in FIXTURES.inbound() if name != "connect_request_signed.json"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(MESSAGE_FILES), path=st.lists(st.text(max_size=12), min_size=1, max_size=3),
       value=JSON, opened=st.booleans())
def test_a_mutated_message_raises_nothing_but_decode_error(name: str, path: list[str], value: Any,
                                                          opened: bool) -> None:
    document = fixture(name)
    if opened and document["type"] != "open":
        document["seq"], document["serverseq"] = 2, 1
    target = document
    keys = [key for key in ("parameters", *path) if key]
    for key in keys[:-1]:
        if not isinstance(target.get(key), dict):
            target[key] = {}
        target = target[key]
    target[keys[-1]] = value
    session = opened_session()[0] if opened else GenesysMedia({"api_key": API_KEY}, {})
    reads_or_refuses(session, json.dumps(document))


@settings(max_examples=300, deadline=None)
@given(frame=st.binary(max_size=64) | st.text(max_size=64), opened=st.booleans())
def test_any_frame_raises_nothing_but_decode_error(frame: bytes | str, opened: bool) -> None:
    session = opened_session()[0] if opened else GenesysMedia({"api_key": API_KEY}, {})
    reads_or_refuses(session, frame)


SF_PIECES = st.sampled_from(['sig1', '=', '(', ')', '"@request-target"', '"x-api-key"', ';', 'keyid=', 'created=',
                             '1641013200', '"', '\\', ':', 'NZBw', '==', ' ', ',', '?1', 'alg', 'tok/en', '-9'])


@settings(max_examples=300, deadline=None)
@given(signature_input=st.lists(SF_PIECES, max_size=30).map("".join) | st.text(max_size=60),
       signature=st.lists(SF_PIECES, max_size=12).map("".join) | st.text(max_size=60))
def test_any_signature_header_raises_nothing_but_signature_error(signature_input: str, signature: str) -> None:
    request, secrets = signed_request(headers={"signature-input": signature_input, "signature": signature})
    with pytest.raises(SignatureError):
        GenesysMedia(secrets, {}).verify(request)
