"""WebSocket sessions for the built-in web chat: `GET /` serves the page, `WebSocket /ws/{connection}`
carries the chat.

A browser frame is recorded through the same durable ingest as a webhook. What the hub sends to a
session is published on core NATS (`<prefix>.<tenant>.session.<connection>.<session>`), so whichever hub
process holds the socket can deliver it. A frame the hub cannot read closes the socket with 1007 and
the reason, and the frame is kept in the dead-letter stream.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from importlib.resources import files

from aiohttp import WSCloseCode, WSMsgType, web
from nats.aio.msg import Msg

from babelhub.codecs.base import SESSION_HEADER, HttpRequest
from babelhub.errors import DecodeError
from babelhub.hub.connections import ConnectionService
from babelhub.hub.context import HubContext
from babelhub.hub.ingest import Ingest

__all__ = ["WebSessions"]

log = logging.getLogger("babelhub.sessions")

_PAGE = files("babelhub.sessions").joinpath("static/webchat.html").read_text("utf-8")
_SESSION_ALPHABET = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class WebSessions:
    def __init__(self, hub: HubContext, ingest: Ingest) -> None:
        self._hub = hub
        self._ingest = ingest
        self._sockets: set[web.WebSocketResponse] = set()

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/", self._page), web.get("/ws/{connection}", self._socket)]

    async def _page(self, _: web.Request) -> web.Response:
        return web.Response(text=_PAGE, content_type="text/html")

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        connection = self._hub.connections.get(request.match_info["connection"])
        if connection is None or not connection.codec.takes_sessions:
            return web.json_response({"error": "no WebSocket connection of that name"}, status=404)
        session = request.query.get("session") or secrets.token_urlsafe(12)
        if not set(session) <= _SESSION_ALPHABET or len(session) > 64:
            return web.json_response({"error": "session ids use letters, digits, '_' and '-'"}, status=400)
        socket = web.WebSocketResponse(heartbeat=30.0)
        await socket.prepare(request)
        self._sockets.add(socket)
        subject = self._hub.subjects.session(connection.tenant, connection.id, session)

        async def to_browser(msg: Msg) -> None:
            if socket.closed:
                return  # no answer: the sender reports the message as not delivered
            await socket.send_str(msg.data.decode("utf-8"))
            if msg.reply:
                await msg.respond(b"")

        subscription = await self._hub.nats.subscribe(subject, cb=to_browser)
        try:
            await socket.send_json({"type": "session", "session": session})
            await self._read_frames(socket, connection, session)
        finally:
            await subscription.unsubscribe()
            self._sockets.discard(socket)
        return socket

    async def _read_frames(self, socket: web.WebSocketResponse, connection: ConnectionService, session: str) -> None:
        async for frame in socket:
            if frame.type == WSMsgType.BINARY:
                await socket.close(code=WSCloseCode.UNSUPPORTED_DATA, message=b"web chat frames are JSON text")
                return
            if frame.type != WSMsgType.TEXT:
                continue
            record = HttpRequest(method="WS", path=f"/ws/{connection.id}", headers={SESSION_HEADER: session},
                                 body=frame.data.encode("utf-8"), received_at=time.time())
            try:
                await self._ingest.record(connection, record)
            except DecodeError as exc:
                reason = f"{exc.reason} (at {exc.path})"[:120]
                await socket.close(code=WSCloseCode.INVALID_TEXT, message=reason.encode("utf-8"))
                return

    async def close_all(self) -> None:
        """Shutdown: tell every browser the hub is going away (1001), so it reconnects later."""
        sockets = list(self._sockets)
        await asyncio.gather(*(s.close(code=WSCloseCode.GOING_AWAY, message=b"hub shutting down") for s in sockets),
                             return_exceptions=True)

