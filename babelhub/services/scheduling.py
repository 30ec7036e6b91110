"""Outbound messages held for later: a `send_at` in the future, or quiet hours on their connection.

The conversation actor hands a message it must not send yet to `Scheduler.hold`, which keeps it in the
`<prefix>_scheduled` KV bucket (it survives restarts) under a key of its tenant and id, and reports it
`queued`. `Scheduler.run`, a supervised task in every hub process, releases what is due — only for the
partitions this process holds — by marking it as being released (revision checked: a cancel that came
first wins; one that comes later finds it no longer cancellable), publishing it again on its
conversation's `out` subject, then deleting the key (a release cut short is finished by the next round:
nothing held is lost, and the publish is deduplicated). It goes out under an id of its own
(`released_id`) with the original in meta (`HELD_ID_META`): the conversation actor then sends it through
the normal path and reports on the original id. `Scheduler.cancel(tenant, id)` deletes a held message
before its release begins and reports it `deleted` with the error code `cancelled`; an outbound `delete`
part naming the id does the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import msgspec
import nats.errors
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from babelhub import canonical as c
from babelhub.services import kvscan
from babelhub.services.broker import Subjects
from babelhub.services.publisher import Publisher
from babelhub.services.supervise import TaskHealth

__all__ = ["HELD_ID_META", "Held", "Scheduler", "held_key", "released_id"]

log = logging.getLogger("babelhub.scheduling")

HELD_ID_META = "babelhub.held_id"
"""Meta of a released message: the id the app gave it (statuses name that one)."""
CANCELLED = "cancelled"


class Held(msgspec.Struct, frozen=True, kw_only=True):
    """One message held for later, as stored."""

    due: float
    """Unix time from which it may be sent."""
    tenant: str
    conversation: str
    partition: int
    reason: str
    """`send_at` or `quiet_hours`."""
    envelope: bytes
    """The message's canonical JSON, as the app sent it."""
    releasing: bool = False
    """Its release has begun: it can no longer be cancelled, and a release cut short is finished later."""


def held_key(tenant: str, message_id: str) -> str:
    """A KV key of a tenant's held message: the id is hashed (an app's ids may hold any character)."""
    return f"{tenant}.{c.stable_id('held', message_id)}"


def released_id(message_id: str) -> str:
    """The id a held message is released under: its own, so the conversation does not take it for the
    message it already applied (by holding it)."""
    return c.stable_id("released", message_id)


class Scheduler:
    def __init__(self, kv: KeyValue, publisher: Publisher, subjects: Subjects, holds: Callable[[int], bool],
                 clock: Callable[[], float], interval: float = 1.0) -> None:
        """`holds(partition)`: whether this process may release that partition's messages now;
        `clock`: wall-clock Unix time; `interval`: seconds between two looks for what is due."""
        self._kv = kv
        self._publisher = publisher
        self._subjects = subjects
        self._holds = holds
        self._clock = clock
        self._interval = interval

    async def hold(self, message_id: str, held: Held) -> None:
        """Keep `held` until it is due (a repeat of the same message replaces it)."""
        await self._kv.put(held_key(held.tenant, message_id), msgspec.msgpack.encode(held))

    async def cancel(self, tenant: str, message_id: str) -> bool:
        """Drop a tenant's held message before it is released and report it `deleted` (`cancelled`).
        False when the tenant holds no such message (sent already, cancelled, or never held)."""
        taken = await self._take(held_key(tenant, message_id))
        if taken is None:
            return False
        message = c.decode(taken.envelope)
        status = c.Status(
            id=c.stable_id("status", message.id, "deleted"), tenant=tenant, conversation=message.conversation,
            ts=c.now(), direction="outbound", message_id=message.id, state="deleted",
            error=c.Error(code=CANCELLED, message="cancelled before it was sent"))
        await self._publisher.publish(self._subjects.status(tenant, taken.conversation), c.encode(status),
                                      dedup=(status.id,))
        return True

    async def take(self, tenant: str, message_id: str) -> Held | None:
        """Drop a tenant's held message before it is released, reporting nothing (a failover timer that
        is no longer needed); None when there is none to take."""
        return await self._take(held_key(tenant, message_id))

    async def release_due(self) -> int:
        """Release every held message that is due and whose partition this process holds."""
        released = 0
        now = self._clock()
        for entry in await kvscan.current_values(self._kv):
            held = msgspec.msgpack.decode(entry.value or b"", type=Held)
            if held.due > now or not self._holds(held.partition):
                continue
            if await self._release(entry.key, held, entry.revision or 0):
                released += 1
        return released

    async def run(self, health: TaskHealth) -> None:
        """Look for what is due every `interval` seconds (a supervised task)."""
        while True:
            try:
                await self.release_due()
                health.ok()
            except nats.errors.Error as exc:
                log.warning("scheduled messages: could not look for due ones: %r", exc)
            await asyncio.sleep(self._interval)

    async def _take(self, key: str) -> Held | None:
        """Delete a held message that is not being released; None when there is none to take."""
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return None
        if msgspec.msgpack.decode(entry.value or b"", type=Held).releasing:
            return None
        try:
            await self._kv.delete(key, last=entry.revision)
        except KeyWrongLastSequenceError:
            return None
        return msgspec.msgpack.decode(entry.value or b"", type=Held)

    async def _release(self, key: str, held: Held, revision: int) -> bool:
        """Mark the message as being released (a cancel that comes later finds it so), publish it, then
        delete it. A publish that fails leaves it marked, and the next round publishes it again under
        the same deduplicated id. False when a cancel or another releaser came first."""
        try:
            if not held.releasing:
                held = msgspec.structs.replace(held, releasing=True)
                revision = await self._kv.update(key, msgspec.msgpack.encode(held), last=revision)
        except KeyWrongLastSequenceError:
            return False
        message = c.decode(held.envelope)
        released = msgspec.structs.replace(message, id=released_id(message.id),
                                           meta={**message.meta, HELD_ID_META: message.id})
        await self._publisher.publish(self._subjects.outbound(held.tenant, held.conversation), c.encode(released),
                                      dedup=(released.id,))
        # Another process that finished the same release first had its publish deduplicated with this one.
        with contextlib.suppress(KeyWrongLastSequenceError):
            await self._kv.delete(key, last=revision)
        return True
