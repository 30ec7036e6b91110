"""The hub process: `async with Hub(config) as hub:` owns every task, socket and child process.

Start order: NATS (embedded or external) → streams and buckets → connections → actor systems →
consumers and pollers → HTTP. Stop order is the reverse, in the steps DESIGN.md §5.10 names:
readiness off → stop listeners → stop consumers (unacked records will be redelivered) → passivate
actors (drain, checkpoint, ack) → close WebSockets (1001) → close NATS → stop the embedded server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec
import nats
from aiohttp import web
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from babelhub import canonical, codecs
from babelhub.actors.admission import Admission, Letter, retry_delay
from babelhub.actors.connection import ConnectionActor, RawDelivery
from babelhub.actors.conversation import ConversationActor, ConversationMessage, Outbound, actor_key
from babelhub.actors.runtime import ActorSystem
from babelhub.codecs.base import HttpRequest
from babelhub.errors import ConfigError, DecodeError, PayloadTooLarge
from babelhub.hub import echo
from babelhub.hub.bodytimeout import body_timeout
from babelhub.hub.broker import EmbeddedServer, Subjects, provision
from babelhub.hub.config import Config
from babelhub.hub.connections import ConnectionService
from babelhub.hub.context import HubContext
from babelhub.hub.credentials import NatsUser, hub_user, load_key, server_config, tenant_user
from babelhub.hub.deadletters import DeadLetter, DeadLetters
from babelhub.hub.delivery import RetryPolicy, perform
from babelhub.hub.ids import conversation_id_error, is_conversation_id
from babelhub.hub.inflight import Held, InFlight
from babelhub.hub.ingest import Ingest, check_body_limit, webhook_routes
from babelhub.hub.publisher import Publisher
from babelhub.hub.supervise import TaskHealth, supervise
from babelhub.hub.telemetry import Metrics, mask_logs, setup_tracing, span
from babelhub.redaction import SecretMask
from babelhub.sessions.websocket import WebSessions

__all__ = ["Hub"]

log = logging.getLogger("babelhub.hub")

_MAX_ACK_PENDING = 20_000


class Hub:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.subjects = Subjects(config.hub.subject_prefix)
        self.metrics = Metrics()
        self.server: EmbeddedServer | None = None
        self.nats_lost = asyncio.Event()
        """Set when the NATS connection is closed for good (reconnect attempts used up, or the embedded
        server gone) while the hub runs; `babelhub run` then exits non-zero."""
        self._stopping = False
        self.nats_url = config.hub.nats
        self.http_url = ""
        self.ready = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.task_health: dict[str, TaskHealth] = {}
        self._tenants = {tenant.id for tenant in config.tenants}
        # Per consumer: which keys have messages handed back to the server, to keep each key's order.
        self._admissions = {"raw": Admission(), "inbound": Admission(), "outbound": Admission()}
        self._subscriptions: list[JetStreamContext.PushSubscription] = []
        self._cleanups: list[Callable[[], Awaitable[Any]]] = []

    async def __aenter__(self) -> Hub:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------------------------ start

    async def start(self) -> None:
        users = [] if self.nats_url else self._embedded_users()
        self.mask = SecretMask(self._secret_values(users))
        unmask = mask_logs(self.mask)
        self._cleanups.append(_async(unmask))  # the first cleanup made, the last one run
        setup_tracing(self.config.hub.tracing)
        settings = self.config.hub
        login: dict[str, str] = {}
        if users:
            self.server = EmbeddedServer(settings.data_dir, settings.nats_port, server_config(users))
            await self.server.start()
            self._cleanups.append(self.server.stop)
            self._spawn("embedded-nats-watch", functools.partial(self._watch_embedded_server, self.server))
            self.nats_url = self.server.url
            login = {"user": users[0].user, "password": users[0].password}
        self.nc = await nats.connect(
            self.nats_url, name="babelhub", max_reconnect_attempts=settings.nats_max_reconnect_attempts,
            disconnected_cb=self._on_nats_disconnected, reconnected_cb=self._on_nats_reconnected,
            closed_cb=self._on_nats_closed, **login)
        self._cleanups.append(self._close_nats)
        self.js = self.nc.jetstream()
        self.publisher = Publisher(self.nc, self.js)
        check_body_limit(settings.max_body_bytes, self.publisher.max_payload)
        await provision(self.js, self.subjects, settings.dedup_window_seconds)
        self.http = aiohttp.ClientSession()
        self._cleanups.append(self.http.close)
        self.dead_letters = DeadLetters(self.publisher, self.subjects, self.metrics, self.mask)
        self.ctx = HubContext(
            nats=self.nc,
            js=self.js,
            subjects=self.subjects,
            snapshots=await self.js.key_value(self.subjects.bucket("conversations")),
            dead_letters=self.dead_letters,
            metrics=self.metrics,
            publisher=self.publisher,
            connections=self._build_connections(),
            mask=self.mask,
        )
        self.ingest = Ingest(self.publisher, self.subjects, self.dead_letters)
        self._start_actors()
        self.sessions = WebSessions(self.ctx, self.ingest)
        await self._start_consumers()
        await self._start_http()
        self.ready = True

    def _embedded_users(self) -> list[NatsUser]:
        """The hub's own user (first) and one per tenant, for the embedded server."""
        key = load_key(self.config.hub.data_dir)
        return [hub_user(key), *(tenant_user(key, self.subjects, tenant.id) for tenant in self.config.tenants)]

    def _secret_values(self, users: list[NatsUser]) -> list[str]:
        """Every secret the configuration holds, and the embedded server's `users`' passwords: masked
        wherever text leaves the hub."""
        values = [value for connection in self.config.connections for value in connection.secrets.values()]
        values += [key for tenant in self.config.tenants for key in tenant.api_keys]
        values += [urlsplit(url).password or "" for url in self.config.hub.nats.split(",")]
        return values + [user.password for user in users]

    def _build_connections(self) -> dict[str, ConnectionService]:
        most = self.config.hub.circuit_max_backoff_seconds
        policy = RetryPolicy(base_delay=min(RetryPolicy().base_delay, most), max_delay=most)
        services: dict[str, ConnectionService] = {}
        for index, settings in enumerate(self.config.connections):
            try:
                codec = codecs.load(settings.channel)
            except LookupError as exc:
                raise ConfigError(f"$.connections[{index}].channel: {exc}") from None
            services[settings.id] = ConnectionService(
                settings, codec, self.http, self.publisher, self.subjects, self.metrics, policy,
                send_deadline=self.config.send_deadline(settings))
        return services

    def _start_actors(self) -> None:
        settings = self.config.hub
        self.conversations: ActorSystem[ConversationMessage] = ActorSystem(
            "conversation",
            lambda key: ConversationActor(key, self.ctx),
            mailbox_size=settings.mailbox_size,
            idle_seconds=settings.idle_seconds,
            max_active=settings.max_active_actors,
        )
        self.connection_actors: ActorSystem[RawDelivery] = ActorSystem(
            "connection",
            lambda key: ConnectionActor(key, self.ctx, self.conversations, self._admissions["inbound"]),
            # A connection actor only decodes, and one serves all of its connection's conversations: its
            # mailbox takes whatever the raw consumer may hold (`max_ack_pending`), so it never turns
            # records away; a conversation that is full turns them away instead, by itself.
            mailbox_size=_MAX_ACK_PENDING,
            idle_seconds=settings.idle_seconds,
        )
        self.metrics.watch_actors("conversation", lambda: self.conversations.active,
                                  self.conversations.mailbox_depth)
        self.metrics.watch_actors("connection", lambda: self.connection_actors.active,
                                  self.connection_actors.mailbox_depth)

    async def _start_consumers(self) -> None:
        p = self.subjects.prefix
        self.inflight = InFlight(self.config.hub.ack_wait_seconds)
        self._spawn("inflight-keepalive", self.inflight.keep_alive)
        await self._consume("raw", f"{p}.*.raw.>", "decoder", self._on_raw)
        await self._consume("messages", f"{p}.*.out.>", "sender", self._on_outbound)
        for processor in self.config.processors:
            if processor.transport == "echo":
                await self._consume("messages", f"{p}.{processor.tenant}.in.>", f"processor-{processor.id}",
                                    self._on_echo)
        for connection in self.ctx.connections.values():
            if connection.settings.mode == "polling":
                if connection.codec.poll_request(connection.encode_context(to=""), "") is None:
                    raise ConfigError(f"connection {connection.id}: channel {connection.channel} cannot be polled; "
                                      "use mode = \"webhook\"")
                self._spawn(f"poller:{connection.id}", functools.partial(self._poll, connection))

    async def _consume(self, stream: str, subject: str, durable: str,
                       handler: Callable[[Msg], Coroutine[Any, Any, None]]) -> None:
        """A durable push consumer with explicit acks. nats-py runs one callback at a time per
        subscription, in stream order, so a handler that waits (a full mailbox) holds the next
        message back, and `max_ack_pending` stops the server from sending more: backpressure."""
        config = ConsumerConfig(
            durable_name=durable, filter_subject=subject, ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL, ack_wait=self.config.hub.ack_wait_seconds,
            max_ack_pending=_MAX_ACK_PENDING, flow_control=True, idle_heartbeat=5.0,
        )
        subscription = await self.js.subscribe(
            subject, durable=durable, stream=self.subjects.stream_name(stream), cb=handler, manual_ack=True,
            config=config, pending_msgs_limit=_MAX_ACK_PENDING, flow_control=True, idle_heartbeat=5.0,
        )
        self._subscriptions.append(subscription)

    def _spawn(self, name: str, run: Callable[[TaskHealth], Coroutine[Any, Any, None]]) -> None:
        """Start a supervised background task: restarted with backoff if it fails, shown in `/readyz`."""
        health = self.task_health[name] = TaskHealth(name)
        task = asyncio.create_task(supervise(health, run), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s died", task.get_name(), exc_info=task.exception())

    # ------------------------------------------------------------------------------- consumers

    async def _on_raw(self, msg: Msg) -> None:
        """A raw record: hand it to its connection actor (it acks when the envelopes are applied)."""
        tenant, connection_id = self._raw_subject(msg.subject)
        if not connection_id:
            await self._refuse(msg, "decode", f"{msg.subject[:200]!r} names no configured connection of a "
                               "configured tenant", tenant)
            return
        try:
            request = msgspec.msgpack.decode(msg.data, type=HttpRequest)
        except msgspec.DecodeError as exc:
            await self.dead_letters.park(DeadLetter(stage="decode", error=f"unreadable raw record: {exc}",
                                                    connection=connection_id, subject=msg.subject, body=msg.data))
            await msg.term()
            return
        held = self.inflight.hold(msg)
        delivery = RawDelivery(request=request, subject=msg.subject, seq=held.seq, ack=held.ack, term=held.term,
                               retry_later=functools.partial(self._retry_later, held), release=held.nak,
                               trace=dict(msg.headers or {}))
        await self._hand_over(self.connection_actors, "raw", held, Letter(connection_id, delivery))

    def _raw_subject(self, subject: str) -> tuple[str, str]:
        """The tenant and connection a raw subject names (`<prefix>.<tenant>.raw.<channel>.<connection>`);
        an empty connection when they are not a configured pair."""
        tokens = subject.removeprefix(self.subjects.prefix + ".").split(".")
        tenant = tokens[0] if tokens[0] in self._tenants else ""
        if len(tokens) != 4 or not tenant:
            return tenant, ""
        connection = self.ctx.connections.get(tokens[3])
        if connection is None or connection.tenant != tenant or connection.channel != tokens[2]:
            return tenant, ""
        return tenant, connection.id

    async def _on_outbound(self, msg: Msg) -> None:
        """A processor's message: check it names this subject's tenant and conversation, then route it."""
        tokens = msg.subject.removeprefix(self.subjects.prefix + ".").split(".")
        tenant = tokens[0] if tokens[0] in self._tenants else ""
        if not tenant:
            await self._refuse(msg, "processor", f"{tokens[0][:64]!r} is not a configured tenant")
            return
        conversation = ".".join(tokens[2:])
        if not is_conversation_id(conversation):
            await self._refuse(msg, "processor", conversation_id_error(conversation), tenant)
            return
        try:
            envelope = canonical.decode(msg.data)
            if envelope.tenant != tenant or envelope.conversation.id != conversation:
                raise DecodeError(f"the subject names tenant {tenant!r} and conversation {conversation!r}",
                                  path="$.conversation.id" if envelope.tenant == tenant else "$.tenant")
        except DecodeError as exc:
            await self.dead_letters.park(DeadLetter(stage="processor", error=exc.reason, path=exc.path,
                                                    tenant=tenant, subject=msg.subject, body=msg.data))
            await msg.term()
            return

        held = self.inflight.hold(msg)

        async def failed(exc: BaseException) -> None:
            await self.dead_letters.park(DeadLetter(stage="send", error=repr(exc), tenant=tenant,
                                                    subject=msg.subject, body=msg.data))
            await held.term()

        # Keyed by the subject's tenant: naming another tenant's conversation id reaches an empty actor.
        # When JetStream first stored it (the send deadline's start) and where (what comes before it).
        outbound = Outbound(envelope, dict(msg.headers or {}), msg.metadata.timestamp.timestamp(),
                            msg.metadata.sequence.stream)
        await self._hand_over(self.conversations, "outbound", held,
                              Letter(actor_key(tenant, conversation), outbound, held.ack, failed, held.nak))

    async def _refuse(self, msg: Msg, stage: str, error: str, tenant: str = "") -> None:
        """A message whose subject names nothing of ours: kept in the dead-letter stream, never redelivered."""
        await self.dead_letters.park(DeadLetter(stage=stage, error=error, tenant=tenant, subject=msg.subject,
                                                body=msg.data))
        await msg.term()

    async def _hand_over(self, system: ActorSystem[Any], consumer: str, held: Held, letter: Letter[Any]) -> None:
        """Queue a consumed message for its actor without waiting: when the actor's mailbox is full (or
        an earlier message of its key is still out), the message goes back to the server for later."""
        if not self._admissions[consumer].offer(system, held.seq, [letter]):
            await self._retry_later(held)

    async def _retry_later(self, held: Held) -> None:
        await held.nak(retry_delay(held.deliveries))

    async def _on_echo(self, msg: Msg) -> None:
        """The built-in echo processor: what an app on NATS does, in a few lines."""
        try:
            inbound = canonical.decode(msg.data)
        except DecodeError:
            await msg.term()
            return
        with span("processor.echo", dict(msg.headers or {})):
            reply = echo.reply_to(inbound)
            if reply is not None:
                subject, payload = self.subjects.outbound(reply.tenant, reply.conversation.id), canonical.encode(reply)
                try:
                    await self.publisher.publish(subject, payload, dedup=(reply.id,))
                except PayloadTooLarge as exc:
                    await self.dead_letters.park(DeadLetter(stage="processor", error=str(exc), tenant=reply.tenant,
                                                            subject=subject, body=payload))
        await msg.ack()

    async def _poll(self, connection: ConnectionService, health: TaskHealth) -> None:
        """Long-poll a channel (Telegram getUpdates) and record each delivery like a webhook. A channel
        that does not answer is retried here; anything else ends the task, and its supervisor restarts it."""
        cursors = await self.js.key_value(self.subjects.bucket("cursors"))
        try:
            cursor = ((await cursors.get(connection.id)).value or b"").decode()
        except NotFoundError:  # never polled before
            cursor = ""
        ctx = connection.encode_context(to="")
        timeout = float(connection.settings.options.get("poll_timeout", 25)) + 10
        failures = 0
        while True:
            request = connection.codec.poll_request(ctx, cursor)
            assert request is not None  # checked when the hub started
            try:
                response = await perform(self.http, request, timeout)
                result = connection.codec.parse_poll(request, response, cursor)
            except (aiohttp.ClientError, TimeoutError, DecodeError) as exc:
                result = None
                log.warning("%s: poll failed: %r", connection.id, exc)
            if result is None or result.error is not None:
                failures += 1
                await asyncio.sleep(min(30.0, 0.5 * 2**failures))
                continue
            failures = 0
            health.ok()
            received_at = time.time()
            for record in result.records:
                with contextlib.suppress(DecodeError, PayloadTooLarge):  # parked in the dead-letter stream by record()
                    await self.ingest.record(connection, msgspec.structs.replace(record, received_at=received_at))
            if result.cursor != cursor:
                cursor = result.cursor
                await cursors.put(connection.id, cursor.encode())

    # ------------------------------------------------------------------------------------ HTTP

    async def _start_http(self) -> None:
        app = web.Application(client_max_size=self.config.hub.max_body_bytes,
                              middlewares=[body_timeout(self.config.hub.body_timeout_seconds)])
        app.add_routes(webhook_routes(self.ctx.connections, self.ingest, self.metrics))
        await self.sessions.start(self.config.hub)
        app.add_routes(self.sessions.routes())
        app.add_routes([
            web.get("/healthz", self._healthz),
            web.get("/readyz", self._readyz),
            web.get("/metrics", self._metrics),
        ])
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        host, _, port = self.config.hub.http.rpartition(":")
        self.site = web.TCPSite(self.runner, host or "127.0.0.1", int(port))
        await self.site.start()
        bound = self.site._server.sockets[0].getsockname()  # type: ignore[union-attr]
        self.http_url = f"http://{bound[0]}:{bound[1]}"

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        """200 while the hub runs, NATS is connected and no background task is failing; 503 while starting,
        stopping or reconnecting, or while a task cannot run."""
        tasks = {name: health.state for name, health in sorted(self.task_health.items())}
        tasks_ok = not any(health.failing for health in self.task_health.values())
        ready = self.ready and self.nc.is_connected and tasks_ok
        return web.json_response({"ready": ready, "nats": self.nc.is_connected, "tasks": tasks},
                                 status=200 if ready else 503)

    # ------------------------------------------------------------------------------------ NATS link

    async def _on_nats_disconnected(self) -> None:
        if not self._stopping:
            log.warning("lost the NATS connection; reconnecting (readiness is off meanwhile)")

    async def _on_nats_reconnected(self) -> None:
        log.info("NATS connection restored")

    async def _on_nats_closed(self) -> None:
        """nats-py gave the connection up for good: a hub without NATS must not look alive."""
        if self._stopping:
            return
        log.error("the NATS connection is closed for good (%r); the hub stops", self.nc.last_error)
        self._lose_nats()

    async def _watch_embedded_server(self, server: EmbeddedServer, health: TaskHealth) -> None:
        """The embedded nats-server is the hub's own child: once it is gone there is nothing to reconnect to.
        Runs until `stop()` cancels it (a supervised task that returned would be restarted)."""
        process = server.process
        assert process is not None
        health.ok()
        code = await process.wait()
        if not self._stopping:
            log.error("the embedded nats-server exited with status %s; the hub stops", code)
            self._lose_nats()
        await asyncio.get_running_loop().create_future()  # nothing left to watch

    def _lose_nats(self) -> None:
        self.ready = False
        self.nats_lost.set()

    async def _close_nats(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    # ------------------------------------------------------------------------------------ stop

    async def stop(self) -> None:
        """Stop in the documented order; a second call (a test's, after `__aexit__`) does nothing."""
        if self._stopping:
            return
        self.ready = False
        self._stopping = True
        if getattr(self, "site", None) is not None:
            await self.site.stop()
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for connection in getattr(getattr(self, "ctx", None), "connections", {}).values():
            connection.circuit.stop()  # sends waiting out an outage end unacknowledged: the next process has them
        for system in (getattr(self, "connection_actors", None), getattr(self, "conversations", None)):
            if system is not None:
                await system.stop()
        if getattr(self, "sessions", None) is not None:
            await self.sessions.close_all()
        if getattr(self, "runner", None) is not None:
            await self.runner.cleanup()
        while self._cleanups:
            cleanup = self._cleanups.pop()
            try:
                await cleanup()
            except Exception:
                log.exception("error while stopping")


def _async(function: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def call() -> None:
        function()

    return call
