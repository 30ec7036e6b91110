"""Durable ingest: every inbound delivery (webhook, poll, WebSocket frame) becomes a raw record in
JetStream before anyone is told "accepted".

The record is the request as received (headers and body, msgpack-encoded). Its `Nats-Msg-Id` is a
fixed-length hash of the channel's own ids, so a channel that retries a delivery inside the dedup
window is absorbed by JetStream itself. Nothing is decoded here: a decode bug can never lose a message.

Bodies are limited (`hub.max_body_bytes`, 413) well below the NATS server's `max_payload`, leaving
`RECORD_HEADROOM` for the request's headers and URL; a record that still does not fit is a 413 too.

What is stored is the request without its credentials (`Codec.redact`): the signature was checked and
the dedup key read on the request as received, and nothing after that needs them.

Canonical envelopes other services inject (NATS `inject`, Redis streams) are recorded the same way by
`record_canonical`, which alone marks a record `canonical` (the connection actor then reads it with the
canonical decoder): `record` clears the mark, so a channel's request is never taken for an envelope.
"""

from __future__ import annotations

import hashlib
import logging
import time

import msgspec
import nats.errors

from babelhub.codecs.base import Codec, HttpRequest
from babelhub.errors import ConfigError, DecodeError, PayloadTooLarge
from babelhub.services.broker import Subjects
from babelhub.services.connections import ConnectionService
from babelhub.services.deadletters import DeadLetter, DeadLetters
from babelhub.services.injected import read_injected
from babelhub.services.publisher import Publisher

__all__ = ["NATS_UNAVAILABLE", "RECORD_HEADROOM", "Ingest", "check_body_limit", "redacted"]

log = logging.getLogger("babelhub.ingest")

# What a lost or reconnecting NATS connection raises (nats.errors.TimeoutError is a TimeoutError).
NATS_UNAVAILABLE = (nats.errors.Error, TimeoutError, ConnectionError)
"""What `Ingest.record` raises when NATS cannot take a record now (not the input's fault: retry later)."""

RECORD_HEADROOM = 64 * 1024
"""Room a raw record needs beside its body: the request's headers, URL and query, the NATS headers."""


def check_body_limit(max_body_bytes: int, max_payload: int) -> None:
    """Refuse a body limit that leaves a largest-body record no room under the server's max_payload."""
    if max_body_bytes + RECORD_HEADROOM > max_payload:
        raise ConfigError(
            f"hub.max_body_bytes = {max_body_bytes} leaves no room under the NATS server's max_payload of "
            f"{max_payload} bytes: set it to at most {max_payload - RECORD_HEADROOM} (or raise max_payload)")


class Ingest:
    def __init__(self, publisher: Publisher, subjects: Subjects, dead_letters: DeadLetters) -> None:
        self._publisher = publisher
        self._subjects = subjects
        self._dead_letters = dead_letters

    async def park(self, connection: ConnectionService, request: HttpRequest, error: str, path: str = "") -> None:
        """Keep a request the endpoint refused in the dead-letter stream, without its credentials."""
        stored = redacted(connection, request)
        await self._dead_letters.park(DeadLetter(
            stage="ingest", error=error, path=path, tenant=connection.tenant, connection=connection.id,
            headers=stored.headers, body=stored.body))

    async def record(self, connection: ConnectionService, request: HttpRequest) -> bool:
        """Write `request` as a raw record; True if new, False if JetStream saw its dedup key already.
        Raises DecodeError when the body is too broken to even find the channel's ids, PayloadTooLarge
        when the record does not fit in one NATS message (after parking it, shortened, either way), and
        nats.errors.Error when NATS cannot take it now."""
        if not self._publisher.connected:
            # Waiting out the reconnection would outlast the channel's deadline: it retries a 503 instead.
            raise nats.errors.ConnectionReconnectingError
        # Only record_canonical marks a record canonical: whatever a channel's request says, it is not.
        request = msgspec.structs.replace(request, canonical=False)
        try:
            key = _dedup_key(connection, request)
        except DecodeError as exc:
            await self.park(connection, request, exc.reason, exc.path)
            raise
        # The key comes from client data: the publisher hashes it into a fixed-length Nats-Msg-Id.
        return await self._store(connection, redacted(connection, request),
                                 (connection.id, key or hashlib.sha256(request.body).hexdigest()))

    async def record_canonical(self, connection: ConnectionService, envelope: bytes, origin: str) -> tuple[str, bool]:
        """Write a canonical envelope another service injected for `connection` (`origin` says where it
        came from: a subject, a stream entry) as a raw record marked canonical; its hub id and whether
        JetStream had recorded it already. Raises DecodeError when it is no envelope of this connection
        (`babelhub.services.injected`): the caller parks it, knowing where it came from. PayloadTooLarge
        (parked here) and NATS errors as `record`."""
        if not self._publisher.connected:
            raise nats.errors.ConnectionReconnectingError
        read = read_injected(envelope, connection.tenant, connection.id, connection.channel)
        request = HttpRequest(method="INJECT", url=origin, body=envelope, received_at=time.time(), canonical=True)
        # Only the default redaction: a channel's own reads the body as the channel's, which this is not.
        stored = Codec.redact(connection.codec, request, connection.settings.secrets)
        # The hub id is derived from the injection's own key (`injected.dedup_key`): the same injection again
        # has the same one.
        new = await self._store(connection, stored, (connection.id, "inject", read.id))
        return read.id, not new

    async def _store(self, connection: ConnectionService, request: HttpRequest, dedup: tuple[str, ...]) -> bool:
        subject = self._subjects.raw(connection.tenant, connection.channel, connection.id)
        try:
            ack = await self._publisher.publish(subject, msgspec.msgpack.encode(request), dedup=dedup)
        except PayloadTooLarge as exc:
            await self.park(connection, request, str(exc))
            raise
        return not ack.duplicate


def redacted(connection: ConnectionService, request: HttpRequest) -> HttpRequest:
    """`request` as it may be stored. A codec's own hook that fails falls back to the default one: a
    record is never stored with its credentials because a codec tripped on odd input."""
    secrets = connection.settings.secrets
    try:
        return connection.codec.redact(request, secrets)
    except Exception as exc:
        log.warning("%s: the codec's redaction failed (%r); the default one is used", connection.id, exc)
        return Codec.redact(connection.codec, request, secrets)


def _dedup_key(connection: ConnectionService, request: HttpRequest) -> str:
    try:
        return connection.dedup_key(request)
    except DecodeError:
        raise
    except Exception as exc:  # a codec bug on odd input must still end in a 400 and a kept record
        raise DecodeError(f"the channel's ids could not be read: {exc!r}", path="$") from exc
