"""What the admin API and the `babelhub tenant` / `babelhub key` commands do, in one place: make and
delete tenants, make, list and revoke their API keys, each change recorded in the audit trail (who,
what, when; a key itself never).

A key never grants more than its maker holds (`check_grant`): an admin key may make keys of any scope,
another key none above its own. Refusals are `Refusal`s (status, code, message, path), as the REST
API answers them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Final

import msgspec

from babelhub.services.apikeys import SCOPES, ApiKeys, Caller, Scope, StoredKey
from babelhub.services.audit import Audit
from babelhub.services.outbox import Refusal
from babelhub.services.tenants import NewTenant, TenantRecord, Tenants

__all__ = ["CLI_CALLER", "Administration", "NewKey", "check_grant"]

CLI_CALLER: Final = Caller(tenant="", scopes=frozenset(SCOPES), key_id="cli")
"""Who the command line acts as (its audit events name `cli`): whoever can read the hub's NATS
credentials in its data directory administers it."""
_KEY_ID = "0123456789abcdef"


class NewKey(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a key is made with."""

    scopes: Annotated[list[Scope], msgspec.Meta(min_length=1, max_length=len(SCOPES))]
    """`admin` (the tenant's keys, connections, templates; implies the others), `send`, `read`."""
    name: Annotated[str, msgspec.Meta(max_length=128)] = ""
    """Words that say what the key is for."""
    requests_per_second: Annotated[float, msgspec.Meta(ge=0, le=1_000_000)] = 0.0
    """The key's own rate limit beside its tenant's; 0: none."""
    burst: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 0


def check_grant(caller: Caller, scopes: Iterable[Scope]) -> None:
    """403 when `caller` would make a key with a scope it does not hold itself."""
    if caller.operator:
        return
    above = sorted({scope for scope in scopes if not caller.may(scope)}, key=SCOPES.index)
    if above:
        raise Refusal(403, "forbidden", f"a key cannot make a key with more scopes than its own: "
                                        f"it lacks {', '.join(above)}", "$.scopes")


class Administration:
    def __init__(self, tenants: Tenants, keys: ApiKeys, audit: Audit) -> None:
        self.tenants = tenants
        self.keys = keys
        self.audit = audit

    async def tenant(self, tenant_id: str) -> TenantRecord:
        """`tenant_id`'s record; 404 when there is no such tenant."""
        record = await self.tenants.fetch(tenant_id)
        if record is None:
            raise Refusal(404, "not_found", f"no tenant {tenant_id[:64]!r}", "tenant")
        return record

    async def create_tenant(self, caller: Caller, new: NewTenant) -> TenantRecord:
        record = await self.tenants.create(new)
        limits = {name: str(value) for name, value in msgspec.structs.asdict(new).items()
                  if name != "id" and value is not None}
        await self.audit.record(caller, "", "tenant.create", new.id, limits)
        return record

    async def delete_tenant(self, caller: Caller, tenant_id: str, in_use: Iterable[str] = ()) -> list[str]:
        """Delete the tenant and revoke its keys (their ids are answered)."""
        revoked = await self.tenants.delete(tenant_id, self.keys, in_use)
        await self.audit.record(caller, "", "tenant.delete", tenant_id, {"revoked_keys": ",".join(revoked)})
        return revoked

    async def create_key(self, caller: Caller, tenant_id: str, new: NewKey) -> tuple[StoredKey, str]:
        """A key of `tenant_id` and its record; the key is shown this once and never kept."""
        check_grant(caller, new.scopes)
        await self.tenant(tenant_id)
        record, key = await self.keys.create(tenant_id, new.scopes, new.name,
                                             requests_per_second=new.requests_per_second, burst=new.burst)
        changes = {"scopes": ",".join(record.scopes), "name": new.name}
        if new.requests_per_second:
            changes |= {"requests_per_second": str(new.requests_per_second), "burst": str(new.burst)}
        await self.audit.record(caller, tenant_id, "key.create", record.id, changes)
        return record, key

    async def list_keys(self, tenant_id: str) -> list[StoredKey]:
        await self.tenant(tenant_id)
        return await self.keys.list(tenant_id)

    async def revoke_key(self, caller: Caller, tenant_id: str, key_id: str) -> StoredKey:
        """Revoke `tenant_id`'s key `key_id`; 404 when the tenant has no such key (another tenant's too)."""
        record = await self.keys.revoke(tenant_id, key_id) if _is_key_id(key_id) else None
        if record is None:
            raise Refusal(404, "not_found", f"no key {key_id[:64]!r}", "key")
        await self.audit.record(caller, tenant_id, "key.revoke", key_id)
        return record


def _is_key_id(value: str) -> bool:
    return len(value) == len(_KEY_ID) and all(char in _KEY_ID for char in value)
