"""What every REST endpoint shares (`babelhub.services.rest`, `babelhub.plugins.RestApi`), on a real hub:
keys and scopes, the operator key's limits, rate limits answering 429 with Retry-After, and the OpenAPI
document at `/openapi.json` matching the routes the hub really serves."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest

from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from babelhub.services.apikeys import Caller
from babelhub.services.broker import EmbeddedServer
from babelhub.services.rest import Rate, RateLimits, Refused
from tests.hubkit import StartHub, unique_prefix

OPERATOR_KEY = "the-operator-key-of-this-test-42"
KEYS = {"acme": "acme-config-key", "slow": "slow-config-key"}
CHAT = {"connection": "chat", "native_id": "visitor-1"}


@pytest.fixture
async def hub(nats_server: EmbeddedServer, start_hub: StartHub) -> Hub:
    return await start_hub(cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_server.url, subject_prefix=unique_prefix(),
                            operator_key=OPERATOR_KEY),
        tenants=[cfg.Tenant(id="acme", api_keys=[KEYS["acme"]]),
                 cfg.Tenant(id="slow", api_keys=[KEYS["slow"]], requests_per_second=0.2, burst=3)],
        connections=[cfg.Connection(id="chat", tenant="acme", channel="webchat")]))


async def call(http: aiohttp.ClientSession, hub: Hub, method: str, path: str, key: str | None,
               body: Any = None) -> tuple[int, Any, dict[str, str]]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with http.request(method, hub.http_url + path, json=body, headers=headers) as response:
        return response.status, await response.json(), dict(response.headers)


async def test_no_key_or_an_unknown_one_is_401_with_the_challenge(hub: Hub, http: aiohttp.ClientSession) -> None:
    for key in (None, "", "not-a-key", "bh_0123456789abcdef_" + "A" * 43):
        status, body, headers = await call(http, hub, "GET", "/v1/messages/x", key)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer", (key, body)
        assert body["error"]["code"] == "unauthenticated"


async def test_a_key_without_the_scope_is_403(hub: Hub, http: aiohttp.ClientSession) -> None:
    _, reader = await hub.services.keys.create("acme", ["read"])
    status, body, _ = await call(http, hub, "POST", "/v1/messages", reader,
                                 {"conversation": CHAT, "parts": [{"type": "text", "text": "hi"}]})
    assert status == 403 and "'send'" in body["error"]["message"]
    status, body, _ = await call(http, hub, "POST", "/v1/sessions", reader,
                                 {"conversations": ["c1"], "rights": ["read", "send"]})
    assert status == 403 and body["error"]["path"] == "$.rights"
    status, _, _ = await call(http, hub, "POST", "/v1/sessions", reader, {"conversations": ["c1"]})
    assert status == 201


async def test_the_operator_key_reads_and_sends_for_no_tenant(hub: Hub, http: aiohttp.ClientSession) -> None:
    status, body, _ = await call(http, hub, "POST", "/v1/messages", OPERATOR_KEY,
                                 {"conversation": CHAT, "parts": [{"type": "text", "text": "hi"}]})
    assert status == 403 and "operator" in body["error"]["message"]


async def test_a_tenant_over_its_rate_is_told_when_to_come_back(hub: Hub, http: aiohttp.ClientSession) -> None:
    answers = [await call(http, hub, "GET", "/v1/messages/nope", KEYS["slow"]) for _ in range(6)]
    statuses = [status for status, _, _ in answers]
    assert statuses[:3] == [404, 404, 404] and 429 in statuses[3:], statuses
    status, body, headers = next(answer for answer in answers if answer[0] == 429)
    assert body["error"]["code"] == "rate_limited" and int(headers["Retry-After"]) >= 1
    status, _, _ = await call(http, hub, "GET", "/v1/messages/nope", KEYS["acme"])
    assert status == 404  # another tenant is not held back


async def test_a_key_over_its_own_rate_is_limited_before_its_tenant(hub: Hub, http: aiohttp.ClientSession) -> None:
    _, limited = await hub.services.keys.create("acme", ["read"], requests_per_second=0.1, burst=2)
    statuses = [(await call(http, hub, "GET", "/v1/messages/nope", limited))[0] for _ in range(4)]
    assert statuses[:2] == [404, 404] and statuses[2:] == [429, 429]
    assert (await call(http, hub, "GET", "/v1/messages/nope", KEYS["acme"]))[0] == 404


async def test_token_buckets_refill_at_the_rate() -> None:
    now = [0.0]

    async def rate(_: str) -> Rate:
        return Rate(per_second=2.0, burst=2)

    limits = RateLimits(rate, clock=lambda: now[0])
    caller = Caller(tenant="t", scopes=frozenset({"read"}), key_id="k")
    await limits.admit(caller)
    await limits.admit(caller)
    with pytest.raises(Refused) as refused:
        await limits.admit(caller)
    assert refused.value.headers == {"Retry-After": "1"}
    now[0] = 0.5  # one token back
    await limits.admit(caller)
    with pytest.raises(Refused):
        await limits.admit(caller)


async def test_openapi_describes_exactly_the_routes_served(hub: Hub, http: aiohttp.ClientSession) -> None:
    async with http.get(hub.http_url + "/openapi.json") as response:
        assert response.status == 200
        document = await response.json()
    assert document["openapi"].startswith("3.")
    served = {route.resource.canonical for route in hub.http.app.router.routes()
              if route.resource is not None and route.resource.canonical.startswith("/v1/")}
    assert set(document["paths"]) == served
    for path, operations in document["paths"].items():
        concrete = re.sub(r"{\w+}", "0123456789abcdef0123456789abcdef", path)
        status, _, headers = await call(http, hub, "PATCH" if "patch" not in operations else "TRACE", concrete,
                                        KEYS["acme"])
        assert status == 405, path
        assert set(headers["Allow"].lower().split(", ")) == set(operations), path
        for operation in operations.values():
            for name in ("requestBody", "responses"):
                for ref in _refs(operation.get(name, {})):
                    assert ref.rsplit("/", 1)[1] in document["components"]["schemas"], (path, ref)
            assert {"401", "403", "404", "429"} <= set(operation["responses"]), path
            assert ("413" in operation["responses"]) == ("requestBody" in operation), path
    assert {"501", "502"} <= set(document["paths"]["/v1/connections/{id}/chats"]["get"]["responses"])


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [node["$ref"]] if "$ref" in node else [ref for value in node.values() for ref in _refs(value)]
    return []
