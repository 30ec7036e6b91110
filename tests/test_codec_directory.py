"""The codecs' directory functions (`Codec.directory_request`, `Codec.parse_directory`) on the channels'
documented list answers (tests/fixtures/<channel>/directory_*.json, sources in each SOURCES.md): the
request each makes, how its answer maps onto `DirectoryItem`s, and where the next page starts."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from babelhub.codecs import load as load_codec
from babelhub.codecs.base import (
    DIRECTORY_KINDS,
    DirectoryKind,
    DirectoryPage,
    EncodeContext,
    HttpResponse,
    OutboundRequest,
    offset_cursor,
)
from babelhub.errors import DecodeError, EncodeError
from tests.codeckit import Fixtures

BASE = "http://127.0.0.1:9"


def context(secrets: dict[str, str], options: dict[str, Any] | None = None) -> EncodeContext:
    return EncodeContext(tenant="acme", connection="c1", to="", api_base=BASE, secrets=secrets, options=options or {})


def json_of(request: OutboundRequest) -> Any:
    return json.loads(request.body)


def query(request: OutboundRequest) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(urlsplit(request.url).query).items()}


def page(channel: str, kind: DirectoryKind, ctx: EncodeContext, body: bytes, cursor: str = "",
         limit: int = 50) -> tuple[OutboundRequest, DirectoryPage]:
    codec = load_codec(channel)
    request = codec.directory_request(kind, ctx, cursor, limit)
    assert request is not None
    return request, codec.parse_directory(kind, request, HttpResponse(status=200, body=body), cursor, limit)


def test_offset_cursors_refuse_what_they_did_not_give_out() -> None:
    assert offset_cursor("") == 0 and offset_cursor("150") == 150
    for bad in ("-1", "x", "1.5", "9" * 10, " 1", "²", "\u0661\u0660"):
        with pytest.raises(ValueError):
            offset_cursor(bad)


@pytest.mark.parametrize("channel", ["telegram", "webchat", "twilio", "whatsapp", "messenger"])
def test_channels_without_a_documented_listing_list_nothing(channel: str) -> None:
    codec = load_codec(channel)
    for kind in DIRECTORY_KINDS:
        assert codec.directory_request(kind, context({}), "", 10) is None


# ------------------------------------------------------------------------------------------ Slack

SLACK = Fixtures("slack", ".json")
SLACK_CONTEXT = context({"bot_token": "xoxb-1", "signing_secret": "s"})


def test_slack_chats_are_every_conversation_type_paged_by_slacks_cursor() -> None:
    request, listed = page("slack", "chats", SLACK_CONTEXT, SLACK.bytes("directory_conversations_list"), limit=2)
    assert request.method == "GET" and request.url.startswith(f"{BASE}/conversations.list?")
    assert query(request) == {"types": "public_channel,private_channel,mpim,im", "exclude_archived": "true",
                              "limit": "2"}
    assert request.headers == {"Authorization": "Bearer xoxb-1"}
    assert [(item.id, item.name, item.kind) for item in listed.items] == [("C012AB3CD", "general", "channel"),
                                                                          ("C061EG9T2", "random", "channel")]
    assert listed.items[0].channel_specific["topic"]["value"] == "Company-wide announcements and work-based matters"
    assert "id" not in listed.items[0].channel_specific and "name" not in listed.items[0].channel_specific
    assert listed.next_cursor == "dGVhbTpDMDYxRkE1UEI=" and listed.total is None


def test_slack_next_page_carries_the_cursor_and_reads_a_dm() -> None:
    request, listed = page("slack", "chats", SLACK_CONTEXT, SLACK.bytes("directory_conversations_list_im"),
                           cursor="dGVhbTpDMDYxRkE1UEI=")
    assert query(request)["cursor"] == "dGVhbTpDMDYxRkE1UEI="
    assert [(item.id, item.kind) for item in listed.items] == [("D024BFF1M", "direct")]
    assert listed.items[0].channel_specific["user"] == "U024BE7LH"
    assert listed.next_cursor == ""


def test_slack_channels_leave_out_dms() -> None:
    request, _ = page("slack", "channels", SLACK_CONTEXT, SLACK.bytes("directory_conversations_list"))
    assert query(request)["types"] == "public_channel,private_channel"


def test_slack_contacts_are_the_workspace_users() -> None:
    request, listed = page("slack", "contacts", SLACK_CONTEXT, SLACK.bytes("directory_users_list"))
    assert request.url.startswith(f"{BASE}/users.list?")
    egon = listed.items[0]
    assert (egon.id, egon.name, egon.kind, egon.handle) == ("W012A3CDE", "Egon Spengler", "user", "@spengler")
    assert egon.channel_specific["profile"]["email"] == "spengler@ghostbusters.example.com"
    assert listed.items[1].name == "Glinda Southgood"
    assert listed.next_cursor == "dXNlcjpVMEc5V0ZYTlo="


def test_slack_refusal_in_a_200_is_an_error_not_a_page() -> None:
    _, listed = page("slack", "contacts", SLACK_CONTEXT, SLACK.bytes("directory_error_invalid_cursor"))
    assert listed.error is not None and listed.error.code == "invalid_cursor" and listed.items == []


def test_slack_unreadable_list_names_the_path() -> None:
    with pytest.raises(DecodeError) as raised:
        page("slack", "contacts", SLACK_CONTEXT, b'{"ok": true, "members": [{"name": "no id"}]}')
    assert raised.value.path == "$.members[0]"


# ------------------------------------------------------------------------------------------ Discord

DISCORD = Fixtures("discord", ".json")
DISCORD_CONTEXT = context({"bot_token": "bot-token-1", "public_key": "00"}, {"guild_id": "41771983423143937"})


def test_discord_channels_are_the_guilds_paged_here() -> None:
    request, listed = page("discord", "channels", DISCORD_CONTEXT, DISCORD.bytes("directory_guild_channels"), limit=2)
    assert request.method == "GET" and request.url == f"{BASE}/guilds/41771983423143937/channels"
    assert request.headers["Authorization"] == "Bot bot-token-1"
    assert [(item.id, item.name, item.kind) for item in listed.items] == [
        ("399942396007890945", "Test", "category"), ("41771983423143937", "general", "channel")]
    assert listed.items[1].channel_specific["topic"] == "24/7 chat about how to gank Mike #2"
    assert listed.total == 3 and listed.next_cursor == "2"
    _, rest = page("discord", "channels", DISCORD_CONTEXT, DISCORD.bytes("directory_guild_channels"),
                   cursor="2", limit=2)
    assert [(item.name, item.kind) for item in rest.items] == [("ROCKET CHEESE", "channel")]
    assert rest.next_cursor == ""


def test_discord_members_page_after_the_highest_user_id() -> None:
    request, listed = page("discord", "contacts", DISCORD_CONTEXT, DISCORD.bytes("directory_guild_members"), limit=2)
    assert request.url == f"{BASE}/guilds/41771983423143937/members?limit=2"
    nelly, other = listed.items
    assert (nelly.id, nelly.name, nelly.kind, nelly.handle) == (
        "80351110224678912", "NOT API SUPPORT", "user", "@Nelly")
    assert nelly.channel_specific["joined_at"] == "2015-04-26T06:26:56.936000+00:00"
    assert (other.name, other.handle) == ("test", "@test")
    assert listed.next_cursor == "82198898841029460"  # a full page: more may follow
    request, last = page("discord", "contacts", DISCORD_CONTEXT, DISCORD.bytes("directory_guild_members"),
                         cursor="82198898841029460", limit=3)
    assert query(request) == {"limit": "3", "after": "82198898841029460"} and last.next_cursor == ""


def test_discord_lists_no_chats_and_nothing_without_a_guild() -> None:
    codec = load_codec("discord")
    assert codec.directory_request("chats", DISCORD_CONTEXT, "", 10) is None
    without_guild = context({"bot_token": "bot-token-1", "public_key": "00"})
    for kind in ("channels", "contacts"):
        with pytest.raises(EncodeError, match=r"options\.guild_id"):
            codec.directory_request(kind, without_guild, "", 10)


def test_discord_refuses_cursors_it_did_not_give_out() -> None:
    codec = load_codec("discord")
    for kind, cursor in (("contacts", "../../users/@me"), ("contacts", "²"), ("channels", "x")):
        with pytest.raises(ValueError):
            codec.directory_request(kind, DISCORD_CONTEXT, cursor, 10)


def test_discord_unreadable_member_names_the_path() -> None:
    with pytest.raises(DecodeError) as raised:
        page("discord", "contacts", DISCORD_CONTEXT, b'[{"nick": "no user"}]')
    assert raised.value.path == "$[0]"


# ---------------------------------------------------------------------------------------- Evolution

EVOLUTION = Fixtures("evolution", ".json")
EVOLUTION_CONTEXT = context({"apikey": "evo-key-1"}, {"instance": "sales team"})


def test_evolution_chats_come_from_find_chats_paged_here() -> None:
    request, listed = page("evolution", "chats", EVOLUTION_CONTEXT, EVOLUTION.bytes("directory_find_chats"), limit=1)
    assert (request.method, request.url) == ("POST", f"{BASE}/chat/findChats/sales%20team")
    assert request.headers["apikey"] == "evo-key-1" and request.body == b"{}"
    maria = listed.items[0]
    assert (maria.id, maria.name, maria.kind, maria.handle) == (
        "5511988887777@s.whatsapp.net", "Maria Souza", "direct", "+5511988887777")
    assert maria.channel_specific["unreadMessages"] == 2 and "remoteJid" not in maria.channel_specific
    assert listed.total == 2 and listed.next_cursor == "1"
    _, rest = page("evolution", "chats", EVOLUTION_CONTEXT, EVOLUTION.bytes("directory_find_chats"), cursor="1")
    assert [(item.id, item.name, item.kind) for item in rest.items] == [
        ("120363295648424210@g.us", "Example Group", "group")]
    assert rest.next_cursor == ""


def test_evolution_contacts_come_from_find_contacts() -> None:
    request, listed = page("evolution", "contacts", EVOLUTION_CONTEXT, EVOLUTION.bytes("directory_find_contacts"))
    assert request.url == f"{BASE}/chat/findContacts/sales%20team" and json_of(request) == {"where": {}}
    assert [(item.id, item.name, item.handle) for item in listed.items] == [
        ("5511988887777@s.whatsapp.net", "Maria Souza", "+5511988887777"),
        ("553198296801@s.whatsapp.net", "", "+553198296801")]


def test_evolution_channels_are_the_instances_groups() -> None:
    request, listed = page("evolution", "channels", EVOLUTION_CONTEXT, EVOLUTION.bytes("directory_fetch_all_groups"))
    assert (request.method, request.url) == ("GET", f"{BASE}/group/fetchAllGroups/sales%20team?getParticipants=false")
    assert request.headers == {"apikey": "evo-key-1"}
    group = listed.items[0]
    assert (group.id, group.name, group.kind) == ("120363295648424210@g.us", "Example Group", "group")
    assert group.channel_specific["size"] == 1 and group.channel_specific["owner"] == "553198296801@s.whatsapp.net"


def test_evolution_keeps_no_credential_in_what_it_lists() -> None:
    body = b'[{"remoteJid": "5511988887777@s.whatsapp.net", "token": "leak", "nested": {"apikey": "leak"}}]'
    _, listed = page("evolution", "contacts", EVOLUTION_CONTEXT, body)
    assert "leak" not in json.dumps(listed.items[0].channel_specific)


def test_evolution_refuses_cursors_it_did_not_give_out() -> None:
    with pytest.raises(ValueError):
        load_codec("evolution").directory_request("chats", EVOLUTION_CONTEXT, "abc", 10)


# -------------------------------------------------------------------------------------- Google Chat

GOOGLE_CHAT = Fixtures("google_chat", ".json")
GOOGLE_CHAT_CONTEXT = context({"access_token": "ya29.token"}, {"directory_space": "spaces/AAAAzn3Bzac"})


def test_google_chat_chats_are_the_apps_spaces_paged_by_next_page_token() -> None:
    request, listed = page("google_chat", "chats", GOOGLE_CHAT_CONTEXT, GOOGLE_CHAT.bytes("directory_spaces_list"),
                           cursor="previous-token", limit=20)
    assert request.url.startswith(f"{BASE}/v1/spaces?") and request.headers == {"Authorization": "Bearer ya29.token"}
    assert query(request) == {"pageSize": "20", "pageToken": "previous-token"}
    assert [(item.id, item.name, item.kind) for item in listed.items] == [
        ("spaces/AAAAzn3Bzac", "Support team", "channel"), ("spaces/BBBBkq8Dx1E", "", "direct")]
    assert listed.items[0].channel_specific["spaceThreadingState"] == "THREADED_MESSAGES"
    assert listed.next_cursor == "CiAKGjBpMDBjMDIyM2ZkYTgwMmYxMzFhZWY4ZjRmEAEaAg"


def test_google_chat_channels_are_named_spaces_only() -> None:
    request, _ = page("google_chat", "channels", GOOGLE_CHAT_CONTEXT, GOOGLE_CHAT.bytes("directory_spaces_list"))
    assert query(request)["filter"] == 'spaceType = "SPACE"'


def test_google_chat_contacts_are_the_members_of_the_configured_space() -> None:
    request, listed = page("google_chat", "contacts", GOOGLE_CHAT_CONTEXT, GOOGLE_CHAT.bytes("directory_members_list"))
    assert request.url.startswith(f"{BASE}/v1/spaces/AAAAzn3Bzac/members?")
    assert [(item.id, item.name, item.kind) for item in listed.items] == [
        ("users/114164005879224092462", "", "user"), ("users/app", "Helpdesk bot", "bot")]
    assert listed.items[0].channel_specific["role"] == "ROLE_MANAGER" and listed.next_cursor == ""


def test_google_chat_lists_no_contacts_without_a_space() -> None:
    codec = load_codec("google_chat")
    for space in ("", "spaces/../../v1/spaces", "users/1"):
        with pytest.raises(EncodeError, match="directory_space"):
            codec.directory_request("contacts", context({"access_token": "t"}, {"directory_space": space}), "", 10)


# -------------------------------------------------------------------------------------------- Teams

TEAMS = Fixtures("teams", ".json")
TEAMS_CONTEXT = context({"app_id": "a", "signing_keys": "k", "bot_token": "bf-token"},
                        {"directory_conversation": "19:ja0cu120i1jod12j@skype.net"})


def test_teams_contacts_are_the_paged_members_of_the_configured_conversation() -> None:
    request, listed = page("teams", "contacts", TEAMS_CONTEXT, TEAMS.bytes("directory_paged_members"),
                           cursor="asdfasdfalkdsjfalksjdf", limit=100)
    assert request.url.startswith(f"{BASE}/v3/conversations/19%3Aja0cu120i1jod12j%40skype.net/pagedmembers?")
    assert query(request) == {"pageSize": "100", "continuationToken": "asdfasdfalkdsjfalksjdf"}
    assert request.headers == {"Authorization": "Bearer bf-token"}
    larry = listed.items[0]
    assert (larry.name, larry.kind, larry.handle) == ("Larry Brown", "user", "labrown@fabrikam.com")
    assert larry.id.startswith("29:1GcS4EyB")
    assert larry.channel_specific["objectId"] == "9d3e08f9-a7ae-43aa-a4d3-de3f319a8a9c"
    assert listed.next_cursor == "asdfqwerueiqpiewr"


def test_teams_lists_no_chats_or_channels_and_no_contacts_without_a_conversation() -> None:
    codec = load_codec("teams")
    assert codec.directory_request("chats", TEAMS_CONTEXT, "", 10) is None
    assert codec.directory_request("channels", TEAMS_CONTEXT, "", 10) is None
    with pytest.raises(EncodeError, match="directory_conversation"):
        codec.directory_request("contacts", context({"bot_token": "t"}), "", 10)
