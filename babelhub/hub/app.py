"""The hub process: `async with Hub(config) as hub:` owns every task, socket and child process.

`Hub` only wires parts together; each part is a module of its own: the NATS link (`link.py`), the
JetStream consumers that feed the actors (`consumers.py`), the HTTP server (`http.py`), the actor
systems (`babelhub.actors`), and the plug-ins chosen by name in the config — one processor transport
per `[[processors]]` entry, one inbound source per connection mode, and every installed API
(`babelhub.plugins`).

Start order: NATS (embedded or external) → streams and buckets → connections → plug-ins (built, routes
mounted, started) → actor systems → partition ownership (a first round takes this process's partitions
and starts their consumers) → HTTP listener. Every step registers its own undoing on one exit stack, so
stopping runs the reverse, in the steps docs/architecture.md names: readiness off → stop listening →
hand the partitions over (their consumers stop, their actors finish, their leases are given back) →
stop the shared consumers (unacked records will be redelivered) → cancel background tasks →
release sends waiting on a circuit → passivate actors (drain, checkpoint, ack) → stop plug-ins (web chat
sockets close with 1001) → close the HTTP application → close the HTTP client → close NATS → stop the
embedded server.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from nats.aio.client import Client

import babelhub
from babelhub.actors.connection import ConnectionActor, RawDelivery
from babelhub.actors.conversation import ConversationActor, ConversationMessage
from babelhub.actors.runtime import ActorSystem
from babelhub.errors import ConfigError
from babelhub.hub.consumers import MAX_ACK_PENDING, Consumers
from babelhub.hub.http import HttpServer
from babelhub.hub.link import NatsLink
from babelhub.plugins import (
    Api,
    InboundSource,
    Plugin,
    ProcessorTransport,
    RestApi,
    Services,
    installed_apis,
    load_api,
    load_source,
    load_transport,
)
from babelhub.redaction import SecretMask
from babelhub.services.apikeys import ApiKeys
from babelhub.services.audit import Audit
from babelhub.services.broker import EmbeddedServer, Subjects, provision
from babelhub.services.config import Config, channel_codec
from babelhub.services.connections import ConnectionService
from babelhub.services.context import HubContext
from babelhub.services.credentials import NatsUser, hub_user, load_key, tenant_user
from babelhub.services.deadletters import DeadLetters
from babelhub.services.delivery import RetryPolicy
from babelhub.services.history import MessageHistory
from babelhub.services.inflight import InFlight
from babelhub.services.ingest import Ingest, check_body_limit
from babelhub.services.outbox import Outbox
from babelhub.services.ownership import Ownership, lease_bucket, member_id
from babelhub.services.publisher import Publisher
from babelhub.services.rest import Rate, RateLimits, openapi
from babelhub.services.scheduling import Scheduler
from babelhub.services.supervise import TaskHealth, supervise
from babelhub.services.telemetry import Metrics, mask_logs, setup_tracing
from babelhub.services.tenants import Tenants

__all__ = ["Hub"]

log = logging.getLogger("babelhub.hub")

CANCEL_AGAIN_SECONDS = 1.0
"""How long a stopping hub waits for its cancelled background tasks before cancelling them again."""


@dataclass(frozen=True)
class _Running:
    """What exists only while the hub runs (made in `start`)."""

    ctx: HubContext
    ingest: Ingest
    outbox: Outbox
    consumers: Consumers
    ownership: Ownership
    services: Services
    transports: list[ProcessorTransport]
    sources: list[InboundSource]
    apis: list[Api]

    @property
    def plugins(self) -> list[Plugin]:
        return [*self.transports, *self.sources, *self.apis]


class Hub:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.subjects = Subjects(config.hub.subject_prefix, config.hub.partitions)
        self.metrics = Metrics()
        self.link = NatsLink(config.hub)
        self.http = HttpServer(config.hub)
        self.ready = False
        self.task_health: dict[str, TaskHealth] = {}
        settings = config.hub
        self.conversations: ActorSystem[ConversationMessage] = ActorSystem(
            "conversation", lambda key: ConversationActor(key, self.ctx), mailbox_size=settings.mailbox_size,
            idle_seconds=settings.idle_seconds, max_active=settings.max_active_actors)
        self.connection_actors: ActorSystem[RawDelivery] = ActorSystem(
            "connection", lambda key: ConnectionActor(key, self.ctx),
            # A connection actor only decodes, and one serves all of its connection's conversations: its
            # mailbox takes whatever the raw consumers may hold (`max_ack_pending`), so it never turns
            # records away.
            mailbox_size=MAX_ACK_PENDING, idle_seconds=settings.idle_seconds)
        self.metrics.watch_actors("conversation", lambda: self.conversations.active, self.conversations.mailbox_depth)
        self.metrics.watch_actors("connection", lambda: self.connection_actors.active,
                                  self.connection_actors.mailbox_depth)
        self._running: _Running | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stack = AsyncExitStack()
        self._stopping = False

    async def __aenter__(self) -> Hub:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ----------------------------------------------------------------------- what start() makes

    @property
    def ctx(self) -> HubContext:
        return self._started().ctx

    @property
    def ingest(self) -> Ingest:
        return self._started().ingest

    @property
    def outbox(self) -> Outbox:
        return self._started().outbox

    @property
    def services(self) -> Services:
        """What the hub hands its plug-ins (the API keys among them)."""
        return self._started().services

    @property
    def inflight(self) -> InFlight:
        return self._started().consumers.inflight

    @property
    def publisher(self) -> Publisher:
        return self.ctx.publisher

    @property
    def dead_letters(self) -> DeadLetters:
        return self.ctx.dead_letters

    @property
    def nc(self) -> Client:
        return self.link.nc

    @property
    def nats_url(self) -> str:
        return self.link.url

    @property
    def server(self) -> EmbeddedServer | None:
        """The embedded nats-server, when the hub started one."""
        return self.link.server

    @property
    def nats_lost(self) -> asyncio.Event:
        """Set when NATS is gone for good while the hub runs; `babelhub run` then exits non-zero."""
        return self.link.lost

    @property
    def http_url(self) -> str:
        return self.http.url

    def addresses(self) -> dict[str, str]:
        """Each connection's id, and where its traffic comes in (for the start-up banner)."""
        return {connection_id: source.address(connection, self.http_url)
                for source in self._started().sources for connection_id, connection in source.connections.items()}

    def _started(self) -> _Running:
        if self._running is None:
            raise RuntimeError("the hub is not started")
        return self._running

    # ------------------------------------------------------------------------------------ start

    async def start(self) -> None:
        stack, settings = self._stack, self.config.hub
        stack.push_async_callback(self._cancel_tasks)  # whatever runs still when a start fails half-way
        users = [] if settings.nats else self._embedded_users({tenant.id for tenant in self.config.tenants})
        mask = SecretMask(self._secret_values(users))
        stack.callback(mask_logs(mask))
        setup_tracing(settings.tracing)
        nc = await self.link.open(stack, users)
        if self.link.server is not None:
            self.spawn("embedded-nats-watch", self.link.watch_server)
        js = nc.jetstream()
        publisher = Publisher(nc, js)
        check_body_limit(settings.max_body_bytes, publisher.max_payload)
        await provision(js, self.subjects, settings.dedup_window_seconds, settings.replicas)
        tenants = Tenants(await js.key_value(self.subjects.bucket("tenants")), self.config.tenants)
        if users:  # the embedded server admits the NATS users of tenants made at run time too
            tenants.on_change = functools.partial(self._admit_tenants, tenants)
        await tenants.load()
        client = await stack.enter_async_context(aiohttp.ClientSession())
        dead_letters = DeadLetters(publisher, self.subjects, self.metrics, mask)
        ctx = HubContext(nats=nc, js=js, subjects=self.subjects,
                         snapshots=await js.key_value(self.subjects.bucket("conversations")),
                         dead_letters=dead_letters, metrics=self.metrics, publisher=publisher,
                         connections=self._build_connections(client, publisher), mask=mask)
        consumers = Consumers(ctx, tenants.ids, settings.ack_wait_seconds,
                              settings.lease_seconds / 4, self.connection_actors, self.conversations)
        leases = await lease_bucket(js, self.subjects, settings.lease_seconds, settings.replicas)
        ownership = Ownership(leases, member_id(), settings.partitions, settings.lease_seconds, work=consumers)
        ctx.ownership = ownership
        ctx.scheduler = Scheduler(await js.key_value(self.subjects.bucket("scheduled")), publisher, self.subjects,
                                  ctx.holds, lambda: ctx.clock())
        ingest = Ingest(publisher, self.subjects, dead_letters)
        outbox = Outbox(ctx, await js.key_value(self.subjects.bucket("idempotency")),
                        await MessageHistory.open(js, self.subjects))
        keys = ApiKeys(await js.key_value(self.subjects.bucket("keys")),
                       [(tenant.id, key) for tenant in self.config.tenants for key in tenant.api_keys],
                       settings.operator_key)
        services = Services(config=self.config, ctx=ctx, http=client, ingest=ingest, spawn=self.spawn,
                            consume=consumers.consume, follow=consumers.follow, ownership=ownership,
                            outbox=outbox, keys=keys, limits=RateLimits(self._tenant_rate),
                            audit=Audit(publisher, js, self.subjects), tenants=tenants)
        self.spawn("tenants-watch", tenants.watch)
        self._running = _Running(ctx, ingest, outbox, consumers, ownership, services, self._transports(services),
                                 self._sources(services), [load_api(name)(services) for name in installed_apis()])
        await self.http.mount(stack, self._routes(self._running.plugins))
        for plugin in self._running.plugins:
            await plugin.start()
            stack.push_async_callback(plugin.stop)
        self._start_actors()
        self.spawn("inflight-keepalive", consumers.inflight.keep_alive)
        stack.push_async_callback(self._cancel_tasks)
        stack.push_async_callback(consumers.stop)
        await ownership.round()  # the partitions free for this process are its own before it says ready
        await ownership.match_work()
        rounds = self.spawn("ownership", ownership.run)
        self.spawn("scheduled-messages", ctx.scheduler.run)
        stack.push_async_callback(self._hand_over, rounds, ownership)
        await self.http.listen(stack)
        self.ready = True

    async def _tenant_rate(self, tenant_id: str) -> Rate:
        settings = self.config.hub
        tenant = self.services.tenants.record(tenant_id)
        per_second = tenant.requests_per_second if tenant and tenant.requests_per_second is not None else None
        burst = tenant.burst if tenant and tenant.burst is not None else None
        return Rate(settings.requests_per_second if per_second is None else per_second,
                    settings.request_burst if burst is None else burst)

    def _embedded_users(self, tenant_ids: set[str]) -> list[NatsUser]:
        """The hub's own user (first) and one per tenant, for the embedded server."""
        key = load_key(self.config.hub.data_dir)
        return [hub_user(key), *(tenant_user(key, self.subjects, tenant) for tenant in sorted(tenant_ids))]

    async def _admit_tenants(self, tenants: Tenants) -> None:
        """The tenants changed: the embedded server admits exactly their NATS users from now on."""
        await self.link.admit(self._embedded_users(tenants.ids))

    def _secret_values(self, users: list[NatsUser]) -> list[str]:
        """Every secret the configuration holds, and the embedded server's `users`' passwords: masked
        wherever text leaves the hub."""
        values = [value for connection in self.config.connections for value in connection.secrets.values()]
        values += [value for processor in self.config.processors for value in processor.secrets.values()]
        # A password inside a secret URL (a Redis URL) may show up alone in a client's error text.
        values += [_url_password(value) for processor in self.config.processors for value in processor.secrets.values()]
        values += [key for tenant in self.config.tenants for key in tenant.api_keys]
        values += [self.config.hub.operator_key, self.config.hub.master_key]
        values += [urlsplit(url).password or "" for url in self.config.hub.nats.split(",")]
        return values + [user.password for user in users]

    def _build_connections(self, client: aiohttp.ClientSession, publisher: Publisher) -> dict[str, ConnectionService]:
        most = self.config.hub.circuit_max_backoff_seconds
        policy = RetryPolicy(base_delay=min(RetryPolicy().base_delay, most), max_delay=most,
                             timeout=self.config.hub.call_timeout_seconds)
        services: dict[str, ConnectionService] = {}
        for index, settings in enumerate(self.config.connections):
            try:
                codec = channel_codec(settings.channel)
            except LookupError as exc:
                raise ConfigError(f"$.connections[{index}].channel: {exc}") from None
            services[settings.id] = ConnectionService(
                settings, codec, client, self.metrics, policy,
                send_deadline=self.config.send_deadline(settings))
        return services

    def _transports(self, services: Services) -> list[ProcessorTransport]:
        transports: list[ProcessorTransport] = []
        for index, processor in enumerate(self.config.processors):
            try:
                transport = load_transport(processor.transport)
            except LookupError as exc:
                raise ConfigError(f"$.processors[{index}].transport: {exc}") from None
            transports.append(transport(processor, services))
        return transports

    def _sources(self, services: Services) -> list[InboundSource]:
        """One source per mode in use, each given the connections that come in through it."""
        chosen: dict[str, tuple[type[InboundSource], list[ConnectionService]]] = {}
        for index, connection in enumerate(services.ctx.connections.values()):
            name = connection.settings.mode or connection.codec.inbound
            try:
                source = load_source(name)
            except LookupError as exc:
                raise ConfigError(f"$.connections[{index}].mode: {exc}") from None
            if problem := source.check(connection):
                raise ConfigError(f"$.connections[{index}].mode: {problem}")
            chosen.setdefault(name, (source, []))[1].append(connection)
        return [source(connections, services) for source, connections in chosen.values()]

    def _start_actors(self) -> None:
        """The actor systems activate actors as messages come; what `start` sets up is their stopping:
        first the sends waiting out a channel outage end unacknowledged (the next process has them),
        then the connection actors, then the conversation actors passivate."""
        self._stack.push_async_callback(self.conversations.stop)
        self._stack.push_async_callback(self.connection_actors.stop)
        for connection in self.ctx.connections.values():
            self._stack.callback(connection.circuit.stop)

    def spawn(self, name: str, run: Callable[[TaskHealth], Coroutine[Any, Any, None]]) -> asyncio.Task[None]:
        """Start a supervised background task: restarted with backoff if it fails, shown in `/readyz`,
        cancelled when the hub stops."""
        health = self.task_health[name] = TaskHealth(name)
        task = asyncio.create_task(supervise(health, run), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    async def _hand_over(rounds: asyncio.Task[None], ownership: Ownership) -> None:
        """Graceful stop: no more rounds, then every partition's work ends and its lease is given back,
        so the other processes take over at once instead of after `hub.lease_seconds`."""
        ownership.closing = True  # (a cancellation can be lost in a wait_for finishing at that moment)
        rounds.cancel()
        await asyncio.wait([rounds], timeout=ownership.ttl)
        await ownership.release()

    async def _cancel_tasks(self) -> None:
        """Cancel every background task, and again those still running a moment later: nats-py swallows a
        cancellation that lands in its flush (a publish or an unsubscribe returns normally), and a loop
        that went on after it would hold the hub's stop for ever."""
        pending = set(self._tasks)
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=CANCEL_AGAIN_SECONDS)

    # ------------------------------------------------------------------------------------ HTTP

    def _routes(self, plugins: list[Plugin]) -> list[web.RouteDef]:
        """Every part's routes, and the hub's own: health, readiness and metrics."""
        document = openapi((e for plugin in plugins if isinstance(plugin, RestApi) for e in plugin.endpoints()),
                           babelhub.__version__)
        own = [web.get("/healthz", self._healthz), web.get("/readyz", self._readyz), web.get("/metrics", self._metrics),
               web.get("/openapi.json", functools.partial(self._openapi, document))]
        return [route for plugin in plugins for route in plugin.routes()] + own

    async def _openapi(self, document: dict[str, Any], _: web.Request) -> web.Response:
        """The OpenAPI document of every REST endpoint the installed APIs serve."""
        return web.json_response(document)

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        """200 while the hub runs, NATS is connected and no background task is failing; 503 while starting,
        stopping or reconnecting, or while a task cannot run."""
        tasks = {name: health.state for name, health in sorted(self.task_health.items())}
        tasks_ok = not any(health.failing for health in self.task_health.values())
        connected = self.nc.is_connected and not self.nats_lost.is_set()
        ready = self.ready and connected and tasks_ok
        ownership = self._running.ownership if self._running is not None else None
        return web.json_response({"ready": ready, "nats": connected, "tasks": tasks,
                                  "member": ownership.member if ownership else "",
                                  "partitions": sorted(ownership.working) if ownership else []},
                                 status=200 if ready else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    # ------------------------------------------------------------------------------------ stop

    async def stop(self) -> None:
        """Stop in the documented order; a second call (a test's, after `__aexit__`) does nothing."""
        if self._stopping:
            return
        self.ready = False
        self._stopping = self.link.stopping = True
        try:
            await self._stack.aclose()  # every step runs, also after one that fails
        except Exception:
            log.exception("error while stopping")


def _url_password(value: str) -> str:
    """The password in `value` when it is a URL that holds one, else ""."""
    try:
        return urlsplit(value).password or "" if "://" in value else ""
    except ValueError:  # not a URL after all (an unbalanced "[" in a token)
        return ""
