"""A configured connection: one channel account, its codec, and how calls to its API are made.

The hub never names a channel: everything channel-specific is behind `Codec`. This module only knows
that a codec's `OutboundRequest` is either an HTTP call (sent through the connection's pacer and
circuit) or, for the built-in WebSocket sessions, a `session:<id>` address: a visitor reads what is
sent to it from its conversation's stream, where the message is stored already, so no call is made.

A message's calls are made in order; after each one that succeeds, the caller hears of its `Progress`
and records it (the send ledger), so a message redelivered after a crash skips the calls already made.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial

import aiohttp
import msgspec

from babelhub.canonical import Activity, Envelope, Error, Message
from babelhub.codecs import native
from babelhub.codecs.base import Codec, DecodeContext, EncodeContext, HttpRequest, OutboundRequest, SendResult
from babelhub.codecs.degrade import CHOICES_KEY, degrade
from babelhub.errors import EncodeError
from babelhub.services import config as cfg
from babelhub.services.circuit import Circuit
from babelhub.services.delivery import RetryPolicy, deliver_through
from babelhub.services.injected import read_injected
from babelhub.services.pacing import Pacer
from babelhub.services.telemetry import Metrics, carrier

__all__ = ["DEFAULT_SEND_DEADLINE", "ConnectionService", "Progress", "Sent"]

log = logging.getLogger("babelhub.connections")

SESSION_SCHEME = "session:"
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
    ) -> None:
        """`send_deadline`: seconds from when the hub stored a message until it is given up as
        `failed` while the channel keeps failing. `policy` gives the calls' timeout and the circuit's
        pauses between probes."""
        self.settings = settings
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
        return await self._perform_all(self.codec.encode_activity(activity, ctx), {}, None, Progress(), None)

    def _deadline(self, stored_at: float | None) -> float:
        """The send deadline on the circuit's clock (`stored_at` is wall-clock time, and survives restarts)."""
        left = self.send_deadline if stored_at is None else stored_at + self.send_deadline - time.time()
        return self.circuit.clock() + left

    async def after_inbound(self, envelope: Envelope, ctx: EncodeContext) -> None:
        """The calls a channel expects once we accepted an inbound envelope (best effort)."""
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
            result = await self.call(request, deadline)
            if not result.ok:
                self._send_failures.inc()
                return Sent(ok=False, native_ids=native_ids, error=result.error, choices=choices)
            self._messages_out.inc()
            native_ids.extend(result.native_ids)
            if on_progress is not None:
                await on_progress(Progress(calls=index + 1, native_ids=list(native_ids),
                                           done=index + 1 == len(requests)))
        return Sent(ok=True, native_ids=native_ids, choices=choices)

    async def call(self, request: OutboundRequest, deadline: float | None = None) -> SendResult:
        """One API call, retried through the circuit until `deadline` (on the circuit's clock); without
        a deadline, best effort: one try, none while the circuit is open."""
        if request.url.startswith(SESSION_SCHEME):
            # Stored in the conversation's stream before it reached this actor: the visitor's socket
            # delivers it from there, now or when the visitor comes back with its cursor.
            return SendResult(ok=True, native_ids=[request.message_id])
        traced = msgspec.structs.replace(request, headers={**request.headers, **carrier()})
        return await deliver_through(self._http, self.codec, traced, circuit=self.circuit, pacer=self.pacer,
                                     deadline=deadline, timeout=self._policy.timeout, on_retry=self._count_retry,
                                     on_paced=self._count_paced)

    async def _count_retry(self, result: SendResult, wait: float) -> None:
        self._retries.inc()
        log.info("%s: retrying in %.2fs after %s", self.id, wait, result.error)

    def _count_paced(self, seconds: float) -> None:
        self._paced.inc(seconds)
