"""What client sessions read: one live feed per stream for the whole hub process, and short catch-ups.

A consumer per subscribed conversation would not scale: nats-server (2.15 on) refuses more than 1,000
consumers on a stream by default, and every consumer costs the server memory and, in a cluster, a
round through its meta group. So a hub process reads each stream once, from the present on, with one
ordered consumer (`LiveFeed`), and hands each stored envelope to the sessions of this process that
follow its conversation. A session resuming from a cursor first reads what it missed with a consumer
of its own that lives only until it has caught up (`catch_up`, at most `CATCH_UPS` at once per
process), while what the live feed brings meanwhile is held back; `Follower` joins the two, in stream
order, each offset once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Final

from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from babelhub.services.broker import Subjects

__all__ = ["CATCH_UPS", "Feeds", "Follower", "LiveFeed", "Stored", "catch_up"]

log = logging.getLogger("babelhub.sessions.feed")

CATCH_UPS: Final = 64
"""Catch-up consumers one hub process holds at once; more resuming sessions wait their turn."""
_CATCH_UP_SECONDS: Final = 30.0
_HEARTBEAT_SECONDS: Final = 2.0
"""A feed that hears nothing for two of these is recreated where it stopped (nats-py's ordered consumer)."""
_INACTIVE_SECONDS: Final = 5.0

Stored = tuple[int, bytes]
"""An envelope as its stream holds it: its sequence in the stream, and its bytes."""
Key = tuple[str, str]
"""Tenant and conversation."""


class Follower:
    """One session's view of one conversation in one stream: delivers each sequence after `last` once,
    in order, holding live envelopes back while it catches up."""

    def __init__(self, last: int, deliver: Callable[[int, bytes], None]) -> None:
        self.last = last
        self._deliver = deliver
        self._held: list[Stored] | None = []
        """Live envelopes that came while catching up; None once caught up."""

    def live(self, sequence: int, data: bytes) -> None:
        if self._held is not None:
            self._held.append((sequence, data))
        else:
            self._take(sequence, data)

    def caught_up(self, missed: list[Stored]) -> None:
        """Deliver what the catch-up read, then what was held back, then go live."""
        held, self._held = self._held or [], None
        for sequence, data in [*missed, *held]:
            self._take(sequence, data)

    def _take(self, sequence: int, data: bytes) -> None:
        if sequence > self.last:
            self.last = sequence
            self._deliver(sequence, data)


class LiveFeed:
    """Everything stored in one stream under `filter_subjects` from the moment it starts, for the
    followers of this process. `key_of` reads tenant and conversation from a stored subject."""

    def __init__(self, js: JetStreamContext, stream: str, filter_subjects: list[str],
                 key_of: Callable[[str], Key | None]) -> None:
        self._js = js
        self.stream = stream
        self._filter_subjects = filter_subjects
        self._key_of = key_of
        self._followers: dict[Key, set[Follower]] = {}
        self._starting = asyncio.Lock()
        self._subscription: object | None = None

    async def follow(self, key: Key, follower: Follower) -> None:
        """From now on, `follower` hears of every envelope stored for `key` (the feed starts with the
        first follower, and is running when this returns)."""
        self._followers.setdefault(key, set()).add(follower)
        try:
            await self._start()
        except BaseException:
            self.forget(key, follower)
            raise

    def forget(self, key: Key, follower: Follower) -> None:
        followers = self._followers.get(key)
        if followers is not None:
            followers.discard(follower)
            if not followers:
                del self._followers[key]

    async def stop(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):  # the connection may be closing already
                await self._subscription.unsubscribe()  # type: ignore[attr-defined]
            self._subscription = None

    async def _start(self) -> None:
        async with self._starting:
            if self._subscription is not None:
                return
            last = (await self._js.stream_info(self.stream)).state.last_seq
            subscription = await self._js.subscribe(
                self._filter_subjects[0], stream=self.stream, cb=self._on_stored, ordered_consumer=True,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=last + 1,
                                      filter_subjects=self._filter_subjects, idle_heartbeat=_HEARTBEAT_SECONDS))
            # nats-py recreates a lost ordered consumer (the server restarted, heartbeats stopped) from the
            # last stream sequence it delivered, which it counts from 0: before the first envelope that
            # would replay the whole stream. It is told where the feed began.
            jsi = getattr(getattr(subscription, "_sub", None), "_jsi", None)
            if jsi is not None and getattr(jsi, "_sseq", None) == 0:
                jsi._sseq = last
            self._subscription = subscription

    async def _on_stored(self, msg: Msg) -> None:
        key = self._key_of(msg.subject)
        followers = self._followers.get(key) if key is not None else None
        if not followers:
            return
        sequence = msg.metadata.sequence.stream
        for follower in list(followers):
            follower.live(sequence, msg.data)


async def catch_up(js: JetStreamContext, stream: str, filter_subjects: list[str], after: int,
                   room: asyncio.Semaphore) -> list[Stored]:
    """What `stream` holds under `filter_subjects` after sequence `after`, up to its end, read with a
    consumer that is deleted at once."""
    async with room, asyncio.timeout(_CATCH_UP_SECONDS):
        return [stored async for stored in _read(js, stream, filter_subjects, after)]


async def _read(js: JetStreamContext, stream: str, filter_subjects: list[str], after: int
                ) -> AsyncIterator[Stored]:
    config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1,
                            filter_subjects=filter_subjects, inactive_threshold=_INACTIVE_SECONDS)
    subscription = await js.subscribe(filter_subjects[0], stream=stream, ordered_consumer=True, config=config)
    try:
        info = await subscription.consumer_info()
        # The server may have pushed everything already: what it delivered counts, besides what is left.
        pending = (info.num_pending or 0) + ((info.delivered.consumer_seq or 0) if info.delivered else 0)
        while pending:
            msg = await subscription.next_msg(timeout=_CATCH_UP_SECONDS)
            yield msg.metadata.sequence.stream, msg.data
            pending = msg.metadata.num_pending
    finally:
        with contextlib.suppress(Exception):  # the server drops it after `_INACTIVE_SECONDS` anyway
            await subscription.unsubscribe()


class Feeds:
    """The live feeds of the messages stream (`in` and `out` subjects) and of the statuses stream, and
    the room for catch-ups, as one plug-in's client sessions share them."""

    def __init__(self, js: JetStreamContext, subjects: Subjects) -> None:
        self._js = js
        self._subjects = subjects
        p = subjects.prefix
        self.messages = LiveFeed(js, subjects.stream_name("messages"), [f"{p}.*.in.*.*", f"{p}.*.out.*.*"],
                                 partial(_key_of, prefix=p, kinds=("in", "out"), parts=3))
        self.statuses = LiveFeed(js, subjects.stream_name("statuses"), [f"{p}.*.status.*"],
                                 partial(_key_of, prefix=p, kinds=("status",), parts=2))
        self._room = asyncio.Semaphore(CATCH_UPS)

    def filters(self, tenant: str, conversation: str) -> tuple[list[str], list[str]]:
        """The stored subjects of one conversation in the messages and the statuses stream."""
        subjects = self._subjects
        partition = subjects.partition(tenant, conversation)
        return ([subjects.stored(subjects.inbound(tenant, conversation), partition),
                 subjects.stored(subjects.outbound(tenant, conversation), partition)],
                [subjects.status(tenant, conversation)])

    async def missed(self, tenant: str, conversation: str, messages: int, statuses: int
                     ) -> tuple[list[Stored], list[Stored]]:
        """What both streams hold for the conversation after these offsets."""
        in_messages, in_statuses = self.filters(tenant, conversation)
        missed = await asyncio.gather(
            catch_up(self._js, self.messages.stream, in_messages, messages, self._room),
            catch_up(self._js, self.statuses.stream, in_statuses, statuses, self._room))
        return missed[0], missed[1]

    async def stop(self) -> None:
        await asyncio.gather(self.messages.stop(), self.statuses.stop())


def _key_of(subject: str, *, prefix: str, kinds: tuple[str, ...], parts: int) -> Key | None:
    """Tenant and conversation of a stored subject: `<prefix>.<tenant>.<kind>[.<partition>].<conversation>`."""
    tokens = subject.removeprefix(prefix + ".").split(".")
    if len(tokens) != parts + 1 or tokens[1] not in kinds:
        return None
    return tokens[0], tokens[-1]
