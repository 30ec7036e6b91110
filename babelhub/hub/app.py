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
import math
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec
from aiohttp import web
from nats.aio.client import Client
from nats.js.kv import KeyValue

import babelhub
from babelhub.actors.connection import ConnectionActor, RawDelivery
from babelhub.actors.conversation import ConversationActor, ConversationMessage
from babelhub.actors.runtime import ActorSystem
from babelhub.errors import ConfigError
from babelhub.hub.consumers import MAX_ACK_PENDING, SETUP_TIMEOUT, Consumers
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
    installed_sources,
    load_api,
    load_source,
    load_transport,
)
from babelhub.redaction import SecretMask
from babelhub.services import config as cfg
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
from babelhub.services.managed import ConnectionStore, ManagedRecord, decode_record
from babelhub.services.outbox import Outbox
from babelhub.services.ownership import Ownership, lease_bucket, member_id
from babelhub.services.publisher import Publisher
from babelhub.services.rendering import Renderer
from babelhub.services.rest import Rate, RateLimits, openapi
from babelhub.services.scheduling import Scheduler
from babelhub.services.secretbox import SealedWrongly, SecretBox, master_keys
from babelhub.services.supervise import TaskHealth, supervise
from babelhub.services.telemetry import Metrics, mask_logs, setup_tracing
from babelhub.services.templates import Templates
from babelhub.services.tenants import Tenants

__all__ = ["Hub"]

log = logging.getLogger("babelhub.hub")

CANCEL_AGAIN_SECONDS = 0.5
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
        self._client: aiohttp.ClientSession | None = None
        self._applied: dict[str, int] = {}
        """The revision of each connection made over the API that this process serves as it is now."""
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
        box = self._secret_box(mask)
        stack.callback(mask_logs(mask))
        setup_tracing(settings.tracing)
        nc = await self.link.open(stack, users)
        if self.link.server is not None:
            self.spawn("embedded-nats-watch", self.link.watch_server)
        js = nc.jetstream()
        publisher = Publisher(nc, js)
        check_body_limit(settings.max_body_bytes, publisher.max_payload)
        # (a context of its own: answers may be slow while several hubs start on one cluster)
        await provision(nc.jetstream(timeout=SETUP_TIMEOUT), self.subjects, settings.dedup_window_seconds,
                        settings.replicas)
        tenants = Tenants(await js.key_value(self.subjects.bucket("tenants")), self.config.tenants)
        if users:  # the embedded server admits the NATS users of tenants made at run time too
            tenants.on_change = functools.partial(self._admit_tenants, tenants, mask)
        await tenants.load()
        client = await stack.enter_async_context(aiohttp.ClientSession())
        dead_letters = DeadLetters(publisher, self.subjects, self.metrics, mask)
        ctx = HubContext(nats=nc, js=js, subjects=self.subjects,
                         snapshots=await js.key_value(self.subjects.bucket("conversations")),
                         dead_letters=dead_letters, metrics=self.metrics, publisher=publisher,
                         connections=self._build_connections(client, publisher), mask=mask)
        store = ConnectionStore(await js.key_value(self.subjects.bucket("connections")), box)
        await self._load_managed(store, ctx)
        consumers = Consumers(ctx, tenants.ids, settings.ack_wait_seconds,
                              settings.lease_seconds / 4, self.connection_actors, self.conversations)
        leases = await lease_bucket(js, self.subjects, settings.lease_seconds, settings.replicas)
        ownership = Ownership(leases, member_id(), settings.partitions, settings.lease_seconds, work=consumers)
        ctx.ownership = ownership
        ctx.scheduler = Scheduler(await js.key_value(self.subjects.bucket("scheduled")), publisher, self.subjects,
                                  ctx.holds, lambda: ctx.clock())
        ingest = Ingest(publisher, self.subjects, dead_letters)
        ctx.renderer = Renderer(Templates(await js.key_value(self.subjects.bucket("templates"))),
                                lambda connection: _template_format_of(ctx, connection))
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
        self.spawn("managed-connections", functools.partial(self._follow_managed, store))
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

    async def _admit_tenants(self, tenants: Tenants, mask: SecretMask) -> None:
        """The tenants changed: the embedded server admits exactly their NATS users from now on (and their
        passwords are masked like the others')."""
        users = self._embedded_users(tenants.ids)
        mask.learn(user.password for user in users)
        await self.link.admit(users)

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
        self._client = client
        services: dict[str, ConnectionService] = {}
        for index, settings in enumerate(self.config.connections):
            try:
                services[settings.id] = self._connection_service(settings)
            except LookupError as exc:
                raise ConfigError(f"$.connections[{index}].channel: {exc}") from None
        return services

    def _connection_service(self, settings: cfg.Connection, *, disabled: bool = False) -> ConnectionService:
        """The service of one connection (LookupError when its channel is not installed)."""
        assert self._client is not None
        most = self.config.hub.circuit_max_backoff_seconds
        policy = RetryPolicy(base_delay=min(RetryPolicy().base_delay, most), max_delay=most,
                             timeout=self.config.hub.call_timeout_seconds)
        return ConnectionService(settings, channel_codec(settings.channel), self._client, self.metrics, policy,
                                 send_deadline=self.config.send_deadline(settings), disabled=disabled)

    # ------------------------------------------------------------------ connections made over the API

    def _secret_box(self, mask: SecretMask) -> SecretBox:
        """The master keys that seal the secrets of connections made over the API (none: such connections
        cannot have secrets, and are refused naming `hub.master_key`); their text is masked like any secret."""
        settings = self.config.hub
        try:
            texts, keys = master_keys(settings.master_key, settings.master_key_file, settings.previous_master_key_file)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        mask.learn(texts.splitlines())
        return SecretBox(keys)

    async def _load_managed(self, store: ConnectionStore, ctx: HubContext) -> None:
        """The connections made over the API, served from the start like the config file's."""
        for stored in await store.all():
            connection_id = stored.record.connection.id
            service = self._managed_service(store, stored.record, ctx.mask)
            if service is not None and self.config.connection(connection_id) is None:
                ctx.connections[connection_id] = service
                self._applied[connection_id] = stored.revision

    async def _follow_managed(self, store: ConnectionStore, health: TaskHealth) -> None:
        """Apply every change of the connections bucket to this running hub, as it comes (a watch: what
        is there first, then each change). A restarted watch applies only what it has not applied yet."""
        watcher = await store.kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:  # what the bucket held is applied: from here on, changes as they come
                    health.ok()
                    continue
                if entry.revision is not None and self._applied.get(entry.key) == entry.revision:
                    continue
                await self._apply_managed(store, entry.key, _record_of(entry))
                if entry.revision is not None:
                    self._applied[entry.key] = entry.revision
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]

    async def _apply_managed(self, store: ConnectionStore, connection_id: str, record: ManagedRecord | None) -> None:
        """Serve connection `connection_id` as `record` says (None: deleted) from now on: its service is
        replaced, and the sources serving it are told. A record whose secrets do not open here keeps what
        runs (a hub without the key that sealed them, during a rotation)."""
        if self.config.connection(connection_id) is not None:
            log.warning("connection %s is in the config file, which wins: its record made over the API is ignored",
                        connection_id)
            return
        ctx = self.ctx
        new = None if record is None else self._managed_service(store, record, ctx.mask)
        if record is not None and new is None:
            return
        old = ctx.connections.pop(connection_id, None)
        if new is not None:
            ctx.connections[connection_id] = new
        if old is not None:
            old.circuit.stop()  # calls waiting on the old one's circuit give up; their messages come again
        serving = _source_name(new) if new is not None else ""
        for source in self._started().sources:
            if source.name == serving:
                await source.connection_changed(connection_id, new)
            elif connection_id in source.connections:
                await source.connection_changed(connection_id, None)
        log.info("connection %s %s", connection_id, "deleted" if new is None else
                 "disabled" if new.disabled else f"served through the {serving} source")

    def _managed_service(self, store: ConnectionStore, record: ManagedRecord,
                         mask: SecretMask) -> ConnectionService | None:
        try:
            settings = store.open(record)
        except SealedWrongly as exc:
            log.error("%s; the hub serves it as before until it holds that key (hub.master_key_file, "
                      "hub.previous_master_key_file)", exc)
            return None
        mask.learn(settings.secrets.values())
        try:
            return self._connection_service(settings, disabled=record.disabled)
        except LookupError as exc:
            log.error("connection %s cannot be served by this process: %s", settings.id, exc)
            return None

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
        for name in installed_sources():  # built even without connections: ones made over the API may come
            source = load_source(name)
            if source.follows_changes:
                chosen[name] = (source, [])
        for index, connection in enumerate(services.ctx.connections.values()):
            name = _source_name(connection)
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
        self._stack.callback(self._stop_circuits)

    def _stop_circuits(self) -> None:
        """Release the sends waiting on a circuit: of every connection served when the hub stops, those
        made over the API while it ran too."""
        for connection in self.ctx.connections.values():
            connection.circuit.stop()

    def spawn(self, name: str, run: Callable[[TaskHealth], Coroutine[Any, Any, None]]) -> asyncio.Task[None]:
        """Start a supervised background task: restarted with backoff if it fails, shown in `/readyz`,
        cancelled when the hub stops."""
        health = self.task_health[name] = TaskHealth(name)
        task = asyncio.create_task(supervise(health, run), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(functools.partial(self._forget_health, name, health))
        return task

    def _forget_health(self, name: str, health: TaskHealth, task: asyncio.Task[None]) -> None:
        """A task its owner cancelled (a deleted connection's poller) leaves `/readyz`."""
        if task.cancelled() and self.task_health.get(name) is health and not self._stopping:
            del self.task_health[name]

    @staticmethod
    async def _hand_over(rounds: asyncio.Task[None], ownership: Ownership) -> None:
        """Graceful stop: no more rounds, then every partition's work ends and its lease is given back,
        so the other processes take over at once instead of after `hub.lease_seconds`."""
        ownership.closing = True  # rounds that outlive their cancellation do nothing more
        await _cancel_until_done({rounds}, timeout=ownership.ttl)
        await ownership.release()

    async def _cancel_tasks(self) -> None:
        await _cancel_until_done(set(self._tasks))

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


async def _cancel_until_done(tasks: set[asyncio.Task[None]], timeout: float | None = None) -> None:
    """Cancel `tasks`, and again those still running a moment later, until they end (or `timeout` has
    passed). A cancellation can be lost: nats-py swallows one that lands in its flush (a publish or an
    unsubscribe returns normally), as does Python 3.11's `wait_for` when its future completes at that
    moment, and a loop that went on after it would hold the hub's stop (for ever, or until `timeout`)."""
    loop = asyncio.get_running_loop()
    deadline = math.inf if timeout is None else loop.time() + timeout
    pending = tasks
    while pending and (left := deadline - loop.time()) > 0:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(CANCEL_AGAIN_SECONDS, left))


def _source_name(connection: ConnectionService) -> str:
    """The inbound source serving `connection`: its mode, or its channel's own."""
    return connection.settings.mode or connection.codec.inbound


def _record_of(entry: KeyValue.Entry) -> ManagedRecord | None:
    """The record a watched entry holds; None when it was deleted (or is unreadable: not served)."""
    if entry.operation in ("DEL", "PURGE") or not entry.value:
        return None
    try:
        return decode_record(entry.value)
    except msgspec.ValidationError as exc:
        log.error("connection %s: its stored record is unreadable (%s); it is not served", entry.key, exc)
        return None


def _url_password(value: str) -> str:
    """The password in `value` when it is a URL that holds one, else ""."""
    try:
        return urlsplit(value).password or "" if "://" in value else ""
    except ValueError:  # not a URL after all (an unbalanced "[" in a token)
        return ""


def _template_format_of(ctx: HubContext, connection_id: str) -> str | None:
    connection = ctx.connections.get(connection_id)
    return connection.codec.capabilities.template_format if connection is not None else None
