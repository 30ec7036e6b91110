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

`ClientSession` is one socket speaking this protocol; the web chat (`websocket.py`) runs it too, for a
visitor whose credential is its own conversation and whose messages are `post`ed (`Visitor`).
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
from nats.js.api import StreamInfo
from prometheus_client import Counter, Gauge

from babelhub import canonical as c
from babelhub.errors import DecodeError, PayloadTooLarge
from babelhub.plugins import ExplainedSocket, RestApi, Services, bearer
from babelhub.services.apikeys import Caller
from babelhub.services.apikeys import Refused as KeyRefused
from babelhub.services.deadletters import DeadLetter
from babelhub.services.ingest import NATS_UNAVAILABLE
from babelhub.services.outbox import Refusal
from babelhub.services.rest import Endpoint, read_body
from babelhub.sessions import frames as f
from babelhub.sessions.auth import Credential, IssuedToken, Refused, SessionRequest, SessionTokens, read_request
from babelhub.sessions.feed import Feeds, Follower, Key, LiveFeed, Stored
from babelhub.sessions.limits import AddressSlots, FrameBudgets
from babelhub.sessions.tokens import load_session_key

__all__ = ["AUTH_SECONDS", "FORBIDDEN", "MAX_BAD_FRAMES", "MAX_SUBSCRIPTIONS", "TOO_MANY_ERRORS", "ClientSession",
           "ClientSessions", "Visitor"]

log = logging.getLogger("babelhub.sessions.clients")

AUTH_SECONDS: Final = 10.0
"""How long a socket that gave no credential with its upgrade has to send its `auth` frame."""
MAX_BAD_FRAMES: Final = 5
"""Frames a session may get wrong (each answered with an `error` frame) before it is closed with 4400."""
MAX_SUBSCRIPTIONS: Final = 32
"""Conversations one socket follows at once (each costs two consumers on the NATS server)."""
FORBIDDEN: Final = 4003
TOO_MANY_ERRORS: Final = 4400
TOO_SLOW: Final = 4008
OUTBOX_FRAMES: Final = 256
"""Frames waiting for a socket that does not read them; one more closes it with `TOO_SLOW`."""
_KEY_NAME: Final = "session-token-key"



class _Closed(Exception):
    """The session ends: close the socket with `code` and `reason`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class ClientSessions(RestApi):
    """The `clients` API: `POST /v1/sessions` and `WebSocket /ws`."""

    name = "clients"

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        settings = services.config.hub
        self._tokens: SessionTokens | None = None
        self._addresses = AddressSlots(settings.max_sockets_per_ip)
        self._budgets = FrameBudgets(settings.session_frame_rate, settings.session_frame_burst)
        self._sessions: set[ClientSession] = set()
        self._feeds = Feeds(services.ctx.js, services.ctx.subjects)
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
        return [*super().routes(), web.get("/ws", self._socket)]

    def endpoints(self) -> list[Endpoint]:
        return [Endpoint("POST", "/v1/sessions", self._issue, "read",
                         "Issue a session token for a client (conversations, rights, expiry)",
                         body=SessionRequest, answer=IssuedToken, status=201)]

    async def stop(self) -> None:
        """Shutdown: every client is told the hub is going away (1001), so it reconnects later."""
        await asyncio.gather(*(session.close(WSCloseCode.GOING_AWAY, "hub shutting down")
                               for session in list(self._sessions)), return_exceptions=True)
        await self._feeds.stop()

    # ------------------------------------------------------------------------------ POST /v1/sessions

    async def _issue(self, request: web.Request, caller: Caller) -> web.Response:
        try:
            asked = read_request(await read_body(request, self.services.config.hub.max_body_bytes))
        except DecodeError as exc:
            raise Refusal(400, "invalid", exc.reason, exc.path) from None
        if "send" in asked.rights and not caller.may("send"):
            raise Refusal(403, "forbidden", "a token with the send right needs a key with scope 'send'", "$.rights")
        token, expires = self.tokens.issue(caller.tenant, asked)
        return web.json_response({
            "token": token, "expires_at": datetime.fromtimestamp(expires, UTC).isoformat().replace("+00:00", "Z"),
            "tenant": caller.tenant, "conversations": sorted(set(asked.conversations)),
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
        session = ClientSession(self.services, socket, f"client-{next(self._numbers)}", self._budgets, self._feeds,
                                on_close=self._count_close)
        self._sessions.add(session)
        try:
            await socket.prepare(request)
            await session.run(await self._authenticate(request, session))
        finally:
            self._sessions.discard(session)
            self._addresses.release(address)
            self._budgets.forget_refilled(keep={s.key for s in self._sessions})
        return socket

    def _token_credential(self, token: str) -> Credential:
        """A session token's credential, while its tenant exists (a deleted tenant's tokens end with it)."""
        credential = self.tokens.credential(token)
        if not self.services.tenants.known(credential.tenant):
            raise Refused("the token's tenant no longer exists")
        return credential

    def _count_close(self, code: int) -> None:
        self.closes.labels(str(int(code))).inc()

    async def _authenticate(self, request: web.Request, session: ClientSession) -> Credential | None:
        """The `Authorization` header takes an API key or a session token; the URL and the auth frame take
        only session tokens: a URL ends up in proxies' logs, and a browser holding a tenant's key would
        hand it to every visitor. None: the socket was closed with the reason."""
        try:
            if presented := bearer(request.headers.get("Authorization", "")):
                if presented.startswith("v1.") and presented.count(".") == 2:
                    return self._token_credential(presented)
                return _key_credential(await self.services.keys.authenticate(presented))
            return self._token_credential(request.query.get("token", "") or await _auth_frame(session.socket))
        except (Refused, KeyRefused) as exc:
            await session.close(WSCloseCode.POLICY_VIOLATION, f"authentication failed: {exc}")
        except _Closed as closed:
            await session.close(closed.code, closed.reason)
        return None


@dataclass
class _Subscription:
    conversation: str
    following: list[tuple[LiveFeed, Key, Follower]]
    """Each stream's feed, the key followed on it, and this subscription's follower."""
    epoch: str = ""


@dataclass(frozen=True)
class Visitor:
    """A web chat visitor's side of a session: what it `post`s is recorded as its channel's inbound
    (`post` raises like `Ingest.record`), and the messages it is shown are those the channel can show
    (`present`)."""

    post: Callable[[bytes], Awaitable[None]]
    present: Callable[[c.Message], c.Message]


class ClientSession:
    """One socket speaking the protocol: its credential, its subscriptions, its count of bad frames."""

    def __init__(self, services: Services, socket: ExplainedSocket, key: str, budgets: FrameBudgets, feeds: Feeds,
                 *, visitor: Visitor | None = None, on_close: Callable[[int], None] | None = None) -> None:
        self.ctx = services.ctx
        self.settings = services.config.hub
        self.feeds = feeds
        self.socket = socket
        self.key = key
        """Names the session in the frame budgets (kept across a visitor's reconnects)."""
        self.budgets = budgets
        self.visitor = visitor
        self.on_close = on_close
        self.credential: Credential | None = None
        self.subscriptions: dict[str, _Subscription] = {}
        self.bad_frames = 0
        # What goes to the client waits here for the socket: the live feeds hand frames over without
        # waiting, so a client that reads slowly holds up nobody but itself.
        self._outbox: asyncio.Queue[f.HubFrame | None] = asyncio.Queue(OUTBOX_FRAMES)
        self._too_slow = False

    async def run(self, credential: Credential | None) -> None:
        """Serve the socket as `credential` until either side closes it (None: it is closed already)."""
        if credential is None:
            return
        self.credential = credential
        writer = asyncio.create_task(self._write(), name=f"client-session-writer-{self.key}")
        try:
            await self._read_frames()
        except _Closed as closed:
            await self.close(closed.code, closed.reason)
        finally:
            for subscription in list(self.subscriptions.values()):
                self._drop(subscription)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def close(self, code: int, reason: str) -> None:
        if self.on_close is not None:
            self.on_close(code)
        await self.socket.close(code=code, message=reason.encode("utf-8")[:123])

    def send(self, frame: f.HubFrame) -> None:
        """Queue `frame` for the socket; a client that lets `OUTBOX_FRAMES` pile up is closed."""
        if self._too_slow:
            return
        try:
            self._outbox.put_nowait(frame)
        except asyncio.QueueFull:
            self._too_slow = True
            while not self._outbox.empty():  # it resumes from its cursor: nothing queued is owed
                self._outbox.get_nowait()
            self._outbox.put_nowait(None)

    async def _write(self) -> None:
        while (frame := await self._outbox.get()) is not None:
            # A socket closing under our feet drops the frame: the client resumes from its cursor.
            with contextlib.suppress(ConnectionResetError):
                await self.socket.send_str(f.encode(frame))
        await self.close(TOO_SLOW, f"too slow: {OUTBOX_FRAMES} frames waited to be read; resume from the cursor")

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
            if not self.budgets.take(self.key):
                settings = self.settings
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
                        self._drop(subscription)
                    self.send(f.Unsubscribed(conversation=conversation))
            case f.Send():
                await self._send(frame.envelope)
            case f.Post():
                await self._post(frame)
            case f.Ping():
                self.send(f.Pong(id=frame.id))

    async def _bad(self, text: str, code: str, reason: str, path: str, *, parked: bool = False) -> None:
        """Answer a frame that could not be used with an `error` frame; keep it as a dead letter (unless
        it is `parked` already)."""
        self.bad_frames += 1
        if not parked:
            await self._park(reason, path, text.encode("utf-8"))
        if self.bad_frames >= MAX_BAD_FRAMES:
            raise _Closed(TOO_MANY_ERRORS, f"too many bad frames ({MAX_BAD_FRAMES}); last: {reason} (at {path})")
        self.send(f.ErrorFrame(code=code, message=reason, path=path))

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
        conversations = list(dict.fromkeys(frame.conversations))
        for conversation in conversations:
            if (old := self.subscriptions.get(conversation)) is not None:
                self._drop(old)  # subscribing again moves the subscription to the new cursor
        try:
            # Follow first, then look at the streams: whatever is stored after that look comes live.
            for conversation in conversations:
                self.subscriptions[conversation] = await self._follow(conversation)
            js, subjects = self.ctx.js, self.ctx.subjects
            streams = await asyncio.gather(js.stream_info(subjects.stream_name("messages")),
                                           js.stream_info(subjects.stream_name("statuses")))
            epoch = _epoch(*streams)
            for conversation in conversations:
                cursor, recovered = _start(frame.since.get(conversation), epoch, *streams)
                self.send(f.Subscribed(conversation=conversation, recovered=recovered, since=cursor))
                await self._catch_up(self.subscriptions[conversation], cursor, recovered)
        except BaseException:
            for conversation in conversations:  # no subscription left holding back what it never delivers
                if (subscription := self.subscriptions.get(conversation)) is not None:
                    self._drop(subscription)
            raise

    async def _follow(self, conversation: str) -> _Subscription:
        assert self.credential is not None
        key = (self.credential.tenant, conversation)
        subscription = _Subscription(conversation, [])
        for feed, stream in ((self.feeds.messages, "messages"), (self.feeds.statuses, "statuses")):
            follower = Follower(0, self._deliverer(subscription, stream))
            subscription.following.append((feed, key, follower))
            await feed.follow(key, follower)
        return subscription

    async def _catch_up(self, subscription: _Subscription, cursor: f.Cursor, recovered: bool) -> None:
        """Deliver what came after `cursor` (only when it was `recovered`), then go live."""
        assert self.credential is not None
        subscription.epoch = cursor.epoch
        (_, _, messages), (_, _, statuses) = subscription.following
        messages.last, statuses.last = cursor.messages, cursor.statuses
        missed: tuple[list[Stored], list[Stored]] = ([], [])
        if recovered:
            missed = await self.feeds.missed(self.credential.tenant, subscription.conversation, cursor.messages,
                                             cursor.statuses)
        messages.caught_up(missed[0])
        statuses.caught_up(missed[1])

    def _deliverer(self, subscription: _Subscription, stream: str) -> Callable[[int, bytes], None]:
        assert self.credential is not None
        tenant, conversation = self.credential.tenant, subscription.conversation

        def deliver(offset: int, data: bytes) -> None:
            try:
                envelope = c.decode(data)
            except DecodeError:
                log.warning("skipped an unreadable envelope at %s %d", stream, offset)
                return
            if envelope.tenant != tenant or envelope.conversation.id != conversation:
                return  # the subject said so too; a stored envelope naming another is never shown
            if self.visitor is not None and isinstance(envelope, c.Message) and envelope.direction == "outbound":
                envelope = self.visitor.present(envelope)
            epoch = subscription.epoch
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
            self.send(frame)

        return deliver

    def _drop(self, subscription: _Subscription) -> None:
        self.subscriptions.pop(subscription.conversation, None)
        for feed, key, follower in subscription.following:
            feed.forget(key, follower)

    # ------------------------------------------------------------------------------------ send, post

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

    async def _post(self, frame: f.Post) -> None:
        if self.visitor is None:
            raise _Closed(FORBIDDEN, "forbidden: only a web chat visitor posts; a client sends envelopes with `send`")
        try:
            await self.visitor.post(bytes(frame.message))
        except DecodeError as exc:  # the ingest kept the frame as a dead letter
            await self._bad("", "bad_frame", exc.reason, "$.message" + exc.path.removeprefix("$"), parked=True)
        except PayloadTooLarge as exc:  # parked too; the frame limit normally stops it first
            raise _Closed(WSCloseCode.MESSAGE_TOO_BIG, f"frame too large to record (NATS takes {exc.limit} bytes)"
                          ) from None


async def _auth_frame(socket: ExplainedSocket) -> str:
    """The token of the `auth` frame a socket must send first when its upgrade carried no credential."""
    try:
        message = await socket.receive(timeout=AUTH_SECONDS)
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


def _key_credential(caller: Caller) -> Credential:
    """What an API key may do in client sessions: read and send in every conversation of its tenant, as
    far as its scopes go (the operator key is no tenant's)."""
    if caller.operator:
        raise Refused("the operator key belongs to no tenant")
    return Credential(tenant=caller.tenant, rights=frozenset(r for r in ("read", "send") if caller.may(r)))
