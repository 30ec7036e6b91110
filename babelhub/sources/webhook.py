"""The `webhook` inbound source: `GET|POST /webhooks/{channel}/{connection}`.

A delivery is answered only after it is verified and recorded (durable ingest), inside the channel's
deadline: the signature is checked, the request becomes a raw record, and only then does the channel
get its answer (its own handshake answer, or `{"ok": true}`). Errors are JSON `{"error", "path"?,
"limit"?}`: 401 for a failed signature, 400 naming the path of what could not be read, 413 over a
limit, 503 with Retry-After while NATS cannot take a record.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web
from prometheus_client import Counter

from babelhub.codecs.base import HttpRequest, HttpResponse
from babelhub.errors import DecodeError, PayloadTooLarge, SignatureError
from babelhub.plugins import InboundSource, Services
from babelhub.services.connections import ConnectionService
from babelhub.services.ingest import NATS_UNAVAILABLE
from babelhub.services.telemetry import span

__all__ = ["UNKNOWN_CHANNEL", "Webhooks", "to_request"]

log = logging.getLogger("babelhub.webhooks")

UNKNOWN_CHANNEL = "unknown"
"""The `channel` label of webhook requests to a channel no connection has: labels name only what is
configured, so requests to made-up URLs cannot add series to /metrics."""

_RETRY_AFTER_SECONDS = 5
_OK = b'{"ok": true}'
"""The answer to an accepted delivery, as `web.json_response({"ok": True})` writes it."""


class Webhooks(InboundSource):
    """Channels that call the hub: every connection whose mode is `webhook`."""

    name = "webhook"
    follows_changes = True

    def __init__(self, connections: list[ConnectionService], services: Services) -> None:
        super().__init__(connections, services)
        self._channels = {connection.channel for connection in connections}
        self._counters: dict[tuple[str, int], Counter] = {}
        """`babelhub_webhooks`' series by channel label and status, looked up once each."""

    async def connection_changed(self, connection_id: str, connection: ConnectionService | None) -> None:
        """Read on every request, so the next one is verified with the new secrets (a disabled
        connection answers 404)."""
        await super().connection_changed(connection_id, connection)
        if connection is not None:
            self._channels.add(connection.channel)

    def address(self, connection: ConnectionService, http_url: str) -> str:
        return f"{http_url}/webhooks/{connection.channel}/{connection.id}"

    def routes(self) -> list[web.RouteDef]:
        # Some channels append a path of their own (Evolution's per-event URLs): the same endpoint takes it.
        paths = ("/webhooks/{channel}/{connection}", "/webhooks/{channel}/{connection}/{event:.+}")
        return [web.route(method, path, self._handle) for path in paths for method in ("GET", "POST")]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        channel = request.match_info["channel"]
        response = await self._answer(request, channel)
        label = channel if channel in self._channels else UNKNOWN_CHANNEL
        counted = self._counters.get((label, response.status))
        if counted is None:  # labels name only configured channels and the statuses answered: few of them
            counted = self._counters[label, response.status] = self.services.ctx.metrics.webhooks.labels(
                label, str(response.status))
        counted.inc()
        return response

    async def _answer(self, request: web.Request, channel: str) -> web.Response:
        connection = self.connections.get(request.match_info["connection"])
        if connection is None or connection.channel != channel or connection.disabled:
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
                    answer = await self._handshake(connection, native)
                    return answer or _error(405, f"{channel} delivers by POST: a GET is only an endpoint check")
            try:
                codec.verify(native, secrets)
            except SignatureError as exc:
                return _error(401, f"signature check failed: {exc}")
            except Exception as exc:  # odd input that trips the check is still no valid signature
                log.warning("%s: signature check raised %r", connection.id, exc)
                return _error(401, "signature check failed: the signature could not be read")
            try:
                await self.services.ingest.record(connection, native)
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
            answer = await self._handshake(connection, native)
            return answer or web.Response(body=_OK, content_type="application/json", charset="utf-8")

    async def _handshake(self, connection: ConnectionService, native: HttpRequest) -> web.Response | None:
        """The codec's own answer to `native`, if any. A handshake that raises is a codec tripping over odd
        input: a 401 when it says the signature fails, else a 400 with the request kept as a dead letter."""
        try:
            answer = connection.codec.handshake(native, connection.settings.secrets)
        except SignatureError as exc:
            return _error(401, f"signature check failed: {exc}")
        except DecodeError as exc:
            await self.services.ingest.park(connection, native, f"handshake: {exc.reason}", exc.path)
            return _error(400, exc.reason, path=exc.path or "$")
        except Exception as exc:
            log.warning("%s: handshake raised %s", connection.id, type(exc).__name__)
            await self.services.ingest.park(connection, native, f"handshake raised {exc!r}", "$")
            return _error(400, "the request could not be read", path="$")
        return _native(answer) if answer else None


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
