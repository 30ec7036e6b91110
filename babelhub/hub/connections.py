"""A configured connection: one channel account, its codec, and how calls to its API are made.

The hub never names a channel: everything channel-specific is behind `Codec`. This module only knows
that a codec's `OutboundRequest` is either an HTTP call (sent with retries) or, for the built-in
WebSocket sessions, a `session:<id>` address delivered over core NATS to whichever hub process holds
that socket.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import aiohttp
import msgspec
import nats.errors

from babelhub.canonical import Activity, Envelope, Error, Message
from babelhub.codecs.base import Codec, DecodeContext, EncodeContext, HttpRequest, OutboundRequest, SendResult
from babelhub.codecs.degrade import CHOICES_KEY, degrade
from babelhub.errors import EncodeError, PayloadTooLarge
from babelhub.hub import config as cfg
from babelhub.hub.broker import Subjects
from babelhub.hub.delivery import RetryPolicy, deliver
from babelhub.hub.pacing import Pacer
from babelhub.hub.publisher import Publisher
from babelhub.hub.telemetry import Metrics, carrier

__all__ = ["ConnectionService", "Sent"]

log = logging.getLogger("babelhub.connections")

SESSION_SCHEME = "session:"
_SESSION_TIMEOUT = 5.0


class Sent(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of sending one canonical message to one target."""

    ok: bool
    native_ids: list[str] = []
    error: Error | None = None
    choices: dict[str, object] = {}
    """The numbered-choice map degradation made, so a reply "2" maps back to its button."""


class ConnectionService:
    def __init__(
        self,
        settings: cfg.Connection,
        codec: Codec,
        http: aiohttp.ClientSession,
        publisher: Publisher,
        subjects: Subjects,
        metrics: Metrics,
        policy: RetryPolicy,
    ) -> None:
        self.settings = settings
        self.codec = codec
        self._http = http
        self._publisher = publisher
        self._subjects = subjects
        self._metrics = metrics
        self._policy = policy
        self.pacer = Pacer(codec.send_rate if settings.max_rate is None else settings.max_rate)

    @property
    def id(self) -> str:
        return self.settings.id

    @property
    def tenant(self) -> str:
        return self.settings.tenant

    @property
    def channel(self) -> str:
        return self.settings.channel

    def decode(self, request: HttpRequest, seq: int) -> list[Envelope]:
        ctx = DecodeContext(tenant=self.tenant, connection=self.id, seq=seq, options=self.settings.options)
        return self.codec.decode(request, ctx)

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

    async def send(self, message: Message, ctx: EncodeContext) -> Sent:
        """Degrade `message` to what the channel shows, encode it and make the calls in order."""
        shown = degrade(message, self.codec.capabilities)
        choices = dict(shown.meta.get(CHOICES_KEY, {}))
        try:
            requests = self.codec.encode(shown, ctx)
        except EncodeError as exc:
            self._metrics.send_failures.labels(self.channel).inc()
            return Sent(ok=False, error=Error(code="encode", message=str(exc)))
        return await self._perform_all(requests, choices)

    async def send_activity(self, activity: Activity, ctx: EncodeContext) -> Sent:
        return await self._perform_all(self.codec.encode_activity(activity, ctx), {})

    async def after_inbound(self, envelope: Envelope, ctx: EncodeContext) -> None:
        """The calls a channel expects once we accepted an inbound envelope (best effort)."""
        for request in self.codec.on_inbound(envelope, ctx):
            result = await self.call(request)
            if not result.ok:
                log.warning("%s: follow-up call %s failed: %s", self.id, request.url, result.error)

    async def _perform_all(self, requests: list[OutboundRequest], choices: dict[str, object]) -> Sent:
        native_ids: list[str] = []
        for request in requests:
            result = await self.call(request)
            if not result.ok:
                self._metrics.send_failures.labels(self.channel).inc()
                return Sent(ok=False, native_ids=native_ids, error=result.error, choices=choices)
            self._metrics.messages_out.labels(self.channel).inc()
            native_ids.extend(result.native_ids)
        return Sent(ok=True, native_ids=native_ids, choices=choices)

    async def call(self, request: OutboundRequest) -> SendResult:
        if request.url.startswith(SESSION_SCHEME):
            return await self._to_session(request)
        traced = msgspec.structs.replace(request, headers={**request.headers, **carrier()})
        return await deliver(self._http, self.codec, traced, self._policy, on_retry=self._count_retry,
                             pacer=self.pacer, on_paced=self._count_paced)

    async def _count_retry(self, result: SendResult, wait: float) -> None:
        self._metrics.retries.labels(self.channel).inc()
        log.info("%s: retrying in %.2fs after %s", self.id, wait, result.error)

    def _count_paced(self, seconds: float) -> None:
        self._metrics.paced.labels(self.id).inc(seconds)

    async def _to_session(self, request: OutboundRequest) -> SendResult:
        """Hand the message to whichever hub process holds the session's socket; it answers once the
        socket took it, so an offline visitor is a `failed` status, not a silent loss."""
        session = request.url[len(SESSION_SCHEME) :]
        subject = self._subjects.session(self.tenant, self.id, session)
        try:
            await self._publisher.request(subject, request.body, timeout=_SESSION_TIMEOUT)
        except PayloadTooLarge as exc:
            return SendResult(ok=False, error=Error(code="too_large", message=str(exc)))
        except nats.errors.NoRespondersError:
            return SendResult(ok=False, error=Error(code="session_offline",
                                                    message=f"no WebSocket is connected for session {session}"))
        except nats.errors.TimeoutError:
            return SendResult(ok=False, retryable=True, error=Error(
                code="session_timeout", message="the WebSocket did not take the message in time", retryable=True))
        return SendResult(ok=True, native_ids=[request.message_id])
