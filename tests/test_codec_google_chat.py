"""Google Chat codec: interaction events in, Chat API calls out, bearer-token checks."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from babelhub import canonical as c
from babelhub.codecs.base import DecodeContext, EncodeContext, HttpRequest, HttpResponse
from babelhub.codecs.google_chat import GoogleChatCodec
from babelhub.errors import DecodeError, EncodeError, SignatureError
from babelhub.services.delivery import RetryPolicy, deliver
from tests import codeckit
from tests.codeckit import Fixtures, Ids, corpus_files, json_body, outbound_message, rs256_token, rsa_key
from tests.fakeapi import FakeApi, Reply

FIXTURES = Fixtures("google_chat")
CORPUS = codeckit.CORPUS / "google_chat"
CODEC = GoogleChatCodec()
CTX = DecodeContext(tenant="acme", connection="gchat", seq=3)
PROJECT_NUMBER = "1234567890"
FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02)


fixture_bytes = FIXTURES.bytes


def fixture(name: str) -> dict[str, Any]:
    value: dict[str, Any] = FIXTURES.json(name)
    return value


def decode(name: str) -> list[c.Envelope]:
    return CODEC.decode(HttpRequest(body=fixture_bytes(name)), CTX)


def decode_one(name: str) -> c.Envelope:
    (envelope,) = decode(name)
    return envelope


IDS = Ids("acme", "gchat")
message_id, sender_id = IDS.message, IDS.sender


# ------------------------------------------------------------------------------------------ decode


def test_message_in_a_room_with_a_mention() -> None:
    envelope = decode_one("message_room_mention.json")
    assert isinstance(envelope, c.Message)
    bot = "users/1234567890987654321"
    assert envelope.parts == [
        c.Text(
            text="@TestBot Violence is my last option.",
            format="slack",
            mentions=[c.Mention(id=sender_id(bot), native_id=bot, name="TestBot", offset=0, length=8)],
        )
    ]
    assert envelope.id == message_id("spaces/AAAAAAAAAAA/messages/CCCCCCCCCCC")
    assert envelope.native == c.Native(id="spaces/AAAAAAAAAAA/messages/CCCCCCCCCCC", seq=3,
                                       thread="spaces/AAAAAAAAAAA/threads/BBBBBBBBBBB")
    assert envelope.conversation == c.Conversation(
        id=c.conversation_id("acme", "gchat", "spaces/AAAAAAAAAAA"),
        channel="google_chat",
        connection="gchat",
        native_id="spaces/AAAAAAAAAAA",
        type="channel",
    )
    assert envelope.sender == c.Sender(
        id=sender_id("users/12345678901234567890"),
        native_id="users/12345678901234567890",
        name="Chuck Norris",
        handle="chuck@example.com",
    )
    assert envelope.ts == datetime(2017, 3, 2, 19, 2, 59, 910959, tzinfo=UTC)
    assert envelope.thread == message_id("spaces/AAAAAAAAAAA/threads/BBBBBBBBBBB")
    assert envelope.meta["google_chat.thread_name"] == "spaces/AAAAAAAAAAA/threads/BBBBBBBBBBB"
    assert envelope.meta["google_chat.argument_text"] == " Violence is my last option."
    assert envelope.meta["google_chat.space_display_name"] == "Chuck Norris Discussion Room"


def test_direct_message_with_an_attachment() -> None:
    envelope = decode_one("message_dm_attachment.json")
    assert isinstance(envelope, c.Message)
    assert envelope.conversation.type == "direct"
    assert envelope.parts == [
        c.Text(text="Here is the *invoice*", format="slack"),
        c.Media(
            media="document",
            url="https://chat.google.com/api/get_attachment_url?url_type=DOWNLOAD_URL&content_type=application/pdf",
            file_id="spaces/BBBBBBBBBBB/attachments/AAAAAAAAAAA",
            mime="application/pdf",
            filename="invoice.pdf",
        ),
    ]
    # The message's own creation time, not the event's dispatch time.
    assert envelope.ts == datetime(2024, 5, 2, 10, 15, 29, 987654, tzinfo=UTC)
    assert envelope.meta["google_chat.extra"] == {"common": {"userLocale": "en", "hostApp": "CHAT"}}


def test_added_and_removed_are_joined_and_left_activities() -> None:
    added = decode_one("added_to_space.json")
    removed = decode_one("removed_from_space.json")
    assert isinstance(added, c.Activity) and isinstance(removed, c.Activity)
    assert added.activity == "joined" and removed.activity == "left"
    assert added.detail == {"members": [{"role": "bot", "native_id": "users/app"}]}
    assert added.sender is not None and added.sender.name == "Chuck Norris"
    assert removed.conversation.type == "direct"
    assert added.ts == datetime(2017, 3, 2, 19, 2, 59, 910959, tzinfo=UTC)
    assert added.id != removed.id


def test_card_click_from_a_dialog_is_an_action_with_the_form() -> None:
    envelope = decode_one("card_clicked_submit_dialog.json")
    assert isinstance(envelope, c.Message)
    card = "spaces/AAAAzn3Bzac/messages/RI2JF8DQs_s.RI2JF8DQs_s"
    assert envelope.parts == [
        c.Action(id="calendar_delete", source=message_id(card)),
        c.Form(
            id="calendar_delete",
            fields=[c.FormField(id="calendar_date", value=""), c.FormField(id="calendar_name", value="")],
        ),
    ]
    assert envelope.sender is not None and envelope.sender.native_id == "users/114164005879224092462"
    assert envelope.sender.role == "user"  # the clicker, not the bot that sent the card
    assert envelope.meta["google_chat.dialog_event_type"] == "SUBMIT_DIALOG"
    assert envelope.meta["google_chat.extra"]["configCompleteRedirectUrl"].startswith("https://chat.google.com/")
    assert envelope.ts == datetime(2023, 1, 13, 5, 19, 13, 925126, tzinfo=UTC)


def test_add_on_events_are_read_like_classic_ones() -> None:
    message = decode_one("addon_message.json")
    assert isinstance(message, c.Message)
    assert message.parts == [c.Text(text="status please", format="slack")]
    assert message.conversation.native_id == "spaces/BBBBBBBBBBB" and message.conversation.type == "direct"
    assert message.id == message_id("spaces/BBBBBBBBBBB/messages/EEEEEEEEEEE.EEEEEEEEEEE")
    click = decode_one("addon_button_clicked.json")
    assert isinstance(click, c.Message)
    assert click.parts == [
        c.Action(id="approve", source=message_id("spaces/BBBBBBBBBBB/messages/FFFFFFFFFFF.FFFFFFFFFFF")),
        c.Form(id="approve", fields=[c.FormField(id="comment", value="looks good")]),
    ]
    assert click.meta["google_chat.function"] == "babelhub_action"
    assert message.meta["google_chat.extra"] == {
        "commonEventObject": fixture("addon_message.json")["commonEventObject"]
    }


def test_other_events_are_kept_as_unsupported() -> None:
    envelope = decode_one("app_command.json")
    assert isinstance(envelope, c.Message)
    (part,) = envelope.parts
    assert isinstance(part, c.Unsupported) and part.reason == "google chat APP_COMMAND event"
    assert part.native == fixture("app_command.json")


def test_the_legacy_verification_token_never_reaches_meta() -> None:
    raw = fixture("added_to_space.json") | {"token": "static-secret"}
    (envelope,) = CODEC.decode(HttpRequest(body=json.dumps(raw).encode()), CTX)
    assert "static-secret" not in json.dumps(envelope.meta)


ADD_ON_TOKENS = {"userOAuthToken": "ya29.user", "userIdToken": "eyJ.user", "systemIdToken": "eyJ.system"}


@pytest.mark.parametrize(
    "raw",
    [
        # an unsupported classic event is kept whole in Unsupported.native
        fixture("app_command.json") | {"token": "static-secret"},
        # a message with nothing readable is kept whole as well
        fixture("added_to_space.json")
        | {"type": "MESSAGE", "token": "static-secret", "message": {"name": "spaces/AAAAAAAAAAA/messages/M"}},
        # an add-on event of a kind not read (a widget update) is kept whole too
        {
            "chat": {"user": {"name": "users/1"}, "space": {"name": "spaces/S"}, "eventTime": "2024-05-02T10:15:30Z"},
            "commonEventObject": {"hostApp": "CHAT"},
            "authorizationEventObject": ADD_ON_TOKENS,
        },
        fixture("addon_message.json") | {"authorizationEventObject": ADD_ON_TOKENS},
    ],
)
def test_credentials_are_never_kept_in_an_envelope(raw: dict[str, Any]) -> None:
    envelopes = CODEC.decode(HttpRequest(body=json.dumps(raw).encode()), CTX)
    assert envelopes
    for envelope in envelopes:
        kept = c.encode(envelope).decode()
        for secret in ("static-secret", *ADD_ON_TOKENS.values()):
            assert secret not in kept
    # What is kept whole is the event minus its credentials, nothing else left out.
    kept_whole = [
        part.native
        for envelope in envelopes
        if isinstance(envelope, c.Message)
        for part in envelope.parts
        if isinstance(part, c.Unsupported) and isinstance(part.native, dict)
    ]
    assert all(native.keys() == raw.keys() - {"token", "authorizationEventObject"} for native in kept_whole)


def test_timestamps_without_an_offset_are_utc_and_the_envelope_reads_back() -> None:
    raw = fixture("message_room_mention.json")
    raw["eventTime"] = "2017-03-02T19:02:59.910959"
    raw["message"]["createTime"] = "2017-03-02T19:02:59.910959"
    added = fixture("added_to_space.json") | {"eventTime": "2017-03-02T19:02:59"}
    for body in (raw, added):
        (envelope,) = CODEC.decode(HttpRequest(body=json.dumps(body).encode()), CTX)
        assert envelope.ts.utcoffset() is not None and envelope.ts.utcoffset() == dt.timedelta(0)
        assert c.decode(c.encode(envelope)) == envelope
    (envelope,) = CODEC.decode(HttpRequest(body=json.dumps(raw).encode()), CTX)
    assert envelope.ts == datetime(2017, 3, 2, 19, 2, 59, 910959, tzinfo=UTC)


def _click_with_inputs(inputs: dict[str, Any]) -> HttpRequest:
    raw = fixture("card_clicked_submit_dialog.json")
    raw["common"]["formInputs"] = inputs
    return HttpRequest(body=json.dumps(raw).encode())


def test_form_inputs_in_the_chat_api_shapes() -> None:
    (envelope,) = CODEC.decode(
        _click_with_inputs(
            {
                "none": {"stringInputs": {"value": None}},
                "one": {"stringInputs": {"value": "solo"}},
                "date": {"dateInput": {"msSinceEpoch": "1700000000000"}},
                "at": {"dateTimeInput": {"msSinceEpoch": 1700000000000, "hasTime": True}},
                "time": {"timeInput": {"hours": 9, "minutes": 5}},
            }
        ),
        CTX,
    )
    assert isinstance(envelope, c.Message)
    form = envelope.parts[1]
    assert isinstance(form, c.Form)
    assert [(f.id, f.kind, f.value) for f in form.fields] == [
        ("none", "text", []),
        ("one", "text", "solo"),
        ("date", "date", 1700000000000),
        ("at", "datetime", 1700000000000),
        ("time", "time", "09:05"),
    ]


@pytest.mark.parametrize(
    ("inputs", "path"),
    [
        ({"a": {"stringInputs": {"value": {"x": 1}}}}, "$.common.formInputs.a.stringInputs.value"),
        ({"a": {"stringInputs": {"value": ["ok", 5]}}}, "$.common.formInputs.a.stringInputs.value[1]"),
        ({"a": {"dateInput": {"msSinceEpoch": "abc"}}}, "$.common.formInputs.a.dateInput.msSinceEpoch"),
        ({"a": {"dateTimeInput": {"msSinceEpoch": 1.5e300}}}, "$.common.formInputs.a.dateTimeInput.msSinceEpoch"),
        ({"a": {"timeInput": {"hours": "nine"}}}, "$.common.formInputs.a.timeInput.hours"),
        ({"a": {"timeInput": {"hours": 9, "minutes": [5]}}}, "$.common.formInputs.a.timeInput.minutes"),
    ],
)
def test_malformed_form_inputs_name_their_path(inputs: dict[str, Any], path: str) -> None:
    with pytest.raises(DecodeError) as caught:
        CODEC.decode(_click_with_inputs(inputs), CTX)
    assert caught.value.path == path


def test_add_on_form_inputs_are_named_by_their_add_on_path() -> None:
    raw = fixture("addon_button_clicked.json")
    raw["commonEventObject"]["formInputs"] = {"a": {"dateInput": {"msSinceEpoch": "soon"}}}
    with pytest.raises(DecodeError) as caught:
        CODEC.decode(HttpRequest(body=json.dumps(raw).encode()), CTX)
    assert caught.value.path == "$.commonEventObject.formInputs.a.dateInput.msSinceEpoch"


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (b"not json", "$"),
        (b'{"type": "MESSAGE", "eventTime": "2024-01-01T00:00:00Z"}', "$.space.name"),
        (b'{"type": "MESSAGE", "space": {"name": 5}}', "$.space.name"),
        (b'{"type": "REMOVED_FROM_SPACE", "space": {"name": "spaces/A"}, "eventTime": "soon"}', "$.eventTime"),
        (
            b'{"type": "REMOVED_FROM_SPACE", "space": {"name": "spaces/A"}, "eventTime": "9999-12-31T23:00:00-05:00"}',
            "$.eventTime",
        ),
        (
            b'{"type": "MESSAGE", "space": {"name": "spaces/A"}, "message": {"annotations": [{"startIndex": "x"}]}}',
            "$.message.annotations[0].startIndex",
        ),
    ],
)
def test_undecodable_events_name_the_json_path(body: bytes, path: str) -> None:
    with pytest.raises(DecodeError) as caught:
        CODEC.decode(HttpRequest(body=body), CTX)
    assert caught.value.path == path


def test_dedup_key_is_stable_and_tells_clicks_apart() -> None:
    click = fixture("card_clicked_submit_dialog.json")
    later = click | {"eventTime": "2023-01-13T05:20:00.000000Z"}
    key = CODEC.dedup_key(HttpRequest(body=json.dumps(click).encode()))
    assert key and key == CODEC.dedup_key(HttpRequest(body=fixture_bytes("card_clicked_submit_dialog.json")))
    assert key != CODEC.dedup_key(HttpRequest(body=json.dumps(later).encode()))
    with pytest.raises(DecodeError):
        CODEC.dedup_key(HttpRequest(body=b"not json"))


def test_corpus_sweep_decodes_or_raises_decode_error() -> None:
    if not CORPUS.is_dir():
        pytest.skip("shared corpus not present")
    files = corpus_files(CORPUS)
    assert files
    for path in files:
        try:
            envelopes = CODEC.decode(HttpRequest(body=path.read_bytes()), CTX)
        except DecodeError:
            continue
        assert envelopes, path.name
        for envelope in envelopes:
            assert c.decode(c.encode(envelope)) == envelope


# ------------------------------------------------------------------------------------ signatures


def _token(key: rsa.RSAPrivateKey, claims: dict[str, Any], kid: str = "cert-1") -> str:
    return rs256_token(key, {"alg": "RS256", "kid": kid, "typ": "JWT"}, claims)


def _certificate(key: rsa.RSAPrivateKey) -> str:
    """A self-signed certificate, the form Google publishes Chat's keys in."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chat@system.gserviceaccount.com")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa_key()


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": "chat@system.gserviceaccount.com", "aud": PROJECT_NUMBER, "iat": now, "exp": now + 3600} | overrides


def _signed(token: str) -> HttpRequest:
    return HttpRequest(headers={"authorization": f"Bearer {token}"}, body=fixture_bytes("message_room_mention.json"))


def _secrets(key: rsa.RSAPrivateKey) -> dict[str, str]:
    return {"audience": PROJECT_NUMBER, "signing_keys": json.dumps({"cert-1": _certificate(key)})}


def test_a_token_from_chat_for_this_project_verifies(signing_key: rsa.RSAPrivateKey) -> None:
    CODEC.verify(_signed(_token(signing_key, _claims())), _secrets(signing_key))


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("bad signature", "signature does not verify"),
        ("missing", "missing Authorization"),
        ("expired", "expired"),
        ("wrong audience", "audience"),
        ("wrong issuer", "issuer"),
        ("not a jwt", "not a JWT"),
    ],
)
def test_tokens_that_must_be_refused(signing_key: rsa.RSAPrivateKey, case: str, match: str) -> None:
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    tokens = {
        "bad signature": _token(other_key, _claims()),
        "expired": _token(signing_key, _claims(exp=int(time.time()) - 600)),
        "wrong audience": _token(signing_key, _claims(aud="999")),
        "wrong issuer": _token(signing_key, _claims(iss="https://accounts.google.com")),
        "not a jwt": "AbCdEf123456",
    }
    request = _signed(tokens[case]) if case != "missing" else HttpRequest(body=b"{}")
    with pytest.raises(SignatureError, match=match):
        CODEC.verify(request, _secrets(signing_key))


def test_no_configured_audience_refuses_everything(signing_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(SignatureError, match="audience"):
        CODEC.verify(_signed(_token(signing_key, _claims())), {"signing_keys": _secrets(signing_key)["signing_keys"]})


# ----------------------------------------------------------------------------- Cloud Pub/Sub push

PUBSUB = DecodeContext(tenant="acme", connection="gchat", seq=3, options={"pubsub": True})
PUSH_AUDIENCE = "https://hub.example.com/webhooks/google_chat/gchat"
PUSH_ACCOUNT = "chat-push@chuck-norris-bot.iam.gserviceaccount.com"


def test_a_pubsub_push_carries_the_same_event_as_a_direct_post() -> None:
    (direct,) = decode("message_room_mention.json")
    (pushed,) = CODEC.decode(HttpRequest(body=fixture_bytes("pubsub_push_message.json")), PUBSUB)
    assert isinstance(pushed, c.Message) and isinstance(direct, c.Message)
    assert pushed.meta.pop("google_chat.pubsub") == {
        "subscription": "projects/chuck-norris-bot/subscriptions/chat-app-push",
        "message_id": "2070443601311540",
        "publish_time": "2017-03-02T19:03:00.145Z",
    }
    assert pushed == direct


def test_a_pubsub_push_is_deduplicated_by_its_message_id() -> None:
    request = HttpRequest(body=fixture_bytes("pubsub_push_message.json"))
    assert CODEC.dedup_key(request) == "pubsub:2070443601311540"


def test_a_pubsub_push_is_refused_unless_the_connection_takes_them() -> None:
    with pytest.raises(DecodeError, match=r"options\.pubsub") as caught:
        CODEC.decode(HttpRequest(body=fixture_bytes("pubsub_push_message.json")), CTX)
    assert caught.value.path == "$.message"


def test_a_pubsub_message_that_is_no_chat_event_is_refused_at_its_data() -> None:
    with pytest.raises(DecodeError) as caught:
        CODEC.decode(HttpRequest(body=fixture_bytes("pubsub_push_not_a_chat_event.json")), PUBSUB)
    assert caught.value.path == "$.message.data"
    not_base64 = fixture("pubsub_push_message.json")
    not_base64["message"]["data"] = "not base64!"
    with pytest.raises(DecodeError, match="base64") as caught:
        CODEC.decode(HttpRequest(body=json.dumps(not_base64).encode()), PUBSUB)
    assert caught.value.path == "$.message.data"
    no_space = fixture("message_room_mention.json")
    del no_space["space"]
    inside = fixture("pubsub_push_message.json")
    inside["message"]["data"] = base64.b64encode(json.dumps(no_space).encode()).decode()
    with pytest.raises(DecodeError) as caught:
        CODEC.decode(HttpRequest(body=json.dumps(inside).encode()), PUBSUB)
    assert caught.value.path == "$.message.data.space.name"


@pytest.mark.parametrize(
    "body",
    [fixture_bytes("pubsub_pull_response.json"), b"{}", b"[]", b'"MESSAGE"', b'{"space": {"name": "spaces/A"}}'],
)
def test_bodies_of_no_supported_format_are_named_as_such(body: bytes) -> None:
    for read in (CODEC.dedup_key, lambda request: CODEC.decode(request, PUBSUB)):
        with pytest.raises(DecodeError) as caught:
            read(HttpRequest(body=body))
        assert caught.value.reason == "not a Google Chat event or Pub/Sub push envelope"
        assert caught.value.path == "$"


def _push_claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": "https://accounts.google.com", "aud": PUSH_AUDIENCE, "azp": "113774264463038321964",
              "email": PUSH_ACCOUNT, "email_verified": True, "sub": "113774264463038321964",
              "iat": now, "exp": now + 3600}
    return claims | overrides


def _push_secrets(key: rsa.RSAPrivateKey) -> dict[str, str]:
    return _secrets(key) | {"pubsub_audience": PUSH_AUDIENCE, "pubsub_service_account": PUSH_ACCOUNT,
                            "pubsub_signing_keys": json.dumps({"cert-1": _certificate(key)})}


def _pushed(token: str) -> HttpRequest:
    return HttpRequest(headers={"authorization": f"Bearer {token}"}, body=fixture_bytes("pubsub_push_message.json"))


def test_a_push_signed_for_the_subscriptions_account_verifies(signing_key: rsa.RSAPrivateKey) -> None:
    CODEC.verify(_pushed(_token(signing_key, _push_claims())), _push_secrets(signing_key))
    CODEC.verify(_pushed(_token(signing_key, _push_claims(iss="accounts.google.com"))), _push_secrets(signing_key))


@pytest.mark.parametrize(
    ("claims", "match"),
    [
        ({"email": "someone-else@evil.iam.gserviceaccount.com"}, "service account"),
        ({"email_verified": False}, "service account"),
        ({"aud": "https://other.example.com/push"}, "audience"),
        ({"iss": "chat@system.gserviceaccount.com"}, "issuer"),
    ],
)
def test_push_tokens_that_must_be_refused(signing_key: rsa.RSAPrivateKey, claims: dict[str, Any], match: str) -> None:
    with pytest.raises(SignatureError, match=match):
        CODEC.verify(_pushed(_token(signing_key, _push_claims(**claims))), _push_secrets(signing_key))


def test_a_chat_token_does_not_open_the_push_path(signing_key: rsa.RSAPrivateKey) -> None:
    # Chat's own token on a push envelope: the envelope's rules apply, and Chat's issuer is not Google's.
    with pytest.raises(SignatureError, match="issuer"):
        CODEC.verify(_pushed(_token(signing_key, _claims())), _push_secrets(signing_key))
    # A connection not set up for Pub/Sub refuses every push, whatever the token.
    with pytest.raises(SignatureError, match="pubsub_audience"):
        CODEC.verify(_pushed(_token(signing_key, _push_claims())), _secrets(signing_key))


# ------------------------------------------------------------------------------------------ encode

SPACE = "spaces/AAAAAAAAAAA"


def _ctx(base: str = "", **native_ids: str) -> EncodeContext:
    return EncodeContext(
        tenant="acme",
        connection="gchat",
        to=SPACE,
        api_base=base,
        secrets={"access_token": "ya29.token"},
        native_ids=native_ids,
    )


def _message(*parts: c.Part, **fields: Any) -> c.Message:
    conversation = c.Conversation(id="conv", channel="google_chat", connection="gchat", native_id=SPACE)
    return outbound_message("acme", conversation, parts, id="out1", **fields)


_body = json_body


def test_text_is_created_in_the_space_with_an_idempotent_request_id() -> None:
    (request,) = CODEC.encode(_message(c.Text(text="*Code freeze* at `11:59`", format="slack")), _ctx())
    assert request.method == "POST"
    assert request.url == "https://chat.googleapis.com/v1/spaces/AAAAAAAAAAA/messages?requestId=out1%3A0"
    assert request.headers == {"Authorization": "Bearer ya29.token", "Content-Type": "application/json"}
    assert _body(request) == {"text": "*Code freeze* at `11:59`"}
    assert request.idempotency_key == "out1:0" and request.message_id == "out1"


def test_mentions_use_the_chat_user_syntax() -> None:
    text = c.Text(text="ping @Izumi now", mentions=[c.Mention(native_id="users/123", name="Izumi", offset=5, length=6)])
    (request,) = CODEC.encode(_message(text), _ctx())
    assert _body(request) == {"text": "ping <users/123> now"}


def test_thread_replies_name_the_thread() -> None:
    message = _message(c.Text(text="on it"), thread="canon-thread")
    (request,) = CODEC.encode(message, _ctx(**{"canon-thread": "spaces/AAAAAAAAAAA/threads/BBBBBBBBBBB"}))
    assert request.url.endswith("?requestId=out1%3A0&messageReplyOption=REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD")
    assert _body(request) == {"text": "on it", "thread": {"name": "spaces/AAAAAAAAAAA/threads/BBBBBBBBBBB"}}
    by_meta = _message(c.Text(text="x"), meta={"google_chat.thread_name": "spaces/AAAAAAAAAAA/threads/T"})
    (request,) = CODEC.encode(by_meta, _ctx())
    assert _body(request)["thread"] == {"name": "spaces/AAAAAAAAAAA/threads/T"}


def test_text_and_buttons_are_one_message_with_a_card() -> None:
    buttons = c.Buttons(
        buttons=[
            c.Button(id="yes", title="Yes"),
            c.Button(id="later", title="Later", action="postback"),
            c.Button(id="docs", title="Docs", action="url", value="https://example.com/docs"),
        ]
    )
    (request,) = CODEC.encode(_message(c.Text(text="Deploy now?"), buttons), _ctx())
    action = {"function": "babelhub_action"}
    assert _body(request) == {
        "text": "Deploy now?",
        "cardsV2": [
            {
                "cardId": "out1-0",
                "card": {
                    "sections": [
                        {
                            "widgets": [
                                {
                                    "buttonList": {
                                        "buttons": [
                                            {
                                                "text": "Yes",
                                                "onClick": {
                                                    "action": action | {"parameters": [{"key": "id", "value": "yes"}]}
                                                },
                                            },
                                            {
                                                "text": "Later",
                                                "onClick": {
                                                    "action": action | {"parameters": [{"key": "id", "value": "later"}]}
                                                },
                                            },
                                            {
                                                "text": "Docs",
                                                "onClick": {"openLink": {"url": "https://example.com/docs"}},
                                            },
                                        ]
                                    }
                                }
                            ]
                        }
                    ]
                },
            }
        ],
    }


def test_cards_and_pictures_become_card_widgets() -> None:
    picture = c.Media(media="image", url="https://example.com/a.png", caption="A")
    card = c.Card(title="Shirt", subtitle="Blue", media=c.Media(media="image", url="https://example.com/s.png"))
    (request,) = CODEC.encode(_message(card, picture), _ctx())
    first, second = _body(request)["cardsV2"]
    assert first == {
        "cardId": "out1-0",
        "card": {
            "header": {"title": "Shirt", "subtitle": "Blue"},
            "sections": [{"widgets": [{"image": {"imageUrl": "https://example.com/s.png", "altText": ""}}]}],
        },
    }
    assert second["card"]["sections"][0]["widgets"] == [
        {"image": {"imageUrl": "https://example.com/a.png", "altText": "A"}},
        {"textParagraph": {"text": "A"}},
    ]


def test_each_text_starts_a_new_message() -> None:
    first, second = CODEC.encode(_message(c.Text(text="one"), c.Text(text="two")), _ctx())
    assert _body(first) == {"text": "one"} and _body(second) == {"text": "two"}
    assert second.url.endswith("requestId=out1%3A1") and second.idempotency_key == "out1:1"


def test_edit_patches_and_delete_deletes() -> None:
    ctx = _ctx(sent="spaces/AAAAAAAAAAA/messages/CCCCCCCCCCC.CCCCCCCCCCC")
    (edit,) = CODEC.encode(_message(c.Edit(target="sent"), c.Text(text="fixed")), ctx)
    assert edit.method == "PATCH"
    assert edit.url == (
        "https://chat.googleapis.com/v1/spaces/AAAAAAAAAAA/messages/CCCCCCCCCCC.CCCCCCCCCCC?updateMask=text"
    )
    assert _body(edit) == {"text": "fixed"}
    (delete,) = CODEC.encode(_message(c.Delete(target="sent")), ctx)
    assert delete.method == "DELETE" and delete.body == b""
    assert delete.url == "https://chat.googleapis.com/v1/spaces/AAAAAAAAAAA/messages/CCCCCCCCCCC.CCCCCCCCCCC"
    with pytest.raises(EncodeError, match="unknown"):
        CODEC.encode(_message(c.Edit(target="nope"), c.Text(text="x")), ctx)


def test_what_cannot_be_encoded_says_why() -> None:
    with pytest.raises(EncodeError, match="access_token"):
        CODEC.encode(_message(c.Text(text="x")), EncodeContext(tenant="a", connection="b", to=SPACE))
    with pytest.raises(EncodeError, match="spaces/"):
        CODEC.encode(_message(c.Text(text="x")), EncodeContext(tenant="a", connection="b", to="room-1"))
    with pytest.raises(EncodeError, match="reaction"):
        CODEC.encode(_message(c.Reaction(emoji="👍", target="x")), _ctx())


@pytest.mark.parametrize(
    "space",
    ["spaces/AAA/members?x=", "spaces/AAA/messages/X", "spaces/../v2/users", "spaces/A#frag", "spaces/", "spaces/A%2F"],
)
def test_a_space_name_that_would_address_another_endpoint_is_refused(space: str) -> None:
    ctx = EncodeContext(tenant="acme", connection="gchat", to=space, secrets={"access_token": "ya29.token"})
    with pytest.raises(EncodeError, match="spaces/"):
        CODEC.encode(_message(c.Text(text="x")), ctx)


@pytest.mark.parametrize(
    "name",
    [
        "spaces/AAAAAAAAAAA/messages/../../spaces/B/messages/C",
        "spaces/AAAAAAAAAAA/messages/C?updateMask=cards",
        "spaces/AAAAAAAAAAA/members/C",
        "spaces/AAAAAAAAAAA/messages/..",
    ],
)
def test_a_message_name_that_would_address_another_endpoint_is_refused(name: str) -> None:
    with pytest.raises(EncodeError, match="no google chat message name"):
        CODEC.encode(_message(c.Delete(target="sent")), _ctx(sent=name))
    with pytest.raises(EncodeError, match="no google chat message name"):
        CODEC.encode(_message(c.Edit(target="sent"), c.Text(text="x")), _ctx(sent=name))


def test_parse_response_reads_the_message_name() -> None:
    (request,) = CODEC.encode(_message(c.Text(text="x")), _ctx())
    sent = CODEC.parse_response(request, HttpResponse(status=200, body=fixture_bytes("response_message_created.json")))
    assert sent.ok and sent.native_ids == ["spaces/AAAAAAAAAAA/messages/CCCCCCCCCCC.CCCCCCCCCCC"]


@pytest.mark.parametrize(
    ("status", "name", "code", "retryable"),
    [
        (400, "error_400_invalid_argument.json", "INVALID_ARGUMENT", False),
        (401, "error_401_unauthenticated.json", "UNAUTHENTICATED", False),
        (403, "error_403_permission_denied.json", "PERMISSION_DENIED", False),
        (429, "error_429_resource_exhausted.json", "RESOURCE_EXHAUSTED", True),
        (503, "error_503_unavailable.json", "UNAVAILABLE", True),
    ],
)
def test_parse_response_errors(status: int, name: str, code: str, retryable: bool) -> None:
    (request,) = CODEC.encode(_message(c.Text(text="x")), _ctx())
    result = CODEC.parse_response(request, HttpResponse(status=status, body=fixture_bytes(name)))
    assert not result.ok and result.retryable is retryable
    assert result.error is not None and result.error.code == code
    assert result.error.message == fixture(name)["error"]["message"]


# --------------------------------------------------------------------------- delivery (real HTTP)


async def _send(fake_api: FakeApi) -> Any:
    (request,) = CODEC.encode(_message(c.Text(text="Hello")), _ctx(base=fake_api.base_url))
    waits: list[float] = []

    async def on_retry(_: Any, wait: float) -> None:
        waits.append(wait)

    async with aiohttp.ClientSession() as session:
        result = await deliver(session, CODEC, request, FAST, on_retry=on_retry)
    return result, waits


async def test_delivery_creates_the_message(fake_api: FakeApi) -> None:
    fake_api.responder = lambda _: Reply(body=fixture("response_message_created.json"))
    result, _ = await _send(fake_api)
    assert result.ok and result.native_ids == ["spaces/AAAAAAAAAAA/messages/CCCCCCCCCCC.CCCCCCCCCCC"]
    (recorded,) = fake_api.requests
    assert recorded.method == "POST" and recorded.path == "/v1/spaces/AAAAAAAAAAA/messages"
    assert recorded.query == {"requestId": "out1:0"}
    assert recorded.headers["authorization"] == "Bearer ya29.token"
    assert recorded.json() == {"text": "Hello"}


@pytest.mark.parametrize(
    ("status", "name"),
    [
        (400, "error_400_invalid_argument.json"),
        (401, "error_401_unauthenticated.json"),
        (403, "error_403_permission_denied.json"),
    ],
)
async def test_delivery_does_not_retry_refusals(fake_api: FakeApi, status: int, name: str) -> None:
    fake_api.queue(Reply(status=status, body=fixture(name)))
    result, _ = await _send(fake_api)
    assert not result.ok and not result.retryable and len(fake_api.requests) == 1


async def test_delivery_waits_for_retry_after_on_429(fake_api: FakeApi) -> None:
    fake_api.queue(Reply(status=429, body=fixture("error_429_resource_exhausted.json"), headers={"Retry-After": "0"}))
    fake_api.responder = lambda _: Reply(body=fixture("response_message_created.json"))
    result, waits = await _send(fake_api)
    assert result.ok and waits == [0.0] and len(fake_api.requests) == 2


async def test_delivery_retries_a_503_with_the_same_request_id(fake_api: FakeApi) -> None:
    fake_api.queue(Reply(status=503, body=fixture("error_503_unavailable.json")))
    fake_api.responder = lambda _: Reply(body=fixture("response_message_created.json"))
    result, _ = await _send(fake_api)
    assert result.ok and len(fake_api.requests) == 2
    assert fake_api.requests[0].query == fake_api.requests[1].query == {"requestId": "out1:0"}


def test_an_unreadable_attachment_is_an_unsupported_part_and_the_text_still_arrives() -> None:
    raw = fixture("message_dm_attachment.json")
    good = raw["message"]["attachment"][0]
    broken = {**good, "attachmentDataRef": "spaces/B/attachments/A"}
    raw["message"]["attachment"] = [broken, good]
    raw["message"]["text"] = "the invoice"
    (message,) = CODEC.decode(HttpRequest(body=json.dumps(raw).encode()), CTX)
    assert isinstance(message, c.Message) and message.sender is not None and message.sender.native_id
    text, unreadable, media = message.parts
    assert isinstance(text, c.Text) and text.text == "the invoice"
    assert isinstance(unreadable, c.Unsupported) and "attachment[0].attachmentDataRef" in unreadable.reason
    assert unreadable.native == broken
    assert isinstance(media, c.Media) and media.filename == "invoice.pdf"
    assert c.decode(c.encode(message)) == message
