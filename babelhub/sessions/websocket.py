"""WebSocket sessions for the built-in web chat: `GET /` serves the page, `WebSocket /ws/{connection}`
carries the chat.

A visitor's socket speaks the client-session protocol (`clients.py`, `frames.py`) with a credential of
its own: after the `session` frame it may subscribe to its one conversation and nothing else, and it
`post`s its messages in the web chat's frame format instead of sending canonical envelopes. A post is
recorded through the same durable ingest as a webhook; what the hub sends the visitor is read from the
conversation's stream like any client's, with offsets, so a visitor who reconnects with its cursor gets
what it missed, whichever hub process holds its new socket. A post the hub cannot read is answered
with an `error` frame naming the path and kept in the dead-letter stream.

The chat is meant to face the internet, so a socket is only as strong as its limits:

* the hub issues session ids with a resume token (`tokens.py`); `?session=…&token=…` resumes one, and
  anything else starts a new session;
* the `Origin` of a browser must be the hub's own or one of the connection's `allowed_origins` (403);
* one client address holds at most `hub.max_sockets_per_ip` sockets, and one session sends at most
  `hub.session_frame_rate` frames a second after a burst (both close with 1008 naming the limit);
* a frame larger than `hub.max_frame_bytes` closes with 1009 before it is read, and is never recorded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from functools import partial
from importlib.resources import files

from aiohttp import WSCloseCode, web
from yarl import URL

from babelhub import canonical as c
from babelhub.codecs.base import SESSION_HEADER, HttpRequest
from babelhub.codecs.degrade import degrade
from babelhub.errors import ConfigError
from babelhub.plugins import ExplainedSocket, InboundSource, Services
from babelhub.services.connections import ConnectionService
from babelhub.sessions import frames as f
from babelhub.sessions.auth import Credential
from babelhub.sessions.clients import ClientSession, Visitor
from babelhub.sessions.feed import Feeds
from babelhub.sessions.limits import AddressSlots, FrameBudgets
from babelhub.sessions.tokens import SessionSigner, load_session_key, well_formed

__all__ = ["WebSessions"]

log = logging.getLogger("babelhub.sessions")

_PAGE = files("babelhub.sessions").joinpath("static/webchat.html").read_text("utf-8")
# Room the raw record needs beside the frame itself (path, session header, msgpack framing, NATS headers).
_RECORD_OVERHEAD = 4096
_ANY_ORIGIN = "*"



class WebSessions(InboundSource):
    """The `websocket` inbound source: browsers of every connection whose mode is `websocket` (the web
    chat's default)."""

    name = "websocket"

    def __init__(self, connections: list[ConnectionService], services: Services) -> None:
        super().__init__(connections, services)
        self._hub = services.ctx
        self._ingest = services.ingest
        self._settings = services.config.hub
        self._addresses = AddressSlots(self._settings.max_sockets_per_ip)
        self._budgets = FrameBudgets(self._settings.session_frame_rate, self._settings.session_frame_burst)
        self._sessions: set[ClientSession] = set()
        self._feeds = Feeds(services.ctx.js, services.ctx.subjects)
        self._signers: dict[str, SessionSigner] = {}
        self._origins: dict[str, frozenset[str]] = {}
        self._open_sessions: Counter[str] = Counter()

    async def start(self) -> None:
        """Check the frame limit against the NATS server and load each connection's session key."""
        max_payload = self._hub.nats.max_payload
        limit = self._settings.max_frame_bytes
        if limit + _RECORD_OVERHEAD > max_payload:
            raise ConfigError(f"hub.max_frame_bytes {limit} leaves no room in the NATS server's "
                              f"max_payload of {max_payload} bytes; set it below {max_payload - _RECORD_OVERHEAD}")
        for connection in self.connections.values():
            self._origins[connection.id] = _allowed_origins(connection)
            key = connection.settings.secrets.get("session_key", "").encode("utf-8")
            if not key:
                key = await load_session_key(self._hub.js, self._hub.subjects, connection.id,
                                             replicas=self._settings.replicas)
            self._signers[connection.id] = SessionSigner(key, connection.tenant, connection.id)

    def address(self, connection: ConnectionService, http_url: str) -> str:
        return f"WebSocket {http_url.replace('http', 'ws', 1)}/ws/{connection.id}"

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/", self._page), web.get("/ws/{connection}", self._socket)]

    async def _page(self, _: web.Request) -> web.Response:
        return web.Response(text=_PAGE, content_type="text/html")

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        connection = self.connections.get(request.match_info["connection"])
        if connection is None or connection.id not in self._signers:
            return web.json_response({"error": "no WebSocket connection of that name"}, status=404)
        if not self._origin_allowed(request, connection.id):
            return web.json_response({"error": f"origin {request.headers['Origin'][:100]!r} may not open this chat"},
                                     status=403)
        claimed = request.query.get("session", ""), request.query.get("token", "")
        if any(value and not well_formed(value) for value in claimed):
            return web.json_response({"error": "session ids and tokens use letters, digits, '_' and '-'"},
                                     status=400)
        limit = self._settings.max_frame_bytes
        # No permessage-deflate, which browsers offer: zlib state per socket would make an idle session
        # cost some 115 KB instead of 24 (bench/memory_bench.py), and chat frames are small.
        socket = ExplainedSocket(heartbeat=30.0, max_msg_size=limit, compress=False,
                                 too_big=f"frame larger than {limit} bytes (hub.max_frame_bytes)")
        address = request.remote or ""
        if not self._addresses.take(address):
            await socket.prepare(request)
            await socket.close(code=WSCloseCode.POLICY_VIOLATION, message=(
                f"too many sockets from one address: {self._addresses.limit} (hub.max_sockets_per_ip)").encode())
            return socket
        try:
            await socket.prepare(request)
            await self._serve(socket, connection, *claimed)
        finally:
            self._addresses.release(address)
        return socket

    def _origin_allowed(self, request: web.Request, connection: str) -> bool:
        """Browsers always send `Origin` on a WebSocket; a client without one is not a browser, and a
        check it could forge would protect nothing."""
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        allowed = self._origins[connection]
        if _ANY_ORIGIN in allowed:
            return True
        try:
            claimed = URL(origin).origin()
            # The hub's own origin, with the browser's scheme: behind a TLS-terminating proxy the hub
            # itself is reached over http while the page was loaded over https.
            own = URL(f"{claimed.scheme}://{request.host}").origin()
        except ValueError:  # "null" (sandboxed frames, file://) and other non-URLs
            return False
        return claimed == own or str(claimed) in allowed

    async def _serve(self, socket: ExplainedSocket, connection: ConnectionService, session: str, token: str) -> None:
        signer = self._signers[connection.id]
        resumed = bool(session) and signer.valid(session, token)
        if resumed:
            log.debug("%s: session resumed", connection.id)
        else:
            session, token = signer.new_session()
        conversation = c.conversation_id(connection.tenant, connection.id, session)
        credential = Credential(tenant=connection.tenant, rights=frozenset({"read"}),
                                conversations=frozenset({conversation}))
        visitor = Visitor(post=partial(self._post, connection, session),
                          present=partial(degrade, caps=connection.codec.capabilities))
        client = ClientSession(self.services, socket, session, self._budgets, self._feeds, visitor=visitor)
        self._sessions.add(client)
        self._open_sessions[session] += 1
        try:
            client.send(f.VisitorSession(session=session, token=token, resumed=resumed,
                                               conversation=conversation))
            await client.run(credential)
        finally:
            self._sessions.discard(client)
            self._open_sessions[session] -= 1
            if self._open_sessions[session] <= 0:
                del self._open_sessions[session]
            self._budgets.forget_refilled(keep=self._open_sessions)

    async def _post(self, connection: ConnectionService, session: str, body: bytes) -> None:
        """Record a visitor's message like a webhook: the channel's codec reads it from the raw record."""
        record = HttpRequest(method="WS", path=f"/ws/{connection.id}", headers={SESSION_HEADER: session},
                             body=body, received_at=time.time())
        await self._ingest.record(connection, record)

    async def stop(self) -> None:
        """Shutdown: tell every browser the hub is going away (1001), so it reconnects later."""
        await asyncio.gather(*(client.close(WSCloseCode.GOING_AWAY, "hub shutting down")
                               for client in list(self._sessions)), return_exceptions=True)
        await self._feeds.stop()


def _allowed_origins(connection: ConnectionService) -> frozenset[str]:
    """The connection's `allowed_origins` option as normalized origins (`scheme://host[:port]`)."""
    configured = connection.settings.options.get("allowed_origins", [])
    where = f"connection {connection.id}: option allowed_origins"
    if not isinstance(configured, list) or not all(isinstance(item, str) for item in configured):
        raise ConfigError(f"{where} must be a list of origins like \"https://shop.example\" (or \"*\")")
    origins: set[str] = set()
    for item in configured:
        if item == _ANY_ORIGIN:
            origins.add(item)
            continue
        url = URL(item)
        if url.scheme not in ("http", "https") or not url.host or url.path not in ("", "/"):
            raise ConfigError(f"{where}: {item!r} is not an origin (scheme://host[:port])")
        origins.add(str(url.origin()))
    return frozenset(origins)
