"""The `polling` inbound source: the hub long-polls channels that offer it (Telegram `getUpdates`)
instead of being called, for hosts without a public URL.

Each connection gets one supervised task, which polls only while this process holds the connection's
partition (`Services.ownership`), so that one process at a time polls it. Its cursor (the channel's
offset) is kept in the `cursors` KV bucket, written only after the records it covers are stored, so a
restart neither skips nor (beyond JetStream's dedup window) repeats a delivery. A channel that does
not answer is retried with backoff; anything else ends the task, and its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

import aiohttp
import msgspec
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from babelhub.errors import DecodeError, PayloadTooLarge
from babelhub.plugins import InboundSource, Services
from babelhub.services.connections import ConnectionService
from babelhub.services.delivery import perform
from babelhub.services.supervise import TaskHealth

__all__ = ["Pollers"]

log = logging.getLogger("babelhub.polling")

_POLL_TIMEOUT = 25.0
"""Seconds a long poll waits for updates on the channel's side, unless `options.poll_timeout` says."""
_MAX_PAUSE = 30.0


class Pollers(InboundSource):
    """One long-poll loop per connection whose mode is `polling`."""

    name = "polling"
    follows_changes = True

    def __init__(self, connections: list[ConnectionService], services: Services) -> None:
        super().__init__(connections, services)
        self._pollers: dict[str, asyncio.Task[None]] = {}

    @classmethod
    def check(cls, connection: ConnectionService) -> str:
        if connection.codec.poll_request(connection.encode_context(to=""), "") is None:
            return f"channel {connection.channel} cannot be polled; use mode = \"webhook\""
        return ""

    def address(self, connection: ConnectionService, http_url: str) -> str:
        return "polling the channel"

    async def start(self) -> None:
        for connection in self.connections.values():
            self._start_poller(connection)

    def _start_poller(self, connection: ConnectionService) -> None:
        if not connection.disabled:
            self._pollers[connection.id] = self.services.spawn(f"poller:{connection.id}",
                                                               functools.partial(self._poll, connection))

    async def connection_changed(self, connection_id: str, connection: ConnectionService | None) -> None:
        """The connection's poller ends (a poll under way is cancelled: its cursor was not moved, so
        nothing is skipped), then one polls with the new settings, unless it is deleted or disabled."""
        await super().connection_changed(connection_id, connection)
        poller = self._pollers.pop(connection_id, None)
        if poller is not None:
            poller.cancel()
            await asyncio.wait([poller])
        if connection is not None:
            self._start_poller(connection)

    async def _poll(self, connection: ConnectionService, health: TaskHealth) -> None:
        """Poll `connection` while this process holds its partition, and record each delivery like a
        webhook, until cancelled. The cursor is read afresh each time the partition is taken: another
        process may have moved it meanwhile."""
        ctx = self.services.ctx
        cursors = await ctx.js.key_value(ctx.subjects.bucket("cursors"))
        ownership = self.services.ownership
        partition = ctx.subjects.partition(connection.tenant, connection.id)
        while True:
            while not ownership.owns(partition):  # another hub process polls it
                health.ok()
                await asyncio.sleep(ownership.interval)
            try:
                cursor = ((await cursors.get(connection.id)).value or b"").decode()
            except NotFoundError:  # never polled before
                cursor = ""
            await self._poll_while_owned(connection, health, cursors, cursor, partition)

    async def _poll_while_owned(self, connection: ConnectionService, health: TaskHealth, cursors: KeyValue,
                                cursor: str, partition: int) -> None:
        encode_context = connection.encode_context(to="")
        timeout = float(connection.settings.options.get("poll_timeout", _POLL_TIMEOUT)) + 10
        failures = 0
        while self.services.ownership.owns(partition):
            request = connection.codec.poll_request(encode_context, cursor)
            assert request is not None  # `check` refused the connection at start otherwise
            try:
                response = await perform(self.services.http, request, timeout)
                result = connection.codec.parse_poll(request, response, cursor)
            except (aiohttp.ClientError, TimeoutError, DecodeError) as exc:
                result = None
                log.warning("%s: poll failed: %r", connection.id, exc)
            if result is None or result.error is not None:
                failures += 1
                await asyncio.sleep(min(_MAX_PAUSE, 0.5 * 2**failures))
                continue
            failures = 0
            health.ok()
            received_at = time.time()
            for record in result.records:
                record = msgspec.structs.replace(record, received_at=received_at)
                with contextlib.suppress(DecodeError, PayloadTooLarge):  # parked in the dead-letter stream by record()
                    await self.services.ingest.record(connection, record)
            if result.cursor != cursor:
                cursor = result.cursor
                await cursors.put(connection.id, cursor.encode())
