"""The `admin` API: tenants and their API keys, and each tenant's audit trail.

With the operator key (`hub.operator_key`):

* `GET /v1/tenants`, `POST /v1/tenants` (201; body `{"id", "requests_per_second"?, "burst"?,
  "retention_days"?}`; 409 when it exists), `GET` and `DELETE /v1/tenants/{tenant}` (409 for a tenant of
  the config file, or one that still has connections or processors; its keys are revoked). The answer to
  `POST` holds the tenant's NATS user (`nats`), shown this once.
* `GET` and `POST /v1/tenants/{tenant}/keys`, `DELETE /v1/tenants/{tenant}/keys/{key}`: any tenant's keys.
* `GET /v1/tenants/{tenant}/audit`: any tenant's audit trail (a deleted one's too), and with `_hub` the
  operator's tenant events.

With a tenant's `admin` key: `GET` and `POST /v1/keys`, `DELETE /v1/keys/{key}` (its own keys; another
tenant's key id is answered 404, as one that does not exist), and `GET /v1/audit?after=<cursor>&limit=<n>`
(its audit events, oldest first, `{"data", "metadata": {"next_cursor", "has_more"}}`).

A new key's answer (201) holds the key itself (`key`), shown this once: only its digest is kept.
Every change is recorded in the audit trail (`tenant.create`, `tenant.delete`, `key.create`, `key.revoke`).
"""

from __future__ import annotations

from typing import Final

import msgspec
from aiohttp import web

from babelhub.plugins import RestApi, Services
from babelhub.services.admin import Administration, NewKey
from babelhub.services.apikeys import Caller, Scope, StoredKey
from babelhub.services.audit import HUB_TENANT, AuditEvent
from babelhub.services.credentials import NatsUser, load_key, tenant_user
from babelhub.services.outbox import Refusal
from babelhub.services.rest import Endpoint, Param, decode, read_body
from babelhub.services.tenants import NewTenant, TenantRecord, tenant_id_error

__all__ = ["AdminApi"]

AUDIT_PAGE: Final = 50
MAX_AUDIT_PAGE: Final = 500


class KeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """An API key as answers show it (never the key, never its digest)."""

    id: str
    tenant: str
    scopes: list[Scope]
    name: str
    created_at: str
    revoked_at: str
    requests_per_second: float
    burst: int


class CreatedKey(KeyRecord, frozen=True, kw_only=True):
    key: str
    """The key itself: shown this once, kept nowhere."""


class KeyList(msgspec.Struct, frozen=True):
    data: list[KeyRecord]


class TenantList(msgspec.Struct, frozen=True):
    data: list[TenantRecord]


class CreatedTenant(TenantRecord, frozen=True, kw_only=True):
    nats: NatsUser
    """The NATS user of the tenant's processors (shown this once; `babelhub credentials <tenant>` prints
    it again). The embedded server admits it at once; an external server once its operator adds it."""


class DeletedTenant(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    deleted: bool
    revoked_keys: list[str]


class PageMetadata(msgspec.Struct, frozen=True, kw_only=True):
    next_cursor: str
    """Give it as `after` for the next page; "" when there is none yet."""
    has_more: bool


class AuditPage(msgspec.Struct, frozen=True, kw_only=True):
    data: list[AuditEvent]
    metadata: PageMetadata


class AdminApi(RestApi):
    name = "admin"

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self.admin = Administration(services.tenants, services.keys, services.audit)

    def endpoints(self) -> list[Endpoint]:
        page = (Param("after", "the next_cursor of the page before"),
                Param("limit", f"events per page, 1 to {MAX_AUDIT_PAGE} (default {AUDIT_PAGE})", type="integer"))
        return [
            Endpoint("GET", "/v1/tenants", self._tenants, "operator", "Every tenant", answer=TenantList),
            Endpoint("POST", "/v1/tenants", self._create_tenant, "operator", "Make a tenant", body=NewTenant,
                     answer=CreatedTenant, status=201, errors=(409,)),
            Endpoint("GET", "/v1/tenants/{tenant}", self._tenant, "operator", "A tenant", answer=TenantRecord),
            Endpoint("DELETE", "/v1/tenants/{tenant}", self._delete_tenant, "operator",
                     "Delete a tenant made at run time, and revoke its keys", answer=DeletedTenant, errors=(409,)),
            Endpoint("GET", "/v1/tenants/{tenant}/keys", self._tenant_keys, "operator", "A tenant's API keys",
                     answer=KeyList),
            Endpoint("POST", "/v1/tenants/{tenant}/keys", self._create_tenant_key, "operator",
                     "Make an API key of a tenant (the key is shown this once)", body=NewKey, answer=CreatedKey,
                     status=201),
            Endpoint("DELETE", "/v1/tenants/{tenant}/keys/{key}", self._revoke_tenant_key, "operator",
                     "Revoke an API key of a tenant", answer=KeyRecord),
            Endpoint("GET", "/v1/tenants/{tenant}/audit", self._tenant_audit, "operator",
                     f"A tenant's audit trail, oldest first (`{HUB_TENANT}`: the operator's tenant events; a "
                     "deleted tenant's stays readable)", answer=AuditPage, params=page),
            Endpoint("GET", "/v1/keys", self._keys, "admin", "This tenant's API keys", answer=KeyList),
            Endpoint("POST", "/v1/keys", self._create_key, "admin",
                     "Make an API key of this tenant (the key is shown this once)", body=NewKey, answer=CreatedKey,
                     status=201),
            Endpoint("DELETE", "/v1/keys/{key}", self._revoke_key, "admin", "Revoke an API key of this tenant",
                     answer=KeyRecord),
            Endpoint("GET", "/v1/audit", self._audit, "admin", "This tenant's audit trail, oldest first",
                     answer=AuditPage, params=page),
        ]

    # ------------------------------------------------------------------------------------ tenants

    async def _tenants(self, _: web.Request, __: Caller) -> web.Response:
        return _json(TenantList(self.services.tenants.records()))

    async def _create_tenant(self, request: web.Request, caller: Caller) -> web.Response:
        new = decode(await read_body(request, self.services.config.hub.max_body_bytes), NewTenant)
        record = await self.admin.create_tenant(caller, new)
        user = tenant_user(load_key(self.services.config.hub.data_dir), self.services.ctx.subjects, record.id)
        created = CreatedTenant(**msgspec.structs.asdict(record), nats=user)
        return _json(created, 201)

    async def _tenant(self, request: web.Request, _: Caller) -> web.Response:
        return _json(await self.admin.tenant(request.match_info["tenant"]))

    async def _delete_tenant(self, request: web.Request, caller: Caller) -> web.Response:
        tenant = request.match_info["tenant"]
        revoked = await self.admin.delete_tenant(caller, tenant, self._in_use(tenant))
        return _json(DeletedTenant(id=tenant, deleted=True, revoked_keys=revoked))

    def _in_use(self, tenant: str) -> list[str]:
        """What of the hub's still belongs to `tenant`: its connections and processors."""
        connections = [f"connection {connection.id}" for connection in self.services.ctx.connections.values()
                       if connection.tenant == tenant]
        return connections + [f"processor {processor.id}" for processor in self.services.config.processors
                              if processor.tenant == tenant]

    # ------------------------------------------------------------------------------------ keys

    async def _tenant_keys(self, request: web.Request, _: Caller) -> web.Response:
        return _keys(await self.admin.list_keys(request.match_info["tenant"]))

    async def _create_tenant_key(self, request: web.Request, caller: Caller) -> web.Response:
        return await self._new_key(request, caller, request.match_info["tenant"])

    async def _revoke_tenant_key(self, request: web.Request, caller: Caller) -> web.Response:
        tenant = request.match_info["tenant"]
        await self.admin.tenant(tenant)
        return _json(_key(await self.admin.revoke_key(caller, tenant, request.match_info["key"])))

    async def _keys(self, _: web.Request, caller: Caller) -> web.Response:
        return _keys(await self.admin.list_keys(caller.tenant))

    async def _create_key(self, request: web.Request, caller: Caller) -> web.Response:
        return await self._new_key(request, caller, caller.tenant)

    async def _revoke_key(self, request: web.Request, caller: Caller) -> web.Response:
        return _json(_key(await self.admin.revoke_key(caller, caller.tenant, request.match_info["key"])))

    async def _new_key(self, request: web.Request, caller: Caller, tenant: str) -> web.Response:
        new = decode(await read_body(request, self.services.config.hub.max_body_bytes), NewKey)
        record, key = await self.admin.create_key(caller, tenant, new)
        return _json(CreatedKey(**msgspec.structs.asdict(_key(record)), key=key), 201)

    # ------------------------------------------------------------------------------------ audit

    async def _audit(self, request: web.Request, caller: Caller) -> web.Response:
        return await self._audit_page(request, caller.tenant)

    async def _tenant_audit(self, request: web.Request, _: Caller) -> web.Response:
        tenant = request.match_info["tenant"]
        if tenant != HUB_TENANT and tenant_id_error(tenant):
            raise Refusal(404, "not_found", f"no tenant {tenant[:64]!r}", "tenant")
        return await self._audit_page(request, tenant)

    async def _audit_page(self, request: web.Request, tenant: str) -> web.Response:
        after = _count(request, "after", 0, 0, 2**63)
        limit = _count(request, "limit", AUDIT_PAGE, 1, MAX_AUDIT_PAGE)
        audit = self.services.audit
        events, cursor = await audit.read(tenant, after=after, limit=limit)
        has_more = bool(cursor) and bool((await audit.read(tenant, after=cursor, limit=1))[0])
        return _json(AuditPage(data=events, metadata=PageMetadata(next_cursor=str(cursor) if cursor else "",
                                                                  has_more=has_more)))


def _count(request: web.Request, name: str, default: int, least: int, most: int) -> int:
    """Query parameter `name` as a whole number from `least` to `most`; 400 naming it otherwise."""
    given = request.query.get(name, "")
    if not given:
        return default
    if not (given.isascii() and given.isdigit()) or not least <= int(given) <= most:
        raise Refusal(400, "invalid", f"{name} is a whole number from {least} to {most}", name)
    return int(given)


def _key(record: StoredKey) -> KeyRecord:
    return KeyRecord(id=record.id, tenant=record.tenant, scopes=record.scopes, name=record.name,
                     created_at=record.created_at, revoked_at=record.revoked_at,
                     requests_per_second=record.requests_per_second, burst=record.burst)


def _keys(records: list[StoredKey]) -> web.Response:
    return _json(KeyList([_key(record) for record in records]))


def _json(answer: msgspec.Struct, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(answer), status=status, content_type="application/json")
