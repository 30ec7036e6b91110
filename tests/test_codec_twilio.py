"""Twilio Messaging codec: SMS/MMS/WhatsApp webhook forms and status callbacks decoded from real-shaped
fixtures, X-Twilio-Signature checks, exact Messages API requests, API answers, and sending through a local
fake API."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest

from babelhub import canonical
from babelhub.canonical import (
    Action,
    Button,
    Buttons,
    Envelope,
    Location,
    Media,
    Message,
    Native,
    Part,
    Status,
    Template,
    Text,
    Unsupported,
)
from babelhub.codecs import load, native
from babelhub.codecs.base import DecodeContext, EncodeContext, HttpRequest, HttpResponse, OutboundRequest, SendResult
from babelhub.codecs.degrade import degrade
from babelhub.codecs.twilio import API_BASE, TwilioCodec
from babelhub.errors import DecodeError, EncodeError, SignatureError
from babelhub.services.delivery import RetryPolicy
from tests import codeckit
from tests.codeckit import Fixtures, Ids, corpus_files, deliver_one, outbound_message, response, utc
from tests.fakeapi import FakeApi, Recorded, Reply

FIXTURES = Fixtures("twilio", suffix=".json")
CORPUS = codeckit.CORPUS / "twilio_messaging"

CODEC = TwilioCodec()
TENANT, CONNECTION = "acme", "twilio-main"
CTX = DecodeContext(tenant=TENANT, connection=CONNECTION, seq=7)
RECEIVED_AT = 1_692_853_305.0
ACCOUNT_SID = "ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"
AUTH_TOKEN = "your_auth_token"
WEBHOOK_URL = "https://hooks.example.com/webhooks/twilio/twilio-main"
FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.02)


load_json = FIXTURES.json


def form_body(name: str, **changes: str | None) -> bytes:
    """A fixture's form body as posted; `changes` set fields (None removes one), keeping the order."""
    fixture = load_json(name)
    if not changes:
        return str(fixture["_raw"]).encode()
    fields = {**fixture["fields"], **changes}
    return urlencode({key: value for key, value in fields.items() if value is not None}).encode()


def request(name: str, **changes: str | None) -> HttpRequest:
    return HttpRequest(body=form_body(name, **changes), url=WEBHOOK_URL, received_at=RECEIVED_AT)


def decode(name: str, **changes: str | None) -> Envelope:
    (envelope,) = CODEC.decode(request(name, **changes), CTX)
    return envelope


def message(name: str, **changes: str | None) -> Message:
    envelope = decode(name, **changes)
    assert isinstance(envelope, Message)
    return envelope


def status(name: str, **changes: str | None) -> Status:
    envelope = decode(name, **changes)
    assert isinstance(envelope, Status)
    return envelope


IDS = Ids(TENANT, CONNECTION, "twilio")
mid, conversation = IDS.message, IDS.conversation
RECEIVED = utc(RECEIVED_AT)


# ------------------------------------------------------------------------------ incoming messages


def test_whatsapp_text_from_the_corpus() -> None:
    msg = message("whatsapp_text")
    sid = "SM45e9b726c0314a5524c3f3cb4ZZZZZ"
    user = "whatsapp:+919900000000"
    assert msg.parts == [Text(text="hey")]
    assert msg.id == mid(sid)
    assert msg.native == Native(id=sid, seq=7)
    assert (msg.direction, msg.ts, msg.reply_to) == ("inbound", RECEIVED, "")
    assert msg.conversation == conversation(user)
    assert msg.sender is not None
    assert msg.sender.id == canonical.sender_id(TENANT, CONNECTION, user)
    assert (msg.sender.native_id, msg.sender.name, msg.sender.handle, msg.sender.role) == (
        user,
        "REDACTED",
        user,
        "user",
    )
    assert msg.meta["twilio.channel"] == "whatsapp"
    assert msg.meta["twilio.WaId"] == "91990000000"
    assert msg.meta["twilio.To"] == "whatsapp:+14155238886"


def test_every_field_without_a_canonical_place_is_kept_in_meta() -> None:
    fields = load_json("whatsapp_text")["fields"]
    meta = message("whatsapp_text").meta
    mapped = {"MessageSid", "From", "Body", "NumMedia", "ProfileName"}
    assert {key for key in meta if key != "twilio.channel"} == {f"twilio.{name}" for name in fields} - {
        f"twilio.{name}" for name in mapped
    }
    assert all(meta[f"twilio.{name}"] == fields[name] for name in fields if name not in mapped)


def test_utf8_body_is_decoded() -> None:
    assert message("whatsapp_text_utf8").parts == [Text(text="Olá")]


def test_sms_text_keeps_the_geographic_fields() -> None:
    msg = message("sms_text")
    assert msg.parts == [Text(text="Ahoy! Let's build something amazing.")]
    assert msg.conversation.native_id == "+14017122661"
    assert msg.sender is not None and msg.sender.handle == "+14017122661" and msg.sender.name == ""
    assert msg.meta["twilio.channel"] == "sms"
    assert msg.meta["twilio.FromCity"] == "SAN FRANCISCO"
    assert msg.meta["twilio.MessagingServiceSid"] == "MGXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"


def test_replay_yields_the_same_ids() -> None:
    assert message("sms_text").id == message("sms_text").id
    assert status("status_sms_delivered").id == status("status_sms_delivered").id


def test_mms_media_become_media_parts_by_content_type() -> None:
    msg = message("mms_two_media")
    base = f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/MMXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX/Media"
    assert msg.parts == [
        Media(media="image", url=f"{base}/MEXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX", mime="image/jpeg"),
        Media(media="document", url=f"{base}/MEYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYY", mime="application/pdf"),
    ]
    assert msg.meta["twilio.channel"] == "mms"
    assert not any(key.startswith(("twilio.MediaUrl", "twilio.MediaContentType")) for key in msg.meta)


def test_whatsapp_voice_note_is_audio() -> None:
    (part,) = message("whatsapp_audio").parts
    assert isinstance(part, Media)
    assert (part.media, part.mime) == ("audio", "audio/ogg")
    assert part.url.endswith("/Media/MEZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZ")


def test_body_next_to_media_is_a_text_before_them() -> None:
    msg = message("mms_two_media", Body="Here is the receipt")
    assert [type(part) for part in msg.parts] == [Text, Media, Media]
    assert msg.parts[0] == Text(text="Here is the receipt")


def test_shared_location() -> None:
    msg = message("whatsapp_location")
    assert msg.parts == [
        Location(
            lat=51.51322977399644,
            lon=-0.2197976373036567,
            name="The Harrow Club",
            address="187 Freston Road, London, Greater London W10 6TH",
        )
    ]
    assert "twilio.Latitude" not in msg.meta


def test_half_a_coordinate_stays_in_meta() -> None:
    msg = message("whatsapp_location", Longitude=None)
    assert msg.parts == []
    assert msg.meta["twilio.Latitude"] == "51.51322977399644"
    assert msg.meta["twilio.Label"] == "The Harrow Club"


@pytest.mark.parametrize(
    ("field", "value"),
    [("Latitude", "nan"), ("Longitude", "NaN"), ("Latitude", "inf"), ("Longitude", "-Infinity"), ("Latitude", "north")],
)
def test_coordinate_that_is_no_number_is_an_unsupported_part_naming_the_field(field: str, value: str) -> None:
    # A NaN or infinite coordinate would make a Location that cannot be encoded and decoded again; the
    # rest of the message (sender, profile name) still arrives.
    msg = message("whatsapp_location", **{field: value})
    (part,) = msg.parts
    assert isinstance(part, Unsupported) and f"$.{field}" in part.reason
    assert part.native[field] == value
    assert msg.sender is not None and msg.sender.name == "Perspective Coffee"
    assert canonical.decode(canonical.encode(msg)) == msg


def test_a_missing_medium_is_an_unsupported_part_and_the_text_still_arrives() -> None:
    msg = message("mms_two_media", MediaUrl1=None, Body="two pictures")
    first, missing, text = msg.parts[1], msg.parts[2], msg.parts[0]
    assert text == Text(text="two pictures")
    assert isinstance(first, Media)
    assert isinstance(missing, Unsupported) and "$.MediaUrl1" in missing.reason


def test_a_num_media_beyond_twilios_ten_is_bounded() -> None:
    msg = message("sms_text", NumMedia="1000000000")
    assert msg.parts[0] == Text(text="Ahoy! Let's build something amazing.")
    assert 1 < len(msg.parts) <= 12 and all(isinstance(part, Unsupported) for part in msg.parts[1:])


def test_a_get_query_with_lone_surrogates_decodes_into_an_envelope_that_encodes() -> None:
    """Found by bench/fuzz_codecs.py: a query value with a lone surrogate crashed the decoder
    (UnicodeEncodeError) or made an envelope canonical.encode refuses."""
    query = {"MessageSid": "SM1\udfff", "From": "+1555\ud800", "Body": "hi\udfff", "Latitude": "a\udfffb",
             "Longitude": "1"}
    (envelope,) = CODEC.decode(HttpRequest(method="GET", query=query, received_at=RECEIVED_AT), CTX)
    assert canonical.decode(canonical.encode(envelope)) == envelope
    (status,) = CODEC.decode(
        HttpRequest(method="GET", query={"MessageSid": "SM1", "MessageStatus": "a\udfffb"}, received_at=RECEIVED_AT),
        CTX,
    )
    assert canonical.decode(canonical.encode(status)) == status


def test_reply_points_at_the_original_message() -> None:
    msg = message("whatsapp_reply")
    assert msg.parts == [Text(text="Yes, that works for me")]
    assert msg.reply_to == mid("SMXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX")
    assert msg.meta["twilio.OriginalRepliedMessageSender"] == "whatsapp:+14155238886"
    assert msg.meta["twilio.OriginalRepliedMessageSid"] == "SMXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"
    assert msg.meta["twilio.Forwarded"] == "false"


def test_button_tap_is_an_action_on_the_message_that_had_the_button() -> None:
    msg = message("whatsapp_button_reply")
    source = mid("MMYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYY")
    # Body repeats the button's text: the Action says it already.
    assert msg.parts == [Action(id="postback_data_1234", title="Cancel Appointment", source=source)]
    assert msg.reply_to == source
    assert json.loads(msg.meta["twilio.ChannelMetadata"])["type"] == "whatsapp"
    assert msg.meta["twilio.MessageType"] == "interactive"


def test_button_without_payload_answers_with_its_text() -> None:
    (action,) = message("whatsapp_button_reply", ButtonPayload=None).parts
    assert action == Action(
        id="Cancel Appointment", title="Cancel Appointment", source=mid("MMYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYY")
    )


def test_body_that_differs_from_the_button_text_is_kept() -> None:
    msg = message("whatsapp_button_reply", Body="cancel it please")
    assert [type(part) for part in msg.parts] == [Text, Action]


def test_list_choice_is_an_action() -> None:
    msg = message("whatsapp_list_reply")
    assert msg.parts == [Action(id="dest_denver", title="Denver", source=mid("SM0000000000000000000000000000pck1"))]


def test_get_webhook_reads_the_query_string() -> None:
    fields = load_json("sms_text")["fields"]
    (envelope,) = CODEC.decode(HttpRequest(method="GET", query=fields, received_at=RECEIVED_AT), CTX)
    assert envelope == message("sms_text")


def test_get_webhook_with_a_body_is_not_read() -> None:
    # A GET is signed over its URL alone: fields in its body would be read by no signature check.
    fields = load_json("sms_text")["fields"]
    get = HttpRequest(method="GET", query=fields, body=form_body("sms_text", Body="attacker"), url=WEBHOOK_URL)
    with pytest.raises(DecodeError) as caught:
        CODEC.decode(get, CTX)
    assert caught.value.path == "$"
    with pytest.raises(DecodeError):
        CODEC.dedup_key(get)


# --------------------------------------------------------------------------------- status callbacks


@pytest.mark.parametrize(
    ("name", "sid", "user", "state"),
    [
        ("status_whatsapp_sent", "SMc4c96554c26604013c6b7f1b4b6DDDDD", "whatsapp:+919900000000", "sent"),
        ("status_sms_delivered", "SM1342fe1b2c904d1ab04f0fc7a58abca9", "+15558675310", "delivered"),
        ("status_whatsapp_read", "SMc4c96554c26604013c6b7f1b4b6DDDDD", "whatsapp:+919900000000", "read"),
    ],
)
def test_status(name: str, sid: str, user: str, state: str) -> None:
    st = status(name)
    assert st.state == state and st.error is None
    assert st.id == canonical.stable_id("status", TENANT, CONNECTION, sid, state)
    assert (st.native_id, st.message_id) == (sid, "")
    assert st.native == Native(id=sid, seq=7)
    assert st.conversation == conversation(user)
    assert (st.direction, st.ts) == ("inbound", RECEIVED)


def test_status_keeps_the_raw_status_and_carrier_date_in_meta() -> None:
    st = status("status_sms_delivered")
    assert st.meta["twilio.MessageStatus"] == "delivered"
    assert st.meta["twilio.RawDlrDoneDate"] == "2308240501"
    assert st.meta["twilio.channel"] == "sms"
    assert status("status_whatsapp_read").meta["twilio.EventType"] == "READ"


@pytest.mark.parametrize(
    ("twilio_status", "state"),
    [("accepted", "queued"), ("queued", "queued"), ("sending", "sent"), ("scheduled", "accepted")],
)
def test_early_statuses(twilio_status: str, state: str) -> None:
    assert status("status_whatsapp_sent", MessageStatus=twilio_status).state == state


def test_undelivered_sms_is_failed_with_the_carrier_error() -> None:
    st = status("status_sms_undelivered_30003")
    assert st.state == "failed" and st.error is not None
    assert (st.error.code, st.error.retryable) == ("twilio_30003", False)
    assert "unreachable" in st.error.message
    assert st.error.native == {"ErrorCode": "30003", "MessageStatus": "undelivered"}


def test_whatsapp_outside_the_window_is_a_final_failure() -> None:
    st = status("status_whatsapp_failed_63016")
    assert st.error is not None
    assert (st.error.code, st.error.retryable) == ("twilio_63016", False)
    assert "24-hour" in st.error.message


def test_queue_overflow_may_succeed_later_and_twilio_words_are_kept() -> None:
    st = status("status_whatsapp_failed_63016", ErrorCode="30001", ErrorMessage="Queue overflow")
    assert st.error is not None
    assert (st.error.code, st.error.retryable) == ("twilio_30001", True)
    assert st.error.message.endswith("(Queue overflow)")


def test_failure_without_an_error_code_names_the_status() -> None:
    st = status("status_whatsapp_failed_63016", ErrorCode=None)
    assert st.error is not None and st.error.code == "twilio_failed" and not st.error.retryable


def test_status_we_do_not_track_is_kept_verbatim() -> None:
    msg = message("status_sms_delivered", MessageStatus="partially_delivered")
    (part,) = msg.parts
    assert isinstance(part, Unsupported)
    assert part.native["MessageStatus"] == "partially_delivered"
    assert msg.sender is not None and msg.sender.role == "system"


def test_received_status_on_an_incoming_message_is_still_a_message() -> None:
    assert message("sms_text", MessageStatus="received").parts == [Text(text="Ahoy! Let's build something amazing.")]


# ---------------------------------------------------------------------------- undecodable input


@pytest.mark.parametrize(
    ("body", "path", "reason"),
    [
        (b"", "$", "empty"),
        (b'{"MessageSid": "SM1"}', "$", "form"),
        (b"MessageSid=SM1&&Body=x", "$", "form"),
        (b"\xff\xfe", "$", "UTF-8"),
        (b"Body=hello", "$.MessageSid", "MessageSid"),
    ],
)
def test_undecodable_input_names_the_path(body: bytes, path: str, reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        CODEC.decode(HttpRequest(body=body), CTX)
    assert caught.value.path == path
    assert reason in caught.value.reason


def test_a_field_of_hundreds_of_kb_of_percent_escapes_is_read_whole() -> None:
    # what a fuzzer mutant posts: JSON nested deep in a field, 450 KB of `%5B`/`%5D` to percent-decode
    text = "[" * 75_000 + "]" * 75_000
    assert message("sms_text", Body=text).parts == [Text(text=text)]


def test_a_form_of_more_fields_than_the_limit_is_refused() -> None:
    raw = str(load_json("sms_text")["_raw"])
    padding = "".join(f"&Pad{index}=x" for index in range(native.MAX_FORM_FIELDS - raw.count("&") - 1))
    (envelope,) = CODEC.decode(HttpRequest(body=(raw + padding).encode()), CTX)
    assert isinstance(envelope, Message)
    for read in (CODEC.dedup_key, lambda request: CODEC.decode(request, CTX)):
        with pytest.raises(DecodeError) as refused:
            read(HttpRequest(body=(raw + padding + "&One=more").encode()))
        assert refused.value.path == "$"
        assert str(native.MAX_FORM_FIELDS) in refused.value.reason


@pytest.mark.parametrize("path", corpus_files(CORPUS) or [None], ids=lambda p: p.name if p else "absent")
def test_corpus_payload_decodes_or_raises_decode_error(path: Path | None) -> None:
    if path is None:
        pytest.skip("shared corpus not present beside the checkout")
    record = json.loads(path.read_text())
    # The corpus keeps each form post as `_raw` beside its decoded `fields`.
    body = str(record["_raw"]).encode() if isinstance(record, dict) and "_raw" in record else path.read_bytes()
    try:
        envelopes = CODEC.decode(HttpRequest(body=body), CTX)
    except DecodeError:
        return
    assert envelopes, "a webhook must never decode to nothing"
    for envelope in envelopes:
        assert canonical.decode(canonical.encode(envelope)) == envelope


# ---------------------------------------------------------------------------------- deduplication


def test_dedup_key_is_the_message_sid_and_the_status() -> None:
    assert CODEC.dedup_key(request("whatsapp_text")) == "SM45e9b726c0314a5524c3f3cb4ZZZZZ"
    sent = CODEC.dedup_key(request("status_whatsapp_sent"))
    read = CODEC.dedup_key(request("status_whatsapp_read"))
    assert sent == "SMc4c96554c26604013c6b7f1b4b6DDDDD:sent"
    assert read == "SMc4c96554c26604013c6b7f1b4b6DDDDD:read"


def test_dedup_key_of_a_broken_body_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        CODEC.dedup_key(HttpRequest(body=b"{not a form}"))
    assert CODEC.dedup_key(HttpRequest(body=b"Body=hello")) == ""


# ------------------------------------------------------------------------------------ signatures


def sign(url: str, body: bytes, token: str = AUTH_TOKEN) -> str:
    """Twilio's scheme, written out independently of the codec: URL + sorted name/value pairs."""
    pairs = sorted(parse_qsl(body.decode(), keep_blank_values=True))
    data = url + "".join(name + value for name, value in pairs)
    return base64.b64encode(hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()).decode()


def signed(name: str, *, url: str = WEBHOOK_URL, sign_url: str | None = None, token: str = AUTH_TOKEN) -> HttpRequest:
    body = form_body(name)
    return HttpRequest(
        body=body, url=url, headers={"x-twilio-signature": sign(sign_url or url, body, token)}, received_at=RECEIVED_AT
    )


SECRETS = {"auth_token": AUTH_TOKEN}


def test_documented_signature_example_verifies() -> None:
    # twilio.com/docs/usage/webhooks/webhooks-security: auth token 12345, this URL and these fields.
    fields = {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+12349013030",
        "Digits": "1234",
        "From": "+12349013030",
        "To": "+18005551212",
    }
    request = HttpRequest(
        body=urlencode(fields).encode(),
        url="https://mycompany.com/myapp.php?foo=1&bar=2",
        headers={"x-twilio-signature": "0/KCTR6DLpKmkAf8muzZqo1nDgQ="},
    )
    CODEC.verify(request, {"auth_token": "12345"})


@pytest.mark.parametrize("name", ["whatsapp_text", "mms_two_media", "status_sms_undelivered_30003"])
def test_good_signature_verifies(name: str) -> None:
    CODEC.verify(signed(name), SECRETS)


def test_bad_signature_is_refused() -> None:
    request = HttpRequest(body=form_body("sms_text"), url=WEBHOOK_URL, headers={"x-twilio-signature": "AAAA="})
    with pytest.raises(SignatureError, match="does not match"):
        CODEC.verify(request, SECRETS)


def test_changed_field_is_refused() -> None:
    original = signed("sms_text")
    tampered = HttpRequest(
        body=form_body("sms_text", Body="Send me the money"), url=WEBHOOK_URL, headers=original.headers
    )
    with pytest.raises(SignatureError):
        CODEC.verify(tampered, SECRETS)


def test_missing_signature_is_refused() -> None:
    with pytest.raises(SignatureError, match="missing"):
        CODEC.verify(HttpRequest(body=form_body("sms_text"), url=WEBHOOK_URL), SECRETS)


def test_stale_signature_from_a_rotated_auth_token_is_refused() -> None:
    with pytest.raises(SignatureError):
        CODEC.verify(signed("sms_text", token="the-previous-auth-token"), SECRETS)


def test_signature_replayed_against_another_url_is_refused() -> None:
    with pytest.raises(SignatureError):
        CODEC.verify(signed("sms_text", sign_url="https://hooks.example.com/webhooks/twilio/other"), SECRETS)


@pytest.mark.parametrize(
    ("sign_url", "url"),
    [
        ("https://hooks.example.com:443/webhooks/twilio/twilio-main", WEBHOOK_URL),
        (WEBHOOK_URL, "https://hooks.example.com:443/webhooks/twilio/twilio-main"),
    ],
)
def test_url_with_or_without_the_default_port_verifies(sign_url: str, url: str) -> None:
    CODEC.verify(signed("sms_text", url=url, sign_url=sign_url), SECRETS)


def get_request(query: str, *, body: bytes = b"", fields: dict[str, str] | None = None) -> HttpRequest:
    """A GET webhook signed over its URL (with `query`), received with `fields` (default: the URL's)."""
    url = f"{WEBHOOK_URL}?{query}"
    received = dict(parse_qsl(query, keep_blank_values=True)) if fields is None else fields
    return HttpRequest(method="GET", url=url, query=received, body=body, headers={"x-twilio-signature": sign(url, b"")})


def test_get_webhook_is_signed_over_its_url_alone() -> None:
    CODEC.verify(get_request(form_body("sms_text").decode()), SECRETS)


def test_signed_get_replayed_with_a_body_is_refused() -> None:
    # The signature covers the URL only; decode must never read fields the signature did not cover.
    replay = get_request(form_body("sms_text").decode(), body=form_body("sms_text", Body="Send me the money"))
    with pytest.raises(SignatureError, match="body"):
        CODEC.verify(replay, SECRETS)


def test_get_whose_query_is_not_the_signed_one_is_refused() -> None:
    fields = {**load_json("sms_text")["fields"], "Body": "Send me the money"}
    with pytest.raises(SignatureError, match="query"):
        CODEC.verify(get_request(form_body("sms_text").decode(), fields=fields), SECRETS)


def test_repeated_field_names_are_signed_in_value_order() -> None:
    body = b"MessageSid=SM1&Tag=b&Tag=a"
    expected = base64.b64encode(
        hmac.new(AUTH_TOKEN.encode(), f"{WEBHOOK_URL}MessageSidSM1TagaTagb".encode(), hashlib.sha1).digest()
    ).decode()
    CODEC.verify(HttpRequest(body=body, url=WEBHOOK_URL, headers={"x-twilio-signature": expected}), SECRETS)


@pytest.mark.parametrize(
    ("request_", "secrets", "complaint"),
    [
        (HttpRequest(body=b"a=b", url=WEBHOOK_URL, headers={"x-twilio-signature": "x"}), {}, "auth_token"),
        (HttpRequest(body=b"a=b", headers={"x-twilio-signature": "x"}), SECRETS, "public_url"),
        (HttpRequest(body=b"{}", url=WEBHOOK_URL, headers={"x-twilio-signature": "x"}), SECRETS, "form"),
    ],
)
def test_unverifiable_requests_are_refused(request_: HttpRequest, secrets: dict[str, str], complaint: str) -> None:
    with pytest.raises(SignatureError, match=complaint):
        CODEC.verify(request_, secrets)


# --------------------------------------------------------------------------------------- sending

SENDER = "+15017122661"
USER = "+15558675310"
BASIC = "Basic " + base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
HEADERS = {"Authorization": BASIC, "Content-Type": "application/x-www-form-urlencoded"}
MESSAGES_URL = f"{API_BASE}/Accounts/{ACCOUNT_SID}/Messages.json"


def encode_ctx(**overrides: Any) -> EncodeContext:
    settings: dict[str, Any] = {
        "tenant": TENANT,
        "connection": CONNECTION,
        "to": USER,
        "secrets": {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN},
        "options": {"from": SENDER},
    }
    settings.update(overrides)
    return EncodeContext(**settings)


def outbound(*parts: Part) -> Message:
    return outbound_message(TENANT, conversation(USER), parts, id="01hzmsg")


def fields(request: OutboundRequest | Recorded) -> list[tuple[str, str]]:
    return parse_qsl(request.body.decode(), keep_blank_values=True, strict_parsing=True)


def all_fields(requests: list[OutboundRequest]) -> list[list[tuple[str, str]]]:
    return [fields(request) for request in requests]


TEXT = "McAvoy or Stewart? These timelines can get so confusing."


def test_text_request_is_exact() -> None:
    (request,) = CODEC.encode(outbound(Text(text=TEXT)), encode_ctx())
    assert (request.method, request.url, request.headers) == ("POST", MESSAGES_URL, HEADERS)
    assert fields(request) == [("To", USER), ("From", SENDER), ("Body", TEXT)]
    assert (request.idempotency_key, request.message_id) == ("01hzmsg:0", "01hzmsg")


def test_text_and_media_travel_in_one_mms() -> None:
    parts = (
        Text(text="Here are your tickets"),
        Media(media="image", url="https://example.com/a.jpg"),
        Media(media="document", url="https://example.com/b.pdf", caption="Receipt"),
    )
    (request,) = CODEC.encode(outbound(*parts), encode_ctx())
    assert fields(request) == [
        ("To", USER),
        ("From", SENDER),
        ("Body", "Here are your tickets\n\nReceipt"),
        ("MediaUrl", "https://example.com/a.jpg"),
        ("MediaUrl", "https://example.com/b.pdf"),
    ]


def test_more_than_ten_media_take_a_second_message() -> None:
    media = [Media(media="image", url=f"https://example.com/{n}.jpg") for n in range(12)]
    requests = CODEC.encode(outbound(*media), encode_ctx())
    assert [sum(name == "MediaUrl" for name, _ in pairs) for pairs in all_fields(requests)] == [10, 2]
    assert [request.idempotency_key for request in requests] == ["01hzmsg:0", "01hzmsg:1"]


def test_texts_that_would_pass_1600_characters_are_separate_messages() -> None:
    first, second = "a" * 1000, "b" * 1000
    requests = CODEC.encode(outbound(Text(text=first), Text(text=second)), encode_ctx())
    assert [dict(pairs)["Body"] for pairs in all_fields(requests)] == [first, second]


def test_whatsapp_connection_prefixes_the_addresses_and_sends_one_medium_per_message() -> None:
    ctx = encode_ctx(options={"from": "+14155238886", "channel_prefix": "whatsapp:"})
    parts = (
        Media(media="image", url="https://example.com/a.jpg", caption="Front"),
        Media(media="image", url="https://example.com/b.jpg", caption="Back"),
    )
    requests = CODEC.encode(outbound(*parts), ctx)
    assert all_fields(requests) == [
        [("To", f"whatsapp:{USER}"), ("From", "whatsapp:+14155238886"), ("Body", caption), ("MediaUrl", url)]
        for caption, url in (("Front", "https://example.com/a.jpg"), ("Back", "https://example.com/b.jpg"))
    ]


def test_an_address_that_names_its_channel_keeps_it() -> None:
    ctx = encode_ctx(
        to="whatsapp:+919900000000", options={"from": "whatsapp:+14155238886", "channel_prefix": "whatsapp:"}
    )
    (request,) = CODEC.encode(outbound(Text(text="hi")), ctx)
    assert fields(request)[:2] == [("To", "whatsapp:+919900000000"), ("From", "whatsapp:+14155238886")]


def test_messaging_service_api_key_and_status_callback() -> None:
    ctx = encode_ctx(
        secrets={"account_sid": ACCOUNT_SID, "api_key_sid": "SKXXXX", "api_key_secret": "key-secret"},
        options={
            "messaging_service_sid": "MG9752274e9e519418a7406176694466fa",
            "status_callback": "https://hooks.example.com/webhooks/twilio/twilio-main",
        },
    )
    (request,) = CODEC.encode(outbound(Text(text=TEXT)), ctx)
    assert request.headers["Authorization"] == "Basic " + base64.b64encode(b"SKXXXX:key-secret").decode()
    assert fields(request) == [
        ("To", USER),
        ("MessagingServiceSid", "MG9752274e9e519418a7406176694466fa"),
        ("Body", TEXT),
        ("StatusCallback", "https://hooks.example.com/webhooks/twilio/twilio-main"),
    ]


def test_template_is_a_content_api_message_of_its_own() -> None:
    template = Template(name="HXb5b62575e6e4ff6129ad7c8efe1f983e", params={"1": "12/1", "2": "3pm"})
    requests = CODEC.encode(outbound(Text(text="Reminder:"), template, Text(text="See you!")), encode_ctx())
    assert all_fields(requests) == [
        [("To", USER), ("From", SENDER), ("Body", "Reminder:")],
        [
            ("To", USER),
            ("From", SENDER),
            ("ContentSid", "HXb5b62575e6e4ff6129ad7c8efe1f983e"),
            ("ContentVariables", '{"1":"12/1","2":"3pm"}'),
        ],
        [("To", USER), ("From", SENDER), ("Body", "See you!")],
    ]


def test_sender_without_mms_gets_media_as_links() -> None:
    ctx = encode_ctx(options={"from": SENDER, "mms": False})
    parts = (Text(text="Your ticket:"), Media(media="image", url="https://example.com/t.png", caption="Row 4"))
    (request,) = CODEC.encode(outbound(*parts), ctx)
    assert fields(request)[2:] == [("Body", "Your ticket:\n\nRow 4 https://example.com/t.png")]


def test_degraded_buttons_are_sent_as_numbered_text() -> None:
    rich = outbound(Buttons(text="Pick one", buttons=[Button(id="y", title="Yes"), Button(id="n", title="No")]))
    (request,) = CODEC.encode(degrade(rich, CODEC.capabilities), encode_ctx())
    body = dict(fields(request))["Body"]
    assert "Pick one" in body and "1. Yes" in body and "2. No" in body


@pytest.mark.parametrize(
    ("parts", "ctx", "complaint"),
    [
        ((Text(text="hi"),), encode_ctx(options={}), "messaging_service_sid"),
        ((Text(text="hi"),), encode_ctx(secrets={"auth_token": AUTH_TOKEN}), "account_sid"),
        ((Text(text="hi"),), encode_ctx(secrets={"account_sid": ACCOUNT_SID}), "auth_token"),
        ((Text(text="hi"),), encode_ctx(to=""), "recipient"),
        ((Media(media="image", file_id="abc"),), encode_ctx(), "URL"),
        ((Template(name="hello_world"),), encode_ctx(), "Content SID"),
        ((Text(text="x" * 1601),), encode_ctx(), "1600"),
        ((Buttons(text="Pick", buttons=[Button(id="a", title="A")]),), encode_ctx(), "Buttons"),
    ],
)
def test_what_twilio_cannot_send_is_an_encode_error(
    parts: tuple[Part, ...], ctx: EncodeContext, complaint: str
) -> None:
    with pytest.raises(EncodeError, match=complaint):
        CODEC.encode(outbound(*parts), ctx)


# ------------------------------------------------------------------------------------ API answers


def answer(status_code: int, name: str, headers: dict[str, str] | None = None) -> HttpResponse:
    return response(status_code, FIXTURES.bytes(name), headers)


def parse(response: HttpResponse) -> SendResult:
    return CODEC.parse_response(OutboundRequest(method="POST", url=MESSAGES_URL), response)


def test_created_answer_gives_the_message_sid() -> None:
    result = parse(answer(201, "response_created"))
    assert result.ok and result.native_ids == ["SMaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"]


@pytest.mark.parametrize(
    ("status_code", "name", "code", "retryable", "words"),
    [
        (400, "error_21211_invalid_to", "twilio_21211", False, "not a valid phone number"),
        (400, "error_21610_unsubscribed", "twilio_21610", False, "STOP"),
        (401, "error_20003_authentication", "twilio_20003", False, "authentication"),
        (403, "error_20008_forbidden", "twilio_20008", False, "Test Account Credentials"),
        (429, "error_20429_too_many_requests", "twilio_20429", True, "Too Many Requests"),
        (500, "error_20500_internal", "twilio_20500", True, "internal"),
    ],
)
def test_error_answers_are_mapped(status_code: int, name: str, code: str, retryable: bool, words: str) -> None:
    result = parse(answer(status_code, name))
    assert not result.ok and result.error is not None
    assert (result.error.code, result.retryable, result.error.retryable) == (code, retryable, retryable)
    assert words in result.error.message
    assert result.error.native == load_json(name)


def test_retry_after_header_is_honoured() -> None:
    result = parse(answer(429, "error_20429_too_many_requests", {"retry-after": "7"}))
    assert result.retryable and result.retry_after == 7.0


def test_answer_that_is_not_a_twilio_error_falls_back_to_the_http_status() -> None:
    result = parse(HttpResponse(status=502, body=b"<html>Bad Gateway</html>"))
    assert result.retryable and result.error is not None and result.error.code == "http_502"
    refused = parse(HttpResponse(status=400, body=b'{"message": "no code here"}'))
    assert not refused.retryable and refused.error is not None and refused.error.code == "http_400"


# ------------------------------------------------------------------ sending to a local fake API


def created(_: Recorded) -> Reply:
    return Reply(status=201, body=load_json("response_created"))


async def send(api: FakeApi) -> SendResult:
    ctx = encode_ctx(api_base=f"{api.base_url}/2010-04-01")
    (request,) = CODEC.encode(outbound(Text(text=TEXT)), ctx)
    return await deliver_one(CODEC, request, FAST)


async def test_send_through_the_api_returns_the_message_sid(fake_api: FakeApi) -> None:
    fake_api.responder = created
    result = await send(fake_api)
    assert result.ok and result.native_ids == ["SMaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"]
    (recorded,) = fake_api.requests
    assert (recorded.method, recorded.path) == ("POST", f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json")
    assert recorded.headers["authorization"] == BASIC
    assert recorded.headers["content-type"] == "application/x-www-form-urlencoded"
    assert fields(recorded) == [("To", USER), ("From", SENDER), ("Body", TEXT)]


@pytest.mark.parametrize(
    ("status_code", "name"),
    [(400, "error_21211_invalid_to"), (401, "error_20003_authentication"), (403, "error_20008_forbidden")],
)
async def test_refusals_are_not_retried(fake_api: FakeApi, status_code: int, name: str) -> None:
    fake_api.responder = created
    fake_api.queue(Reply(status=status_code, body=load_json(name)))
    result = await send(fake_api)
    assert not result.ok and not result.retryable
    assert result.error is not None and result.error.code == f"twilio_{load_json(name)['code']}"
    assert len(fake_api.requests) == 1


async def test_rate_limit_is_retried_after_retry_after(fake_api: FakeApi) -> None:
    fake_api.responder = created
    fake_api.queue(Reply(status=429, body=load_json("error_20429_too_many_requests"), headers={"Retry-After": "0"}))
    result = await send(fake_api)
    assert result.ok
    assert len(fake_api.requests) == 2


async def test_server_errors_are_retried_then_succeed(fake_api: FakeApi) -> None:
    fake_api.responder = created
    fake_api.queue(
        Reply(status=500, body=load_json("error_20500_internal")),
        Reply(status=503, body=b"Service Unavailable"),
    )
    result = await send(fake_api)
    assert result.ok and result.native_ids == ["SMaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"]
    assert len(fake_api.requests) == 3
    assert fields(fake_api.requests[0]) == fields(fake_api.requests[2])


# -------------------------------------------------------------------------------- registration


def test_registered_under_its_channel_name() -> None:
    codec = load("twilio")
    assert isinstance(codec, TwilioCodec)
    caps = codec.capabilities
    assert caps.parts == frozenset({"text", "media", "template"})
    assert (caps.text_limit, caps.markup, caps.max_buttons, caps.media_max_bytes) == (1600, "plain", 0, 5_000_000)
    assert not (caps.reply or caps.reaction or caps.edit or caps.delete or caps.media_upload)
    assert codec.default_api_base == "https://api.twilio.com/2010-04-01"


def test_a_status_callback_keeps_a_field_it_cannot_read_in_meta() -> None:
    status = decode("status_sms_delivered", NumMedia="many")
    assert isinstance(status, Status) and status.state == "delivered"
    assert status.meta["twilio.NumMedia"] == "many"
