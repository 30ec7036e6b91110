"""The Telegram codec on real-shaped Bot API payloads: decode meaning, webhook secret, the exact API calls it
builds, how it reads Telegram's answers (also over HTTP through `deliver`), long polling, and a sweep of the
shared corpus."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from babelhub import canonical
from babelhub.canonical import (
    Action,
    Activity,
    Button,
    Buttons,
    Contact,
    Delete,
    Edit,
    Envelope,
    List,
    ListRow,
    ListSection,
    Location,
    Media,
    Message,
    Poll,
    Reaction,
    Text,
    Unsupported,
)
from babelhub.codecs.base import DecodeContext, EncodeContext, HttpRequest, HttpResponse, OutboundRequest
from babelhub.codecs.telegram import TelegramCodec
from babelhub.errors import DecodeError, EncodeError, SignatureError
from babelhub.services.delivery import RetryPolicy, deliver, perform
from tests import codeckit
from tests.codeckit import Fixtures, Ids, outbound_message, response, utc
from tests.fakeapi import FakeApi, Recorded, Reply

FIXTURES = Fixtures("telegram", suffix=".json")
CORPUS = codeckit.CORPUS / "telegram"

CODEC = TelegramCodec()
TENANT, CONNECTION = "acme", "tg-main"
DECODE = DecodeContext(tenant=TENANT, connection=CONNECTION, seq=42)
TOKEN = "123456:ABC-DEF1234ghIkl-zyx57W2v1u123ew11"
SECRETS = {"bot_token": TOKEN, "secret_token": "s3cr3t-Token_1"}
FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.02)


fixture = FIXTURES.json


def webhook(body: Any, **headers: str) -> HttpRequest:
    return HttpRequest(
        method="POST", path="/webhooks/telegram/tg-main", headers=headers, body=json.dumps(body).encode()
    )


def decode(name: str) -> Envelope:
    envelopes = CODEC.decode(webhook(fixture(name)), DECODE)
    assert len(envelopes) == 1
    return envelopes[0]


def decode_message(name: str) -> Message:
    envelope = decode(name)
    assert isinstance(envelope, Message)
    return envelope


IDS = Ids(TENANT, CONNECTION)
message_id, sender_id = IDS.message, IDS.sender


def encode_ctx(to: str = "1111111", native_ids: dict[str, str] | None = None, api_base: str = "") -> EncodeContext:
    return EncodeContext(
        tenant=TENANT, connection=CONNECTION, to=to, secrets=SECRETS, native_ids=native_ids or {}, api_base=api_base
    )


def outbound(*parts: Any, reply_to: str = "", thread: str = "") -> Message:
    conversation = canonical.Conversation(id="conv01")
    fields = {"reply_to": reply_to, "thread": thread}
    return outbound_message(TENANT, conversation, parts, id="msg01", ts=utc(1_700_000_000), **fields)


def calls(message: Message, ctx: EncodeContext | None = None) -> list[tuple[str, Any]]:
    """(Bot API method, JSON body) of each request, checking the parts every request shares."""
    requests = CODEC.encode(message, ctx or encode_ctx())
    for index, request in enumerate(requests):
        assert request.method == "POST"
        assert request.headers == {"content-type": "application/json"}
        assert request.idempotency_key == f"{message.id}:{index}"
        assert request.message_id == message.id
    return [(method_of(request), json.loads(request.body)) for request in requests]


def method_of(request: OutboundRequest) -> str:
    prefix = f"https://api.telegram.org/bot{TOKEN}/"
    assert request.url.startswith(prefix)
    return request.url.removeprefix(prefix)


def answer(name: str, status: int = 200, headers: dict[str, str] | None = None) -> HttpResponse:
    return response(status, FIXTURES.bytes(name), headers)


# ------------------------------------------------------------------------------------------ verify


def test_verify_accepts_the_configured_secret_token() -> None:
    CODEC.verify(webhook({}, **{"x-telegram-bot-api-secret-token": SECRETS["secret_token"]}), SECRETS)


@pytest.mark.parametrize(
    ("headers", "case"),
    [
        ({"x-telegram-bot-api-secret-token": "s3cr3t-Token_2"}, "wrong token"),
        ({}, "missing header"),
        ({"x-telegram-bot-api-secret-token": ""}, "empty header"),
        ({"x-telegram-bot-api-secret-token": "old-rotated-token"}, "stale token from before a rotation"),
    ],
)
def test_verify_refuses_anything_but_the_current_secret(headers: dict[str, str], case: str) -> None:
    with pytest.raises(SignatureError):
        CODEC.verify(webhook({}, **headers), SECRETS)


def test_verify_refuses_every_request_when_no_secret_is_configured() -> None:
    with pytest.raises(SignatureError, match="secret_token"):
        CODEC.verify(webhook({}, **{"x-telegram-bot-api-secret-token": ""}), {"bot_token": TOKEN})


def test_dedup_key_is_the_update_id() -> None:
    assert CODEC.dedup_key(webhook(fixture("message_text"))) == "update:10000"
    for broken, path in ((b"not json", "$"), (b"[1]", "$"), (b'{"update_id": "x"}', "$.update_id")):
        with pytest.raises(DecodeError) as caught:
            CODEC.dedup_key(HttpRequest(body=broken))
        assert caught.value.path == path


# --------------------------------------------------------------------------------- decode: messages


def test_text_message_header_ids_and_timestamp() -> None:
    message = decode_message("message_text")
    assert message.id == message_id("1111111:1365")
    assert message.native == canonical.Native(id="1111111:1365", seq=42)
    assert message.direction == "inbound"
    assert message.ts == utc(1441645532)
    assert message.conversation == canonical.Conversation(
        id=canonical.conversation_id(TENANT, CONNECTION, "1111111"),
        channel="telegram",
        connection=CONNECTION,
        native_id="1111111",
        type="direct",
    )
    assert message.sender == canonical.Sender(
        id=sender_id("1111111"),
        native_id="1111111",
        name="Test Firstname Test Lastname",
        role="user",
        handle="@Testusername",
    )
    assert message.parts == [Text(text="/start")]


def test_formatting_entities_become_markdown() -> None:
    message = decode_message("message_entities")
    assert message.parts == [Text(text="**Bold** and *italics*", format="markdown")]


def test_code_and_links_become_markdown_and_spoilers_stay_in_meta() -> None:
    message = decode_message("message_rich_formatting")
    (text,) = message.parts
    assert text == Text(
        text="Run `print(a*b)` see [docs](https://core.telegram.org/bots/api) secret", format="markdown"
    )
    # No markdown says "spoiler": the entities are kept verbatim.
    assert message.meta["telegram.entities"] == fixture("message_rich_formatting")["message"]["entities"]


def test_mentions_are_converted_from_utf16_offsets_to_code_points() -> None:
    message = decode_message("message_mentions_utf16")
    (text,) = message.parts
    assert isinstance(text, Text) and text.format == "markdown"
    assert text.text == "🎉 **Welcome** @jane\\_doe and Ann!"
    username, person = text.mentions
    assert text.text[username.offset : username.offset + username.length] == "@jane\\_doe"
    assert username.name == "@jane_doe" and username.id == ""
    assert text.text[person.offset : person.offset + person.length] == "Ann"
    assert (person.id, person.native_id, person.name) == (sender_id("2222222"), "2222222", "Ann Lee")
    assert message.conversation.type == "group"
    assert "telegram.entities" not in message.meta  # bold and mentions said it all


def test_reply_points_at_the_replied_message() -> None:
    message = decode_message("message_reply")
    assert message.reply_to == message_id("1111112:1334")
    assert message.parts == [Text(text="/start")]


def test_reply_thread_outside_a_forum_is_a_reply_not_a_thread() -> None:
    message = decode_message("message_reply_thread_supergroup")
    assert message.reply_to == message_id("-1001293752024:134545")
    assert message.thread == ""  # only forum topics can be posted into
    assert message.meta["telegram.message_thread_id"] == 134545
    assert message.parts == [Text(text="/report")]  # bot_command is visible in the text itself
    assert "telegram.entities" not in message.meta


def test_forum_topic_message_is_in_the_topic_thread() -> None:
    message = decode_message("message_forum_topic")
    assert message.thread == message_id("-1001847508954:4")
    assert message.native is not None and message.native.thread == "-1001847508954:4"
    assert message.reply_to == ""  # the implicit reply to the topic's first message
    assert message.conversation.type == "group"
    assert message.parts == [Text(text="blah")]


def test_legacy_forward_fields_are_kept_in_meta() -> None:
    message = decode_message("message_forwarded_legacy")
    assert message.meta["telegram.forward_from"]["id"] == 222222
    assert message.meta["telegram.forward_date"] == 1441645550


def test_message_on_behalf_of_a_chat_is_sent_by_that_chat() -> None:
    message = decode_message("message_sender_chat_forwarded")
    assert message.sender is not None
    assert (message.sender.native_id, message.sender.name) == ("-1001160242915", "a")
    assert message.meta["telegram.forward_origin"]["type"] == "chat"
    assert message.meta["telegram.from"]["username"] == "GroupAnonymousBot"
    assert message.meta["telegram.author_signature"] == "TITLE2"


def test_channel_post_is_sent_by_the_channel() -> None:
    message = decode_message("channel_post")
    assert message.conversation.type == "channel"
    assert message.sender is not None and message.sender.handle == "@babelnews"
    assert message.parts == [Text(text="Release 1.0 is out")]


# ------------------------------------------------------------------------------------ decode: media


def test_photo_takes_the_largest_size_and_keeps_the_caption() -> None:
    message = decode_message("message_photo_caption")
    (media,) = message.parts
    assert media == Media(
        media="image",
        file_id="AgACAgQAAxkBAAINhGKvijUVSn2i3980bQIIc1fqWGNCAAJpvDEbEmaBUfuA43fR-BnlAQADAgADeQADJAQ",
        size=162061,
        width=1280,
        height=1280,
        caption="www.example.com",
    )
    assert message.meta["telegram.file"] == {"file_unique_id": "AQADabwxGxJmgVF-"}
    assert "telegram.caption_entities" not in message.meta  # a url entity: visible in the caption


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "message_voice",
            Media(
                media="voice", file_id="AwADBAADbXXXXXXXXXXXGBdhD2l6_XX", mime="audio/ogg", size=23000, duration_ms=5000
            ),
        ),
        (
            "message_audio",
            Media(
                media="audio",
                file_id="AwADBAADbXXXXXXXXXXXGBdhD2l6_XX",
                mime="audio/mpeg",
                size=3897500,
                duration_ms=243_000,
            ),
        ),
        (
            "message_document",
            Media(
                media="document",
                file_id="AwADBAADbXXXXXXXXXXXGBdhD2l6_XX",
                mime="application/pdf",
                size=536392,
                filename="Testfile.pdf",
            ),
        ),
        (
            "message_video",
            Media(
                media="video",
                file_id="BAADAgADpgQAAgX9qEud6QcgPiOAlhYE",
                mime="video/mp4",
                size=1381334,
                duration_ms=13_000,
                width=512,
                height=640,
            ),
        ),
        ("message_animation", Media(media="animation", file_id="file id", width=42, height=42)),
        (
            "message_sticker",
            Media(
                media="sticker",
                file_id="CAACAgIAAxkBAAESLdBjMImep-J0W8XaTN6S_Lz1-j1QIQACIwADsND4DGmmygHGlyggKQQ",
                size=16639,
                width=512,
                height=512,
            ),
        ),
    ],
)
def test_media_messages(name: str, expected: Media) -> None:
    message = decode_message(name)
    assert message.parts == [expected]


def test_audio_title_and_sticker_emoji_are_kept_in_meta() -> None:
    assert decode_message("message_audio").meta["telegram.file"] == {"title": "Test music file"}
    sticker = decode_message("message_sticker").meta["telegram.file"]
    assert sticker["emoji"] == "😡" and sticker["set_name"] == "AdvenTimeAnim"


def test_video_note_is_a_video_marked_in_meta() -> None:
    message = decode_message("message_video_note")
    assert message.parts == [Media(media="video", file_id="file id")]
    assert message.meta["telegram.video_note"] is True


def test_a_null_file_field_beside_the_real_file_is_no_file() -> None:
    update = fixture("message_document")
    update["message"]["animation"] = None  # present but null, ahead of the document in reading order
    (message,) = CODEC.decode(webhook(update), DECODE)
    assert isinstance(message, Message)
    assert message.parts == decode_message("message_document").parts
    assert message.meta.get("telegram.file") == decode_message("message_document").meta.get("telegram.file")


def test_photo_sizes_written_as_strings_are_read_as_numbers() -> None:
    update = fixture("message_photo_caption")
    for size in update["message"]["photo"]:
        size["width"], size["height"] = str(size["width"]), str(size["height"])
    (message,) = CODEC.decode(webhook(update), DECODE)
    assert isinstance(message, Message)
    assert message.parts == decode_message("message_photo_caption").parts
    assert message.meta["telegram.file"] == {"file_unique_id": "AQADabwxGxJmgVF-"}  # the largest size's


def test_photo_meta_comes_from_the_same_size_as_the_media() -> None:
    update = fixture("message_photo_caption")
    # Two sizes of the same dimensions: the larger file is the photo, and its own id goes to meta.
    update["message"]["photo"][2] |= {"width": 1280, "height": 1280, "file_size": 100}
    (message,) = CODEC.decode(webhook(update), DECODE)
    assert isinstance(message, Message)
    (media,) = message.parts
    assert isinstance(media, Media) and media.size == 162061
    assert message.meta["telegram.file"] == {"file_unique_id": "AQADabwxGxJmgVF-"}


def test_location_venue_contact_and_poll() -> None:
    assert decode_message("message_location").parts == [Location(lat=3.14, lon=3.14)]
    venue = decode_message("message_venue")
    assert venue.parts == [Location(lat=0.0, lon=0.0, name="Title", address="Address")]  # not twice
    assert venue.meta["telegram.venue"] == {"foursquare_id": "some_foursquare_id"}
    assert decode_message("message_contact").parts == [Contact(name="911", phones=["911"])]
    poll = decode_message("message_poll")
    assert poll.parts == [Poll(question="Q", options=["A", "B"], multiple=False)]
    assert poll.meta["telegram.poll"]["type"] == "quiz"


def test_dice_stays_native_with_its_roll_in_meta() -> None:
    message = decode_message("message_dice")
    assert message.parts == [Unsupported(reason="telegram dice", native={"dice": {"emoji": "🎲", "value": 2}})]
    assert message.meta["telegram.dice"] == {"emoji": "🎲", "value": 2}


def test_unknown_message_content_becomes_unsupported() -> None:
    update = fixture("message_text")
    update["message"]["checklist"] = {"title": "Todo", "tasks": [{"id": 1, "text": "ship"}]}
    (message,) = CODEC.decode(webhook(update), DECODE)
    assert isinstance(message, Message)
    assert message.parts == [
        Text(text="/start"),
        Unsupported(reason="telegram message field 'checklist'", native={"checklist": update["message"]["checklist"]}),
    ]


# ---------------------------------------------------------------------------- decode: other updates


def test_edited_message_targets_the_original() -> None:
    message = decode_message("edited_message")
    assert message.parts == [Edit(target=message_id("1111111:1365")), Text(text="Edited text")]
    assert message.id == message_id("1111111:1365:1441646600")
    assert message.ts == utc(1441646600)
    assert message.native is not None and message.native.id == "1111111:1365"


def test_callback_query_becomes_an_action_with_the_button_title() -> None:
    message = decode_message("callback_query_keyboard")
    assert message.parts == [Action(id="size:l", title="Large", source=message_id("1111111:1402"))]
    assert message.sender is not None and message.sender.native_id == "1111111"
    assert message.conversation.native_id == "1111111"
    assert message.meta["telegram.callback_query_id"] == "4382bfdwdsb323b2d9"
    assert message.id == message_id("callback:4382bfdwdsb323b2d9")


def test_callback_query_time_is_when_the_hub_received_it() -> None:
    request = msgspec.structs.replace(webhook(fixture("callback_query_keyboard")), received_at=1_700_000_123.0)
    (message,) = CODEC.decode(request, DECODE)
    assert message.ts == utc(1_700_000_123)


def test_callback_query_from_an_inline_message_lands_in_the_pressers_chat() -> None:
    message = decode_message("callback_query_inline_message")
    assert message.parts == [Action(id="Data from button callback")]
    assert message.conversation.native_id == "1111111"
    assert message.meta["telegram.inline_message_id"] == "1234csdbsk4839"


def test_reactions_added_and_removed() -> None:
    added = decode_message("message_reaction_added")
    assert added.parts == [Reaction(emoji="🌭", target=message_id("-1002184233434:35"))]
    assert added.sender is not None and added.sender.handle == "@shdwchn10"
    assert added.ts == utc(1721306082)
    removed = decode_message("message_reaction_removed_by_chat")
    assert removed.parts == [Reaction(emoji="❤", target=message_id("-1002199793788:2"), removed=True)]
    assert removed.sender is not None and removed.sender.native_id == "-1002199793788"  # the anonymous actor chat


def test_custom_emoji_reaction_is_kept_native() -> None:
    message = decode_message("message_reaction_custom_emoji")
    assert message.parts == [
        Unsupported(
            reason="telegram custom_emoji reaction added", native={"type": "custom_emoji", "custom_emoji_id": "qwerty"}
        )
    ]


def test_bot_added_to_a_group_is_a_joined_activity() -> None:
    activity = decode("my_chat_member_added_to_group")
    assert isinstance(activity, Activity)
    assert activity.activity == "joined"
    assert activity.detail["new_status"] == "member" and activity.detail["bot_itself"] is True
    assert activity.detail["member"]["handle"] == "@babel_bot"
    assert activity.sender is not None and activity.sender.native_id == "1111111"  # who added it
    assert activity.conversation.type == "group"


def test_bot_blocked_by_the_user_is_a_left_activity() -> None:
    activity = decode("my_chat_member_blocked")
    assert isinstance(activity, Activity)
    assert (activity.activity, activity.detail["new_status"]) == ("left", "kicked")


def test_new_chat_members_service_message_is_a_joined_activity() -> None:
    activity = decode("message_new_chat_members")
    assert isinstance(activity, Activity) and activity.activity == "joined"
    assert activity.detail["members"] == [{"id": "42", "name": "Test", "is_bot": False}]


def test_deleted_business_messages_become_delete_parts() -> None:
    message = decode_message("deleted_business_messages")
    assert message.parts == [Delete(target=message_id(f"-42:{number}")) for number in (1, 2, 3)]


def test_other_updates_are_kept_whole_as_unsupported() -> None:
    message = decode_message("inline_query")
    assert message.parts == [
        Unsupported(
            reason="telegram inline_query update", native={"inline_query": fixture("inline_query")["inline_query"]}
        )
    ]
    assert message.sender is not None and message.sender.native_id == "1111111"
    assert message.conversation.native_id == "1111111"  # the user's private chat with the bot


# ------------------------------------------------------------------------------------ decode errors


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (b"{not json", "$"),
        (b"[1, 2]", "$"),
        (b'{"message": {}}', "$.update_id"),
        (b'{"update_id": 1}', "$"),
        (b'{"update_id": 1, "message": {"message_id": 1, "date": 1}}', "$.message"),
        (b'{"update_id": 1, "message": {"message_id": "x", "date": 1, "chat": {"id": 1}}}', "$.message.message_id"),
        (b'{"update_id": 1, "callback_query": {"id": "q", "from": {"id": "me"}}}', "$.callback_query.from.id"),
    ],
)
def test_undecodable_updates_name_the_path(body: bytes, path: str) -> None:
    with pytest.raises(DecodeError) as raised:
        CODEC.decode(HttpRequest(body=body), DECODE)
    assert raised.value.path == path


def changed(name: str, **fields: Any) -> bytes:
    """A fixture whose update payload (the field beside update_id) has `fields` replaced."""
    update = fixture(name)
    kind = next(key for key in update if key != "update_id")
    update[kind] |= fields
    return json.dumps(update).encode()


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (changed("message_text", date=10**17), "$.message.date"),
        (changed("message_text", date=-(10**17)), "$.message.date"),
        (changed("edited_message", edit_date=10**17), "$.edited_message.edit_date"),
        (changed("message_reaction_added", date=10**17), "$.message_reaction.date"),
        (changed("my_chat_member_blocked", date=10**17), "$.my_chat_member.date"),
        (changed("message_new_chat_members", date=10**17), "$.message.date"),
        (changed("inline_query", date=10**17), "$.inline_query.date"),
    ],
)
def test_impossible_times_name_the_path(body: bytes, path: str) -> None:
    with pytest.raises(DecodeError) as raised:
        CODEC.decode(HttpRequest(body=body), DECODE)
    assert raised.value.path == path


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (changed("message_location", location={"latitude": "nan", "longitude": 3.14}), "$.message.location.latitude"),
        (
            changed("message_venue", venue={"location": {"latitude": 0, "longitude": "-inf"}, "title": "T"}),
            "$.message.venue.location.longitude",
        ),
        (changed("message_location", location={"latitude": "north", "longitude": 3.14}), "$.message.location.latitude"),
        (changed("message_photo_caption", photo=[{"file_id": 7}]), "$.message.photo[0].file_id"),
    ],
)
def test_an_impossible_place_or_file_is_an_unsupported_part_naming_the_path(body: bytes, path: str) -> None:
    (message,) = CODEC.decode(HttpRequest(body=body), DECODE)
    assert isinstance(message, Message) and message.conversation.native_id
    unreadable = [part for part in message.parts if isinstance(part, Unsupported)]
    assert len(unreadable) == 1 and path in unreadable[0].reason
    assert canonical.decode(canonical.encode(message)) == message


def test_a_caption_and_text_survive_an_unreadable_photo() -> None:
    body = json.loads(changed("message_photo_caption", photo="not a list of sizes", text="and some text"))
    (message,) = CODEC.decode(HttpRequest(body=json.dumps(body).encode()), DECODE)
    assert isinstance(message, Message)
    assert message.parts[0] == Text(text="and some text")
    assert isinstance(message.parts[-1], Unsupported) and message.parts[-1].native == {"photo": "not a list of sizes"}


def test_callback_query_time_falls_back_to_the_keyboard_message_and_names_it() -> None:
    update = fixture("callback_query_keyboard")
    update["callback_query"]["message"]["date"] = 10**17
    with pytest.raises(DecodeError) as raised:
        CODEC.decode(HttpRequest(body=json.dumps(update).encode()), DECODE)  # no receipt time
    assert raised.value.path == "$.callback_query.message.date"


# ------------------------------------------------------------------------------------------- encode


def test_plain_text_is_one_send_message() -> None:
    assert calls(outbound(Text(text="Hello"))) == [("sendMessage", {"chat_id": 1111111, "text": "Hello"})]


@pytest.mark.parametrize(
    ("text_format", "parse_mode"), [("telegram_html", "HTML"), ("telegram_markdownv2", "MarkdownV2")]
)
def test_telegram_dialects_set_the_parse_mode(text_format: Any, parse_mode: str) -> None:
    ((_, body),) = calls(outbound(Text(text="<b>Hi</b>", format=text_format)))
    assert body["parse_mode"] == parse_mode


def test_text_followed_by_buttons_is_one_message_with_an_inline_keyboard() -> None:
    message = outbound(
        Text(text="Pick a size"),
        Buttons(
            buttons=[
                Button(id="size:s", title="Small"),
                Button(id="b2", title="Large", action="postback", value="size:l"),
                Button(id="guide", title="Size guide", action="url", value="https://example.com/sizes"),
            ]
        ),
    )
    assert calls(message) == [
        (
            "sendMessage",
            {
                "chat_id": 1111111,
                "text": "Pick a size",
                "reply_markup": {
                    "inline_keyboard": [
                        [{"text": "Small", "callback_data": "size:s"}],
                        [{"text": "Large", "callback_data": "size:l"}],
                        [{"text": "Size guide", "url": "https://example.com/sizes"}],
                    ]
                },
            },
        )
    ]


def test_a_list_is_a_keyboard_with_one_row_per_choice() -> None:
    menu = List(
        text="Where to?",
        header="Trips",
        sections=[
            ListSection(title="Europe", rows=[ListRow(id="ber", title="Berlin"), ListRow(id="lis", title="Lisbon")])
        ],
    )
    assert calls(outbound(menu)) == [
        (
            "sendMessage",
            {
                "chat_id": 1111111,
                "text": "Trips\n\nWhere to?",
                "reply_markup": {
                    "inline_keyboard": [
                        [{"text": "Berlin", "callback_data": "ber"}],
                        [{"text": "Lisbon", "callback_data": "lis"}],
                    ]
                },
            },
        )
    ]


def test_callback_data_over_64_bytes_is_refused_naming_the_button() -> None:
    too_long = Buttons(text="Choose", buttons=[Button(id="é" * 33, title="Accents")])  # 66 bytes
    with pytest.raises(EncodeError, match="'Accents'"):
        CODEC.encode(outbound(too_long), encode_ctx())


def test_buttons_without_text_need_something_to_hang_under() -> None:
    with pytest.raises(EncodeError, match="Buttons"):
        CODEC.encode(outbound(Buttons(buttons=[Button(id="a", title="A")])), encode_ctx())


@pytest.mark.parametrize(
    ("media", "method", "fields"),
    [
        (
            Media(media="image", url="https://example.com/a.jpg", caption="A"),
            "sendPhoto",
            {"photo": "https://example.com/a.jpg", "caption": "A"},
        ),
        (Media(media="audio", file_id="AUD", duration_ms=243_000), "sendAudio", {"audio": "AUD", "duration": 243}),
        (Media(media="voice", file_id="VOI", duration_ms=5_000), "sendVoice", {"voice": "VOI", "duration": 5}),
        (
            Media(media="video", file_id="VID", duration_ms=13_000, width=512, height=640),
            "sendVideo",
            {"video": "VID", "duration": 13, "width": 512, "height": 640},
        ),
        (
            Media(media="document", url="https://example.com/a.pdf", filename="a.pdf"),
            "sendDocument",
            {"document": "https://example.com/a.pdf"},
        ),
        (Media(media="sticker", file_id="STK"), "sendSticker", {"sticker": "STK"}),
        (
            Media(media="animation", file_id="GIF", caption="lol"),
            "sendAnimation",
            {"animation": "GIF", "caption": "lol"},
        ),
    ],
)
def test_each_media_kind_has_its_method(media: Media, method: str, fields: dict[str, Any]) -> None:
    assert calls(outbound(media)) == [(method, {"chat_id": 1111111, **fields})]


def test_a_sticker_caption_follows_as_text() -> None:
    assert calls(outbound(Media(media="sticker", file_id="STK", caption="for you"))) == [
        ("sendSticker", {"chat_id": 1111111, "sticker": "STK"}),
        ("sendMessage", {"chat_id": 1111111, "text": "for you"}),
    ]


def test_consecutive_photos_and_videos_are_one_album() -> None:
    message = outbound(
        Media(media="image", file_id="P1", caption="Trip"),
        Media(media="video", url="https://example.com/v.mp4"),
        Text(text="Nice?"),
    )
    assert calls(message) == [
        (
            "sendMediaGroup",
            {
                "chat_id": 1111111,
                "media": [
                    {"type": "photo", "media": "P1", "caption": "Trip"},
                    {"type": "video", "media": "https://example.com/v.mp4"},
                ],
            },
        ),
        ("sendMessage", {"chat_id": 1111111, "text": "Nice?"}),
    ]


def test_albums_hold_at_most_ten_items() -> None:
    photos = [Media(media="image", file_id=f"P{number}") for number in range(12)]
    methods = [method for method, _ in calls(outbound(*photos))]
    assert methods == ["sendMediaGroup", "sendMediaGroup"]  # 10 + 2


def test_inline_media_data_is_refused() -> None:
    with pytest.raises(EncodeError, match="multipart"):
        CODEC.encode(outbound(Media(media="image", data=b"\x89PNG")), encode_ctx())


def test_location_venue_contact_and_poll_methods() -> None:
    message = outbound(
        Location(lat=52.52, lon=13.405),
        Location(lat=3.14, lon=3.14, name="Cupboard Under the Stairs", address="4 Privet Drive"),
        Contact(name="Ann Lee", phones=["+4915112345678", "+4930123456"], emails=["ann@example.com"]),
        Poll(question="Lunch?", options=["Pizza", "Sushi"], multiple=True),
    )
    assert calls(message) == [
        ("sendLocation", {"chat_id": 1111111, "latitude": 52.52, "longitude": 13.405}),
        (
            "sendVenue",
            {
                "chat_id": 1111111,
                "latitude": 3.14,
                "longitude": 3.14,
                "title": "Cupboard Under the Stairs",
                "address": "4 Privet Drive",
            },
        ),
        (
            "sendContact",
            {
                "chat_id": 1111111,
                "phone_number": "+4915112345678",
                "first_name": "Ann Lee",
                "vcard": "BEGIN:VCARD\nVERSION:3.0\nFN:Ann Lee\nTEL:+4915112345678\nTEL:+4930123456\n"
                "EMAIL:ann@example.com\nEND:VCARD",
            },
        ),
        (
            "sendPoll",
            {
                "chat_id": 1111111,
                "question": "Lunch?",
                "options": [{"text": "Pizza"}, {"text": "Sushi"}],
                "allows_multiple_answers": True,
            },
        ),
    ]


def test_reply_and_thread_use_the_native_ids() -> None:
    ctx = encode_ctx(to="-1001847508954", native_ids={"in-1": "-1001847508954:5", "topic": "-1001847508954:4"})
    message = outbound(Text(text="Sure"), Media(media="image", file_id="P1"), reply_to="in-1", thread="topic")
    assert calls(message, ctx) == [
        (
            "sendMessage",
            {"chat_id": -1001847508954, "message_thread_id": 4, "text": "Sure", "reply_parameters": {"message_id": 5}},
        ),
        ("sendPhoto", {"chat_id": -1001847508954, "message_thread_id": 4, "photo": "P1"}),
    ]


def test_replying_to_a_message_of_another_chat_names_that_chat() -> None:
    ctx = encode_ctx(native_ids={"in-1": "-100200:9"})
    ((_, body),) = calls(outbound(Text(text="Seen"), reply_to="in-1"), ctx)
    assert body["reply_parameters"] == {"message_id": 9, "chat_id": -100200}


def test_reaction_edit_and_delete() -> None:
    ctx = encode_ctx(native_ids={"in-1": "1111111:1365", "out-1": "1111111:1403"})
    message = outbound(
        Reaction(emoji="👍", target="in-1"),
        Edit(target="out-1"),
        Text(text="<b>Updated</b>", format="telegram_html"),
        Buttons(buttons=[Button(id="ok", title="OK")]),
        Delete(target="in-1"),
        Reaction(emoji="👍", target="in-1", removed=True),
    )
    assert calls(message, ctx) == [
        (
            "setMessageReaction",
            {"chat_id": 1111111, "message_id": 1365, "reaction": [{"type": "emoji", "emoji": "👍"}]},
        ),
        (
            "editMessageText",
            {
                "chat_id": 1111111,
                "message_id": 1403,
                "text": "<b>Updated</b>",
                "parse_mode": "HTML",
                "reply_markup": {"inline_keyboard": [[{"text": "OK", "callback_data": "ok"}]]},
            },
        ),
        ("deleteMessage", {"chat_id": 1111111, "message_id": 1365}),
        ("setMessageReaction", {"chat_id": 1111111, "message_id": 1365, "reaction": []}),
    ]


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (outbound(Edit(target="out-1")), "followed by the new text"),
        (outbound(Edit(target="out-1"), Media(media="image", file_id="P")), "not Media"),
        (outbound(Reaction(emoji="👍", target="unknown")), "reaction target 'unknown'"),
        (outbound(Text(text="Hi"), reply_to="unknown"), "reply_to 'unknown'"),
        (outbound(Delete(target="bad")), "'<chat_id>:<message_id>'"),
    ],
)
def test_missing_or_unusable_native_ids_are_clear_errors(message: Message, error: str) -> None:
    with pytest.raises(EncodeError, match=error):
        CODEC.encode(message, encode_ctx(native_ids={"out-1": "1111111:1403", "bad": "wamid.X"}))


def test_sending_needs_the_bot_token() -> None:
    ctx = EncodeContext(tenant=TENANT, connection=CONNECTION, to="1")
    with pytest.raises(EncodeError, match="bot_token"):
        CODEC.encode(outbound(Text(text="Hi")), ctx)


def test_channel_usernames_are_sent_as_strings() -> None:
    ((_, body),) = calls(outbound(Text(text="Hi")), encode_ctx(to="@babelnews"))
    assert body["chat_id"] == "@babelnews"


def test_typing_is_send_chat_action() -> None:
    typing = Activity(
        id="act01", tenant=TENANT, conversation=canonical.Conversation(id="c"), ts=utc(0), activity="typing"
    )
    (request,) = CODEC.encode_activity(typing, encode_ctx())
    assert method_of(request) == "sendChatAction"
    assert json.loads(request.body) == {"chat_id": 1111111, "action": "typing"}
    assert CODEC.encode_activity(msgspec.structs.replace(typing, activity="read"), encode_ctx()) == []


def test_a_button_press_is_answered_so_the_spinner_stops() -> None:
    pressed = decode("callback_query_keyboard")
    (request,) = CODEC.on_inbound(pressed, encode_ctx())
    assert method_of(request) == "answerCallbackQuery"
    assert json.loads(request.body) == {"callback_query_id": "4382bfdwdsb323b2d9"}
    assert CODEC.on_inbound(decode("message_text"), encode_ctx()) == []


def test_decoded_ids_round_trip_into_replies() -> None:
    """What decode calls a message is what encode can reply to, once the hub mapped it."""
    incoming = decode_message("message_text")
    assert incoming.native is not None
    ctx = encode_ctx(to=incoming.conversation.native_id, native_ids={incoming.id: incoming.native.id})
    ((_, body),) = calls(outbound(Text(text="Welcome"), reply_to=incoming.id), ctx)
    assert body == {"chat_id": 1111111, "text": "Welcome", "reply_parameters": {"message_id": 1365}}


# ------------------------------------------------------------------------------------ parse_response

SEND = OutboundRequest(method="POST", url=f"https://api.telegram.org/bot{TOKEN}/sendMessage")


def test_success_answers_give_native_ids() -> None:
    assert CODEC.parse_response(SEND, answer("response_send_message")).native_ids == ["1111111:1403"]
    album = CODEC.parse_response(SEND, answer("response_send_media_group"))
    assert album.ok and album.native_ids == ["1111111:1404", "1111111:1405"]
    done = CODEC.parse_response(SEND, answer("response_true"))
    assert done.ok and done.native_ids == []


def test_flood_control_is_retried_after_the_given_seconds() -> None:
    result = CODEC.parse_response(SEND, answer("error_429_too_many_requests", 429))
    assert not result.ok and result.retryable and result.retry_after == 5
    assert result.error is not None
    assert (result.error.code, result.error.message) == ("telegram_429", "Too Many Requests: retry after 5")


@pytest.mark.parametrize(
    ("name", "status"),
    [("error_400_chat_not_found", 400), ("error_401_unauthorized", 401), ("error_403_blocked", 403)],
)
def test_client_errors_are_final(name: str, status: int) -> None:
    result = CODEC.parse_response(SEND, answer(name, status))
    assert not result.ok and not result.retryable
    assert result.error is not None and result.error.code == f"telegram_{status}"
    assert result.error.native == fixture(name)


def test_server_errors_are_retried_even_without_a_bot_api_body() -> None:
    assert CODEC.parse_response(SEND, answer("error_502_bad_gateway", 502)).retryable
    html = CODEC.parse_response(SEND, HttpResponse(status=503, body=b"<html>503 Service Unavailable</html>"))
    assert not html.ok and html.retryable


# ------------------------------------------------------------------------------ delivery over HTTP


def bot_api(recorded: Recorded) -> Reply:
    """What Telegram answers a successful sendMessage: the sent Message."""
    return Reply(body=fixture("response_send_message"))


async def test_deliver_retries_flood_control_and_server_errors_then_succeeds(fake_api: FakeApi) -> None:
    fake_api.responder = bot_api
    flood = fixture("error_429_too_many_requests")
    flood["parameters"]["retry_after"] = 0  # the real answer says 5 s; the test need not wait
    fake_api.queue(Reply(status=429, body=flood), Reply(status=502, body=fixture("error_502_bad_gateway")))
    (request,) = CODEC.encode(outbound(Text(text="Hello")), encode_ctx(api_base=fake_api.base_url))
    async with aiohttp.ClientSession() as session:
        result = await deliver(session, CODEC, request, FAST)
    assert result.ok and result.native_ids == ["1111111:1403"]
    assert len(fake_api.requests) == 3
    sent = fake_api.requests[-1]
    assert (sent.method, sent.path) == ("POST", f"/bot{TOKEN}/sendMessage")
    assert sent.headers["content-type"] == "application/json"
    assert sent.json() == {"chat_id": 1111111, "text": "Hello"}


@pytest.mark.parametrize(
    ("name", "status"),
    [("error_400_chat_not_found", 400), ("error_401_unauthorized", 401), ("error_403_blocked", 403)],
)
async def test_deliver_gives_up_at_once_on_client_errors(fake_api: FakeApi, name: str, status: int) -> None:
    fake_api.queue(Reply(status=status, body=fixture(name)))
    (request,) = CODEC.encode(outbound(Text(text="Hello")), encode_ctx(api_base=fake_api.base_url))
    async with aiohttp.ClientSession() as session:
        result = await deliver(session, CODEC, request, FAST)
    assert not result.ok and not result.retryable
    assert result.error is not None and result.error.message == fixture(name)["description"]
    assert len(fake_api.requests) == 1


async def test_deliver_does_not_wait_out_a_long_flood_ban(fake_api: FakeApi) -> None:
    flood = fixture("error_429_too_many_requests")
    flood["parameters"]["retry_after"] = 3600
    fake_api.queue(Reply(status=429, body=flood))
    (request,) = CODEC.encode(outbound(Text(text="Hello")), encode_ctx(api_base=fake_api.base_url))
    async with aiohttp.ClientSession() as session:
        result = await deliver(session, CODEC, request, FAST)
    assert not result.ok and result.retry_after == 3600
    assert len(fake_api.requests) == 1


# ----------------------------------------------------------------------------------------- polling


def test_poll_request_asks_for_updates_after_the_cursor() -> None:
    ctx = encode_ctx()
    first = CODEC.poll_request(ctx, "")
    assert first is not None and method_of(first) == "getUpdates"
    body = json.loads(first.body)
    assert "offset" not in body and body["timeout"] == 25
    assert {"message", "callback_query", "message_reaction", "my_chat_member"} <= set(body["allowed_updates"])
    later = CODEC.poll_request(msgspec.structs.replace(ctx, options={"poll_timeout": 50}), "306197399")
    assert later is not None
    assert json.loads(later.body)["offset"] == 306197399
    assert json.loads(later.body)["timeout"] == 50


async def test_a_polling_round_yields_webhook_shaped_records_and_the_next_cursor(fake_api: FakeApi) -> None:
    fake_api.queue(Reply(body=fixture("get_updates_two")))
    request = CODEC.poll_request(encode_ctx(api_base=fake_api.base_url), "10000")
    assert request is not None
    async with aiohttp.ClientSession() as session:
        response = await perform(session, request, 5)
    result = CODEC.parse_poll(request, response, "10000")
    assert result.error is None
    assert result.cursor == "892252935"  # the highest update_id + 1
    assert fake_api.requests[0].path == f"/bot{TOKEN}/getUpdates"
    assert fake_api.requests[0].json()["offset"] == 10000
    texts = []
    for record in result.records:
        (message,) = CODEC.decode(record, DECODE)
        assert isinstance(message, Message)
        texts.append(message.parts)
    assert texts == [[Text(text="/start")], [Text(text="hello there")]]


def test_a_failed_poll_keeps_the_cursor_and_reports_the_error() -> None:
    request = CODEC.poll_request(encode_ctx(), "7")
    assert request is not None
    conflict = CODEC.parse_poll(request, answer("error_409_conflict", 409), "7")
    assert conflict.cursor == "7" and conflict.records == []
    assert conflict.error is not None and conflict.error.code == "telegram_409"
    assert CODEC.parse_poll(request, answer("error_502_bad_gateway", 502), "7").error is not None
    empty = CODEC.parse_poll(request, HttpResponse(body=b'{"ok":true,"result":[]}'), "7")
    assert (empty.cursor, empty.records, empty.error) == ("7", [], None)


# ------------------------------------------------------------------------------------ corpus sweep


def corpus_files() -> list[Path]:
    return codeckit.corpus_files(CORPUS)


#: Corpus files that hold a bare object of the Update field named here: wrapped, they must decode.
WRAPPABLE = {"message_object": "message", "callback_query_object": "callback_query", "poll_object": "poll"}


@pytest.mark.skipif(not CORPUS.is_dir(), reason="the shared corpus is not beside this checkout")
def test_corpus_has_telegram_payloads() -> None:
    assert len(corpus_files()) > 100


@pytest.mark.skipif(not CORPUS.is_dir(), reason="the shared corpus is not beside this checkout")
@pytest.mark.parametrize("path", corpus_files(), ids=lambda path: path.stem)
def test_every_corpus_payload_decodes_or_says_where_it_is_wrong(path: Path) -> None:
    body = path.read_bytes()
    try:
        envelopes = CODEC.decode(HttpRequest(body=body), DECODE)
    except DecodeError as exc:
        assert exc.path.startswith("$")
    else:
        assert envelopes
        for envelope in envelopes:
            assert canonical.decode(canonical.encode(envelope)) == envelope
    field = next((name for marker, name in WRAPPABLE.items() if marker in path.stem), None)
    if field is not None:
        update = {"update_id": 1, field: json.loads(body)}
        (envelope,) = CODEC.decode(HttpRequest(body=json.dumps(update).encode()), DECODE)
        assert canonical.decode(canonical.encode(envelope)) == envelope


@pytest.mark.parametrize("message", [None, "0x10", [1]])
def test_a_message_that_is_no_object_is_a_decode_error(message: Any) -> None:
    """Found by tests/test_fuzz_codecs.py: lenient reading took the message for an object (TypeError,
    ValueError) instead of saying what is wrong."""
    with pytest.raises(DecodeError) as raised:
        CODEC.decode(HttpRequest(body=json.dumps({"update_id": 508, "message": message}).encode()), DECODE)
    assert raised.value.path == "$.message"
