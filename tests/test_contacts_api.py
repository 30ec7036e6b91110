"""The contacts API (`/v1/contacts…`): contacts made from senders, identities linked, a person erased
from every stream the hub keeps, and another tenant's contacts invisible. Real nats-server, the hub
in-process, Telegram webhooks in, a local fake of the Bot API."""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec
import pytest

from babelhub import canonical as c
from babelhub.hub.app import Hub
from babelhub.services.broker import EmbeddedServer
from tests.fakeapi import FakeApi
from tests.historykit import (
    ACME,
    OTHER,
    api,
    conversation_with,
    get,
    group_update,
    private_update,
    refused,
    two_tenants,
    until,
    webhook,
)
from tests.hubkit import StartHub, stream_messages, telegram_responder


@pytest.fixture
async def hub(nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub) -> Hub:
    fake_api.responder = telegram_responder
    return await start_hub(two_tenants(nats_server.url, fake_api.base_url))


def contact_id(chat_id: int, tenant: str = ACME, connection: str = "tg") -> str:
    return c.sender_id(tenant, connection, str(chat_id))


async def contact(http: aiohttp.ClientSession, hub: Hub, chat_id: int) -> dict[str, Any]:
    async def made() -> Any:
        status, found = await api(http, hub, "GET", f"/v1/contacts/{contact_id(chat_id)}")
        return found if status == 200 else None
    found: dict[str, Any] = await until(made)
    return found


async def everything_stored(hub: Hub) -> bytes:
    """Every message of the raw, messages, statuses and history streams, one after the other."""
    stored: list[bytes] = []
    for role in ("raw", "messages", "statuses", "history"):
        stored += await stream_messages(hub.nc, f"{hub.subjects.prefix}.>", hub.subjects.stream_name(role))
    return b"\n".join(stored)


async def audit_events(hub: Hub, tenant: str) -> list[dict[str, Any]]:
    raw = await stream_messages(hub.nc, f"{hub.subjects.prefix}.{tenant}.audit.>", hub.subjects.stream_name("audit"))
    return [msgspec.json.decode(item) for item in raw]


async def test_contacts_made_from_senders_listed_and_isolated(hub: Hub, http: aiohttp.ClientSession) -> None:
    await webhook(http, hub, private_update(901, "hi", name="Ada"))
    await webhook(http, hub, private_update(902, "hello", name="Grace"))
    await webhook(http, hub, private_update(903, "hey", name="Linus"), tenant=OTHER)
    ada = await contact(http, hub, 901)
    await contact(http, hub, 902)
    assert ada["name"] == "Ada"
    assert [(i["connection"], i["channel"], i["native_id"]) for i in ada["identities"]] == [("tg", "telegram", "901")]
    assert ada["conversations"] == [c.conversation_id(ACME, "tg", "901")]

    listed = await get(http, hub, "/v1/contacts")
    assert sorted(item["name"] for item in listed["data"]) == ["Ada", "Grace"]  # never the other tenant's
    assert [item["name"] for item in (await get(http, hub, "/v1/contacts?q=grac"))["data"]] == ["Grace"]
    assert (await get(http, hub, "/v1/contacts?connection=tg-other"))["data"] == []
    first = await get(http, hub, "/v1/contacts?limit=1")
    second = await get(http, hub, f"/v1/contacts?limit=1&cursor={first['metadata']['next_cursor']}")
    assert {first["data"][0]["id"], second["data"][0]["id"]} == {item["id"] for item in listed["data"]}
    assert second["metadata"] == {"has_more": False, "total_count": 2}

    theirs = contact_id(903, OTHER, "tg-other")
    await until(lambda: _found(http, hub, f"/v1/contacts/{theirs}", OTHER))
    for method, path, body in (("GET", f"/v1/contacts/{theirs}", None), ("DELETE", f"/v1/contacts/{theirs}", None),
                               ("POST", f"/v1/contacts/{theirs}/identities", {"contact": ada["id"]})):
        missing = path.replace(theirs, contact_id(123456))
        assert refused(*await api(http, hub, method, path, body=body)) == \
            refused(*await api(http, hub, method, missing, body=body)) == (404, "not_found", "id")
    linked = await api(http, hub, "POST", f"/v1/contacts/{ada['id']}/identities", body={"contact": theirs})
    assert refused(*linked) == (404, "not_found", "$.contact")
    assert (await get(http, hub, f"/v1/contacts/{theirs}", tenant=OTHER))["name"] == "Linus"  # untouched


async def _found(http: aiohttp.ClientSession, hub: Hub, path: str, tenant: str) -> bool:
    return (await api(http, hub, "GET", path, tenant=tenant))[0] == 200


async def test_linking_an_identity_merges_the_other_contact(hub: Hub, http: aiohttp.ClientSession) -> None:
    await webhook(http, hub, private_update(911, "from my phone", name="Ada"))
    await webhook(http, hub, private_update(912, "from my laptop", name="Ada L."))
    ada, laptop = await contact(http, hub, 911), await contact(http, hub, 912)

    status, linked = await api(http, hub, "POST", f"/v1/contacts/{ada['id']}/identities",
                               body={"contact": laptop["id"]})
    assert status == 200, linked
    assert [i["native_id"] for i in linked["identities"]] == ["911", "912"]
    assert set(linked["conversations"]) == {c.conversation_id(ACME, "tg", "911"), c.conversation_id(ACME, "tg", "912")}
    assert (await api(http, hub, "GET", f"/v1/contacts/{laptop['id']}"))[0] == 404
    both = await get(http, hub, f"/v1/conversations?participant={ada['id']}")
    assert sorted(item["native_id"] for item in both["data"]) == ["911", "912"]

    # The linked identity's next message is the merged contact's, not a new one.
    await webhook(http, hub, private_update(912, "again from my laptop", name="Ada L."))
    await conversation_with(http, hub, 912, 2)
    assert (await api(http, hub, "GET", f"/v1/contacts/{laptop['id']}"))[0] == 404
    assert (await get(http, hub, "/v1/contacts"))["metadata"]["total_count"] == 1
    [event] = [e for e in await audit_events(hub, ACME) if e["action"] == "contact.link"]
    assert event["target"] == ada["id"] and event["changes"]["linked"] == laptop["id"]

    for body, path in (({"contact": ada["id"]}, "$.contact"), ({"contact": "no such!"}, "$.contact"),
                       ({"other": 1}, "$"), ([], "$")):
        status, answer = await api(http, hub, "POST", f"/v1/contacts/{ada['id']}/identities", body=body)
        assert refused(status, answer)[0] == 400 and refused(status, answer)[2] == path, answer


async def test_erase_removes_the_persons_messages_from_every_stream(hub: Hub, http: aiohttp.ClientSession) -> None:
    await webhook(http, hub, private_update(921, "my secret-apple-pie recipe", name="Ada"))
    await webhook(http, hub, group_update(-4001, 921, "Ada", "group secret-plum-cake"))
    await webhook(http, hub, group_update(-4001, 922, "Grace", "grace keeps her-own-words"))
    await webhook(http, hub, private_update(922, "grace private-note"))
    direct = (await conversation_with(http, hub, 921, 1))["id"]
    status, sent = await api(http, hub, "POST", "/v1/messages", body={
        "conversation": {"id": direct}, "parts": [{"type": "text", "text": "reply about secret-apple-pie"}]})
    assert status == 202, sent
    await conversation_with(http, hub, 921, 2)
    group = (await conversation_with(http, hub, -4001, 2))["id"]
    await conversation_with(http, hub, 922, 1)
    stored = await everything_stored(hub)
    assert b"secret-apple-pie" in stored and b"secret-plum-cake" in stored

    ada = await contact(http, hub, 921)
    assert set(ada["conversations"]) == {direct, group}
    status, erased = await api(http, hub, "DELETE", f"/v1/contacts/{ada['id']}")
    assert status == 200, erased
    assert erased == {"id": ada["id"], "conversations": 1, "messages": 3, "raw_records": 2, "identities": 1}

    stored = await everything_stored(hub)
    for text in (b"secret-apple-pie", b"secret-plum-cake"):
        assert text not in stored
    for kept in (b"her-own-words", b"private-note"):
        assert kept in stored
    assert (await api(http, hub, "GET", f"/v1/contacts/{ada['id']}"))[0] == 404
    assert (await api(http, hub, "GET", f"/v1/conversations/{direct}"))[0] == 404
    remaining = await get(http, hub, f"/v1/conversations/{group}/messages")
    assert [item["envelope"]["parts"][0]["text"] for item in remaining["data"]] == ["grace keeps her-own-words"]
    left = await get(http, hub, f"/v1/conversations/{group}")
    assert [p["name"] for p in left["participants"]] == ["Grace"] and left["message_count"] == 1
    assert left["preview"] == "grace keeps her-own-words"
    [event] = [e for e in await audit_events(hub, ACME) if e["action"] == "contact.erase"]
    assert event["target"] == ada["id"] and event["changes"]["messages"] == "3"


async def test_a_read_key_lists_but_cannot_link_or_erase(hub: Hub, http: aiohttp.ClientSession) -> None:
    await webhook(http, hub, private_update(931, "hi"))
    ada = await contact(http, hub, 931)
    _, reader = await hub._started().services.keys.create(ACME, ["read"], "reporting")
    headers = {"Authorization": f"Bearer {reader}"}
    async with http.get(f"{hub.http_url}/v1/contacts", headers=headers) as response:
        assert response.status == 200
    for method, path in (("DELETE", f"/v1/contacts/{ada['id']}"), ("POST", f"/v1/contacts/{ada['id']}/identities")):
        async with http.request(method, f"{hub.http_url}{path}", headers=headers,
                                json={"contact": ada["id"]}) as response:
            assert response.status == 403, await response.text()
    assert (await get(http, hub, f"/v1/contacts/{ada['id']}"))["id"] == ada["id"]
