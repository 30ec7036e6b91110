"""The hub's NATS connection: to the configured server or cluster, or to an embedded nats-server that
the hub starts (with authentication) and watches.

Losing the connection is survived: nats-py reconnects (readiness is off meanwhile). When it gives up
for good, or the embedded server exits, `lost` is set: a hub without NATS must not look alive, and
`babelhub run` exits non-zero so that a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack

import nats
from nats.aio.client import Client

from babelhub.services.broker import EmbeddedServer
from babelhub.services.config import HubSettings
from babelhub.services.credentials import NatsUser, server_config
from babelhub.services.supervise import TaskHealth

__all__ = ["NatsLink", "servers"]

log = logging.getLogger("babelhub.hub")


def servers(url: str) -> list[str]:
    """`hub.nats` may name several servers of one cluster, comma-separated: nats-py takes them as a list
    (a single string would be read as one server) and reconnects to the others when one goes away."""
    return [server.strip() for server in url.split(",") if server.strip()]


class NatsLink:
    def __init__(self, settings: HubSettings) -> None:
        self.settings = settings
        self.url = settings.nats
        """The server's URL: the configured one, or the embedded server's once it runs."""
        self.server: EmbeddedServer | None = None
        self.lost = asyncio.Event()
        """Set when the connection is closed for good while the hub runs."""
        self.stopping = False
        """Set by the hub when it stops: a connection closing then is no loss."""
        self._nc: Client | None = None
        self._admitting = asyncio.Lock()

    @property
    def nc(self) -> Client:
        if self._nc is None:
            raise RuntimeError("the NATS link is not open yet")
        return self._nc

    async def open(self, stack: AsyncExitStack, users: list[NatsUser]) -> Client:
        """Start the embedded server when `users` are given (the hub's own user first), then connect;
        `stack` closes the connection, then stops the server."""
        login: dict[str, str] = {}
        if users:
            self.server = EmbeddedServer(self.settings.data_dir, self.settings.nats_port, server_config(users))
            await self.server.start()
            stack.push_async_callback(self.server.stop)
            self.url = self.server.url
            login = {"user": users[0].user, "password": users[0].password}
        self._nc = await nats.connect(
            servers(self.url), name="babelhub", max_reconnect_attempts=self.settings.nats_max_reconnect_attempts,
            disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected, closed_cb=self._on_closed,
            **login)
        stack.push_async_callback(self._close)
        return self._nc

    async def admit(self, users: list[NatsUser]) -> None:
        """Have the embedded server admit exactly `users` (the hub's own first) from now on, without a
        restart (one change at a time); nothing to do on an external server."""
        if self.server is None:
            return
        async with self._admitting:
            await self.server.reload(server_config(users))

    async def watch_server(self, health: TaskHealth) -> None:
        """The embedded nats-server is the hub's own child: once it is gone there is nothing to reconnect
        to. Runs until cancelled (a supervised task that returned would be restarted)."""
        assert self.server is not None and self.server.process is not None
        health.ok()
        code = await self.server.process.wait()
        if not self.stopping:
            log.error("the embedded nats-server exited with status %s; the hub stops", code)
            self.lost.set()
        await asyncio.get_running_loop().create_future()  # nothing left to watch

    async def _on_disconnected(self) -> None:
        if not self.stopping:
            log.warning("lost the NATS connection; reconnecting (readiness is off meanwhile)")

    async def _on_reconnected(self) -> None:
        log.info("NATS connection restored")

    async def _on_closed(self) -> None:
        """nats-py gave the connection up for good."""
        if self.stopping:
            return
        log.error("the NATS connection is closed for good (%r); the hub stops", self.nc.last_error)
        self.lost.set()

    async def _close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()
