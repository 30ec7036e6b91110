"""The `connections` API: a tenant's channel connections, made, changed and deleted while the hub runs.

* `GET /v1/connections` (scope `read`): the tenant's connections, the config file's (`"managed": false`)
  and those made here (`"managed": true`).
* `POST /v1/connections` (scope `admin`): make one, with its secrets (201). They are sealed before they
  are stored (`babelhub.services.secretbox`): the hub needs a master key (`hub.master_key`) for that,
  else 409 `no_master_key`.
* `GET /v1/connections/{id}`, `PUT /v1/connections/{id}` (replace; a secret left out keeps its value, one
  given as null is removed, so a rotation sends only the secret that changes), `DELETE /v1/connections/{id}`.

A connection is checked as the config file's are (its channel installed, its secrets and options the
ones its channel declares: 400 naming the JSON path), and must come in through a source that follows
changes while the hub runs (`webhook`, `polling`; else 400 on `$.mode`). Every hub process serves the
change at once (`babelhub.hub.app` watches the bucket). Answers never hold a secret's value: each is
shown as `"********"`, with `secrets_updated_at`. The config file wins: its ids cannot be made or
changed here (409). Another tenant's connection is answered 404, as one that does not exist. Every
change is an audit event naming the secrets changed, never their values.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from aiohttp import web

from babelhub.plugins import RestApi, Services, load_source
from babelhub.services import config as cfg
from babelhub.services.addresses import api_base_problem
from babelhub.services.apikeys import Caller, utc_now
from babelhub.services.connections import ConnectionService
from babelhub.services.delivery import RetryPolicy
from babelhub.services.managed import MASKED, ConnectionStore, ManagedRecord, Stored, checked
from babelhub.services.outbox import Refusal
from babelhub.services.rest import Endpoint, decode, read_body
from babelhub.services.secretbox import SealedWrongly, SecretBox, master_keys
from babelhub.services.telemetry import Metrics

__all__ = ["ConnectionAnswer", "ConnectionBody", "ConnectionsApi"]

CHANGED: Final = "(changed)"
REMOVED: Final = "(removed)"


class ConnectionBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A connection as `POST` and `PUT` take it: `config.Connection`'s fields (its tenant is the key's)."""

    id: str = ""
    """Required by POST; PUT takes it from the path (a different one here is refused)."""
    channel: str
    mode: str = ""
    api_base: str = ""
    secrets: dict[str, str | None] = {}
    """The channel's credentials. PUT: one left out keeps its value, null removes it."""
    options: dict[str, Any] = {}
    max_rate: float | None = None
    send_deadline_seconds: float | None = None
    identities: list[str] = []
    failover: cfg.Failover | None = None
    disabled: bool = False
    """A disabled connection answers its webhooks 404, polls nothing, and fails what is sent to it."""


class ConnectionAnswer(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    tenant: str
    channel: str
    mode: str
    api_base: str
    secrets: dict[str, str]
    """Every secret's name, its value shown as "********"."""
    options: dict[str, Any]
    max_rate: float | None
    send_deadline_seconds: float | None
    identities: list[str]
    failover: cfg.Failover | None
    disabled: bool
    managed: bool
    """False for the config file's connections (changed only there)."""
    created_at: str = ""
    updated_at: str = ""
    secrets_updated_at: str = ""


class ConnectionList(msgspec.Struct, frozen=True, kw_only=True):
    data: list[ConnectionAnswer]


class ConnectionsApi(RestApi):
    name = "connections"

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self._store: ConnectionStore | None = None

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint("GET", "/v1/connections", self._list, "read", "The tenant's connections (secrets masked)",
                     answer=ConnectionList),
            Endpoint("POST", "/v1/connections", self._create, "admin", "Make a connection, with its secrets",
                     body=ConnectionBody, answer=ConnectionAnswer, status=201, errors=(409,)),
            Endpoint("GET", "/v1/connections/{id}", self._get, "read", "One connection (secrets masked)",
                     answer=ConnectionAnswer),
            Endpoint("PUT", "/v1/connections/{id}", self._replace, "admin",
                     "Replace a connection; a secret left out keeps its value, null removes it",
                     body=ConnectionBody, answer=ConnectionAnswer, errors=(409,)),
            Endpoint("DELETE", "/v1/connections/{id}", self._delete, "admin", "Delete a connection made over the API",
                     answer=ConnectionAnswer, errors=(409,)),
        ]

    async def start(self) -> None:
        ctx, settings = self.services.ctx, self.services.config.hub
        _, keys = master_keys(settings.master_key, settings.master_key_file, settings.previous_master_key_file)
        self._store = ConnectionStore(await ctx.js.key_value(ctx.subjects.bucket("connections")), SecretBox(keys))

    @property
    def store(self) -> ConnectionStore:
        if self._store is None:
            raise RuntimeError("the connections API is not started")
        return self._store

    # ------------------------------------------------------------------------------------ reading

    async def _list(self, request: web.Request, caller: Caller) -> web.Response:
        own = [_config_answer(c) for c in self.services.config.connections if c.tenant == caller.tenant]
        own += [_answer(s.record) for s in await self.store.all() if s.record.connection.tenant == caller.tenant]
        return _json(ConnectionList(data=own))

    async def _get(self, request: web.Request, caller: Caller) -> web.Response:
        connection_id = request.match_info["id"]
        configured = self.services.config.connection(connection_id)
        if configured is not None and configured.tenant == caller.tenant:
            return _json(_config_answer(configured))
        return _json(_answer((await self._own(caller, connection_id)).record))

    # ------------------------------------------------------------------------------------ changes

    async def _create(self, request: web.Request, caller: Caller) -> web.Response:
        body = await self._body(request)
        if not body.id:
            raise Refusal(400, "invalid", "a connection needs an id", "$.id")
        if self.services.config.connection(body.id) is not None:
            raise _in_config(body.id, "$.id")
        plain = self._checked(_connection(body, caller.tenant, {}), await self._others(caller.tenant, body.id))
        await self._check_api_base(plain)
        now = utc_now()
        record = ManagedRecord(connection=self._sealed(plain), disabled=body.disabled, created_at=now, updated_at=now,
                               secrets_updated_at=now if plain.secrets else "")
        await self.store.create(record)
        await self.services.audit.record(caller, caller.tenant, "connection.create", body.id,
                                         _changes(None, record, set(plain.secrets)))
        return _json(_answer(record), status=201)

    async def _replace(self, request: web.Request, caller: Caller) -> web.Response:
        connection_id = request.match_info["id"]
        stored = await self._own(caller, connection_id)
        body = await self._body(request)
        if body.id and body.id != connection_id:
            raise Refusal(400, "invalid", f"the id is {connection_id!r} (the path's); it cannot change", "$.id")
        body = msgspec.structs.replace(body, id=connection_id)
        kept = {name: value for name, value in stored.record.connection.secrets.items() if name not in body.secrets}
        others = await self._others(caller.tenant, connection_id)
        plain = self._checked(_connection(body, caller.tenant, self._opened(stored.record, kept)), others)
        await self._check_api_base(plain)
        given = {name for name, value in body.secrets.items() if value is not None}
        sealed = self.store.seal(msgspec.structs.replace(plain, secrets={
            **kept, **{name: plain.secrets[name] for name in given}}), given)
        now = utc_now()
        record = ManagedRecord(connection=sealed, disabled=body.disabled, created_at=stored.record.created_at,
                               updated_at=now, secrets_updated_at=now if body.secrets else
                               stored.record.secrets_updated_at)
        await self.store.replace(record, stored.revision)
        await self.services.audit.record(caller, caller.tenant, "connection.update", connection_id,
                                         _changes(stored.record, record, set(body.secrets)))
        return _json(_answer(record))

    def _opened(self, record: ManagedRecord, kept: dict[str, str]) -> dict[str, str]:
        """The values of the sealed secrets `kept`, for the check of the connection they stay in."""
        try:
            return self.store.open(msgspec.structs.replace(
                record, connection=msgspec.structs.replace(record.connection, secrets=kept))).secrets
        except SealedWrongly:
            raise Refusal(409, "sealed_elsewhere", "this connection's stored secrets do not open with this hub's "
                          "master key (a rotation under way?): send every secret again", "$.secrets") from None

    async def _delete(self, request: web.Request, caller: Caller) -> web.Response:
        connection_id = request.match_info["id"]
        stored = await self._own(caller, connection_id)
        await self.store.delete(connection_id, stored.revision)
        await self.services.audit.record(caller, caller.tenant, "connection.delete", connection_id)
        return _json(_answer(stored.record))

    # ------------------------------------------------------------------------------------ checks

    async def _own(self, caller: Caller, connection_id: str) -> Stored:
        """The caller's tenant's connection made over the API; 409 for its config file's, 404 otherwise."""
        configured = self.services.config.connection(connection_id)
        if configured is not None and configured.tenant == caller.tenant:
            raise _in_config(connection_id, "id")
        stored = await self.store.get(connection_id) if _plausible_id(connection_id) else None
        if stored is None or stored.record.connection.tenant != caller.tenant:
            raise Refusal(404, "not_found", f"no connection {connection_id[:80]!r}", "id")
        return stored

    async def _body(self, request: web.Request) -> ConnectionBody:
        raw = await read_body(request, self.services.config.hub.max_body_bytes)
        try:
            body = decode(raw, ConnectionBody)
        except Refusal as refusal:
            raise _secret_named(refusal, raw) from None
        # Masked from here on, whatever happens next (a log line, an error naming a value).
        self.services.ctx.mask.learn(value for value in body.secrets.values() if value is not None)
        return body

    async def _others(self, tenant: str, connection_id: str) -> list[cfg.Connection]:
        """The tenant's other connections, which a failover may name."""
        managed = [s.record.connection for s in await self.store.all()]
        every = [*self.services.config.connections, *managed]
        return [c for c in every if c.tenant == tenant and c.id != connection_id]

    async def _check_api_base(self, connection: cfg.Connection) -> None:
        if connection.api_base and (problem := await api_base_problem(
                connection.api_base, allow_private=self.services.config.hub.allow_private_api_base)):
            raise Refusal(400, "invalid", problem, "$.api_base")

    def _checked(self, connection: cfg.Connection, others: list[cfg.Connection]) -> cfg.Connection:
        """`connection` checked as the config file's are, coming through a source that follows changes."""
        checked(connection, others)
        service = ConnectionService(connection, cfg.channel_codec(connection.channel), self.services.http,
                                    Metrics(), RetryPolicy())
        mode = connection.mode or service.codec.inbound
        source = load_source(mode)
        if not source.follows_changes:
            raise Refusal(400, "invalid", f"a connection made over the API cannot come in through the {mode} "
                          "source (it serves the config file's connections only); use mode webhook or polling",
                          "$.mode")
        if problem := source.check(service):
            raise Refusal(400, "invalid", problem, "$.mode")
        if connection.secrets and not self.store.box:
            raise self._no_master_key()
        return connection

    def _sealed(self, connection: cfg.Connection) -> cfg.Connection:
        return self.store.seal(connection)

    @staticmethod
    def _no_master_key() -> Refusal:
        return Refusal(409, "no_master_key", "this hub has no master key to keep secrets with: its operator sets "
                                             "hub.master_key (BABELHUB_MASTER_KEY) or hub.master_key_file "
                                             "(`babelhub master-key new <file>`)", "$.secrets")


def _secret_named(refusal: Refusal, raw: bytes) -> Refusal:
    """msgspec calls a secret that is not text `$.secrets[...]`: the refusal names it instead (its value is
    never shown)."""
    if refusal.path != "$.secrets[...]":
        return refusal
    secrets = msgspec.json.decode(raw).get("secrets", {})
    name = next((name for name, value in secrets.items() if value is not None and not isinstance(value, str)), "")
    refusal.path = f"$.secrets.{name}" if name else "$.secrets"
    return refusal


def _plausible_id(connection_id: str) -> bool:
    """Only ids a connection could have are looked up (a KV key takes no wildcards, dots or spaces)."""
    return 0 < len(connection_id) <= 64 and all(ch.isascii() and (ch.isalnum() or ch in "_-") for ch in connection_id)


def _connection(body: ConnectionBody, tenant: str, kept: dict[str, str]) -> cfg.Connection:
    secrets = {**kept, **{name: value for name, value in body.secrets.items() if value is not None}}
    return cfg.Connection(id=body.id, tenant=tenant, channel=body.channel, mode=body.mode, api_base=body.api_base,
                          secrets=secrets, options=body.options, max_rate=body.max_rate,
                          send_deadline_seconds=body.send_deadline_seconds, identities=body.identities,
                          failover=body.failover)


def _in_config(connection_id: str, path: str) -> Refusal:
    return Refusal(409, "in_config", f"connection {connection_id!r} is in the hub's config file, which wins: it is "
                                     "changed there, not over the API", path)


def _changes(before: ManagedRecord | None, after: ManagedRecord, secrets: set[str]) -> dict[str, str]:
    """What an audit event tells of a change: fields with their new values, secrets by name only."""
    old = _fields(before) if before is not None else {}
    changes = {name: value for name, value in _fields(after).items() if old.get(name) != value}
    for name in sorted(secrets):
        changes[f"secrets.{name}"] = CHANGED if name in after.connection.secrets else REMOVED
    return changes


def _fields(record: ManagedRecord) -> dict[str, str]:
    shown = msgspec.to_builtins(msgspec.structs.replace(record.connection, secrets={}))
    shown.pop("secrets", None)
    shown["disabled"] = record.disabled
    return {name: msgspec.json.encode(value).decode() if not isinstance(value, str) else value
            for name, value in shown.items()}


def _answer(record: ManagedRecord) -> ConnectionAnswer:
    return _shown(record.connection, managed=True, disabled=record.disabled, created_at=record.created_at,
                  updated_at=record.updated_at, secrets_updated_at=record.secrets_updated_at)


def _config_answer(connection: cfg.Connection) -> ConnectionAnswer:
    return _shown(connection, managed=False, disabled=False)


def _shown(connection: cfg.Connection, **extra: Any) -> ConnectionAnswer:
    return ConnectionAnswer(id=connection.id, tenant=connection.tenant, channel=connection.channel,
                            mode=connection.mode, api_base=connection.api_base,
                            secrets=dict.fromkeys(connection.secrets, MASKED), options=connection.options,
                            max_rate=connection.max_rate, send_deadline_seconds=connection.send_deadline_seconds,
                            identities=connection.identities, failover=connection.failover, **extra)


def _json(answer: msgspec.Struct, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(answer), status=status, content_type="application/json")
