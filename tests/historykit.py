"""What the history, contacts and retention tests share: a hub with two tenants on Telegram webhooks
(a local fake of the Bot API answering sends), and calls of the REST API."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import aiohttp

from babelhub import canonical as c
from babelhub.api.history import HistoryApi
from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from tests.hubkit import BOT_TOKEN, SECRET, unique_prefix

ACME, OTHER = "acme", "other"
KEYS = {ACME: "acme-key", OTHER: "other-key"}
CONNECTIONS = {ACME: "tg", OTHER: "tg-other"}
_updates = itertools.count(1)


def two_tenants(nats_url: str, api_base: str, **tenant_settings: Any) -> cfg.Config:
    return cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_url, subject_prefix=unique_prefix()),
        tenants=[cfg.Tenant(id=tenant, api_keys=[key], **tenant_settings.get(tenant, {}))
                 for tenant, key in KEYS.items()],
        connections=[cfg.Connection(id=connection, tenant=tenant, channel="telegram", api_base=api_base,
                                    secrets={"bot_token": BOT_TOKEN, "secret_token": SECRET})
                     for tenant, connection in CONNECTIONS.items()])


def private_update(chat_id: int, text: str, name: str = "Ada") -> dict[str, Any]:
    """A private-chat text message, shaped as the Bot API documents `Update`."""
    update_id = next(_updates)
    person = {"id": chat_id, "is_bot": False, "first_name": name}
    return {"update_id": update_id, "message": {
        "message_id": update_id, "from": person, "chat": {**{k: v for k, v in person.items() if k != "is_bot"},
                                                            "type": "private"},
        "date": 1_767_225_600 + update_id, "text": text}}


def group_update(chat_id: int, user_id: int, name: str, text: str) -> dict[str, Any]:
    """A message in a group chat (the Bot API's `Chat` of type "group", negative id)."""
    update_id = next(_updates)
    return {"update_id": update_id, "message": {
        "message_id": update_id, "from": {"id": user_id, "is_bot": False, "first_name": name},
        "chat": {"id": chat_id, "title": "Team", "type": "group"},
        "date": 1_767_225_600 + update_id, "text": text}}


async def webhook(http: aiohttp.ClientSession, hub: Hub, update: dict[str, Any], tenant: str = ACME) -> None:
    async with http.post(f"{hub.http_url}/webhooks/telegram/{CONNECTIONS[tenant]}", json=update,
                         headers={"X-Telegram-Bot-Api-Secret-Token": SECRET}) as response:
        assert response.status == 200, await response.text()


async def api(http: aiohttp.ClientSession, hub: Hub, method: str, path: str, *, tenant: str = ACME,
              body: Any = None) -> tuple[int, Any]:
    async with http.request(method, f"{hub.http_url}{path}", json=body,
                            headers={"Authorization": f"Bearer {KEYS[tenant]}"}) as response:
        text = await response.text()
        return response.status, json.loads(text) if text else None


async def get(http: aiohttp.ClientSession, hub: Hub, path: str, tenant: str = ACME) -> Any:
    status, answer = await api(http, hub, "GET", path, tenant=tenant)
    assert status == 200, answer
    return answer


async def until(check: Any, timeout: float = 15.0) -> Any:
    """Poll the async `check()` until it returns something true (the keeper works asynchronously)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = await check()
        if found:
            return found
        if loop.time() > deadline:
            raise AssertionError(f"not true within {timeout}s: {check}")
        await asyncio.sleep(0.05)


async def conversation_with(http: aiohttp.ClientSession, hub: Hub, chat_id: int, count: int,
                            tenant: str = ACME) -> dict[str, Any]:
    """The conversation of a Telegram chat once the history holds `count` messages of it."""
    conversation = c.conversation_id(tenant, CONNECTIONS[tenant], str(chat_id))

    async def counted() -> dict[str, Any] | None:
        status, found = await api(http, hub, "GET", f"/v1/conversations/{conversation}", tenant=tenant)
        return found if status == 200 and found["message_count"] >= count else None

    found: dict[str, Any] = await until(counted)
    return found


def history_api(hub: Hub) -> HistoryApi:
    [found] = [api for api in hub._started().apis if isinstance(api, HistoryApi)]
    return found


def refused(status: int, answer: dict[str, Any]) -> tuple[int, str, str]:
    assert set(answer) == {"error"} and set(answer["error"]) == {"code", "message", "path"}, answer
    return status, answer["error"]["code"], answer["error"]["path"]
