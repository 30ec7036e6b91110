"""The Discord codec on real-shaped payloads (tests/fixtures/discord, sources in SOURCES.md) and against a local
fake of the REST API: Ed25519 signatures, PING and deferred answers, decoding interactions and gateway events to
canonical meaning, the requests messages become, and what Discord's answers mean."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

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
    Form,
    FormField,
    List,
    ListRow,
    ListSection,
    Location,
    Media,
    Mention,
    Message,
    Native,
    Part,
    Reaction,
    Text,
    Unsupported,
    stable_id,
)
from babelhub.codecs import load
from babelhub.codecs.base import DecodeContext, EncodeContext, HttpRequest, HttpResponse, OutboundRequest
from babelhub.codecs.degrade import degrade
from babelhub.codecs.discord import USER_AGENT, DiscordCodec, reaction_emoji, snowflake_time
from babelhub.errors import DecodeError, EncodeError, SignatureError
from babelhub.services.delivery import RetryPolicy
from tests import codeckit
from tests.codeckit import Fixtures, Ids, corpus_files, deliver_one, outbound_message, response
from tests.fakeapi import FakeApi, Recorded, Reply

FIXTURES = Fixtures("discord")
CORPUS = codeckit.CORPUS / "discord"
SPEC = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "specs" / "discord_openapi.json"
TENANT, CONNECTION = "acme", "discord-main"
CTX = DecodeContext(tenant=TENANT, connection=CONNECTION, seq=7)
RECEIVED_AT = 1_700_000_000.0
FAST = RetryPolicy(attempts=5, base_delay=0.001, max_delay=0.002)

# Fixed keys: Discord's (the application's key pair) and a gateway bridge's.
DISCORD_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
BRIDGE_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))


def public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


SECRETS = {"public_key": public_hex(DISCORD_KEY)}
GUILD_CHANNEL = "645027906669510667"
APP = "775799577604522054"

codec = DiscordCodec()


# ------------------------------------------------------------------------------------------ helpers


fixture = FIXTURES.json


def signed(body: bytes, *, at: float = RECEIVED_AT, key: Ed25519PrivateKey = DISCORD_KEY) -> HttpRequest:
    """A request as Discord sends it: signed at `at`, received at RECEIVED_AT."""
    timestamp = str(int(at))
    headers = {
        "content-type": "application/json",
        "x-signature-ed25519": key.sign(timestamp.encode() + body).hex(),
        "x-signature-timestamp": timestamp,
    }
    return HttpRequest(path="/webhooks/discord/discord-main", headers=headers, body=body, received_at=RECEIVED_AT)


def delivery(name: str) -> HttpRequest:
    return signed((FIXTURES / name).read_bytes())


def of(payload: Any) -> HttpRequest:
    return signed(json.dumps(payload).encode())


def decode_message(request: HttpRequest, ctx: DecodeContext = CTX) -> Message:
    envelopes = codec.decode(request, ctx)
    assert len(envelopes) == 1, envelopes
    (envelope,) = envelopes
    assert isinstance(envelope, Message)
    return envelope


IDS = Ids(TENANT, CONNECTION, "discord")
mid, person, conversation = IDS.message, IDS.sender, IDS.conversation


# ---------------------------------------------------------------------------------------- signature


def test_a_request_signed_by_discord_verifies() -> None:
    codec.verify(delivery("interaction_ping.json"), SECRETS)
    codec.verify(signed(b"{}", at=RECEIVED_AT - 299), SECRETS)


def test_a_bridge_signs_with_its_own_key_which_must_be_configured() -> None:
    request = signed((FIXTURES / "gateway_message_create.json").read_bytes(), key=BRIDGE_KEY)
    codec.verify(request, {**SECRETS, "bridge_public_key": public_hex(BRIDGE_KEY)})
    with pytest.raises(SignatureError, match="does not match"):
        codec.verify(request, SECRETS)


def test_a_bad_signature_is_refused() -> None:
    request = delivery("interaction_slash_command.json")
    tampered = HttpRequest(headers=request.headers, body=request.body + b" ", received_at=RECEIVED_AT)
    with pytest.raises(SignatureError, match="does not match"):
        codec.verify(tampered, SECRETS)
    with pytest.raises(SignatureError, match="does not match"):
        codec.verify(request, {"public_key": public_hex(BRIDGE_KEY)})
    # Discord's routine checks send signatures that are not even well-formed
    garbled = HttpRequest(
        headers={**request.headers, "x-signature-ed25519": "zz" * 64}, body=request.body, received_at=RECEIVED_AT
    )
    with pytest.raises(SignatureError, match="no hex"):
        codec.verify(garbled, SECRETS)
    short = HttpRequest(
        headers={**request.headers, "x-signature-ed25519": "ab"}, body=request.body, received_at=RECEIVED_AT
    )
    with pytest.raises(SignatureError, match="does not match"):
        codec.verify(short, SECRETS)


def test_missing_headers_or_key_are_refused() -> None:
    request = delivery("interaction_slash_command.json")
    for header in ("x-signature-ed25519", "x-signature-timestamp"):
        headers = {name: value for name, value in request.headers.items() if name != header}
        with pytest.raises(SignatureError, match="missing"):
            codec.verify(HttpRequest(headers=headers, body=request.body, received_at=RECEIVED_AT), SECRETS)
    with pytest.raises(SignatureError, match="no public_key"):
        codec.verify(request, {})
    with pytest.raises(SignatureError, match="32-byte hex"):
        codec.verify(request, {"public_key": "not-a-key"})


@pytest.mark.parametrize("skew", [-301, 301, -86_400])
def test_a_stale_or_future_timestamp_is_refused_even_when_signed(skew: float) -> None:
    request = signed((FIXTURES / "interaction_ping.json").read_bytes(), at=RECEIVED_AT + skew)
    with pytest.raises(SignatureError, match="stale or replayed"):
        codec.verify(request, SECRETS)


# ---------------------------------------------------------------------------------------- handshake


def answer_to(request: HttpRequest) -> Any:
    response = codec.handshake(request, SECRETS)
    assert response is not None
    assert response.status == 200 and response.headers == {"content-type": "application/json"}
    return json.loads(response.body)


def test_a_ping_is_answered_with_a_pong_and_decodes_to_nothing() -> None:
    assert answer_to(delivery("interaction_ping.json")) == {"type": 1}
    assert codec.decode(delivery("interaction_ping.json"), CTX) == []


def test_interactions_get_the_deferred_answer_their_type_allows() -> None:
    assert answer_to(delivery("interaction_slash_command.json")) == {"type": 5}
    assert answer_to(delivery("interaction_message_command.json")) == {"type": 5}
    assert answer_to(delivery("interaction_button.json")) == {"type": 6}
    assert answer_to(delivery("interaction_string_select_dm.json")) == {"type": 6}
    assert answer_to(delivery("interaction_autocomplete.json")) == {"type": 8, "data": {"choices": []}}
    # a modal opened by a command cannot update a message; one opened by a component can
    assert answer_to(delivery("interaction_modal_submit.json")) == {"type": 5}
    from_button = fixture("interaction_modal_submit.json") | {"message": fixture("interaction_button.json")["message"]}
    assert answer_to(of(from_button)) == {"type": 6}


def test_webhook_events_are_answered_with_204() -> None:
    for name in ("webhook_event_ping.json", "webhook_event_application_authorized.json"):
        response = codec.handshake(delivery(name), SECRETS)
        assert response is not None and response.status == 204 and response.body == b""
    assert codec.decode(delivery("webhook_event_ping.json"), CTX) == []


def test_gateway_events_and_other_requests_are_no_handshake() -> None:
    assert codec.handshake(delivery("gateway_message_create.json"), SECRETS) is None
    forwarded = {"op": 0, "s": 3, "t": "INTERACTION_CREATE", "d": fixture("interaction_slash_command.json")}
    assert codec.handshake(of(forwarded), SECRETS) is None  # the bridge answers over HTTP itself
    assert codec.handshake(delivery("message_object.json"), SECRETS) is None
    assert codec.handshake(signed(b"{not json"), SECRETS) is None
    get = HttpRequest(method="GET", body=b'{"type": 1, "token": "x"}', received_at=RECEIVED_AT)
    assert codec.handshake(get, SECRETS) is None


# ------------------------------------------------------------------------------------------ dedup


def test_dedup_keys_come_from_discords_ids() -> None:
    assert codec.dedup_key(delivery("interaction_slash_command.json")) == "786008729715212338"
    assert codec.dedup_key(delivery("message_object.json")) == "334385199974967042"
    assert codec.dedup_key(delivery("gateway_message_create.json")) == "334385199974967099"
    forwarded = {"op": 0, "s": 3, "t": "INTERACTION_CREATE", "d": fixture("interaction_slash_command.json")}
    assert codec.dedup_key(of(forwarded)) == "786008729715212338"
    # an edit shares its message's id, a reaction has none: the hub hashes those bodies
    assert codec.dedup_key(delivery("gateway_message_update.json")) == ""
    assert codec.dedup_key(delivery("gateway_reaction_add.json")) == ""
    assert codec.dedup_key(delivery("webhook_event_application_authorized.json")) == ""
    for broken in (b"[1, 2", b"[1, 2]", b'"text"'):
        with pytest.raises(DecodeError) as raised:
            codec.dedup_key(signed(broken))
        assert raised.value.path == "$"


def test_a_retried_interaction_decodes_to_the_same_envelopes() -> None:
    first = codec.decode(delivery("interaction_button.json"), CTX)
    again = codec.decode(delivery("interaction_button.json"), CTX)
    assert first == again and len(first) == 1


# ------------------------------------------------------------------------------- decode: commands


def test_a_slash_command_is_the_command_as_text_with_its_reply_hooks_in_meta() -> None:
    message = decode_message(delivery("interaction_slash_command.json"))
    native_id = f"{GUILD_CHANNEL}:interaction:786008729715212338"
    assert message.id == mid(native_id)
    assert message.native == Native(id=native_id, seq=7)
    assert message.conversation == conversation(GUILD_CHANNEL, "channel")
    assert message.parts == [Text(text="/cardsearch cardname=The Gitrog Monster")]
    assert message.sender is not None
    assert (message.sender.id, message.sender.native_id, message.sender.name, message.sender.role) == (
        person("53908232506183680"),
        "53908232506183680",
        "Mason",
        "user",
    )
    assert message.ts == datetime(2020, 12, 8, 23, 18, 4, 500000, tzinfo=UTC)  # from the interaction's snowflake
    assert message.direction == "inbound" and message.reply_to == ""
    assert message.meta["discord.interaction_token"] == "A_UNIQUE_TOKEN"
    assert message.meta["discord.interaction_id"] == "786008729715212338"
    assert message.meta["discord.guild_id"] == "290926798626357999"
    assert "discord.application_id" not in message.meta  # this docs example leaves it out
    assert message.meta["discord.command"] == {
        "name": "cardsearch",
        "type": 1,
        "options": [{"type": 3, "name": "cardname", "value": "The Gitrog Monster"}],
    }


def test_subcommand_groups_and_subcommands_are_words_of_the_command() -> None:
    message = decode_message(delivery("interaction_subcommand_in_thread.json"))
    (text,) = message.parts
    assert text == Text(text=f"/permissions user get user=809850198683418695 channel={GUILD_CHANNEL}")
    assert message.conversation == conversation("1156271845382340679", "thread")
    assert message.meta["discord.application_id"] == APP
    assert message.meta["discord.resolved"]["users"]["809850198683418695"]["username"] == "VoltyDemo"


def test_a_user_command_names_its_target_in_meta() -> None:
    message = decode_message(delivery("interaction_user_command.json"))
    assert message.parts == [Text(text="/context-menu-user-2")]
    assert message.meta["discord.command"]["target_id"] == "809850198683418695"
    assert message.reply_to == ""
    assert message.sender is not None and message.sender.name == "ian"


def test_a_message_command_replies_to_the_message_it_was_used_on() -> None:
    message = decode_message(delivery("interaction_message_command.json"))
    assert message.parts == [Text(text="/context-menu-message-2")]
    assert message.reply_to == mid("772908445358620702:867793854505943041")
    assert message.meta["discord.resolved"]["messages"]["867793854505943041"]["content"] == "some message"


def test_a_snowflake_holds_the_time_discord_made_it() -> None:
    # the docs' message 867793854505943041 carries its timestamp too: both must agree
    resolved = fixture("interaction_message_command.json")["data"]["resolved"]["messages"]["867793854505943041"]
    assert snowflake_time("867793854505943041") == datetime.fromisoformat(resolved["timestamp"])


# ----------------------------------------------------------------------------- decode: components


def test_a_button_click_is_an_action_on_the_message_it_was_on() -> None:
    message = decode_message(delivery("interaction_button.json"))
    assert message.parts == [Action(id="click_yes", title="Accept", source=mid(f"{GUILD_CHANNEL}:1156271994334195772"))]
    assert message.conversation == conversation(GUILD_CHANNEL, "channel")
    assert message.meta["discord.component"] == {"component_type": 2, "id": 2, "custom_id": "click_yes"}
    assert message.meta["discord.application_id"] == APP
    assert message.ts == datetime(2023, 9, 26, 16, 52, 20, 833000, tzinfo=UTC)


def test_a_select_choice_in_a_dm_is_an_action_with_the_chosen_value() -> None:
    message = decode_message(delivery("interaction_string_select_dm.json"))
    dm = "1156270000000000001"
    assert message.parts == [Action(id="butterfly", title="Butterfly", source=mid(f"{dm}:1156272500000000002"))]
    assert message.conversation == conversation(dm, "direct")
    assert message.sender is not None and message.sender.native_id == "53908232506183680"
    # several values: one action each
    several = fixture("interaction_string_select_dm.json")
    several["data"]["values"] = ["ant", "caterpillar"]
    assert [(part.id, part.title) for part in decode_message(of(several)).parts if isinstance(part, Action)] == [
        ("ant", "Ant"),
        ("caterpillar", "Caterpillar"),
    ]


def test_a_modal_submit_is_a_form_with_the_values() -> None:
    message = decode_message(delivery("interaction_modal_submit.json"))
    assert message.parts == [
        Form(
            id="bug_modal",
            fields=[
                FormField(id="bug_string_select", kind="select", value=["butterfly"]),
                FormField(id="bug_explanation", kind="text", value="The colours, and how it starts as a caterpillar."),
                FormField(id="bug_subscribe", kind="checkbox", value=True),
            ],
        )
    ]
    # the legacy layout: text inputs in action rows
    legacy = fixture("interaction_modal_submit.json")
    legacy["data"]["components"] = [{"type": 1, "components": [{"type": 4, "custom_id": "name", "value": "Ann"}]}]
    assert decode_message(of(legacy)).parts == [Form(id="bug_modal", fields=[FormField(id="name", value="Ann")])]


def test_autocomplete_is_kept_as_unsupported() -> None:
    body = fixture("interaction_autocomplete.json")
    message = decode_message(delivery("interaction_autocomplete.json"))
    assert message.parts == [Unsupported(reason="discord autocomplete", native=body["data"])]


def test_an_interaction_forwarded_from_the_gateway_decodes_like_one_posted_by_discord() -> None:
    forwarded = {"op": 0, "s": 3, "t": "INTERACTION_CREATE", "d": fixture("interaction_button.json")}
    assert codec.decode(of(forwarded), CTX) == codec.decode(delivery("interaction_button.json"), CTX)


# ------------------------------------------------------------------------------- decode: messages


def test_a_bare_message_object_is_a_message() -> None:
    message = decode_message(delivery("message_object.json"))
    native_id = "290926798999357250:334385199974967042"
    assert message.id == mid(native_id)
    assert message.native == Native(id=native_id, seq=7)
    assert message.parts == [Text(text="Supa Hot", format="markdown")]
    assert message.sender is not None
    assert (message.sender.native_id, message.sender.name, message.sender.handle) == (
        "53908099506183680",
        "Mason",
        "Mason",
    )
    assert message.ts == datetime(2017, 7, 11, 17, 27, 7, 299000, tzinfo=UTC)
    assert message.conversation == conversation("290926798999357250", "direct")  # no guild named
    assert message.meta["discord.reactions"][0]["emoji"] == {"id": None, "name": "🔥"}


def test_a_crosspost_keeps_its_source_in_meta_and_is_no_reply() -> None:
    message = decode_message(delivery("message_crossposted.json"))
    assert message.reply_to == ""
    assert message.conversation.type == "channel"
    assert message.meta["discord.message_reference"]["message_id"] == "306588351130107906"
    assert message.parts == [Text(text="Big news! In this <#278325129692446722> channel!", format="markdown")]


def test_message_create_from_a_bridge_has_text_mentions_files_stickers_and_its_reply() -> None:
    body = fixture("gateway_message_create.json")
    message = decode_message(delivery("gateway_message_create.json"))
    assert message.id == mid("290926798999357250:334385199974967099")
    assert message.conversation == conversation("290926798999357250", "channel")
    assert message.reply_to == mid("290926798999357250:334385199974967042")
    assert message.sender is not None
    assert (message.sender.name, message.sender.handle) == ("Mase", "Mason")  # the server nickname first
    text, image, sticker, embed = message.parts
    assert text == Text(
        text="@Ian **Supa** Hot, see the file",
        format="markdown",
        mentions=[Mention(id=person("167348773423415296"), native_id="167348773423415296", name="Ian", length=4)],
    )
    assert message.meta["discord.content"] == "<@167348773423415296> **Supa** Hot, see the file"
    assert image == Media(
        media="image",
        url=body["d"]["attachments"][0]["url"],
        file_id="1234567891233211234",
        mime="image/png",
        size=68420,
        filename="my_image.png",
        caption="a very hot pepper",
        width=640,
        height=512,
    )
    assert sticker == Media(
        media="sticker",
        url="https://cdn.discordapp.com/stickers/749054660769218631.json",
        file_id="749054660769218631",
        mime="application/json",
        filename="Wave.json",
    )
    assert embed == Unsupported(reason="discord embed", native=body["d"]["embeds"][0])
    assert message.meta["discord.guild_id"] == "290926798999357249"


def test_the_bots_own_messages_and_reactions_are_not_reingested() -> None:
    ours = DecodeContext(tenant=TENANT, connection=CONNECTION, options={"bot_user_id": "53908099506183680"})
    assert codec.decode(delivery("gateway_message_create.json"), ours) == []
    assert codec.decode(delivery("message_object.json"), ours) == []
    reacting = DecodeContext(tenant=TENANT, connection=CONNECTION, options={"bot_user_id": "167348773423415296"})
    assert codec.decode(delivery("gateway_reaction_add.json"), reacting) == []


def test_a_voice_message_and_a_system_message() -> None:
    body = fixture("message_object.json")
    voice = body | {
        "content": "",
        "flags": 1 << 13,
        "attachments": [
            {
                "id": "1",
                "filename": "voice-message.ogg",
                "content_type": "audio/ogg",
                "size": 9000,
                "url": "https://cdn.discordapp.com/attachments/1/2/voice-message.ogg",
                "proxy_url": "https://media.discordapp.net/attachments/1/2/voice-message.ogg",
                "duration_secs": 3.5,
                "waveform": "AAAA",
            }
        ],
    }
    (media,) = decode_message(of(voice)).parts
    assert isinstance(media, Media) and (media.media, media.duration_ms) == ("voice", 3500)
    joined = body | {"type": 7, "content": ""}  # USER_JOIN
    assert decode_message(of(joined)).parts == [Unsupported(reason="discord message type 7", native=joined)]


def test_an_edit_is_an_edit_marker_and_the_new_content() -> None:
    message = decode_message(delivery("gateway_message_update.json"))
    assert message.parts == [
        Edit(target=mid("290926798999357250:334385199974967042")),
        Text(text="Supa Hot 🔥 (edited)", format="markdown"),
    ]
    assert message.ts == datetime(2017, 7, 11, 17, 30, 12, 1000, tzinfo=UTC)
    assert message.id != mid("290926798999357250:334385199974967042")
    # an update without an edit (link previews resolved) is kept whole, not taken for an edit
    body = fixture("gateway_message_update.json")
    body["d"]["edited_timestamp"] = None
    (kept,) = decode_message(of(body)).parts
    assert kept == Unsupported(reason="discord gateway event MESSAGE_UPDATE", native=body["d"])


def test_a_deletion_is_a_delete_marker() -> None:
    message = decode_message(delivery("gateway_message_delete.json"))
    assert message.parts == [Delete(target=mid("290926798999357250:334385199974967042"))]
    assert message.sender is None
    assert message.ts == datetime.fromtimestamp(RECEIVED_AT, UTC)


def test_reactions_target_the_reacted_message() -> None:
    added = decode_message(delivery("gateway_reaction_add.json"))
    assert added.parts == [Reaction(emoji="🔥", target=mid("290926798999357250:334385199974967042"))]
    assert added.sender is not None and (added.sender.native_id, added.sender.name) == ("167348773423415296", "Ian")
    removed = decode_message(delivery("gateway_reaction_remove_custom.json"))
    assert removed.parts == [
        Reaction(emoji="<a:LUL:41771983429993937>", target=mid("290926798999357250:334385199974967042"), removed=True)
    ]
    assert added.id != removed.id


def test_other_gateway_and_webhook_events_are_kept_whole() -> None:
    body = fixture("gateway_typing_start.json")
    typing = decode_message(delivery("gateway_typing_start.json"))
    assert typing.parts == [Unsupported(reason="discord gateway event TYPING_START", native=body["d"])]
    assert typing.sender is not None and typing.sender.native_id == "167348773423415296"
    event = fixture("webhook_event_application_authorized.json")
    authorized = decode_message(delivery("webhook_event_application_authorized.json"))
    assert authorized.parts == [Unsupported(reason="discord webhook event APPLICATION_AUTHORIZED", native=event)]
    assert authorized.ts == datetime(2024, 10, 18, 14, 42, 53, 64834, tzinfo=UTC)
    assert authorized.sender is not None and authorized.sender.native_id == "53908232506183680"


def _dispatch_with(name: str, **fields: Any) -> Any:
    """A gateway dispatch fixture with fields of its event (`d`) replaced."""
    body = fixture(name)
    body["d"] |= fields
    return body


def test_timestamps_without_an_offset_are_utc_and_envelopes_read_back() -> None:
    bare = fixture("message_object.json") | {"timestamp": "2017-07-11T17:27:07.299"}
    edited = _dispatch_with("gateway_message_update.json", edited_timestamp="2017-07-11T17:30:12.001")
    event = fixture("webhook_event_application_authorized.json")
    event["event"]["timestamp"] = "2024-10-18T14:42:53.064834"
    expected = [
        datetime(2017, 7, 11, 17, 27, 7, 299000, tzinfo=UTC),
        datetime(2017, 7, 11, 17, 30, 12, 1000, tzinfo=UTC),
        datetime(2024, 10, 18, 14, 42, 53, 64834, tzinfo=UTC),
    ]
    for payload, ts in zip((bare, edited, event), expected, strict=True):
        message = decode_message(of(payload))
        assert message.ts == ts and message.ts.utcoffset() is not None
        assert canonical.decode(canonical.encode(message)) == message


def test_a_select_whose_quoted_options_have_odd_values_still_decodes() -> None:
    """The message a component was on is quoted by the interaction; an option value that is a list
    (or any non-string) labels nothing instead of breaking the lookup."""
    payload = fixture("interaction_string_select_dm.json")
    (row,) = payload["message"]["components"]
    options = row["components"][0]["options"]
    options[0]["value"] = ["ant"]  # ant, butterfly, caterpillar
    options[2]["value"] = {"x": 1}
    message = decode_message(of(payload))
    assert message.parts == [
        Action(id="butterfly", title="Butterfly", source=mid("1156270000000000001:1156272500000000002"))
    ]


def test_undecodable_input_names_the_path() -> None:
    interaction = fixture("interaction_slash_command.json")
    cases: list[tuple[Any, str]] = [
        (b"{broken", "$"),
        (b"[1, 2]", "$"),
        ({key: value for key, value in interaction.items() if key != "token"}, "$"),
        (interaction | {"data": {"type": 1}}, "$.data"),
        (interaction | {"channel_id": None}, "$.channel_id"),
        (interaction | {"id": "not-a-snowflake"}, "$.id"),
        ({key: value for key, value in interaction.items() if key != "member"}, "$.user"),
        (fixture("interaction_modal_submit.json") | {"data": {"components": []}}, "$.data"),
        (fixture("message_object.json") | {"timestamp": "yesterday"}, "$.timestamp"),
        ({"op": 0, "s": 1, "t": "MESSAGE_CREATE", "d": [1]}, "$.d"),
        ({"op": 0, "s": 1, "t": "MESSAGE_REACTION_ADD", "d": {"user_id": "1", "channel_id": "2"}}, "$.d"),
        (fixture("webhook_event_application_authorized.json") | {"event": {"timestamp": "soon"}}, "$.event.timestamp"),
        # more digits than a 64-bit snowflake has: no time of its own, and the path says which id
        (interaction | {"id": "9" * 25}, "$.id"),
        (interaction | {"id": "١٢٣"}, "$.id"),  # digits, but not ASCII ones
        (fixture("message_object.json") | {"timestamp": "9999-12-31T23:00:00-05:00"}, "$.timestamp"),
        (_dispatch_with("gateway_message_update.json", edited_timestamp="soon"), "$.d.edited_timestamp"),
        (_dispatch_with("gateway_message_create.json", timestamp=None), "$.d.timestamp"),
    ]
    for payload, path in cases:
        request = signed(payload) if isinstance(payload, bytes) else of(payload)
        with pytest.raises(DecodeError) as raised:
            codec.decode(request, CTX)
        assert raised.value.path == path, (payload, raised.value)


# ------------------------------------------------------------------------------------------ encode


def outbound(*parts: Part, **fields: Any) -> Message:
    conversation = Conversation(id="conv", channel="discord", connection=CONNECTION, native_id="C1")
    return outbound_message(TENANT, conversation, parts, id="m1", **fields)


def encode_ctx(api_base: str = "", options: dict[str, Any] | None = None, **native_ids: str) -> EncodeContext:
    return EncodeContext(
        tenant=TENANT,
        connection=CONNECTION,
        to="111",
        api_base=api_base,
        secrets={"bot_token": "bot-token"},
        options=options or {},
        native_ids=native_ids,
    )


def calls(message: Message, ctx: EncodeContext | None = None) -> list[tuple[str, str, Any]]:
    """(method, path after the API base, body JSON) of each call."""
    base = "https://discord.com/api/v10"
    result = []
    for request in codec.encode(message, ctx or encode_ctx()):
        assert request.url.startswith(base)
        result.append((request.method, request.url[len(base) :], json.loads(request.body) if request.body else None))
    return result


def posted(*messages: dict[str, Any], message_id: str = "m1") -> list[tuple[str, str, Any]]:
    """What `POST /channels/111/messages` calls carry besides the content: no pings, a nonce."""
    return [
        (
            "POST",
            "/channels/111/messages",
            {
                **body,
                "allowed_mentions": {"parse": []},
                "nonce": stable_id(f"{message_id}:{n}")[:25],
                "enforce_nonce": True,
            },
        )
        for n, body in enumerate(messages)
    ]


BOT_HEADERS = {"Authorization": "Bot bot-token", "User-Agent": USER_AGENT}


def test_a_text_is_one_create_message_call() -> None:
    (request,) = codec.encode(outbound(Text(text="Hello, **World**!", format="markdown")), encode_ctx())
    assert (request.method, request.url) == ("POST", "https://discord.com/api/v10/channels/111/messages")
    assert request.headers == {**BOT_HEADERS, "Content-Type": "application/json"}
    assert request.idempotency_key == "m1:0" and request.message_id == "m1"
    assert json.loads(request.body) == {
        "content": "Hello, **World**!",
        "allowed_mentions": {"parse": []},
        "nonce": stable_id("m1:0")[:25],
        "enforce_nonce": True,
    }
    assert USER_AGENT.startswith("DiscordBot (https://")


def test_a_card_is_an_embed_as_in_discords_create_message_example() -> None:
    documented = json.loads(
        (CORPUS / "outbound" / "discorddocs_create_message_example_request_body_application_json_12.json").read_bytes()
        if CORPUS.exists()
        else b'{"content": "Hello, World!", "tts": false, "embeds": '
        b'[{"title": "Hello, Embed!", "description": "This is an embedded message."}]}'
    )
    message = outbound(
        Text(text="Hello, World!", format="markdown"),
        Card(title="Hello, Embed!", subtitle="This is an embedded message."),
    )
    ((_, _, body),) = calls(message)
    assert {key: body[key] for key in ("content", "embeds")} == {key: documented[key] for key in ("content", "embeds")}


def test_text_then_buttons_is_one_message_with_action_rows() -> None:
    buttons = [Button(id=f"b{n}", title=f"Option {n}") for n in range(6)]
    buttons.append(Button(id="docs", title="Learn More", action="url", value="http://watchanimeattheoffice.com/"))
    buttons.append(Button(id="buy", title="Buy", action="postback", value="sku-1"))
    message = outbound(Text(text="Pick one", format="markdown"), Buttons(text="or learn more", buttons=buttons))
    assert calls(message) == posted(
        {
            "content": "Pick one\nor learn more",
            "components": [
                {
                    "type": 1,
                    "components": [
                        {"type": 2, "style": 1, "label": f"Option {n}", "custom_id": f"b{n}"} for n in range(5)
                    ],
                },
                {
                    "type": 1,
                    "components": [
                        {"type": 2, "style": 1, "label": "Option 5", "custom_id": "b5"},
                        {"type": 2, "style": 5, "label": "Learn More", "url": "http://watchanimeattheoffice.com/"},
                        {"type": 2, "style": 1, "label": "Buy", "custom_id": "sku-1"},
                    ],
                },
            ],
        }
    )


def test_a_list_is_a_string_select_per_section() -> None:
    menu = List(
        header="Pricing",
        text="Choose a plan",
        button="Plans",
        sections=[
            ListSection(rows=[ListRow(id="basic", title="Basic"), ListRow(id="pro", title="Pro", description="Teams")]),
            ListSection(title="Add-ons", rows=[ListRow(id="support", title="Support")]),
        ],
    )
    assert calls(outbound(Text(text="Hi", format="markdown"), menu)) == posted(
        {
            "content": "Hi\nPricing\nChoose a plan",
            "components": [
                {
                    "type": 1,
                    "components": [
                        {
                            "type": 3,
                            "custom_id": "list:1:0",
                            "placeholder": "Plans",
                            "options": [
                                {"label": "Basic", "value": "basic"},
                                {"label": "Pro", "value": "pro", "description": "Teams"},
                            ],
                        }
                    ],
                },
                {
                    "type": 1,
                    "components": [
                        {
                            "type": 3,
                            "custom_id": "list:1:1",
                            "placeholder": "Add-ons",
                            "options": [{"label": "Support", "value": "support"}],
                        }
                    ],
                },
            ],
        }
    )


def test_media_are_embed_images_or_links_and_need_a_url() -> None:
    message = outbound(
        Media(media="image", url="https://cdn.example.com/cat.png", caption="A cat"),
        Media(media="document", url="https://cdn.example.com/report.pdf", filename="report.pdf"),
    )
    assert calls(message) == posted(
        {"embeds": [{"image": {"url": "https://cdn.example.com/cat.png"}, "description": "A cat"}]},
        {"content": "report.pdf https://cdn.example.com/report.pdf"},
    )
    with pytest.raises(EncodeError, match="url"):
        codec.encode(outbound(Media(media="image", data=b"\x89PNG")), encode_ctx())


def test_parts_that_would_show_above_earlier_ones_start_a_new_message() -> None:
    card = Card(
        title="Red shoes",
        subtitle="49 EUR",
        media=Media(media="image", url="https://cdn.example.com/shoes.jpg"),
        buttons=[Button(id="buy", title="Buy")],
    )
    message = outbound(card, card, Text(text="Anything else?", format="markdown"))
    shoe = {
        "embeds": [
            {"title": "Red shoes", "description": "49 EUR", "image": {"url": "https://cdn.example.com/shoes.jpg"}}
        ],
        "components": [{"type": 1, "components": [{"type": 2, "style": 1, "label": "Buy", "custom_id": "buy"}]}],
    }
    assert calls(message) == posted(shoe, shoe, {"content": "Anything else?"})
    images = [Media(media="image", url=f"https://cdn.example.com/{n}.png") for n in range(11)]
    first, second = calls(outbound(*images))
    assert (len(first[2]["embeds"]), len(second[2]["embeds"])) == (10, 1)
    rows = [Buttons(buttons=[Button(id=f"{row}.{n}", title="x") for n in range(5)]) for row in range(6)]
    first, second = calls(outbound(*rows))
    assert (len(first[2]["components"]), len(second[2]["components"])) == (5, 1)
    long_texts = [Text(text="a" * 1500, format="markdown"), Text(text="b" * 1500, format="markdown")]
    assert [body["content"][0] for _, _, body in calls(outbound(*long_texts))] == ["a", "b"]


def test_a_reply_points_at_the_original_from_its_first_message() -> None:
    ctx = encode_ctx(question="111:1700000000000000001", command="111:interaction:1700000000000000002")
    reply = outbound(
        Text(text="yes", format="markdown"), Card(title="t"), Text(text="more", format="markdown"), reply_to="question"
    )
    first, second = calls(reply, ctx)
    assert first[2]["message_reference"] == {"message_id": "1700000000000000001", "fail_if_not_exists": False}
    assert "message_reference" not in second[2]
    # an interaction is no message: a reply to one (without its token) just goes to the channel
    ((_, path, body),) = calls(outbound(Text(text="ok", format="markdown"), reply_to="command"), ctx)
    assert path == "/channels/111/messages" and "message_reference" not in body
    with pytest.raises(EncodeError, match="reply_to target"):
        codec.encode(outbound(Text(text="ok"), reply_to="unknown"), ctx)


def test_a_reply_to_an_interaction_is_a_follow_up_on_its_webhook() -> None:
    meta = {"discord.interaction_token": "A_UNIQUE_TOKEN", "discord.application_id": APP}
    no_bot = EncodeContext(tenant=TENANT, connection=CONNECTION, to="111")  # follow-ups need no bot token
    (request,) = codec.encode(outbound(Text(text="Found it", format="markdown"), meta=meta, reply_to="x"), no_bot)
    assert (request.method, request.url) == ("POST", f"https://discord.com/api/v10/webhooks/{APP}/A_UNIQUE_TOKEN")
    assert request.headers == {"User-Agent": USER_AGENT, "Content-Type": "application/json"}
    assert json.loads(request.body) == {"content": "Found it", "allowed_mentions": {"parse": []}}
    # the application id may come from the connection's options instead
    token_only = {"discord.interaction_token": "A_UNIQUE_TOKEN"}
    with_option = EncodeContext(tenant=TENANT, connection=CONNECTION, to="111", options={"application_id": APP})
    (request,) = codec.encode(outbound(Text(text="ok"), meta=token_only), with_option)
    assert request.url.endswith(f"/webhooks/{APP}/A_UNIQUE_TOKEN")
    with pytest.raises(EncodeError, match="application_id"):
        codec.encode(outbound(Text(text="ok"), meta=token_only), no_bot)


def test_reactions_deletes_and_edits_are_their_own_calls_in_part_order() -> None:
    ctx = encode_ctx(original="222:1700000000000000003")
    message = outbound(
        Text(text="first", format="markdown"),
        Reaction(emoji="👍", target="original"),
        Reaction(emoji="<a:LUL:41771983429993937>", target="original", removed=True),
        Delete(target="original"),
        Text(text="last", format="markdown"),
    )
    first, last = posted({"content": "first"}, {"content": "last"})
    last = (last[0], last[1], {**last[2], "nonce": stable_id("m1:4")[:25]})  # the fifth call of the message
    assert calls(message, ctx) == [
        first,
        ("PUT", "/channels/222/messages/1700000000000000003/reactions/%F0%9F%91%8D/@me", None),
        ("DELETE", "/channels/222/messages/1700000000000000003/reactions/LUL:41771983429993937/@me", None),
        ("DELETE", "/channels/222/messages/1700000000000000003", None),
        last,
    ]
    reaction = codec.encode(outbound(Reaction(emoji="👍", target="original")), ctx)[0]
    assert reaction.headers == BOT_HEADERS and reaction.body == b""
    with pytest.raises(EncodeError, match="reaction target"):
        codec.encode(outbound(Reaction(emoji="👍", target="unknown")), ctx)
    with pytest.raises(EncodeError, match="reaction target"):
        codec.encode(outbound(Reaction(emoji="👍", target="command")), encode_ctx(command="111:interaction:1"))


def test_an_edit_patches_content_embeds_and_components() -> None:
    ctx = encode_ctx(original="222:1700000000000000003")
    assert calls(outbound(Edit(target="original"), Text(text="fixed", format="markdown")), ctx) == [
        (
            "PATCH",
            "/channels/222/messages/1700000000000000003",
            {"content": "fixed", "embeds": [], "components": [], "allowed_mentions": {"parse": []}},
        )
    ]
    with pytest.raises(EncodeError, match="new content"):
        codec.encode(outbound(Edit(target="original")), ctx)
    with pytest.raises(EncodeError, match="one message"):
        codec.encode(outbound(Edit(target="original"), Card(title="a"), Text(text="b")), ctx)
    with pytest.raises(EncodeError, match="edit target"):
        codec.encode(outbound(Edit(target="unknown"), Text(text="x")), ctx)


def test_reaction_emoji_paths() -> None:
    assert reaction_emoji("🔥") == "%F0%9F%94%A5"
    assert reaction_emoji("<:LUL:41771983429993937>") == "LUL:41771983429993937"
    assert reaction_emoji("LUL:41771983429993937") == "LUL:41771983429993937"


def test_allowed_mentions_can_be_set_by_the_connection() -> None:
    ctx = encode_ctx(options={"allowed_mentions": {"parse": ["users"]}})
    ((_, _, body),) = calls(outbound(Text(text="<@123> hi", format="markdown")), ctx)
    assert body["allowed_mentions"] == {"parse": ["users"]}


def test_typing_is_a_call_and_other_activities_none() -> None:
    def activity(kind: canonical.ActivityType) -> Activity:
        return Activity(id="a1", tenant=TENANT, conversation=Conversation(id="conv"), ts=canonical.now(), activity=kind)

    (request,) = codec.encode_activity(activity("typing"), encode_ctx())
    assert (request.method, request.url, request.body) == (
        "POST",
        "https://discord.com/api/v10/channels/111/typing",
        b"",
    )
    assert request.headers == BOT_HEADERS and request.idempotency_key == "a1:0"
    assert codec.encode_activity(activity("read"), encode_ctx()) == []


def test_what_cannot_be_sent_is_refused_clearly() -> None:
    with pytest.raises(EncodeError, match="bot_token"):
        codec.encode(outbound(Text(text="hi")), EncodeContext(tenant=TENANT, connection=CONNECTION, to="111"))
    nowhere = EncodeContext(tenant=TENANT, connection=CONNECTION, to="", secrets={"bot_token": "x"})
    with pytest.raises(EncodeError, match="no channel"):
        codec.encode(outbound(Text(text="hi")), nowhere)
    with pytest.raises(EncodeError, match="location"):
        codec.encode(outbound(Location(lat=1.0, lon=2.0)), encode_ctx())
    with pytest.raises(EncodeError, match="custom_id"):
        codec.encode(outbound(Buttons(buttons=[Button(id="x" * 101, title="long")])), encode_ctx())
    with pytest.raises(EncodeError, match="call"):
        codec.encode(outbound(Buttons(buttons=[Button(id="c", title="Call", action="call", value="+1")])), encode_ctx())


@pytest.mark.parametrize("to", ["123/invites?", "123/../../guilds/1", "\uff11\uff12\uff13", "", "123?x=1", "1" * 21])
def test_a_channel_id_that_is_no_snowflake_is_refused(to: str) -> None:
    ctx = EncodeContext(tenant=TENANT, connection=CONNECTION, to=to, secrets={"bot_token": "x"})
    with pytest.raises(EncodeError, match=r"no channel|no snowflake"):
        codec.encode(outbound(Text(text="hi")), ctx)
    now = canonical.now()
    typing = Activity(id="a1", tenant=TENANT, conversation=Conversation(id="conv"), ts=now, activity="typing")
    with pytest.raises(EncodeError, match=r"no channel|no snowflake"):
        codec.encode_activity(typing, ctx)


@pytest.mark.parametrize("native_id", ["111/invites:1700000000000000003", "111:1/../2", "111:", ":1", "111:\u0661"])
def test_a_native_message_id_that_is_no_pair_of_snowflakes_is_refused(native_id: str) -> None:
    ctx = encode_ctx(target=native_id)
    for part in (Delete(target="target"), Reaction(emoji="👍", target="target")):
        with pytest.raises(EncodeError, match="no Discord message known"):
            codec.encode(outbound(part), ctx)
    with pytest.raises(EncodeError, match="no Discord message known"):
        codec.encode(outbound(Edit(target="target"), Text(text="x")), ctx)
    with pytest.raises(EncodeError, match="no Discord message known"):
        codec.encode(outbound(Text(text="x"), reply_to="target"), ctx)


def test_a_follow_up_url_takes_only_a_snowflake_application_and_an_escaped_token() -> None:
    ctx = EncodeContext(tenant=TENANT, connection=CONNECTION, to="111")
    bad_app = {"discord.interaction_token": "tok", "discord.application_id": "1/../../channels/2"}
    with pytest.raises(EncodeError, match="application id"):
        codec.encode(outbound(Text(text="ok"), meta=bad_app), ctx)
    odd_token = {"discord.interaction_token": "a/b?c#d", "discord.application_id": APP}
    (request,) = codec.encode(outbound(Text(text="ok"), meta=odd_token), ctx)
    assert request.url == f"https://discord.com/api/v10/webhooks/{APP}/a%2Fb%3Fc%23d"
    with pytest.raises(EncodeError, match="path segment"):
        codec.encode(outbound(Text(text="ok"), meta={**odd_token, "discord.interaction_token": ".."}), ctx)
    with pytest.raises(EncodeError, match="no emoji"):
        codec.encode(outbound(Reaction(emoji="..", target="t")), encode_ctx(t="111:1700000000000000003"))


def test_choice_text_longer_than_a_message_goes_before_the_choices() -> None:
    """Buttons' and lists' text is the content of their message: degradation moves the start of a longer
    one before them (`choice_text_limit`), so every request stays within 2,000 characters."""
    assert codec.capabilities.choice_text_limit == 2000
    long_text = "word " * 500  # 2,500 characters
    buttons = Buttons(text=long_text, buttons=[Button(id="ok", title="OK")])
    menu = List(text=long_text, sections=[ListSection(rows=[ListRow(id="a", title="A")])])
    for part in (buttons, menu):
        bodies = [body for _, _, body in calls(degrade(outbound(part), codec.capabilities))]
        assert all(len(body.get("content", "")) <= 2000 for body in bodies)
        assert " ".join(body.get("content", "") for body in bodies).split() == long_text.split()
        assert "components" in bodies[-1]
    # Undegraded, encode refuses content Discord would refuse rather than send it.
    for part in (Text(text="x" * 2001), buttons, menu):
        with pytest.raises(EncodeError, match="2000"):
            codec.encode(outbound(part), encode_ctx())


def test_a_lists_header_text_and_footer_share_a_message_only_when_they_fit() -> None:
    menu = List(
        header="h" * 900,
        text="t" * 900,
        footer="f" * 900,
        sections=[ListSection(rows=[ListRow(id="a", title="A")])],
    )
    bodies = [body for _, _, body in calls(outbound(menu))]
    assert [body.get("content") for body in bodies] == ["h" * 900 + "\n" + "t" * 900, "f" * 900]
    assert "components" in bodies[-1]


def test_labels_are_cut_to_discords_lengths_and_values_refused() -> None:
    card = Card(
        title="T" * 300,
        buttons=[Button(id="b", title="B" * 90), Button(id="u", title="U", action="url", value="https://x.example")],
    )
    menu = List(
        button="P" * 200,
        sections=[ListSection(rows=[ListRow(id="r", title="R" * 120, description="D" * 120)])],
    )
    ((_, _, body),) = calls(outbound(card, menu))
    assert body["embeds"][0]["title"] == "T" * 255 + "…"
    assert body["components"][0]["components"][0]["label"] == "B" * 79 + "…"
    (select,) = body["components"][1]["components"]
    assert select["placeholder"] == "P" * 149 + "…"
    assert select["options"] == [{"label": "R" * 99 + "…", "value": "r", "description": "D" * 99 + "…"}]
    refused = [
        Card(title="t", subtitle="s" * 4097),
        Media(media="image", url="https://x.example/a.png", caption="c" * 4097),
        Buttons(buttons=[Button(id="u", title="U", action="url", value="https://x.example/" + "a" * 500)]),
        List(sections=[ListSection(rows=[ListRow(id="i" * 101, title="I")])]),
        List(sections=[ListSection(rows=[])]),
        List(sections=[ListSection(rows=[ListRow(id=f"r{n}", title="R") for n in range(26)])]),
    ]
    for part in refused:
        with pytest.raises(EncodeError):
            codec.encode(outbound(part), encode_ctx())


def test_embeds_over_6000_characters_together_go_into_the_next_message() -> None:
    cards = [Card(title=f"card {n}", subtitle="s" * 2500) for n in range(3)]
    bodies = [body for _, _, body in calls(outbound(*cards))]
    assert [len(body["embeds"]) for body in bodies] == [2, 1]
    for body in bodies:
        assert sum(len(embed.get("title", "")) + len(embed.get("description", "")) for embed in body["embeds"]) <= 6000


def test_a_card_image_known_only_by_file_id_is_refused_not_dropped() -> None:
    card = Card(title="Shoes", media=Media(media="image", file_id="1156272600000000003"))
    with pytest.raises(EncodeError, match="file id"):
        codec.encode(outbound(card), encode_ctx())
    with pytest.raises(EncodeError, match="file id"):
        codec.encode(outbound(Media(media="image", file_id="1156272600000000003")), encode_ctx())
    with pytest.raises(EncodeError, match="url"):
        codec.encode(outbound(Card(title="Shoes", media=Media(media="image", data=b"\x89PNG"))), encode_ctx())


def test_a_degraded_message_fits_discords_limits() -> None:
    """What the hub sends: the shared degradation step with these capabilities, then encode."""
    message = outbound(
        Text(text="**Deploy** done: see [log](https://ci.example/l)", format="markdown"),
        Buttons(buttons=[Button(id="ok", title="OK"), Button(id="call", title="Call us", action="call", value="+1")]),
        Media(media="document", url="https://ci.example/report.pdf", caption="report"),
        Text(text="word " * 500, format="plain"),  # 2,500 characters: more than one message takes
    )
    bodies = [body for _, _, body in calls(degrade(message, codec.capabilities))]
    assert bodies[0]["content"].startswith("**Deploy** done: see [log](https://ci.example/l)")
    assert "Call us: +1" in bodies[0]["content"]  # a call button becomes a text line
    assert bodies[0]["components"][0]["components"] == [{"type": 2, "style": 1, "label": "OK", "custom_id": "ok"}]
    assert any("https://ci.example/report.pdf" in body.get("content", "") for body in bodies)
    assert all(len(body.get("content", "")) <= 2000 for body in bodies)
    assert len(bodies) >= 3


def test_request_bodies_match_discords_openapi_schemas() -> None:
    if not SPEC.exists():
        pytest.skip(f"no Discord OpenAPI spec at {SPEC}")
    jsonschema = pytest.importorskip("jsonschema")
    components = json.loads(SPEC.read_bytes())["components"]

    def problems(schema: str, body: Any) -> list[str]:
        validator = jsonschema.Draft202012Validator(
            {"$ref": f"#/components/schemas/{schema}", "components": components}
        )
        return [error.message for error in validator.iter_errors(body)]

    ctx = encode_ctx(question="111:1700000000000000001", original="111:1700000000000000003")
    message = outbound(
        Text(text="Hello", format="markdown"),
        Card(title="Shoes", subtitle="49 EUR", media=Media(media="image", url="https://cdn.example.com/s.jpg")),
        Buttons(
            buttons=[
                Button(id="ok", title="OK"),
                Button(id="docs", title="Docs", action="url", value="https://x.example"),
            ]
        ),
        List(text="Pick", sections=[ListSection(rows=[ListRow(id="a", title="A", description="first")])]),
        reply_to="question",
    )
    for _, _, body in calls(message, ctx):
        assert problems("MessageCreateRequest", body) == []
    ((_, _, patch),) = calls(outbound(Edit(target="original"), Text(text="new", format="markdown")), ctx)
    assert problems("MessageEditRequestPartial", patch) == []
    assert problems("MessageCreateRequest", {"content": 5}) != []  # the check itself can fail


# ----------------------------------------------------------------------------------- parse_response


def answer(status: int, body: Any, **headers: str) -> HttpResponse:
    return response(status, body, headers)


REQUEST = OutboundRequest(method="POST", url="https://discord.com/api/v10/channels/111/messages")


def test_success_answers_give_the_native_ids() -> None:
    created = codec.parse_response(REQUEST, answer(200, fixture("message_object.json")))
    assert created.ok and created.native_ids == ["290926798999357250:334385199974967042"]
    reacted = codec.parse_response(REQUEST, answer(204, b""))
    assert reacted.ok and reacted.native_ids == []


def test_rate_limits_say_how_long_to_wait() -> None:
    user = codec.parse_response(REQUEST, answer(429, fixture("error_rate_limit_user.json"), **{"retry-after": "65"}))
    assert user.retryable and user.retry_after == 64.57  # the body's value is the precise one
    assert user.error is not None and user.error.code == "rate_limited" and user.error.retryable
    globally = codec.parse_response(REQUEST, answer(429, fixture("error_rate_limit_global.json")))
    assert globally.retry_after == 64.57
    assert globally.error is not None and globally.error.code == "rate_limited_global"
    header_only = codec.parse_response(REQUEST, answer(429, {"message": "slow down"}, **{"retry-after": "3"}))
    assert header_only.retryable and header_only.retry_after == 3


def test_error_answers_say_whether_to_retry() -> None:
    invalid = codec.parse_response(REQUEST, answer(400, fixture("error_invalid_form_body.json")))
    assert not invalid.ok and not invalid.retryable and invalid.retry_after is None
    assert invalid.error is not None and invalid.error.code == "discord_50035"
    assert invalid.error.message == "Invalid Form Body; embeds.0.title: Must be 256 or fewer in length."
    for status, name, code in (
        (401, "error_unauthorized.json", "http_401"),
        (403, "error_missing_permissions.json", "discord_50013"),
        (404, "error_unknown_channel.json", "discord_10003"),
    ):
        refused = codec.parse_response(REQUEST, answer(status, fixture(name)))
        assert not refused.retryable and refused.error is not None and refused.error.code == code
    overloaded = codec.parse_response(REQUEST, answer(400, {"code": 130000, "message": "API resource overloaded"}))
    assert overloaded.retryable
    down = codec.parse_response(REQUEST, answer(502, b"<html>Bad Gateway</html>"))
    assert down.retryable and down.error is not None and down.error.code == "http_502"


# ---------------------------------------------------------------------- delivery to a fake REST API


def created(recorded: Recorded) -> Reply:
    """Discord's answer to a create: the message, with an id of its own."""
    return Reply(body=fixture("message_object.json") | {"id": "1700000000000000009", "channel_id": "111"})


async def send(api: FakeApi, message: Message) -> tuple[Any, Recorded]:
    (request,) = codec.encode(message, encode_ctx(api.base_url))
    return await deliver_one(codec, request, FAST), api.requests[-1]


async def test_a_message_is_posted_to_the_channel(fake_api: FakeApi) -> None:
    fake_api.responder = created
    result, recorded = await send(fake_api, outbound(Text(text="hello", format="markdown")))
    assert result.ok and result.native_ids == ["111:1700000000000000009"]
    assert (recorded.method, recorded.path) == ("POST", "/channels/111/messages")
    assert recorded.headers["authorization"] == "Bot bot-token"
    assert recorded.headers["user-agent"] == USER_AGENT
    assert recorded.headers["content-type"] == "application/json"
    assert recorded.json() == posted({"content": "hello"})[0][2]


async def test_a_follow_up_is_posted_to_the_interaction_webhook(fake_api: FakeApi) -> None:
    fake_api.responder = created
    meta = {"discord.interaction_token": "A_UNIQUE_TOKEN", "discord.application_id": APP}
    result, recorded = await send(fake_api, outbound(Text(text="Found it", format="markdown"), meta=meta))
    assert result.ok and result.native_ids == ["111:1700000000000000009"]
    assert (recorded.method, recorded.path) == ("POST", f"/webhooks/{APP}/A_UNIQUE_TOKEN")
    assert "authorization" not in recorded.headers


async def test_rate_limits_and_server_errors_are_retried_until_ok(fake_api: FakeApi) -> None:
    fake_api.queue(
        Reply(
            status=429,
            body={"message": "You are being rate limited.", "retry_after": 0, "global": False},
            headers={"Retry-After": "0"},
        ),
        Reply(status=500, body={"message": "500: Internal Server Error", "code": 0}),
        Reply(status=502, body=b"<html>502 Bad Gateway</html>"),
    )
    fake_api.responder = created
    result, _ = await send(fake_api, outbound(Text(text="hello", format="markdown")))
    assert result.ok and result.native_ids == ["111:1700000000000000009"]
    assert len(fake_api.requests) == 4
    assert len({request.body for request in fake_api.requests}) == 1  # the same call, the same nonce


@pytest.mark.parametrize(
    ("status", "name", "code"),
    [
        (400, "error_invalid_form_body.json", "discord_50035"),
        (401, "error_unauthorized.json", "http_401"),
        (403, "error_missing_permissions.json", "discord_50013"),
        (404, "error_unknown_channel.json", "discord_10003"),
    ],
)
async def test_refusals_are_final(fake_api: FakeApi, status: int, name: str, code: str) -> None:
    fake_api.queue(Reply(status=status, body=fixture(name)))
    result, _ = await send(fake_api, outbound(Text(text="hello", format="markdown")))
    assert not result.ok and not result.retryable
    assert result.error is not None and result.error.code == code
    assert len(fake_api.requests) == 1


# -------------------------------------------------------------------------------- registration


def test_registered_under_its_channel_name_with_discords_limits() -> None:
    registered = load("discord")
    assert isinstance(registered, DiscordCodec) and registered.channel == "discord"
    caps = registered.capabilities
    assert (caps.text_limit, caps.markup, caps.max_buttons, caps.max_button_title) == (2000, "markdown", 25, 80)
    assert (caps.max_list_rows, caps.max_row_title, caps.max_cards) == (25, 100, 10)
    assert caps.reply and caps.edit and caps.delete and caps.reaction and caps.typing
    assert registered.api_base(encode_ctx()) == "https://discord.com/api/v10"


# ------------------------------------------------------------------------------------ corpus sweep


def test_every_corpus_payload_decodes_or_raises_decode_error() -> None:
    files = corpus_files(CORPUS)
    if not files:
        pytest.skip(f"no Discord corpus at {CORPUS}")
    decoded = 0
    for path in files:
        request = signed(path.read_bytes())
        codec.verify(request, SECRETS)
        codec.handshake(request, SECRETS)
        try:
            codec.dedup_key(request)
            envelopes = codec.decode(request, CTX)
        except DecodeError:
            continue
        for envelope in envelopes:
            assert canonical.decode(canonical.encode(envelope)) == envelope, path.name
            assert envelope.conversation.channel == "discord" and envelope.native is not None, path.name
        decoded += len(envelopes)
    assert decoded > 0


def test_unreadable_files_are_unsupported_parts_and_the_content_still_arrives() -> None:
    payload = fixture("message_object.json")
    good = {"id": "1", "filename": "a.png", "url": "https://cdn.discordapp.com/a.png", "content_type": "image/png"}
    huge = {**good, "id": "2", "content_type": "audio/ogg", "duration_secs": 1e308}  # infinite milliseconds
    payload["attachments"] = [{"id": 3}, huge, good]
    payload["sticker_items"] = [{"id": "4", "format_type": "gif"}]
    message = decode_message(of(payload))
    text, wrong_type, too_long, image, sticker = message.parts
    assert isinstance(text, Text) and text.text == "Supa Hot"
    assert isinstance(wrong_type, Unsupported) and "attachments[0].id" in wrong_type.reason
    assert isinstance(too_long, Unsupported) and too_long.native == huge
    assert isinstance(image, Media) and image.url == good["url"]
    assert isinstance(sticker, Unsupported) and "sticker_items[0].format_type" in sticker.reason
    assert canonical.decode(canonical.encode(message)) == message
