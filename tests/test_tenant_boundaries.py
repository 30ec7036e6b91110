"""One tenant never sees another's things, through any REST endpoint: every id another tenant owns —
conversation, message, contact, connection (from the config file or made over the API), template, key —
is answered exactly as an id that does not exist (404 `not_found`, never 403), and no list shows it.
The table below must name every endpoint of `/openapi.json` that takes an id, so an endpoint added
later without a check here fails `test_every_endpoint_with_an_id_is_checked`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from babelhub.services.secretbox import new_key
from tests.fakeapi import FakeApi
from tests.historykit import ACME, CONNECTIONS, KEYS, OTHER, conversation_with, private_update, webhook
from tests.hubkit import BOT_TOKEN, SECRET, StartHub, telegram_responder, unique_prefix

OPERATOR_KEY = "operator-key-of-the-boundary-tests"
TEMPLATE = {"variables": ["name"], "versions": {"en": {"text": "Hello {{name}}"}}}


@dataclass
class Owned:
    """Ids that exist, of one tenant."""

    conversation: str
    message: str
    contact: str
    connection: str
    managed_connection: str
    template: str
    key: str


@pytest.fixture
async def hub(nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub) -> Hub:
    fake_api.responder = telegram_responder
    return await start_hub(cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_server.url, subject_prefix=unique_prefix(),
                            master_key=new_key(), operator_key=OPERATOR_KEY, allow_private_api_base=True),
        tenants=[cfg.Tenant(id=tenant, api_keys=[key]) for tenant, key in KEYS.items()],
        connections=[cfg.Connection(id=connection, tenant=tenant, channel="telegram", api_base=fake_api.base_url,
                                    secrets={"bot_token": BOT_TOKEN, "secret_token": SECRET})
                     for tenant, connection in CONNECTIONS.items()]))


async def call(http: aiohttp.ClientSession, hub: Hub, method: str, path: str, tenant: str,
               body: Any = None) -> tuple[int, Any]:
    async with http.request(method, hub.http_url + path, json=body,
                            headers={"Authorization": f"Bearer {KEYS[tenant]}"}) as response:
        text = await response.text()
        return response.status, json.loads(text) if text else None


async def made(http: aiohttp.ClientSession, hub: Hub, method: str, path: str, tenant: str, body: Any) -> Any:
    status, answer = await call(http, hub, method, path, tenant, body)
    assert status in (200, 201, 202), (path, status, answer)
    return answer


async def things_of(http: aiohttp.ClientSession, hub: Hub, fake_api: FakeApi, tenant: str, chat: int) -> Owned:
    """One of each kind of thing, made by `tenant`."""
    await webhook(http, hub, private_update(chat, f"hello from a customer of {tenant}"), tenant=tenant)
    conversation = (await conversation_with(http, hub, chat, 1, tenant=tenant))["id"]
    message = (await made(http, hub, "POST", "/v1/messages", tenant,
                          {"conversation": {"id": conversation}, "parts": [{"type": "text", "text": "hi"}]}))["id"]
    [contact] = (await made(http, hub, "GET", "/v1/contacts", tenant, None))["data"]
    managed = f"api-{tenant}"
    await made(http, hub, "POST", "/v1/connections", tenant, {
        "id": managed, "channel": "telegram", "mode": "webhook", "api_base": fake_api.base_url,
        "secrets": {"bot_token": f"{chat}:{tenant}-managed-bot-token", "secret_token": f"{tenant}-managed-secret"}})
    await made(http, hub, "POST", "/v1/templates", tenant, {"name": f"welcome-{tenant}", **TEMPLATE})
    key = (await made(http, hub, "POST", "/v1/keys", tenant, {"scopes": ["read"], "name": "reporting"}))
    return Owned(conversation=conversation, message=message, contact=contact["id"],
                 connection=CONNECTIONS[tenant], managed_connection=managed, template=f"welcome-{tenant}",
                 key=key["id"])


def requests(ids: Owned, own: Owned) -> list[tuple[str, str, Any]]:
    """Every call that names an id: (method, path, body), with `ids` in the path; bodies that would be
    accepted were the ids the caller's (`own`)."""
    template_body = TEMPLATE
    connection_body = {"channel": "telegram", "mode": "webhook"}
    return [
        ("GET", f"/v1/conversations/{ids.conversation}", None),
        ("GET", f"/v1/conversations/{ids.conversation}/messages", None),
        ("GET", f"/v1/messages/{ids.message}", None),
        ("DELETE", f"/v1/messages/{ids.message}", None),
        ("GET", f"/v1/contacts/{ids.contact}", None),
        ("POST", f"/v1/contacts/{ids.contact}/identities", {"contact": own.contact}),
        ("DELETE", f"/v1/contacts/{ids.contact}", None),
        *[(method, f"/v1/connections/{connection}", body)
          for connection in (ids.connection, ids.managed_connection)
          for method, body in (("GET", None), ("PUT", connection_body), ("DELETE", None))],
        *[("GET", f"/v1/connections/{ids.managed_connection}/{kind}", None)
          for kind in ("chats", "contacts", "channels")],
        ("GET", f"/v1/templates/{ids.template}", None),
        ("PUT", f"/v1/templates/{ids.template}", template_body),
        ("POST", f"/v1/templates/{ids.template}/render", {"params": {"name": "Ada"}}),
        ("DELETE", f"/v1/templates/{ids.template}", None),
        ("DELETE", f"/v1/keys/{ids.key}", None),
    ]


def nowhere(ids: Owned) -> Owned:
    """Ids of the same shapes that nobody owns."""
    def twisted(value: str) -> str:
        return value[:-1] + ("a" if value[-1] != "a" else "b")

    return Owned(**{name: twisted(value) for name, value in vars(ids).items()})


async def test_another_tenants_ids_are_answered_as_ids_that_do_not_exist(
        hub: Hub, http: aiohttp.ClientSession, fake_api: FakeApi) -> None:
    theirs = await things_of(http, hub, fake_api, OTHER, 2001)
    mine = await things_of(http, hub, fake_api, ACME, 1001)
    missing_ids = nowhere(theirs)
    for (method, path, body), (_, missing_path, _) in zip(requests(theirs, mine), requests(missing_ids, mine),
                                                            strict=True):
        status, answer = await call(http, hub, method, path, ACME, body)
        missing_status, missing = await call(http, hub, method, missing_path, ACME, body)
        assert (status, missing_status) == (404, 404), (method, path, answer, missing)
        assert answer["error"]["code"] == missing["error"]["code"] == "not_found", (method, path, answer)
        assert answer["error"]["path"] == missing["error"]["path"], (method, path)
        assert _with(answer["error"]["message"], theirs, missing_ids) == missing["error"]["message"], (method, path)
    # nothing of theirs was touched: they still read it all
    for method, path, _ in requests(theirs, theirs):
        if method == "GET":
            status, answer = await call(http, hub, method, path, OTHER)
            assert status in (200, 501), (path, status, answer)  # 501: telegram lists no directory


async def test_no_list_shows_another_tenants_things(hub: Hub, http: aiohttp.ClientSession, fake_api: FakeApi) -> None:
    theirs = await things_of(http, hub, fake_api, OTHER, 2002)
    await things_of(http, hub, fake_api, ACME, 1002)
    for path in ("/v1/conversations", "/v1/contacts", "/v1/connections", "/v1/templates", "/v1/keys"):
        status, answer = await call(http, hub, "GET", path, ACME)
        assert status == 200, (path, answer)
        listed = json.dumps(answer)
        for their_id in vars(theirs).values():
            assert their_id not in listed, (path, their_id)


async def test_every_endpoint_with_an_id_is_checked(hub: Hub, http: aiohttp.ClientSession) -> None:
    async with http.get(hub.http_url + "/openapi.json") as response:
        document = await response.json()
    operator_only = {path for path, operations in document["paths"].items()
                     if all("operator key" in operation["description"] for operation in operations.values())}
    with_ids = {(method.upper(), path) for path, operations in document["paths"].items() if "{" in path
                and path not in operator_only for method in operations}
    sample = Owned(*(f"x{field.name}" for field in dataclasses.fields(Owned)))
    checked = {(method, _template_of(path, sample)) for method, path, _ in requests(sample, sample)}
    assert with_ids == checked


def _template_of(path: str, ids: Owned) -> str:
    for name, value in vars(ids).items():
        path = path.replace(f"/{value}", "/{name}" if name == "template" else "/{key}" if name == "key" else "/{id}")
    return path


def _with(text: str, ids: Owned, others: Owned) -> str:
    """`text` with each of `ids` written as the same field of `others`."""
    for name, value in vars(ids).items():
        text = text.replace(value, getattr(others, name))
    return text
