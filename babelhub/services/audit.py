"""The audit trail of admin actions: who did what to which of a tenant's things, and when.

Every change made through the admin APIs (tenants, keys, connections, templates, erasures) is published
as an `AuditEvent` on `<prefix>.<tenant>.audit.<action>` (the operator's on tenant `_hub`), kept by the
`<PREFIX>_AUDIT` stream like every other stream of the hub. An event names the key that acted (its id,
never the key), the target's id and what changed (`changes`: field names, and values that are not
secrets); a secret value never enters it. `Audit.read` pages through a tenant's events, oldest first.
"""

from __future__ import annotations

import re
from typing import Final

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from babelhub.services.apikeys import Caller, utc_now
from babelhub.services.broker import Subjects
from babelhub.services.publisher import Publisher

__all__ = ["HUB_TENANT", "Audit", "AuditEvent"]

HUB_TENANT: Final = "_hub"
"""Where the operator's actions on no tenant in particular are kept."""
_ACTION = re.compile(r"[a-z]+(\.[a-z_]+)+")


class AuditEvent(msgspec.Struct, frozen=True, kw_only=True):
    at: str
    """UTC, ISO 8601."""
    tenant: str
    actor: str
    """The id of the key that acted: a stored key's id, `config`, or `operator`."""
    action: str
    """`<thing>.<verb>`: `tenant.create`, `key.revoke`, `connection.update`, `template.delete`, …"""
    target: str
    """The id of what was acted on."""
    changes: dict[str, str] = {}
    """What changed: field names with their new values, a secret's shown as `(changed)`."""


class Audit:
    def __init__(self, publisher: Publisher, js: JetStreamContext, subjects: Subjects) -> None:
        self._publisher = publisher
        self._js = js
        self._subjects = subjects

    async def record(self, caller: Caller, tenant: str, action: str, target: str,
                     changes: dict[str, str] | None = None) -> AuditEvent:
        """Keep one event (acknowledged by the stream before this returns)."""
        if not _ACTION.fullmatch(action):
            raise ValueError(f"an audit action reads <thing>.<verb>: {action!r}")
        event = AuditEvent(at=utc_now(), tenant=tenant or HUB_TENANT, actor=caller.key_id, action=action,
                           target=target, changes=changes or {})
        await self._publisher.publish(self._subjects.audit(event.tenant, action), msgspec.json.encode(event))
        return event

    async def read(self, tenant: str, *, after: int = 0, limit: int = 50) -> tuple[list[AuditEvent], int]:
        """Up to `limit` of `tenant`'s events after stream sequence `after`, oldest first, and the cursor
        of the next page (0: none yet)."""
        stream, subject = self._subjects.stream_name("audit"), self._subjects.audit(tenant, ">")
        events: list[AuditEvent] = []
        cursor = after
        while len(events) < limit:
            try:
                found = await self._js.get_msg(stream, seq=cursor + 1, subject=subject, next=True)
            except NotFoundError:
                return events, 0
            if found.seq is None or found.data is None:
                return events, 0
            events.append(msgspec.json.decode(found.data, type=AuditEvent))
            cursor = found.seq
        return events, cursor
