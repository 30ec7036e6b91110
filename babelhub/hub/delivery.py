"""Sending a codec's `OutboundRequest` over HTTP, with retries that honour Retry-After.

The codec decides what an answer means (`parse_response`); this module only decides when to try
again: a retryable failure waits for the channel's Retry-After when it gave one, otherwise for an
exponential backoff with full jitter, and gives up after `RetryPolicy.attempts`. With a connection's
`Pacer`, every attempt waits for its slot, and a Retry-After holds back the whole connection.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import aiohttp
import msgspec

from babelhub.canonical import Error
from babelhub.codecs.base import Codec, HttpResponse, OutboundRequest, SendResult
from babelhub.hub.pacing import Pacer

__all__ = ["RetryPolicy", "deliver", "perform"]


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 300.0
    """A Retry-After longer than this is not waited for: the send fails and is reported instead."""
    timeout: float = 30.0

    def delay(self, result: SendResult, attempt: int) -> float:
        if result.retry_after is not None:
            return result.retry_after
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


DEFAULT_POLICY = RetryPolicy()


async def perform(session: aiohttp.ClientSession, request: OutboundRequest, seconds: float) -> HttpResponse:
    """One HTTP call, its answer read whole."""
    async with session.request(
        request.method,
        request.url,
        headers=request.headers,
        data=request.body or None,
        timeout=aiohttp.ClientTimeout(total=seconds),
    ) as response:
        body = await response.read()
        return HttpResponse(
            status=response.status,
            headers={name.lower(): value for name, value in response.headers.items()},
            body=body,
        )


async def deliver(
    session: aiohttp.ClientSession,
    codec: Codec,
    request: OutboundRequest,
    policy: RetryPolicy = DEFAULT_POLICY,
    *,
    on_retry: Callable[[SendResult, float], Awaitable[None]] | None = None,
    pacer: Pacer | None = None,
    on_paced: Callable[[float], None] | None = None,
) -> SendResult:
    """Send `request` until the channel accepts it, refuses it for good, or the attempts run out.
    `on_paced` hears how long each attempt waited for the pacer."""
    result = SendResult(ok=False, error=Error(code="not_sent"))
    for attempt in range(policy.attempts):
        if pacer is not None:
            waited = await pacer.wait()
            if waited and on_paced is not None:
                on_paced(waited)
        try:
            response = await perform(session, request, policy.timeout)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # No answer: the channel may or may not have acted. The idempotency key makes a retry safe
            # where the channel honours one.
            result = SendResult(ok=False, retryable=True, error=Error(code="network", message=repr(exc)))
        else:
            result = codec.parse_response(request, response)
        if pacer is not None and not result.ok and result.retry_after is not None:
            pacer.pause(min(result.retry_after, policy.max_retry_after))  # even when this call gives up
        if result.ok or not result.retryable or attempt == policy.attempts - 1:
            return result
        wait = policy.delay(result, attempt)
        if wait > policy.max_retry_after:
            return result
        if on_retry is not None:
            await on_retry(result, wait)
        await asyncio.sleep(wait)
    return result
