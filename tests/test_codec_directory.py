"""The codecs' directory functions (`Codec.directory_request`, `Codec.parse_directory`) on the channels'
documented list answers (tests/fixtures/<channel>/directory_*.json, sources in each SOURCES.md): the
request each makes, how its answer maps onto `DirectoryItem`s, and where the next page starts."""

from __future__ import annotations

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
from babelhub.errors import DecodeError
from tests.codeckit import Fixtures

BASE = "http://127.0.0.1:9"


def context(secrets: dict[str, str], options: dict[str, Any] | None = None) -> EncodeContext:
    return EncodeContext(tenant="acme", connection="c1", to="", api_base=BASE, secrets=secrets, options=options or {})


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
    for bad in ("-1", "x", "1.5", "9" * 10, " 1"):
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
