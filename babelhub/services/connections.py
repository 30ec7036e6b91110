"""A configured connection: one channel account, its codec, and how calls to its API are made.

The hub never names a channel: everything channel-specific is behind `Codec`. This module only knows
that a codec's `OutboundRequest` is either an HTTP call (sent through the connection's pacer and
circuit) or, for the built-in WebSocket sessions, a `session:<id>` address: a visitor reads what is
sent to it from its conversation's stream, where the message is stored already, so no call is made.

A message's calls are made in order; after each one that succeeds, the caller hears of its `Progress`
and records it (the send ledger), so a message redelivered after a crash skips the calls already made.
Before a call that could not safely be made twice, the ledger records it as in flight: if the call's
outcome is never known (a timeout, a dropped connection, a 500, or a crash mid-call, found in flight on
the next try) it is reconciled instead of sent again: the channel is asked when it offers a lookup
(`Codec.lookup_request`), else the message fails with the error code `ambiguous`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial

import aiohttp
import msgspec

from babelhub.canonical import Activity, Envelope, Error, Message
from babelhub.codecs import native
from babelhub.codecs.base import (
    Codec,
    DecodeContext,
    EncodeContext,
    HttpRequest,
    Lookup,
    OutboundRequest,
    SendResult,
)
from babelhub.codecs.degrade import CHOICES_KEY, degrade
from babelhub.errors import EncodeError
from babelhub.services import config as cfg
from babelhub.services.circuit import Circuit
from babelhub.services.delivery import OnAttempt, RetryPolicy, deliver_through, perform
from babelhub.services.injected import read_injected
from babelhub.services.pacing import Pacer
from babelhub.services.telemetry import Metrics, carrier

__all__ = ["AMBIGUOUS", "DEFAULT_SEND_DEADLINE", "DISABLED", "ConnectionService", "Progress", "Sent"]

log = logging.getLogger("babelhub.connections")

SESSION_SCHEME = "session:"
LOOKUP_ATTEMPTS = 3
DISABLED = "disabled"
"""The error code of a message to a connection that is disabled (`/v1/connections`)."""
AMBIGUOUS = "ambiguous"
"""The error code of a message whose channel call may or may not have taken effect, and that the hub
could not reconcile: it is not sent again, so the user never sees it twice."""
DEFAULT_SEND_DEADLINE = 86_400.0


class Sent(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of sending one canonical message to one target."""

    ok: bool
    native_ids: list[str] = []
    error: Error | None = None
    choices: dict[str, object] = {}
    """The numbered-choice map degradation made, so a reply "2" maps back to its button."""


class Progress(msgspec.Struct, frozen=True, kw_only=True):
    """How far one message's channel calls got: an entry of the send ledger."""

    calls: int = 0
    """Calls that succeeded, in order."""
    native_ids: list[str] = []
    done: bool = False
    """Every call succeeded: the channel has the whole message."""
    in_flight: bool = False
    """Call number `calls` (counting from 0) was started and its outcome is not known yet."""


OnProgress = Callable[[Progress], Awaitable[None]]


class ConnectionService:
    def __init__(
        self,
        settings: cfg.Connection,
        codec: Codec,
        http: aiohttp.ClientSession,
        metrics: Metrics,
        policy: RetryPolicy,
        *,
        send_deadline: float = DEFAULT_SEND_DEADLINE,
        circuit: Circuit | None = None,
        disabled: bool = False,
    ) -> None:
        """`send_deadline`: seconds from when the hub stored a message until it is given up as
        `failed` while the channel keeps failing. `policy` gives the calls' timeout and the circuit's
        pauses between probes. A `disabled` connection (made over the API, then disabled) makes no call:
        its messages fail with the error code `disabled`."""
        self.settings = settings
        self.disabled = disabled
        self.codec = codec
        self._http = http
        self._metrics = metrics
        self._policy = policy
        self.pacer = Pacer(codec.send_rate if settings.max_rate is None else settings.max_rate)
        self.circuit = circuit or Circuit(base_delay=policy.base_delay, max_delay=policy.max_delay)
        self.send_deadline = send_deadline
        metrics.circuit_open.labels(self.id).set_function(lambda: self.circuit.state != "closed")
        # This connection's series, looked up once (a lookup costs more than the increment).
        self._messages_out = metrics.messages_out.labels(self.channel)
        self._send_failures = metrics.send_failures.labels(self.channel)
        self._retries = metrics.retries.labels(self.channel)
        self._paced = metrics.paced.labels(self.id)

    @property
    def id(self) -> str:
        return self.settings.id

    @property
    def tenant(self) -> str:
        return self.settings.tenant

    @property
    def channel(self) -> str:
        return self.settings.channel

    def dedup_key(self, request: HttpRequest) -> str:
        """The codec's dedup key of `request`, read with the collector held off (`native.without_collector`)."""
        return native.without_collector(partial(self.codec.dedup_key, request))

    def decode(self, request: HttpRequest, seq: int) -> list[Envelope]:
        """The codec's envelopes of `request`, read with the collector held off (`native.without_collector`);
        an injected canonical envelope's record (`HttpRequest.canonical`) is read as one instead."""
        if request.canonical:
            return [read_injected(request.body, self.tenant, self.id, self.channel, seq)]
        ctx = DecodeContext(tenant=self.tenant, connection=self.id, seq=seq, options=self.settings.options)
        return native.without_collector(partial(self.codec.decode, request, ctx))

    def encode_context(self, to: str, native_ids: Mapping[str, str] | None = None, api_base: str = "") -> EncodeContext:
        return EncodeContext(
            tenant=self.tenant,
            connection=self.id,
            to=to,
            api_base=api_base or self.settings.api_base,
            secrets=self.settings.secrets,
            options=self.settings.options,
            native_ids=dict(native_ids or {}),
        )

    async def send(self, message: Message, ctx: EncodeContext, *, stored_at: float | None = None,
                   progress: Progress | None = None, on_progress: OnProgress | None = None) -> Sent:
        """Degrade `message` to what the channel shows, encode it and make the calls in order, waiting
        out channel failures until `send_deadline` after `stored_at` (Unix time; default now). The calls
        `progress` counts as made are not made again; `on_progress` hears of each one that succeeds."""
        if self.disabled:
            self._send_failures.inc()
            return Sent(ok=False, error=self._disabled_error())
        shown = degrade(message, self.codec.capabilities)
        choices = dict(shown.meta.get(CHOICES_KEY, {}))
        progress = progress or Progress()
        if progress.done:
            return Sent(ok=True, native_ids=progress.native_ids, choices=choices)
        try:
            requests = self.codec.encode(shown, ctx)
        except EncodeError as exc:
            self._send_failures.inc()
            return Sent(ok=False, error=Error(code="encode", message=str(exc)))
        return await self._perform_all(requests, choices, self._deadline(stored_at), progress, on_progress)

    async def send_activity(self, activity: Activity, ctx: EncodeContext) -> Sent:
        """Best effort: typing and read markers are not worth waiting for a failing channel."""
        if self.disabled:
            return Sent(ok=False, error=self._disabled_error())
        return await self._perform_all(self.codec.encode_activity(activity, ctx), {}, None, Progress(), None)

    def _disabled_error(self) -> Error:
        return Error(code=DISABLED, message=f"connection {self.id!r} is disabled: nothing is sent through it "
                                            "until it is enabled again (PUT /v1/connections/{id})")

    def _deadline(self, stored_at: float | None) -> float:
        """The send deadline on the circuit's clock (`stored_at` is wall-clock time, and survives restarts)."""
        left = self.send_deadline if stored_at is None else stored_at + self.send_deadline - time.time()
        return self.circuit.clock() + left

    async def after_inbound(self, envelope: Envelope, ctx: EncodeContext) -> None:
        """The calls a channel expects once we accepted an inbound envelope (best effort)."""
        if self.disabled:
            return
        for request in self.codec.on_inbound(envelope, ctx):
            result = await self.call(request)
            if not result.ok:
                log.warning("%s: follow-up call %s failed: %s", self.id, request.url, result.error)

    async def _perform_all(self, requests: list[OutboundRequest], choices: dict[str, object], deadline: float | None,
                           progress: Progress, on_progress: OnProgress | None) -> Sent:
        native_ids = list(progress.native_ids)
        for index, request in enumerate(requests):
            if index < progress.calls:
                continue  # made before a restart: the channel has it
            at = Progress(calls=index, native_ids=list(native_ids))
            interrupted = progress.in_flight and index == progress.calls
            result = await self._make(request, deadline, at, on_progress, interrupted=interrupted)
            if not result.ok:
                self._send_failures.inc()
                return Sent(ok=False, native_ids=native_ids, error=result.error, choices=choices)
            self._messages_out.inc()
            native_ids.extend(result.native_ids)
            if on_progress is not None:
                await on_progress(Progress(calls=index + 1, native_ids=list(native_ids),
                                           done=index + 1 == len(requests)))
        return Sent(ok=True, native_ids=native_ids, choices=choices)

    async def _make(self, request: OutboundRequest, deadline: float | None, at: Progress,
                    on_progress: OnProgress | None, *, interrupted: bool) -> SendResult:
        """One call of a message. One that could duplicate what the user sees if made twice is recorded
        in flight before it goes, and is not made again while its earlier try's outcome is unknown
        (`interrupted`: a crash found it in flight; or its answer was ambiguous): it is reconciled."""
        safe = self.codec.safe_to_resend(request) or request.url.startswith(SESSION_SCHEME)
        if interrupted and not safe:
            known = await self._reconcile(request)
            if known is not None:
                return known
        record = None if safe or on_progress is None else _in_flight_recorder(at, on_progress)
        while True:
            result = await self.call(request, deadline, resend_safe=safe, on_attempt=record)
            if result.ok or not result.ambiguous or safe:
                return result
            known = await self._reconcile(request, result)
            if known is not None:
                return known
            # The channel says it never got it: the call is made again.

    async def _reconcile(self, request: OutboundRequest, unknown: SendResult | None = None) -> SendResult | None:
        """The outcome of a call whose answer was lost: success when the channel's lookup finds it,
        None when the lookup says it never arrived (it may be made again), else `failed` with `ambiguous`."""
        lookup = self.codec.lookup_request(request)
        if lookup is not None:
            answer = await self._look_up(lookup, request)
            if answer.found is True:
                log.info("%s: a call whose answer was lost had been made (found by lookup)", self.id)
                return SendResult(ok=True, native_ids=answer.native_ids)
            if answer.found is False:
                return None
        how = "the channel's lookup could not tell" if lookup is not None else "the channel offers no lookup"
        message = f"the call may or may not have reached the channel; {how}, so it is not sent again rather than " \
                  "risk a duplicate"
        last = unknown.error if unknown is not None else None
        if last is None:
            return SendResult(ok=False, error=Error(code=AMBIGUOUS, message=message))
        detail = f"{last.code} {last.message}".strip()
        error = Error(code=AMBIGUOUS, message=f"{message}; last: {detail}", native=last.native)
        return SendResult(ok=False, error=error)

    async def _look_up(self, lookup: OutboundRequest, request: OutboundRequest) -> Lookup:
        """Ask the channel whether `request` took effect: a read, so it is simply tried again (a few
        times, with backoff) while the channel cannot tell."""
        traced = msgspec.structs.replace(lookup, headers={**lookup.headers, **carrier()})
        answer = Lookup(found=None)
        for tried in range(LOOKUP_ATTEMPTS):
            if tried:
                await asyncio.sleep(self._policy.delay(SendResult(ok=False), tried))
            await self.pacer.wait()
            try:
                response = await perform(self._http, traced, self._policy.timeout)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("%s: a lookup failed: %r", self.id, exc)
                continue
            answer = self.codec.parse_lookup(lookup, request, response)
            if answer.found is not None:
                return answer
        return answer

    async def call(self, request: OutboundRequest, deadline: float | None = None, *,
                   resend_safe: bool = True, on_attempt: OnAttempt | None = None) -> SendResult:
        """One API call, retried through the circuit until `deadline` (on the circuit's clock); without
        a deadline, best effort: one try, none while the circuit is open. Without `resend_safe` an
        ambiguous failure is returned at once, not retried; `on_attempt` hears when a try leaves and
        when one certainly did not take effect."""
        if request.url.startswith(SESSION_SCHEME):
            # Stored in the conversation's stream before it reached this actor: the visitor's socket
            # delivers it from there, now or when the visitor comes back with its cursor.
            return SendResult(ok=True, native_ids=[request.message_id])
        traced = msgspec.structs.replace(request, headers={**request.headers, **carrier()})
        return await deliver_through(self._http, self.codec, traced, circuit=self.circuit, pacer=self.pacer,
                                     deadline=deadline, timeout=self._policy.timeout, on_retry=self._count_retry,
                                     on_paced=self._count_paced, resend_safe=resend_safe, on_attempt=on_attempt)

    async def _count_retry(self, result: SendResult, wait: float) -> None:
        self._retries.inc()
        log.info("%s: retrying in %.2fs after %s", self.id, wait, result.error)

    def _count_paced(self, seconds: float) -> None:
        self._paced.inc(seconds)


def _in_flight_recorder(at: Progress, on_progress: OnProgress) -> OnAttempt:
    """Writes call `at.calls` into the ledger as in flight when a try of it leaves, and as not in flight
    when a try certainly did not take effect."""

    async def record(going: bool) -> None:
        await on_progress(msgspec.structs.replace(at, in_flight=going))

    return record
