"""Delivering inbound envelopes to an app that answers each one (HTTP, NATS request/reply): per-conversation
lanes, retries until a deadline, and the app's answer taken in through the outbox.

nats-py runs a consumer's callback one message at a time, so a callback that waited on the app would hold
back every conversation of the processor behind one slow request. `Lanes.take` only hands the message to
its conversation's lane and returns; each lane is a task that delivers its messages one after the other
(in order within the conversation), and up to `max_conversations` lanes run at once. A lane holds at most
`LANE_SIZE` messages; beyond that, or beyond `max_conversations` lanes, the message goes back to the
server with a delayed `nak` (its backlog waits in the stream, not in memory), and later messages of its
conversation go back too until it has been taken, so none overtakes another.

Order across hub processes: the processor's inbound envelopes are read partition by partition, where the
process holds them (`ProcessorTransport.follow_inbound`), as the hub's own conversation consumers are.
A process that gives a partition up ends its lanes there and gives their messages back; the next
owner makes the consumer afresh from its acknowledged floor, so what the previous one held comes again at
once and in order (an envelope may then reach the app twice, with the same delivery id; its replies are
still sent once).

A transport supplies `deliver(Delivery) -> Outcome` (one attempt); the lanes do the rest:

* `Delivered(answer)`: the answer (a JSON list of outbound envelopes, or nothing) goes through
  `Outbox.submit`, each reply with the idempotency key `<delivery id>.<index>`, so a delivery retried
  after the app answered never sends a reply twice. A refused reply, or an answer that is not such a
  list, is kept as a dead letter with its JSON path; the delivery still counts as done.
* `Retry(error, after)`: tried again after an exponential backoff with full jitter (at least `after`
  seconds, the app's Retry-After), until `deadline_seconds` after the envelope was stored; then it is
  kept as a dead letter with the last error.
* `Rejected(error)`: kept as a dead letter at once.

The JetStream message is held (`InFlight`: "in progress" while it waits) and acknowledged once it is
delivered or dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable

import msgspec
import nats.errors
from nats.aio.msg import Msg

from babelhub import canonical as c
from babelhub.actors.admission import retry_delay
from babelhub.plugins import ProcessorTransport
from babelhub.services.deadletters import DeadLetter
from babelhub.services.inflight import Held, InFlight
from babelhub.services.outbox import Refusal
from babelhub.services.routing import hops_of

__all__ = [
    "LANE_SIZE",
    "MAX_ANSWER_BYTES",
    "MAX_REPLIES",
    "AnswerError",
    "Delivered",
    "Delivery",
    "Lanes",
    "Outcome",
    "Rejected",
    "Retry",
    "delivery_id",
    "replies_in",
]

log = logging.getLogger("babelhub.processors")

LANE_SIZE = 16
"""Messages one conversation's lane holds at most; more wait in the stream."""
MAX_ANSWER_BYTES = 1024 * 1024
"""Bytes of an app's answer at most (a larger one is a dead letter, not read further)."""
MAX_REPLIES = 64
"""Outbound envelopes one answer may carry."""
OUT_HOLD_SECONDS = 60.0
"""How long later messages of a conversation wait for one given back to the server to come back."""
RETRY_BASE = 0.2
RETRY_MAX = 60.0
"""Seconds: the backoff before retry n is drawn from [0, min(RETRY_MAX, RETRY_BASE * 2**n)]."""
TRACE_HEADERS = ("traceparent", "tracestate")


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """What one attempt hands the app."""

    id: str
    """The same on every attempt for this envelope and processor (`delivery_id`)."""
    body: bytes
    """The envelope's canonical JSON."""
    trace: dict[str, str]
    """The W3C trace context headers the envelope came with."""


class Delivered(msgspec.Struct, frozen=True):
    answer: bytes = b""


class Retry(msgspec.Struct, frozen=True):
    error: str
    after: float = 0.0
    """Seconds the app asked to be left alone (Retry-After)."""


class Rejected(msgspec.Struct, frozen=True):
    error: str


Outcome = Delivered | Retry | Rejected
Deliver = Callable[[Delivery], Awaitable[Outcome]]


class AnswerError(Exception):
    def __init__(self, message: str, path: str = "$") -> None:
        super().__init__(message)
        self.message = message
        self.path = path


def delivery_id(processor_id: str, envelope_id: str) -> str:
    """The stable id of one envelope's delivery to one processor (the same on every retry)."""
    return c.stable_id("delivery", processor_id, envelope_id)


def replies_in(answer: bytes) -> list[bytes]:
    """The outbound envelopes (JSON each) an app's answer carries: nothing for an empty answer, else a
    JSON list of at most `MAX_REPLIES` objects. Raises `AnswerError` with the JSON path of what is wrong."""
    if not answer.strip():
        return []
    if len(answer) > MAX_ANSWER_BYTES:
        raise AnswerError(f"the answer is larger than {MAX_ANSWER_BYTES} bytes")
    try:
        items = msgspec.json.decode(answer, type=list[msgspec.Raw])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise AnswerError(f"expected a JSON list of outbound envelopes: {exc}") from None
    if len(items) > MAX_REPLIES:
        raise AnswerError(f"an answer carries at most {MAX_REPLIES} envelopes, not {len(items)}")
    return [bytes(item) for item in items]


class _Job(msgspec.Struct, kw_only=True):
    held: Held
    tenant: str
    delivery: Delivery
    hops: int
    stored_at: float
    """Unix seconds when the stream stored the envelope: the deadline counts from there."""


class Lanes:
    """The lanes of one processor (see the module docstring)."""

    def __init__(self, transport: ProcessorTransport, deliver: Deliver, *, deadline_seconds: float,
                 max_conversations: int, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.transport = transport
        self.deliver = deliver
        self.deadline_seconds = deadline_seconds
        self.max_conversations = max_conversations
        self._sleep = sleep
        self._inflight = InFlight(transport.services.config.hub.ack_wait_seconds)
        self._lanes: dict[str, deque[_Job]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._held: set[int] = set()  # stream sequences in a lane: a redelivered copy is not taken twice
        # conversation -> {sequence given back and not yet taken again: when to stop waiting for it}
        self._out: dict[str, dict[int, float]] = {}

    async def start(self) -> None:
        services, processor = self.transport.services, self.transport.processor
        services.spawn(f"processor-{processor.id}-inflight", self._inflight.keep_alive)
        await self.transport.follow_inbound(self.take, on_leave=self._leave)

    async def stop(self) -> None:
        """End every lane; what they held goes back to the server at once, for the next process."""
        await self._end_lanes(lambda key: True)

    async def _leave(self, partition: int) -> None:
        """This process gave `partition` up: its lanes end and give their messages back."""
        subjects, tenant = self.transport.services.ctx.subjects, self.transport.processor.tenant
        await self._end_lanes(lambda key: subjects.partition(tenant, key) == partition)

    async def _end_lanes(self, chosen: Callable[[str], bool]) -> None:
        """End the `chosen` conversations' lanes, give back what they hold, and forget what they wait for
        (the next owner's consumer starts from the acknowledged floor, in order)."""
        keys = [key for key in {*self._lanes, *self._out} if chosen(key)]
        tasks = [self._tasks[key] for key in keys if key in self._tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for key in keys:
            lane = self._lanes.pop(key, None)
            self._out.pop(key, None)
            while lane:
                job = lane.popleft()
                self._held.discard(job.held.seq)
                with contextlib.suppress(nats.errors.Error):
                    await job.held.nak()

    # ------------------------------------------------------------------------------ taking

    async def take(self, msg: Msg, envelope: c.Envelope) -> None:
        """Queue `msg` on its conversation's lane without waiting, or give it back for later."""
        key, seq = envelope.conversation.id, int(msg.metadata.sequence.stream)
        if seq in self._held:  # redelivered while its lane still works on it: that one settles it
            return
        if self._waits(key, seq) or not self._has_room(key):
            self._turned_away(key, seq)
            await msg.nak(delay=retry_delay(int(msg.metadata.num_delivered or 1)))
            return
        self._taken(key, seq)
        self._held.add(seq)
        stored = msg.metadata.timestamp
        job = _Job(held=self._inflight.hold(msg), tenant=envelope.tenant, hops=hops_of(msg.headers),
                   stored_at=stored.timestamp() if stored is not None else time.time(),
                   delivery=Delivery(id=delivery_id(self.transport.processor.id, envelope.id), body=msg.data,
                                     trace={k: v for k, v in (msg.headers or {}).items() if k in TRACE_HEADERS}))
        lane = self._lanes.setdefault(key, deque())
        lane.append(job)
        if key not in self._tasks:
            self._tasks[key] = asyncio.create_task(self._work(key, lane), name=f"lane-{key}")

    def _has_room(self, key: str) -> bool:
        lane = self._lanes.get(key)
        if lane is None:
            return len(self._lanes) < self.max_conversations
        return len(lane) < LANE_SIZE

    def _turned_away(self, key: str, seq: int) -> None:
        self._out.setdefault(key, {})[seq] = time.monotonic() + OUT_HOLD_SECONDS

    def _waits(self, key: str, seq: int) -> bool:
        """Whether an earlier message of the conversation was given back and has not come back yet:
        `seq` must not overtake it. One that does not come back within `OUT_HOLD_SECONDS` (another hub
        process took it, or it left the stream) is waited for no longer."""
        out = self._out.get(key)
        if not out:
            return False
        now = time.monotonic()
        for expired in [held for held, until in out.items() if until < now]:
            del out[expired]
        if not out:
            del self._out[key]
            return False
        return min(out) < seq

    def _taken(self, key: str, seq: int) -> None:
        out = self._out.get(key)
        if out is not None:
            out.pop(seq, None)
            if not out:
                del self._out[key]

    # ------------------------------------------------------------------------------ working

    async def _work(self, key: str, lane: deque[_Job]) -> None:
        try:
            while lane:
                _raise_if_cancelled()
                job = lane[0]
                try:
                    await self._settle(job)
                except (nats.errors.Error, OSError, TimeoutError) as exc:
                    # NATS could not take the answer or the dead letter now: everything left in the lane
                    # goes back, in order, to be delivered again (the replies' keys absorb a second answer).
                    log.warning("processor %s: giving back %d message(s) of %s: %r",
                                self.transport.processor.id, len(lane), key, exc)
                    await self._give_back(key, lane)
                    return
                except Exception as exc:  # a defect: kept as a dead letter, and the conversation goes on
                    log.exception("processor %s: delivery failed", self.transport.processor.id)
                    try:
                        await self._park(job, f"delivery failed: {type(exc).__name__}")
                        await job.held.ack()
                    except (nats.errors.Error, OSError, TimeoutError):
                        await self._give_back(key, lane)
                        return
                lane.popleft()
                self._held.discard(job.held.seq)
        finally:
            if self._lanes.get(key) is lane and not lane:
                del self._lanes[key]
            if self._tasks.get(key) is asyncio.current_task():
                del self._tasks[key]

    async def _give_back(self, key: str, lane: deque[_Job]) -> None:
        while lane:
            job = lane.popleft()
            self._held.discard(job.held.seq)
            self._turned_away(key, job.held.seq)
            with contextlib.suppress(nats.errors.Error):
                await job.held.nak(retry_delay(job.held.deliveries))

    async def _settle(self, job: _Job) -> None:
        """Deliver `job` until it is answered, refused, or out of time; then acknowledge it."""
        attempt = 0
        while True:
            _raise_if_cancelled()
            outcome = await self.deliver(job.delivery)
            match outcome:
                case Delivered(answer=answer):
                    await self._take_answer(job, answer)
                    break
                case Rejected(error=error):
                    await self._park(job, f"the app refused the delivery: {error}")
                    break
                case Retry(error=error, after=after):
                    attempt += 1
                    delay = max(after, random.uniform(0, min(RETRY_MAX, RETRY_BASE * 2 ** min(attempt, 20))))
                    if time.time() + delay > job.stored_at + self.deadline_seconds:
                        await self._park(job, f"not delivered within {self.deadline_seconds:g} s "
                                              f"({attempt} attempts); last error: {error}")
                        break
                    await self._sleep(delay)
        await job.held.ack()

    async def _take_answer(self, job: _Job, answer: bytes) -> None:
        processor = self.transport.processor
        try:
            replies = replies_in(answer)
        except AnswerError as exc:
            await self._park(job, f"unreadable answer: {exc.message}", path=exc.path, body=answer[:MAX_ANSWER_BYTES])
            return
        outbox = self.transport.services.outbox
        for index, reply in enumerate(replies):
            try:
                await outbox.submit(job.tenant, reply, idempotency_key=f"{job.delivery.id}.{index}",
                                    origin=processor.id, hops=job.hops + 1)
            except Refusal as refusal:
                await self._park(job, f"reply refused ({refusal.code}): {refusal.message}",
                                 path=f"$[{index}]{refusal.path.removeprefix('$')}", body=reply)

    async def _park(self, job: _Job, error: str, *, path: str = "", body: bytes | None = None) -> None:
        """A dead letter for `job` (its envelope, or the `body` of the answer at fault); the request's
        headers (signature) are never in it."""
        ctx = self.transport.services.ctx
        await ctx.dead_letters.park(DeadLetter(
            stage="processor", error=f"processor {self.transport.processor.id}: {error}", path=path,
            tenant=job.tenant, subject=job.held.msg.subject, body=job.delivery.body if body is None else body))


def _raise_if_cancelled() -> None:
    """Honour a cancellation that was swallowed: nats-py's flush catches `CancelledError` (a publish or an
    unsubscribe cancelled mid-flush returns normally), and a task that went on would never stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
