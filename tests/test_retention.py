"""Retention per tenant: what was stored before `now - retention_days` leaves the raw, messages,
statuses and history streams, and the conversations with nothing left leave the index; a tenant with a
longer retention keeps its own. A real hub on a real nats-server; the purge is run with a moved clock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from babelhub.hub.app import Hub
from babelhub.services.broker import EmbeddedServer
from babelhub.services.tenants import NewTenant
from tests.fakeapi import FakeApi
from tests.historykit import (
    ACME,
    OTHER,
    api,
    conversation_with,
    get,
    history_api,
    private_update,
    two_tenants,
    webhook,
)
from tests.hubkit import StartHub, stream_messages, telegram_responder


@pytest.fixture
async def hub(nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub) -> Hub:
    fake_api.responder = telegram_responder
    return await start_hub(two_tenants(nats_server.url, fake_api.base_url, other={"retention_days": 30}))


async def stored(hub: Hub, tenant: str) -> bytes:
    found: list[bytes] = []
    for role in ("raw", "messages", "statuses", "history"):
        found += await stream_messages(hub.nc, f"{hub.subjects.prefix}.{tenant}.>", hub.subjects.stream_name(role))
    return b"\n".join(found)


async def test_retention_purges_what_is_older_than_each_tenants_days(hub: Hub, http: aiohttp.ClientSession) -> None:
    await webhook(http, hub, private_update(1001, "an old-question"))
    await webhook(http, hub, private_update(1002, "old-other-tenant"), tenant=OTHER)
    old = (await conversation_with(http, hub, 1001, 1))["id"]
    await conversation_with(http, hub, 1002, 1, tenant=OTHER)
    status, _ = await api(http, hub, "POST", "/v1/messages", body={
        "conversation": {"id": old}, "parts": [{"type": "text", "text": "an old-answer"}]})
    assert status == 202
    await conversation_with(http, hub, 1001, 2)
    await asyncio.sleep(0.05)  # the raw records' status callbacks and statuses settle before the line is drawn
    line = datetime.now(UTC)
    await asyncio.sleep(0.05)
    await webhook(http, hub, private_update(1003, "a new-question"))
    await conversation_with(http, hub, 1003, 1)
    assert b"old-question" in await stored(hub, ACME)

    retention = history_api(hub).retention
    assert retention is not None
    # Eight days after the line, acme (7 days, the default) loses what came before it; other (30 days) nothing.
    removed = await retention.purge([ACME, OTHER], line + timedelta(days=7))
    acme = await stored(hub, ACME)
    assert b"old-question" not in acme and b"old-answer" not in acme
    assert b"new-question" in acme
    assert removed[hub.subjects.stream_name("raw")] >= 1 and removed[hub.subjects.stream_name("history")] == 2
    assert b"old-other-tenant" in await stored(hub, OTHER)
    listed = await get(http, hub, "/v1/conversations")
    assert [item["native_id"] for item in listed["data"]] == ["1003"]
    assert (await api(http, hub, "GET", f"/v1/conversations/{old}"))[0] == 404

    # A purge again changes nothing; thirty-one days on, the other tenant's go too.
    await retention.purge([ACME], line + timedelta(days=7))
    assert b"new-question" in await stored(hub, ACME)
    await retention.purge([OTHER], datetime.now(UTC) + timedelta(days=31))
    assert await stored(hub, OTHER) == b""
    assert (await get(http, hub, "/v1/conversations", tenant=OTHER))["data"] == []


async def test_the_hub_runs_retention_as_a_supervised_task(hub: Hub, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{hub.http_url}/readyz") as response:
        text = await response.text()
    assert "retention" in text


async def test_a_tenant_made_at_run_time_is_kept_as_long_as_it_says(hub: Hub) -> None:
    retention = history_api(hub).retention
    assert retention is not None
    await hub.services.tenants.create(NewTenant(id="initech", retention_days=3))
    await hub.services.tenants.create(NewTenant(id="hooli"))
    assert retention.days_of("initech") == 3
    assert retention.days_of("hooli") == hub.config.hub.retention_days == 7
    assert retention.days_of(OTHER) == 30
