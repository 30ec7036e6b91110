"""The `redis` processor transport: the app reads inbound envelopes from a Redis stream and answers on
another, with a consumer group.

* **Inbound**: every inbound envelope routed to the processor is appended (XADD, trimmed to about
  `max_len` entries) to `inbound_stream` with the fields `envelope` (canonical JSON), `id`,
  `conversation`, `delivery` (the same on every redelivery: the app deduplicates on it) and `hops`
  (copy it into the answer). The JetStream message is acknowledged only once Redis took the entry;
  while Redis cannot, the same message is tried again with backoff (the server is told it is still in
  progress), so nothing is lost and the entries keep the stream's order. A delivery is appended at most
  once while its key `<inbound_stream>:delivered:<delivery>` lives (`dedup_seconds`): an entry Redis
  took whose acknowledgement was lost (Redis or the hub died in between) is not appended twice.
* **Outbound**: one supervised task per hub process reads `outbound_stream` as consumer
  `<hub member id>` of `group` (made, with the stream, if missing). Each entry's `envelope` goes to
  `Outbox.submit` with the entry's `idempotency_key` (else one made from the entry id), and is
  acknowledged (XACK) once the hub stored it; a refused one is kept as a dead letter with its JSON path,
  then acknowledged; one the hub could not store (NATS down) stays pending and is tried again. Entries
  a dead hub left pending are claimed (XAUTOCLAIM) after `claim_idle_seconds`; their idempotency key
  makes a second handling send nothing.

redis-py is imported here only: a hub without a `redis` processor never loads this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Annotated, Any

import msgspec
import nats.errors
import redis.asyncio as aioredis
from nats.aio.msg import Msg
from redis.exceptions import RedisError, ResponseError

from babelhub import canonical as c
from babelhub.errors import ConfigError
from babelhub.plugins import ProcessorTransport, Services
from babelhub.services.config import Processor
from babelhub.services.deadletters import DeadLetter
from babelhub.services.outbox import Refusal
from babelhub.services.routing import HOPS_HEADER, hops_of
from babelhub.services.supervise import TaskHealth

__all__ = ["APPEND_ONCE", "FORGET_DEPARTED", "RedisTransport"]

log = logging.getLogger("babelhub.redis")

_SCHEMES = ("redis://", "rediss://", "unix://")
_READ_COUNT = 100
"""Entries taken per read or claim: one round trip for many, few enough to settle quickly."""
_BLOCK_SECONDS = 2.0
"""How long a read waits for new entries; also how often abandoned entries are looked for at most."""
_MAX_BACKOFF = 5.0
"""Longest pause between attempts while Redis is down: it is seen back within seconds."""

APPEND_ONCE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return false end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 3))
redis.call('SET', KEYS[2], id, 'EX', ARGV[2])
return id
"""
"""XADD to KEYS[1] unless the delivery key KEYS[2] exists, then set it for ARGV[2] seconds (ARGV[1]: the
approximate MAXLEN, ARGV[3...]: field, value pairs). One script runs alone, so a retry cannot slip in
between; the key is written after the XADD, so a failed XADD leaves nothing behind."""

FORGET_DEPARTED = """
local forgotten = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['name'] ~= ARGV[3] and info['pending'] == 0 and info['idle'] > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    forgotten = forgotten + 1
  end
end
return forgotten
"""
"""Delete the consumers of group ARGV[1] on stream KEYS[1], other than ARGV[3], that hold nothing and
were last seen over ARGV[2] ms ago: the names of hub processes gone (each process reads under a name of
its own). In one script, so no consumer can read an entry between the check and the delete."""


class RedisSecrets(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    url: str
    """redis://[user:password@]host:port/db (rediss:// for TLS, unix:// for a socket)."""


class RedisOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    inbound_stream: str = ""
    """Where inbound envelopes are appended; `babelhub:<tenant>:inbound` when empty."""
    outbound_stream: str = ""
    """Where the app appends its answers; `babelhub:<tenant>:outbound` when empty."""
    group: str = "babelhub"
    """The hub processes' consumer group on `outbound_stream`."""
    max_len: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    """About how many entries `inbound_stream` keeps (XADD MAXLEN ~)."""
    claim_idle_seconds: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    """How long an outbound entry may stay pending with a consumer before another process claims it."""
    dedup_seconds: Annotated[int, msgspec.Meta(ge=1)] = 3600
    """How long a delivery is remembered, so that a redelivered inbound envelope is not appended twice."""


class RedisTransport(ProcessorTransport):
    name = "redis"
    Secrets = RedisSecrets
    Options = RedisOptions

    def __init__(self, processor: Processor, services: Services) -> None:
        super().__init__(processor, services)
        secrets, options = self.read("secrets", RedisSecrets), self.read("options", RedisOptions)
        if not secrets.url.startswith(_SCHEMES):
            index = services.config.processors.index(processor)
            raise ConfigError(f"$.processors[{index}].secrets.url: expected a redis://, rediss:// or unix:// URL")
        self.options = options
        self.inbound_stream = options.inbound_stream or f"babelhub:{processor.tenant}:inbound"
        self.outbound_stream = options.outbound_stream or f"babelhub:{processor.tenant}:outbound"
        # A read blocks for _BLOCK_SECONDS: the socket's own timeout must outlast it. RESP2: the answers'
        # shapes are the same in every redis-py version (and every Redis server).
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            secrets.url, protocol=2, socket_connect_timeout=5, socket_timeout=_BLOCK_SECONDS + 10,
            health_check_interval=30)
        self._append_once = self.redis.register_script(APPEND_ONCE)
        self._forget_departed = self.redis.register_script(FORGET_DEPARTED)
        self._redis_failures = 0

    async def start(self) -> None:
        await self.follow_inbound(self.deliver)
        self.services.spawn(f"redis-outbound:{self.processor.id}", self._serve_outbound)

    async def stop(self) -> None:
        await self.redis.aclose()

    # ------------------------------------------------------------------------------------ inbound

    def delivery_of(self, envelope: c.Envelope) -> str:
        """The id of this processor's delivery of `envelope`: the same however often it is delivered."""
        return c.stable_id("delivery", self.processor.id, envelope.id)

    async def deliver(self, msg: Msg, envelope: c.Envelope) -> None:
        """Append `envelope` to the inbound stream, trying again until Redis takes it, then acknowledge.
        It is waited for here (nats-py hands over the next message only after this one): the entries
        keep the stream's order, and while Redis is down nothing else of this processor could go."""
        delivery = self.delivery_of(envelope)
        fields: list[str | bytes] = [
            "envelope", c.encode(envelope), "id", envelope.id, "conversation", envelope.conversation.id,
            "delivery", delivery, "hops", str(hops_of(msg.headers))]
        keys = [self.inbound_stream, f"{self.inbound_stream}:delivered:{delivery}"]
        args = [self.options.max_len, self.options.dedup_seconds, *fields]
        failures = 0
        while True:
            try:
                await self._append_once(keys=keys, args=args)
                break
            except RedisError as exc:
                failures += 1
                self._redis_trouble("append to", self.inbound_stream, exc, failures)
                # Still ours: no redelivery meanwhile (if NATS is away too, a redelivery is absorbed).
                with contextlib.suppress(nats.errors.Error):
                    await msg.in_progress()
                await asyncio.sleep(_backoff(failures))
        if failures:
            log.info("processor %s: Redis takes inbound envelopes again", self.processor.id)
        await msg.ack()

    # ------------------------------------------------------------------------------------ outbound

    async def _serve_outbound(self, health: TaskHealth) -> None:
        """Read the outbound stream until cancelled, pausing with backoff while Redis is down (a Redis
        outage is the app's, not the hub's: `/readyz` stays green). NATS errors end the task; its
        supervisor restarts it, and what it held is read again from this consumer's pending entries."""
        while True:
            try:
                await self._read_outbound(health)
            except RedisError as exc:
                self._redis_failures += 1
                self._redis_trouble("read", self.outbound_stream, exc, self._redis_failures)
                await asyncio.sleep(_backoff(self._redis_failures))

    async def _read_outbound(self, health: TaskHealth) -> None:
        await self._create_group()
        loop = asyncio.get_running_loop()
        # First what this consumer read and did not settle (after a failure), then new entries.
        while entries := await self._read("0"):
            await self._settle(entries)
        self._redis_back(health)
        next_claim = 0.0
        claim_every = max(_BLOCK_SECONDS, self.options.claim_idle_seconds / 2)
        while True:
            if loop.time() >= next_claim:
                await self._claim_abandoned()
                next_claim = loop.time() + claim_every
            await self._settle(await self._read(">", block=_BLOCK_SECONDS))
            self._redis_back(health)

    async def _create_group(self) -> None:
        """The consumer group (and the stream), from the stream's start: answers the app appended
        before the hub first ran are taken too."""
        try:
            await self.redis.xgroup_create(self.outbound_stream, self.options.group, id="0", mkstream=True)
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    @property
    def consumer(self) -> str:
        return self.services.ownership.member

    async def _read(self, since: str, block: float | None = None) -> list[tuple[bytes, dict[bytes, bytes]]]:
        answer: Any = await self.redis.xreadgroup(
            self.options.group, self.consumer, {self.outbound_stream: since}, count=_READ_COUNT,
            block=int(block * 1000) if block is not None else None)
        # (RESP2: a list of [stream, entries])
        return [entry for _, entries in answer or [] for entry in entries]

    async def _claim_abandoned(self) -> None:
        """Take over the entries pending longer than `claim_idle_seconds` with any consumer (a hub that
        died before it acknowledged them), and settle them; then forget the consumers left empty."""
        start: bytes | str = "0-0"
        idle_ms = int(self.options.claim_idle_seconds * 1000)
        while True:
            answer = await self.redis.xautoclaim(self.outbound_stream, self.options.group, self.consumer,
                                                 idle_ms, start_id=start, count=_READ_COUNT)
            start, claimed = answer[0], answer[1]
            if claimed:
                log.info("processor %s: claimed %d abandoned outbound entries", self.processor.id, len(claimed))
            await self._settle(claimed)
            if start in (b"0-0", "0-0"):
                break
        # A live consumer is seen at least every _BLOCK_SECONDS (it waits in XREADGROUP that long at most).
        departed_ms = idle_ms + int(2 * _BLOCK_SECONDS * 1000)
        await self._forget_departed(keys=[self.outbound_stream], args=[self.options.group, departed_ms, self.consumer])

    async def _settle(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        for entry_id, fields in entries:
            if fields:  # no fields: deleted from the stream after it was read (XADD needs one); nothing to do
                await self._submit(entry_id, fields)
            await self.redis.xack(self.outbound_stream, self.options.group, entry_id)

    async def _submit(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """Hand one entry's envelope to the hub; a refusal is kept as a dead letter. Anything else (NATS
        cannot store it now) propagates: the entry stays pending."""
        processor = self.processor
        try:
            envelope = fields.get(b"envelope")
            if envelope is None:
                raise Refusal(400, "invalid", "the entry has no `envelope` field", "$")
            limit = self.services.config.hub.max_body_bytes
            if len(envelope) > limit:  # as a request body would be (what the app writes is not trusted more)
                raise Refusal(413, "too_large", f"the envelope is larger than the hub's limit of {limit} bytes "
                              "(hub.max_body_bytes)", "$")
            await self.services.outbox.submit(
                processor.tenant, envelope, idempotency_key=self._idempotency_key(entry_id, fields),
                origin=processor.id, hops=_hops_after(fields))
        except Refusal as refusal:
            await self.services.ctx.dead_letters.park(DeadLetter(
                stage="processor", error=f"{refusal.code}: {refusal.message}", path=refusal.path,
                tenant=processor.tenant, subject=f"redis:{self.outbound_stream}",
                headers={"redis-entry": entry_id.decode()}, body=fields.get(b"envelope", b"")))

    def _idempotency_key(self, entry_id: bytes, fields: dict[bytes, bytes]) -> str:
        given = fields.get(b"idempotency_key")
        if given is None:  # the entry itself: a second handling of it (a claim) stores nothing new
            return c.stable_id("redis", self.processor.id, self.outbound_stream, entry_id.decode())
        try:
            return given.decode()
        except UnicodeDecodeError:
            raise Refusal(400, "invalid_idempotency_key", "the idempotency_key is not UTF-8",
                          "idempotency_key") from None

    # ------------------------------------------------------------------------------------ health

    def _redis_trouble(self, doing: str, stream: str, exc: Exception, failures: int) -> None:
        """Logged once per outage (its type and words: redis-py's name the address, not the password;
        the hub's log mask hides the configured URL anyway)."""
        if failures == 1:
            log.warning("processor %s: cannot %s Redis stream %s (%s: %s); trying again with backoff",
                        self.processor.id, doing, stream, type(exc).__name__, exc)

    def _redis_back(self, health: TaskHealth) -> None:
        if self._redis_failures:
            log.info("processor %s: Redis answers again", self.processor.id)
        self._redis_failures = 0
        health.ok()


def _hops_after(fields: dict[bytes, Any]) -> int:
    """The hop count of an answer: one more than the inbound entry's `hops` it copies (0: none given)."""
    given = fields.get(b"hops")
    if not isinstance(given, bytes):
        return 0
    return hops_of({HOPS_HEADER: given.decode(errors="replace")}) + 1


def _backoff(failures: int) -> float:
    """Exponential with jitter, from 0.1 s to `_MAX_BACKOFF`."""
    return random.uniform(0.5, 1.0) * min(_MAX_BACKOFF, 0.1 * 2.0 ** min(failures, 16))
