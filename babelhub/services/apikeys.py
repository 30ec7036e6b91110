"""Who calls the hub's REST API and the client sessions: the tenants' API keys, and the operator's.

* **Stored keys** are made at run time (`ApiKeys.create`, by the admin API or `babelhub key create`) and
  kept in the `<prefix>_keys` KV bucket, shared by every hub process: only a SHA-256 digest of each key's
  secret is kept, never the key. A key reads `bh_<id>_<secret>`: the id (16 hex digits) finds its record,
  the secret (256 random bits, so a plain digest is as good as a slow hash) is compared in constant time.
  Each has scopes: `read` (conversations, contacts, message statuses, directories), `send` (messages,
  session tokens), `admin` (the tenant's keys, connections and templates; it implies the other two).
  A revoked key is refused at once by every hub process: the record is read on every call.
* **Config keys** (`tenants[].api_keys` in the config file) have every scope of their tenant.
* **The operator key** (`hub.operator_key`, e.g. `BABELHUB_OPERATOR_KEY`) manages tenants and any
  tenant's keys; it belongs to no tenant and reads no tenant's data.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Final, Literal

import msgspec
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from babelhub.services import kvscan

__all__ = ["OPERATOR", "SCOPES", "ApiKeys", "Caller", "Refused", "Scope", "StoredKey", "utc_now"]

Scope = Literal["admin", "send", "read"]
SCOPES: Final[tuple[Scope, ...]] = ("admin", "send", "read")
OPERATOR: Final = "operator"
"""The key id of the operator key."""
CONFIG: Final = "config"
"""The key id of a config file's key."""
_TOKEN = re.compile(r"bh_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")


class Refused(Exception):
    """A credential the hub does not accept; the message says why (it never repeats the credential)."""


class Caller(msgspec.Struct, frozen=True, kw_only=True):
    """Who a request comes from: a tenant's key (its scopes), or the operator (`tenant` empty)."""

    tenant: str
    scopes: frozenset[str]
    key_id: str
    requests_per_second: float = 0.0
    """This key's own limit (beside its tenant's); 0: none."""
    burst: int = 0

    @property
    def operator(self) -> bool:
        return self.key_id == OPERATOR

    def may(self, scope: Scope) -> bool:
        return scope in self.scopes or (not self.operator and "admin" in self.scopes)


class StoredKey(msgspec.Struct, frozen=True, kw_only=True):
    """A key's record in the `<prefix>_keys` bucket (and, without `digest`, in API answers)."""

    id: str
    tenant: str
    scopes: list[Scope]
    name: str = ""
    created_at: str
    revoked_at: str = ""
    requests_per_second: float = 0.0
    """This key's own rate limit, beside its tenant's (`babelhub.services.rest.RateLimits`); 0: none."""
    burst: int = 0
    digest: str = ""
    """SHA-256 of the secret, hex; left out of every answer."""

    def public(self) -> StoredKey:
        return msgspec.structs.replace(self, digest="")


_keys = msgspec.json.Decoder(StoredKey)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class ApiKeys:
    """Checks presented keys and manages the stored ones."""

    def __init__(self, kv: KeyValue, config_keys: Iterable[tuple[str, str]], operator_key: str = "") -> None:
        """`config_keys`: (tenant, key) pairs from the config file."""
        self._kv = kv
        self._config = [(_digest(key), tenant) for tenant, key in config_keys if key]
        self._operator = _digest(operator_key) if operator_key else b""

    async def authenticate(self, presented: str) -> Caller:
        """The caller `presented` (a bearer credential) speaks for; `Refused` when it is none."""
        if not presented:
            raise Refused("no API key")
        match = _TOKEN.fullmatch(presented)
        if match is not None:
            return await self._stored(match.group(1), match.group(2))
        digest = _digest(presented)
        tenant = ""
        for known, owner in self._config:  # every one compared: the time tells nothing
            if hmac.compare_digest(known, digest):
                tenant = owner
        if tenant:
            return Caller(tenant=tenant, scopes=frozenset(SCOPES), key_id=CONFIG)
        if self._operator and hmac.compare_digest(self._operator, digest):
            return Caller(tenant="", scopes=frozenset({OPERATOR}), key_id=OPERATOR)
        raise Refused("unknown API key")

    async def _stored(self, key_id: str, secret: str) -> Caller:
        record = await self.get(key_id)
        presented = _digest(secret).hex()
        if record is None or not hmac.compare_digest(record.digest, presented):
            raise Refused("unknown API key")
        if record.revoked_at:
            raise Refused("revoked API key")
        return Caller(tenant=record.tenant, scopes=frozenset(record.scopes), key_id=record.id,
                      requests_per_second=record.requests_per_second, burst=record.burst)

    async def get(self, key_id: str) -> StoredKey | None:
        try:
            entry = await self._kv.get(key_id)
        except KeyNotFoundError:
            return None
        return _keys.decode(entry.value) if entry.value else None

    async def create(self, tenant: str, scopes: Iterable[Scope], name: str = "", *,
                     requests_per_second: float = 0.0, burst: int = 0) -> tuple[StoredKey, str]:
        """A new key of `tenant`: its record (without digest) and the key itself, shown this once."""
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        record = StoredKey(id=key_id, tenant=tenant, scopes=sorted(set(scopes), key=SCOPES.index), name=name,
                           created_at=utc_now(), digest=_digest(secret).hex(),
                           requests_per_second=requests_per_second, burst=burst)
        await self._kv.create(key_id, msgspec.json.encode(record))
        return record.public(), f"bh_{key_id}_{secret}"

    async def list(self, tenant: str) -> list[StoredKey]:
        """`tenant`'s keys, revoked ones included, oldest first."""
        records = [_keys.decode(entry.value or b"") for entry in await kvscan.current_values(self._kv)]
        found = [key for key in records if key.tenant == tenant]
        return sorted((key.public() for key in found), key=lambda key: (key.created_at, key.id))

    async def revoke(self, tenant: str, key_id: str) -> StoredKey | None:
        """Revoke `tenant`'s key `key_id` (its record stays, for the audit); None when it has no such key."""
        record = await self.get(key_id)
        if record is None or record.tenant != tenant:
            return None
        if not record.revoked_at:
            record = msgspec.structs.replace(record, revoked_at=utc_now())
            await self._kv.put(key_id, msgspec.json.encode(record))
        return record.public()


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()
