"""The hub's extension points for parts with routes: processor transports, inbound sources and APIs.

* A **processor transport** is how a tenant's processing app receives inbound envelopes and answers:
  one instance per `[[processors]]` entry, chosen by its `transport` name.
* An **inbound source** is how a channel's traffic reaches the hub: one instance per source name,
  serving every connection whose `mode` names it (a connection without a `mode` uses its codec's
  `inbound` source).
* An **API** serves clients of the hub itself, tied to no connection or processor (the client sessions
  at `/ws`): every one installed is built once.

Each is a class registered under an entry-point group (`babelhub.transports`, `babelhub.sources`, `babelhub.apis`), so
adding one is one module plus one line in `pyproject.toml`. Each is given the hub's `Services`,
contributes its HTTP routes (the hub mounts every part's routes in one place), is started after the
hub's services and before its actors, and is stopped after the actors have passivated.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal, Protocol, TypeVar

import aiohttp
import msgspec
from aiohttp import WSCloseCode, web
from nats.aio.msg import Msg

from babelhub import canonical as c
from babelhub import entrypoints
from babelhub.codecs.settings import Settings
from babelhub.errors import ConfigError, DecodeError
from babelhub.services.apikeys import ApiKeys, Caller
from babelhub.services.apikeys import Refused as KeyRefused
from babelhub.services.audit import Audit
from babelhub.services.config import SOURCES, TRANSPORTS, Config, Processor
from babelhub.services.connections import ConnectionService
from babelhub.services.context import HubContext
from babelhub.services.deadletters import DeadLetter
from babelhub.services.ingest import NATS_UNAVAILABLE, Ingest
from babelhub.services.outbox import Outbox, Refusal
from babelhub.services.ownership import Ownership
from babelhub.services.rest import Endpoint, RateLimits, Refused
from babelhub.services.routing import routed_to
from babelhub.services.supervise import TaskHealth
from babelhub.services.tenants import Tenants

__all__ = [
    "APIS",
    "SOURCES",
    "TRANSPORTS",
    "Api",
    "Consume",
    "ExplainedSocket",
    "Follow",
    "InboundSource",
    "NoSettings",
    "OnInbound",
    "Plugin",
    "ProcessorTransport",
    "RestApi",
    "Services",
    "Spawn",
    "bearer",
    "installed_apis",
    "installed_sources",
    "load_api",
    "load_source",
    "load_transport",
]

log = logging.getLogger("babelhub.plugins")

RETRY_AFTER_SECONDS: Final = 2
"""What a REST call met with NATS unavailable is told to wait."""

APIS = "babelhub.apis"
"""The entry-point group of APIs: every class registered there is built (none is chosen in the config)."""

Spawn = Callable[[str, Callable[[TaskHealth], Coroutine[Any, Any, None]]], "asyncio.Task[None]"]
"""`spawn(name, run)`: a supervised background task, restarted if it fails, shown in `/readyz`, cancelled
when the hub stops (or by its owner: cancelling the task returned ends it for good)."""

S = TypeVar("S", bound=msgspec.Struct)


class Follow(Protocol):
    """`await follow(stream, subject, durable, handler, on_leave=…)`: like `Consume`, but partition by
    partition where this process holds them (`Consumers.follow`), so a conversation's messages are handled
    by one hub process at a time, in order; `on_leave(partition)` when this process gives one up."""

    def __call__(self, stream: str, subject: str, durable: str, handler: Callable[[Msg], Coroutine[Any, Any, None]],
                 *, on_leave: Callable[[int], Awaitable[None]] | None = None) -> Awaitable[None]: ...

Consume = Callable[[str, str, str, Callable[[Msg], Coroutine[Any, Any, None]]], Awaitable[None]]
"""`await consume(stream, subject, durable, handler)`: a durable JetStream push consumer with explicit
acks, one message at a time in stream order; unsubscribed when the hub stops."""


@dataclass(frozen=True)
class Services:
    """What the hub hands every plug-in."""

    config: Config
    ctx: HubContext
    """NATS, subjects, the publisher, dead letters, metrics, the configured connections."""
    http: aiohttp.ClientSession
    """The hub's HTTP client, for calls to channels and apps."""
    ingest: Ingest
    """Durable ingest: what a source receives becomes a raw record before it is acknowledged."""
    spawn: Spawn
    consume: Consume
    follow: Follow
    ownership: Ownership
    """Which partitions this process holds: a part that must run in one process only (a connection's
    poller) runs where `owns(ctx.subjects.partition(tenant, connection))`."""
    outbox: Outbox
    """Where a processor's outbound envelopes enter the hub, whatever carried them (`Outbox.submit`)."""
    keys: ApiKeys
    """Who a REST call or a client session comes from (tenants' keys, the operator's)."""
    limits: RateLimits
    """Per-tenant and per-key request rates of the REST API (`RestApi` applies them)."""
    audit: Audit
    """Where every admin action is recorded (who, what, when; never a secret value)."""
    tenants: Tenants
    """The tenants this hub serves now: the config file's and those made at run time (kept current)."""


class ExplainedSocket(web.WebSocketResponse):
    """A plug-in's server-side WebSocket. aiohttp refuses a frame over `max_msg_size` with close code 1009
    but no reason; this one names the limit crossed (`too_big`), so a client learns what to change."""

    def __init__(self, *, too_big: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._too_big = too_big.encode("utf-8")

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        if code == WSCloseCode.MESSAGE_TOO_BIG and not message:
            message = self._too_big
        return await super().close(code=code, message=message, drain=drain)


class Plugin:
    """What every kind of plug-in share: routes to mount, and a start and a stop."""

    def routes(self) -> list[web.RouteDef]:
        """The HTTP routes this part serves (mounted by the hub in one place)."""
        return []

    async def start(self) -> None:
        """Called once, after the hub's services are up and before its actors start."""

    async def stop(self) -> None:
        """Called once, after the actors have passivated and before NATS is closed."""


class NoSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A transport without secrets or options of its own."""


OnInbound = Callable[[Msg, c.Envelope], Coroutine[Any, Any, None]]
"""Handles one inbound envelope routed to a processor; acknowledges `msg` once it is delivered."""


class ProcessorTransport(Plugin):
    """How one `[[processors]]` entry's app is reached. `Secrets` and `Options` are the Structs its
    `secrets` and `options` tables are read into (`read`)."""

    name: ClassVar[str]
    Secrets: ClassVar[type[msgspec.Struct]] = NoSettings
    Options: ClassVar[type[msgspec.Struct]] = NoSettings

    def __init__(self, processor: Processor, services: Services) -> None:
        self.processor = processor
        self.services = services

    def read(self, kind: Literal["secrets", "options"], struct: type[S]) -> S:
        """The processor's `secrets` or `options` as `struct`; ConfigError naming the path of what is
        missing, unknown or mistyped (never a secret's value)."""
        index = self.services.config.processors.index(self.processor)
        try:
            return msgspec.convert(dict(getattr(self.processor, kind)), struct)
        except msgspec.ValidationError as exc:
            reason, _, where = str(exc).partition(" - at `$")
            raise ConfigError(f"$.processors[{index}].{kind}{where.rstrip('`')}: {reason}") from None

    async def follow_inbound(self, handler: OnInbound, *,
                             on_leave: Callable[[int], Awaitable[None]] | None = None) -> None:
        """Hand `handler` the inbound envelopes routed to this processor (`babelhub.services.routing`), in
        their conversation's order: each hub process takes the conversations of the partitions it holds
        (`Services.follow`; `on_leave(partition)` when it gives one up). The others are acknowledged
        here, and an unreadable one is kept as a dead letter."""
        subjects, processor = self.services.ctx.subjects, self.processor
        await self.services.follow("messages", f"{subjects.prefix}.{processor.tenant}.in.>",
                                   f"processor-{processor.id}", functools.partial(self._routed, handler),
                                   on_leave=on_leave)

    async def _routed(self, handler: OnInbound, msg: Msg) -> None:
        try:
            envelope = c.decode(msg.data)
        except DecodeError as exc:
            await self.services.ctx.dead_letters.park(DeadLetter(
                stage="processor", error=exc.reason, path=exc.path, tenant=self.processor.tenant,
                subject=msg.subject, body=msg.data))
            await msg.term()
            return
        if not routed_to(self.processor, envelope, msg.headers):
            await msg.ack()
            return
        await handler(msg, envelope)


class InboundSource(Plugin):
    name: ClassVar[str]
    secret_settings: ClassVar[type[Settings] | None] = None
    """Secrets of its own a connection of this source may set beside its channel's (a broker's URL with
    a password): checked when the config is read, kept from the codec, masked like every secret."""
    option_settings: ClassVar[type[Settings] | None] = None
    """Options of its own a connection of this source may set beside its channel's."""
    follows_changes: ClassVar[bool] = False
    """Whether it serves connections made, changed and deleted while the hub runs (`connection_changed`):
    only such a source may serve a connection made over the API (`/v1/connections`). The hub builds one
    of each at start, with no connection if need be."""

    def __init__(self, connections: list[ConnectionService], services: Services) -> None:
        self.connections = {connection.id: connection for connection in connections}
        self.services = services

    async def connection_changed(self, connection_id: str, connection: ConnectionService | None) -> None:
        """While the hub runs, connection `connection_id` came to this source or changed (`connection`,
        perhaps `disabled`), or left it (None: deleted, or moved to another source). Kept in
        `connections`; a source that holds something per connection overrides this to follow."""
        if connection is None:
            self.connections.pop(connection_id, None)
        else:
            self.connections[connection_id] = connection

    @classmethod
    def check(cls, connection: ConnectionService) -> str:
        """Why `connection` cannot come in through this source (its channel has no way to), or ""."""
        return ""

    def address(self, connection: ConnectionService, http_url: str) -> str:
        """Where `connection`'s traffic comes in, in words for the start-up banner."""
        return f"through the {self.name} source"

    @classmethod
    def own_settings(cls, connection: ConnectionService) -> tuple[Settings | None, Settings | None]:
        """`connection`'s secrets and options of this source (`secret_settings`, `option_settings`), typed."""
        return (_declared(cls.secret_settings, connection.settings.secrets),
                _declared(cls.option_settings, connection.settings.options))


class Api(Plugin):
    """A part serving the hub's own clients (not a channel's, not a processor's): built once per hub."""

    name: ClassVar[str]

    def __init__(self, services: Services) -> None:
        self.services = services


class RestApi(Api):
    """An API of REST endpoints (`babelhub.services.rest`): each is served with the caller's key checked
    for the scope it needs, the caller's rate limits applied, and every refusal in the one error shape;
    the hub's `/openapi.json` is made of every `RestApi`'s `endpoints()`."""

    def endpoints(self) -> list[Endpoint]:
        return []

    def routes(self) -> list[web.RouteDef]:
        by_path: dict[str, dict[str, Endpoint]] = {}
        for endpoint in self.endpoints():
            by_path.setdefault(endpoint.path, {})[endpoint.method] = endpoint
        return [web.route("*", path, functools.partial(self._serve, methods)) for path, methods in by_path.items()]

    async def _serve(self, methods: dict[str, Endpoint], request: web.Request) -> web.StreamResponse:
        try:
            caller = await self._caller(request)
            endpoint = methods.get(request.method)
            if endpoint is None:
                allowed = ", ".join(methods)
                raise Refused(405, "method_not_allowed", f"{request.path} takes {allowed}", "", {"Allow": allowed})
            _check_need(caller, endpoint)
            await self.services.limits.admit(caller)
            return await endpoint.handler(request, caller)
        except Refused as refused:
            return _refusal(refused, refused.headers)
        except Refusal as refusal:
            return _refusal(refusal)
        except NATS_UNAVAILABLE as exc:
            log.warning("%s %s met NATS unavailable: %r", request.method, request.path, exc)
            return _refusal(Refusal(503, "unavailable", "the hub cannot reach its streams right now; retry later"),
                            {"Retry-After": str(RETRY_AFTER_SECONDS)})

    async def _caller(self, request: web.Request) -> Caller:
        try:
            caller = await self.services.keys.authenticate(bearer(request.headers.get("Authorization", "")))
            if not caller.operator and not self.services.tenants.known(caller.tenant):
                raise KeyRefused("the API key's tenant was deleted")
        except KeyRefused as exc:
            raise Refused(401, "unauthenticated", f"{exc}: send `Authorization: Bearer <API key>`", "",
                          {"WWW-Authenticate": "Bearer"}) from None
        return caller


def bearer(authorization: str) -> str:
    """The credential of an `Authorization: Bearer <credential>` header, or ""."""
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def _check_need(caller: Caller, endpoint: Endpoint) -> None:
    if endpoint.need == "operator":
        if not caller.operator:
            raise Refusal(403, "forbidden", "this needs the operator key (hub.operator_key)")
    elif caller.operator:
        raise Refusal(403, "forbidden", "the operator key manages tenants; it reads and sends for none: "
                                        "use a key of the tenant")
    elif not caller.may(endpoint.need):
        raise Refusal(403, "forbidden", f"this needs a key with scope {endpoint.need!r}")


def _refusal(refusal: Refusal, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(refusal.body(), status=refusal.status, headers=headers)


def _declared(struct: type[Settings] | None, given: Mapping[str, Any]) -> Settings | None:
    if struct is None:
        return None
    names = {field.encode_name for field in msgspec.structs.fields(struct)}
    return msgspec.convert({name: value for name, value in given.items() if name in names}, struct)


def load_transport(name: str) -> type[ProcessorTransport]:
    return entrypoints.load_class(TRANSPORTS, name, ProcessorTransport, "processor transport")


def load_source(name: str) -> type[InboundSource]:
    return entrypoints.load_class(SOURCES, name, InboundSource, "inbound source")


def load_api(name: str) -> type[Api]:
    return entrypoints.load_class(APIS, name, Api, "API")


def installed_apis() -> list[str]:
    return entrypoints.installed(APIS)


def installed_sources() -> list[str]:
    return entrypoints.installed(SOURCES)
