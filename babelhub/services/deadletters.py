"""The dead-letter stream: what could not be decoded, delivered or applied, kept with its reason.

Nothing is dropped silently: a record parked here carries the original bytes, so it can be replayed
once the cause is fixed. A letter is one msgpack-encoded `DeadLetter` (bytes stay bytes). Parking never
fails on size: a letter that would not fit in one NATS message keeps the start of its body (its full
size and SHA-256 are always recorded) and shortened texts and headers, and names what was cut. The
configured secrets' values are masked in everything a letter holds.
"""

from __future__ import annotations

import hashlib
import time

import msgspec

from babelhub.redaction import SecretMask
from babelhub.services.broker import Subjects
from babelhub.services.publisher import Publisher
from babelhub.services.telemetry import Metrics

__all__ = ["DeadLetter", "DeadLetters", "fitted"]

# msgpack's largest bin header is 5 bytes; a few more cover the `truncated` list's growth.
_ENCODING_SLACK = 16


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    stage: str
    """Where it failed: ingest, decode, apply, send, processor, media."""
    error: str
    path: str = ""
    """The JSON path of what was wrong, when known."""
    tenant: str = ""
    connection: str = ""
    subject: str = ""
    headers: dict[str, str] = {}
    body: bytes = b""
    body_size: int = 0
    """Length of the original body, also when `body` holds only its start."""
    body_sha256: str = ""
    """Hex SHA-256 of the original body."""
    truncated: list[str] = []
    """Fields shortened so the letter fits in one NATS message (e.g. `body`, `headers`)."""
    at: float = 0.0


def fitted(letter: DeadLetter, room: int) -> DeadLetter:
    """`letter` with its body's size and hash, shortened where needed to encode in `room` bytes."""
    body = letter.body
    letter = msgspec.structs.replace(letter, body_size=len(body), body_sha256=hashlib.sha256(body).hexdigest())
    if len(msgspec.msgpack.encode(letter)) <= room:
        return letter
    text_room, headers_room = room // 16, room // 8
    short = msgspec.structs.replace(
        letter, body=b"", error=_cut(letter.error, text_room), path=_cut(letter.path, text_room),
        subject=_cut(letter.subject, text_room), headers=_first_headers(letter.headers, headers_room))
    cut = [name for name in ("error", "path", "subject", "headers")
           if getattr(short, name) != getattr(letter, name)]
    short = msgspec.structs.replace(short, truncated=[*cut, "body"])
    left = room - len(msgspec.msgpack.encode(short)) - _ENCODING_SLACK
    return msgspec.structs.replace(short, body=body[: max(0, left)])


def _cut(text: str, room: int) -> str:
    """At most `room` bytes of `text` in UTF-8, cut on a character boundary."""
    return text.encode(errors="replace")[:room].decode(errors="ignore")


def _first_headers(headers: dict[str, str], room: int) -> dict[str, str]:
    """The headers, in order, while their names and values fit in `room` bytes."""
    kept: dict[str, str] = {}
    for name, value in headers.items():
        room -= len(name.encode()) + len(value.encode())
        if room < 0:
            break
        kept[name] = value
    return kept


class DeadLetters:
    def __init__(self, publisher: Publisher, subjects: Subjects, metrics: Metrics,
                 mask: SecretMask | None = None) -> None:
        self._publisher = publisher
        self._subjects = subjects
        self._metrics = metrics
        self._mask = mask or SecretMask()

    async def park(self, letter: DeadLetter) -> None:
        stamped = _masked(msgspec.structs.replace(letter, at=letter.at or time.time()), self._mask)
        subject = self._subjects.dead_letter(letter.tenant or "_", letter.stage)
        headers = self._publisher.headers()
        letter = fitted(stamped, self._publisher.room(headers))
        await self._publisher.publish(subject, msgspec.msgpack.encode(letter), headers=headers)
        self._metrics.dead_letters.labels(letter.stage).inc()


def _masked(letter: DeadLetter, mask: SecretMask) -> DeadLetter:
    if not mask:
        return letter
    return msgspec.structs.replace(
        letter, error=mask.text(letter.error), subject=mask.text(letter.subject), body=mask.data(letter.body),
        headers={name: mask.text(value) for name, value in letter.headers.items()})
