"""The hub process: `async with Hub(config) as hub:` owns every task, socket and child process.

Start order: NATS (embedded or external) → streams and buckets → connections → actor systems →
consumers and pollers → HTTP. Stop order is the reverse, in the steps DESIGN.md §5.10 names:
readiness off → stop listeners → stop consumers (unacked records will be redelivered) → passivate
actors (drain, checkpoint, ack) → close WebSockets (1001) → close NATS → stop the embedded server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aiohttp
import msgspec
import nats
from aiohttp import web
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from babelhub import canonical, codecs
from babelhub.actors.connection import ConnectionActor, RawDelivery
from babelhub.actors.conversation import ConversationActor, ConversationMessage, Outbound
from babelhub.actors.runtime import ActorSystem
from babelhub.codecs.base import HttpRequest
from babelhub.errors import ConfigError, DecodeError
from babelhub.hub import echo
from babelhub.hub.broker import EmbeddedServer, Subjects, provision
from babelhub.hub.config import Config
from babelhub.hub.connections import ConnectionService
from babelhub.hub.context import HubContext
from babelhub.hub.deadletters import DeadLetter, DeadLetters
from babelhub.hub.delivery import RetryPolicy, perform
from babelhub.hub.inflight import InFlight
from babelhub.hub.ingest import Ingest, webhook_routes
from babelhub.hub.telemetry import Metrics, carrier, setup_tracing, span
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
        self.nats_url = config.hub.nats
        self.http_url = ""
        self.ready = False
        self._tasks: set[asyncio.Task[None]] = set()
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
        setup_tracing(self.config.hub.tracing)
        settings = self.config.hub
        if not self.nats_url:
            self.server = EmbeddedServer(settings.data_dir, settings.nats_port)
            await self.server.start()
            self._cleanups.append(self.server.stop)
            self.nats_url = self.server.url
        self.nc = await nats.connect(self.nats_url, name="babelhub", max_reconnect_attempts=-1)
        self._cleanups.append(self.nc.drain)
        self.js = self.nc.jetstream()
        await provision(self.js, self.subjects, settings.dedup_window_seconds)
        self.http = aiohttp.ClientSession()
        self._cleanups.append(self.http.close)
        self.dead_letters = DeadLetters(self.js, self.subjects, self.metrics)
        self.ctx = HubContext(
            nats=self.nc,
            js=self.js,
            subjects=self.subjects,
            snapshots=await self.js.key_value(self.subjects.bucket("conversations")),
            dead_letters=self.dead_letters,
            metrics=self.metrics,
            connections=self._build_connections(),
        )
        self.ingest = Ingest(self.js, self.subjects, self.dead_letters)
        self._start_actors()
        self.sessions = WebSessions(self.ctx, self.ingest)
        await self._start_consumers()
        await self._start_http()
        self.ready = True

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
                settings, codec, self.http, self.nc, self.subjects, self.metrics, policy,
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
            lambda key: ConnectionActor(key, self.ctx, self.conversations),
            mailbox_size=settings.mailbox_size,
            idle_seconds=settings.idle_seconds,
        )
        self.metrics.watch_actors("conversation", lambda: self.conversations.active,
                                  self.conversations.mailbox_depth)
        self.metrics.watch_actors("connection", lambda: self.connection_actors.active,
                                  self.connection_actors.mailbox_depth)

    async def _start_consumers(self) -> None:
        p = self.subjects.prefix
        self.inflight = InFlight(self.config.hub.ack_wait_seconds)
        self._spawn("inflight-keepalive", self.inflight.keep_alive())
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
                self._spawn(f"poller:{connection.id}", self._poll(connection))

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

    def _spawn(self, name: str, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s died", task.get_name(), exc_info=task.exception())

    # ------------------------------------------------------------------------------- consumers

    async def _on_raw(self, msg: Msg) -> None:
        """A raw record: hand it to its connection actor (it acks when the envelopes are applied)."""
        connection_id = msg.subject.rsplit(".", 1)[-1]
        try:
            request = msgspec.msgpack.decode(msg.data, type=HttpRequest)
        except msgspec.DecodeError as exc:
            await self.dead_letters.park(DeadLetter(stage="decode", error=f"unreadable raw record: {exc}",
                                                    connection=connection_id, subject=msg.subject, body=msg.data))
            await msg.term()
            return
        ack, term = self.inflight.hold(msg)
        delivery = RawDelivery(request=request, subject=msg.subject, seq=msg.metadata.sequence.stream,
                               ack=ack, term=term, trace=dict(msg.headers or {}))
        await self.connection_actors.tell(connection_id, delivery)

    async def _on_outbound(self, msg: Msg) -> None:
        """A processor's message: check it names this subject's tenant and conversation, then route it."""
        _, tenant, _, conversation = msg.subject.split(".", 3)
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

        ack, term = self.inflight.hold(msg)

        async def failed(exc: BaseException) -> None:
            await self.dead_letters.park(DeadLetter(stage="send", error=repr(exc), tenant=tenant,
                                                    subject=msg.subject, body=msg.data))
            await term()

        # When JetStream first stored it (the send deadline's start) and where (what comes before it).
        outbound = Outbound(envelope, dict(msg.headers or {}), msg.metadata.timestamp.timestamp(),
                            msg.metadata.sequence.stream)
        await self.conversations.tell(conversation, outbound, ack, failed)

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
                await self.js.publish(self.subjects.outbound(reply.tenant, reply.conversation.id),
                                      canonical.encode(reply), headers={"Nats-Msg-Id": reply.id, **carrier()})
        await msg.ack()

    async def _poll(self, connection: ConnectionService) -> None:
        """Long-poll a channel (Telegram getUpdates) and record each delivery like a webhook."""
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
            received_at = time.time()
            for record in result.records:
                with contextlib.suppress(DecodeError):  # parked in the dead-letter stream by record()
                    await self.ingest.record(connection, msgspec.structs.replace(record, received_at=received_at))
            if result.cursor != cursor:
                cursor = result.cursor
                await cursors.put(connection.id, cursor.encode())

    # ------------------------------------------------------------------------------------ HTTP

    async def _start_http(self) -> None:
        app = web.Application(client_max_size=self.config.hub.max_body_bytes)
        app.add_routes(webhook_routes(self.ctx.connections, self.ingest, self.metrics))
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
        ready = self.ready and self.nc.is_connected
        return web.json_response({"ready": ready, "nats": self.nc.is_connected}, status=200 if ready else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    # ------------------------------------------------------------------------------------ stop

    async def stop(self) -> None:
        self.ready = False
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
