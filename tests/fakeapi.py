"""A local stand-in for a channel's HTTP API: a real aiohttp server on 127.0.0.1 that records every
request and answers from a script (queued replies first, then the channel's usual success answer)."""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web


class Recorded(msgspec.Struct, frozen=True, kw_only=True):
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    at: float = 0.0
    """`time.monotonic()` when it arrived."""

    def json(self) -> Any:
        return json.loads(self.body)


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    status: int = 200
    body: Any = None
    headers: dict[str, str] = {}


Responder = Callable[[Recorded], Reply]


class FakeApi:
    """`base_url` after `start()`; `requests` holds what arrived; `queue(...)` scripts the next answers;
    `responder` answers when the queue is empty (set it to what the real API returns on success)."""

    def __init__(self, responder: Responder | None = None) -> None:
        self.requests: list[Recorded] = []
        self.responder: Responder = responder or (lambda _: Reply(body={"ok": True}))
        self._queued: deque[Reply] = deque()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    def queue(self, *replies: Reply) -> None:
        self._queued.extend(replies)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        recorded = Recorded(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={name.lower(): value for name, value in request.headers.items()},
            body=await request.read(),
            at=time.monotonic(),
        )
        self.requests.append(recorded)
        reply = self._queued.popleft() if self._queued else self.responder(recorded)
        body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
        headers = {"Content-Type": "application/json", **reply.headers}
        return web.Response(status=reply.status, body=body, headers=headers)
