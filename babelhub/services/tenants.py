"""The tenants a running hub serves: those of the config file, and those made at run time.

Config tenants (`tenants[]`) are fixed while the hub runs: they cannot be changed or deleted through the
admin API or the CLI (409). Tenants made at run time (`Tenants.create`, by `POST /v1/tenants` or
`babelhub tenant create`) are kept in the `<prefix>_tenants` KV bucket, shared by every hub process;
each process follows the bucket with a KV watch (`Tenants.watch`, a supervised task), so a tenant made
or deleted through one process is served or refused by all without a restart. `ids` is the live set of
every known tenant id, and `on_change` is called when it changes (the hub re-admits the tenants' NATS
users on its embedded server then).

Deleting a tenant (`Tenants.delete`) removes its record and revokes its stored API keys; what it stored
(messages, raw records) is erased by retention later.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated, Final

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from babelhub.services import kvscan
from babelhub.services.apikeys import ApiKeys, utc_now
from babelhub.services.config import HUB_TENANT, Tenant
from babelhub.services.outbox import Refusal
from babelhub.services.supervise import TaskHealth

__all__ = ["RESERVED_TENANTS", "TENANT_ID", "NewTenant", "StoredTenant", "TenantRecord", "Tenants", "tenant_id_error"]

log = logging.getLogger("babelhub.tenants")

TENANT_ID: Final = r"^[A-Za-z0-9_-]{1,64}$"
"""What a tenant id may be (as in the config file): one NATS subject token and one URL path segment,
never a wildcard (`*`, `>`) or a token separator (`.`)."""
_TENANT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
RESERVED_TENANTS: Final = frozenset({HUB_TENANT})
"""Ids no tenant may take at run time: `_hub` holds the operator's audit trail."""
MAX_RETENTION_DAYS: Final = 3650


class NewTenant(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a tenant is made with: its id, and overrides of the hub's defaults (unset: the hub's)."""

    id: Annotated[str, msgspec.Meta(pattern=TENANT_ID, max_length=64)]
    requests_per_second: Annotated[float, msgspec.Meta(ge=0, le=1_000_000)] | None = None
    """Its REST requests per second (per hub process); unset: `hub.requests_per_second`; 0: no limit."""
    burst: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    """Requests it may make at once above its rate; unset: `hub.request_burst`."""
    retention_days: Annotated[int, msgspec.Meta(ge=1, le=MAX_RETENTION_DAYS)] | None = None
    """Days its messages and raw records are kept; unset: `hub.retention_days`."""


class StoredTenant(NewTenant, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A run-time tenant's record in the `<prefix>_tenants` bucket."""

    created_at: str


class TenantRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A tenant as the admin API shows it."""

    id: str
    managed: bool
    """True for a tenant made at run time; false for one of the config file (which cannot be changed here)."""
    created_at: str = ""
    requests_per_second: float | None = None
    burst: int | None = None
    retention_days: int | None = None


_stored = msgspec.json.Decoder(StoredTenant)


def tenant_id_error(tenant_id: str) -> str:
    """Why `tenant_id` cannot name a new tenant, or ""."""
    if not _TENANT_ID.fullmatch(tenant_id):
        return f"{tenant_id[:64]!r} is not a tenant id: 1 to 64 letters, digits, '_' or '-'"
    if tenant_id in RESERVED_TENANTS:
        return f"{tenant_id!r} is reserved"
    return ""


class Tenants:
    """The tenants known to this process, config and run-time, kept current by `watch`."""

    def __init__(self, kv: KeyValue, config_tenants: Iterable[Tenant]) -> None:
        self._kv = kv
        self._config = {tenant.id: tenant for tenant in config_tenants}
        self._managed: dict[str, StoredTenant] = {}
        self.ids: set[str] = set(self._config)
        """Every tenant id this process serves now; the same set object for the hub's lifetime (the
        consumers hold it), updated in place."""
        self.on_change: Callable[[], Awaitable[None]] | None = None
        """Called after `ids` changed."""
        self._changing = asyncio.Lock()
        self._applied = set(self._config)
        """The ids `on_change` last took effect for (the embedded server starts with the config's)."""

    # ------------------------------------------------------------------------------------ reading

    def known(self, tenant_id: str) -> bool:
        return tenant_id in self.ids

    def is_config(self, tenant_id: str) -> bool:
        return tenant_id in self._config

    def record(self, tenant_id: str) -> TenantRecord | None:
        """`tenant_id` as this process last learnt of it (the watch keeps it current), or None."""
        if (tenant := self._config.get(tenant_id)) is not None:
            return TenantRecord(id=tenant.id, managed=False, requests_per_second=tenant.requests_per_second,
                                burst=tenant.burst, retention_days=tenant.retention_days)
        if (stored := self._managed.get(tenant_id)) is not None:
            return _record(stored)
        return None

    def records(self) -> list[TenantRecord]:
        """Every known tenant, config ones first, then by id."""
        found = [self.record(tenant_id) for tenant_id in [*self._config, *sorted(self._managed)]]
        return [record for record in found if record is not None]

    async def fetch(self, tenant_id: str) -> TenantRecord | None:
        """`tenant_id` as the bucket holds it now (not waiting for the watch), or None."""
        if tenant_id in self._config:
            return self.record(tenant_id)
        stored = await self._get(tenant_id)
        return _record(stored) if stored is not None else None

    async def _get(self, tenant_id: str) -> StoredTenant | None:
        if not _TENANT_ID.fullmatch(tenant_id):
            return None
        try:
            entry = await self._kv.get(tenant_id)
        except KeyNotFoundError:
            return None
        return _stored.decode(entry.value) if entry.value else None

    # ------------------------------------------------------------------------------------ changing

    async def create(self, new: NewTenant) -> TenantRecord:
        """Make tenant `new.id`: 400 for an id that cannot be one, 409 when it exists."""
        if problem := tenant_id_error(new.id):
            raise Refusal(400, "invalid", problem, "$.id")
        if new.id in self._config:
            raise Refusal(409, "exists", f"tenant {new.id!r} is in the config file", "$.id")
        stored = StoredTenant(id=new.id, requests_per_second=new.requests_per_second, burst=new.burst,
                              retention_days=new.retention_days, created_at=utc_now())
        try:
            await self._kv.create(new.id, msgspec.json.encode(stored))
        except KeyWrongLastSequenceError:
            raise Refusal(409, "exists", f"tenant {new.id!r} exists", "$.id") from None
        await self._apply(new.id, stored)  # served here at once; the watch tells the other processes
        return _record(stored)

    async def delete(self, tenant_id: str, keys: ApiKeys, in_use: Iterable[str] = ()) -> list[str]:
        """Delete run-time tenant `tenant_id` and revoke its stored keys (their ids are answered). 404 when
        there is no such tenant, 409 for a config tenant or one that `in_use` names (its connections and
        processors, as "connection <id>")."""
        if tenant_id in self._config:
            raise Refusal(409, "config_tenant", f"tenant {tenant_id!r} is in the config file: change it there",
                          "tenant")
        if await self._get(tenant_id) is None:
            raise Refusal(404, "not_found", f"no tenant {tenant_id[:64]!r}", "tenant")
        users = sorted(in_use)
        if users:
            raise Refusal(409, "in_use", f"tenant {tenant_id!r} still has {', '.join(users)}: remove them first",
                          "tenant")
        # Its keys first: a delete cut short leaves a tenant without keys, never keys without a tenant.
        revoked = []
        for key in await keys.list(tenant_id):
            if not key.revoked_at:
                await keys.revoke(tenant_id, key.id)
                revoked.append(key.id)
        await self._kv.delete(tenant_id)
        await self._apply(tenant_id, None)
        return revoked

    # ------------------------------------------------------------------------------------ following

    async def load(self) -> None:
        """Read every run-time tenant from the bucket (at start, before the watch runs)."""
        await self._replace({entry.key: _stored.decode(entry.value or b"")
                             for entry in await kvscan.current_values(self._kv) if _TENANT_ID.fullmatch(entry.key)})

    async def watch(self, health: TaskHealth) -> None:
        """Follow the bucket until cancelled: what another process (or the CLI) makes or deletes is
        served or refused here too. A restarted watch begins with the bucket's whole content again."""
        watcher = await self._kv.watchall()
        try:
            snapshot: dict[str, StoredTenant] = {}
            async for entry in watcher:
                if entry is None:  # the bucket's content so far has been delivered
                    await self._replace(snapshot)
                    health.ok()
                    break
                if stored := self._decoded(entry.key, entry.value, entry.operation):
                    snapshot[entry.key] = stored
            async for entry in watcher:
                if entry is not None:
                    await self._apply(entry.key, self._decoded(entry.key, entry.value, entry.operation))
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]

    @staticmethod
    def _decoded(key: str, value: bytes | None, operation: str | None) -> StoredTenant | None:
        if operation in (KV_DEL, KV_PURGE) or not value:
            return None
        try:
            return _stored.decode(value)
        except msgspec.ValidationError:
            log.error("tenant record %r cannot be read; ignored", key[:64])
            return None

    async def _replace(self, managed: dict[str, StoredTenant]) -> None:
        self._managed = {name: stored for name, stored in managed.items() if name not in self._config}
        self._set_ids()
        await self._changed()

    async def _apply(self, tenant_id: str, stored: StoredTenant | None) -> None:
        if tenant_id in self._config:
            return
        if stored is None:
            self._managed.pop(tenant_id, None)
        else:
            self._managed[tenant_id] = stored
        self._set_ids()
        await self._changed()

    def _set_ids(self) -> None:
        self.ids.clear()
        self.ids.update(self._config)
        self.ids.update(self._managed)

    async def _changed(self) -> None:
        """Call `on_change` unless it has taken effect for `ids` already. One call at a time: whoever made
        a change waits for the call under way (the watch may have seen the change first), so it does not
        answer before the effect (the NATS user admitted); one that failed is made again next time."""
        if self.on_change is None:
            return
        async with self._changing:
            if self.ids == self._applied:
                return
            wanted = set(self.ids)
            await self.on_change()
            self._applied = wanted


def _record(stored: StoredTenant) -> TenantRecord:
    return TenantRecord(id=stored.id, managed=True, created_at=stored.created_at,
                        requests_per_second=stored.requests_per_second, burst=stored.burst,
                        retention_days=stored.retention_days)
