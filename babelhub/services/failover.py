"""Failover: a message a connection has not delivered in time (or failed) is sent again via another.

A connection with `failover = { to = "<connection>", after_seconds = N }` arms a timer for every message
it sends: a copy of the message, under `timer_id`, held by the `Scheduler` until N seconds later (it
survives restarts; any process holding the conversation's partition releases it). A `delivered` (or
later) status of the message drops the timer. When the timer is released the conversation actor looks
at how far the message got: not delivered, it publishes `failover_copy` on the other connection's
conversation (its `out` subject, deduplicated by the copy's id: sent once whatever is redelivered) and
reports the original `failed` with code `failover` (`failover_error`). A send that fails outright, or a
`failed` status from the channel, fails over at once.
"""

from __future__ import annotations

import msgspec

from babelhub import canonical as c

__all__ = ["FAILOVER", "FAILOVER_OF_META", "FAILOVER_TO_META", "copy_id", "failover_copy", "failover_error",
           "timer_id"]

FAILOVER = "failover"
"""The error code of a message that was sent again via another connection (and the timers' reason)."""
FAILOVER_TO_META = "babelhub.failover_to"
"""Message meta naming the recipient's native id on the failover connection (a phone number for an SMS
fallback of a chat); unset = the same native id as on the first connection."""
FAILOVER_OF_META = "babelhub.failover_of"
"""Meta of a failover copy (and of a failover timer): the id of the message it stands in for."""


def timer_id(message_id: str) -> str:
    """The id a message's failover timer is held under (one per message: arming it again replaces it)."""
    return c.stable_id("failover-timer", message_id)


def copy_id(message_id: str) -> str:
    """The id of a message's copy on the failover connection: derived, so that making it again (a
    redelivery, a crash) names the same message, which the stream's deduplication keeps to one."""
    return c.stable_id("failover", message_id)


def failover_copy(message: c.Message, connection: str, channel: str, native_id: str) -> c.Message:
    """`message` as sent again to `native_id` through `connection`: its own id, the original's in meta,
    no references into the first chat (the other one never saw those messages)."""
    meta = {key: value for key, value in message.meta.items() if key != FAILOVER_TO_META}
    meta[FAILOVER_OF_META] = message.id
    there = c.Conversation(id=c.conversation_id(message.tenant, connection, native_id), channel=channel,
                           connection=connection, native_id=native_id)
    return msgspec.structs.replace(message, id=copy_id(message.id), conversation=there, targets=[], reply_to="",
                                   thread="", send_at=None, meta=meta)


def failover_error(after_seconds: float, copy: c.Message, cause: c.Error | None) -> c.Error:
    """The error of a message sent again elsewhere: why, and where its copy's statuses are reported
    (`native`: the copy's message id, connection and conversation; the channel's own error, if any)."""
    why = (f"{cause.code}: {cause.message}" if cause is not None
           else f"not delivered within {after_seconds:g} s")
    native: dict[str, object] = {"message_id": copy.id, "connection": copy.conversation.connection,
                                 "conversation": copy.conversation.id}
    if cause is not None:
        native["cause"] = msgspec.to_builtins(cause)
    return c.Error(code=FAILOVER, message=f"{why}; sent again via connection {copy.conversation.connection!r} "
                                          f"as message {copy.id}", native=native)
