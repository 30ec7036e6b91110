"""What happened to each outbound message: its status history, kept for `GET /v1/messages/{id}`.

One key per message in the `<prefix>_messages` KV bucket, `<tenant>.<message id>`, holding the states
it went through in order (`accepted → queued → sent → delivered → read → played`; `failed` or `deleted`
after any of them, ending it). `Outbox.submit` writes `accepted`; the statuses the conversation actors
publish are appended by one durable consumer that every hub process shares (`record`). Several
writers (the outbox, the consumer in two processes) meet on one key, so every write is a
revision-checked `create` or `update`, done again on a conflict: no writer loses another's step.

States only move forward: a step that is not later than the last one recorded is ignored (a
`delivered` receipt after `read`, a redelivered `sent`), so a message has at most one step per state,
and what each step keeps is bounded (`MAX_TEXT`): a history is never larger than a few kilobytes.
Keys live `HISTORY_SECONDS` after their last step (the bucket's max age).
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from typing import Final

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from babelhub import canonical as c
from babelhub.services.broker import BUCKETS, Subjects

__all__ = ["HISTORY_SECONDS", "MAX_TEXT", "MESSAGE_ID", "History", "MessageHistory", "Step", "is_message_id",
           "moves_forward"]

log = logging.getLogger("babelhub.history")

HISTORY_SECONDS: Final = BUCKETS["messages"]
MESSAGE_ID: Final = r"^[A-Za-z0-9_-]{1,64}$"
"""The ids a history is kept for: one KV key token (the hub's own ids are 24 base32 characters)."""
MAX_TEXT: Final = 512
"""Characters kept of a step's native id and error message (a channel's error can be a whole page)."""
_ATTEMPTS: Final = 16
"""Revision conflicts one write takes before it gives up (each one means another writer got through)."""

_ORDER: Final[dict[c.State, int]] = {
    "accepted": 0, "queued": 1, "sent": 2, "delivered": 3, "read": 4, "played": 5, "failed": 6, "deleted": 6}
_FINAL: Final = frozenset({"failed", "deleted"})
_MESSAGE_ID: Final = re.compile(MESSAGE_ID)


def is_message_id(token: str) -> bool:
    return _MESSAGE_ID.match(token) is not None


def moves_forward(last: c.State, new: c.State) -> bool:
    """Whether `new` may follow `last`: a later state, or `failed`/`deleted` after any state but those two."""
    if last in _FINAL:
        return False
    return new in _FINAL or _ORDER[new] > _ORDER[last]


class StepError(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Why a step failed: the canonical error without its `native` part (the channel's raw answer)."""

    code: str
    message: str = ""
    retryable: bool = False


class Step(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    state: c.State
    at: datetime
    native_id: str = ""
    error: StepError | None = None


class History(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    conversation: str
    statuses: list[Step]

    @property
    def state(self) -> c.State:
        return self.statuses[-1].state


class MessageHistory:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext, subjects: Subjects) -> MessageHistory:
        """The history in the bucket `provision` made."""
        return cls(await js.key_value(subjects.bucket("messages")))

    async def get(self, tenant: str, message_id: str) -> History | None:
        """`tenant`'s history of `message_id`; None when it has none (never another tenant's)."""
        if not is_message_id(message_id):
            return None
        try:
            entry = await self._kv.get(_key(tenant, message_id))
        except KeyNotFoundError:
            return None
        return msgspec.msgpack.decode(entry.value, type=History) if entry.value else None

    async def accepted(self, tenant: str, message_id: str, conversation: str) -> None:
        """The outbox took the message. Its statuses may have come first (it is written after the
        message is stored): `accepted` is then put before them."""
        await self._write(tenant, message_id, conversation, Step(state="accepted", at=c.now()))

    async def record(self, status: c.Status) -> bool:
        """Append what `status` says about its message; False when it moves nothing forward (or names
        no message a history can be kept for)."""
        if not is_message_id(status.message_id):
            return False
        error = status.error
        step = Step(state=status.state, at=status.ts, native_id=status.native_id[:MAX_TEXT],
                    error=StepError(code=error.code[:MAX_TEXT], message=error.message[:MAX_TEXT],
                                    retryable=error.retryable) if error is not None else None)
        return await self._write(status.tenant, status.message_id, status.conversation.id, step)

    async def _write(self, tenant: str, message_id: str, conversation: str, step: Step) -> bool:
        key = _key(tenant, message_id)
        for _ in range(_ATTEMPTS):
            try:
                entry = await self._kv.get(key)
            except KeyNotFoundError:
                entry = None
            try:
                if entry is None or not entry.value:  # absent, or deleted and not yet purged
                    history = History(id=message_id, conversation=conversation, statuses=[step])
                    await self._kv.create(key, msgspec.msgpack.encode(history))
                    return True
                history = msgspec.msgpack.decode(entry.value, type=History)
                changed = _with(history, step)
                if changed is None:
                    return False
                await self._kv.update(key, msgspec.msgpack.encode(changed), last=entry.revision)
                return True
            except KeyWrongLastSequenceError:
                continue  # another writer got there first: read its version and try again
        raise RuntimeError(f"history of {message_id}: {_ATTEMPTS} revision conflicts in a row")


def _with(history: History, step: Step) -> History | None:
    """`history` with `step`, or None when the step moves nothing forward."""
    states = [existing.state for existing in history.statuses]
    if step.state == "accepted":  # true before anything else, whenever it is written
        if "accepted" in states:
            return None
        return msgspec.structs.replace(history, statuses=[step, *history.statuses])
    if not moves_forward(history.state, step.state):
        return None
    return msgspec.structs.replace(history, statuses=[*history.statuses, step])


def _key(tenant: str, message_id: str) -> str:
    return f"{tenant}.{message_id}"
