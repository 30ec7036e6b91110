"""Retention: each tenant's messages and raw records are kept `retention_days`, then purged.

`Retention.purge` removes, per tenant, what was stored before `now - retention_days` (the tenant's
`retention_days`, else `hub.retention_days`, 7 by default) from the raw, messages, statuses and history
streams: JetStream finds the tenant's first message stored at or after the cutoff (a get by start time
on the tenant's subjects) and purges the tenant's subjects below its sequence, so a stream is never read
message by message. Then the conversation index loses the conversations with nothing left. The hub runs
it every `INTERVAL_SECONDS` in the process holding partition 0 (one at a time is enough; a purge done
twice removes nothing more). `now` is given, so a test moves the clock instead of waiting days.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from babelhub.services.broker import Subjects
from babelhub.services.conversationindex import ConversationIndex
from babelhub.services.historystore import HistoryStore

__all__ = ["INTERVAL_SECONDS", "PURGED_ROLES", "Retention"]

log = logging.getLogger("babelhub.retention")

INTERVAL_SECONDS: Final = 300.0
PURGED_ROLES: Final = ("raw", "messages", "statuses")
"""The hub's streams purged per tenant (beside the history's own)."""
_NO_MESSAGE: Final = 10037


@dataclass
class Retention:
    nc: NATS
    js: JetStreamContext
    subjects: Subjects
    store: HistoryStore
    index: ConversationIndex
    days_of: Callable[[str], int]
    """A tenant's retention in days."""

    async def purge(self, tenants: list[str], now: datetime) -> dict[str, int]:
        """Purge what each of `tenants` stored before its cutoff; the messages removed per stream."""
        removed: dict[str, int] = {}
        for tenant in tenants:
            cutoff = now - timedelta(days=self.days_of(tenant))
            streams = [self.subjects.stream_name(role) for role in PURGED_ROLES] + [self.store.stream]
            for stream in streams:
                removed[stream] = removed.get(stream, 0) + await self._purge_before(stream, tenant, cutoff)
            await self._drop_emptied(tenant, cutoff)
        return removed

    async def _purge_before(self, stream: str, tenant: str, cutoff: datetime) -> int:
        subject = f"{self.subjects.prefix}.{tenant}.>"
        info = await self.js.stream_info(stream)
        before = await self._first_at_or_after(stream, subject, cutoff) or info.state.last_seq + 1
        answer = await self.nc.request(f"$JS.API.STREAM.PURGE.{stream}",
                                       json.dumps({"filter": subject, "seq": before}).encode(), timeout=10)
        result = json.loads(answer.data)
        if "error" in result:
            raise RuntimeError(f"{stream}: purge refused: {result['error'].get('description', result['error'])}")
        purged = int(result.get("purged", 0))
        if purged:
            log.info("retention: %d messages of tenant %s purged from %s", purged, tenant, stream)
        return purged

    async def _first_at_or_after(self, stream: str, subject: str, cutoff: datetime) -> int:
        """The sequence of the first message on `subject` stored at or after `cutoff`; 0 when none was."""
        request = {"start_time": cutoff.astimezone(UTC).isoformat().replace("+00:00", "Z"), "next_by_subj": subject}
        answer = json.loads((await self.nc.request(f"$JS.API.STREAM.MSG.GET.{stream}",
                                                   json.dumps(request).encode(), timeout=10)).data)
        error = answer.get("error")
        if error is not None:
            if error.get("err_code") == _NO_MESSAGE:
                return 0
            raise RuntimeError(f"{stream}: {error.get('description', error)}")
        return int(answer["message"]["seq"])

    async def _drop_emptied(self, tenant: str, cutoff: datetime) -> None:
        """Index entries of conversations that have nothing left (and no activity since the cutoff: one
        written meanwhile is kept)."""
        info = await self.js.stream_info(self.store.stream, subjects_filter=self.store.subject(tenant, "*"))
        remaining = {subject.rsplit(".", 1)[1] for subject in info.state.subjects or {}}
        for record in await self.index.all(tenant):
            if record.id not in remaining and record.last_activity < cutoff:
                await self.index.remove(tenant, record.id)
