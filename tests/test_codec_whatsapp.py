"""WhatsApp Cloud API codec (and 360dialog): webhooks decoded from real payloads, signatures and the
subscription handshake, exact outbound requests, API answers, and sending through a local fake API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from babelhub import canonical
from babelhub.canonical import (
    Action,
    Activity,
    Button,
    Buttons,
    Contact,
    Conversation,
    Delete,
    Edit,
    Envelope,
    Form,
    List,
    ListRow,
    ListSection,
    Location,
    Media,
    Message,
    Native,
    Part,
    Poll,
    Product,
    Reaction,
    Status,
    Template,
    Text,
    Unsupported,
)
from babelhub.codecs import load
from babelhub.codecs.base import DecodeContext, EncodeContext, HttpRequest, HttpResponse, OutboundRequest
from babelhub.codecs.whatsapp import D360_API_BASE, META_API_BASE, WhatsAppCodec
from babelhub.errors import DecodeError, EncodeError, SignatureError
from babelhub.services.delivery import RetryPolicy
from tests import codeckit
from tests.codeckit import (
    Fixtures,
    Ids,
    corpus_files,
    deliver_one,
    json_bodies,
    meta_signed,
    outbound_message,
    response,
    round_trips,
    utc,
)
from tests.fakeapi import FakeApi, Recorded, Reply

FIXTURES = Fixtures("whatsapp", suffix=".json")
CORPUS = codeckit.CORPUS / "whatsapp_cloud"

CODEC = WhatsAppCodec()
TENANT, CONNECTION = "acme", "wa-main"
CTX = DecodeContext(tenant=TENANT, connection=CONNECTION, seq=42)
PHONE_NUMBER_ID = "106540352242922"
USER = "16505551234"
APP_SECRET = "app-secret-of-the-meta-app"
FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.02)


raw = FIXTURES.bytes
load_json = FIXTURES.json


def decode(name: str) -> list[Envelope]:
    return CODEC.decode(HttpRequest(body=raw(name), received_at=1_750_000_000.0), CTX)


def message(name: str) -> Message:
    (envelope,) = decode(name)
    assert isinstance(envelope, Message)
    return envelope


mid = Ids(TENANT, CONNECTION).message
at = utc


# ------------------------------------------------------------------------------ inbound messages


def test_text_message_header_and_sender() -> None:
    msg = message("text")
    wamid = "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA="
    assert msg.parts == [Text(text="Does it come in another color?")]
    assert msg.id == mid(wamid)
    assert msg.native == Native(id=wamid, seq=42)
    assert msg.direction == "inbound"
    assert msg.ts == at(1749416383)
    assert msg.conversation == Conversation(
        id=canonical.conversation_id(TENANT, CONNECTION, USER),
        channel="whatsapp",
        connection=CONNECTION,
        native_id=USER,
        type="direct",
    )
    assert msg.sender is not None
    assert msg.sender.id == canonical.sender_id(TENANT, CONNECTION, USER)
    assert (msg.sender.native_id, msg.sender.name, msg.sender.handle, msg.sender.role) == (
        USER,
        "Sheena Nelson",
        "+16505551234",
        "user",
    )
    assert msg.reply_to == ""


def test_replay_yields_the_same_ids() -> None:
    assert [e.id for e in decode("batch")] == [e.id for e in decode("batch")]


def test_reply_context_becomes_reply_to() -> None:
    msg = message("text_reply")
    assert msg.reply_to == mid("wamid.xyzxyz==")
    assert msg.meta["whatsapp.context"] == {"from": "972123456789", "id": "wamid.xyzxyz=="}


def test_forwarded_flag_and_ad_referral_are_kept_in_meta() -> None:
    assert message("text_forwarded").meta["whatsapp.context"] == {"forwarded": True}
    ad = message("text_from_ad")
    assert ad.parts == [Text(text="Hello! Can I get more info on this?")]
    assert ad.meta["whatsapp.referral"]["source_id"] == "120226305854810726"
    assert ad.meta["whatsapp.referral"]["welcome_message"] == {"text": "Hi there! Let us know how we can help!"}


def test_image_with_caption_keeps_its_hash() -> None:
    msg = message("image")
    assert msg.parts == [
        Media(media="image", file_id="1003383421387256", mime="image/jpeg", caption="Taj Mahal"),
    ]
    assert msg.meta["whatsapp.image"] == {"sha256": "SfInY0gGKTsJlUWbwxC1k+FAD0FZHvzwfpvO0zX0GUI="}


def test_media_url_from_the_webhook_is_kept() -> None:
    (part,) = message("image_with_url").parts
    assert isinstance(part, Media)
    assert part.url.startswith("https://lookaside.fbsbx.com/whatsapp_business/attachments/")
    assert part.file_id == "65463453"


@pytest.mark.parametrize(("name", "kind"), [("voice", "voice"), ("audio", "audio")])
def test_audio_is_voice_only_when_recorded_as_a_voice_note(name: str, kind: str) -> None:
    (part,) = message(name).parts
    assert isinstance(part, Media)
    assert (part.media, part.mime, part.file_id) == (kind, "audio/ogg; codecs=opus", "1234567890987654321")


def test_video_document_and_sticker() -> None:
    assert message("video").parts == [
        Media(media="video", file_id="765756756", mime="video/mp4", caption="caption"),
    ]
    assert message("document").parts == [
        Media(
            media="document",
            file_id="1234567890987654321",
            mime="application/pdf",
            caption="caption",
            filename="filename.pdf",
        )
    ]
    sticker = message("sticker_animated")
    assert sticker.parts == [Media(media="sticker", file_id="1234567890987654321", mime="image/webp")]
    assert sticker.meta["whatsapp.sticker"]["animated"] is True


def test_location() -> None:
    assert message("location").parts == [
        Location(
            lat=37.44221496582,
            lon=-122.16165924072,
            name="Philz Coffee",
            address="101 Forest Ave, Palo Alto, CA 94301",
            url="https://philzcoffee.com/",
        )
    ]


def test_shared_contact_keeps_phone_types_in_meta() -> None:
    msg = message("contacts")
    assert msg.parts == [Contact(name="Lucía Gómez", phones=["+1 (983) 555-2319"], org="Google")]
    assert msg.meta["whatsapp.contacts"][0]["phones"][0] == {
        "phone": "+1 (983) 555-2319",
        "wa_id": "19835552319",
        "type": "MOBILE",
    }


def test_reply_button_tap_is_an_action_on_the_message_that_had_the_button() -> None:
    msg = message("button_reply")
    source = mid("wamid.HBgLMTY1MDM4Nzk0MzkVAgARGBI3MEM2RUJFNkI0RENGQTVDRjUA")
    assert msg.parts == [Action(id="cancel-button", title="Cancel", source=source)]
    assert msg.reply_to == source


def test_list_row_choice_keeps_the_row_description() -> None:
    msg = message("list_reply")
    source = mid("wamid.HBgLMTY1MDM4Nzk0MzkVAgARGBJGMzEyNzhENTZDMzNGODlDRDgA")
    assert msg.parts == [Action(id="priority_express", title="Priority Mail Express", source=source)]
    assert msg.meta["whatsapp.list_reply"] == {"description": "Next Day to 2 Days"}


def test_template_quick_reply_is_an_action_with_its_payload() -> None:
    source = mid("wamid.HBgLMTY1MDM4Nzk0MzkVAgARGBJFNjk2OTMwNEZCQjhGMzUyQUYA")
    assert message("template_quick_reply").parts == [Action(id="Unsubscribe", title="Unsubscribe", source=source)]


def test_completed_flow_is_a_form_with_its_answers() -> None:
    msg = message("flow_completion")
    (form,) = msg.parts
    assert isinstance(form, Form)
    assert form.id == "AQAAAAACS5FpgQ_cAAAAAD0QI3s."  # the flow_token the business sent the flow with
    assert {field.id: field.value for field in form.fields} == {
        "comment_text": "Comment Text",
        "delivery_rating": "4",
        "purchase_rating": "2",
        "recommend_radio": "0",
        "cs_rating": "0",
    }
    assert msg.meta["whatsapp.nfm_reply"] == {"body": "Sent", "name": "flow"}


def test_inbound_reaction_and_its_removal() -> None:
    target = mid("wamid.HBgLMTY1MDM4Nzk0MzkVAgARGBI0RTJEOTc2ODVERUY5RDlGNkYA")
    assert message("reaction").parts == [Reaction(emoji="👍", target=target)]
    assert message("unreaction").parts == [Reaction(emoji="", target=mid("wamid.yzxyzx="), removed=True)]


def test_order_lists_products_with_prices() -> None:
    (order,) = message("order").parts
    assert isinstance(order, Product)
    assert order.catalog_id == "194836987003835"
    assert [(i.product_id, i.quantity, i.price, i.currency) for i in order.items] == [
        ("di9ozbzfi4", 2, 30.0, "USD"),
        ("nqryix03ez", 1, 25.0, "USD"),
    ]


def test_system_message_comes_from_the_system() -> None:
    msg = message("system_number_change")
    assert msg.parts == [Text(text="User Sheena Nelson changed from 16505551234 to 12195555358")]
    assert msg.sender is not None and msg.sender.role == "system"
    assert msg.meta["whatsapp.system"] == {"wa_id": "12195555358", "type": "user_changed_number"}


def test_unsupported_message_is_kept_verbatim() -> None:
    (part,) = message("unsupported").parts
    assert isinstance(part, Unsupported)
    assert part.reason == "Message type unknown: Message type is currently not supported."
    assert part.native == load_json("unsupported")["entry"][0]["changes"][0]["value"]["messages"][0]


def test_interactive_without_content_keeps_the_webhook_error() -> None:
    msg = message("interactive_with_error")
    (part,) = msg.parts
    assert isinstance(part, Unsupported)
    assert msg.meta["whatsapp.change_errors"][0]["code"] == 131000


def test_edit_and_revoke_point_at_the_original_message() -> None:
    edited = message("edited_image")
    original = mid("wamid.HBgLMTQxMjU1NTA4MjkVAgASGBQzQUNCNjk5RDUwNUZGMUZEM0VBRAA=")
    assert edited.parts[0] == Edit(target=original)
    assert isinstance(edited.parts[1], Media) and edited.parts[1].caption == "Updated image caption"
    assert message("revoke").parts == [Delete(target=mid("<ORIGINAL_WHATSAPP_MESSAGE_ID>"))]


def test_echo_from_the_business_app_is_an_outbound_agent_message() -> None:
    msg = message("echo_text")
    assert msg.direction == "outbound"
    assert msg.parts == [Text(text="Test message")]
    assert msg.sender is not None and msg.sender.role == "agent"
    assert msg.conversation.native_id == "<WHATSAPP_USER_PHONE_NUMBER>"


def test_group_message_lives_in_the_group_conversation() -> None:
    msg = message("group_text")
    group = "Y2FwaV9ncm91cDoxODA1NTU1MDE3MjoxMjAzNjMyMjI3NzE5NjMwNjcZD"
    assert msg.conversation.native_id == group
    assert msg.conversation.type == "group"
    assert msg.sender is not None and msg.sender.native_id == USER


def test_one_post_with_several_entries_gives_several_envelopes_in_order() -> None:
    envelopes = decode("batch")
    assert [type(e) for e in envelopes] == [Message, Message, Status]
    first, second, third = envelopes
    assert isinstance(first, Message) and first.parts == [Text(text="Does it come in another color?")]
    assert isinstance(second, Message) and isinstance(second.parts[0], Reaction)
    assert isinstance(third, Status) and third.state == "delivered"
    assert len({e.id for e in envelopes}) == 3


def test_account_update_is_delivered_verbatim_as_a_system_message() -> None:
    msg = message("account_update")
    value = load_json("account_update")["entry"][0]["changes"][0]["value"]
    assert msg.parts == [Unsupported(reason="WhatsApp 'account_update' webhook", native=value)]
    assert msg.conversation.native_id == "102290129340398"
    assert msg.conversation.type == "channel"
    assert msg.sender is not None and msg.sender.role == "system"
    assert msg.ts == at(1641330498)
    assert msg.meta["whatsapp.field"] == "account_update"


def test_call_webhook_is_kept() -> None:
    (part,) = message("call_connect").parts
    assert isinstance(part, Unsupported)
    assert part.native["calls"][0]["event"] == "connect"


def test_marketing_preference_resume_is_an_opt_in() -> None:
    (activity,) = decode("preferences_resume")
    assert isinstance(activity, Activity)
    assert activity.activity == "opt_in"
    assert activity.conversation.native_id == USER
    assert activity.detail["value"] == "resume"
    assert activity.ts == at(1731705721)


# -------------------------------------------------------------------------------------- statuses


@pytest.mark.parametrize(
    ("name", "state", "ts"),
    [
        ("status_sent", "sent", 1698266945),
        ("status_delivered", "delivered", 1698266945),
        ("status_read", "read", 1689380458),
        ("status_played", "played", 1689380458),
    ],
)
def test_status(name: str, state: str, ts: int) -> None:
    (status,) = decode(name)
    assert isinstance(status, Status)
    assert status.state == state
    assert status.native_id == "wamid.xyzxyz"
    assert status.message_id == ""  # filled by the hub from its id map
    assert status.id == canonical.stable_id("status", TENANT, CONNECTION, "wamid.xyzxyz", state)
    assert status.ts == at(ts)
    assert status.conversation.native_id == "972987654321"
    assert status.error is None


def test_status_keeps_pricing_and_conversation_in_meta() -> None:
    (status,) = decode("status_sent")
    assert status.meta["whatsapp.pricing"] == {"billable": True, "pricing_model": "CBP", "category": "service"}
    assert status.meta["whatsapp.conversation"]["id"] == "7270432eae37498234f4444b35ffc5"


def test_failed_status_carries_the_error() -> None:
    (status,) = decode("status_failed")
    assert isinstance(status, Status) and status.error is not None
    assert status.state == "failed"
    assert status.error.code == "whatsapp_130472"
    assert status.error.retryable is False
    assert "part of an experiment" in status.error.message
    assert status.error.native["error_data"]["details"].startswith("Failed to send message")


def test_group_status_is_in_the_group_conversation() -> None:
    (status,) = decode("status_group")
    assert status.conversation.type == "group"
    assert status.conversation.native_id == "fowefinoewcnw"


def with_participant(participant: str) -> bytes:
    body = load_json("status_group")
    body["entry"][0]["changes"][0]["value"]["statuses"][0]["recipient_participant_id"] = participant
    return json.dumps(body).encode()


def test_group_receipts_of_different_members_are_different_deliveries() -> None:
    # The same message read by two members of a group: two receipts that differ only by the member.
    first, second = with_participant("16505550001"), with_participant("16505550002")
    assert CODEC.dedup_key(HttpRequest(body=first)) != CODEC.dedup_key(HttpRequest(body=second))
    (status_1,) = CODEC.decode(HttpRequest(body=first), CTX)
    (status_2,) = CODEC.decode(HttpRequest(body=second), CTX)
    assert isinstance(status_1, Status) and isinstance(status_2, Status)
    assert status_1.id != status_2.id
    assert status_1.meta["whatsapp.recipient_participant_id"] == "16505550001"
    # The same member's receipt retried is still the same delivery.
    again = with_participant("16505550001")
    assert CODEC.dedup_key(HttpRequest(body=first)) == CODEC.dedup_key(HttpRequest(body=again))
    assert [e.id for e in CODEC.decode(HttpRequest(body=first), CTX)] == [status_1.id]


# --------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("body", "path", "reason"),
    [
        (raw("malformed_timestamp"), "$.entry[0].changes[0].value.messages[0].timestamp", "int"),
        (b"{not json", "$", "JSON"),
        (b'{"object": "page", "entry": []}', "$.object", "whatsapp_business_account"),
        (b'{"object": "whatsapp_business_account", "entry": {}}', "$.entry", "array"),
    ],
)
def test_undecodable_input_names_the_path(body: bytes, path: str, reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        CODEC.decode(HttpRequest(body=body), CTX)
    assert caught.value.path == path
    assert reason in caught.value.reason


def test_an_unreadable_content_object_is_an_unsupported_part_and_the_message_still_arrives() -> None:
    (message,) = CODEC.decode(HttpRequest(body=raw("malformed_text")), CTX)
    assert isinstance(message, Message) and message.sender is not None
    assert message.sender.name == "Sheena Nelson"
    (part,) = message.parts
    assert isinstance(part, Unsupported)
    assert "$.entry[0].changes[0].value.messages[0].text" in part.reason and "`body`" in part.reason
    assert part.native == {"text": {"bdy": "typo"}}


@pytest.mark.parametrize(
    ("kind", "fragment", "where"),
    [
        ("location", {"latitude": "north", "longitude": 2.35}, "location.latitude"),
        ("location", {"latitude": "nan", "longitude": 2.35}, "location.latitude"),
        ("interactive", {"type": "nfm_reply", "nfm_reply": {"response_json": "[1, 2"}}, "response_json"),
        ("image", {"id": ["not", "an", "id"]}, "image.id"),
    ],
)
def test_one_unreadable_part_keeps_the_rest_of_the_message(kind: str, fragment: Any, where: str) -> None:
    def swap(body: Any) -> None:
        message = body["entry"][0]["changes"][0]["value"]["messages"][0]
        message.update({"type": kind, kind: fragment, "context": {"from": "15550001111", "id": "wamid.CTX"}})

    (message,) = CODEC.decode(HttpRequest(body=changed("text", swap)), CTX)
    assert isinstance(message, Message) and message.sender is not None and message.sender.native_id
    assert message.reply_to  # the rest of the message (here: what it answers) still arrives
    (part,) = message.parts
    assert isinstance(part, Unsupported) and where in part.reason
    assert canonical.decode(canonical.encode(message)) == message


def test_an_unreadable_reply_context_keeps_the_text() -> None:
    def break_context(body: Any) -> None:
        body["entry"][0]["changes"][0]["value"]["messages"][0]["context"] = {"id": ["wamid.X"]}

    (message,) = CODEC.decode(HttpRequest(body=changed("text", break_context)), CTX)
    assert isinstance(message, Message) and not message.reply_to
    text, context = message.parts
    assert isinstance(text, Text)
    assert isinstance(context, Unsupported) and context.native == {"context": {"id": ["wamid.X"]}}


def changed(name: str, edit: Any) -> bytes:
    """A fixture with `edit(body)` applied."""
    body = load_json(name)
    edit(body)
    return json.dumps(body).encode()


def first_value(body: Any) -> Any:
    return body["entry"][0]["changes"][0]["value"]


VALUE = "$.entry[0].changes[0].value"


@pytest.mark.parametrize(
    ("body", "path"),
    [
        # Times no calendar holds: from_unix's DecodeError names the field.
        (
            changed("text", lambda b: first_value(b)["messages"][0].update(timestamp="99999999999999999")),
            f"{VALUE}.messages[0].timestamp",
        ),
        (
            changed("status_sent", lambda b: first_value(b)["statuses"][0].update(timestamp=-(10**17))),
            f"{VALUE}.statuses[0].timestamp",
        ),
        (changed("account_update", lambda b: b["entry"][0].update(time=10**17)), "$.entry[0].time"),
    ],
)
def test_impossible_numbers_are_decode_errors_at_their_path(body: bytes, path: str) -> None:
    with pytest.raises(DecodeError) as caught:
        CODEC.decode(HttpRequest(body=body), CTX)
    assert caught.value.path == path


@pytest.mark.parametrize(
    ("body", "path"),
    [
        # Numbers JSON cannot carry, written as strings: the part is unreadable, the message is not.
        (
            changed("location", lambda b: first_value(b)["messages"][0]["location"].update(latitude="nan")),
            f"{VALUE}.messages[0].location.latitude",
        ),
        (
            changed("location", lambda b: first_value(b)["messages"][0]["location"].update(longitude="-inf")),
            f"{VALUE}.messages[0].location.longitude",
        ),
        (
            changed(
                "order", lambda b: first_value(b)["messages"][0]["order"]["product_items"][1].update(item_price="NaN")
            ),
            f"{VALUE}.messages[0].order.product_items[1].item_price",
        ),
    ],
)
def test_impossible_numbers_in_a_part_make_it_unsupported_at_their_path(body: bytes, path: str) -> None:
    (message,) = CODEC.decode(HttpRequest(body=body), CTX)
    assert isinstance(message, Message)
    (part,) = message.parts
    assert isinstance(part, Unsupported) and path in part.reason


def test_dedup_key_of_a_body_nested_too_deeply_is_empty() -> None:
    assert CODEC.dedup_key(HttpRequest(body=b"[" * 100_000 + b"]" * 100_000)) == ""


@pytest.mark.parametrize("path", corpus_files(CORPUS) or [None], ids=lambda p: p.name if p else "absent")
def test_corpus_payload_decodes_or_raises_decode_error(path: Path | None) -> None:
    if path is None:
        pytest.skip("shared corpus not present beside the checkout")
    try:
        envelopes = CODEC.decode(HttpRequest(body=path.read_bytes()), CTX)
    except DecodeError:
        return
    assert envelopes, "a webhook must never decode to nothing"
    for envelope in envelopes:
        assert canonical.decode(canonical.encode(envelope)) == envelope


# ------------------------------------------------------------------------ signatures, handshake


def signed(body: bytes, secret: str = APP_SECRET) -> HttpRequest:
    return meta_signed(body, secret)


def test_good_signature_verifies() -> None:
    CODEC.verify(signed(raw("text")), {"app_secret": APP_SECRET})


def test_bad_signature_is_refused() -> None:
    with pytest.raises(SignatureError):
        CODEC.verify(signed(raw("text"), secret="someone-else"), {"app_secret": APP_SECRET})


def test_missing_signature_is_refused() -> None:
    with pytest.raises(SignatureError, match="missing"):
        CODEC.verify(HttpRequest(body=raw("text")), {"app_secret": APP_SECRET})


def test_stale_signature_of_an_earlier_body_is_refused() -> None:
    # Meta's signature has no timestamp: a replayed signature only passes with the exact body it signed.
    earlier = signed(raw("text"))
    tampered = HttpRequest(body=raw("text").replace(b"another color", b"another price"), headers=earlier.headers)
    with pytest.raises(SignatureError):
        CODEC.verify(tampered, {"app_secret": APP_SECRET})


def test_signature_is_required_when_no_app_secret_is_configured() -> None:
    with pytest.raises(SignatureError, match="app_secret"):
        CODEC.verify(signed(raw("text")), {})


def test_360dialog_relays_unsigned_webhooks() -> None:
    CODEC.verify(HttpRequest(body=raw("text")), {"api_key": "d360-key", "provider": "360dialog"})
    CODEC.verify(HttpRequest(body=raw("text")), {"provider": "360Dialog"})


@pytest.mark.parametrize(
    "secrets",
    [
        {"api_key": "d360-key"},  # an API key alone does not make a connection 360dialog's
        {"api_key": "d360-key", "access_token": "EAAG-test"},
        {"api_key": "d360-key", "provider": "meta"},
    ],
)
def test_unsigned_webhooks_are_refused_unless_the_connection_is_360dialog(secrets: dict[str, str]) -> None:
    with pytest.raises(SignatureError, match="app_secret"):
        CODEC.verify(HttpRequest(body=raw("text")), secrets)


def test_360dialog_connection_with_an_app_secret_still_checks_the_signature() -> None:
    secrets = {"provider": "360dialog", "app_secret": APP_SECRET}
    CODEC.verify(signed(raw("text")), secrets)
    with pytest.raises(SignatureError, match="missing"):
        CODEC.verify(HttpRequest(body=raw("text")), secrets)


def subscribe(token: str, mode: str = "subscribe") -> HttpRequest:
    query = {"hub.mode": mode, "hub.verify_token": token, "hub.challenge": "1158201444"}
    return HttpRequest(method="GET", query=query)


def test_handshake_echoes_the_challenge() -> None:
    answer = CODEC.handshake(subscribe("meatpie"), {"verify_token": "meatpie"})
    assert answer is not None and (answer.status, answer.body) == (200, b"1158201444")


@pytest.mark.parametrize("secrets", [{"verify_token": "meatpie"}, {}])
def test_handshake_with_a_wrong_token_is_forbidden(secrets: dict[str, str]) -> None:
    answer = CODEC.handshake(subscribe("guess"), secrets)
    assert answer is not None and answer.status == 403


def test_handshake_for_another_mode_is_forbidden() -> None:
    answer = CODEC.handshake(subscribe("meatpie", mode="unsubscribe"), {"verify_token": "meatpie"})
    assert answer is not None and answer.status == 403


def test_deliveries_are_not_handshakes() -> None:
    assert CODEC.handshake(HttpRequest(body=raw("text")), {"verify_token": "meatpie"}) is None
    assert CODEC.handshake(HttpRequest(method="GET"), {"verify_token": "meatpie"}) is None


def test_dedup_key_names_every_message_and_status_state() -> None:
    key = CODEC.dedup_key(HttpRequest(body=raw("batch")))
    assert key == ",".join(
        sorted(
            [
                "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=",
                "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgB=",
                "wamid.xyzxyz:delivered",
            ]
        )
    )
    sent, delivered = (CODEC.dedup_key(HttpRequest(body=raw(n))) for n in ("status_sent", "status_delivered"))
    assert sent != delivered
    assert CODEC.dedup_key(HttpRequest(body=b"{not json")) == ""


# ------------------------------------------------------------------------------------ encoding


def outbound(*parts: Part, reply_to: str = "", group: bool = False) -> Message:
    conversation = Conversation(id="c1", channel="whatsapp", native_id=USER, type="group" if group else "direct")
    return outbound_message(TENANT, conversation, parts, id="01hzmsg", reply_to=reply_to)


def encode_ctx(**overrides: Any) -> EncodeContext:
    settings: dict[str, Any] = {
        "tenant": TENANT,
        "connection": CONNECTION,
        "to": USER,
        "secrets": {"access_token": "EAAG-test"},
        "options": {"phone_number_id": PHONE_NUMBER_ID},
    }
    return EncodeContext(**(settings | overrides))


META_HEADERS = {"Authorization": "Bearer EAAG-test", "Content-Type": "application/json"}


bodies = json_bodies


def test_text_request_is_exact() -> None:
    (request,) = CODEC.encode(outbound(Text(text="text-message-content")), encode_ctx())
    assert request.method == "POST"
    assert request.url == f"{META_API_BASE}/{PHONE_NUMBER_ID}/messages"
    assert request.headers == META_HEADERS
    assert json.loads(request.body) == load_json("send_text")
    assert (request.idempotency_key, request.message_id) == ("01hzmsg:0", "01hzmsg")


def test_link_preview_follows_links_unless_the_connection_says_otherwise() -> None:
    text = Text(text="Please visit https://youtu.be/hpltvTEiRrY.")
    assert bodies(CODEC.encode(outbound(text), encode_ctx())) == [load_json("send_text_with_preview_url")]
    no_preview = encode_ctx(options={"phone_number_id": PHONE_NUMBER_ID, "preview_url": False})
    (body,) = bodies(CODEC.encode(outbound(text), no_preview))
    assert body["text"]["preview_url"] is False


def test_reply_quotes_the_native_message() -> None:
    wamid = "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA="
    ctx = encode_ctx(native_ids={"canon-1": wamid})
    requests = CODEC.encode(outbound(Text(text="<TEXT_MSG_CONTENT>"), reply_to="canon-1"), ctx)
    assert bodies(requests) == [load_json("send_reply_to_text")]


def test_reply_to_an_unknown_message_is_an_encode_error() -> None:
    with pytest.raises(EncodeError, match="reply_to"):
        CODEC.encode(outbound(Text(text="hi"), reply_to="never-seen"), encode_ctx())


@pytest.mark.parametrize(
    ("part", "fixture"),
    [
        (Media(media="image", url="https://example.com/image.jpg"), "send_image_by_url"),
        (
            Media(
                media="document",
                file_id="1003383421387256",
                url="https://example.com/ignored-when-an-id-exists.pdf",
                caption="<DOCUMENT_CAPTION_TO_SEND>",
                filename="receipt.pdf",
            ),
            "send_document_by_id",
        ),
        (Media(media="voice", file_id="1234567890987654321", mime="audio/ogg"), "send_voice_by_id"),
        (
            Location(lat=37.758056, lon=-122.425332, name="META HQ", address="1 Hacker Way, Menlo Park, CA 94025"),
            "send_location",
        ),
        (
            Contact(
                name="John Smith",
                phones=["+1 (940) 555-1234"],
                emails=["test@fb.com"],
                org="WhatsApp",
                urls=["https://www.facebook.com"],
            ),
            "send_contact",
        ),
        (Template(name="hello_world", language="en_US"), "send_template_without_parameters"),
        (
            Template(name="intro_catalog_offer", language="en_US", params={"2": "400", "1": "100", "3": "3"}),
            "send_template_positional",
        ),
        (
            Template(
                name="order_confirmation",
                language="en_US",
                params={"customer_name": "Jessica", "order_number": "SKBUP2-4CPIG9"},
            ),
            "send_template_named",
        ),
        (
            Template(
                name="seasonal_sale",
                language="en_US",
                params={"header.sale_start_date": "December 1st", "customer_name": "Jessica",
                        "order_number": "SKBUP2-4CPIG9"},
            ),
            "send_template_header_named",
        ),
    ],
)
def test_single_part_requests_are_exact(part: Part, fixture: str) -> None:
    (request,) = CODEC.encode(outbound(part), encode_ctx())
    assert json.loads(request.body) == load_json(fixture)


def test_outbound_reaction_and_its_removal() -> None:
    ctx = encode_ctx(native_ids={"canon-1": "wamid.HBgLM..."})
    assert bodies(CODEC.encode(outbound(Reaction(emoji="😀", target="canon-1")), ctx)) == [load_json("send_reaction")]
    (removal,) = bodies(CODEC.encode(outbound(Reaction(emoji="😀", target="canon-1", removed=True)), ctx))
    assert removal["reaction"] == {"message_id": "wamid.HBgLM...", "emoji": ""}
    with pytest.raises(EncodeError, match="reaction target"):
        CODEC.encode(outbound(Reaction(emoji="😀", target="unknown")), encode_ctx())


def test_text_followed_by_reply_buttons_is_one_interactive_message() -> None:
    buttons = Buttons(
        buttons=[
            Button(id="<UNIQUE_BUTTON_ID_1>", title="<BUTTON_TITLE_1>"),
            Button(id="<UNIQUE_BUTTON_ID_2>", title="<BUTTON_TITLE_2>"),
        ]
    )
    requests = CODEC.encode(outbound(Text(text="<BUTTON_TEXT>"), buttons), encode_ctx())
    assert bodies(requests) == [load_json("send_reply_button")]


def test_list_request_is_exact() -> None:
    sections = [
        ListSection(
            title=f"<LIST_SECTION_{s}_TITLE>",
            rows=[
                ListRow(
                    id=f"<LIST_SECTION_{s}_ROW_{r}_ID>",
                    title=f"<SECTION_{s}_ROW_{r}_TITLE>",
                    description=f"<SECTION_{s}_ROW_{r}_DESC>",
                )
                for r in (1, 2)
            ],
        )
        for s in (1, 2)
    ]
    part = List(
        text="<BODY_TEXT>", button="<BUTTON_TEXT>", header="<HEADER_TEXT>", footer="<FOOTER_TEXT>", sections=sections
    )
    assert bodies(CODEC.encode(outbound(part), encode_ctx())) == [load_json("send_list")]


def test_a_single_url_button_is_a_cta_url_message() -> None:
    url = "https://www.luckyshrub.com?clickID=kqDGWd24Q5TRwoEQTICY7W1JKoXvaZOXWAS7h1P76s0R7Paec4"
    part = Buttons(
        text="Tap the button below to see available dates.",
        buttons=[Button(id="dates", title="See Dates", action="url", value=url)],
    )
    assert bodies(CODEC.encode(outbound(part), encode_ctx())) == [load_json("send_cta_url")]


def test_url_buttons_beside_reply_buttons_are_written_into_the_body() -> None:
    part = Buttons(
        text="Pick one",
        buttons=[
            Button(id="yes", title="Yes"),
            Button(id="site", title="Website", action="url", value="https://example.com"),
        ],
    )
    (body,) = bodies(CODEC.encode(outbound(part), encode_ctx()))
    assert body["interactive"]["type"] == "button"
    assert body["interactive"]["body"] == {"text": "Pick one\n\nWebsite: https://example.com"}
    assert body["interactive"]["action"]["buttons"] == [{"type": "reply", "reply": {"id": "yes", "title": "Yes"}}]


def test_text_shown_with_choices_is_declared_to_degradation() -> None:
    assert CODEC.capabilities.choice_text_limit == 1024


def interactive_texts(requests: list[OutboundRequest]) -> list[str]:
    return [b["interactive"]["body"]["text"] for b in bodies(requests) if b["type"] == "interactive"]


def test_link_lines_that_would_overflow_the_body_go_before_the_buttons() -> None:
    text = "x" * 1000  # fits the body on its own, not with the link written under it
    url = "https://example.com/" + "p" * 40
    part = Buttons(
        text=text, buttons=[Button(id="yes", title="Yes"), Button(id="site", title="Website", action="url", value=url)]
    )
    links, buttons = bodies(CODEC.encode(outbound(part), encode_ctx()))
    assert links["text"]["body"] == f"Website: {url}"
    assert buttons["interactive"]["body"] == {"text": text}
    assert buttons["interactive"]["action"]["buttons"] == [{"type": "reply", "reply": {"id": "yes", "title": "Yes"}}]


def test_held_text_with_link_lines_never_makes_a_body_over_the_limit() -> None:
    parts = (
        Text(text="y" * 1024),
        Buttons(buttons=[Button(id="a", title="A"), Button(id="w", title="Web", action="url", value="https://e.co")]),
    )
    requests = CODEC.encode(outbound(*parts), encode_ctx())
    assert [len(text) for text in interactive_texts(requests)] == [1024]
    assert [b["type"] for b in bodies(requests)] == ["text", "interactive"]


def test_own_text_longer_than_the_body_is_an_encode_error() -> None:
    for part in (
        Buttons(text="z" * 1025, buttons=[Button(id="a", title="A")]),
        List(text="z" * 1025, sections=[ListSection(rows=[ListRow(id="r", title="R")])]),
    ):
        with pytest.raises(EncodeError, match="1024"):
            CODEC.encode(outbound(part), encode_ctx())


def test_many_links_without_replies_stay_within_a_text_message() -> None:
    links = [Button(id=f"l{n}", title=f"Link {n}", action="url", value="https://e.co/" + "q" * 1500) for n in range(3)]
    requests = CODEC.encode(outbound(Buttons(text="Read more", buttons=links)), encode_ctx())
    texts = [b["text"]["body"] for b in bodies(requests)]
    assert len(texts) > 1
    assert all(len(text) <= 4096 for text in texts)
    assert "\n\n".join(texts) == "\n\n".join(["Read more", *(f"{b.title}: {b.value}" for b in links)])


def test_parts_become_calls_in_order_with_the_reply_quote_on_the_first() -> None:
    message_parts = (
        Text(text="Here is the receipt"),
        Media(media="document", url="https://example.com/r.pdf"),
        Text(text="Anything else?"),
    )
    ctx = encode_ctx(native_ids={"canon-1": "wamid.Q"})
    requests = CODEC.encode(outbound(*message_parts, reply_to="canon-1"), ctx)
    assert [b["type"] for b in bodies(requests)] == ["text", "document", "text"]
    assert [r.idempotency_key for r in requests] == ["01hzmsg:0", "01hzmsg:1", "01hzmsg:2"]
    assert ["context" in b for b in bodies(requests)] == [True, False, False]


def test_audio_caption_follows_as_text() -> None:
    requests = CODEC.encode(
        outbound(Media(media="audio", url="https://example.com/a.ogg", caption="listen")), encode_ctx()
    )
    assert [b["type"] for b in bodies(requests)] == ["audio", "text"]
    assert "caption" not in bodies(requests)[0]["audio"]


def test_group_conversation_is_addressed_as_a_group() -> None:
    (body,) = bodies(CODEC.encode(outbound(Text(text="hi all"), group=True), encode_ctx()))
    assert body["recipient_type"] == "group"


@pytest.mark.parametrize(
    ("parts", "complaint"),
    [
        ((Buttons(buttons=[Button(id="a", title="A")]),), "body text"),
        ((Media(media="image", data=b"\x89PNG"),), "url or an uploaded media id"),
        ((Media(media="image", url="https://example.com/big.png", size=6_000_000),), "limit"),
        ((Media(media="animation", url="https://example.com/a.gif"),), "animation"),
        ((Template(name="hello_world"),), "language"),
        ((Template(name="t", language="en", params={"1": "a", "name": "b"}),), "mixes"),
        ((Poll(question="?", options=["a", "b"]),), "Poll"),
        ((Buttons(text="Call us", buttons=[Button(id="c", title="Call", action="call", value="+1")]),), "call"),
    ],
)
def test_what_whatsapp_cannot_send_is_an_encode_error(parts: tuple[Part, ...], complaint: str) -> None:
    with pytest.raises(EncodeError, match=complaint):
        CODEC.encode(outbound(*parts), encode_ctx())


@pytest.mark.parametrize(
    ("secrets", "options", "missing"),
    [
        ({"access_token": "t"}, {}, "phone_number_id"),
        ({}, {"phone_number_id": PHONE_NUMBER_ID}, "access_token"),
        ({}, {"provider": "360dialog"}, "api_key"),
    ],
)
def test_missing_credentials_are_named(secrets: dict[str, str], options: dict[str, Any], missing: str) -> None:
    with pytest.raises(EncodeError, match=missing):
        CODEC.encode(outbound(Text(text="hi")), encode_ctx(secrets=secrets, options=options))


def test_360dialog_uses_its_base_url_path_and_api_key() -> None:
    ctx = encode_ctx(secrets={"api_key": "d360-key"}, options={"provider": "360dialog"})
    (request,) = CODEC.encode(outbound(Text(text="text-message-content")), ctx)
    assert request.url == f"{D360_API_BASE}/messages"
    assert request.headers == {"D360-API-KEY": "d360-key", "Content-Type": "application/json"}
    assert json.loads(request.body) == load_json("send_text")


# ------------------------------------------------------------------- read receipts and typing


def activity(kind: str, **fields: Any) -> Activity:
    conversation = Conversation(id="c1", channel="whatsapp", native_id=USER)
    return Activity(id="act1", tenant=TENANT, conversation=conversation, ts=canonical.now(), activity=kind, **fields)  # type: ignore[arg-type]


def test_typing_marks_the_message_read_and_shows_the_indicator() -> None:
    wamid = "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQUYzMjEzNDM2RTZGQ0MzMDJBRgA="
    (request,) = CODEC.encode_activity(activity("typing", detail={"native_id": wamid}), encode_ctx())
    assert request.url == f"{META_API_BASE}/{PHONE_NUMBER_ID}/messages"
    assert request.headers == META_HEADERS
    assert json.loads(request.body) == load_json("send_typing_indicator")


def test_read_receipt_by_canonical_id() -> None:
    wamid = "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQUYzMjEzNDM2RTZGQ0MzMDJBRgA="
    ctx = encode_ctx(native_ids={"canon-9": wamid})
    (request,) = CODEC.encode_activity(activity("read", detail={"message_id": "canon-9"}), ctx)
    assert json.loads(request.body) == load_json("send_read_receipt")


def test_typing_without_a_message_to_refer_to_is_an_encode_error() -> None:
    with pytest.raises(EncodeError, match="native_id"):
        CODEC.encode_activity(activity("typing"), encode_ctx())


def test_other_activities_send_nothing() -> None:
    assert CODEC.encode_activity(activity("presence"), encode_ctx()) == []


def test_auto_read_marks_inbound_messages_only_when_asked() -> None:
    inbound = message("text")
    assert CODEC.on_inbound(inbound, encode_ctx()) == []
    auto = encode_ctx(options={"phone_number_id": PHONE_NUMBER_ID, "auto_read": True})
    (request,) = CODEC.on_inbound(inbound, auto)
    assert json.loads(request.body) == {
        "messaging_product": "whatsapp",
        "status": "read",
        "message_id": "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=",
    }
    (status,) = decode("status_read")
    assert CODEC.on_inbound(status, auto) == []


# ------------------------------------------------------------------------------- API answers


def answer(status: int, name: str, headers: dict[str, str] | None = None) -> HttpResponse:
    return response(status, raw(name), headers)


def test_success_answer_gives_the_wamid() -> None:
    result = CODEC.parse_response(OutboundRequest(method="POST", url="u"), answer(200, "response_sent"))
    assert result.ok and result.native_ids == ["wamid.HBgLMTY1MDM4Nzk0MzkVAgARGBJCOTY3NDc0NDFDRUI3NTA0Q0UA"]
    receipt = CODEC.parse_response(OutboundRequest(method="POST", url="u"), answer(200, "response_success"))
    assert receipt.ok and receipt.native_ids == []


@pytest.mark.parametrize(
    ("status", "name", "code", "retryable", "words"),
    [
        (400, "error_131047_reengagement", "whatsapp_131047", False, "approved template"),
        (400, "error_131026_undeliverable", "whatsapp_131026", False, "undeliverable"),
        (400, "error_100_invalid_parameter", "whatsapp_100", False, "Parameter value is not valid"),
        (401, "error_190_token_expired", "whatsapp_190", False, "access token"),
        (403, "error_200_permission", "whatsapp_200", False, "permission"),
        (429, "error_4_app_rate_limit", "whatsapp_4", True, "rate limit"),
        (400, "error_130429_rate_limit", "whatsapp_130429", True, "throughput"),
        (500, "error_2_service_unavailable", "whatsapp_2", True, "temporarily"),
        (500, "error_131000_something_went_wrong", "whatsapp_131000", True, "went wrong"),
    ],
)
def test_error_answers_are_mapped(status: int, name: str, code: str, retryable: bool, words: str) -> None:
    result = CODEC.parse_response(OutboundRequest(method="POST", url="u"), answer(status, name))
    assert not result.ok and result.error is not None
    assert (result.error.code, result.retryable, result.error.retryable) == (code, retryable, retryable)
    assert words in result.error.message
    assert result.error.native == load_json(name)["error"]


def test_retry_after_header_is_honoured() -> None:
    result = CODEC.parse_response(
        OutboundRequest(method="POST", url="u"), answer(429, "error_130429_rate_limit", {"retry-after": "7"})
    )
    assert result.retryable and result.retry_after == 7.0


def test_answer_that_is_not_a_graph_error_falls_back_to_the_http_status() -> None:
    result = CODEC.parse_response(
        OutboundRequest(method="POST", url="u"), HttpResponse(status=502, body=b"Bad Gateway")
    )
    assert result.retryable and result.error is not None and result.error.code == "http_502"


# ------------------------------------------------------------------ sending to a local fake API


def fake_ctx(api: FakeApi, **overrides: Any) -> EncodeContext:
    return encode_ctx(api_base=api.base_url, **overrides)


async def send(api: FakeApi, ctx: EncodeContext, text: str = "text-message-content") -> Any:
    (request,) = CODEC.encode(outbound(Text(text=text)), ctx)
    return await deliver_one(CODEC, request, FAST)


def meta_success(_: Recorded) -> Reply:
    return Reply(body=load_json("response_sent"))


async def test_send_through_the_api_returns_the_wamid(fake_api: FakeApi) -> None:
    fake_api.responder = meta_success
    result = await send(fake_api, fake_ctx(fake_api))
    assert result.ok and result.native_ids == ["wamid.HBgLMTY1MDM4Nzk0MzkVAgARGBJCOTY3NDc0NDFDRUI3NTA0Q0UA"]
    (recorded,) = fake_api.requests
    assert (recorded.method, recorded.path) == ("POST", f"/{PHONE_NUMBER_ID}/messages")
    assert recorded.headers["authorization"] == "Bearer EAAG-test"
    assert recorded.json() == load_json("send_text")


@pytest.mark.parametrize(
    ("status", "name"),
    [(400, "error_131047_reengagement"), (401, "error_190_token_expired"), (403, "error_200_permission")],
)
async def test_refusals_are_not_retried(fake_api: FakeApi, status: int, name: str) -> None:
    fake_api.responder = meta_success
    fake_api.queue(Reply(status=status, body=load_json(name)))
    result = await send(fake_api, fake_ctx(fake_api))
    assert not result.ok and not result.retryable
    assert len(fake_api.requests) == 1


async def test_rate_limit_is_retried_after_retry_after(fake_api: FakeApi) -> None:
    fake_api.responder = meta_success
    fake_api.queue(Reply(status=429, body=load_json("error_130429_rate_limit"), headers={"Retry-After": "0"}))
    result = await send(fake_api, fake_ctx(fake_api))
    assert result.ok
    assert len(fake_api.requests) == 2


async def test_server_errors_are_retried_then_succeed(fake_api: FakeApi) -> None:
    fake_api.responder = meta_success
    fake_api.queue(
        Reply(status=500, body=load_json("error_2_service_unavailable")),
        Reply(status=503, body=b"Service Unavailable"),
    )
    result = await send(fake_api, fake_ctx(fake_api))
    assert result.ok
    assert len(fake_api.requests) == 3


async def test_360dialog_send_through_the_api(fake_api: FakeApi) -> None:
    fake_api.responder = meta_success
    ctx = fake_ctx(fake_api, secrets={"api_key": "d360-key"}, options={"provider": "360dialog"})
    result = await send(fake_api, ctx)
    assert result.ok
    (recorded,) = fake_api.requests
    assert recorded.path == "/messages"
    assert recorded.headers["d360-api-key"] == "d360-key"
    assert "authorization" not in recorded.headers


# -------------------------------------------------------------------------------- registration


def test_registered_under_its_channel_name() -> None:
    codec = load("whatsapp")
    assert isinstance(codec, WhatsAppCodec)
    caps = codec.capabilities
    assert (caps.max_buttons, caps.max_list_rows, caps.window_hours, caps.markup) == (3, 10, 24, "whatsapp")
    assert caps.button_actions == frozenset({"reply", "url"}) and not caps.edit and not caps.delete


def test_360dialog_named_in_secrets_alone_picks_its_api() -> None:
    ctx = EncodeContext(tenant="acme", connection="d360", to="16315551181",
                        secrets={"api_key": "d360-key", "provider": "360dialog"})
    (request,) = CODEC.encode(outbound(Text(text="hi")), ctx)
    assert request.url == "https://waba-v2.360dialog.io/messages"
    assert request.headers["D360-API-KEY"] == "d360-key"


# ------------------------------------------------------------- usernames (business-scoped user ids)

BSUID = "US.13491208655302741918"


def test_message_from_a_user_with_a_username_and_no_phone_number_decodes_fully() -> None:
    msg = message("text_username_only")
    assert msg.parts == [Text(text="Does it come in another color?")]
    assert msg.conversation == Conversation(
        id=canonical.conversation_id(TENANT, CONNECTION, BSUID),
        channel="whatsapp",
        connection=CONNECTION,
        native_id=BSUID,
        type="direct",
    )
    assert msg.sender is not None
    assert (msg.sender.id, msg.sender.native_id, msg.sender.name, msg.sender.handle) == (
        canonical.sender_id(TENANT, CONNECTION, BSUID),
        BSUID,
        "Sheena Nelson",
        "@sheena_nelson",
    )
    assert msg.meta["whatsapp.from_user_id"] == BSUID
    assert msg.meta["whatsapp.contact"]["profile"]["username"] == "sheena_nelson"
    assert c_roundtrip(msg)


def test_a_message_with_a_phone_number_keeps_the_phone_number_as_its_chat() -> None:
    # Since BSUIDs were introduced every message carries one; a known phone number still names the chat,
    # so conversations that began before usernames keep their id.
    body = load_json("text")
    body["entry"][0]["changes"][0]["value"]["messages"][0]["from_user_id"] = BSUID
    body["entry"][0]["changes"][0]["value"]["contacts"][0]["user_id"] = BSUID
    (msg,) = CODEC.decode(HttpRequest(body=json.dumps(body).encode()), CTX)
    assert msg.conversation.native_id == USER and msg.sender is not None and msg.sender.handle == "+16505551234"
    assert msg.meta["whatsapp.from_user_id"] == BSUID


def test_a_message_naming_no_user_at_all_is_refused_with_its_path() -> None:
    body = load_json("text_username_only")
    del body["entry"][0]["changes"][0]["value"]["messages"][0]["from_user_id"]
    with pytest.raises(DecodeError) as caught:
        CODEC.decode(HttpRequest(body=json.dumps(body).encode()), CTX)
    assert caught.value.path == "$.entry[0].changes[0].value.messages[0].from"


@pytest.mark.parametrize(
    ("name", "state"), [("status_delivered_to_bsuid", "delivered"), ("status_failed_to_bsuid", "failed")]
)
def test_statuses_of_a_message_sent_to_a_bsuid_are_in_that_users_conversation(name: str, state: str) -> None:
    (status,) = decode(name)
    assert isinstance(status, Status)
    assert status.state == state
    assert status.native_id == "wamid.HBgLMTY1MDM4Nzk0MzkVAgARGBI5QTNDQTVCM0Q0Q0Q2RTY3RTcA"
    assert status.conversation.native_id == BSUID
    assert status.conversation.id == message("text_username_only").conversation.id
    assert (status.error is not None) == (state == "failed")
    assert c_roundtrip(status)


def test_a_reply_to_a_user_known_by_bsuid_names_it_in_recipient() -> None:
    (request,) = CODEC.encode(outbound(Text(text="text-message-content")), encode_ctx(to=BSUID))
    assert json.loads(request.body) == load_json("send_text_to_bsuid")
    parent = "US.ENT.11815799212886844830"
    (request,) = CODEC.encode(outbound(Text(text="text-message-content")), encode_ctx(to=parent))
    assert json.loads(request.body)["recipient"] == parent and "to" not in json.loads(request.body)
    # Phone numbers keep going in `to`.
    (request,) = CODEC.encode(outbound(Text(text="text-message-content")), encode_ctx())
    assert json.loads(request.body) == load_json("send_text")


c_roundtrip = round_trips


# -------------------------------------------------------------- several numbers in one business account


def ctx_for(phone_number_id: str) -> DecodeContext:
    return DecodeContext(tenant=TENANT, connection=CONNECTION, seq=42, options={"phone_number_id": phone_number_id})


def test_changes_for_another_phone_number_are_not_this_connections() -> None:
    request = HttpRequest(body=raw("batch_two_numbers"))
    own = CODEC.decode(request, ctx_for(PHONE_NUMBER_ID))
    assert [e.conversation.native_id for e in own] == [USER]
    other = CODEC.decode(request, ctx_for("106540352242933"))
    assert [e.conversation.native_id for e in other] == ["16505554321"]
    # Without a phone_number_id (a 360dialog connection) every change is taken.
    assert len(CODEC.decode(request, CTX)) == 2


def test_a_webhook_only_for_another_number_is_refused_with_the_reason() -> None:
    with pytest.raises(DecodeError) as caught:
        CODEC.decode(HttpRequest(body=raw("text")), ctx_for("999000111222333"))
    assert caught.value.path == "$.entry[0].changes[0].value.metadata.phone_number_id"
    assert "'106540352242922'" in caught.value.reason and "'999000111222333'" in caught.value.reason


@pytest.mark.parametrize(("copies", "refused_at"), [(1000, None), (1001, "$.entry[0].changes[1000].value.messages[0]")])
def test_a_webhook_of_more_updates_than_meta_batches_is_refused(copies: int, refused_at: str | None) -> None:
    """Meta batches at most 1000 updates in one webhook; a body with more would cost the decoder an
    envelope per update, so it is refused at the first update too many."""
    webhook = load_json("text")
    webhook["entry"][0]["changes"] *= copies
    request = HttpRequest(body=json.dumps(webhook).encode(), received_at=1_750_000_000.0)
    if refused_at is None:
        assert len(CODEC.decode(request, CTX)) == 1000
        return
    with pytest.raises(DecodeError) as refused:
        CODEC.decode(request, CTX)
    assert refused.value.path == refused_at and "at most 1000 updates" in refused.value.reason
