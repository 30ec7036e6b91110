"""Microsoft Teams (Bot Framework) codec: real activities in, Connector API calls out, JWT checks."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from babelhub import canonical as c
from babelhub.codecs.base import DecodeContext, EncodeContext, HttpRequest, HttpResponse
from babelhub.codecs.teams import TeamsCodec
from babelhub.errors import DecodeError, EncodeError, SignatureError
from babelhub.services.delivery import RetryPolicy, deliver
from tests import codeckit
from tests.codeckit import Fixtures, b64url, corpus_files, json_body, outbound_message, rs256_token, rsa_key
from tests.fakeapi import FakeApi, Reply

FIXTURES = Fixtures("teams")
CORPUS = codeckit.CORPUS / "teams_botframework"
CODEC = TeamsCodec()
CTX = DecodeContext(tenant="acme", connection="teams-main", seq=7)
RECEIVED_AT = 1_700_000_000.0
APP_ID = "0b6fe6d1-fece-44f7-9a48-56465e2d5ab8"
FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02)


fixture_bytes = FIXTURES.bytes


def fixture(name: str) -> dict[str, Any]:
    value: dict[str, Any] = FIXTURES.json(name)
    return value


def decode(name: str) -> list[c.Envelope]:
    return CODEC.decode(HttpRequest(body=fixture_bytes(name), received_at=RECEIVED_AT), CTX)


def decode_one(name: str) -> c.Envelope:
    (envelope,) = decode(name)
    return envelope


def message_id(conversation: str, native_id: str) -> str:
    """The canonical id the codec gives a Teams message (ids are unique per conversation)."""
    return c.message_id("acme", "teams-main", f"{conversation.split(';messageid=')[0]}|{native_id}")


# ------------------------------------------------------------------------------------------ decode


def test_personal_text_message() -> None:
    raw = fixture("message_personal_rich_text.json")
    envelope = decode_one("message_personal_rich_text.json")
    assert isinstance(envelope, c.Message)
    assert envelope.parts == [c.Text(text="Hello Teams TestBot.Sending bold-italic rich text")]
    conversation = raw["conversation"]["id"]
    assert envelope.id == message_id(conversation, "1485983408511")
    assert envelope.conversation == c.Conversation(
        id=c.conversation_id("acme", "teams-main", conversation),
        channel="teams",
        connection="teams-main",
        native_id=conversation,
        type="direct",
    )
    assert envelope.sender == c.Sender(
        id=c.sender_id("acme", "teams-main", raw["from"]["id"]), native_id=raw["from"]["id"], name="Megan Bowen"
    )
    assert envelope.ts == datetime(2017, 2, 1, 21, 10, 7, 437000, tzinfo=UTC)
    assert envelope.native == c.Native(id="1485983408511", seq=7)
    assert envelope.direction == "inbound" and envelope.reply_to == "" and envelope.thread == ""
    # Where replies go, and what has no part of its own, travel in meta.
    assert envelope.meta["babelhub.reply_api_base"] == "https://smba.trafficmanager.net/amer/"
    assert envelope.meta["teams.service_url"] == "https://smba.trafficmanager.net/amer/"
    assert envelope.meta["teams.html"] == [raw["attachments"][0]["content"]]
    assert envelope.meta["teams.entities"] == raw["entities"]
    assert envelope.meta["teams.extra"] == {"localTimestamp": "2017-02-01T14:10:07.437-07:00"}


def test_channel_thread_reply_with_a_mention() -> None:
    raw = fixture("message_channel_thread_mention.json")
    envelope = decode_one("message_channel_thread_mention.json")
    assert isinstance(envelope, c.Message)
    (text,) = envelope.parts
    bot = raw["recipient"]["id"]
    assert text == c.Text(
        text="@ridotest reply to thread",
        mentions=[
            c.Mention(id=c.sender_id("acme", "teams-main", bot), native_id=bot, name="ridotest", offset=0, length=9)
        ],
    )
    conversation = raw["conversation"]["id"]
    assert envelope.conversation.type == "thread" and envelope.conversation.native_id == conversation
    assert envelope.thread == message_id(conversation, "1759881511856")
    assert envelope.ts == datetime(2025, 10, 8, 17, 33, 1, 495374, tzinfo=UTC)
    assert envelope.meta["teams.tenant_id"] == "50612dbb-0237-4969-b378-8d42590f9c00"


def test_file_sent_by_the_user_is_a_document() -> None:
    envelope = decode_one("message_file_download_info.json")
    assert isinstance(envelope, c.Message)
    assert envelope.parts == [
        c.Media(
            media="document",
            url="https://download.link",
            file_id="1150D938-8870-4044-9F2C-5BBDEBA70C9D",
            mime="text/plain",
            filename="file_example.txt",
        )
    ]


def test_message_back_click_is_an_action_with_its_payload() -> None:
    raw = fixture("message_back_submit.json")
    envelope = decode_one("message_back_submit.json")
    assert isinstance(envelope, c.Message)
    source = message_id(raw["conversation"]["id"], "1575667808184")
    assert envelope.parts == [
        c.Action(id="", title="User just clicked the MessageBack button", source=source),
        c.Form(id="", fields=[c.FormField(id="property", value="propertyValue")]),
    ]


def test_click_on_a_babelhub_button_names_the_button() -> None:
    raw = fixture("message_back_submit.json") | {"text": "Yes", "value": {"id": "confirm-yes"}}
    (envelope,) = CODEC.decode(HttpRequest(body=json.dumps(raw).encode()), CTX)
    assert isinstance(envelope, c.Message)
    source = message_id(raw["conversation"]["id"], "1575667808184")
    assert envelope.parts == [c.Action(id="confirm-yes", title="Yes", source=source)]


def test_adaptive_card_execute_invoke_is_an_action_and_gets_its_invoke_response() -> None:
    raw = fixture("invoke_adaptive_card_action.json")
    envelope = decode_one("invoke_adaptive_card_action.json")
    assert isinstance(envelope, c.Message)
    source = message_id(raw["conversation"]["id"], "1767765488332")
    assert envelope.parts == [
        c.Action(id="", title="Submit Feedback", source=source),
        c.Form(id="", fields=[c.FormField(id="feedback", value="test invokes")]),
    ]
    assert envelope.reply_to == source
    request = HttpRequest(body=fixture_bytes("invoke_adaptive_card_action.json"))
    answer = CODEC.handshake(request, {"invoke_reply": "Thanks!"})
    assert answer is not None and answer.status == 200
    assert json.loads(answer.body) == {
        "statusCode": 200,
        "type": "application/vnd.microsoft.activity.message",
        "value": "Thanks!",
    }
    assert CODEC.handshake(HttpRequest(body=fixture_bytes("message_personal_rich_text.json")), {}) is None


def test_an_invoke_that_does_not_come_by_post_gets_no_invoke_answer() -> None:
    # Bot Framework POSTs every activity; the hub verifies a POST's token before it asks for the answer.
    body = fixture_bytes("invoke_adaptive_card_action.json")
    for method in ("GET", "PUT", "HEAD"):
        assert CODEC.handshake(HttpRequest(method=method, body=body), {"invoke_reply": "Thanks!"}) is None


def test_other_invokes_are_kept_as_unsupported() -> None:
    envelope = decode_one("invoke_task_fetch.json")
    assert isinstance(envelope, c.Message)
    (part,) = envelope.parts
    assert isinstance(part, c.Unsupported) and part.reason == "teams invoke task/fetch"
    assert part.native == {"name": "task/fetch", "value": fixture("invoke_task_fetch.json")["value"]}
    assert envelope.ts == datetime.fromtimestamp(RECEIVED_AT, UTC)  # the fixture has no timestamp


def test_edit_and_undelete_target_the_edited_message() -> None:
    raw = fixture("message_update_edit.json")
    edit = decode_one("message_update_edit.json")
    assert isinstance(edit, c.Message)
    target = message_id(raw["conversation"]["id"], "1666977568748")
    assert edit.parts == [c.Edit(target=target)]
    assert edit.id != target  # the edit event is an envelope of its own
    assert edit.meta["teams.event_type"] == "editMessage"
    undelete = decode_one("message_update_undelete.json")
    assert isinstance(undelete, c.Message) and undelete.meta["teams.event_type"] == "undeleteMessage"
    undelete_raw = fixture("message_update_undelete.json")
    assert undelete.parts == [c.Edit(target=message_id(undelete_raw["conversation"]["id"], "1666977568748"))]


def test_soft_delete() -> None:
    raw = fixture("message_delete_soft.json")
    envelope = decode_one("message_delete_soft.json")
    assert isinstance(envelope, c.Message)
    assert envelope.parts == [c.Delete(target=message_id(raw["conversation"]["id"], "1666977568748"))]
    assert envelope.sender is not None and envelope.sender.name == "Alex Wilber"


def test_reactions_added_and_removed() -> None:
    raw = fixture("message_reaction_like.json")
    target = message_id(raw["conversation"]["id"], "1575667808184")
    liked = decode_one("message_reaction_like.json")
    unliked = decode_one("message_reaction_unlike.json")
    assert isinstance(liked, c.Message) and isinstance(unliked, c.Message)
    assert liked.parts == [c.Reaction(emoji="👍", target=target)]
    assert unliked.parts == [c.Reaction(emoji="👍", target=target, removed=True)]
    assert liked.conversation.type == "channel"


def test_members_added_and_removed_are_activities() -> None:
    joined, left = decode("conversation_update_members.json")
    assert isinstance(joined, c.Activity) and isinstance(left, c.Activity)
    assert joined.activity == "joined" and left.activity == "left"
    assert [m["native_id"] for m in joined.detail["members"]] == ["userId1", "userId2"]
    assert joined.detail["members"][1] == {
        "id": c.sender_id("acme", "teams-main", "userId2"),
        "native_id": "userId2",
        "name": "User Two",
        "role": "user",
    }
    # The activity's recipient is, by Bot Framework's definition, the bot: its own join is marked so.
    assert joined.detail["members"][0]["role"] == "bot"
    assert [m["name"] for m in left.detail["members"]] == ["User Three"]
    assert joined.sender is not None and joined.sender.role == "bot"
    assert joined.id != left.id


def test_typing_activity() -> None:
    envelope = decode_one("typing.json")
    assert isinstance(envelope, c.Activity) and envelope.activity == "typing"
    assert envelope.sender is not None and envelope.sender.native_id == "1"


def test_read_receipt_is_a_read_status_of_our_message() -> None:
    envelope = decode_one("read_receipt.json")
    assert isinstance(envelope, c.Status)
    assert envelope.state == "read" and envelope.native_id == "1692206589131" and envelope.message_id == ""
    assert envelope.id == c.stable_id("status", "acme", "teams-main", "1692206589131", "read")
    assert envelope.ts == datetime(2023, 8, 16, 17, 23, 11, 136668, tzinfo=UTC)


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (b"{not json", "$"),
        (b'{"type": "message", "id": "1"}', "$.conversation.id"),
        (b'{"type": 5, "conversation": {"id": "x"}}', "$.type"),
        (b'{"type": "message", "id": "1", "conversation": {"id": "x"}, "timestamp": "yesterday"}', "$.timestamp"),
        (b'{"type": "typing", "conversation": {"id": "x"}, "timestamp": "9999-12-31T23:00:00-05:00"}', "$.timestamp"),
    ],
)
def test_undecodable_activities_name_the_json_path(body: bytes, path: str) -> None:
    with pytest.raises(DecodeError) as caught:
        CODEC.decode(HttpRequest(body=body, received_at=RECEIVED_AT), CTX)
    assert caught.value.path == path


def test_an_unreadable_attachment_is_an_unsupported_part_and_the_text_still_arrives() -> None:
    activity = fixture("message_file_download_info.json")
    activity["text"] = "here is the file"
    good = activity["attachments"][0]
    activity["attachments"] = [{"name": 3}, good]
    (message,) = CODEC.decode(HttpRequest(body=json.dumps(activity).encode(), received_at=RECEIVED_AT), CTX)
    assert isinstance(message, c.Message) and message.sender is not None
    text, unreadable, media = message.parts
    assert isinstance(text, c.Text) and text.text == "here is the file"
    assert isinstance(unreadable, c.Unsupported) and "$.attachments[0].name" in unreadable.reason
    assert unreadable.native == {"name": 3}
    assert isinstance(media, c.Media)
    assert c.decode(c.encode(message)) == message


def test_a_card_value_written_as_a_string_with_nan_is_kept_as_that_string() -> None:
    """json.loads reads NaN and Infinity, which no envelope can carry: the card data is read as JSON."""
    activity = fixture("message_back_submit.json")
    activity["value"] = '{"id": "x", "amount": NaN}'
    (message,) = CODEC.decode(HttpRequest(body=json.dumps(activity).encode(), received_at=RECEIVED_AT), CTX)
    assert c.decode(c.encode(message)) == message


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        ("2017-02-01T21:10:07.437", datetime(2017, 2, 1, 21, 10, 7, 437000, tzinfo=UTC)),  # no offset: UTC
        ("2017-02-01T13:10:07.437-08:00", datetime(2017, 2, 1, 21, 10, 7, 437000, tzinfo=UTC)),
    ],
)
def test_timestamps_are_utc_and_the_envelope_reads_back(timestamp: str, expected: datetime) -> None:
    raw = fixture("message_personal_rich_text.json") | {"timestamp": timestamp}
    (envelope,) = CODEC.decode(HttpRequest(body=json.dumps(raw).encode()), CTX)
    assert envelope.ts == expected and envelope.ts.utcoffset() == expected.utcoffset()
    assert c.decode(c.encode(envelope)) == envelope


def test_dedup_key_tells_an_edit_from_the_message_it_edits() -> None:
    edit = CODEC.dedup_key(HttpRequest(body=fixture_bytes("message_update_edit.json")))
    again = CODEC.dedup_key(HttpRequest(body=fixture_bytes("message_update_edit.json")))
    delete = CODEC.dedup_key(HttpRequest(body=fixture_bytes("message_delete_soft.json")))
    assert edit == again and edit and delete and edit != delete
    assert CODEC.dedup_key(HttpRequest(body=fixture_bytes("conversation_update_members.json"))) == ""  # no id
    with pytest.raises(DecodeError):
        CODEC.dedup_key(HttpRequest(body=b"[]"))


def test_corpus_sweep_decodes_or_raises_decode_error() -> None:
    if not CORPUS.is_dir():
        pytest.skip("shared corpus not present")
    files = corpus_files(CORPUS)
    assert files
    decoded = 0
    for path in files:
        try:
            envelopes = CODEC.decode(HttpRequest(body=path.read_bytes(), received_at=RECEIVED_AT), CTX)
        except DecodeError:
            continue
        assert envelopes, path.name
        for envelope in envelopes:
            assert c.decode(c.encode(envelope)) == envelope  # every envelope is valid canonical JSON
        decoded += 1
    assert decoded >= len(files) // 2


# ------------------------------------------------------------------------------------ signatures


def _jwks(key: rsa.RSAPrivateKey, kid: str, **extra: Any) -> str:
    numbers = key.public_key().public_numbers()
    jwk = {
        "kty": "RSA",
        "kid": kid,
        "use": "sig",
        "n": b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
        "e": b64url(numbers.e.to_bytes(3, "big")),
        **extra,
    }
    return json.dumps({"keys": [jwk]})


def _token(key: rsa.RSAPrivateKey, claims: dict[str, Any], kid: str = "key-1", alg: str = "RS256") -> str:
    return rs256_token(key, {"typ": "JWT", "alg": alg, "kid": kid, "x5t": kid}, claims)


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa_key()


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": "https://api.botframework.com",
        "aud": APP_ID,
        "nbf": now - 10,
        "exp": now + 3600,
        "serviceurl": "https://smba.trafficmanager.net/amer/",
    }
    return claims | overrides


def _signed(token: str, body: bytes | None = None) -> HttpRequest:
    return HttpRequest(
        headers={"authorization": f"Bearer {token}"},
        body=body if body is not None else fixture_bytes("message_personal_rich_text.json"),
        received_at=time.time(),
    )


def _secrets(key: rsa.RSAPrivateKey, **extra: Any) -> dict[str, str]:
    return {"app_id": APP_ID, "signing_keys": _jwks(key, "key-1", **extra)}


def test_a_token_signed_by_a_configured_key_verifies(signing_key: rsa.RSAPrivateKey) -> None:
    CODEC.verify(_signed(_token(signing_key, _claims())), _secrets(signing_key))


def test_a_token_expired_within_the_five_minute_skew_still_verifies(signing_key: rsa.RSAPrivateKey) -> None:
    token = _token(signing_key, _claims(exp=int(time.time()) - 60))
    CODEC.verify(_signed(token), _secrets(signing_key))


def test_keys_given_as_pem_verify_too(signing_key: rsa.RSAPrivateKey) -> None:
    pem = signing_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    CODEC.verify(_signed(_token(signing_key, _claims())), {"app_id": APP_ID, "signing_keys": pem.decode()})


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("bad signature", "signature does not verify"),
        ("missing", "missing Authorization"),
        ("expired", "expired"),
        ("not yet valid", "not valid yet"),
        ("wrong audience", "audience"),
        ("wrong issuer", "issuer"),
        ("unknown key", "key id"),
        ("alg none", "not RS256"),
        ("other serviceUrl", "serviceUrl"),
    ],
)
def test_tokens_that_must_be_refused(signing_key: rsa.RSAPrivateKey, case: str, match: str) -> None:
    now = int(time.time())
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    tokens = {
        "bad signature": _token(other_key, _claims()),
        "expired": _token(signing_key, _claims(exp=now - 301, nbf=now - 4000)),
        "not yet valid": _token(signing_key, _claims(nbf=now + 400)),
        "wrong audience": _token(signing_key, _claims(aud="someone-else")),
        "wrong issuer": _token(
            signing_key, _claims(iss="https://sts.windows.net/d6d49420-f39b-4df7-a1dc-d59a935871db/")
        ),
        "unknown key": _token(signing_key, _claims(), kid="key-2"),
        "alg none": _token(signing_key, _claims(), alg="none"),
        "other serviceUrl": _token(signing_key, _claims(serviceurl="https://evil.example/")),
    }
    request = _signed(tokens[case]) if case != "missing" else HttpRequest(body=b"{}")
    with pytest.raises(SignatureError, match=match):
        CODEC.verify(request, _secrets(signing_key))


def test_a_key_endorsed_for_other_channels_is_refused(signing_key: rsa.RSAPrivateKey) -> None:
    token = _token(signing_key, _claims())
    CODEC.verify(_signed(token), _secrets(signing_key, endorsements=["msteams"]))
    with pytest.raises(SignatureError, match="endorsed"):
        CODEC.verify(_signed(token), _secrets(signing_key, endorsements=["skype"]))


# ------------------------------------------------------------------------------------------ encode

CONVERSATION = "19:6848757105754c8981c67612732d9aa7@thread.tacv2;messageid=1759881511856"


def _ctx(base: str = "https://smba.trafficmanager.net/amer/", **native_ids: str) -> EncodeContext:
    return EncodeContext(
        tenant="acme",
        connection="teams-main",
        to=CONVERSATION,
        api_base=base,
        secrets={"bot_token": "bf-token"},
        native_ids=native_ids,
    )


def _message(*parts: c.Part, **fields: Any) -> c.Message:
    conversation = c.Conversation(id="conv", channel="teams", connection="teams-main", native_id=CONVERSATION)
    return outbound_message("acme", conversation, parts, id="out1", **fields)


ACTIVITIES = f"https://smba.trafficmanager.net/amer/v3/conversations/{quote(CONVERSATION, safe='')}/activities"


_body = json_body


def test_text_is_one_markdown_activity() -> None:
    (request,) = CODEC.encode(_message(c.Text(text="**Hello** there", format="markdown")), _ctx())
    assert request.method == "POST" and request.url == ACTIVITIES
    assert request.headers == {"Authorization": "Bearer bf-token", "Content-Type": "application/json"}
    assert _body(request) == {"type": "message", "text": "**Hello** there", "textFormat": "markdown"}
    assert request.idempotency_key == "out1:0" and request.message_id == "out1"


def test_a_reply_posts_to_the_replied_activity() -> None:
    message = _message(c.Text(text="ok"), reply_to="canon-in")
    (request,) = CODEC.encode(message, _ctx(**{"canon-in": "1759944781430"}))
    assert request.url == f"{ACTIVITIES}/1759944781430"
    assert _body(request) == {"type": "message", "text": "ok", "textFormat": "plain", "replyToId": "1759944781430"}


def test_mentions_become_at_tags_and_entities() -> None:
    text = c.Text(text="hi @Rido, look", mentions=[c.Mention(native_id="29:abc", name="Rido", offset=3, length=5)])
    (request,) = CODEC.encode(_message(text), _ctx())
    assert _body(request) == {
        "type": "message",
        "text": "hi <at>Rido</at>, look",
        "textFormat": "plain",
        "entities": [{"type": "mention", "text": "<at>Rido</at>", "mentioned": {"id": "29:abc", "name": "Rido"}}],
    }


def test_text_and_a_few_reply_buttons_are_suggested_actions() -> None:
    buttons = c.Buttons(buttons=[c.Button(id="y", title="Yes"), c.Button(id="n", title="No")])
    (request,) = CODEC.encode(_message(c.Text(text="Ready?"), buttons), _ctx())
    assert _body(request) == {
        "type": "message",
        "text": "Ready?",
        "textFormat": "plain",
        "suggestedActions": {
            "actions": [
                {"type": "imBack", "title": "Yes", "value": "Yes"},
                {"type": "imBack", "title": "No", "value": "No"},
            ]
        },
    }


def test_postback_and_link_buttons_are_an_adaptive_card() -> None:
    buttons = c.Buttons(
        buttons=[
            c.Button(id="pay", title="Pay", action="postback"),
            c.Button(id="docs", title="Docs", action="url", value="https://example.com/docs"),
            c.Button(id="later", title="Later"),
        ]
    )
    (request,) = CODEC.encode(_message(c.Text(text="Invoice due"), buttons), _ctx())
    (attachment,) = _body(request)["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = attachment["content"]
    assert card["type"] == "AdaptiveCard" and card["version"] == "1.2"
    assert card["body"] == [{"type": "TextBlock", "text": "Invoice due", "wrap": True}]
    assert card["actions"] == [
        {"type": "Action.Submit", "title": "Pay", "data": {"id": "pay"}},
        {"type": "Action.OpenUrl", "title": "Docs", "url": "https://example.com/docs"},
        {
            "type": "Action.Submit",
            "title": "Later",
            "data": {
                "id": "later",
                "msteams": {"type": "messageBack", "displayText": "Later", "text": "Later", "value": {"id": "later"}},
            },
        },
    ]


def test_cards_carousels_and_pictures() -> None:
    picture = c.Media(media="image", url="https://example.com/a.png")
    card = c.Card(title="Shirt", subtitle="Blue", media=picture, buttons=[c.Button(id="buy", title="Buy")])
    carousel = c.Carousel(cards=[card, c.Card(title="Hat")])
    card_call, carousel_call, picture_call, captioned_call = CODEC.encode(
        _message(card, carousel, picture, c.Media(media="image", url="https://example.com/b.jpg", caption="B")),
        _ctx(),
    )
    content = _body(card_call)["attachments"][0]["content"]
    assert content["body"] == [
        {"type": "TextBlock", "text": "Shirt", "wrap": True, "weight": "bolder", "size": "medium"},
        {"type": "TextBlock", "text": "Blue", "wrap": True, "isSubtle": True},
        {"type": "Image", "url": "https://example.com/a.png", "altText": ""},
    ]
    assert _body(carousel_call)["attachmentLayout"] == "carousel"
    assert len(_body(carousel_call)["attachments"]) == 2
    assert _body(picture_call) == {
        "type": "message",
        "attachments": [{"contentType": "image/png", "contentUrl": "https://example.com/a.png"}],
    }
    captioned = _body(captioned_call)["attachments"][0]["content"]["body"]
    assert captioned[1] == {"type": "TextBlock", "text": "B", "wrap": True}
    assert [call.idempotency_key for call in (card_call, carousel_call, picture_call, captioned_call)] == [
        "out1:0",
        "out1:1",
        "out1:2",
        "out1:3",
    ]


def test_edit_replaces_the_activity_and_delete_deletes_it() -> None:
    ctx = _ctx(**{"canon-sent": "1:1vW2mx"})
    (edit,) = CODEC.encode(_message(c.Edit(target="canon-sent"), c.Text(text="fixed")), ctx)
    assert edit.method == "PUT" and edit.url == f"{ACTIVITIES}/1%3A1vW2mx"
    assert _body(edit) == {"type": "message", "text": "fixed", "textFormat": "plain", "id": "1:1vW2mx"}
    (delete,) = CODEC.encode(_message(c.Delete(target="canon-sent")), ctx)
    assert delete.method == "DELETE" and delete.url == f"{ACTIVITIES}/1%3A1vW2mx" and delete.body == b""
    with pytest.raises(EncodeError, match="unknown"):
        CODEC.encode(_message(c.Delete(target="never-sent")), ctx)


def test_what_cannot_be_encoded_says_why() -> None:
    with pytest.raises(EncodeError, match="serviceUrl"):
        CODEC.encode(_message(c.Text(text="x")), _ctx(base=""))
    with pytest.raises(EncodeError, match="bot_token"):
        CODEC.encode(_message(c.Text(text="x")), EncodeContext(tenant="a", connection="b", to="c", api_base="http://x"))
    with pytest.raises(EncodeError, match="location"):
        CODEC.encode(_message(c.Location(lat=1, lon=2)), _ctx())


def test_typing_activity_is_sent() -> None:
    conversation = c.Conversation(id="conv")
    typing = c.Activity(id="act1", tenant="acme", conversation=conversation, ts=c.now(), activity="typing")
    (request,) = CODEC.encode_activity(typing, _ctx())
    assert request.url == ACTIVITIES and _body(request) == {"type": "typing"}


def test_parse_response_reads_the_resource_id() -> None:
    (request,) = CODEC.encode(_message(c.Text(text="x")), _ctx())
    sent = CODEC.parse_response(request, HttpResponse(status=200, body=fixture_bytes("response_resource.json")))
    assert sent.ok and sent.native_ids == ["1:1vW2mx4iDZf05lk18yskL64Wkfwraa76YTGNgDiIi-_5"]
    (delete,) = CODEC.encode(_message(c.Delete(target="s")), _ctx(s="1666977568748"))
    assert CODEC.parse_response(delete, HttpResponse(status=200)).native_ids == ["1666977568748"]


@pytest.mark.parametrize(
    ("status", "name", "code", "retryable"),
    [
        (400, "error_400_bad_argument.json", "BadArgument", False),
        (401, "error_401_bot_not_registered.json", "BotNotRegistered", False),
        (403, "error_403_conversation_blocked.json", "ConversationBlockedByUser", False),
        (412, "error_412_precondition_failed.json", "PreconditionFailed", True),
        (429, "error_429_throttled.json", "Throttled", True),
        (500, "error_500_service_error.json", "ServiceError", False),
        (502, "error_502_service_error.json", "ServiceError", True),
    ],
)
def test_parse_response_follows_the_teams_retry_table(status: int, name: str, code: str, retryable: bool) -> None:
    (request,) = CODEC.encode(_message(c.Text(text="x")), _ctx())
    result = CODEC.parse_response(request, HttpResponse(status=status, body=fixture_bytes(name)))
    assert not result.ok and result.retryable is retryable
    assert result.error is not None and result.error.code == code and result.error.retryable is retryable
    assert result.error.native == fixture(name)


# --------------------------------------------------------------------------- delivery (real HTTP)


async def _send(fake_api: FakeApi, *parts: c.Part) -> Any:
    (request,) = CODEC.encode(_message(*parts), _ctx(base=fake_api.base_url))
    waits: list[float] = []

    async def on_retry(_: Any, wait: float) -> None:
        waits.append(wait)

    async with aiohttp.ClientSession() as session:
        result = await deliver(session, CODEC, request, FAST, on_retry=on_retry)
    return result, waits


async def test_delivery_sends_the_activity_and_reads_its_id(fake_api: FakeApi) -> None:
    fake_api.responder = lambda _: Reply(status=201, body=fixture("response_resource.json"))
    result, _ = await _send(fake_api, c.Text(text="Hello"))
    assert result.ok and result.native_ids == ["1:1vW2mx4iDZf05lk18yskL64Wkfwraa76YTGNgDiIi-_5"]
    (recorded,) = fake_api.requests
    assert recorded.method == "POST" and recorded.path == f"/v3/conversations/{CONVERSATION}/activities"
    assert recorded.headers["authorization"] == "Bearer bf-token"
    assert recorded.json() == {"type": "message", "text": "Hello", "textFormat": "plain"}


@pytest.mark.parametrize(
    ("status", "name"),
    [
        (400, "error_400_bad_argument.json"),
        (401, "error_401_bot_not_registered.json"),
        (403, "error_403_conversation_blocked.json"),
    ],
)
async def test_delivery_does_not_retry_refusals(fake_api: FakeApi, status: int, name: str) -> None:
    fake_api.queue(Reply(status=status, body=fixture(name)))
    result, _ = await _send(fake_api, c.Text(text="Hello"))
    assert not result.ok and not result.retryable
    assert len(fake_api.requests) == 1


async def test_delivery_waits_for_retry_after_on_429(fake_api: FakeApi) -> None:
    fake_api.queue(Reply(status=429, body=fixture("error_429_throttled.json"), headers={"Retry-After": "0"}))
    fake_api.responder = lambda _: Reply(status=200, body=fixture("response_resource.json"))
    result, waits = await _send(fake_api, c.Text(text="Hello"))
    assert result.ok and waits == [0.0]
    assert len(fake_api.requests) == 2


async def test_delivery_retries_a_502_then_succeeds(fake_api: FakeApi) -> None:
    fake_api.queue(Reply(status=502, body=fixture("error_502_service_error.json")))
    fake_api.responder = lambda _: Reply(status=200, body=fixture("response_resource.json"))
    result, _ = await _send(fake_api, c.Text(text="Hello"))
    assert result.ok and len(fake_api.requests) == 2
    assert fake_api.requests[0].body == fake_api.requests[1].body


async def test_delivery_gives_up_on_a_500_as_teams_advises(fake_api: FakeApi) -> None:
    fake_api.queue(Reply(status=500, body=fixture("error_500_service_error.json")))
    result, _ = await _send(fake_api, c.Text(text="Hello"))
    assert not result.ok and result.error is not None and result.error.code == "ServiceError"
    assert len(fake_api.requests) == 1


def test_an_entity_that_is_no_object_is_skipped_and_the_message_arrives() -> None:
    activity = fixture("message_channel_thread_mention.json")
    activity["entities"] = ["not an entity", *activity["entities"]]
    (message,) = CODEC.decode(HttpRequest(body=json.dumps(activity).encode(), received_at=RECEIVED_AT), CTX)
    assert isinstance(message, c.Message)
    (text,) = message.parts
    assert isinstance(text, c.Text) and text.mentions
