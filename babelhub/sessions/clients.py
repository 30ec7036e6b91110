"""Client sessions: `WebSocket /ws` delivers a tenant's conversations live to its own clients (web and
mobile apps, agent consoles), with resume; `POST /v1/sessions` issues the session tokens they use.

A session authenticates once (`auth.py`): `Authorization: Bearer <API key or session token>` on the
upgrade request, or `?token=<session token>` in its URL, or, when neither is given, an
`{"type": "auth", "token": <session token>}` first frame within `AUTH_SECONDS`. Then it speaks the frames of
`frames.py`. A subscription reads the conversation's stored subjects with two ordered JetStream
consumers, one on the messages stream (its `in` and `out` subjects) and one on the statuses stream,
built from the credential's tenant only. Each frame carries its sequence in that stream (`offset`) and
the `epoch` of the streams (from their creation times), so a client resuming with its last offsets
gets exactly what came after them, or `recovered: false` when the streams no longer hold all of it.

Close codes: 1008 a credential refused, no credential in time, or a socket or frame-rate limit;
1009 a frame over `hub.max_frame_bytes`; 1003 a binary frame; 4003 a subscribe or send the credential
does not allow; 4400 `MAX_BAD_FRAMES` frames that could not be used; 1001 the hub stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from aiohttp import WebSocketError, WSCloseCode, WSMsgType, web
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy, StreamInfo
from nats.js.client import JetStreamContext
from prometheus_client import Counter, Gauge

from babelhub import canonical as c
from babelhub.errors import DecodeError, PayloadTooLarge
from babelhub.plugins import Api, ExplainedSocket, Services
from babelhub.services.deadletters import DeadLetter
from babelhub.services.ingest import NATS_UNAVAILABLE
from babelhub.sessions import frames as f
from babelhub.sessions.auth import ApiKeys, Credential, Refused, SessionTokens, bearer, read_request
from babelhub.sessions.limits import AddressSlots, FrameBudgets
from babelhub.sessions.tokens import load_session_key

__all__ = ["AUTH_SECONDS", "FORBIDDEN", "MAX_BAD_FRAMES", "MAX_SUBSCRIPTIONS", "TOO_MANY_ERRORS", "ClientSessions"]

log = logging.getLogger("babelhub.sessions.clients")

AUTH_SECONDS: Final = 10.0
"""How long a socket that gave no credential with its upgrade has to send its `auth` frame."""
MAX_BAD_FRAMES: Final = 5
"""Frames a session may get wrong (each answered with an `error` frame) before it is closed with 4400."""
MAX_SUBSCRIPTIONS: Final = 32
"""Conversations one socket follows at once (each costs two consumers on the NATS server)."""
FORBIDDEN: Final = 4003
TOO_MANY_ERRORS: Final = 4400
_KEY_NAME: Final = "session-token-key"
_INACTIVE_SECONDS: Final = 5.0



class _Closed(Exception):
    """The session ends: close the socket with `code` and `reason`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class ClientSessions(Api):
    """The `clients` API: `POST /v1/sessions` and `WebSocket /ws`."""

    name = "clients"

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        settings = services.config.hub
        self._keys = ApiKeys(services.config.tenants)
        self._tokens: SessionTokens | None = None
        self._addresses = AddressSlots(settings.max_sockets_per_ip)
        self._budgets = FrameBudgets(settings.session_frame_rate, settings.session_frame_burst)
        self._sessions: set[_Session] = set()
        self._numbers = itertools.count()
        registry = services.ctx.metrics.registry
        Gauge("babelhub_client_sessions", "Open client-session sockets at /ws", registry=registry).set_function(
            lambda: len(self._sessions))
        Gauge("babelhub_client_subscriptions", "Conversations followed by client sessions", registry=registry
              ).set_function(lambda: sum(len(session.subscriptions) for session in self._sessions))
        self.closes = Counter("babelhub_client_session_closes", "Client sessions the hub closed, by close code",
                              ["code"], registry=registry)

    @property
    def tokens(self) -> SessionTokens:
        if self._tokens is None:
            raise RuntimeError("the client sessions are not started")
        return self._tokens

    async def start(self) -> None:
        """Load the token key (made once, shared by every hub process on the same NATS)."""
        ctx = self.services.ctx
        key = await load_session_key(ctx.js, ctx.subjects, _KEY_NAME, role="clients",
                                     replicas=self.services.config.hub.replicas)
        self._tokens = SessionTokens(key)

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/sessions", self._issue), web.get("/ws", self._socket)]

    async def stop(self) -> None:
        """Shutdown: every client is told the hub is going away (1001), so it reconnects later."""
        await asyncio.gather(*(session.close(WSCloseCode.GOING_AWAY, "hub shutting down")
                               for session in list(self._sessions)), return_exceptions=True)

    # ------------------------------------------------------------------------------ POST /v1/sessions

    async def _issue(self, request: web.Request) -> web.Response:
        try:
            credential = self._keys.credential(bearer(request.headers.get("Authorization", "")))
        except Refused as exc:
            return _error(401, "unauthenticated", f"{exc}: send `Authorization: Bearer <tenant API key>`",
                          headers={"WWW-Authenticate": "Bearer"})
        try:
            asked = read_request(await request.read())
        except DecodeError as exc:
            return _error(400, "bad_request", exc.reason, exc.path)
        token, expires = self.tokens.issue(credential.tenant, asked)
        return web.json_response({
            "token": token, "expires_at": datetime.fromtimestamp(expires, UTC).isoformat().replace("+00:00", "Z"),
            "tenant": credential.tenant, "conversations": sorted(set(asked.conversations)),
            "rights": sorted(set(asked.rights))}, status=201)

    # ------------------------------------------------------------------------------------ WebSocket /ws

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        limit = self.services.config.hub.max_frame_bytes
        # No permessage-deflate: zlib state per socket would multiply what an idle session costs.
        socket = ExplainedSocket(heartbeat=30.0, max_msg_size=limit, compress=False,
                                 too_big=f"frame larger than {limit} bytes (hub.max_frame_bytes)")
        address = request.remote or ""
        if not self._addresses.take(address):
            await socket.prepare(request)
            await socket.close(code=WSCloseCode.POLICY_VIOLATION, message=(
                f"too many sockets from one address: {self._addresses.limit} (hub.max_sockets_per_ip)").encode())
            return socket
        session = _Session(self, socket, f"client-{next(self._numbers)}")
        self._sessions.add(session)
        try:
            await socket.prepare(request)
            await session.run(request)
        finally:
            self._sessions.discard(session)
            self._addresses.release(address)
            self._budgets.forget_refilled(keep={s.key for s in self._sessions})
        return socket

    def authenticate(self, presented: str) -> Credential:
        """An API key or a session token (told apart by the token's shape)."""
        if presented.startswith("v1.") and presented.count(".") == 2:
            return self.tokens.credential(presented)
        return self._keys.credential(presented)

    def take_frame(self, key: str) -> bool:
        return self._budgets.take(key)


@dataclass
class _Subscription:
    conversation: str
    unsubscribe: list[Callable[[], Awaitable[None]]]


class _Session:
    """One client socket: its credential, its subscriptions, its count of bad frames."""

    def __init__(self, api: ClientSessions, socket: ExplainedSocket, key: str) -> None:
        self.api = api
        self.socket = socket
        self.key = key
        self.ctx = api.services.ctx
        self.credential: Credential | None = None
        self.subscriptions: dict[str, _Subscription] = {}
        self.bad_frames = 0
        self._sending = asyncio.Lock()

    async def run(self, request: web.Request) -> None:
        try:
            self.credential = await self._authenticate(request)
            await self._read_frames()
        except _Closed as closed:
            await self.close(closed.code, closed.reason)
        finally:
            for subscription in list(self.subscriptions.values()):
                await self._drop(subscription)

    async def close(self, code: int, reason: str) -> None:
        self.api.closes.labels(str(int(code))).inc()
        await self.socket.close(code=code, message=reason.encode("utf-8")[:123])

    async def send(self, frame: f.HubFrame) -> None:
        if self.socket.closed:
            return
        async with self._sending:  # frames from several consumers go out whole, one after the other
            # A socket closing under our feet drops the frame: the client resumes from its cursor.
            with contextlib.suppress(ConnectionResetError):
                await self.socket.send_str(f.encode(frame))

    # ------------------------------------------------------------------------------------ auth

    async def _authenticate(self, request: web.Request) -> Credential:
        """The `Authorization` header takes an API key or a session token; the URL and the auth frame take
        only session tokens: a URL ends up in proxies' logs, and a browser holding a tenant's key would
        hand it to every visitor."""
        try:
            if presented := bearer(request.headers.get("Authorization", "")):
                return self.api.authenticate(presented)
            token = request.query.get("token", "") or await self._auth_frame()
            return self.api.tokens.credential(token)
        except Refused as exc:
            raise _Closed(WSCloseCode.POLICY_VIOLATION, f"authentication failed: {exc}") from None

    async def _auth_frame(self) -> str:
        try:
            message = await self.socket.receive(timeout=AUTH_SECONDS)
        except TimeoutError:
            raise _Closed(WSCloseCode.POLICY_VIOLATION, f"no credential: send an auth frame within {AUTH_SECONDS:g} s"
                          ) from None
        if message.type != WSMsgType.TEXT:
            raise _Closed(WSCloseCode.POLICY_VIOLATION, "no credential: the first frame must be an auth frame")
        try:
            frame = f.decode_client_frame(message.data)
        except DecodeError as exc:  # never parked: the frame may hold a credential
            raise _Closed(WSCloseCode.POLICY_VIOLATION, f"the first frame must be an auth frame: {exc.reason} "
                          f"(at {exc.path})") from None
        if not isinstance(frame, f.Auth):
            raise _Closed(WSCloseCode.POLICY_VIOLATION, "authenticate first: the first frame must be an auth frame")
        return frame.token

    # ------------------------------------------------------------------------------------ frames

    async def _read_frames(self) -> None:
        async for message in self.socket:
            if message.type == WSMsgType.ERROR:
                if isinstance(message.data, WebSocketError):  # refused (too large), not a connection lost
                    await self._park(f"WebSocket frame refused: {message.data}", "$", b"")
                return
            if message.type == WSMsgType.BINARY:
                raise _Closed(WSCloseCode.UNSUPPORTED_DATA, "client-session frames are JSON text")
            if message.type != WSMsgType.TEXT:
                continue
            if not self.api.take_frame(self.key):
                settings = self.api.services.config.hub
                raise _Closed(WSCloseCode.POLICY_VIOLATION, (
                    f"frame rate limit: {settings.session_frame_rate:g}/s after a burst of "
                    f"{settings.session_frame_burst} (hub.session_frame_rate)"))
            await self._frame(message.data)

    async def _frame(self, text: str) -> None:
        try:
            frame = f.decode_client_frame(text)
        except DecodeError as exc:
            await self._bad(text, "bad_frame", exc.reason, exc.path)
            return
        if isinstance(frame, f.Auth):  # kept without its body: the token is a credential
            await self._bad("", "refused", "this session is authenticated already", "$.type")
            return
        try:
            await self._dispatch(frame)
        except DecodeError as exc:
            await self._bad(text, "refused", exc.reason, exc.path)
        except NATS_UNAVAILABLE as exc:
            log.warning("a client's frame met NATS unavailable: %r", exc)
            raise _Closed(WSCloseCode.TRY_AGAIN_LATER, "the hub cannot reach its streams right now; reconnect later"
                          ) from None

    async def _dispatch(self, frame: f.ClientFrame) -> None:
        match frame:
            case f.Subscribe():
                await self._subscribe(frame)
            case f.Unsubscribe():
                for conversation in frame.conversations:
                    if (subscription := self.subscriptions.get(conversation)) is not None:
                        await self._drop(subscription)
                    await self.send(f.Unsubscribed(conversation=conversation))
            case f.Send():
                await self._send(frame.envelope)
            case f.Ping():
                await self.send(f.Pong(id=frame.id))

    async def _bad(self, text: str, code: str, reason: str, path: str) -> None:
        """Answer a frame that could not be used with an `error` frame; keep it as a dead letter."""
        self.bad_frames += 1
        await self._park(reason, path, text.encode("utf-8"))
        if self.bad_frames >= MAX_BAD_FRAMES:
            raise _Closed(TOO_MANY_ERRORS, f"too many bad frames ({MAX_BAD_FRAMES}); last: {reason} (at {path})")
        await self.send(f.ErrorFrame(code=code, message=reason, path=path))

    async def _park(self, error: str, path: str, body: bytes) -> None:
        tenant = self.credential.tenant if self.credential else ""
        try:
            await self.ctx.dead_letters.park(DeadLetter(stage="session", error=error, path=path, tenant=tenant,
                                                        body=body))
        except NATS_UNAVAILABLE as exc:  # the client still gets its answer
            log.warning("could not park a bad client frame: %r", exc)

    def _allowed(self, right: str, conversation: str) -> None:
        assert self.credential is not None
        if not self.credential.may(right, conversation):  # type: ignore[arg-type]
            raise _Closed(FORBIDDEN, f"forbidden: this credential may not {right} conversation {conversation}")

    # ------------------------------------------------------------------------------------ subscribe

    async def _subscribe(self, frame: f.Subscribe) -> None:
        for conversation in frame.conversations:
            self._allowed("read", conversation)
        new = set(frame.conversations) - set(self.subscriptions)
        if len(self.subscriptions) + len(new) > MAX_SUBSCRIPTIONS:
            raise DecodeError(f"at most {MAX_SUBSCRIPTIONS} subscriptions per socket", path="$.conversations")
        js = self.ctx.js
        subjects = self.ctx.subjects
        streams = await asyncio.gather(js.stream_info(subjects.stream_name("messages")),
                                       js.stream_info(subjects.stream_name("statuses")))
        epoch = _epoch(*streams)
        for conversation in dict.fromkeys(frame.conversations):
            if (old := self.subscriptions.get(conversation)) is not None:
                await self._drop(old)  # subscribing again moves the subscription to the new cursor
            cursor, recovered = _start(frame.since.get(conversation), epoch, *streams)
            await self.send(f.Subscribed(conversation=conversation, recovered=recovered, since=cursor))
            self.subscriptions[conversation] = await self._follow(js, conversation, cursor)

    async def _follow(self, js: JetStreamContext, conversation: str, cursor: f.Cursor) -> _Subscription:
        assert self.credential is not None
        tenant, subjects = self.credential.tenant, self.ctx.subjects
        partition = subjects.partition(tenant, conversation)
        messages = [subjects.stored(subjects.inbound(tenant, conversation), partition),
                    subjects.stored(subjects.outbound(tenant, conversation), partition)]
        on_message = self._deliver(conversation, cursor.epoch, "messages")
        on_status = self._deliver(conversation, cursor.epoch, "statuses")
        subscription = _Subscription(conversation, [])
        try:
            for subject, stream, deliver, config in (
                    (messages[0], "messages", on_message, _from(cursor.messages + 1, filter_subjects=messages)),
                    (subjects.status(tenant, conversation), "statuses", on_status, _from(cursor.statuses + 1))):
                consumer = await js.subscribe(subject, stream=subjects.stream_name(stream), cb=deliver,
                                              ordered_consumer=True, config=config)
                subscription.unsubscribe.append(consumer.unsubscribe)
        except BaseException:
            await self._drop(subscription)  # not half a subscription left behind
            raise
        return subscription

    def _deliver(self, conversation: str, epoch: str, stream: str) -> Callable[[Msg], Awaitable[None]]:
        assert self.credential is not None
        tenant = self.credential.tenant

        async def deliver(msg: Msg) -> None:
            try:
                envelope = c.decode(msg.data)
            except DecodeError:
                log.warning("skipped an unreadable envelope on %s", msg.subject)
                return
            if envelope.tenant != tenant or envelope.conversation.id != conversation:
                return  # the subject said so too; a stored envelope naming another is never shown
            offset = msg.metadata.sequence.stream
            frame: f.HubFrame
            match envelope:
                case c.Status() if stream == "statuses":
                    frame = f.StatusFrame(offset=offset, epoch=epoch, envelope=envelope)
                case c.Message() if stream == "messages":
                    frame = f.MessageFrame(offset=offset, epoch=epoch, envelope=envelope)
                case c.Activity() if stream == "messages":
                    frame = f.ActivityFrame(offset=offset, epoch=epoch, envelope=envelope)
                case _:
                    return
            await self.send(frame)

        return deliver

    async def _drop(self, subscription: _Subscription) -> None:
        self.subscriptions.pop(subscription.conversation, None)
        for unsubscribe in subscription.unsubscribe:
            try:
                await unsubscribe()
            except NATS_UNAVAILABLE as exc:  # the server drops an ephemeral consumer nobody listens to
                log.debug("unsubscribe failed: %r", exc)

    # ------------------------------------------------------------------------------------ send

    async def _send(self, envelope: c.Message | c.Activity) -> None:
        assert self.credential is not None
        conversation = envelope.conversation.id
        if envelope.tenant != self.credential.tenant:
            raise _Closed(FORBIDDEN, "forbidden: the envelope names another tenant")
        self._allowed("send", conversation)
        if conversation not in self.subscriptions:
            raise DecodeError(f"subscribe to conversation {conversation} before sending to it",
                              path="$.envelope.conversation.id")
        if envelope.direction != "outbound":
            raise DecodeError("what a client sends is outbound", path="$.envelope.direction")
        subjects = self.ctx.subjects
        subject = subjects.outbound(envelope.tenant, conversation)
        try:
            await self.ctx.publisher.publish(subject, c.encode(envelope), dedup=(envelope.id,))
        except PayloadTooLarge as exc:
            raise DecodeError(str(exc), path="$.envelope") from None


def _epoch(messages: StreamInfo, statuses: StreamInfo) -> str:
    """Names the incarnation of both streams: recreating either (a new `created` time) changes it."""
    created = "|".join(str(info.created) for info in (messages, statuses))
    return hashlib.sha256(created.encode()).hexdigest()[:16]


def _start(since: f.Cursor | None, epoch: str, messages: StreamInfo, statuses: StreamInfo) -> tuple[f.Cursor, bool]:
    """Where a subscription starts, and whether that is exactly after the client's cursor. A cursor is
    trusted when it is of this epoch and each stream still holds every message after its offset (its
    first sequence is at most offset + 1, and the offset is no later than its last)."""
    if since is not None and since.epoch == epoch and all(
            info.state.first_seq <= offset + 1 and offset <= info.state.last_seq
            for info, offset in ((messages, since.messages), (statuses, since.statuses))):
        return since, True
    return f.Cursor(epoch=epoch, messages=messages.state.last_seq, statuses=statuses.state.last_seq), False


def _from(sequence: int, filter_subjects: list[str] | None = None) -> ConsumerConfig:
    """An ordered consumer's start; the server removes it `_INACTIVE_SECONDS` after its session is gone."""
    return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=sequence,
                          filter_subjects=filter_subjects, inactive_threshold=_INACTIVE_SECONDS)


def _error(status: int, code: str, message: str, path: str = "$", headers: dict[str, str] | None = None
           ) -> web.Response:
    """The one shape of the API's errors."""
    return web.json_response({"error": {"code": code, "message": message, "path": path}}, status=status,
                             headers=headers)
