"""What the actors need from the running hub, handed to them in one object."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from babelhub.redaction import SecretMask
from babelhub.services.broker import Subjects
from babelhub.services.connections import ConnectionService
from babelhub.services.deadletters import DeadLetters
from babelhub.services.ownership import Ownership
from babelhub.services.publisher import Publisher
from babelhub.services.rendering import Renderer
from babelhub.services.scheduling import Scheduler
from babelhub.services.telemetry import Metrics


@dataclass
class HubContext:
    nats: NATS
    js: JetStreamContext
    subjects: Subjects
    snapshots: KeyValue
    dead_letters: DeadLetters
    metrics: Metrics
    publisher: Publisher
    """Every publish and KV write goes through it: it refuses what exceeds the server's max_payload."""
    connections: dict[str, ConnectionService] = field(default_factory=dict)
    mask: SecretMask = field(default_factory=SecretMask)
    """Masks the configured secrets in what leaves the hub (statuses, dead letters, logs)."""
    ownership: Ownership | None = None
    """The partitions this process holds (set once they are kept, at start); None: all of them."""
    scheduler: Scheduler | None = None
    """Holds outbound messages for later (`send_at`, quiet hours); None: every message goes at once."""
    renderer: Renderer | None = None
    """Renders the tenants' stored templates in outbound messages; None: no stored templates."""
    clock: Callable[[], float] = time.time
    """Wall-clock time (Unix seconds) for what is scheduled by the calendar: messaging windows, quiet
    hours, `send_at`. Tests move it instead of waiting."""

    def holds(self, partition: int) -> bool:
        """Whether this process may act for `partition` now: its lease is held and not near expiry. Asked
        right before a channel call, so a process that was stalled (a long pause, cut off from NATS) past
        its lease never sends for a partition another process has taken."""
        return self.ownership is None or self.ownership.owns(partition)
