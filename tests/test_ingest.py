"""The webhook endpoint holds when a codec misbehaves on odd input: a crash in the signature check is a
401, a crash while reading the channel's ids is a 400 and the body is kept — never a 500, never lost."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping

import aiohttp
import pytest
from aiohttp import web

from babelhub import canonical as c
from babelhub.codecs.base import (
    Capabilities,
    Codec,
    DecodeContext,
    EncodeContext,
    HttpRequest,
    HttpResponse,
    OutboundRequest,
    SendResult,
)
from babelhub.services import config as cfg
from babelhub.services.broker import Subjects, provision
from babelhub.services.connections import ConnectionService
from babelhub.services.delivery import RetryPolicy
from babelhub.services.telemetry import Metrics
from tests.hubkit import dead_letters, stream_messages, unique_prefix, webhook_app


class Careless(Codec):
    """A channel codec with the bugs the endpoint must survive: it trips over a header it did not expect
    and over a body without its id."""

    channel = "careless"
    capabilities = Capabilities()

    def verify(self, request: HttpRequest, secrets: Mapping[str, str]) -> None:
        request.headers["x-signature"].encode("ascii")  # KeyError / UnicodeEncodeError on odd input

    def dedup_key(self, request: HttpRequest) -> str:
        return str(json.loads(request.body)["id"])  # KeyError / TypeError on odd input

    def decode(self, request: HttpRequest, ctx: DecodeContext) -> list[c.Envelope]:
        return []

    def encode(self, message: c.Message, ctx: EncodeContext) -> list[OutboundRequest]:
        return []

    def parse_response(self, request: OutboundRequest, response: HttpResponse) -> SendResult:
        return SendResult(ok=True)


@pytest.fixture
async def endpoint(nats_client) -> AsyncIterator[tuple[str, Subjects]]:  # type: ignore[no-untyped-def]
    subjects, metrics = Subjects(unique_prefix()), Metrics()
    js = nats_client.jetstream()
    await provision(js, subjects, 60.0)
    settings = cfg.Connection(id="c1", tenant="acme", channel="careless")
    async with aiohttp.ClientSession() as http:
        connection = ConnectionService(settings, Careless(), http, metrics, RetryPolicy())
        runner = await webhook_app(nats_client, subjects, metrics, http, {"c1": connection})
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        yield f"http://127.0.0.1:{port}/webhooks/careless/c1", subjects
        await runner.cleanup()


async def test_a_codec_crash_is_never_a_500(endpoint: tuple[str, Subjects], nats_client) -> None:  # type: ignore[no-untyped-def]
    url, subjects = endpoint
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=b'{"id": 1}') as response:  # no signature header at all
            assert response.status == 401 and "could not be read" in (await response.json())["error"]
        async with session.post(url, data=b'{"no_id": 1}', headers={"x-signature": "ok"}) as response:
            assert response.status == 400
            body = await response.json()
            assert "ids could not be read" in body["error"] and body["path"] == "$"
        async with session.post(url, data=b'{"id": 7}', headers={"x-signature": "ok"}) as response:
            assert response.status == 200
    letters = await stream_messages(nats_client, f"{subjects.prefix}.acme.dlq.>", subjects.stream_name("dead_letters"))
    (letter,) = dead_letters(letters)
    assert letter["stage"] == "ingest" and letter["connection"] == "c1"
    raw = await stream_messages(nats_client, f"{subjects.prefix}.acme.raw.>", subjects.stream_name("raw"))
    assert len(raw) == 1
