"""Sending a codec's `OutboundRequest` over HTTP, and deciding when to try again.

The codec decides what an answer means (`parse_response`); this module only decides when to try
again. Two ways:

* `deliver_through` is the hub's: a retryable failure (5xx, 429, a network error, a timeout) does not
  use up the message's attempts; it opens the connection's `Circuit`, and the call waits for it, one
  probe at a time testing the channel, until the channel answers or the message's deadline passes.
* `deliver` makes at most `RetryPolicy.attempts` tries, waiting for the channel's Retry-After when it
  gave one, otherwise for an exponential backoff with full jitter (for a codec's tests and tools).

With a connection's `Pacer`, every attempt waits for its slot, and a Retry-After holds back the whole
connection.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import aiohttp
import msgspec

from babelhub.canonical import Error
from babelhub.codecs.base import Codec, HttpResponse, OutboundRequest, SendResult
from babelhub.services.circuit import Circuit
from babelhub.services.pacing import Pacer

__all__ = ["RetryPolicy", "attempt", "deliver", "deliver_through", "perform"]

OnRetry = Callable[[SendResult, float], Awaitable[None]]
OnAttempt = Callable[[bool], Awaitable[None]]


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


AMBIGUOUS_STATUSES = frozenset({500, 504})
"""HTTP answers after which the channel may have acted: an internal error part-way through, or a gateway
that gave up waiting for it. A 502, 503 or 429 comes from a front that did not take the call, and the
call is tried again as before."""


async def attempt(session: aiohttp.ClientSession, codec: Codec, request: OutboundRequest,
                  timeout: float) -> SendResult:
    """One call and what its answer means. Any failure without a definite answer is retryable; it is
    also `ambiguous` when the request may have reached the channel: a timeout, a connection lost after
    it was made, a 500 or 504. Only a connection that could not be made is certain not to have acted."""
    try:
        response = await perform(session, request, timeout)
    except TimeoutError:
        return _unanswered("timeout", f"no answer within {timeout:g}s", ambiguous=True)
    except aiohttp.ClientConnectorError as exc:
        return _unanswered("network", repr(exc), ambiguous=False)
    except aiohttp.ClientError as exc:
        return _unanswered("network", repr(exc), ambiguous=True)
    result = codec.parse_response(request, response)
    if not result.ok and response.status in AMBIGUOUS_STATUSES:
        return msgspec.structs.replace(result, ambiguous=True)  # whether to retry stays the codec's call
    return result


def _unanswered(code: str, message: str, *, ambiguous: bool) -> SendResult:
    return SendResult(ok=False, retryable=True, ambiguous=ambiguous,
                      error=Error(code=code, message=message, retryable=True))


async def deliver(
    session: aiohttp.ClientSession,
    codec: Codec,
    request: OutboundRequest,
    policy: RetryPolicy = DEFAULT_POLICY,
    *,
    on_retry: OnRetry | None = None,
    pacer: Pacer | None = None,
    on_paced: Callable[[float], None] | None = None,
) -> SendResult:
    """Send `request` until the channel accepts it, refuses it for good, or the attempts run out.
    `on_paced` hears how long each attempt waited for the pacer."""
    result = SendResult(ok=False, error=Error(code="not_sent"))
    for tried in range(policy.attempts):
        if pacer is not None:
            waited = await pacer.wait()
            if waited and on_paced is not None:
                on_paced(waited)
        result = await attempt(session, codec, request, policy.timeout)
        if pacer is not None and not result.ok and result.retry_after is not None:
            pacer.pause(min(result.retry_after, policy.max_retry_after))  # even when this call gives up
        if result.ok or not result.retryable or tried == policy.attempts - 1:
            return result
        wait = policy.delay(result, tried)
        if wait > policy.max_retry_after:
            return result
        if on_retry is not None:
            await on_retry(result, wait)
        await asyncio.sleep(wait)
    return result


async def deliver_through(
    session: aiohttp.ClientSession,
    codec: Codec,
    request: OutboundRequest,
    *,
    circuit: Circuit,
    pacer: Pacer,
    deadline: float | None,
    timeout: float = DEFAULT_POLICY.timeout,
    on_retry: OnRetry | None = None,
    on_paced: Callable[[float], None] | None = None,
    resend_safe: bool = True,
    on_attempt: OnAttempt | None = None,
) -> SendResult:
    """Send `request` until the channel accepts or refuses it, or `deadline` (on the circuit's clock)
    passes; retryable failures wait for the connection's circuit instead of counting down attempts.
    Without `resend_safe`, an `ambiguous` failure is returned at once for the caller to reconcile.
    `on_attempt(True)` is awaited right before each try leaves, `on_attempt(False)` after one that
    certainly did not take effect (so a crash while waiting for the circuit leaves nothing in flight).
    `deadline=None` is a best-effort call: one try, and none while the circuit is open.
    `on_paced` hears how long each attempt was held back, by the circuit or the pacer."""
    last: SendResult | None = None
    while True:
        started = circuit.clock()
        admitted = await circuit.admit(deadline)
        if admitted is None:
            return _too_late(last, deadline)
        try:
            held = circuit.clock() - started + await pacer.wait()
            if held and on_paced is not None:
                on_paced(held)
            if on_attempt is not None:
                await on_attempt(True)
            result = await attempt(session, codec, request, timeout)
        except BaseException:
            circuit.release(admitted)
            raise
        if on_attempt is not None and not result.ok and not result.ambiguous:
            await on_attempt(False)
        answered = result.ok or not result.retryable
        circuit.record(admitted, answered=answered, retry_after=result.retry_after)
        if answered or deadline is None or (result.ambiguous and not resend_safe):
            return result
        if result.retry_after is not None:
            pacer.pause(result.retry_after)  # the channel's word holds for every call of the connection
        if on_retry is not None:
            await on_retry(result, max(0.0, circuit.open_until - circuit.clock()))
        last = result


def _too_late(last: SendResult | None, deadline: float | None) -> SendResult:
    """The outcome of a call the circuit did not let through in time."""
    if deadline is None:
        return SendResult(ok=False, retryable=True, error=Error(
            code="circuit_open", message="the channel is failing; best-effort calls wait for it to recover",
            retryable=True))
    if last is None or last.error is None:
        return SendResult(ok=False, error=Error(
            code="send_deadline", message="the channel was failing until the message's send deadline"))
    error = Error(code="send_deadline", native=last.error.native,
                  message=f"the channel was failing until the message's send deadline; last: {last.error.code}"
                          + (f" {last.error.message}" if last.error.message else ""))
    return SendResult(ok=False, error=error)
