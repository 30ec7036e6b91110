"""The `websocket` processor transport: the app connects to the hub, gets its inbound envelopes on a
socket and answers on the same socket (`websocket_frames.py` has the frames).

* **Connect**: `WebSocket /ws/processor?processor=<id>` with `Authorization: Bearer <tenant API key>`
  (`processor` may be left out when the tenant has one websocket processor). An unknown key is refused
  before the upgrade with 401, a processor the key's tenant does not have (another tenant's included)
  with 404, both in the hub's error shape.
* **Deliver**: each websocket processor has a durable JetStream pull consumer `processor-<id>` on its
  tenant's inbound subjects, shared by every hub process. A process fetches from it only while an app
  socket of that processor is open there, at most `window` unacknowledged envelope frames at a time:
  while no app is connected the envelopes simply wait in JetStream (nothing fetched, nothing
  redelivered, no loop). An envelope is acknowledged to JetStream when the app acks its `seq`.
* **Resume**: when a socket ends, what it had not acknowledged is handed back (redelivered after
  `HAND_BACK_SECONDS`, in stream order) and comes again on the next socket, on any hub process.
  `?after=<last acked seq>` covers an `ack` lost with the socket: on the same hub process, what the
  last socket was sent up to that seq is taken as acknowledged. At least once: `seq` lets the app drop
  a repeat. (An envelope the server was sending just as the socket ended comes back after
  `hub.ack_wait_seconds`.)
* **Answer**: a `send` frame goes through `Outbox.submit` (origin = the processor id; hops one more than
  those of the envelope it answers: the delivered envelope its `reply_to` names, else the last one
  delivered in its conversation) and is answered by `accepted` or `error` with the JSON path.

One instance is built per `[[processors]]` entry, but one path can be served only once: the first
websocket processor's instance mounts `/ws/processor` and hands each socket to the instance of the
processor it names (the instances of one hub find each other through `_siblings`).

Close codes: 1009 a frame over `hub.max_frame_bytes`; 1003 a binary frame; 4400 `MAX_BAD_FRAMES`
frames that could not be used; 4409 another socket of the same processor connected to this hub
process (the newer one wins; sockets on different processes share the processor's envelopes);
4008 an app that lets `OUTBOX_EXTRA` frames beyond its window wait unread; 1013 NATS unavailable;
1011 delivery failed otherwise; 1001 the hub stopping. After any of them the app reconnects with
`?after=`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections import OrderedDict, deque
from typing import Annotated, ClassVar, Final

import msgspec
import nats.errors
from aiohttp import WebSocketError, WSCloseCode, WSMsgType, web
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from babelhub import canonical as c
from babelhub.errors import DecodeError
from babelhub.plugins import ExplainedSocket, ProcessorTransport, Services, bearer
from babelhub.processors import websocket_frames as f
from babelhub.services.apikeys import Refused
from babelhub.services.config import Processor
from babelhub.services.deadletters import DeadLetter
from babelhub.services.inflight import Held, InFlight
from babelhub.services.ingest import NATS_UNAVAILABLE
from babelhub.services.outbox import Outbox, Refusal
from babelhub.services.routing import hops_of

__all__ = ["FETCH_SECONDS", "MAX_BAD_FRAMES", "OUTBOX_EXTRA", "PATH", "REPLACED", "TOO_MANY_ERRORS", "TOO_SLOW",
           "WebSocketOptions", "WebSocketTransport"]

log = logging.getLogger("babelhub.processors.websocket")

PATH: Final = "/ws/processor"
MAX_BAD_FRAMES: Final = 5
"""Frames an app may get wrong (each answered with an `error` frame) before its socket is closed with 4400."""
TOO_MANY_ERRORS: Final = 4400
REPLACED: Final = 4409
TOO_SLOW: Final = 4008
OUTBOX_EXTRA: Final = 256
"""Frames other than envelopes (answers to `send` and `ping`) that may wait for an app that does not read."""
FETCH_SECONDS: Final = 5.0
"""How long one pull request waits at the server for envelopes (then another is sent: one per period while
idle)."""
JS_API: Final = "$JS.API"
"""The JetStream API prefix of the hub's NATS connection (`nc.jetstream()`, no domain)."""
HAND_BACK_SECONDS: Final = 0.2
"""After how long what a socket left unacknowledged is redelivered. Not at once: the server puts a message
naked at once behind the others when it first meets the ended socket's pull request (no interest any
more), while naks with a delay come back together, in stream order."""
REMEMBERED_HOPS: Final = 4096
"""Delivered envelopes whose hop counts a socket remembers, for the answers that name them in `reply_to`."""


class WebSocketOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    window: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 256
    """Envelope frames sent and not yet acknowledged, at most (the consumer's `max_ack_pending` is 1000)."""


class WebSocketTransport(ProcessorTransport):
    name = "websocket"
    Options = WebSocketOptions

    _hubs: ClassVar[weakref.WeakKeyDictionary[Outbox, dict[str, WebSocketTransport]]] = weakref.WeakKeyDictionary()
    """The websocket processors of each hub (keyed by its one Outbox), so the first can serve them all."""

    def __init__(self, processor: Processor, services: Services) -> None:
        super().__init__(processor, services)
        self.options = self.read("options", WebSocketOptions)
        self._siblings = self._hubs.setdefault(services.outbox, {})
        self._siblings[processor.id] = self
        self._inflight = InFlight(services.config.hub.ack_wait_seconds)
        self.next_subject = (f"{JS_API}.CONSUMER.MSG.NEXT.{services.ctx.subjects.stream_name('messages')}."
                             f"processor-{processor.id}")
        """Where pull requests go (each asks for a batch of envelopes, answered on the socket's own inbox)."""
        self._current: _AppSocket | None = None
        self._newest: object = None
        """The latest socket to arrive: one that finds a newer one arrived while it waited gives way."""
        self._serving = asyncio.Lock()
        """One socket of this processor at a time in this process: the next waits for the last to hand back."""
        self.closing: set[asyncio.Task[None]] = set()
        """Replaced sockets being closed."""
        self.handed_back: list[int] = []
        """The seqs the last socket was sent and did not acknowledge, in the order they were sent."""

    def routes(self) -> list[web.RouteDef]:
        first = next(iter(self._siblings.values()))
        return [web.get(PATH, self._socket)] if first is self else []

    async def start(self) -> None:
        await self._pull_consumer()
        self.services.spawn(f"ws-processor-keepalive-{self.processor.id}", self._inflight.keep_alive)

    async def stop(self) -> None:
        """Shutdown: the app is told the hub is going away (1001) and what it held is handed back."""
        if self._current is not None:
            await self._current.close(WSCloseCode.GOING_AWAY, "hub shutting down")
        async with self._serving:  # the socket's unacknowledged envelopes are handed back
            self._siblings.pop(self.processor.id, None)
        await asyncio.gather(*self.closing, return_exceptions=True)

    def acked_up_to(self, after: int) -> set[int]:
        """What a socket resuming `?after=<seq>` acknowledged without the hub reading it: the envelopes the
        last socket was sent up to and including `seq` (acks are cumulative in the order frames were sent).
        Nothing when `seq` is not among them (its ack arrived, or the last socket was on another process:
        then what comes again is at least once, told apart by `seq`)."""
        sent, self.handed_back = self.handed_back, []
        return set(sent[:sent.index(after) + 1]) if after in sent else set()

    async def _pull_consumer(self) -> None:
        """Make the processor's durable pull consumer if it is missing. A push consumer of the same name
        (the processor had another transport) is remade as a pull one from its acknowledged floor; one per
        partition (a transport that followed partitions) from the lowest of theirs (what came after it in
        another partition comes again: at least once, told apart by `seq`)."""
        ctx, durable = self.services.ctx, f"processor-{self.processor.id}"
        stream, inbound = ctx.subjects.stream_name("messages"), f"{ctx.subjects.prefix}.{self.processor.tenant}.in.>"
        config = ConsumerConfig(durable_name=durable, filter_subject=inbound,
                                ack_policy=AckPolicy.EXPLICIT, ack_wait=self.services.config.hub.ack_wait_seconds,
                                deliver_policy=DeliverPolicy.ALL, max_ack_pending=1000)
        try:
            info = await ctx.js.consumer_info(stream, durable)
        except NotFoundError:
            floor = await self._retire_partition_consumers(stream, durable)
            if floor:
                config.deliver_policy, config.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, floor + 1
            await ctx.js.add_consumer(stream, config)
        else:
            if info.config.deliver_subject:
                await ctx.js.delete_consumer(stream, durable)
                floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
                if floor:
                    config.deliver_policy, config.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, floor + 1
                await ctx.js.add_consumer(stream, config)

    async def _retire_partition_consumers(self, stream: str, durable: str) -> int:
        """Delete the consumers `<durable>-<partition>`; the lowest acknowledged floor among them (one with
        nothing pending or unacknowledged has handled its partition up to the stream's end), 0: none."""
        js, floors = self.services.ctx.js, []
        end = (await js.stream_info(stream)).state.last_seq
        for info in await js.consumers_info(stream):
            prefix, _, partition = info.name.rpartition("-")
            if prefix == durable and partition.isdigit():
                caught_up = not info.num_pending and not info.num_ack_pending
                floors.append(end if caught_up else info.ack_floor.stream_seq if info.ack_floor is not None else 0)
                with contextlib.suppress(NotFoundError):
                    await js.delete_consumer(stream, info.name)
        return min(floors, default=0)

    # ------------------------------------------------------------------------------ WebSocket /ws/processor

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        try:
            caller = await self.services.keys.authenticate(bearer(request.headers.get("Authorization", "")))
        except Refused as exc:
            return _error(401, "unauthenticated", f"{exc}: send `Authorization: Bearer <tenant API key>`", "",
                          headers={"WWW-Authenticate": "Bearer"})
        if caller.operator or not (caller.may("read") and caller.may("send")):
            return _error(403, "forbidden", "a processor needs a tenant key with scopes 'read' and 'send'", "")
        tenant = caller.tenant
        named = request.query.get("processor", "")
        ours = [transport for transport in self._siblings.values() if transport.processor.tenant == tenant]
        if not named and len(ours) > 1:
            return _error(400, "bad_request", "this tenant has several websocket processors: name one with "
                          "?processor=<id>", "$.query.processor")
        # Another tenant's processor is answered exactly like one that does not exist.
        chosen = [transport for transport in ours if transport.processor.id == named or not named]
        if not chosen:
            return _error(404, "not_found", f"no websocket processor {named!r}" if named
                          else "this tenant has no websocket processor", "$.query.processor")
        after = request.query.get("after", "0")
        if not (after.isascii() and after.isdigit() and len(after) <= 19):
            return _error(400, "bad_request", "after is the last acknowledged seq: a non-negative integer",
                          "$.query.after")
        return await chosen[0].serve(request, int(after))

    async def serve(self, request: web.Request, after: int) -> web.StreamResponse:
        """Upgrade `request` and serve it as this processor's socket until either side closes it."""
        limit = self.services.config.hub.max_frame_bytes
        socket = ExplainedSocket(heartbeat=30.0, max_msg_size=limit, compress=False,
                                 too_big=f"frame larger than {limit} bytes (hub.max_frame_bytes)")
        await socket.prepare(request)
        self._newest = ticket = object()
        if self._current is not None:
            # Not waited for: the old socket's reading ends at once and it hands its envelopes back, while
            # its app may take up to the close timeout to answer the close.
            self._current.close_soon(REPLACED, "replaced by a newer connection of this processor")
        async with self._serving:
            if self._newest is ticket:
                app = self._current = _AppSocket(self, socket, after)
                try:
                    await app.run()
                finally:
                    if self._current is app:
                        self._current = None
                return socket
        # A newer socket arrived while this one waited for the last to hand back (closed outside the lock).
        await socket.close(code=REPLACED, message=b"replaced by a newer connection of this processor")
        return socket


class _Closed(Exception):
    """The socket ends: close it with `code` and `reason`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _AppSocket:
    """One app socket of one processor: what it was sent and has not acknowledged (in send order), what
    was fetched and waits for room in its window, and its count of bad frames."""

    def __init__(self, transport: WebSocketTransport, socket: ExplainedSocket, after: int) -> None:
        self.transport = transport
        self.processor = transport.processor
        self.services = transport.services
        self.socket = socket
        self.after = after
        self.acked_before = transport.acked_up_to(after)
        self.window = transport.options.window
        self.unacked: OrderedDict[int, Held] = OrderedDict()
        self.waiting: deque[tuple[Held, c.Envelope]] = deque()
        self.sent_up_to = 0
        self.room = asyncio.Event()
        self.room.set()
        self.request_ended = asyncio.Event()
        self.requested = 0
        """Envelopes the open pull request may still bring."""
        self.bad_frames = 0
        self.hops_by_id: OrderedDict[str, int] = OrderedDict()
        self.hops_by_conversation: OrderedDict[str, int] = OrderedDict()
        self._hops: dict[int, int] = {}
        self.subscription: Subscription | None = None
        self._outbox: asyncio.Queue[f.HubFrame | None] = asyncio.Queue(self.window + OUTBOX_EXTRA)
        self._closing = False

    async def run(self) -> None:
        self.send(f.Hello(processor=self.processor.id, resumed_from=self.after, window=self.window))
        writer = asyncio.create_task(self._write(), name=f"ws-processor-writer-{self.processor.id}")
        pump = asyncio.create_task(self._pump(), name=f"ws-processor-pump-{self.processor.id}")
        try:
            await self._read_frames()
        except _Closed as closed:
            await self.close(closed.code, closed.reason)
        finally:
            for task in (pump, writer):
                task.cancel()
            for task in (pump, writer):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._hand_back()

    async def close(self, code: int, reason: str) -> None:
        self._closing = True
        await self.socket.close(code=code, message=reason.encode("utf-8")[:123])

    def close_soon(self, code: int, reason: str) -> None:
        """Close in a task of its own (kept in `transport.closing` until it is done)."""
        task = asyncio.create_task(self.close(code, reason), name=f"ws-processor-close-{self.processor.id}")
        self.transport.closing.add(task)
        task.add_done_callback(self.transport.closing.discard)

    def send(self, frame: f.HubFrame) -> None:
        """Queue `frame` for the socket; an app that lets the queue fill up is closed (`TOO_SLOW`)."""
        if self._closing:
            return
        try:
            self._outbox.put_nowait(frame)
        except asyncio.QueueFull:
            self._closing = True
            while not self._outbox.empty():  # what it was not sent it gets again on its next socket
                self._outbox.get_nowait()
            self._outbox.put_nowait(None)

    async def _write(self) -> None:
        while (frame := await self._outbox.get()) is not None:
            with contextlib.suppress(ConnectionResetError):  # the reader sees the socket end
                await self.socket.send_str(f.encode(frame))
        await self.socket.close(code=TOO_SLOW, message=(
            f"too slow: {self._outbox.maxsize} frames waited to be read; reconnect with ?after=").encode())

    # ------------------------------------------------------------------------------------ delivery

    async def _pump(self) -> None:
        """Deliver until the socket ends; a failure closes the socket, so the app reconnects and is
        served afresh (what it held is handed back)."""
        try:
            await self._deliver()
        except NATS_UNAVAILABLE as exc:
            log.warning("processor %s: cannot fetch envelopes: %r", self.processor.id, exc)
            await self.close(WSCloseCode.TRY_AGAIN_LATER, "the hub cannot reach its streams right now; reconnect later")
        except Exception:
            log.exception("processor %s: delivery failed", self.processor.id)
            await self.close(WSCloseCode.INTERNAL_ERROR, "delivery failed; reconnect")

    async def _deliver(self) -> None:
        """Pull envelopes while the window has room, one request at a time; nothing is asked for while it
        is full. Envelopes are sent as they arrive (a request does not wait to fill its batch). The pull
        requests answer on an inbox of this socket's own: once it is unsubscribed the server forgets
        them, so what is handed back afterwards goes to the next socket, not to a request of this one."""
        nc = self.services.ctx.nats
        inbox = nc.new_inbox()
        subscription = await nc.subscribe(inbox, cb=self._arrived)
        self.subscription = subscription
        try:
            while True:
                await self.room.wait()
                room = self.window - len(self.unacked) - len(self.waiting)
                if room <= 0:
                    self.room.clear()
                    continue
                self.requested = room
                self.request_ended.clear()
                request = {"batch": room, "expires": int(FETCH_SECONDS * 1e9)}
                await nc.publish(self.transport.next_subject, msgspec.json.encode(request), reply=inbox)
                # (Bounded: should the server's end-of-request status be lost, ask again.)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.request_ended.wait(), FETCH_SECONDS + 1.0)
        finally:
            await self._unsubscribe()

    async def _unsubscribe(self) -> None:
        if (subscription := self.subscription) is not None:
            self.subscription = None
            with contextlib.suppress(nats.errors.Error):  # NATS gone: the server forgets the requests anyway
                await subscription.unsubscribe()

    async def _arrived(self, msg: Msg) -> None:
        """One answer to a pull request: an envelope, or a status that ends the request (408 expired, 404
        nothing more, 409 a limit of the consumer)."""
        if status := JetStreamContext.is_status_msg(msg):
            if status != "100":  # (100: a heartbeat)
                self.request_ended.set()
            return
        self.requested -= 1
        if self.requested <= 0:
            self.request_ended.set()
        await self.transport._routed(self._offer, msg)
        self._flush()

    async def _offer(self, msg: Msg, envelope: c.Envelope) -> None:
        seq = int(msg.metadata.sequence.stream)
        if seq in self.unacked or any(held.seq == seq for held, _ in self.waiting):
            return  # redelivered while still held here (its ack wait ran out in the client's queue)
        if seq in self.acked_before:
            self.acked_before.discard(seq)
            await msg.ack()  # acknowledged by the app on a socket that ended before the hub read the ack
            return
        self._hops[seq] = hops_of(msg.headers)
        self.waiting.append((self.transport._inflight.hold(msg), envelope))

    def _flush(self) -> None:
        while self.waiting and len(self.unacked) < self.window:
            held, envelope = self.waiting.popleft()
            self.unacked[held.seq] = held
            self.sent_up_to = max(self.sent_up_to, held.seq)
            self._remember_hops(envelope, self._hops.pop(held.seq, 0))
            self.send(f.EnvelopeFrame(seq=held.seq, envelope=envelope))
        if len(self.unacked) + len(self.waiting) >= self.window:
            self.room.clear()

    def _remember_hops(self, envelope: c.Envelope, hops: int) -> None:
        for remembered, key in ((self.hops_by_id, envelope.id), (self.hops_by_conversation, envelope.conversation.id)):
            remembered[key] = hops
            remembered.move_to_end(key)
            if len(remembered) > REMEMBERED_HOPS:
                remembered.popitem(last=False)

    async def _acked(self, seq: int) -> None:
        if seq not in self.unacked:
            if seq > self.sent_up_to:
                raise DecodeError(f"seq {seq} was not delivered on this socket", path="$.seq")
            return  # acknowledged already
        while self.unacked:
            delivered, held = self.unacked.popitem(last=False)
            await held.ack()
            if delivered == seq:
                break
        self._flush()
        if len(self.unacked) + len(self.waiting) < self.window:
            self.room.set()

    async def _hand_back(self) -> None:
        """The socket ended: what it was not sent or did not acknowledge goes back to JetStream, in order,
        for the next socket (of any hub process)."""
        await self._unsubscribe()  # first: a request still open would take the redeliveries
        self.transport.handed_back = list(self.unacked)
        held = sorted([*self.unacked.values(), *(held for held, _ in self.waiting)], key=lambda item: item.seq)
        self.unacked.clear()
        self.waiting.clear()
        self._hops.clear()
        for item in held:
            try:
                await item.nak(HAND_BACK_SECONDS)
            except NATS_UNAVAILABLE as exc:  # its ack wait brings it back anyway
                log.warning("could not hand back an envelope of processor %s: %r", self.processor.id, exc)

    # ------------------------------------------------------------------------------------ app frames

    async def _read_frames(self) -> None:
        async for message in self.socket:
            if message.type == WSMsgType.ERROR:
                if isinstance(message.data, WebSocketError):  # refused (too large), not a connection lost
                    await self._park(f"WebSocket frame refused: {message.data}", "$", b"")
                return
            if message.type == WSMsgType.BINARY:
                raise _Closed(WSCloseCode.UNSUPPORTED_DATA, "processor frames are JSON text")
            if message.type == WSMsgType.TEXT:
                await self._frame(message.data)

    async def _frame(self, text: str) -> None:
        try:
            frame = f.decode_app_frame(text)
        except DecodeError as exc:
            await self._bad(text, "", "bad_frame", exc.reason, exc.path)
            return
        try:
            match frame:
                case f.Ack():
                    await self._acked(frame.seq)
                case f.Send():
                    await self._submit(frame)
                case f.Ping():
                    self.send(f.Pong(id=frame.id))
        except DecodeError as exc:
            await self._bad(text, "", "refused", exc.reason, exc.path)
        except NATS_UNAVAILABLE as exc:
            log.warning("a processor's frame met NATS unavailable: %r", exc)
            raise _Closed(WSCloseCode.TRY_AGAIN_LATER, "the hub cannot reach its streams right now; reconnect later"
                          ) from None

    async def _submit(self, frame: f.Send) -> None:
        envelope = frame.envelope
        try:
            accepted = await self.services.outbox.submit(
                self.processor.tenant, msgspec.json.encode(envelope), idempotency_key=frame.idempotency_key,
                origin=self.processor.id, hops=self._hops_of_answer(envelope))
        except Refusal as exc:
            path = "$.idempotency_key" if exc.code == "invalid_idempotency_key" else (
                "$.envelope" + exc.path.removeprefix("$"))
            # A refused envelope is the app's to fix, not a broken socket: it does not count towards the close.
            await self._bad(msgspec.json.encode(frame).decode(), frame.ref, exc.code, exc.message, path, count=False)
            return
        self.send(f.Accepted(ref=frame.ref, id=accepted.id, conversation=accepted.conversation,
                             duplicate=accepted.duplicate))

    def _hops_of_answer(self, envelope: dict[str, object]) -> int:
        """One more than the envelope answered: the delivered one `reply_to` names, else the last delivered
        in the same conversation; 0 for a message that answers nothing delivered here."""
        reply_to, conversation = envelope.get("reply_to"), envelope.get("conversation")
        if isinstance(reply_to, str) and reply_to in self.hops_by_id:
            return self.hops_by_id[reply_to] + 1
        named = conversation.get("id") if isinstance(conversation, dict) else None
        if not named and isinstance(conversation, dict):
            connection, chat = conversation.get("connection"), conversation.get("native_id")
            if isinstance(connection, str) and isinstance(chat, str):
                named = c.conversation_id(self.processor.tenant, connection, chat)
        if isinstance(named, str) and named in self.hops_by_conversation:
            return self.hops_by_conversation[named] + 1
        return 0

    async def _bad(self, text: str, ref: str, code: str, reason: str, path: str, *, count: bool = True) -> None:
        """Answer a frame that could not be used with an `error` frame and keep it as a dead letter; too
        many unreadable ones close the socket."""
        self.bad_frames += count
        await self._park(reason, path, text.encode("utf-8"))
        if self.bad_frames >= MAX_BAD_FRAMES:
            raise _Closed(TOO_MANY_ERRORS, f"too many bad frames ({MAX_BAD_FRAMES}); last: {reason} (at {path})")
        self.send(f.ErrorFrame(ref=ref, code=code, message=reason, path=path))

    async def _park(self, error: str, path: str, body: bytes) -> None:
        try:
            await self.services.ctx.dead_letters.park(DeadLetter(
                stage="processor", error=error, path=path, tenant=self.processor.tenant, body=body))
        except NATS_UNAVAILABLE as exc:  # the app still gets its answer
            log.warning("could not park a bad processor frame: %r", exc)


def _error(status: int, code: str, message: str, path: str, headers: dict[str, str] | None = None) -> web.Response:
    """The hub's one error shape, before the upgrade."""
    return web.json_response(Refusal(status, code, message, path).body(), status=status, headers=headers)
