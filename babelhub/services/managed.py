"""Connections made at run time (`/v1/connections`), kept in the `<prefix>_connections` KV bucket.

One record per connection, keyed by its id: the connection's settings as the config file would give
them (`config.Connection`), but with each secret sealed (`babelhub.services.secretbox`), plus whether it
is disabled and when it and its secrets last changed. Every hub process applies the bucket's changes
as they come (`babelhub.hub.app` watches it), so a connection made, rotated, disabled or deleted on one
process is served so by all of them, without a restart. Writes are revision-checked: two admins
changing one connection at once do not overwrite each other (the later one is told to retry).

Config-file connections win: their ids cannot be taken or changed here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from babelhub.errors import ConfigError
from babelhub.services import config as cfg
from babelhub.services import kvscan
from babelhub.services.apikeys import utc_now
from babelhub.services.outbox import Refusal
from babelhub.services.secretbox import SecretBox

__all__ = ["MASKED", "ConnectionStore", "ManagedRecord", "Stored", "checked", "rotate_all"]

log = logging.getLogger("babelhub.managed")

MASKED: Final = "********"
"""How an answer shows a secret's value."""


class ManagedRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A connection's record in the bucket: its settings with every secret sealed."""

    connection: cfg.Connection
    disabled: bool = False
    created_at: str
    updated_at: str
    secrets_updated_at: str = ""


@dataclass(frozen=True)
class Stored:
    record: ManagedRecord
    revision: int


_records = msgspec.json.Decoder(ManagedRecord)


def decode_record(data: bytes) -> ManagedRecord:
    return _records.decode(data)


class ConnectionStore:
    """Reads and writes the bucket; seals and opens the secrets with the hub's `SecretBox`."""

    def __init__(self, kv: KeyValue, box: SecretBox) -> None:
        self.kv = kv
        self.box = box

    async def get(self, connection_id: str) -> Stored | None:
        try:
            entry = await self.kv.get(connection_id)
        except KeyNotFoundError:
            return None
        if not entry.value or entry.revision is None:
            return None
        return Stored(decode_record(entry.value), entry.revision)

    async def all(self) -> list[Stored]:
        found = [Stored(decode_record(entry.value or b""), entry.revision)
                 for entry in await kvscan.current_values(self.kv) if entry.revision is not None]
        return sorted(found, key=lambda stored: stored.record.connection.id)

    async def create(self, record: ManagedRecord) -> int:
        """Store a new connection; 409 when its id is taken."""
        try:
            return await self.kv.create(record.connection.id, msgspec.json.encode(record))
        except KeyWrongLastSequenceError:
            raise _taken(record.connection.id) from None

    async def replace(self, record: ManagedRecord, revision: int) -> int:
        """Replace the record read at `revision`; 409 when another change came first."""
        try:
            return await self.kv.update(record.connection.id, msgspec.json.encode(record), last=revision)
        except KeyWrongLastSequenceError:
            raise _changed_meanwhile(record.connection.id) from None

    async def delete(self, connection_id: str, revision: int) -> None:
        try:
            await self.kv.delete(connection_id, last=revision)
        except KeyWrongLastSequenceError:
            raise _changed_meanwhile(connection_id) from None

    def seal(self, connection: cfg.Connection, names: set[str] | None = None) -> cfg.Connection:
        """`connection` with its secrets sealed (only those in `names`, when given: the others are
        sealed already)."""
        sealed = {name: self.box.seal(value, connection.id, name) if names is None or name in names else value
                  for name, value in connection.secrets.items()}
        return msgspec.structs.replace(connection, secrets=sealed)

    def open(self, record: ManagedRecord) -> cfg.Connection:
        """The record's connection with its secrets in the clear (`SealedWrongly` when one does not open)."""
        connection = record.connection
        plain = {name: self.box.open(value, connection.id, name) for name, value in connection.secrets.items()}
        return msgspec.structs.replace(connection, secrets=plain)


def checked(connection: cfg.Connection, others: list[cfg.Connection]) -> cfg.Connection:
    """`connection` checked as a config file's is (`config.check_connection`): a 400 naming the JSON path
    of what is wrong."""
    try:
        cfg.check_connection(connection, others)
    except ConfigError as exc:
        path, _, reason = str(exc).partition(": ")
        raise Refusal(400, "invalid", reason, path if path.startswith("$") else "$") from None
    return connection


def masked(secrets: Mapping[str, str]) -> dict[str, str]:
    return dict.fromkeys(secrets, MASKED)


async def rotate_all(store: ConnectionStore, to: SecretBox) -> list[tuple[ManagedRecord, list[str]]]:
    """Seal every stored connection's secrets again under `to`'s key (opened with `store`'s keys);
    values already under it are left. The records changed, each with the names of its secrets."""
    changed: list[tuple[ManagedRecord, list[str]]] = []
    for stored in await store.all():
        connection = stored.record.connection
        names = sorted(name for name, value in connection.secrets.items() if store.box.sealed_by(value) != to.current)
        if not names:
            continue
        plain = store.open(stored.record)
        resealed = {name: to.seal(plain.secrets[name], connection.id, name) if name in names else value
                    for name, value in connection.secrets.items()}
        moved = msgspec.structs.replace(connection, secrets=resealed)
        record = msgspec.structs.replace(stored.record, connection=moved, updated_at=utc_now())
        await store.replace(record, stored.revision)
        changed.append((record, names))
    return changed


def _taken(connection_id: str) -> Refusal:
    return Refusal(409, "exists", f"connection {connection_id!r} exists already", "$.id")


def _changed_meanwhile(connection_id: str) -> Refusal:
    return Refusal(409, "conflict", f"connection {connection_id!r} was changed by another request meanwhile; "
                                    "read it again and retry")
