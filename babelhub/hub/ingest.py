"""Durable ingest: every inbound delivery (webhook, poll, WebSocket frame) becomes a raw record in
JetStream before anyone is told "accepted".

The record is the request as received (headers and body, msgpack-encoded). Its `Nats-Msg-Id` is a
fixed-length hash of the channel's own ids, so a channel that retries a delivery inside the dedup
window is absorbed by JetStream itself. Nothing is decoded here: a decode bug can never lose a message.

Bodies are limited (`hub.max_body_bytes`, 413) well below the NATS server's `max_payload`, leaving
`RECORD_HEADROOM` for the request's headers and URL; a record that still does not fit is a 413 too.

What is stored is the request without its credentials (`Codec.redact`): the signature was checked and
the dedup key read on the request as received, and nothing after that needs them.
"""

from __future__ import annotations

import hashlib
import logging
import time

import msgspec
import nats.errors
from aiohttp import web

from babelhub.codecs.base import Codec, HttpRequest, HttpResponse
from babelhub.errors import ConfigError, DecodeError, PayloadTooLarge, SignatureError
from babelhub.hub.broker import Subjects
from babelhub.hub.connections import ConnectionService
from babelhub.hub.deadletters import DeadLetter, DeadLetters
from babelhub.hub.publisher import Publisher
from babelhub.hub.telemetry import Metrics, span

__all__ = ["NATS_UNAVAILABLE", "RECORD_HEADROOM", "Ingest", "check_body_limit", "redacted", "webhook_routes"]

UNKNOWN_CHANNEL = "unknown"
"""The `channel` label of webhook requests to a channel no connection has: labels name only what is
configured, so requests to made-up URLs cannot add series to /metrics."""

log = logging.getLogger("babelhub.ingest")

# What a lost or reconnecting NATS connection raises (nats.errors.TimeoutError is a TimeoutError).
NATS_UNAVAILABLE = (nats.errors.Error, TimeoutError, ConnectionError)
"""What `Ingest.record` raises when NATS cannot take a record now (not the input's fault: retry later)."""
_RETRY_AFTER_SECONDS = 5

RECORD_HEADROOM = 64 * 1024
"""Room a raw record needs beside its body: the request's headers, URL and query, the NATS headers."""


def check_body_limit(max_body_bytes: int, max_payload: int) -> None:
    """Refuse a body limit that leaves a largest-body record no room under the server's max_payload."""
    if max_body_bytes + RECORD_HEADROOM > max_payload:
        raise ConfigError(
            f"hub.max_body_bytes = {max_body_bytes} leaves no room under the NATS server's max_payload of "
            f"{max_payload} bytes: set it to at most {max_payload - RECORD_HEADROOM} (or raise max_payload)")


class Ingest:
    def __init__(self, publisher: Publisher, subjects: Subjects, dead_letters: DeadLetters) -> None:
        self._publisher = publisher
        self._subjects = subjects
        self._dead_letters = dead_letters

    async def park(self, connection: ConnectionService, request: HttpRequest, error: str, path: str = "") -> None:
        """Keep a request the endpoint refused in the dead-letter stream, without its credentials."""
        stored = redacted(connection, request)
        await self._dead_letters.park(DeadLetter(
            stage="ingest", error=error, path=path, tenant=connection.tenant, connection=connection.id,
            headers=stored.headers, body=stored.body))

    async def record(self, connection: ConnectionService, request: HttpRequest) -> bool:
        """Write `request` as a raw record; True if new, False if JetStream saw its dedup key already.
        Raises DecodeError when the body is too broken to even find the channel's ids, PayloadTooLarge
        when the record does not fit in one NATS message (after parking it, shortened, either way), and
        nats.errors.Error when NATS cannot take it now."""
        if not self._publisher.connected:
            # Waiting out the reconnection would outlast the channel's deadline: it retries a 503 instead.
            raise nats.errors.ConnectionReconnectingError
        try:
            key = _dedup_key(connection, request)
        except DecodeError as exc:
            await self.park(connection, request, exc.reason, exc.path)
            raise
        # The key comes from client data: the publisher hashes it into a fixed-length Nats-Msg-Id.
        dedup = (connection.id, key or hashlib.sha256(request.body).hexdigest())
        subject = self._subjects.raw(connection.tenant, connection.channel, connection.id)
        try:
            ack = await self._publisher.publish(subject, msgspec.msgpack.encode(redacted(connection, request)),
                                                dedup=dedup)
        except PayloadTooLarge as exc:
            await self.park(connection, request, str(exc))
            raise
        return not ack.duplicate


def redacted(connection: ConnectionService, request: HttpRequest) -> HttpRequest:
    """`request` as it may be stored. A codec's own hook that fails falls back to the default one: a
    record is never stored with its credentials because a codec tripped on odd input."""
    secrets = connection.settings.secrets
    try:
        return connection.codec.redact(request, secrets)
    except Exception as exc:
        log.warning("%s: the codec's redaction failed (%r); the default one is used", connection.id, exc)
        return Codec.redact(connection.codec, request, secrets)


def _dedup_key(connection: ConnectionService, request: HttpRequest) -> str:
    try:
        return connection.codec.dedup_key(request)
    except DecodeError:
        raise
    except Exception as exc:  # a codec bug on odd input must still end in a 400 and a kept record
        raise DecodeError(f"the channel's ids could not be read: {exc!r}", path="$") from exc


def to_request(request: web.Request, body: bytes, public_url: str = "") -> HttpRequest:
    return HttpRequest(
        method=request.method,
        path=request.path,
        query=dict(request.query),
        headers={name.lower(): value for name, value in request.headers.items()},
        body=body,
        url=_called_url(request, public_url),
        received_at=time.time(),
    )


def _called_url(request: web.Request, public_url: str) -> str:
    """The URL as the channel called it, which some signatures cover (Twilio's, query included): as
    received, or the configured `public_url` (the hub behind a proxy) with the query received."""
    if not public_url:
        return str(request.url)
    query = request.raw_path.partition("?")[2]
    return f"{public_url}?{query}" if query and "?" not in public_url else public_url


def webhook_routes(connections: dict[str, ConnectionService], ingest: Ingest, metrics: Metrics) -> list[web.RouteDef]:
    """`GET|POST /webhooks/{channel}/{connection}`: handshakes, signature check, durable record, 200."""

    configured = {connection.channel for connection in connections.values()}

    async def handle(request: web.Request) -> web.StreamResponse:
        channel = request.match_info["channel"]
        response = await _answer(request, channel)
        label = channel if channel in configured else UNKNOWN_CHANNEL
        metrics.webhooks.labels(label, str(response.status)).inc()
        return response

    async def _answer(request: web.Request, channel: str) -> web.Response:
        connection = connections.get(request.match_info["connection"])
        if connection is None or connection.channel != channel:
            return _error(404, f"no {channel} connection named {request.match_info['connection']!r}")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            limit = request.client_max_size
            return _error(413, f"the body is larger than the hub's limit of {limit} bytes (hub.max_body_bytes)",
                          limit=limit)
        native = to_request(request, body, str(connection.settings.options.get("public_url", "")))
        codec, secrets = connection.codec, connection.settings.secrets
        with span("webhook", native.headers, channel=channel, connection=connection.id):
            if request.method == "GET":
                if body:
                    return _error(400, "a GET request carries no body: deliveries are POSTed")
                if not codec.delivers_by_get:
                    # A check of the endpoint (Meta's hub.challenge), answered unverified by design.
                    answer = await _handshake(connection, native)
                    return answer or _error(405, f"{channel} delivers by POST: a GET is only an endpoint check")
            try:
                codec.verify(native, secrets)
            except SignatureError as exc:
                return _error(401, f"signature check failed: {exc}")
            except Exception as exc:  # odd input that trips the check is still no valid signature
                log.warning("%s: signature check raised %r", connection.id, exc)
                return _error(401, "signature check failed: the signature could not be read")
            try:
                await ingest.record(connection, native)
            except DecodeError as exc:
                return _error(400, exc.reason, path=exc.path)
            except PayloadTooLarge as exc:
                return _error(413, f"the request (headers and body) is too large to record: {exc.size} bytes with "
                                   f"the hub's framing, the NATS server takes at most {exc.limit}", limit=exc.limit)
            except NATS_UNAVAILABLE as exc:
                # Not recorded, so not accepted: the channel retries later, and nothing is lost.
                log.warning("%s: could not record a delivery: %r", connection.id, exc)
                return _error(503, "the hub cannot record deliveries right now; retry later",
                              headers={"Retry-After": str(_RETRY_AFTER_SECONDS)})
            # Only now, verified and recorded, may the request be answered the channel's way.
            answer = await _handshake(connection, native)
            return answer or web.json_response({"ok": True})

    async def _handshake(connection: ConnectionService, native: HttpRequest) -> web.Response | None:
        """The codec's own answer to `native`, if any. A handshake that raises is a codec tripping over odd
        input: a 401 when it says the signature fails, else a 400 with the request kept as a dead letter."""
        try:
            answer = connection.codec.handshake(native, connection.settings.secrets)
        except SignatureError as exc:
            return _error(401, f"signature check failed: {exc}")
        except DecodeError as exc:
            await ingest.park(connection, native, f"handshake: {exc.reason}", exc.path)
            return _error(400, exc.reason, path=exc.path or "$")
        except Exception as exc:
            log.warning("%s: handshake raised %s", connection.id, type(exc).__name__)
            await ingest.park(connection, native, f"handshake raised {exc!r}", "$")
            return _error(400, "the request could not be read", path="$")
        return _native(answer) if answer else None

    # Some channels append a path of their own (Evolution's per-event URLs): the same endpoint takes it.
    paths = ("/webhooks/{channel}/{connection}", "/webhooks/{channel}/{connection}/{event:.+}")
    return [web.route(method, path, handle) for path in paths for method in ("GET", "POST")]


def _native(response: HttpResponse) -> web.Response:
    return web.Response(status=response.status, body=response.body, headers=response.headers)


def _error(status: int, message: str, path: str = "", limit: int = 0,
           headers: dict[str, str] | None = None) -> web.Response:
    body: dict[str, str | int] = {"error": message}
    if path:
        body["path"] = path
    if limit:
        body["limit"] = limit
    return web.json_response(body, status=status, headers=headers)
