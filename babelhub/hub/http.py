"""The hub's HTTP server: every part's routes mounted on one aiohttp application, behind the limits
every request gets (`hub.max_body_bytes`, `hub.body_timeout_seconds`)."""

from __future__ import annotations

from contextlib import AsyncExitStack

from aiohttp import web

from babelhub.hub.bodytimeout import body_timeout
from babelhub.services.config import HubSettings

__all__ = ["HttpServer"]


class HttpServer:
    def __init__(self, settings: HubSettings) -> None:
        self.settings = settings
        self.url = ""
        """`http://host:port` once listening (the port the OS gave when `hub.http` names port 0)."""
        self._runner: web.AppRunner | None = None

    async def mount(self, stack: AsyncExitStack, routes: list[web.RouteDef]) -> None:
        """Build the application from `routes`; `stack` tears it down (open requests and sockets end)."""
        app = web.Application(client_max_size=self.settings.max_body_bytes,
                              middlewares=[body_timeout(self.settings.body_timeout_seconds)])
        app.add_routes(routes)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        stack.push_async_callback(self._runner.cleanup)

    @property
    def app(self) -> web.Application:
        assert self._runner is not None, "mount() comes first"
        return self._runner.app

    async def listen(self, stack: AsyncExitStack) -> None:
        """Start accepting connections on `hub.http`; `stack` stops listening (first thing at shutdown)."""
        assert self._runner is not None, "mount() comes first"
        host, _, port = self.settings.http.rpartition(":")
        site = web.TCPSite(self._runner, host or "127.0.0.1", int(port))
        await site.start()
        stack.push_async_callback(site.stop)
        bound = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
        self.url = f"http://{bound[0]}:{bound[1]}"
