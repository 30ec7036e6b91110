"""The `redis` inbound source: canonical envelopes that other services add to a Redis stream
(`XADD <stream> * envelope <json>`) enter the hub for a connection whose mode is `redis`.

The stream is read in a consumer group (`options.group`, default `babelhub`) by the hub process that
holds the connection's partition (`Services.ownership`), as a consumer named after that process
(`Ownership.member`), one entry at a time: entries are recorded in the stream's order, as a channel's
poller records its updates. An entry is recorded as a raw record marked canonical
(`Ingest.record_canonical`, deduplicated on the envelope's native id or id) and only then acknowledged
(`XACK`); a process that dies between the two leaves the entry pending, and the next reader (or the
same one's restarted task) claims it once it has been idle for `options.claim_idle_seconds`
(`XAUTOCLAIM`) and records it again, which JetStream's dedup absorbs. An
entry without an `envelope` field, too large, or not an envelope of the connection is kept in the
dead-letter stream (stage `inject`) and acknowledged: it would fail the same way every time.

redis-py is imported when a connection uses this source, so a hub without one needs no Redis.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec

from babelhub.codecs.settings import Settings
from babelhub.errors import DecodeError, PayloadTooLarge
from babelhub.plugins import InboundSource
from babelhub.services.connections import ConnectionService
from babelhub.services.deadletters import DeadLetter
from babelhub.services.supervise import TaskHealth
from babelhub.sources.inject import INJECT_STAGE

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["ENVELOPE_FIELD", "RedisOptions", "RedisSecrets", "RedisStreams"]

log = logging.getLogger("babelhub.redis")

ENVELOPE_FIELD = b"envelope"
"""The entry's field that holds the envelope's JSON."""
_BATCH = 100
"""Entries read (or claimed) at a time."""
_MAX_BLOCK_SECONDS = 1.0


class RedisSecrets(Settings, frozen=True, kw_only=True):
    redis_url: str = ""
    """`redis://[user:password@]host:port/db` of the Redis holding the stream, here when it holds a
    password (else in `options.redis_url`)."""


class RedisOptions(Settings, frozen=True, kw_only=True):
    stream: str
    """The Redis stream other services add envelopes to (`XADD <stream> * envelope <json>`)."""
    redis_url: str = ""
    """`redis://host:port/db` of the Redis holding the stream, when it holds no password."""
    group: str = "babelhub"
    """The consumer group the hub processes read the stream in (made when missing)."""
    claim_idle_seconds: float = 30.0
    """An entry a hub process took but did not acknowledge (it died) is taken over after this long."""

    def __post_init__(self) -> None:
        # (msgspec reports these as validation errors of the option, so the config names them at load.)
        if not self.stream or not self.group:
            raise ValueError("`stream` and `group` must name a Redis stream and consumer group")
        if not 0 < self.claim_idle_seconds < float("inf"):
            raise ValueError("`claim_idle_seconds` must be more than 0")
        if urlsplit(self.redis_url).password:
            raise ValueError("a Redis URL with a password is a secret: set it as secrets.redis_url")


class RedisStreams(InboundSource):
    """One reader per connection whose mode is `redis`, in the hub process holding its partition."""

    name = "redis"
    secret_settings = RedisSecrets
    option_settings = RedisOptions

    @classmethod
    def check(cls, connection: ConnectionService) -> str:
        try:
            secrets, options = _settings(connection)
        except msgspec.ValidationError as exc:
            return f"the redis source's settings: {exc}"
        if bool(secrets.redis_url) == bool(options.redis_url):
            return "set the Redis URL once: secrets.redis_url (with a password) or options.redis_url"
        return ""

    def address(self, connection: ConnectionService, http_url: str) -> str:
        return f"canonical envelopes added to the Redis stream {_settings(connection)[1].stream!r}"

    async def start(self) -> None:
        for connection in self.connections.values():
            self.services.spawn(f"redis:{connection.id}", functools.partial(self._read, connection))

    async def _read(self, connection: ConnectionService, health: TaskHealth) -> None:
        """Record the stream's entries while this process holds the connection's partition, until
        cancelled."""
        import redis.asyncio

        secrets, options = _settings(connection)
        client: Redis = redis.asyncio.from_url(secrets.redis_url or options.redis_url)
        reader = _Reader(self, connection, client, options, self.services.ownership.member)
        ownership = self.services.ownership
        partition = self.services.ctx.subjects.partition(connection.tenant, connection.id)
        try:
            await reader.ensure_group()
            while True:
                while not ownership.owns(partition):  # another hub process reads it
                    health.ok()
                    await asyncio.sleep(ownership.interval)
                await self._read_while_owned(reader, health, options, partition)
        finally:
            await client.aclose()

    async def _read_while_owned(self, reader: _Reader, health: TaskHealth, options: RedisOptions,
                                partition: int) -> None:
        """First the entries this process took before (a restart of this task), then new ones, claiming
        every so often those a dead reader left pending."""
        await reader.take_all(await reader.read("0"))
        loop = asyncio.get_running_loop()
        next_claim = loop.time()
        # A short wait for new entries: a partition handed over is noticed soon after.
        block = min(_MAX_BLOCK_SECONDS, options.claim_idle_seconds / 2)
        while self.services.ownership.owns(partition):
            if loop.time() >= next_claim:
                await reader.claim_idle()
                next_claim = loop.time() + options.claim_idle_seconds / 2
            await reader.take_all(await reader.read(">", block=block))
            health.ok()

    async def park(self, connection: ConnectionService, origin: str, error: str, path: str, body: bytes) -> None:
        await self.services.ctx.dead_letters.park(DeadLetter(
            stage=INJECT_STAGE, error=error, path=path, tenant=connection.tenant, connection=connection.id,
            subject=origin, body=body))


class _Reader:
    """One connection's stream, read as this process's consumer."""

    def __init__(self, source: RedisStreams, connection: ConnectionService, client: Redis, options: RedisOptions,
                 consumer: str) -> None:
        self.source = source
        self.connection = connection
        self.client = client
        self.stream = options.stream
        self.group = options.group
        self.idle_ms = max(1, int(options.claim_idle_seconds * 1000))
        self.consumer = consumer

    async def ensure_group(self) -> None:
        import redis.exceptions

        try:
            await self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):  # made already, by this or another hub process
                raise

    async def read(self, after: str, block: float | None = None) -> list[tuple[Any, Any]]:
        """Entries after `after` for this consumer: `>` new ones (waiting up to `block` seconds for
        some), `0` those it took and has not acknowledged."""
        answer: Any = await self.client.xreadgroup(self.group, self.consumer, {self.stream: after}, count=_BATCH,
                                              block=None if block is None else int(block * 1000))
        return [entry for _, entries in answer or [] for entry in entries]

    async def claim_idle(self) -> None:
        """Take over and record the entries other consumers took and left unacknowledged for too long."""
        start: Any = "0-0"
        while True:
            answer: Any = await self.client.xautoclaim(self.stream, self.group, self.consumer,
                                                  min_idle_time=self.idle_ms, start_id=start, count=_BATCH)
            start, claimed = answer[0], answer[1]
            await self.take_all(claimed)
            if start in (b"0-0", "0-0"):
                return

    async def take_all(self, entries: list[tuple[Any, Any]]) -> None:
        for entry_id, fields in entries:
            await self.take(_text(entry_id), fields or {})

    async def take(self, entry_id: str, fields: dict[bytes, bytes]) -> None:
        """Record one entry (or park it), then acknowledge it. NATS errors propagate: the entry stays
        pending, and this task's restart reads it again."""
        if fields:  # (an entry deleted while pending comes back without fields: nothing to record)
            await self._record(entry_id, fields)
        await self.client.xack(self.stream, self.group, entry_id)

    async def _record(self, entry_id: str, fields: dict[bytes, bytes]) -> None:
        origin = f"redis:{self.stream}#{entry_id}"
        data = fields.get(ENVELOPE_FIELD)
        limit = self.source.services.config.hub.max_body_bytes
        if data is None:
            whole = msgspec.msgpack.encode({_text(name): value for name, value in fields.items()})
            await self.source.park(self.connection, origin, "the entry has no `envelope` field", "$", whole)
        elif len(data) > limit:
            await self.source.park(self.connection, origin, f"the envelope is {len(data)} bytes; the hub takes at "
                                   f"most {limit} (hub.max_body_bytes)", "$", data)
        else:
            try:
                await self.source.services.ingest.record_canonical(self.connection, data, origin)
            except DecodeError as exc:
                await self.source.park(self.connection, origin, exc.reason, exc.path, data)
            except PayloadTooLarge:  # parked by ingest
                pass


def _settings(connection: ConnectionService) -> tuple[RedisSecrets, RedisOptions]:
    secrets, options = RedisStreams.own_settings(connection)
    assert isinstance(secrets, RedisSecrets) and isinstance(options, RedisOptions)
    return secrets, options


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
