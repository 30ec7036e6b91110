"""Delivery retries against a real local HTTP server: Retry-After honoured, 5xx retried, 4xx final."""

from __future__ import annotations

import asyncio

import aiohttp

from babelhub.canonical import Error, Message
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
from babelhub.services.delivery import RetryPolicy, deliver
from babelhub.services.pacing import Pacer
from tests.fakeapi import FakeApi, Reply
from tests.hubkit import VirtualClock


class _PlainJsonApi(Codec):
    """A minimal codec whose API says 2xx = ok, 429/5xx = retry, anything else = refused."""

    channel = "plain"
    capabilities = Capabilities()

    def decode(self, request: HttpRequest, ctx: DecodeContext) -> list:  # type: ignore[type-arg]
        return []

    def encode(self, message: Message, ctx: EncodeContext) -> list[OutboundRequest]:
        return []

    def parse_response(self, request: OutboundRequest, response: HttpResponse) -> SendResult:
        if response.status < 300:
            return SendResult(ok=True, native_ids=["n1"])
        retry_after = response.headers.get("retry-after")
        return SendResult(
            ok=False,
            retryable=response.status == 429 or response.status >= 500,
            retry_after=float(retry_after) if retry_after else None,
            error=Error(code=str(response.status)),
        )


FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.02)


async def test_retries_429_honouring_retry_after_then_succeeds(fake_api: FakeApi) -> None:
    fake_api.queue(Reply(status=429, headers={"Retry-After": "0"}), Reply(status=503))
    waits: list[float] = []

    async def on_retry(result: SendResult, wait: float) -> None:
        waits.append(wait)

    async with aiohttp.ClientSession() as session:
        request = OutboundRequest(method="POST", url=f"{fake_api.base_url}/send", body=b"{}")
        result = await deliver(session, _PlainJsonApi(), request, FAST, on_retry=on_retry)
    assert result.ok and result.native_ids == ["n1"]
    assert len(fake_api.requests) == 3
    assert waits[0] == 0.0  # the Retry-After, not the backoff


async def test_a_4xx_is_final_and_a_long_retry_after_is_not_waited_for(fake_api: FakeApi) -> None:
    fake_api.queue(Reply(status=400), Reply(status=429, headers={"Retry-After": "3600"}))
    async with aiohttp.ClientSession() as session:
        request = OutboundRequest(method="POST", url=f"{fake_api.base_url}/send")
        refused = await deliver(session, _PlainJsonApi(), request, FAST)
        throttled = await deliver(session, _PlainJsonApi(), request, FAST)
    assert not refused.ok and not refused.retryable and refused.error == Error(code="400")
    assert not throttled.ok and throttled.retry_after == 3600
    assert len(fake_api.requests) == 2


async def test_gives_up_after_the_attempts_and_reports_network_errors() -> None:
    async with aiohttp.ClientSession() as session:
        request = OutboundRequest(method="POST", url="http://127.0.0.1:9/unreachable")
        result = await deliver(session, _PlainJsonApi(), request, FAST)
    assert not result.ok and result.retryable and result.error is not None and result.error.code == "network"


async def test_a_retry_after_holds_back_the_other_calls_of_the_connection(fake_api: FakeApi) -> None:
    fake_api.queue(Reply(status=429, headers={"Retry-After": "1"}))
    clock = VirtualClock()
    pacer = Pacer(0, clock=clock, sleep=clock.sleep)  # unpaced: only the Retry-After can hold a call
    throttled = asyncio.Event()

    async def on_retry(result: SendResult, wait: float) -> None:
        throttled.set()

    paced: list[float] = []
    async with aiohttp.ClientSession() as session:
        first = OutboundRequest(method="POST", url=f"{fake_api.base_url}/first")
        second = OutboundRequest(method="POST", url=f"{fake_api.base_url}/second")
        refused_once = asyncio.create_task(
            deliver(session, _PlainJsonApi(), first, FAST, on_retry=on_retry, pacer=pacer), name="first-send")
        await throttled.wait()
        other = await deliver(session, _PlainJsonApi(), second, FAST, pacer=pacer, on_paced=paced.append)
        assert other.ok and (await refused_once).ok
    assert [request.path for request in fake_api.requests].count("/first") == 2
    assert paced == [1.0]  # the other call waited out the whole Retry-After
