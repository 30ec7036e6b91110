"""The dead-letter stream: what could not be decoded, delivered or applied, kept with its reason.

Nothing is dropped silently: a record parked here carries the original bytes, so it can be replayed
once the cause is fixed. The configured secrets' values are masked in everything a letter holds.
"""

from __future__ import annotations

import time

import msgspec
from nats.js import JetStreamContext

from babelhub.hub.broker import Subjects
from babelhub.hub.telemetry import Metrics
from babelhub.redaction import SecretMask

__all__ = ["DeadLetter", "DeadLetters"]


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    stage: str
    """Where it failed: ingest, decode, apply, send, processor."""
    error: str
    path: str = ""
    """The JSON path of what was wrong, when known."""
    tenant: str = ""
    connection: str = ""
    subject: str = ""
    headers: dict[str, str] = {}
    body: bytes = b""
    at: float = 0.0


class DeadLetters:
    def __init__(self, js: JetStreamContext, subjects: Subjects, metrics: Metrics,
                 mask: SecretMask | None = None) -> None:
        self._js = js
        self._subjects = subjects
        self._metrics = metrics
        self._mask = mask or SecretMask()

    async def park(self, letter: DeadLetter) -> None:
        stamped = _masked(msgspec.structs.replace(letter, at=letter.at or time.time()), self._mask)
        subject = self._subjects.dead_letter(letter.tenant or "_", letter.stage)
        await self._js.publish(subject, msgspec.json.encode(stamped))
        self._metrics.dead_letters.labels(letter.stage).inc()


def _masked(letter: DeadLetter, mask: SecretMask) -> DeadLetter:
    if not mask:
        return letter
    return msgspec.structs.replace(
        letter, error=mask.text(letter.error), subject=mask.text(letter.subject), body=mask.data(letter.body),
        headers={name: mask.text(value) for name, value in letter.headers.items()})
