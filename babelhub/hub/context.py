"""What the actors need from the running hub, handed to them in one object."""

from __future__ import annotations

from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from babelhub.hub.broker import Subjects
from babelhub.hub.connections import ConnectionService
from babelhub.hub.deadletters import DeadLetters
from babelhub.hub.telemetry import Metrics
from babelhub.redaction import SecretMask


@dataclass
class HubContext:
    nats: NATS
    js: JetStreamContext
    subjects: Subjects
    snapshots: KeyValue
    dead_letters: DeadLetters
    metrics: Metrics
    connections: dict[str, ConnectionService] = field(default_factory=dict)
    mask: SecretMask = field(default_factory=SecretMask)
    """Masks the configured secrets in what leaves the hub (statuses, dead letters, logs)."""
