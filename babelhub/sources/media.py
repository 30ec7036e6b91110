"""The `media` inbound source: telephony providers' media WebSockets at `WebSocket /media/{connection}`.

The connection's `channel` names the provider (`babelhub.media` entry points); each socket gets its own
`MediaSession` (the provider's protocol) and, once the provider says the stream started, a `CallStream`
(`media_call.py`) relaying its audio over NATS. The hub holds the socket for the whole call, so the
audio services behind NATS may come and go.

A socket is only as strong as its limits:

* the opening request must pass the provider's `verify` (its signature), else 403 before the upgrade;
  a browser's (one with an `Origin`) must come from a page of the hub's own origin, else 403;
* a frame larger than `hub.media_max_frame_bytes` closes the socket with 1009 naming the limit;
* one socket sends at most `hub.media_frame_rate` frames a second after a burst of
  `hub.media_frame_burst`, else 1008;
* a frame the provider's protocol cannot read closes with 1007 and the reason, and is kept in the
  dead-letter stream (`stage="media"`). One call's trouble never touches another's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import WebSocketError, WSCloseCode, WSMsgType, web
from yarl import URL

from babelhub.errors import DecodeError, SignatureError
from babelhub.media.base import MediaSession, WsFrame
from babelhub.media.channel import MEDIA_SOURCE, is_media_channel, load_provider, providers
from babelhub.plugins import ExplainedSocket, InboundSource, Services
from babelhub.services.connections import ConnectionService
from babelhub.services.deadletters import DeadLetter
from babelhub.sessions.limits import FrameBudgets
from babelhub.sources.media_call import CallStream
from babelhub.sources.webhook import to_request

__all__ = ["MediaStreams"]

log = logging.getLogger("babelhub.media")

_MAX_REASON_BYTES = 123
"""A close frame's reason fits in 123 bytes (RFC 6455, 5.5: control frames carry at most 125)."""




class MediaStreams(InboundSource):
    """Calls of every connection whose channel is a telephony media stream."""

    name = MEDIA_SOURCE

    def __init__(self, connections: list[ConnectionService], services: Services) -> None:
        super().__init__(connections, services)
        self._settings = services.config.hub
        self._providers = {connection.id: load_provider(connection.channel) for connection in connections}
        self._sockets: set[web.WebSocketResponse] = set()
        self._budgets = FrameBudgets(self._settings.media_frame_rate, self._settings.media_frame_burst)

    @classmethod
    def check(cls, connection: ConnectionService) -> str:
        if not is_media_channel(connection.channel):
            return f"{connection.channel} is no telephony media stream; installed: {', '.join(providers())}"
        return ""

    def address(self, connection: ConnectionService, http_url: str) -> str:
        return f"WebSocket {http_url.replace('http', 'ws', 1)}/media/{connection.id}"

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/media/{connection}", self._socket)]

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        connection = self.connections.get(request.match_info["connection"])
        if connection is None:
            return web.json_response({"error": "no media connection of that name"}, status=404)
        if not _same_origin(request):
            return web.json_response({"error": f"origin {request.headers['Origin'][:100]!r} may not open a media "
                                                "stream of this hub"}, status=403)
        settings = connection.settings
        session = self._providers[connection.id](settings.secrets, settings.options)
        refusal = _refusal(session, to_request(request, b"", str(settings.options.get("public_url", ""))))
        if refusal:
            return web.json_response({"error": f"signature check failed: {refusal}"}, status=403)
        limit = self._settings.media_max_frame_bytes
        socket = ExplainedSocket(max_msg_size=limit, compress=False, heartbeat=30.0,
                                 too_big=f"frame larger than {limit} bytes (hub.media_max_frame_bytes)")
        await socket.prepare(request)
        self._sockets.add(socket)
        try:
            await self._serve(socket, connection, session, request.transport)
        finally:
            self._sockets.discard(socket)
        return socket

    async def _serve(self, socket: web.WebSocketResponse, connection: ConnectionService, session: MediaSession,
                     transport: asyncio.Transport | None) -> None:
        async def send(frames: list[WsFrame]) -> None:
            """What the provider cannot take any more (its socket is closing) is dropped: the call ends."""
            for frame in frames:
                if socket.closed:
                    return
                try:
                    if isinstance(frame, str):
                        await socket.send_str(frame)
                    else:
                        await socket.send_bytes(frame)
                except ConnectionError:
                    return

        async def hang_up(reason: str) -> None:
            await call.close(reason)
            await socket.close(code=WSCloseCode.OK, message=_reason(reason))

        call = CallStream(self.services.ctx, connection, session, send, hang_up=hang_up,
                          queue_seconds=self._settings.media_queue_seconds,
                          writable=lambda: _writable(socket, transport))
        budget = f"{connection.id}:{id(socket)}"  # this socket's frame budget, dropped when it closes
        try:
            await send(session.opening())
            await self._read_frames(socket, connection, session, call, send, budget)
        finally:
            self._budgets.forget(budget)
            await call.close("the provider's socket closed")

    async def _read_frames(self, socket: web.WebSocketResponse, connection: ConnectionService, session: MediaSession,
                           call: CallStream, send: Callable[[list[WsFrame]], Any], budget: str) -> None:
        async for message in socket:
            if message.type == WSMsgType.ERROR:
                if isinstance(message.data, WebSocketError):  # a frame refused, not a connection lost
                    await self._park(connection, f"WebSocket frame refused: {message.data}", "", b"")
                return
            if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                continue
            if not self._budgets.take(budget):
                settings = self._settings
                await socket.close(code=WSCloseCode.POLICY_VIOLATION, message=_reason(
                    f"frame rate limit: {settings.media_frame_rate:g}/s after a burst of "
                    f"{settings.media_frame_burst} (hub.media_frame_rate)"))
                return
            frame: WsFrame = message.data
            try:
                events = session.receive(frame)
            except DecodeError as exc:
                await self._refuse(socket, connection, frame, exc.reason, exc.path)
                return
            except Exception as exc:  # a provider module tripping over odd input costs this socket only
                log.warning("%s: the %s protocol raised %s on a frame", connection.id, connection.channel,
                            type(exc).__name__)
                await self._refuse(socket, connection, frame, f"the frame could not be read ({type(exc).__name__})",
                                   "$")
                return
            if replies := session.replies():  # few frames need one: no coroutine for the others
                await send(replies)
            for event in events:
                await call.handle(event)
            if call.stopped:
                await socket.close(code=WSCloseCode.OK, message=b"stream stopped")
                return

    async def _refuse(self, socket: web.WebSocketResponse, connection: ConnectionService, frame: WsFrame,
                      reason: str, path: str) -> None:
        body = frame.encode("utf-8") if isinstance(frame, str) else frame
        await self._park(connection, reason, path, body)
        await socket.close(code=WSCloseCode.INVALID_TEXT, message=_reason(f"{reason} (at {path})"))

    async def _park(self, connection: ConnectionService, error: str, path: str, body: bytes) -> None:
        await self.services.ctx.dead_letters.park(DeadLetter(
            stage="media", error=error, path=path, tenant=connection.tenant, connection=connection.id,
            subject=f"/media/{connection.id}", body=body))

    async def stop(self) -> None:
        """Shutdown: close every provider socket with 1001 (the calls' streams end)."""
        sockets = list(self._sockets)
        await asyncio.gather(*(s.close(code=WSCloseCode.GOING_AWAY, message=b"hub shutting down") for s in sockets),
                             return_exceptions=True)


def _same_origin(request: web.Request) -> bool:
    """Telephony providers send no `Origin`; a browser always does, and only a page of the hub's own may
    open a media stream (another site's page would stream its visitor's microphone in their name)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    try:
        claimed = URL(origin).origin()
        # The hub's own origin with the browser's scheme: behind a TLS-terminating proxy the hub is
        # reached over http while the page was loaded over https.
        return claimed == URL(f"{claimed.scheme}://{request.host}").origin()
    except ValueError:  # "null" (sandboxed frames, file://) and other non-URLs
        return False


def _writable(socket: web.WebSocketResponse, transport: asyncio.Transport | None) -> bool:
    """Whether the provider's socket takes a frame now without waiting: nothing sent before still waits in
    the transport's buffer (aiohttp waits for a drain only past the buffer's high-water mark)."""
    return transport is not None and not socket.closed and transport.get_write_buffer_size() == 0


def _refusal(session: MediaSession, request: Any) -> str:
    """Why the provider's `verify` refuses the opening request, or ""."""
    try:
        session.verify(request)
    except SignatureError as exc:
        return str(exc)
    except Exception as exc:  # odd input that trips the check is still no valid signature
        return f"the signature could not be read ({type(exc).__name__})"
    return ""


def _reason(text: str) -> bytes:
    return text.encode("utf-8")[:_MAX_REASON_BYTES].decode("utf-8", errors="ignore").encode("utf-8")
