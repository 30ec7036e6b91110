"""The Slack codec on real payloads (tests/fixtures/slack, sources in SOURCES.md) and against a local fake
of the Web API: signatures, the URL challenge, retries, decoding to canonical meaning, Block Kit requests
and what Slack's answers mean."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from babelhub import canonical
from babelhub.canonical import (
    Action,
    Activity,
    Button,
    Buttons,
    Card,
    Conversation,
    Delete,
    Edit,
    List,
    ListRow,
    ListSection,
    Location,
    Media,
    Message,
    Native,
    Part,
    Reaction,
    Text,
    Unsupported,
)
from babelhub.codecs import native
from babelhub.codecs.base import DecodeContext, EncodeContext, HttpRequest, HttpResponse, OutboundRequest
from babelhub.codecs.degrade import degrade
from babelhub.codecs.slack import SlackCodec, emoji_from_name, mrkdwn_to_markdown, sign, slack_emoji_name
from babelhub.errors import DecodeError, EncodeError, SignatureError
from babelhub.services.delivery import RetryPolicy
from tests import codeckit
from tests.codeckit import Fixtures, Ids, corpus_files, deliver_one, outbound_message, response
from tests.fakeapi import FakeApi, Recorded, Reply

FIXTURES = Fixtures("slack")
CORPUS = codeckit.CORPUS / "slack"
TENANT, CONNECTION = "acme", "slack-main"
CTX = DecodeContext(tenant=TENANT, connection=CONNECTION, seq=42)
SECRET = "test-signing-secret"
RECEIVED_AT = 1_700_000_000.0
FORM = "application/x-www-form-urlencoded"
FAST = RetryPolicy(attempts=5, base_delay=0.001, max_delay=0.002)

codec = SlackCodec()


# ------------------------------------------------------------------------------------------ helpers


fixture = FIXTURES.json


IDS = Ids(TENANT, CONNECTION, "slack")
mid, person, channel_conversation = IDS.message, IDS.sender, IDS.conversation


def signed(
    body: bytes, content_type: str, *, at: float = RECEIVED_AT, extra: dict[str, str] | None = None
) -> HttpRequest:
    """A request as Slack sends it: signed with SECRET at `at`, received at RECEIVED_AT."""
    timestamp = str(int(at))
    headers = {
        "content-type": content_type,
        "x-slack-request-timestamp": timestamp,
        "x-slack-signature": sign(SECRET, timestamp, body),
        **(extra or {}),
    }
    return HttpRequest(path="/webhooks/slack/slack-main", headers=headers, body=body, received_at=RECEIVED_AT)


def event(name: str, extra: dict[str, str] | None = None) -> HttpRequest:
    return signed((FIXTURES / name).read_bytes(), "application/json", extra=extra)


def interaction(payload: Any) -> HttpRequest:
    """Interactivity payloads arrive as a form with one field, `payload`, holding the JSON."""
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return signed(urlencode({"payload": text}).encode(), FORM)


def decode_one(request: HttpRequest, ctx: DecodeContext = CTX) -> canonical.Envelope:
    envelopes = codec.decode(request, ctx)
    assert len(envelopes) == 1, envelopes
    return envelopes[0]


def decode_message(request: HttpRequest, ctx: DecodeContext = CTX) -> Message:
    envelope = decode_one(request, ctx)
    assert isinstance(envelope, Message)
    return envelope


# ---------------------------------------------------------------------------------------- signature


def test_signature_matches_slacks_documented_example() -> None:
    vector = fixture("signature_vector.json")
    timestamp = vector["x-slack-request-timestamp"]
    request = HttpRequest(
        headers={"x-slack-request-timestamp": timestamp, "x-slack-signature": vector["x-slack-signature"]},
        body=vector["body"].encode(),
        received_at=float(timestamp) + 10,
    )
    codec.verify(request, {"signing_secret": vector["signing_secret"]})


def test_a_good_signature_within_the_window_verifies() -> None:
    codec.verify(event("event_message_rich_text.json"), {"signing_secret": SECRET})
    codec.verify(signed(b"{}", "application/json", at=RECEIVED_AT - 299), {"signing_secret": SECRET})


def test_a_bad_signature_is_refused() -> None:
    request = event("event_message_rich_text.json")
    tampered = HttpRequest(headers=request.headers, body=request.body + b" ", received_at=RECEIVED_AT)
    with pytest.raises(SignatureError, match="does not match"):
        codec.verify(tampered, {"signing_secret": SECRET})
    with pytest.raises(SignatureError, match="does not match"):
        codec.verify(request, {"signing_secret": "another-secret"})


def test_missing_signature_headers_or_secret_are_refused() -> None:
    request = event("event_message_rich_text.json")
    for header in ("x-slack-signature", "x-slack-request-timestamp"):
        headers = {name: value for name, value in request.headers.items() if name != header}
        stripped = HttpRequest(headers=headers, body=request.body, received_at=RECEIVED_AT)
        with pytest.raises(SignatureError, match="missing"):
            codec.verify(stripped, {"signing_secret": SECRET})
    with pytest.raises(SignatureError, match="signing_secret"):
        codec.verify(request, {})


@pytest.mark.parametrize("skew", [-301, 301, -86_400])
def test_a_stale_or_future_timestamp_is_refused_even_when_signed(skew: float) -> None:
    request = signed(
        (FIXTURES / "event_message_rich_text.json").read_bytes(), "application/json", at=RECEIVED_AT + skew
    )
    with pytest.raises(SignatureError, match="stale or replayed"):
        codec.verify(request, {"signing_secret": SECRET})


# ---------------------------------------------------------------------------------------- handshake


def test_url_verification_is_answered_with_the_challenge() -> None:
    response = codec.handshake(event("url_verification.json"), {"signing_secret": SECRET})
    assert response is not None
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    assert json.loads(response.body) == {"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"}
    assert codec.decode(event("url_verification.json"), CTX) == []


def test_a_slash_command_ssl_check_is_answered_with_200() -> None:
    request = signed(b"ssl_check=1&token=verification_token", FORM)
    response = codec.handshake(request, {"signing_secret": SECRET})
    assert response is not None and response.status == 200
    assert codec.decode(request, CTX) == []


def test_an_unsigned_challenge_is_refused() -> None:
    request = event("url_verification.json")
    with pytest.raises(SignatureError):
        codec.handshake(request, {"signing_secret": "another-secret"})


def test_ordinary_deliveries_are_no_handshake() -> None:
    secrets = {"signing_secret": SECRET}
    assert codec.handshake(event("event_message_rich_text.json"), secrets) is None
    assert codec.handshake(interaction(fixture("interaction_block_actions_button.json")), secrets) is None
    assert codec.handshake(signed(b"{not json", "application/json"), secrets) is None


# ------------------------------------------------------------------------------------ retries, dedup


def test_a_retried_delivery_has_the_same_dedup_key_and_decodes_to_the_same_envelopes() -> None:
    first = event("event_message_mrkdwn.json")
    retry = event("event_message_mrkdwn.json", {"x-slack-retry-num": "1", "x-slack-retry-reason": "http_timeout"})
    assert codec.dedup_key(first) == codec.dedup_key(retry) == "Ev123ABC456"
    assert codec.decode(first, CTX) == codec.decode(retry, CTX)


def test_dedup_keys_of_interactions_commands_and_unreadable_bodies() -> None:
    assert codec.dedup_key(interaction(fixture("interaction_block_actions_button.json"))) == "111.222.valid"
    command = fixture("slash_command.json")
    assert codec.dedup_key(signed(command["_raw"].encode(), FORM)) == "111.111.xxx"
    assert codec.dedup_key(event("url_verification.json")) == ""
    for broken, path in ((b"[1, 2", "$"), (b"[1, 2]", "$"), (b"payload=%7Bno", "payload")):
        with pytest.raises(DecodeError) as raised:
            codec.dedup_key(signed(broken, "application/json" if broken.startswith(b"[") else FORM))
        assert raised.value.path == path


# ---------------------------------------------------------------------------------- decode: messages


def test_a_channel_message_in_mrkdwn_becomes_markdown_with_mentions() -> None:
    message = decode_message(event("event_message_mrkdwn.json"))
    native_id = "C123ABC456:1355517523.000005"
    assert message.id == mid(native_id)
    assert message.native == Native(id=native_id, seq=42)
    assert message.conversation == channel_conversation("C123ABC456", "channel")
    assert message.sender is not None
    assert (message.sender.id, message.sender.native_id, message.sender.role) == (
        person("U123ABC456"),
        "U123ABC456",
        "user",
    )
    assert message.ts.replace(microsecond=0) == datetime(2012, 12, 14, 20, 38, 43, tzinfo=UTC)
    assert message.direction == "inbound" and message.reply_to == "" and message.thread == ""
    (text,) = message.parts
    assert isinstance(text, Text)
    assert text.format == "markdown"
    assert text.text == (
        "Hi @ana, **release** is ~~today~~ _maybe_: see [the notes](https://example.com/notes?a=1&b=2) "
        "in #general <3 `x*y*z` @here"
    )
    (mention,) = text.mentions
    assert (mention.id, mention.native_id, mention.name) == (person("U222BBB222"), "U222BBB222", "ana")
    assert text.text[mention.offset : mention.offset + mention.length] == "@ana"
    assert message.meta["slack.text"].startswith("Hi <@U222BBB222|ana>")


def test_a_message_with_rich_text_blocks_keeps_the_blocks_in_meta() -> None:
    message = decode_message(event("event_message_rich_text.json"))
    assert message.id == mid("C111:1596183880.004200")
    assert message.parts == [Text(text="Hello World!", format="markdown")]
    assert message.meta["slack.blocks"][0]["type"] == "rich_text"
    assert "slack.text" not in message.meta  # nothing was converted


def test_a_thread_reply_stays_in_the_channel_and_records_its_thread() -> None:
    message = decode_message(event("event_message_thread_reply.json"))
    assert message.id == mid("C111:1726133700.887259")
    assert message.conversation == channel_conversation("C111", "channel")
    assert message.thread == mid("C111:1726133698.626339")
    assert message.native is not None and message.native.thread == "C111:1726133698.626339"
    assert message.parts == [Text(text="When Slack was released?", format="markdown")]
    # the thread's root carries its own ts as thread_ts: it is not in a thread of its own
    root = fixture("event_message_thread_reply.json")
    root["event"]["ts"] = root["event"]["thread_ts"]
    assert decode_message(signed(json.dumps(root).encode(), "application/json")).thread == ""


def test_a_direct_message_is_a_direct_conversation() -> None:
    message = decode_message(event("event_message_im.json"))
    assert message.conversation == channel_conversation("D111", "direct")
    assert message.sender is not None and message.sender.native_id == "W222"


def test_a_thread_broadcast_is_a_message_in_the_thread() -> None:
    message = decode_message(event("event_thread_broadcast.json"))
    assert message.thread == mid("C111:1633663824.000500")
    assert message.parts == [Text(text="Hi there!", format="markdown")]
    assert message.meta["slack.subtype"] == "thread_broadcast"


def test_an_app_mention_is_a_message_with_the_mention_and_the_same_id_as_the_message_event() -> None:
    message = decode_message(event("event_app_mention.json"))
    assert message.id == mid("C111:1595926230.009600")
    (text,) = message.parts
    assert isinstance(text, Text)
    assert text.text == "@W111 Hi there!"
    assert [(m.native_id, m.offset, m.length) for m in text.mentions] == [("W111", 0, 5)]
    assert message.meta["slack.event"] == "app_mention"


def test_a_file_share_becomes_text_and_media_that_need_the_bot_token() -> None:
    message = decode_message(event("event_file_share.json"))
    assert message.id == mid("C111:1652227646.593159")
    assert message.parts[0] == Text(text="Hi there!", format="markdown")
    assert message.parts[1] == Media(
        media="image",
        url="https://files.slack.com/files-pri/T111-F111/file.png",
        file_id="F111",
        mime="image/png",
        size=92582,
        filename="file.png",
        width=1134,
        height=362,
    )
    assert message.meta["slack.files_need_token"] is True


def test_message_changed_is_an_edit_of_the_original_message() -> None:
    message = decode_message(event("event_message_changed.json"))
    assert message.id == mid("C111:1665102362.013600")
    assert message.parts[0] == Edit(target=mid("C111:1665102338.901939"))
    assert message.parts[1] == Text(text="updated message", format="markdown")
    assert message.sender is not None and message.sender.native_id == "U111"


def test_message_deleted_is_a_delete_of_the_original_message() -> None:
    message = decode_message(event("event_message_deleted.json"))
    assert message.parts == [Delete(target=mid("C111:1665368619.804829"))]
    assert message.conversation.native_id == "C111"
    assert message.sender is None  # Slack does not say who deleted it


def test_the_bots_own_messages_are_never_reingested() -> None:
    # authorizations[] names the installation's bot user (UB111), who sent this message
    assert codec.decode(event("event_bot_message_own.json"), CTX) == []
    # the connection can also name its bot user or bot id
    by_user = DecodeContext(tenant=TENANT, connection=CONNECTION, options={"bot_user_id": "W111"})
    assert codec.decode(event("event_message_rich_text.json"), by_user) == []
    by_bot = DecodeContext(tenant=TENANT, connection=CONNECTION, options={"bot_id": "B888"})
    assert codec.decode(event("event_bot_message_other.json"), by_bot) == []


def test_another_bots_message_is_decoded_with_role_bot() -> None:
    message = decode_message(event("event_bot_message_other.json"))
    assert message.sender is not None
    assert (message.sender.native_id, message.sender.name, message.sender.role) == ("B888", "classic-bot", "bot")
    assert message.parts == [Text(text="Hi there! Thanks for sharing the info!", format="markdown")]


def test_an_unhandled_message_subtype_is_kept_as_unsupported() -> None:
    body = fixture("event_message_rich_text.json")
    body["event"] |= {"subtype": "channel_join", "text": "<@W111> has joined the channel"}
    message = decode_message(signed(json.dumps(body).encode(), "application/json"))
    assert message.parts == [Unsupported(reason="slack message subtype channel_join", native=body["event"])]
    assert message.id == mid("C111:1596183880.004200")


# --------------------------------------------------------------------------- decode: other events


def test_reaction_added_targets_the_reacted_message() -> None:
    message = decode_message(event("event_reaction_added.json"))
    assert message.parts == [Reaction(emoji="😍", target=mid("C111:1599529504.000400"))]
    assert message.sender is not None and message.sender.native_id == "W111"
    assert message.meta["slack.reaction"] == "heart_eyes"
    assert message.conversation.native_id == "C111"


def test_reaction_removed_is_a_removed_reaction() -> None:
    message = decode_message(event("event_reaction_removed.json"))
    assert message.parts == [Reaction(emoji="👍", target=mid("C123ABC456:1360782400.498405"), removed=True)]
    assert message.ts.replace(microsecond=0) == datetime(2013, 2, 13, 19, 13, 24, tzinfo=UTC)


def test_the_bots_own_reactions_are_not_reingested() -> None:
    ours = DecodeContext(tenant=TENANT, connection=CONNECTION, options={"bot_user_id": "W111"})
    assert codec.decode(event("event_reaction_added.json"), ours) == []


def test_members_joining_and_leaving_are_activities() -> None:
    joined = decode_one(event("event_member_joined_channel.json"))
    assert isinstance(joined, Activity)
    assert joined.activity == "joined"
    assert joined.conversation == channel_conversation("C111", "channel")
    assert joined.sender is not None and joined.sender.native_id == "U999"
    assert joined.meta == {"slack.inviter": "U222"}
    assert joined.ts == datetime.fromtimestamp(1599616881, UTC)
    left = decode_one(event("event_member_left_channel.json"))
    assert isinstance(left, Activity) and left.activity == "left"


def test_any_other_event_is_kept_whole_as_unsupported() -> None:
    body = fixture("event_app_home_opened.json")
    message = decode_message(event("event_app_home_opened.json"))
    assert message.parts == [Unsupported(reason="slack event app_home_opened", native=body["event"])]
    assert message.conversation == channel_conversation("D111", "direct")


# ------------------------------------------------------------------------- decode: interactivity


def test_a_button_click_is_an_action_on_its_source_message() -> None:
    message = decode_message(interaction(fixture("interaction_block_actions_button.json")))
    assert message.parts == [Action(id="a", title="Button", source=mid("C111:111.222"))]
    assert message.conversation == channel_conversation("C111", "channel")
    assert message.sender is not None
    assert (message.sender.native_id, message.sender.name) == ("W111", "primary-owner")
    assert message.ts == datetime(2020, 8, 4, 8, 39, 45, 194939, tzinfo=UTC)
    assert message.meta["slack.trigger_id"] == "111.222.valid"
    assert message.meta["slack.response_url"] == "https://hooks.slack.com/actions/T111/111/random-value"
    assert message.meta["slack.actions"][0]["value"] == "click_me_123"


def test_a_select_choice_is_an_action_with_the_chosen_rows_id() -> None:
    message = decode_message(interaction(fixture("interaction_block_actions_static_select.json")))
    assert message.parts == [Action(id="plan_pro", title="Pro plan", source=mid("C111:1596530300.000100"))]
    assert message.thread == mid("C111:1596530000.000200")


def test_other_interactions_are_kept_whole_as_unsupported_but_for_the_verification_token() -> None:
    payload = fixture("interaction_view_submission.json")
    message = decode_message(interaction(payload))
    # `token` is the app's legacy verification token: a credential, never published with an envelope.
    kept = {key: value for key, value in payload.items() if key != "token"}
    assert message.parts == [Unsupported(reason="slack payload view_submission", native=kept)]
    assert message.sender is not None and message.sender.native_id == "W111"
    assert "verification_token" not in canonical.encode(message).decode()


@pytest.mark.parametrize("name", ["event_app_home_opened.json", "event_message_rich_text.json"])
def test_no_kept_event_carries_a_verification_token(name: str) -> None:
    body = fixture(name)
    body["event"]["token"] = "verification_token"  # old apps saw it inside events as well
    if name == "event_message_rich_text.json":
        body["event"]["subtype"] = "channel_join"  # kept whole as Unsupported
    message = decode_message(signed(json.dumps(body).encode(), "application/json"))
    assert "verification_token" not in canonical.encode(message).decode()


def test_a_slash_command_is_the_text_the_user_typed() -> None:
    command = fixture("slash_command.json")
    message = decode_message(signed(command["_raw"].encode(), command["_content_type"]))
    assert message.parts == [Text(text="/hello-world Hi", format="markdown")]
    assert message.conversation == channel_conversation("C111", "channel")
    assert message.sender is not None and message.sender.name == "primary-owner"
    assert message.meta["slack.response_url"] == "https://hooks.slack.com/commands/T111/111/xxxxx"
    assert "verification_token" not in canonical.encode(message).decode()


# -------------------------------------------------------------------------------- decode: errors


def test_an_interaction_payload_nested_beyond_reading_is_refused_at_payload() -> None:
    # 80,000 deep: 480 KB as a form, under the webhook's 512 KiB, and beyond what msgspec reads
    deep = '{"type": "block_actions", "actions": ' + "[" * 80_000 + "]" * 80_000 + "}"
    request = interaction(deep)
    for read in (codec.dedup_key, lambda request: codec.decode(request, CTX)):
        with pytest.raises(DecodeError) as refused:
            read(request)
        assert refused.value.path == "payload"
        assert "nested too deeply" in refused.value.reason


def test_a_slash_command_of_more_form_fields_than_the_limit_is_refused() -> None:
    command = fixture("slash_command.json")
    fields = command["_raw"].count("&") + 1
    padding = "".join(f"&pad{index}=x" for index in range(native.MAX_FORM_FIELDS - fields))
    at_the_limit = signed((command["_raw"] + padding).encode(), FORM)
    assert decode_message(at_the_limit).parts == [Text(text="/hello-world Hi", format="markdown")]
    with pytest.raises(DecodeError) as refused:
        codec.decode(signed((command["_raw"] + padding + "&one=more").encode(), FORM), CTX)
    assert refused.value.path == "$"
    assert str(native.MAX_FORM_FIELDS) in refused.value.reason



def test_undecodable_input_names_the_path() -> None:
    cases: list[tuple[HttpRequest, str]] = []
    cases.append((signed(b"{broken", "application/json"), "$"))
    cases.append((signed(b"[1, 2]", "application/json"), "$"))
    cases.append((signed(b'{"token": "x"}', "application/json"), "$.type"))
    body = fixture("event_message_rich_text.json")
    body["event"]["ts"] = 1596183880
    cases.append((signed(json.dumps(body).encode(), "application/json"), "$.event.ts"))
    reaction = fixture("event_reaction_added.json")
    del reaction["event"]["item"]
    cases.append((signed(json.dumps(reaction).encode(), "application/json"), "$.event"))
    cases.append((interaction("{not json"), "payload"))
    click = fixture("interaction_block_actions_button.json")
    click["actions"][0]["action_ts"] = "soon"
    cases.append((interaction(click), "payload.actions[0].action_ts"))
    del click["user"]
    cases.append((interaction(click), "payload"))
    for ts in ("1e999", "nan", "-1e300"):  # numbers, but no moment in time
        body = fixture("event_message_rich_text.json")
        body["event"]["ts"] = ts
        cases.append((signed(json.dumps(body).encode(), "application/json"), "$.event.ts"))
    member = fixture("event_member_joined_channel.json")
    member["event_time"] = 10**20
    cases.append((signed(json.dumps(member).encode(), "application/json"), "$.event_time"))
    for request, path in cases:
        with pytest.raises(DecodeError) as raised:
            codec.decode(request, CTX)
        assert raised.value.path == path, (request.body[:60], raised.value)


# ----------------------------------------------------------------------------------- mrkdwn, emoji


def test_mrkdwn_conversion_details() -> None:
    text, mentions = mrkdwn_to_markdown("*hi <@U1|bo>* and `*x*` and ```*y*``` 2*3*4", person)
    assert text == "**hi @bo** and `*x*` and ```\n*y*\n``` 2*3*4"
    (mention,) = mentions
    assert text[mention.offset : mention.offset + mention.length] == "@bo"
    assert mrkdwn_to_markdown("<https://a.example> <mailto:x@y.z|x@y.z> <!subteam^S1|@devs> <#C1>", person)[0] == (
        "https://a.example [x@y.z](mailto:x@y.z) @devs #C1"
    )
    assert mrkdwn_to_markdown("a &amp;lt; b &lt; c &gt; d", person)[0] == "a &lt; b < c > d"


def test_emoji_names_both_ways() -> None:
    assert emoji_from_name("+1") == "👍"
    assert emoji_from_name("heart") == "❤️"
    assert emoji_from_name("thumbsup::skin-tone-2") == "👍🏻"
    assert emoji_from_name("partyparrot") == ":partyparrot:"
    assert slack_emoji_name("❤️") == "heart"
    assert slack_emoji_name("👍🏽") == "thumbsup::skin-tone-4"
    assert slack_emoji_name(":partyparrot:") == "partyparrot"
    with pytest.raises(EncodeError, match=":name:"):
        slack_emoji_name("🦩")


# --------------------------------------------------------------------------------------- encode


def outbound(*parts: Part, **fields: Any) -> Message:
    conversation = Conversation(id="conv", channel="slack", connection=CONNECTION, native_id="C111")
    return outbound_message(TENANT, conversation, parts, id="m1", **fields)


def encode_ctx(api_base: str = "", **native_ids: str) -> EncodeContext:
    return EncodeContext(
        tenant=TENANT,
        connection=CONNECTION,
        to="C111",
        api_base=api_base,
        secrets={"bot_token": "xoxb-test-token"},
        native_ids=native_ids,
    )


HEADERS = {"Authorization": "Bearer xoxb-test-token", "Content-Type": "application/json; charset=utf-8"}


def calls(message: Message, ctx: EncodeContext | None = None) -> list[tuple[str, Any]]:
    """(method, body JSON) of each request, after checking what every request shares."""
    requests = codec.encode(message, ctx or encode_ctx())
    for index, request in enumerate(requests):
        assert request.method == "POST"
        assert request.url.startswith("https://slack.com/api/")
        assert request.headers == HEADERS
        assert request.idempotency_key == f"m1:{index}"
        assert request.message_id == "m1"
    return [(request.url.rsplit("/", 1)[1], without_reference(request)) for request in requests]


def without_reference(request: OutboundRequest) -> Any:
    """The body of a call, without the reference every post carries for lookups (checked here)."""
    body = json.loads(request.body)
    if request.url.endswith("/chat.postMessage"):
        assert body.pop("metadata") == {"event_type": "babelhub_message",
                                        "event_payload": {"babelhub_call": request.idempotency_key}}
    return body


def test_a_lone_text_is_a_plain_chat_post_message() -> None:
    assert calls(outbound(Text(text="*Deploy* done", format="slack"))) == [
        ("chat.postMessage", {"channel": "C111", "text": "*Deploy* done"})
    ]
    assert calls(outbound(Text(text="2*3*4", format="plain"))) == [
        ("chat.postMessage", {"channel": "C111", "text": "2*3*4", "mrkdwn": False})
    ]


def test_text_followed_by_buttons_is_one_message_with_an_actions_block() -> None:
    message = outbound(
        Text(text="Pick one:", format="slack"),
        Buttons(
            buttons=[
                Button(id="yes", title="Yes"),
                Button(id="docs", title="Docs", action="url", value="https://example.com/docs"),
                Button(id="buy", title="Buy", action="postback", value="sku=42"),
            ]
        ),
    )
    assert calls(message) == [
        (
            "chat.postMessage",
            {
                "channel": "C111",
                "text": "Pick one:",
                "blocks": [
                    {"type": "section", "text": {"type": "mrkdwn", "text": "Pick one:"}},
                    {
                        "type": "actions",
                        "elements": [
                            {
                                "type": "button",
                                "text": {"type": "plain_text", "text": "Yes"},
                                "action_id": "yes",
                                "value": "yes",
                            },
                            {
                                "type": "button",
                                "text": {"type": "plain_text", "text": "Docs"},
                                "action_id": "docs",
                                "url": "https://example.com/docs",
                            },
                            {
                                "type": "button",
                                "text": {"type": "plain_text", "text": "Buy"},
                                "action_id": "buy",
                                "value": "sku=42",
                            },
                        ],
                    },
                ],
            },
        )
    ]


def test_a_list_is_a_static_select_beside_its_text() -> None:
    menu = List(
        text="Choose a plan",
        button="Plans",
        header="Pricing",
        footer="Prices in EUR & excl. VAT",
        sections=[
            ListSection(
                rows=[ListRow(id="basic", title="Basic"), ListRow(id="pro", title="Pro", description="For teams")]
            )
        ],
    )
    ((method, body),) = calls(outbound(menu))
    assert method == "chat.postMessage"
    assert body["blocks"] == [
        {"type": "header", "text": {"type": "plain_text", "text": "Pricing"}},
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": "Choose a plan"},
            "accessory": {
                "type": "static_select",
                "action_id": "list_0",
                "placeholder": {"type": "plain_text", "text": "Plans"},
                "options": [
                    {"text": {"type": "plain_text", "text": "Basic"}, "value": "basic"},
                    {
                        "text": {"type": "plain_text", "text": "Pro"},
                        "value": "pro",
                        "description": {"type": "plain_text", "text": "For teams"},
                    },
                ],
            },
        },
        {"type": "context", "elements": [{"type": "mrkdwn", "text": "Prices in EUR &amp; excl. VAT"}]},
    ]


def test_list_texts_over_block_kit_limits_are_cut_not_refused_by_slack() -> None:
    # header text and placeholder: 150 characters; option description and group label: 75.
    menu = List(
        header="H" * 200,
        button="P" * 151,
        sections=[
            ListSection(title="G" * 76, rows=[ListRow(id="a", title="A", description="d" * 80)]),
            ListSection(title="Short", rows=[ListRow(id="b", title="B", description="d" * 75)]),
        ],
    )
    ((_, body),) = calls(outbound(menu))
    header, actions = body["blocks"]
    assert header["text"]["text"] == "H" * 149 + "\u2026"
    (select,) = actions["elements"]
    assert select["placeholder"]["text"] == "P" * 149 + "\u2026"
    first, second = select["option_groups"]
    assert first["label"]["text"] == "G" * 74 + "\u2026"
    assert first["options"][0]["description"]["text"] == "d" * 74 + "\u2026"
    assert second["label"]["text"] == "Short"
    assert second["options"][0]["description"]["text"] == "d" * 75  # at the limit: kept whole


def test_text_beside_buttons_over_a_sections_3000_characters_goes_before_them() -> None:
    assert codec.capabilities.choice_text_limit == 3000
    long_text = " ".join(["word"] * 1000)  # 4,999 characters
    buttons = Buttons(text=long_text, buttons=[Button(id="ok", title="OK")])
    degraded = degrade(outbound(buttons), codec.capabilities)
    *before, last = degraded.parts
    assert isinstance(last, Buttons) and 0 < len(last.text) <= 3000
    assert all(isinstance(part, Text) for part in before) and before
    for _, body in calls(degraded):
        for block in body.get("blocks", []):
            if block["type"] == "section":
                assert len(block["text"]["text"]) <= 3000


def test_a_list_with_sections_uses_option_groups_in_an_actions_block() -> None:
    menu = List(
        sections=[
            ListSection(title="Fruit", rows=[ListRow(id="apple", title="Apple")]),
            ListSection(title="Nuts", rows=[ListRow(id="pecan", title="Pecan")]),
        ]
    )
    ((_, body),) = calls(outbound(menu))
    (block,) = body["blocks"]
    assert block["type"] == "actions"
    (select,) = block["elements"]
    assert [group["label"]["text"] for group in select["option_groups"]] == ["Fruit", "Nuts"]
    assert select["option_groups"][1]["options"] == [
        {"text": {"type": "plain_text", "text": "Pecan"}, "value": "pecan"}
    ]


def test_media_are_image_blocks_or_links_and_need_a_url() -> None:
    message = outbound(
        Media(media="image", url="https://cdn.example.com/cat.png", caption="A cat"),
        Media(media="image", url="https://files.slack.com/files-pri/T1-F1/cat.png"),
        Media(media="document", url="https://cdn.example.com/report.pdf", filename="report <Q3>.pdf"),
    )
    ((_, body),) = calls(message)
    assert body["text"] == "A cat"
    assert body["blocks"] == [
        {
            "type": "image",
            "image_url": "https://cdn.example.com/cat.png",
            "alt_text": "A cat",
            "title": {"type": "plain_text", "text": "A cat"},
        },
        {
            "type": "image",
            "slack_file": {"url": "https://files.slack.com/files-pri/T1-F1/cat.png"},
            "alt_text": "image",
        },
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": "<https://cdn.example.com/report.pdf|report &lt;Q3&gt;.pdf>"},
        },
    ]
    with pytest.raises(EncodeError, match="url"):
        codec.encode(outbound(Media(media="voice", data=b"OggS")), encode_ctx())


def test_a_card_is_a_section_with_an_image_accessory_and_its_buttons() -> None:
    card = Card(
        title="Red shoes",
        subtitle="49 EUR & free shipping",
        media=Media(media="image", url="https://cdn.example.com/shoes.jpg"),
        buttons=[Button(id="buy", title="Buy", action="postback", value="sku-1")],
    )
    ((_, body),) = calls(outbound(card))
    assert body["blocks"] == [
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": "*Red shoes*\n49 EUR &amp; free shipping"},
            "accessory": {"type": "image", "image_url": "https://cdn.example.com/shoes.jpg", "alt_text": "Red shoes"},
        },
        {
            "type": "actions",
            "elements": [
                {"type": "button", "text": {"type": "plain_text", "text": "Buy"}, "action_id": "buy", "value": "sku-1"}
            ],
        },
    ]


@pytest.mark.parametrize(
    "media",
    [
        Media(media="image", file_id="F0123"),
        Media(media="image", data=b"\x89PNG"),
        Media(media="document", file_id="F0123", filename="terms.pdf"),
    ],
)
def test_a_card_whose_media_has_no_url_is_an_encode_error_naming_the_card(media: Media) -> None:
    # Blocks show files by URL: the card must not go out silently without its image.
    card = Card(title="Red shoes", media=media, buttons=[Button(id="buy", title="Buy", action="postback")])
    with pytest.raises(EncodeError, match="Red shoes"):
        codec.encode(outbound(card), encode_ctx())


def test_replies_go_into_the_thread() -> None:
    ctx = encode_ctx(root="C111:1700000000.000100", question="C111:1700000050.000200")
    in_thread = outbound(Text(text="ok", format="slack"), thread="root", reply_to="question")
    assert calls(in_thread, ctx)[0][1]["thread_ts"] == "1700000000.000100"
    answer = outbound(Text(text="ok", format="slack"), reply_to="question")
    assert calls(answer, ctx)[0][1]["thread_ts"] == "1700000050.000200"
    with pytest.raises(EncodeError, match="thread"):
        codec.encode(outbound(Text(text="ok"), thread="unknown"), ctx)


def test_an_edit_updates_the_message_and_replaces_its_blocks() -> None:
    ctx = encode_ctx(original="C111:1700000000.000200")
    assert calls(outbound(Edit(target="original"), Text(text="fixed *typo*", format="slack")), ctx) == [
        ("chat.update", {"channel": "C111", "ts": "1700000000.000200", "text": "fixed *typo*", "blocks": []})
    ]
    ((_, plain),) = calls(outbound(Edit(target="original"), Text(text="2*3", format="plain")), ctx)
    assert plain["blocks"] == [{"type": "section", "text": {"type": "plain_text", "text": "2*3"}}]
    with pytest.raises(EncodeError, match="edit target"):
        codec.encode(outbound(Edit(target="unknown"), Text(text="x")), ctx)
    with pytest.raises(EncodeError, match="new content"):
        codec.encode(outbound(Edit(target="original")), ctx)


def test_delete_and_reactions_are_their_own_calls_in_part_order() -> None:
    ctx = encode_ctx(original="C222:1700000000.000200")
    message = outbound(
        Text(text="first", format="slack"),
        Reaction(emoji="👍", target="original"),
        Reaction(emoji=":tada:", target="original", removed=True),
        Delete(target="original"),
        Text(text="last", format="slack"),
    )
    assert calls(message, ctx) == [
        ("chat.postMessage", {"channel": "C111", "text": "first"}),
        ("reactions.add", {"channel": "C222", "timestamp": "1700000000.000200", "name": "thumbsup"}),
        ("reactions.remove", {"channel": "C222", "timestamp": "1700000000.000200", "name": "tada"}),
        ("chat.delete", {"channel": "C222", "ts": "1700000000.000200"}),
        ("chat.postMessage", {"channel": "C111", "text": "last"}),
    ]
    with pytest.raises(EncodeError, match="reaction target"):
        codec.encode(outbound(Reaction(emoji="👍", target="unknown")), ctx)


def test_more_than_fifty_blocks_are_spread_over_several_messages() -> None:
    texts = [Text(text=f"line {n}", format="slack") for n in range(51)]
    first, second = calls(outbound(*texts))
    assert len(first[1]["blocks"]) == 50
    assert second == ("chat.postMessage", {"channel": "C111", "text": "line 50"})


def test_what_cannot_be_sent_is_refused_clearly() -> None:
    no_token = EncodeContext(tenant=TENANT, connection=CONNECTION, to="C111")
    with pytest.raises(EncodeError, match="bot_token"):
        codec.encode(outbound(Text(text="hi")), no_token)
    nowhere = EncodeContext(tenant=TENANT, connection=CONNECTION, to="", secrets={"bot_token": "x"})
    with pytest.raises(EncodeError, match="no channel"):
        codec.encode(outbound(Text(text="hi")), nowhere)
    with pytest.raises(EncodeError, match="location"):
        codec.encode(outbound(Text(text="here:"), Location(lat=1.0, lon=2.0)), encode_ctx())


def test_a_degraded_message_fits_one_chat_post_message() -> None:
    """What the hub sends: the shared degradation step with these capabilities, then encode."""
    message = outbound(
        Text(text="**Deploy** of <api> done: see [log](https://ci.example/l?a=1&b=2)", format="markdown"),
        Buttons(buttons=[Button(id="ok", title="OK")]),
        Media(media="document", url="https://ci.example/report.pdf", caption="report"),
        Text(text="word " * 700, format="plain"),  # 3,500 characters: more than a section takes
    )
    ((method, body),) = calls(degrade(message, codec.capabilities))
    assert method == "chat.postMessage"
    assert [block["type"] for block in body["blocks"]] == ["section", "actions", "section", "section", "section"]
    sections = [block["text"]["text"] for block in body["blocks"] if block["type"] == "section"]
    assert sections[0] == "*Deploy* of &lt;api&gt; done: see <https://ci.example/l?a=1&amp;b=2|log>"
    assert "https://ci.example/report.pdf" in sections[1]
    assert all(len(text) <= codec.capabilities.text_limit for text in sections)


def test_typing_has_no_web_api_call() -> None:
    typing = Activity(
        id="a1",
        tenant=TENANT,
        conversation=Conversation(id="conv", native_id="C111"),
        ts=canonical.now(),
        direction="outbound",
        activity="typing",
    )
    assert codec.encode_activity(typing, encode_ctx()) == []


# ------------------------------------------------------------------------------ parse_response


def answer(status: int, body: Any, **headers: str) -> HttpResponse:
    return response(status, body, headers)


REQUEST = OutboundRequest(method="POST", url="https://slack.com/api/chat.postMessage")


def test_success_answers_give_the_native_ids() -> None:
    posted = codec.parse_response(REQUEST, answer(200, fixture("response_chat_postMessage_ok.json")))
    assert posted.ok and posted.native_ids == ["C1H9RESGL:1503435956.000247"]
    updated = codec.parse_response(REQUEST, answer(200, fixture("response_chat_update_ok.json")))
    assert updated.native_ids == ["C024BE91L:1401383885.000061"]
    reacted = codec.parse_response(REQUEST, answer(200, {"ok": True}))
    assert reacted.ok and reacted.native_ids == []


def test_error_answers_say_whether_to_retry() -> None:
    refused = codec.parse_response(REQUEST, answer(200, {"ok": False, "error": "channel_not_found"}))
    assert not refused.ok and not refused.retryable
    assert refused.error is not None and refused.error.code == "channel_not_found"
    explained = codec.parse_response(
        REQUEST, answer(200, fixture("response_chat_postMessage_invalid_attachments.json"))
    )
    assert explained.error is not None and explained.error.message == "[ERROR] invalid_keys"
    transient = codec.parse_response(REQUEST, answer(200, {"ok": False, "error": "internal_error"}))
    assert transient.retryable and transient.error is not None and transient.error.retryable
    limited = codec.parse_response(REQUEST, answer(429, {"ok": False, "error": "ratelimited"}, **{"retry-after": "30"}))
    assert limited.retryable and limited.retry_after == 30
    assert limited.error is not None and limited.error.code == "ratelimited"
    down = codec.parse_response(REQUEST, answer(503, b"<html>Service Unavailable</html>"))
    assert down.retryable and down.error is not None and down.error.code == "http_503"
    garbled = codec.parse_response(REQUEST, answer(200, b"<html>"))
    assert not garbled.ok and not garbled.retryable and garbled.error is not None
    assert garbled.error.code == "invalid_response"


# ---------------------------------------------------------------------- delivery to a fake Web API


async def send(api: FakeApi, message: Message) -> tuple[Any, Recorded]:
    (request,) = codec.encode(message, encode_ctx(api.base_url))
    return await deliver_one(codec, request, FAST), api.requests[-1]


async def test_a_message_is_posted_to_the_web_api(fake_api: FakeApi) -> None:
    fake_api.responder = lambda _: Reply(body=fixture("response_chat_postMessage_ok.json"))
    result, recorded = await send(fake_api, outbound(Text(text="hello", format="slack")))
    assert result.ok and result.native_ids == ["C1H9RESGL:1503435956.000247"]
    assert (recorded.method, recorded.path) == ("POST", "/chat.postMessage")
    assert recorded.headers["authorization"] == "Bearer xoxb-test-token"
    assert recorded.headers["content-type"] == "application/json; charset=utf-8"
    posted = recorded.json()
    metadata = posted.pop("metadata")  # the post's own reference, for a lookup when its answer is lost
    assert metadata["event_type"] == "babelhub_message" and metadata["event_payload"]["babelhub_call"].endswith(":0")
    assert posted == {"channel": "C111", "text": "hello"}


async def test_rate_limits_and_server_errors_are_retried_until_ok(fake_api: FakeApi) -> None:
    fake_api.queue(
        Reply(status=429, body={"ok": False, "error": "ratelimited"}, headers={"Retry-After": "0"}),
        Reply(status=503, body=b"upstream unavailable"),
        Reply(body={"ok": False, "error": "internal_error"}),
    )
    fake_api.responder = lambda _: Reply(body={"ok": True, "channel": "C111", "ts": "1700000000.000300"})
    result, _ = await send(fake_api, outbound(Text(text="hello", format="slack")))
    assert result.ok and result.native_ids == ["C111:1700000000.000300"]
    assert len(fake_api.requests) == 4
    assert len({request.body for request in fake_api.requests}) == 1  # the same call each time


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (Reply(body={"ok": False, "error": "channel_not_found"}), "channel_not_found"),
        (Reply(body={"ok": False, "error": "invalid_auth"}), "invalid_auth"),  # Slack answers auth errors with 200
        (Reply(status=400, body={"ok": False, "error": "invalid_arguments"}), "invalid_arguments"),
        (Reply(status=403, body={"ok": False, "error": "not_allowed_token_type"}), "not_allowed_token_type"),
    ],
)
async def test_refusals_are_final(fake_api: FakeApi, reply: Reply, code: str) -> None:
    fake_api.queue(reply)
    result, _ = await send(fake_api, outbound(Text(text="hello", format="slack")))
    assert not result.ok and not result.retryable
    assert result.error is not None and result.error.code == code
    assert len(fake_api.requests) == 1


# ----------------------------------------------------------------------------------- corpus sweep

_INTERACTIONS = frozenset(
    {
        "block_actions",
        "block_suggestion",
        "dialog_cancellation",
        "dialog_submission",
        "dialog_suggestion",
        "interactive_message",
        "message_action",
        "shortcut",
        "view_closed",
        "view_submission",
        "workflow_step_edit",
    }
)


def _as_slack_sends_it(path: Path) -> HttpRequest:
    data = json.loads(path.read_bytes())
    if isinstance(data, dict) and "_raw" in data:  # a form body kept verbatim
        return signed(data["_raw"].encode(), data.get("_content_type", FORM))
    if isinstance(data, dict) and data.get("type") in _INTERACTIONS:
        return interaction(data)
    return signed(path.read_bytes(), "application/json")


def test_every_corpus_payload_decodes_or_raises_decode_error() -> None:
    files = corpus_files(CORPUS)
    if not files:
        pytest.skip(f"no Slack corpus at {CORPUS}")
    decoded = 0
    for path in files:
        request = _as_slack_sends_it(path)
        codec.verify(request, {"signing_secret": SECRET})
        try:
            codec.dedup_key(request)
            envelopes = codec.decode(request, CTX)
        except DecodeError:
            continue
        for envelope in envelopes:
            assert canonical.decode(canonical.encode(envelope)) == envelope, path.name
            assert envelope.conversation.channel == "slack" and envelope.native is not None, path.name
        decoded += len(envelopes)
    assert decoded > 0


def test_an_unreadable_file_is_an_unsupported_part_and_the_text_still_arrives() -> None:
    body = fixture("event_file_share.json")
    good = body["event"]["files"][0]
    broken = {**good, "size": "large"}
    body["event"]["files"] = [broken, good]
    (message,) = codec.decode(HttpRequest(body=json.dumps(body).encode(), received_at=RECEIVED_AT), CTX)
    assert isinstance(message, Message) and message.sender is not None
    text, unreadable, media = message.parts
    assert isinstance(text, Text) and text.text == "Hi there!"
    assert isinstance(unreadable, Unsupported) and "files[0].size" in unreadable.reason
    assert unreadable.native == broken
    assert isinstance(media, Media)
    assert canonical.decode(canonical.encode(message)) == message
