"""The directory API (`babelhub.api.directory`) through a real hub against fake channel APIs: one shape for
every channel, the channel's cursor passed through an opaque one, pages cached for
`hub.directory_cache_seconds`, 501 for a channel that cannot list, 404 for another tenant's connection,
the channel's failures and rate limits mapped, and hostile parameters refused naming the parameter."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from tests.fakeapi import FakeApi, Recorded, Reply
from tests.hubkit import StartHub, unique_prefix

FIXTURES = Path(__file__).parent / "fixtures"
KEYS = {"acme": "acme-directory-key", "other": "other-directory-key"}
SLACK_TOKEN = "xoxb-directory-secret-token-1234"


def fixture(channel: str, name: str) -> Any:
    return json.loads((FIXTURES / channel / f"{name}.json").read_bytes())


def slack_responder(request: Recorded) -> Reply:
    """Slack's Web API as documented: the spec's example pages, the second page after its `next_cursor`."""
    if request.path.endswith("/users.list"):
        return Reply(body=fixture("slack", "directory_users_list"))
    if request.query.get("cursor") == "dGVhbTpDMDYxRkE1UEI=":
        return Reply(body=fixture("slack", "directory_conversations_list_im"))
    return Reply(body=fixture("slack", "directory_conversations_list"))


def config(nats_url: str, slack_api: str, *, cache_seconds: float = 60.0) -> cfg.Config:
    slack_secrets = {"bot_token": SLACK_TOKEN, "signing_secret": "slack-signing-secret"}
    return cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_url, subject_prefix=unique_prefix(),
                            directory_cache_seconds=cache_seconds),
        tenants=[cfg.Tenant(id="acme", api_keys=[KEYS["acme"]]), cfg.Tenant(id="other", api_keys=[KEYS["other"]])],
        connections=[
            cfg.Connection(id="slack", tenant="acme", channel="slack", api_base=slack_api, secrets=slack_secrets),
            cfg.Connection(id="tg", tenant="acme", channel="telegram", api_base=slack_api,
                           secrets={"bot_token": "123:telegram-token", "secret_token": "t"}),
            cfg.Connection(id="chat", tenant="acme", channel="webchat"),
            cfg.Connection(id="their-slack", tenant="other", channel="slack", api_base=slack_api,
                           secrets=slack_secrets),
        ])


@pytest.fixture
async def hub(nats_server: EmbeddedServer, start_hub: StartHub, fake_api: FakeApi) -> Hub:
    fake_api.responder = slack_responder
    return await start_hub(config(nats_server.url, fake_api.base_url))


async def get(http: aiohttp.ClientSession, hub: Hub, path: str, key: str = KEYS["acme"],
              **query: str) -> tuple[int, Any, dict[str, str]]:
    async with http.get(hub.http_url + path, params=query, headers={"Authorization": f"Bearer {key}"}) as response:
        return response.status, await response.json(), dict(response.headers)


def directory_calls(api: FakeApi) -> list[Recorded]:
    return [request for request in api.requests if request.path.endswith((".list",))]


async def test_slack_channels_in_one_shape_with_the_channel_cursor_passed_through(
        hub: Hub, http: aiohttp.ClientSession, fake_api: FakeApi) -> None:
    status, first, _ = await get(http, hub, "/v1/connections/slack/chats", limit="2")
    assert status == 200, first
    assert [item["id"] for item in first["data"]] == ["C012AB3CD", "C061EG9T2"]
    assert first["data"][0]["name"] == "general" and first["data"][0]["kind"] == "channel"
    assert first["data"][0]["channel_specific"]["num_members"] == 4
    assert first["metadata"]["has_more"] is True and first["metadata"]["total_count"] is None
    cursor = first["metadata"]["next_cursor"]
    assert "dGVhbTpDMDYxRkE1UEI" not in cursor  # opaque: the channel's own cursor is wrapped

    status, second, _ = await get(http, hub, "/v1/connections/slack/chats", limit="2", cursor=cursor)
    assert status == 200, second
    assert second["data"] == [{"id": "D024BFF1M", "name": "", "kind": "direct", "handle": "", "channel_specific": {
        "is_im": True, "user": "U024BE7LH", "created": 1360782804, "is_user_deleted": False}}]
    assert second["metadata"] == {"total_count": None, "has_more": False, "next_cursor": None}

    calls = directory_calls(fake_api)
    assert [call.query.get("cursor") for call in calls] == [None, "dGVhbTpDMDYxRkE1UEI="]
    assert all(call.query["limit"] == "2" and call.headers["authorization"] == f"Bearer {SLACK_TOKEN}"
               for call in calls)
    assert calls[0].query["types"] == "public_channel,private_channel,mpim,im"


async def test_slack_contacts_and_channels(hub: Hub, http: aiohttp.ClientSession, fake_api: FakeApi) -> None:
    status, contacts, _ = await get(http, hub, "/v1/connections/slack/contacts")
    assert status == 200, contacts
    first = contacts["data"][0]
    assert (first["id"], first["name"], first["kind"], first["handle"]) == ("W012A3CDE", "Egon Spengler", "user",
                                                                             "@spengler")
    assert first["channel_specific"]["tz"] == "America/Los_Angeles"
    status, channels, _ = await get(http, hub, "/v1/connections/slack/channels")
    assert status == 200 and len(channels["data"]) == 2
    assert directory_calls(fake_api)[-1].query["types"] == "public_channel,private_channel"
    assert directory_calls(fake_api)[0].query["limit"] == "50"  # the default page


async def test_a_page_is_read_from_the_channel_once_within_the_cache_time(
        hub: Hub, http: aiohttp.ClientSession, fake_api: FakeApi) -> None:
    for _ in range(3):
        status, _, _ = await get(http, hub, "/v1/connections/slack/contacts", limit="10")
        assert status == 200
    assert len(directory_calls(fake_api)) == 1
    status, _, _ = await get(http, hub, "/v1/connections/slack/contacts", limit="11")
    assert status == 200 and len(directory_calls(fake_api)) == 2  # another page: another call


async def test_without_a_cache_time_every_read_asks_the_channel(
        nats_server: EmbeddedServer, start_hub: StartHub, fake_api: FakeApi, http: aiohttp.ClientSession) -> None:
    fake_api.responder = slack_responder
    hub = await start_hub(config(nats_server.url, fake_api.base_url, cache_seconds=0))
    for _ in range(2):
        status, _, _ = await get(http, hub, "/v1/connections/slack/contacts")
        assert status == 200
    assert len(directory_calls(fake_api)) == 2


@pytest.mark.parametrize(("connection", "channel"), [("tg", "telegram"), ("chat", "webchat")])
async def test_a_channel_that_cannot_list_answers_501_naming_it(
        hub: Hub, http: aiohttp.ClientSession, fake_api: FakeApi, connection: str, channel: str) -> None:
    for kind in ("chats", "contacts", "channels"):
        status, body, _ = await get(http, hub, f"/v1/connections/{connection}/{kind}")
        assert status == 501, body
        assert body["error"] == {"code": "not_implemented", "message": f"{channel} cannot list {kind}", "path": ""}
    assert fake_api.requests == []


async def test_another_tenants_connection_is_404_like_one_that_does_not_exist(
        hub: Hub, http: aiohttp.ClientSession, fake_api: FakeApi) -> None:
    theirs = await get(http, hub, "/v1/connections/their-slack/chats")
    missing = await get(http, hub, "/v1/connections/no-such-slack/chats")
    assert theirs[0] == missing[0] == 404
    assert theirs[1]["error"]["code"] == missing[1]["error"]["code"] == "not_found"
    assert theirs[1]["error"]["path"] == "id"
    assert fake_api.requests == []
    status, _, _ = await get(http, hub, "/v1/connections/their-slack/chats", key=KEYS["other"])
    assert status == 200  # its own tenant reads it


async def test_a_key_without_read_scope_is_refused(hub: Hub, http: aiohttp.ClientSession) -> None:
    _, sender = await hub.services.keys.create("acme", ["send"])
    status, body, _ = await get(http, hub, "/v1/connections/slack/chats", key=sender)
    assert status == 403 and "'read'" in body["error"]["message"]


async def test_a_channel_failure_is_502_naming_its_status_never_its_token(
        hub: Hub, http: aiohttp.ClientSession, fake_api: FakeApi, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake_api.queue(Reply(status=500, body={"ok": False, "error": "fatal_error", "token": SLACK_TOKEN}))
    status, body, _ = await get(http, hub, "/v1/connections/slack/contacts")
    assert status == 502 and body["error"]["code"] == "channel_error"
    assert "slack answered HTTP 500" in body["error"]["message"] and SLACK_TOKEN not in json.dumps(body)
    fake_api.queue(Reply(body=fixture("slack", "directory_error_invalid_cursor")))
    status, body, _ = await get(http, hub, "/v1/connections/slack/contacts")
    assert status == 502 and "invalid_cursor" in body["error"]["message"]
    fake_api.queue(Reply(body=[{"not": "a users.list answer"}]))
    status, body, _ = await get(http, hub, "/v1/connections/slack/contacts")
    assert status == 502 and "cannot be read" in body["error"]["message"]
    status, _, _ = await get(http, hub, "/v1/connections/slack/contacts")
    assert status == 200  # failures are not cached
    assert SLACK_TOKEN not in caplog.text


async def test_a_channel_rate_limit_is_503_with_its_retry_after(
        hub: Hub, http: aiohttp.ClientSession, fake_api: FakeApi) -> None:
    fake_api.queue(Reply(status=429, body={"ok": False, "error": "ratelimited"}, headers={"Retry-After": "7"}))
    status, body, headers = await get(http, hub, "/v1/connections/slack/chats")
    assert status == 503 and body["error"]["code"] == "channel_rate_limited"
    assert headers["Retry-After"] == "7"


@pytest.mark.parametrize("limit", ["0", "201", "-1", "ten", "1e3", "", "9" * 40, "²", "\u0661\u0660", " 10", "10 "])
async def test_a_limit_out_of_range_is_400_naming_limit(
        hub: Hub, http: aiohttp.ClientSession, fake_api: FakeApi, limit: str) -> None:
    status, body, _ = await get(http, hub, "/v1/connections/slack/chats", limit=limit)
    assert status == 400 and body["error"]["path"] == "limit", body
    assert fake_api.requests == []


async def test_a_garbage_cursor_is_400_naming_cursor(
        hub: Hub, http: aiohttp.ClientSession, fake_api: FakeApi) -> None:
    status, page, _ = await get(http, hub, "/v1/connections/slack/chats", limit="2")
    good = page["metadata"]["next_cursor"]
    _, their_page, _ = await get(http, hub, "/v1/connections/their-slack/chats", key=KEYS["other"], limit="2")
    calls = len(fake_api.requests)
    for cursor in ["garbage", "%%%", "é", "W10", "x" * 5000, good[:-3], their_page["metadata"]["next_cursor"]]:
        status, body, _ = await get(http, hub, "/v1/connections/slack/chats", cursor=cursor)
        assert status == 400 and body["error"]["path"] == "cursor", (cursor, body)
    status, body, _ = await get(http, hub, "/v1/connections/slack/contacts", cursor=good)  # another kind's
    assert status == 400 and body["error"]["path"] == "cursor"
    # Well formed, for this connection and kind, but longer than any cursor the API gives out.
    oversized = base64.urlsafe_b64encode(json.dumps(["slack", "chats", "A" * 3500]).encode()).decode()
    status, body, _ = await get(http, hub, "/v1/connections/slack/chats", cursor=oversized)
    assert status == 400 and body["error"]["path"] == "cursor"
    assert len(fake_api.requests) == calls


# ------------------------------------------------------------------------------ every listing channel

TEAM = "19:ja0cu120i1jod12j@skype.net"
LARRY = ("29:1GcS4EyB_oSI8A88XmWBN7NJFyMqe3QGnJdgLfFGkJnVelzRGos0bPbpsfJjcbAD22bmKc4GMbrY2g4JDrrA8vM06X1"
         "-cHHle4zOE6U4ttcc")
CHANNELS: dict[str, dict[str, Any]] = {
    "discord": {"secrets": {"public_key": "00" * 32, "bot_token": "discord-directory-token"},
                "options": {"guild_id": "41771983423143937"},
                "credential": ("authorization", "Bot discord-directory-token"),
                "answers": {"/guilds/41771983423143937/channels": "directory_guild_channels",
                            "/guilds/41771983423143937/members": "directory_guild_members"}},
    "evolution": {"secrets": {"apikey": "evolution-directory-key"}, "options": {"instance": "sales"},
                  "credential": ("apikey", "evolution-directory-key"),
                  "answers": {"/chat/findChats/sales": "directory_find_chats",
                              "/chat/findContacts/sales": "directory_find_contacts",
                              "/group/fetchAllGroups/sales": "directory_fetch_all_groups"}},
    "google_chat": {"secrets": {"access_token": "ya29.directory-token", "audience": "1234567890",
                                "signing_keys": "{}"},
                    "options": {"directory_space": "spaces/AAAAzn3Bzac"},
                    "credential": ("authorization", "Bearer ya29.directory-token"),
                    "answers": {"/v1/spaces": "directory_spaces_list",
                                "/v1/spaces/AAAAzn3Bzac/members": "directory_members_list"}},
    "teams": {"secrets": {"app_id": "app", "signing_keys": "{}", "bot_token": "teams-directory-token"},
              "options": {"directory_conversation": TEAM},
              "credential": ("authorization", "Bearer teams-directory-token"),
              "answers": {f"/v3/conversations/{TEAM}/pagedmembers": "directory_paged_members"}},
}
"""Per channel: a connection's settings, the credential each directory call must carry, and the documented
answer (a fixture) the fake API gives on each path."""

EXPECTED = {  # (channel, kind): the first item's id and kind, or None where the channel cannot list
    ("discord", "chats"): None, ("discord", "contacts"): ("80351110224678912", "user"),
    ("discord", "channels"): ("399942396007890945", "category"),
    ("evolution", "chats"): ("5511988887777@s.whatsapp.net", "direct"),
    ("evolution", "contacts"): ("5511988887777@s.whatsapp.net", "direct"),
    ("evolution", "channels"): ("120363295648424210@g.us", "group"),
    ("google_chat", "chats"): ("spaces/AAAAzn3Bzac", "channel"),
    ("google_chat", "contacts"): ("users/114164005879224092462", "user"),
    ("google_chat", "channels"): ("spaces/AAAAzn3Bzac", "channel"),
    ("teams", "chats"): None, ("teams", "channels"): None,
    ("teams", "contacts"): (LARRY, "user"),
}


def channel_responder(channel: str) -> Any:
    answers = CHANNELS[channel]["answers"]

    def respond(request: Recorded) -> Reply:
        name = answers.get(request.path)
        return Reply(body=fixture(channel, name)) if name else Reply(status=404, body={"message": "Unknown"})

    return respond


@pytest.mark.parametrize("channel", sorted(CHANNELS))
async def test_every_listing_channel_answers_in_the_one_shape(
        nats_server: EmbeddedServer, start_hub: StartHub, fake_api: FakeApi, http: aiohttp.ClientSession,
        channel: str) -> None:
    fake_api.responder = channel_responder(channel)
    settings = CHANNELS[channel]
    hub = await start_hub(cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_server.url, subject_prefix=unique_prefix()),
        tenants=[cfg.Tenant(id="acme", api_keys=[KEYS["acme"]])],
        connections=[cfg.Connection(id="it", tenant="acme", channel=channel, api_base=fake_api.base_url,
                                    secrets=settings["secrets"], options=settings["options"])]))
    for kind in ("chats", "contacts", "channels"):
        status, body, _ = await get(http, hub, f"/v1/connections/it/{kind}", limit="1")
        expected = EXPECTED[(channel, kind)]
        if expected is None:
            assert status == 501 and body["error"]["message"] == f"{channel} cannot list {kind}", body
            continue
        assert status == 200, (kind, body)
        assert set(body) == {"data", "metadata"}
        assert set(body["metadata"]) == {"total_count", "has_more", "next_cursor"}
        first = body["data"][0]
        assert set(first) == {"id", "name", "kind", "handle", "channel_specific"}
        assert (first["id"], first["kind"]) == expected, kind
    header, value = settings["credential"]
    assert fake_api.requests and all(request.headers[header] == value for request in fake_api.requests)


async def test_a_connection_missing_the_setting_a_listing_needs_answers_501_with_the_reason(
        nats_server: EmbeddedServer, start_hub: StartHub, fake_api: FakeApi, http: aiohttp.ClientSession) -> None:
    hub = await start_hub(cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_server.url, subject_prefix=unique_prefix()),
        tenants=[cfg.Tenant(id="acme", api_keys=[KEYS["acme"]])],
        connections=[cfg.Connection(id="dc", tenant="acme", channel="discord", api_base=fake_api.base_url,
                                    secrets=CHANNELS["discord"]["secrets"])]))
    status, body, _ = await get(http, hub, "/v1/connections/dc/contacts")
    assert status == 501 and body["error"]["code"] == "not_implemented"
    message = body["error"]["message"]
    assert message.startswith("discord cannot list contacts: ") and "options.guild_id" in message
    assert fake_api.requests == []


async def test_a_channel_that_does_not_answer_is_502(
        nats_server: EmbeddedServer, start_hub: StartHub, http: aiohttp.ClientSession) -> None:
    closed = FakeApi()
    base_url = await closed.start()
    await closed.stop()  # nothing listens there any more
    hub = await start_hub(config(nats_server.url, base_url))
    status, body, _ = await get(http, hub, "/v1/connections/slack/chats")
    assert status == 502 and body["error"] == {"code": "channel_error", "message": "slack did not answer", "path": ""}
