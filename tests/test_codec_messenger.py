"""Messenger and Instagram codecs on documented payloads: decode meaning, signatures, the handshake,
exact Send API requests, and real sends through `deliver` to a local fake Graph API."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from email import policy
from email.parser import BytesParser
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings

from babelhub import canonical as c
from babelhub.codecs.base import DecodeContext, EncodeContext, HttpRequest, HttpResponse, OutboundRequest
from babelhub.codecs.degrade import degrade
from babelhub.codecs.messenger import InstagramCodec, MessengerCodec
from babelhub.errors import DecodeError, EncodeError, SignatureError
from babelhub.services.delivery import RetryPolicy
from tests import codeckit, strategies
from tests.codeckit import Fixtures, Ids, corpus_files, deliver_one, meta_signed, outbound_message, response, utc
from tests.fakeapi import FakeApi, Reply

CORPUS = codeckit.CORPUS

TENANT, CONNECTION = "acme", "fb-main"
CTX = DecodeContext(tenant=TENANT, connection=CONNECTION, seq=41)
PAGE, PSID = "107318788793420", "7712941528806923"
IGID, IGSID = "17841405822304914", "1284918273645012"
APP_SECRET = "d7a8fbb307d7809469ca9abcb0082e4f"
FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02)

messenger = MessengerCodec()
instagram = InstagramCodec()


def fixture(channel: str, name: str) -> bytes:
    return Fixtures(channel).bytes(name)


def fixture_json(channel: str, name: str) -> Any:
    return Fixtures(channel).json(name)


def decode(codec: MessengerCodec, name: str) -> list[c.Envelope]:
    return codec.decode(HttpRequest(body=fixture(codec.channel, name)), CTX)


def only(codec: MessengerCodec, name: str) -> c.Envelope:
    (envelope,) = decode(codec, name)
    return envelope


def only_message(codec: MessengerCodec, name: str) -> c.Message:
    envelope = only(codec, name)
    assert isinstance(envelope, c.Message)
    return envelope


IDS = Ids(TENANT, CONNECTION)
mid, user = IDS.message, IDS.sender


def ms(value: int) -> datetime:
    return utc(value / 1000)


# ---------------------------------------------------------------------------------- Messenger decode


def test_quick_reply_is_an_action_from_the_person_in_their_conversation() -> None:
    message = only_message(messenger, "message_text_quick_reply.json")
    assert message.parts == [c.Action(id="COLOR_RED", title="hello, world!")]
    assert message.id == mid("mid.1457764197618:41d102a3e1ae206a38")
    assert message.native == c.Native(id="mid.1457764197618:41d102a3e1ae206a38", seq=41)
    assert message.direction == "inbound"
    assert message.sender == c.Sender(id=user(PSID), native_id=PSID, role="user")
    assert message.conversation == c.Conversation(
        id=c.conversation_id(TENANT, CONNECTION, PSID), channel="messenger", connection=CONNECTION, native_id=PSID
    )
    assert message.ts == ms(1458692752478)


def test_reply_to_points_at_the_replied_message_and_keeps_is_self_reply() -> None:
    message = only_message(messenger, "message_reply_to.json")
    assert message.parts == [c.Text(text="hello, world!")]
    assert message.reply_to == mid("m_1fTq8oLumEyIp3Q2MR-aY7IfLZDamVrALniheU")
    assert message.meta == {"messenger.reply_to": {"is_self_reply": False}}


def test_attachments_become_media_in_order() -> None:
    message = only_message(messenger, "message_attachments.json")
    assert message.parts == [
        c.Media(media="image", url="https://scontent.xx.fbcdn.net/v/t1.15752-9/photo.jpg"),
        c.Media(media="document", url="https://cdn.fbsbx.com/v/t59.2708-21/invoice.pdf"),
    ]
    assert message.ts == ms(1518479195308)


def test_a_sticker_sent_twice_during_metas_transition_shows_once_and_keeps_the_copy() -> None:
    message = only_message(messenger, "message_sticker_transition.json")
    sticker, copy = message.parts
    assert sticker == c.Media(
        media="sticker", url="https://scontent.xx.fbcdn.net/v/t39.1997-6/sticker.png", file_id="369239263222822"
    )
    assert isinstance(copy, c.Unsupported) and copy.native["type"] == "image"


def test_legacy_sticker_image_with_sticker_id_is_a_sticker() -> None:
    message = only_message(messenger, "message_sticker_legacy.json")
    assert [(part.media, part.file_id) for part in message.parts if isinstance(part, c.Media)] == [
        ("sticker", "369239263222822")
    ]
    assert message.meta["messenger.unmapped"] == {"message": {"seq": 1107}}


def test_legacy_location_attachment_is_a_location() -> None:
    message = only_message(messenger, "message_location_legacy.json")
    assert message.parts == [
        c.Location(lat=52.0, lon=4.0, name="My Location", url="https://www.facebook.com/l.php?u=https")
    ]
    assert message.conversation.native_id == "123456789012346"


def test_a_shared_link_keeps_its_text_and_the_native_fallback() -> None:
    message = only_message(messenger, "message_fallback.json")
    text, share = message.parts
    assert text == c.Text(text="look at this https://example.com/article")
    assert isinstance(share, c.Unsupported) and "fallback" in share.reason
    assert share.native["payload"] == {"url": "https://example.com/article", "title": "An article"}


def test_echo_is_marked_outbound_from_the_page_and_never_a_user_message() -> None:
    message = only_message(messenger, "echo_text.json")
    assert message.direction == "outbound"
    assert message.sender == c.Sender(id=user(PAGE), native_id=PAGE, role="bot")
    assert message.conversation.native_id == PSID  # the person's conversation, not the Page's
    assert message.parts == [c.Text(text="Thanks, we got your order.")]
    assert message.meta == {
        "messenger.echo": True,
        "messenger.app_id": 1517776481860111,
        "messenger.metadata": "campaign-42",
    }


def test_standby_echo_of_a_template_is_kept_and_flagged() -> None:
    message = only_message(messenger, "standby_echo_template.json")
    assert message.direction == "outbound"
    assert message.meta["messenger.standby"] is True and message.meta["messenger.echo"] is True
    (part,) = message.parts
    assert isinstance(part, c.Unsupported) and part.native["payload"]["template_type"] == "media"


def test_postback_is_an_action_with_title_source_and_referral() -> None:
    message = only_message(messenger, "postback.json")
    source = "m_AG5Hz2Uq7tuwNEhXfYYKj8mJEM_QPpz5jdCK48PnKAjSdjfipqxqMvK8ma6AC8fp"
    assert message.parts == [c.Action(id="GET_STARTED", title="Start Chatting", source=mid(source))]
    assert message.meta == {
        "messenger.referral": {"ref": "summer-campaign", "source": "SHORTLINK", "type": "OPEN_THREAD"}
    }
    assert message.id != mid(source)  # a click is its own event, not the message it refers to


def test_app_dashboard_field_value_test_with_user_ref_and_string_seconds() -> None:
    message = only_message(messenger, "app_dashboard_postback.json")
    assert message.parts == [c.Action(id="USER-DEFINED-PAYLOAD", title="TITLE-FOR-THE-CTA", source=mid("m_MESSAGE-ID"))]
    assert message.sender is not None and message.sender.native_id == "USER-REF-ID"
    assert message.ts == datetime(2018, 5, 27, 22, 23, 44, tzinfo=UTC)


def test_reaction_and_its_removal_target_the_reacted_message() -> None:
    target = mid("m_AG5Hz2Uq7tuwNEhXfYYKj8mJEM_QPpz5jdCK48PnKAjSdjfipqxqMvK8ma6AC8fp")
    react = only_message(messenger, "reaction_react.json")
    unreact = only_message(messenger, "reaction_unreact.json")
    assert react.parts == [c.Reaction(emoji="\u2764\ufe0f", target=target)]
    assert react.meta == {"messenger.reaction": "love"}
    assert unreact.parts == [c.Reaction(emoji="", target=target, removed=True)]
    assert react.id != unreact.id


def test_message_edit_is_an_edit_of_the_original_plus_the_new_text() -> None:
    message = only_message(messenger, "message_edit.json")
    assert message.parts == [
        c.Edit(target=mid("m_1457764197618:41d102a3e1ae206a38")),
        c.Text(text="hello, world! (edited)"),
    ]
    assert message.id not in (mid("m_1457764197618:41d102a3e1ae206a38"), "")


def test_delivery_is_one_delivered_status_per_mid() -> None:
    statuses = decode(messenger, "delivery.json")
    assert [(s.native_id, s.state, s.message_id) for s in statuses if isinstance(s, c.Status)] == [
        ("mid.1458668856218:ed81099e15d3f4f233", "delivered", ""),
        ("mid.1458668856219:aa81099e15d3f4f234", "delivered", ""),
    ]
    first = statuses[0]
    assert first.id == c.stable_id("status", TENANT, CONNECTION, "mid.1458668856218:ed81099e15d3f4f233", "delivered")
    assert first.ts == ms(1458668856253)  # no timestamp: the watermark is when
    assert first.meta == {"messenger.watermark": 1458668856253}
    assert first.sender is None  # a receipt is not the person speaking (it must not reopen the window)


def test_messenger_read_watermark_is_a_read_activity() -> None:
    activity = only(messenger, "read.json")
    assert isinstance(activity, c.Activity)
    assert activity.activity == "read" and activity.detail == {"watermark": 1458668856253}
    assert activity.conversation.native_id == PSID and activity.ts == ms(1458668856463)
    assert activity.sender is None


def test_referral_optin_and_handover_are_activities_with_the_native_detail() -> None:
    referral = only(messenger, "referral_shortlink.json")
    optin = only(messenger, "optin_notification_messages.json")
    stop = only(messenger, "optin_stop_notifications.json")
    handover = only(messenger, "handover_pass_thread_control.json")
    assert isinstance(referral, c.Activity) and referral.activity == "started"
    assert referral.detail == {"referral": {"ref": "spring-sale", "source": "SHORTLINK", "type": "OPEN_THREAD"}}
    assert isinstance(optin, c.Activity) and optin.activity == "opt_in"
    assert optin.detail["notification_messages_token"] == "7193830237424358930"
    assert isinstance(stop, c.Activity) and stop.activity == "opt_out"
    assert isinstance(handover, c.Activity) and handover.activity == "handoff"
    assert handover.detail["event"] == "pass_thread_control" and handover.detail["new_owner_app_id"] == "123456789"


def test_a_batch_yields_every_event_in_order() -> None:
    message, status = decode(messenger, "batch_two_entries.json")
    assert isinstance(message, c.Message) and message.parts == [c.Text(text="first")]
    assert isinstance(status, c.Status) and status.native_id == "m_ourReply01"


def test_an_unknown_event_is_kept_verbatim() -> None:
    body = {
        "object": "page",
        "entry": [
            {
                "id": PAGE,
                "time": 1,
                "messaging": [
                    {
                        "sender": {"id": PSID},
                        "recipient": {"id": PAGE},
                        "timestamp": 1718000000000,
                        "game_play": {"game_id": "g1", "player_id": "p1"},
                    }
                ],
            }
        ],
    }
    (message,) = messenger.decode(HttpRequest(body=json.dumps(body).encode()), CTX)
    assert isinstance(message, c.Message)
    (part,) = message.parts
    assert isinstance(part, c.Unsupported) and part.native["game_play"] == {"game_id": "g1", "player_id": "p1"}


def test_replaying_a_delivery_yields_the_same_ids() -> None:
    first = [envelope.id for envelope in decode(messenger, "batch_two_entries.json")]
    again = [envelope.id for envelope in decode(messenger, "batch_two_entries.json")]
    assert first == again and len(set(first)) == 2


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (b"{not json", "$"),
        (b'{"object": "page"}', "$"),
        (
            b'{"object": "page", "entry": [{"messaging": [{"message": {"text": "no mid"}}]}]}',
            "$.entry[0].messaging[0].message",
        ),
        (
            b'{"object": "page", "entry": [{"messaging": [{"timestamp": "yesterday", "message": {"mid": "m1"}}]}]}',
            "$.entry[0].messaging[0].timestamp",
        ),
        (
            b'{"object": "page", "entry": [{"messaging": [{"message": {"mid": "m1"}}]}]}',
            "$.entry[0].messaging[0].timestamp",
        ),
        (b'{"object": "instagram", "entry": []}', "$.object"),
        # Times that are numbers but no moment: the path names the field, not the body.
        (
            b'{"object": "page", "entry": [{"messaging": [{"timestamp": "1e999", "message": {"mid": "m1"}}]}]}',
            "$.entry[0].messaging[0].timestamp",
        ),
        (
            b'{"object": "page", "entry": [{"messaging": [{"timestamp": "NaN", "message": {"mid": "m1"}}]}]}',
            "$.entry[0].messaging[0].timestamp",
        ),
        (
            b'{"object": "page", "entry": [{"messaging": [{"timestamp": 1'
            + b"0" * 400
            + b', "message": {"mid": "m1"}}]}]}',
            "$.entry[0].messaging[0].timestamp",
        ),
        (
            b'{"object": "page", "entry": [{"time": "-1e20", "messaging": [{"message": {"mid": "m1"}}]}]}',
            "$.entry[0].time",
        ),
        (
            b'{"object": "page", "entry": [{"time": "1e999", "changes": [{"field": "feed", "value": {}}]}]}',
            "$.entry[0].time",
        ),
    ],
)
def test_undecodable_input_names_the_json_path(body: bytes, path: str) -> None:
    with pytest.raises(DecodeError) as caught:
        messenger.decode(HttpRequest(body=body), CTX)
    assert caught.value.path == path


# ---------------------------------------------------------------------------------- Instagram decode


def test_instagram_quick_reply_doc_sample() -> None:
    message = only_message(instagram, "quick_reply.json")
    assert message.parts == [c.Action(id="<PAYLOAD>", title="<SOME_TEXT>")]
    assert message.conversation.channel == "instagram" and message.conversation.native_id == "<IGSID>"
    assert message.ts == ms(1502905976377)


def test_instagram_several_images_in_one_message() -> None:
    message = only_message(instagram, "images.json")
    assert [part.url for part in message.parts if isinstance(part, c.Media) and part.media == "image"] == [
        "https://lookaside.fbsbx.com/ig_messaging_cdn/?asset_id=1",
        "https://lookaside.fbsbx.com/ig_messaging_cdn/?asset_id=2",
    ]


@pytest.mark.parametrize(("name", "kind"), [("story_mention.json", "story_mention"), ("reel_share.json", "ig_reel")])
def test_instagram_shares_are_kept_whole(name: str, kind: str) -> None:
    (part,) = only_message(instagram, name).parts
    assert isinstance(part, c.Unsupported) and part.native["type"] == kind and part.native["payload"]["url"]


def test_instagram_story_reply_keeps_the_story_and_has_no_message_reply() -> None:
    message = only_message(instagram, "story_reply.json")
    assert message.parts == [c.Text(text="Love this!")]
    assert message.reply_to == ""
    assert message.meta["instagram.reply_to"]["story"]["id"] == "17887498072083521"


def test_instagram_reply_to_a_message() -> None:
    assert only_message(instagram, "reply_to_message.json").reply_to == mid("aWdfZAG1faWQ6ourQuestion")


def test_instagram_unsend_is_a_delete_of_the_original() -> None:
    message = only_message(instagram, "unsend.json")
    assert message.parts == [c.Delete(target=mid("aWdfZAG1faWQ6toDelete"))]
    assert message.id != mid("aWdfZAG1faWQ6toDelete")
    assert message.native == c.Native(id="aWdfZAG1faWQ6toDelete", seq=41)


def test_instagram_unsupported_message_is_kept() -> None:
    (part,) = only_message(instagram, "unsupported.json").parts
    assert isinstance(part, c.Unsupported) and part.native["is_unsupported"] is True


def test_instagram_echo_is_outbound_from_the_account() -> None:
    message = only_message(instagram, "echo.json")
    assert message.direction == "outbound" and message.meta == {"instagram.echo": True}
    assert message.sender == c.Sender(id=user(IGID), native_id=IGID, role="bot")
    assert message.conversation.native_id == IGSID


def test_instagram_seen_is_a_read_status_of_that_message() -> None:
    status = only(instagram, "seen.json")
    assert isinstance(status, c.Status)
    assert (status.native_id, status.state, status.message_id) == ("aWdfZAG1faWQ6ourEcho", "read", "")
    assert status.id == c.stable_id("status", TENANT, CONNECTION, "aWdfZAG1faWQ6ourEcho", "read")


def test_instagram_reaction_postback_and_referral() -> None:
    reaction = only_message(instagram, "reaction.json")
    postback = only_message(instagram, "postback.json")
    referral = only(instagram, "referral_igme.json")
    assert reaction.parts == [c.Reaction(emoji="\u2764\ufe0f", target=mid("aWdfZAG1faWQ6ourEcho"))]
    assert postback.parts == [
        c.Action(id="HUMAN_AGENT", title="Talk to a representative", source=mid("aWdfZAG1faWQ6postbackClick"))
    ]
    assert isinstance(referral, c.Activity) and referral.detail["referral"]["source"] == "IGME-SOURCE-LINK"


def test_instagram_comment_change_is_kept_on_the_accounts_own_conversation() -> None:
    message = only_message(instagram, "comments_change.json")
    assert message.conversation.native_id == IGID and message.conversation.type == "channel"
    (part,) = message.parts
    assert isinstance(part, c.Unsupported) and part.native["value"]["text"] == "Where can I buy this?"


def test_a_page_payload_is_refused_on_an_instagram_connection() -> None:
    with pytest.raises(DecodeError) as caught:
        decode(instagram, "../messenger/echo_text.json")
    assert caught.value.path == "$.object"


# ---------------------------------------------------------------------------------- corpus sweep


@pytest.mark.parametrize("codec", [messenger, instagram], ids=["messenger", "instagram"])
def test_every_corpus_payload_decodes_or_raises_decode_error(codec: MessengerCodec) -> None:
    folder = CORPUS / codec.channel
    if not folder.is_dir():
        pytest.skip(f"no corpus at {folder}")
    files = corpus_files(folder)
    assert files
    decoded = 0
    for path in files:
        try:
            envelopes = codec.decode(HttpRequest(body=path.read_bytes()), CTX)
        except DecodeError:
            continue  # doc fragments (a lone messaging item, field/value) are not webhook bodies
        assert envelopes, path.name
        for envelope in envelopes:
            assert c.decode(c.encode(envelope)) == envelope, path.name
        decoded += 1
    assert decoded  # the full-envelope samples do decode


# ---------------------------------------------------------------------------------- signature & handshake


def signed(body: bytes, secret: str = APP_SECRET) -> HttpRequest:
    return meta_signed(body, secret)


SECRETS = {"app_secret": APP_SECRET, "verify_token": "s3cret-verify"}


def test_a_good_signature_verifies() -> None:
    messenger.verify(signed(fixture("messenger", "echo_text.json")), SECRETS)


def test_a_signature_over_another_body_is_refused() -> None:
    request = signed(fixture("messenger", "echo_text.json"))
    tampered = HttpRequest(body=request.body.replace(b"order", b"ORDER"), headers=request.headers)
    with pytest.raises(SignatureError):
        messenger.verify(tampered, SECRETS)


def test_a_missing_signature_is_refused() -> None:
    with pytest.raises(SignatureError):
        messenger.verify(HttpRequest(body=fixture("messenger", "echo_text.json")), SECRETS)
    with pytest.raises(SignatureError):
        messenger.verify(HttpRequest(body=b"{}", headers={"x-hub-signature-256": "sha1=abc"}), SECRETS)


@pytest.mark.parametrize(
    "header",
    ["sha256=\u00e9" + "0" * 63, "sha256=" + "\u00e9" * 64, "sha256=" + "z" * 64, "sha256=abc", "sha256=", "\u00e9=1"],
)
def test_a_malformed_or_non_ascii_signature_is_refused_as_a_signature_error(header: str) -> None:
    # hmac.compare_digest raises TypeError on non-ASCII str: the check must still answer SignatureError.
    request = HttpRequest(body=fixture("messenger", "echo_text.json"), headers={"x-hub-signature-256": header})
    with pytest.raises(SignatureError):
        messenger.verify(request, SECRETS)


def test_a_signature_in_upper_case_hex_verifies() -> None:
    request = signed(fixture("messenger", "echo_text.json"))
    upper = HttpRequest(
        body=request.body,
        headers={"x-hub-signature-256": request.headers["x-hub-signature-256"].upper().replace("SHA256=", "sha256=")},
    )
    messenger.verify(upper, SECRETS)


def test_a_stale_signature_from_a_rotated_app_secret_is_refused() -> None:
    # Meta's signature carries no timestamp; what goes stale is the secret it was made with.
    request = signed(fixture("messenger", "echo_text.json"), secret="the-app-secret-before-rotation")
    with pytest.raises(SignatureError):
        instagram.verify(request, SECRETS)


def test_without_an_app_secret_nothing_verifies() -> None:
    with pytest.raises(SignatureError):
        messenger.verify(signed(b"{}"), {"verify_token": "x"})


def handshake_request(token: str) -> HttpRequest:
    query = {"hub.mode": "subscribe", "hub.verify_token": token, "hub.challenge": "1158201444"}
    return HttpRequest(method="GET", query=query)


def test_handshake_echoes_the_challenge_for_the_right_token_only() -> None:
    assert messenger.handshake(handshake_request("s3cret-verify"), SECRETS) == HttpResponse(
        status=200, headers={"content-type": "text/plain"}, body=b"1158201444"
    )
    refused = messenger.handshake(handshake_request("guess"), SECRETS)
    assert refused is not None and refused.status == 403
    assert messenger.handshake(signed(b"{}"), SECRETS) is None  # an ordinary delivery


def test_dedup_key_follows_the_events_not_the_bytes() -> None:
    body = fixture_json("messenger", "batch_two_entries.json")
    key = messenger.dedup_key(HttpRequest(body=json.dumps(body).encode()))
    reformatted = messenger.dedup_key(HttpRequest(body=json.dumps(body, indent=4).encode()))
    body["entry"][0]["messaging"][0]["message"]["mid"] = "m_anotherMessage"
    other = messenger.dedup_key(HttpRequest(body=json.dumps(body).encode()))
    assert key and key == reformatted and key != other
    assert messenger.dedup_key(HttpRequest(body=b'{"object": "page"}')) == ""  # no events: the hub hashes the body


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (b"not json", "$"),
        (b"[1, 2]", "$"),
        (b'{"object": "page", "entry": 5}', "$.entry"),
        (b'{"object": "page", "entry": [5]}', "$.entry[0]"),
        (b'{"object": "page", "entry": [{"messaging": 5}]}', "$.entry[0].messaging"),
        (b'{"object": "page", "entry": [{"standby": [5]}]}', "$.entry[0].standby[0]"),
        (b'{"object": "page", "entry": [{"changes": {"field": "messages"}}]}', "$.entry[0].changes"),
        (b'{"object": "page", "entry": [{"changes": [{"field": [], "value": {}}]}]}', "$.entry[0].changes[0].field"),
        (
            b'{"object": "page", "entry": [{"messaging": [{"delivery": {"mids": 5, "watermark": 1}}]}]}',
            "$.entry[0].messaging[0].delivery.mids",
        ),
        (
            b'{"entry": [{"changes": [{"field": "messages", "value": {"delivery": {"mids": "m1"}}}]}]}',
            "$.entry[0].changes[0].value.delivery.mids",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "$"),
    ],
)
def test_dedup_key_of_a_broken_body_is_a_decode_error_naming_the_path(body: bytes, path: str) -> None:
    # These raised TypeError (RecursionError for deep nesting) before; the hub needs a DecodeError and a path.
    with pytest.raises(DecodeError) as caught:
        messenger.dedup_key(HttpRequest(body=body))
    assert caught.value.path == path


def test_dedup_keys_of_events_without_ids_still_tell_them_apart() -> None:
    body = fixture_json("instagram", "comments_change.json")
    first = instagram.dedup_key(HttpRequest(body=json.dumps(body).encode()))
    body["entry"][0]["changes"][0]["value"]["id"] = "17865799348089040"
    second = instagram.dedup_key(HttpRequest(body=json.dumps(body).encode()))
    assert first and second and first != second


# ---------------------------------------------------------------------------------- encode


def encode_ctx(api_base: str = "", **options: Any) -> EncodeContext:
    return EncodeContext(
        tenant=TENANT,
        connection=CONNECTION,
        to=PSID,
        api_base=api_base,
        secrets={"page_access_token": "EAAGm0PX4ZCpsBA", "access_token": "IGQVJ-token"},
        options={"page_id": PAGE, **options},
        native_ids={
            "can-question": "m_1457764197618:41d102a3e1ae206a38",
        },
    )


def outbound(*parts: c.Part, **fields: Any) -> c.Message:
    conversation = c.Conversation(id="conv", channel="messenger", connection=CONNECTION, native_id=PSID)
    return outbound_message(TENANT, conversation, parts, id="out1", **fields)


def call_of(request: OutboundRequest) -> Any:
    """The Send API call a request makes: its JSON body, or its multipart form fields (JSON-decoded)."""
    content_type = request.headers["content-type"]
    if not content_type.startswith("multipart/form-data"):
        return json.loads(request.body)
    form = BytesParser(policy=policy.HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + request.body)
    fields: dict[str, Any] = {}
    for field in form.iter_parts():
        name, value = field.get_param("name", header="content-disposition"), field.get_payload(decode=True)
        assert isinstance(name, str) and isinstance(value, bytes)
        fields[name] = value if name == "filedata" else json.loads(value) if value[:1] in b"{[" else value.decode()
    return fields


def bodies(requests: list[OutboundRequest]) -> list[Any]:
    return [call_of(request) for request in requests]


def test_text_then_reply_buttons_is_one_message_with_quick_replies() -> None:
    message = outbound(
        c.Text(text="Pick a color:"),
        c.Buttons(buttons=[c.Button(id="COLOR_RED", title="Red"), c.Button(id="COLOR_GREEN", title="Green")]),
    )
    (request,) = messenger.encode(message, encode_ctx())
    assert request.method == "POST"
    assert request.url == f"https://graph.facebook.com/v23.0/{PAGE}/messages"
    assert request.headers == {"content-type": "application/json", "authorization": "Bearer EAAGm0PX4ZCpsBA"}
    assert request.idempotency_key == "out1:0" and request.message_id == "out1"
    assert json.loads(request.body) == fixture_json("messenger", "request_quick_replies.json")


def test_link_postback_and_call_buttons_are_a_button_template() -> None:
    message = outbound(
        c.Text(text="What do you want to do next?"),
        c.Buttons(
            buttons=[
                c.Button(id="site", title="Show Website", action="url", value="https://petersapparel.parseapp.com"),
                c.Button(id="chat", title="Start Chatting", action="postback", value="USER_DEFINED_PAYLOAD"),
                c.Button(id="call", title="Call us", action="call", value="+15105551234"),
            ]
        ),
    )
    assert bodies(messenger.encode(message, encode_ctx())) == [
        fixture_json("messenger", "request_button_template.json")
    ]


def test_more_than_three_template_buttons_continue_in_a_second_template_with_the_quick_replies() -> None:
    links = [c.Button(id=f"b{n}", title=f"Link {n}", action="url", value=f"https://example.com/{n}") for n in range(4)]
    message = outbound(c.Buttons(text="Our shops", buttons=[*links, c.Button(id="none", title="None of these")]))
    first, second = bodies(messenger.encode(message, encode_ctx()))
    assert first["message"]["attachment"]["payload"]["text"] == "Our shops"
    assert len(first["message"]["attachment"]["payload"]["buttons"]) == 3
    assert second["message"]["attachment"]["payload"]["text"] == "\u2026"
    assert second["message"]["attachment"]["payload"]["buttons"][0]["url"] == "https://example.com/3"
    assert second["message"]["quick_replies"] == [{"content_type": "text", "title": "None of these", "payload": "none"}]


def test_cards_are_a_generic_template() -> None:
    def shirt(number: int, name: str, color: str, buttons: list[c.Button]) -> c.Card:
        image = c.Media(media="image", url=f"http://petersapparel.parseapp.com/img/item{number}-thumb.png")
        return c.Card(
            title=f"Classic {name} T-Shirt",
            subtitle=f"Soft {color} cotton t-shirt is back in style",
            media=image,
            buttons=buttons,
        )

    view = "https://petersapparel.parseapp.com/view_item?item_id="
    carousel = c.Carousel(
        cards=[
            shirt(
                100,
                "White",
                "white",
                [
                    c.Button(id="v100", title="View Item", action="url", value=f"{view}100"),
                    c.Button(id="USER_DEFINED_PAYLOAD_FOR_ITEM100", title="Bookmark Item", action="postback"),
                ],
            ),
            shirt(101, "Grey", "gray", [c.Button(id="v101", title="View Item", action="url", value=f"{view}101")]),
        ]
    )
    assert bodies(messenger.encode(outbound(carousel), encode_ctx())) == [
        fixture_json("messenger", "request_generic_template.json")
    ]


def test_media_by_url_then_its_caption_as_text_and_by_attachment_id() -> None:
    image = c.Media(media="image", url="https://petersapparel.com/img/shirt.png", caption="Our shirt")
    video = c.Media(media="video", file_id="1857777774821032")
    image_call, caption_call, video_call = bodies(messenger.encode(outbound(image, video), encode_ctx()))
    assert image_call == fixture_json("messenger", "request_image.json")
    assert caption_call["message"] == {"text": "Our shirt"}
    assert video_call["message"] == {"attachment": {"type": "video", "payload": {"attachment_id": "1857777774821032"}}}


def test_inline_bytes_are_uploaded_as_filedata_on_messenger_only() -> None:
    vcard = c.Media(
        media="document", data=b"BEGIN:VCARD\r\nFN:Ada\r\nEND:VCARD\r\n", mime="text/vcard", filename="Ada.vcf"
    )
    message = outbound(vcard, reply_to="can-question")
    (request,) = messenger.encode(message, encode_ctx())
    assert request.headers["content-type"].startswith("multipart/form-data; boundary=babelhub-")
    assert call_of(request) == {
        "recipient": {"id": PSID},
        "messaging_type": "RESPONSE",
        "message": {"attachment": {"type": "file", "payload": {"is_reusable": True}}},
        "reply_to": {"mid": "m_1457764197618:41d102a3e1ae206a38"},
        "filedata": b"BEGIN:VCARD\r\nFN:Ada\r\nEND:VCARD\r\n",
    }
    assert messenger.encode(message, encode_ctx())[0].body == request.body  # a retry sends the same bytes
    with pytest.raises(EncodeError, match="url"):
        instagram.encode(outbound(c.Media(media="image", data=b"\x89PNG")), encode_ctx())


def test_upload_filename_cannot_inject_part_headers() -> None:
    # The filename goes into the part's Content-Disposition: CR/LF or a quote would end it early.
    evil = 'x.png"\r\nContent-Type: text/html\r\n\r\n<script>'
    image = c.Media(media="image", data=b"\x89PNG", mime="image/png", filename=evil)
    (request,) = messenger.encode(outbound(image), encode_ctx())
    assert b"\r\nContent-Type: text/html" not in request.body
    content_type = request.headers["content-type"]
    form = BytesParser(policy=policy.HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + request.body)
    filedata = [
        part for part in form.iter_parts() if part.get_param("name", header="content-disposition") == "filedata"
    ]
    assert len(filedata) == 1 and filedata[0].get_content_type() == "image/png"
    assert filedata[0].get_filename() == "x.pngContent-Type: text/html<script>"
    assert filedata[0].get_payload(decode=True) == b"\x89PNG"


def test_upload_media_type_with_a_line_break_is_an_encode_error() -> None:
    image = c.Media(media="image", data=b"\x89PNG", mime="image/png\r\nX-Injected: 1", filename="x.png")
    with pytest.raises(EncodeError, match="media type"):
        messenger.encode(outbound(image), encode_ctx())


def test_a_card_image_by_attachment_id_alone_is_a_media_template() -> None:
    # The generic template shows images by URL only: the attachment id must not vanish silently.
    card = c.Card(
        media=c.Media(media="image", file_id="1857777774821032"),
        buttons=[
            c.Button(id="shop", title="Shop", action="url", value="https://example.com/shop"),
            c.Button(id="more", title="More", action="postback"),
        ],
    )
    template, rest = bodies(messenger.encode(outbound(card), encode_ctx()))
    assert template["message"] == {
        "attachment": {
            "type": "template",
            "payload": {
                "template_type": "media",
                "elements": [
                    {
                        "media_type": "image",
                        "attachment_id": "1857777774821032",
                        "buttons": [{"type": "web_url", "url": "https://example.com/shop", "title": "Shop"}],
                    }
                ],
            },
        }
    }
    assert rest["message"]["attachment"]["payload"]["buttons"] == [
        {"type": "postback", "title": "More", "payload": "more"}
    ]


@pytest.mark.parametrize(
    ("codec", "part"),
    [
        (messenger, c.Card(title="Shirt", media=c.Media(media="image", file_id="1857777774821032"))),
        (
            messenger,
            c.Carousel(cards=[c.Card(title="A"), c.Card(title="B", media=c.Media(media="image", file_id="18"))]),
        ),
        (messenger, c.Card(title="Shirt", media=c.Media(media="image", data=b"\x89PNG"))),
        (messenger, c.Card(media=c.Media(media="document", file_id="18"))),
        (instagram, c.Card(media=c.Media(media="image", file_id="1857777774821032"))),
    ],
)
def test_card_media_without_a_url_that_no_template_takes_is_an_encode_error(
    codec: MessengerCodec, part: c.Part
) -> None:
    with pytest.raises(EncodeError, match="card"):
        codec.encode(outbound(part), encode_ctx())


def test_reply_to_and_reaction_use_the_native_ids() -> None:
    message = outbound(
        c.Text(text="Sure!"), c.Reaction(emoji="\U0001f60a", target="can-question"), reply_to="can-question"
    )
    text_call, react_call = bodies(messenger.encode(message, encode_ctx()))
    assert text_call["reply_to"] == {"mid": "m_1457764197618:41d102a3e1ae206a38"}
    assert react_call == fixture_json("messenger", "request_react.json")
    removed = outbound(c.Reaction(emoji="", target="can-question", removed=True))
    assert bodies(messenger.encode(removed, encode_ctx()))[0]["sender_action"] == "unreact"


def test_a_missing_native_id_or_token_is_a_clear_encode_error() -> None:
    with pytest.raises(EncodeError, match="replied-to"):
        messenger.encode(outbound(c.Text(text="hi"), reply_to="never-seen"), encode_ctx())
    without_token = EncodeContext(tenant=TENANT, connection=CONNECTION, to=PSID)
    with pytest.raises(EncodeError, match="page_access_token"):
        messenger.encode(outbound(c.Text(text="hi")), without_token)


def test_a_message_tag_sends_outside_the_window_and_me_is_the_default_account() -> None:
    message = outbound(c.Text(text="An agent will answer soon"), meta={"messenger.tag": "HUMAN_AGENT"})
    ctx = EncodeContext(tenant=TENANT, connection=CONNECTION, to=PSID, secrets={"page_access_token": "t"})
    (request,) = messenger.encode(message, ctx)
    assert request.url == "https://graph.facebook.com/v23.0/me/messages"
    assert json.loads(request.body)["messaging_type"] == "MESSAGE_TAG"
    assert json.loads(request.body)["tag"] == "HUMAN_AGENT"


def test_typing_and_mark_seen_are_sender_actions() -> None:
    conversation = c.Conversation(id="conv", native_id=PSID)
    typing = c.Activity(id="a1", tenant=TENANT, conversation=conversation, ts=c.now(), activity="typing")
    read = c.Activity(id="a2", tenant=TENANT, conversation=conversation, ts=c.now(), activity="read")
    assert bodies(messenger.encode_activity(typing, encode_ctx())) == [
        {"recipient": {"id": PSID}, "sender_action": "typing_on"}
    ]
    assert bodies(messenger.encode_activity(read, encode_ctx()))[0]["sender_action"] == "mark_seen"


def test_instagram_login_uses_graph_instagram_com_and_the_ig_account() -> None:
    message = outbound(
        c.Text(text="How can we help?"),
        c.Buttons(buttons=[c.Button(id="ORDER_STATUS", title="Order status"), c.Button(id="RETURNS", title="Returns")]),
    )
    ctx = EncodeContext(
        tenant=TENANT,
        connection=CONNECTION,
        to=IGSID,
        secrets={"access_token": "IGQVJ-token"},
        options={"ig_user_id": IGID},
    )
    (request,) = instagram.encode(message, ctx)
    assert request.url == f"https://graph.instagram.com/v23.0/{IGID}/messages"
    assert request.headers["authorization"] == "Bearer IGQVJ-token"
    assert json.loads(request.body) == fixture_json("instagram", "request_quick_replies.json")


def test_instagram_reacts_with_love_and_has_no_call_buttons() -> None:
    ctx = encode_ctx()
    (react,) = bodies(instagram.encode(outbound(c.Reaction(emoji="\U0001f44d", target="can-question")), ctx))
    assert react["payload"] == {"message_id": "m_1457764197618:41d102a3e1ae206a38", "reaction": "love"}
    call = c.Buttons(text="Call?", buttons=[c.Button(id="c", title="Call", action="call", value="+1555")])
    with pytest.raises(EncodeError, match="call"):
        instagram.encode(outbound(call), ctx)


def test_instagram_leaves_out_reply_to_which_it_does_not_declare() -> None:
    message = outbound(c.Text(text="Sure!"), reply_to="can-question")
    (body,) = bodies(instagram.encode(message, encode_ctx()))
    assert "reply_to" not in body and body["message"] == {"text": "Sure!"}


def test_reply_buttons_alone_ride_on_the_previous_attachment_or_on_a_filler_text() -> None:
    choice = c.Buttons(buttons=[c.Button(id="yes", title="Yes")])
    image = c.Media(media="image", url="https://example.com/a.png")
    with_image = bodies(messenger.encode(outbound(image, choice), encode_ctx()))
    assert len(with_image) == 1 and with_image[0]["message"]["quick_replies"][0]["payload"] == "yes"
    (alone,) = bodies(messenger.encode(outbound(choice), encode_ctx()))
    assert alone["message"]["text"] == "\u2026" and alone["message"]["quick_replies"][0]["title"] == "Yes"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=strategies.messages)
def test_any_degraded_message_encodes_within_the_send_api_limits(message: c.Message) -> None:
    for codec in (messenger, instagram):
        fitted = degrade(message, codec.capabilities)
        targets = {part.target for part in fitted.parts if isinstance(part, c.Reaction)} | {fitted.reply_to}
        ctx = msgspec.structs.replace(encode_ctx(), native_ids={target: f"m_{target}" for target in targets})
        for call in bodies(codec.encode(fitted, ctx)):
            body = call.get("message", {})
            assert len(body.get("text", "")) <= codec.capabilities.text_limit
            assert len(body.get("quick_replies", [])) <= 13
            payload = body.get("attachment", {}).get("payload", {})
            if payload.get("template_type") == "button":
                assert 1 <= len(payload["text"]) <= 640 and 1 <= len(payload["buttons"]) <= 3
            if payload.get("template_type") == "generic":
                assert 1 <= len(payload["elements"]) <= 10
                assert all(
                    len(element["title"]) <= 80 and len(element.get("buttons", [])) <= 3
                    for element in payload["elements"]
                )


def test_capabilities_differ_where_the_platforms_do() -> None:
    assert messenger.capabilities.text_limit == 2000 and instagram.capabilities.text_limit == 1000
    assert "call" in messenger.capabilities.button_actions
    assert "call" not in instagram.capabilities.button_actions
    assert "sticker" not in instagram.capabilities.media
    assert messenger.capabilities.window_hours == instagram.capabilities.window_hours == 24


# ---------------------------------------------------------------------------------- answers


def answer(status: int, name: str, headers: dict[str, str] | None = None) -> HttpResponse:
    return response(status, fixture("messenger", name), headers)


def test_parse_response_maps_success_and_documented_errors() -> None:
    request = OutboundRequest(method="POST", url="https://graph.facebook.com/v23.0/me/messages")
    ok = messenger.parse_response(request, answer(200, "response_send_ok.json"))
    assert ok.ok and ok.native_ids == [fixture_json("messenger", "response_send_ok.json")["message_id"]]
    assert messenger.parse_response(request, answer(200, "response_sender_action_ok.json")).native_ids == []
    window = messenger.parse_response(request, answer(400, "error_outside_window.json"))
    assert not window.retryable and window.error is not None and window.error.code == "messenger_10_2018278"
    token = messenger.parse_response(request, answer(401, "error_invalid_token.json"))
    assert not token.retryable and token.error is not None and token.error.message == "Invalid OAuth access token."
    limited = messenger.parse_response(request, answer(400, "error_rate_limit.json", {"retry-after": "7"}))
    assert limited.retryable and limited.retry_after == 7.0
    temporary = messenger.parse_response(request, answer(500, "error_temporary.json"))
    assert temporary.retryable and temporary.error is not None and temporary.error.code == "messenger_1200"
    gateway = messenger.parse_response(request, HttpResponse(status=502, body=b"<html>Bad Gateway</html>"))
    assert gateway.retryable and gateway.error is not None and gateway.error.code == "http_502"


async def send(api: FakeApi, codec: MessengerCodec, message: c.Message) -> Any:
    (request,) = codec.encode(message, encode_ctx(api_base=api.base_url))
    return await deliver_one(codec, request, FAST)


async def test_deliver_sends_the_exact_request_and_reads_the_message_id(fake_api: FakeApi) -> None:
    fake_api.responder = lambda _: Reply(body=fixture_json("messenger", "response_send_ok.json"))
    result = await send(fake_api, messenger, outbound(c.Text(text="hello, world!")))
    assert result.ok and result.native_ids[0].startswith("AG5Hz2Uq7tuw")
    (recorded,) = fake_api.requests
    assert (recorded.method, recorded.path) == ("POST", f"/{PAGE}/messages")
    assert recorded.headers["authorization"] == "Bearer EAAGm0PX4ZCpsBA"
    assert recorded.json() == {
        "recipient": {"id": PSID},
        "messaging_type": "RESPONSE",
        "message": {"text": "hello, world!"},
    }


async def test_deliver_stops_at_a_400_outside_the_window(fake_api: FakeApi) -> None:
    fake_api.queue(Reply(status=400, body=fixture_json("messenger", "error_outside_window.json")))
    result = await send(fake_api, messenger, outbound(c.Text(text="late")))
    assert not result.ok and not result.retryable and len(fake_api.requests) == 1


async def test_deliver_stops_at_an_invalid_token(fake_api: FakeApi) -> None:
    fake_api.queue(Reply(status=401, body=fixture_json("messenger", "error_invalid_token.json")))
    result = await send(fake_api, messenger, outbound(c.Text(text="hi")))
    assert not result.ok and result.error is not None and result.error.code == "messenger_190_1234567"
    assert len(fake_api.requests) == 1


async def test_deliver_retries_a_429_after_retry_after_then_succeeds(fake_api: FakeApi) -> None:
    fake_api.queue(
        Reply(status=429, body=fixture_json("messenger", "error_rate_limit.json"), headers={"Retry-After": "0"})
    )
    fake_api.responder = lambda _: Reply(body=fixture_json("messenger", "response_send_ok.json"))
    result = await send(fake_api, messenger, outbound(c.Text(text="hi")))
    assert result.ok and len(fake_api.requests) == 2
    assert fake_api.requests[0].body == fake_api.requests[1].body


async def test_deliver_retries_5xx_and_instagram_rate_limits_then_succeeds(fake_api: FakeApi) -> None:
    fake_api.queue(
        Reply(status=503, body=b"upstream unavailable"),
        Reply(status=400, body=fixture_json("instagram", "error_rate_limit.json")),
    )
    fake_api.responder = lambda _: Reply(body={"recipient_id": IGSID, "message_id": "aWdfZAG1faWQ6sent"})
    result = await send(fake_api, instagram, outbound(c.Text(text="hi")))
    assert result.ok and result.native_ids == ["aWdfZAG1faWQ6sent"] and len(fake_api.requests) == 3


# ------------------------------------------------------------------- lenient parts, fuzzer regressions


def _with_message(channel: str, name: str, **changes: Any) -> bytes:
    body = fixture_json(channel, name)
    body["entry"][0]["messaging"][0]["message"].update(changes)
    return json.dumps(body).encode()


def test_a_reply_to_written_as_the_string_null_decodes() -> None:
    """Found by bench/fuzz_codecs.py: lax conversion reads "null" as no reply_to, and the raw string
    was then read as an object (AttributeError)."""
    body = _with_message("instagram", "reply_to_message.json", reply_to="null")
    (message,) = instagram.decode(HttpRequest(body=body), CTX)
    assert isinstance(message, c.Message) and message.parts == [c.Text(text="yes, that one")]
    assert not message.reply_to


def test_a_location_beyond_any_float_is_unsupported_and_the_message_arrives() -> None:
    """Found by bench/fuzz_codecs.py: float() of a 400-digit latitude raised OverflowError."""
    body = fixture_json("messenger", "message_location_legacy.json")
    attachment = body["entry"][0]["messaging"][0]["message"]["attachments"][0]
    attachment["payload"]["coordinates"]["lat"] = -(10**400)
    (message,) = messenger.decode(HttpRequest(body=json.dumps(body).encode()), CTX)
    assert isinstance(message, c.Message) and message.sender is not None
    (part,) = message.parts
    assert isinstance(part, c.Unsupported) and "OverflowError" in part.reason
    assert part.native == attachment
    assert c.decode(c.encode(message)) == message


def test_one_unreadable_attachment_keeps_the_text_and_the_other_attachments() -> None:
    broken = {"type": ["image"], "payload": {"url": "https://example.com/a.jpg"}}
    fine = {"type": "image", "payload": {"url": "https://example.com/b.jpg"}}
    body = _with_message("instagram", "reply_to_message.json", attachments=[broken, fine])
    (message,) = instagram.decode(HttpRequest(body=body), CTX)
    assert isinstance(message, c.Message)
    text, unreadable, image = message.parts
    assert text == c.Text(text="yes, that one")
    assert isinstance(unreadable, c.Unsupported) and unreadable.native == broken
    assert "$.entry[0].messaging[0].message.attachments[0].type" in unreadable.reason
    assert image == c.Media(media="image", url="https://example.com/b.jpg")
    assert message.reply_to


def test_an_unreadable_quick_reply_is_unsupported_and_its_text_still_arrives() -> None:
    body = _with_message("messenger", "message_text_quick_reply.json", quick_reply={"payload": ["not", "text"]})
    (message,) = messenger.decode(HttpRequest(body=body), CTX)
    assert isinstance(message, c.Message)
    unreadable, text = message.parts
    assert isinstance(unreadable, c.Unsupported) and "message.quick_reply.payload" in unreadable.reason
    assert isinstance(text, c.Text) and text.text


@pytest.mark.parametrize(("copies", "refused_at"), [(1000, None), (1001, "$.entry[0].messaging[1000]")])
def test_a_webhook_of_more_updates_than_meta_batches_is_refused(copies: int, refused_at: str | None) -> None:
    """Meta batches at most 1000 updates in one webhook: one more is refused at its path."""
    webhook = fixture_json("messenger", "message_reply_to.json")
    webhook["entry"][0]["messaging"] *= copies
    request = HttpRequest(body=json.dumps(webhook).encode())
    if refused_at is None:
        assert len(messenger.decode(request, CTX)) == 1000
        return
    with pytest.raises(DecodeError) as refused:
        messenger.decode(request, CTX)
    assert refused.value.path == refused_at and "at most 1000 updates" in refused.value.reason
