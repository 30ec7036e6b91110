"""Durable ingest: every inbound delivery (webhook, poll, WebSocket frame) becomes a raw record in
JetStream before anyone is told "accepted".

The record is the request as received (headers and body, msgpack-encoded). Its `Nats-Msg-Id` comes
from the channel's own ids, so a channel that retries a delivery inside the dedup window is absorbed
by JetStream itself. Nothing is decoded here: a decode bug can never lose a message.

What is stored is the request without its credentials (`Codec.redact`): the signature was checked and
the dedup key read on the request as received, and nothing after that needs them.
"""

from __future__ import annotations

import hashlib
import logging
import time

import msgspec
from aiohttp import web
from nats.js import JetStreamContext

from babelhub.codecs.base import Codec, HttpRequest, HttpResponse
from babelhub.errors import DecodeError, SignatureError
from babelhub.hub.broker import Subjects
from babelhub.hub.connections import ConnectionService
from babelhub.hub.deadletters import DeadLetter, DeadLetters
from babelhub.hub.telemetry import Metrics, carrier, span

__all__ = ["Ingest", "redacted", "webhook_routes"]

UNKNOWN_CHANNEL = "unknown"
"""The `channel` label of webhook requests to a channel no connection has: labels name only what is
configured, so requests to made-up URLs cannot add series to /metrics."""

log = logging.getLogger("babelhub.ingest")


class Ingest:
    def __init__(self, js: JetStreamContext, subjects: Subjects, dead_letters: DeadLetters) -> None:
        self._js = js
        self._subjects = subjects
        self._dead_letters = dead_letters

    async def park(self, connection: ConnectionService, request: HttpRequest, error: str, path: str = "") -> None:
        """Keep a request the endpoint refused (a codec that raised on it) in the dead-letter stream."""
        await self._dead_letters.park(DeadLetter(
            stage="ingest", error=error, path=path, tenant=connection.tenant, connection=connection.id,
            headers=request.headers, body=request.body))

    async def record(self, connection: ConnectionService, request: HttpRequest) -> bool:
        """Write `request` as a raw record; True if new, False if JetStream saw its dedup key already.
        Raises DecodeError when the body is too broken to even find the channel's ids (after parking it)."""
        try:
            key = _dedup_key(connection, request)
        except DecodeError as exc:
            stored = redacted(connection, request)
            await self._dead_letters.park(DeadLetter(
                stage="ingest", error=exc.reason, path=exc.path, tenant=connection.tenant,
                connection=connection.id, headers=stored.headers, body=stored.body))
            raise
        msg_id = f"{connection.id}:{key or hashlib.sha256(request.body).hexdigest()}"
        subject = self._subjects.raw(connection.tenant, connection.channel, connection.id)
        ack = await self._js.publish(subject, msgspec.msgpack.encode(redacted(connection, request)),
                                     headers={"Nats-Msg-Id": msg_id, **carrier()})
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
        except web.HTTPRequestEntityTooLarge as exc:
            return _error(413, exc.text or "body too large")
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


def _error(status: int, message: str, path: str = "") -> web.Response:
    body: dict[str, str] = {"error": message}
    if path:
        body["path"] = path
    return web.json_response(body, status=status)
