"""A local stand-in for Discord's Gateway: a real aiohttp server on 127.0.0.1 serving `GET
/api/v10/gateway/bot` (with the bot token) and WebSockets at `/gateway` (what that answer names) and
`/resume` (what the tests' READY names as `resume_gateway_url`), and taking interaction callbacks at
`POST /api/v10/interactions/{id}/{token}/callback`.

Each socket the hub opens is handed to the test (`await gateway.next_socket()`), which speaks for the
gateway: it sends frames, reads what the hub sent and closes with the codes Discord documents. Heartbeats
(op 1) are answered with an ACK by the socket itself while `ack` is set, and kept in `heartbeats`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str, **changes: Any) -> dict[str, Any]:
    """`fixtures/<name>` (e.g. `discord_gateway/hello.json`) as a dict, with top-level `changes`."""
    payload: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    payload.update(changes)
    return payload


class GatewaySocket:
    """One WebSocket the hub opened to the fake gateway."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        self.ws = ws
        self.path = request.path
        self.query = dict(request.query)
        self.ack = True
        self.heartbeats: list[Any] = []
        """The `d` of every heartbeat the hub sent, in order."""
        self._beaten = asyncio.Event()
        self.frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        """Everything else the hub sent."""
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        """The code the hub closed the socket with (None while open, or when the gateway closed it)."""
        self._closed_by_gateway = False
        self._close_sent = asyncio.Event()
        """Set once a close of the gateway's own is written: the handler must not return before (the
        connection would end without the close frame)."""

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        if isinstance(frame, bytes):
            await self.ws.send_bytes(frame)
        else:
            await self.ws.send_str(frame if isinstance(frame, str) else json.dumps(frame))

    async def expect(self, op: int, timeout: float = 15.0) -> dict[str, Any]:
        """The next frame the hub sent (heartbeats aside); it must have opcode `op`."""
        frame = await asyncio.wait_for(self.frames.get(), timeout)
        assert frame["op"] == op, frame
        return frame

    async def heartbeat_with(self, seq: Any, timeout: float = 15.0) -> None:
        """Wait for a heartbeat carrying `seq`."""
        async with asyncio.timeout(timeout):
            while seq not in self.heartbeats:
                self._beaten.clear()
                await self._beaten.wait()

    async def close(self, code: int, message: bytes = b"") -> None:
        self._closed_by_gateway = True
        try:
            await self.ws.close(code=code, message=message)
        finally:
            self._close_sent.set()

    async def wait_closed(self, timeout: float = 15.0) -> int | None:
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.close_code

    async def serve(self) -> None:
        async for message in self.ws:
            if message.type != WSMsgType.TEXT:
                continue
            frame = json.loads(message.data)
            if frame.get("op") == 1:
                self.heartbeats.append(frame.get("d"))
                self._beaten.set()
                if self.ack:
                    await self.send({"op": 11})
            else:
                await self.frames.put(frame)
        if self._closed_by_gateway:
            await self._close_sent.wait()
        else:
            self.close_code = self.ws.close_code
        self.closed.set()


class FakeGateway:
    """`base_url` after `start()`: the connection's `api_base` is `base_url + "/api/v10"`."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.base_url = ""
        self.bot_requests: list[dict[str, str]] = []
        """The headers of each `GET /gateway/bot`."""
        self.callbacks: list[tuple[str, dict[str, str], Any]] = []
        """Each interaction callback posted: its path, headers and JSON body."""
        self.sockets: asyncio.Queue[GatewaySocket] = asyncio.Queue()
        self.opened: list[GatewaySocket] = []
        self.overlaps = 0
        """Sockets opened while another was still open: one connection must have one socket at a time."""
        self._runner: web.AppRunner | None = None

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://", 1)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/api/v10/gateway/bot", self._gateway_bot)
        app.router.add_post("/api/v10/interactions/{id}/{token}/callback", self._callback)
        app.router.add_get("/gateway", self._socket)
        app.router.add_get("/resume", self._socket)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"
        return self.base_url

    async def stop(self) -> None:
        for socket in self.opened:
            if not socket.ws.closed:
                await socket.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def next_socket(self, timeout: float = 15.0) -> GatewaySocket:
        return await asyncio.wait_for(self.sockets.get(), timeout)

    def ready(self, seq: int = 1) -> dict[str, Any]:
        """READY, naming this fake's `/resume` as the resume URL."""
        ready = fixture("discord_gateway/ready.json", s=seq)
        ready["d"]["resume_gateway_url"] = f"{self.ws_url}/resume"
        return ready

    async def _gateway_bot(self, request: web.Request) -> web.Response:
        self.bot_requests.append({name.lower(): value for name, value in request.headers.items()})
        if request.headers.get("Authorization") != f"Bot {self.token}":
            return web.json_response({"message": "401: Unauthorized", "code": 0}, status=401)
        return web.json_response(fixture("discord_gateway/gateway_bot.json", url=f"{self.ws_url}/gateway"))

    async def _callback(self, request: web.Request) -> web.Response:
        """Create Interaction Response: 204 No Content, as Discord answers without `with_response`."""
        headers = {name.lower(): value for name, value in request.headers.items()}
        self.callbacks.append((request.raw_path, headers, await request.json()))
        return web.Response(status=204)

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        socket = GatewaySocket(ws, request)
        self.overlaps += any(not other.closed.is_set() for other in self.opened)
        self.opened.append(socket)
        await self.sockets.put(socket)
        await socket.serve()
        return ws
