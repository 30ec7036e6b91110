"""The `discord_gateway` inbound source: the hub holds Discord's Gateway WebSocket itself, so a Discord
connection needs neither a public URL nor a bridge.

The protocol, from Discord's "Gateway" and "Gateway Events" documentation (API v10, JSON, no compression):
`GET /gateway/bot` (with the bot token) gives the URL to connect to, with `?v=10&encoding=json`. The
gateway says Hello (op 10) with a `heartbeat_interval`; the hub heartbeats (op 1, the last sequence
number or null) every interval, the first one after a random part of it, and answers a heartbeat the
gateway asks for (op 1) at once. A heartbeat not acknowledged (op 11) before the next one is due means
a zombied connection: it is closed and resumed. The hub identifies (op 2: token, intents, properties);
READY gives the `session_id` and the `resume_gateway_url`. After a drop, Reconnect (op 7), a resumable
Invalid Session (op 9, d true) or a close code that allows it, the hub connects to the resume URL and
sends Resume (op 6: token, session_id, seq), and Discord replays what was missed. An Invalid Session
that cannot be resumed (d false), or close codes 4007 and 4009, start a new session (identify, after 1
to 5 seconds for op 9). Close codes 4004 (authentication failed) and 4010 to 4014 (shards, version,
intents) are not retried: the task reports `failing` in `/readyz` until the configuration is fixed and
the hub restarted.

Each dispatch the Discord codec decodes (`RECORDED_EVENTS`) becomes a raw record exactly as the
frame came, like a webhook delivery, and the connection actor decodes it later. The hub holds the socket,
so nothing is signed: the record carries no signature header that could pass for a bridge's, and no
credential (the token is only ever in Identify and Resume, which the hub sends; `Ingest` masks the
connection's secrets wherever else they appear). Other dispatches (guilds, typing, presence) only move
the sequence number. An interaction over the gateway must be answered over HTTP within 3 seconds: once
recorded (and only the first time), it gets the answer the interactions endpoint would give, a deferred
response, at `POST /interactions/{id}/{token}/callback`.

One connection, one socket: its task holds the socket only while this process owns the connection's
partition (`Services.ownership`). When ownership goes (or a handover begins), or the hub stops, the
socket is closed with `RESUMABLE_CLOSE` (1000 or 1001 would end the session), and the session (id,
resume URL, last sequence number) is in the `cursors` KV bucket, written after the records up to that number are stored:
the next owner, or this hub restarted, resumes, and replays are absorbed by the raw stream's dedup and the
conversation's applied-envelope keys. A frame that is no gateway payload (not JSON, binary, a first frame
that is no Hello, a READY without a session) is kept in the dead-letter stream and the socket closed; one
over `gateway_max_frame_bytes` closes it (1009). Either way the hub connects again, resuming the session
if it has one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import re
import sys
import time
from typing import Annotated, Any, Final
from urllib.parse import quote

import aiohttp
import msgspec
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue
from yarl import URL

from babelhub.codecs.base import HttpRequest, OutboundRequest
from babelhub.codecs.discord import USER_AGENT, DiscordOptions, DiscordSecrets
from babelhub.errors import DecodeError, PayloadTooLarge
from babelhub.plugins import InboundSource, Services
from babelhub.services.connections import ConnectionService
from babelhub.services.delivery import perform
from babelhub.services.ingest import NATS_UNAVAILABLE
from babelhub.services.supervise import TaskHealth

__all__ = ["RECORDED_EVENTS", "RESUMABLE_CLOSE", "DiscordGateway", "GatewaySession"]

log = logging.getLogger("babelhub.discord_gateway")

# Gateway opcodes
DISPATCH: Final = 0
HEARTBEAT: Final = 1
IDENTIFY: Final = 2
RESUME: Final = 6
RECONNECT: Final = 7
INVALID_SESSION: Final = 9
HELLO: Final = 10
HEARTBEAT_ACK: Final = 11

API_VERSION: Final = "10"

RESUMABLE_CLOSE: Final = 4000
"""The close code the hub ends a socket with: any but 1000 and 1001 keeps the session resumable."""

FATAL_CLOSE_CODES: Final[dict[int, str]] = {
    4004: "authentication failed: check secrets.bot_token",
    4010: "invalid shard",
    4011: "sharding required",
    4012: "invalid API version",
    4013: "invalid intents: check options.intents",
    4014: "disallowed intents: enable the privileged ones in the Developer Portal or leave them out of "
          "options.intents",
}
"""Close codes Discord documents as not to be reconnected after."""

NEW_SESSION_CLOSE_CODES: Final = frozenset({4007, 4009})
"""Invalid `seq`, session timed out: Discord says to start a new session."""

RECORDED_EVENTS: Final = frozenset({
    "MESSAGE_CREATE", "MESSAGE_UPDATE", "MESSAGE_DELETE", "MESSAGE_REACTION_ADD", "MESSAGE_REACTION_REMOVE",
    "INTERACTION_CREATE",
})
"""The dispatches the Discord codec decodes: each becomes a raw record."""

_BASE_PAUSE = 0.5
_MAX_PAUSE = 60.0
_INVALID_SESSION_PAUSE = (1.0, 5.0)
"""Discord asks for a random wait of 1 to 5 seconds before identifying after an Invalid Session."""
_RESUME_ATTEMPTS = 3
"""Connections to the resume URL that may fail in a row before the session is given up (then identify)."""
_HELLO_TIMEOUT = 30.0
_CALL_TIMEOUT = 15.0
_CLOSE_TIMEOUT = 5.0
_PARKED_FRAME_BYTES = 64 * 1024
"""How much of a broken frame the dead letter keeps."""
_INTERACTION_DEADLINE = 3.0
"""Discord waits this long for an interaction's answer."""
_SNOWFLAKE: Final = re.compile(r"[0-9]{1,20}")
_OWNERSHIP_CHECK = 0.1
"""Seconds between two looks at whether this process still owns the connection (a dictionary lookup):
well inside the grace a handover gives before the lease goes."""


class GatewaySession(msgspec.Struct, kw_only=True):
    """What resuming needs, as the `cursors` bucket keeps it under the connection's id."""

    session_id: str = ""
    resume_gateway_url: str = ""
    seq: int | None = None
    """The last dispatch's sequence number whose record (if it makes one) is stored."""

    @property
    def resumable(self) -> bool:
        return bool(self.session_id and self.resume_gateway_url and self.seq is not None)


class _Frame(msgspec.Struct):
    """A gateway event payload; `d` is left unread until its opcode says what it is."""

    op: int
    d: msgspec.Raw = msgspec.Raw(b"null")
    s: int | None = None
    t: str | None = None


class _Hello(msgspec.Struct):
    heartbeat_interval: Annotated[int, msgspec.Meta(gt=0)]


class _Ready(msgspec.Struct):
    session_id: str
    resume_gateway_url: str


class _GatewayBot(msgspec.Struct):
    url: str


class _InteractionIds(msgspec.Struct):
    id: str
    token: str


class _Fatal(Exception):
    """Discord refused the connection for good (a fatal close code, or the token refused)."""


class _NotStored(Exception):
    """A dispatch could not be recorded (NATS unavailable): the socket is resumed later, so Discord
    replays it."""


class DiscordGateway(InboundSource):
    """One gateway connection per Discord connection whose mode is `discord_gateway`."""

    name = "discord_gateway"

    @classmethod
    def check(cls, connection: ConnectionService) -> str:
        codec = connection.codec
        speaks_discord = issubclass(codec.option_settings, DiscordOptions) and issubclass(codec.secret_settings,
                                                                                          DiscordSecrets)
        if not speaks_discord:
            return f"channel {connection.channel} has no Discord gateway; use mode = \"webhook\""
        return ""

    def address(self, connection: ConnectionService, http_url: str) -> str:
        return "holding Discord's gateway"

    async def start(self) -> None:
        for connection in self.connections.values():
            self.services.spawn(f"discord-gateway:{connection.id}", functools.partial(self._hold, connection))

    async def _hold(self, connection: ConnectionService, health: TaskHealth) -> None:
        ctx = self.services.ctx
        cursors = await ctx.js.key_value(ctx.subjects.bucket("cursors"))
        await _Link(connection, self.services, cursors, health).run()


class _Link:
    """One connection's gateway: connects while this process owns the connection, and again after every
    drop, until cancelled."""

    def __init__(self, connection: ConnectionService, services: Services, cursors: KeyValue,
                 health: TaskHealth) -> None:
        self.connection = connection
        self.services = services
        self.cursors = cursors
        self.health = health
        self.partition = services.ctx.subjects.partition(connection.tenant, connection.id)
        options = msgspec.convert(connection.settings.options, DiscordOptions)  # checked at start already
        self.intents = options.intents
        self.max_frame = options.gateway_max_frame_bytes
        self.token = connection.settings.secrets["bot_token"]
        self.session = GatewaySession()
        self.gateway_url = ""
        """From `GET /gateway/bot`, kept until connecting to it fails."""
        self.failures = 0
        """Sockets ended in a row without a heartbeat ACK on a session (the backoff's exponent): a gateway
        that drops every session at once is not identified with a thousand times a day (Discord resets the
        token then)."""
        self.resume_failures = 0
        self.pause_next: float | None = None

    @property
    def owned(self) -> bool:
        """This process holds the connection's partition and is not about to hand it over (the socket
        closes before the lease goes, so that the next owner never finds it still open)."""
        ownership = self.services.ownership
        return ownership.owns(self.partition) and self.partition not in ownership.releasing

    async def run(self) -> None:
        ownership = self.services.ownership
        while True:
            while not self.owned:  # another hub process holds the socket
                self.health.ok()
                await asyncio.sleep(ownership.interval)
            self.session = await self._load()  # another process may have moved it meanwhile
            try:
                await self._connect_while_owned()
            except _Fatal as exc:
                await self._stop_for_good(str(exc))

    async def _connect_while_owned(self) -> None:
        while self.owned:
            await _Socket(self).run()
            if self.owned:  # else the next owner has it, and may have moved it on
                await self.save()
            await asyncio.sleep(self._pause())

    def _pause(self) -> float:
        if self.pause_next is not None:
            pause, self.pause_next = self.pause_next, None
            return pause
        return min(_MAX_PAUSE, _BASE_PAUSE * 2.0 ** max(0, self.failures - 1)) * random.uniform(0.5, 1.0)

    async def _stop_for_good(self, reason: str) -> None:
        log.error("%s: Discord refused the gateway connection (%s); not reconnecting until the hub restarts",
                  self.connection.id, reason)
        self.health.state = f"failing: discord gateway refused: {reason}"
        await asyncio.Event().wait()  # until cancelled: retrying would only be refused again

    # ----------------------------------------------------------------------------------- session state

    async def _load(self) -> GatewaySession:
        try:
            stored = (await self.cursors.get(self.connection.id)).value or b""
        except NotFoundError:  # never connected before
            return GatewaySession()
        try:
            return msgspec.json.decode(stored, type=GatewaySession)
        except (msgspec.DecodeError, msgspec.ValidationError):  # written by something else: a new session
            log.warning("%s: the stored gateway session is unreadable; identifying afresh", self.connection.id)
            return GatewaySession()

    async def save(self) -> None:
        """Best effort: a session not saved is only resumed from an earlier number (replays are absorbed)."""
        try:
            await self.cursors.put(self.connection.id, msgspec.json.encode(self.session))
        except NATS_UNAVAILABLE as exc:
            log.warning("%s: could not save the gateway session: %s", self.connection.id, type(exc).__name__)

    def forget_session(self) -> None:
        self.session = GatewaySession()
        self.resume_failures = 0

    # ------------------------------------------------------------------------------------ gateway URL

    async def connect_url(self) -> URL:
        """Where the next socket goes: the resume URL while the session can be resumed, else the URL
        `GET /gateway/bot` gives (kept until connecting to it fails). Both with `?v=10&encoding=json`."""
        if self.session.resumable:
            url = self.session.resume_gateway_url
        else:
            if not self.gateway_url:
                self.gateway_url = await self._gateway_bot()
            url = self.gateway_url
        parsed = URL(url)
        if parsed.scheme not in ("wss", "ws") or not parsed.host:
            raise DecodeError(f"the gateway URL {url!r} is no WebSocket URL", path="$.url")
        return parsed.update_query(v=API_VERSION, encoding="json")

    async def _gateway_bot(self) -> str:
        codec = self.connection.codec
        base = codec.api_base(self.connection.encode_context(to=""))
        headers = {"Authorization": f"Bot {self.token}", "User-Agent": USER_AGENT}
        timeout = aiohttp.ClientTimeout(total=_CALL_TIMEOUT)
        async with self.services.http.get(f"{base}/gateway/bot", headers=headers, timeout=timeout) as response:
            body = await response.read()
            if response.status == 401:
                raise _Fatal("GET /gateway/bot answered 401: the bot token is refused (secrets.bot_token)")
            if response.status != 200:
                raise aiohttp.ClientResponseError(response.request_info, (), status=response.status,
                                                  message="GET /gateway/bot failed")
        try:
            return msgspec.json.decode(body, type=_GatewayBot).url
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise DecodeError(f"GET /gateway/bot answered no gateway URL: {exc}", path="$.url") from None

    def connect_failed(self, resuming: bool) -> None:
        """Discord: when a resume cannot connect, identify on the URL of `GET /gateway/bot`; when that
        URL cannot be reached, ask for it again."""
        if not resuming:
            self.gateway_url = ""
            return
        self.resume_failures += 1
        if self.resume_failures >= _RESUME_ATTEMPTS:
            log.warning("%s: the gateway's resume URL failed %d times; identifying afresh", self.connection.id,
                        self.resume_failures)
            self.forget_session()

    # ------------------------------------------------------------------------------------ recording

    async def record(self, frame: bytes, url: URL) -> bool:
        """Store a dispatch the codec decodes as a raw record, as a webhook would have delivered it: True
        if it is new (not a replay JetStream has seen)."""
        request = HttpRequest(method="POST", path=url.path or "/", headers={"content-type": "application/json"},
                              body=frame, url=str(url.with_query(None)), received_at=time.time())
        try:
            return await self.services.ingest.record(self.connection, request)
        except (DecodeError, PayloadTooLarge):
            return False  # parked in the dead-letter stream by record(); the next dispatches go on
        except NATS_UNAVAILABLE as exc:
            raise _NotStored(type(exc).__name__) from None

    async def answer_interaction(self, interaction: bytes) -> None:
        """Interactions that come over the gateway are answered over HTTP, within 3 seconds, at
        `/interactions/{id}/{token}/callback` (Discord's "Receiving and Responding"), with what the
        interactions endpoint would have answered (`Codec.handshake`: a deferred response). Best effort:
        a failure is logged without the URL, which holds the interaction's token."""
        connection = self.connection
        try:
            answer = connection.codec.handshake(HttpRequest(body=interaction), connection.settings.secrets)
            ids = msgspec.json.decode(interaction, type=_InteractionIds)
        except Exception as exc:  # unreadable: the connection actor parks it when it decodes the record
            log.warning("%s: an interaction from the gateway could not be answered: %s", connection.id,
                        type(exc).__name__)
            return
        if answer is None or not answer.body or not _SNOWFLAKE.fullmatch(ids.id) or not ids.token.strip("."):
            return
        base = connection.codec.api_base(connection.encode_context(to=""))
        callback = f"{base}/interactions/{ids.id}/{quote(ids.token, safe='')}/callback"
        request = OutboundRequest(method="POST", url=callback,
                                  headers={"Content-Type": "application/json", "User-Agent": USER_AGENT},
                                  body=answer.body)
        try:
            response = await perform(self.services.http, request, _INTERACTION_DEADLINE)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("%s: answering interaction %s failed: %s", connection.id, ids.id, type(exc).__name__)
            return
        if response.status >= 300:
            log.warning("%s: Discord refused the answer to interaction %s: HTTP %d", connection.id, ids.id,
                        response.status)

    async def park(self, frame: bytes, reason: str) -> None:
        request = HttpRequest(method="POST", path="/", headers={"content-type": "application/json"},
                              body=frame[:_PARKED_FRAME_BYTES], received_at=time.time())
        with contextlib.suppress(*NATS_UNAVAILABLE):
            await self.services.ingest.park(self.connection, request, reason, "$")

    # ------------------------------------------------------------------------------------ payloads

    def identify(self) -> dict[str, Any]:
        return {"op": IDENTIFY, "d": {"token": self.token, "intents": self.intents,
                                      "properties": {"os": sys.platform, "browser": "babelhub",
                                                     "device": "babelhub"}}}

    def resume(self) -> dict[str, Any]:
        return {"op": RESUME, "d": {"token": self.token, "session_id": self.session.session_id,
                                    "seq": self.session.seq}}

    def heartbeat(self) -> dict[str, Any]:
        return {"op": HEARTBEAT, "d": self.session.seq}


class _Socket:
    """One WebSocket to the gateway, from connecting to its close; what it learns goes into its `_Link`."""

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.id = link.connection.id
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.url = URL()
        self.acked = True
        self.ending = ""
        """Why the hub closed the socket itself ("" while it has not)."""
        self.established = False
        """READY or RESUMED came on this socket."""
        self.closer: asyncio.Task[Any] | None = None
        """The task that closes the socket, left to finish writing the close frame."""
        self.close_code: int | None = None
        """The code of the gateway's close frame. Read from the frame: `ws.close_code` says 1006 instead
        when the gateway drops the connection before the hub's answering close is written."""

    async def run(self) -> None:
        link = self.link
        resuming = link.session.resumable
        try:
            self.url = await link.connect_url()
            self.ws = await link.services.http.ws_connect(
                self.url, max_msg_size=link.max_frame, autoping=True,
                timeout=aiohttp.ClientWSTimeout(ws_close=_CLOSE_TIMEOUT))
        except (aiohttp.ClientError, TimeoutError, DecodeError) as exc:
            log.warning("%s: cannot connect to the Discord gateway: %s", self.id, _described(exc))
            link.failures += 1
            link.connect_failed(resuming)
            return
        keepers: list[asyncio.Task[None]] = []
        try:
            hello = await self._hello()
            if hello is not None:
                beat = self._beat(hello.heartbeat_interval / 1000)
                keepers = [asyncio.create_task(beat, name=f"heartbeat:{self.id}"),
                           asyncio.create_task(self._watch_ownership(), name=f"gateway-owner:{self.id}")]
                await self._send(link.resume() if resuming else link.identify())
                await self._read()
            self._closed()
        except _NotStored as exc:
            log.warning("%s: NATS cannot take a gateway dispatch now (%s); resuming later", self.id, exc)
            await self._close("dispatch not stored")
        except (aiohttp.ClientError, ConnectionError) as exc:
            log.warning("%s: the gateway connection failed: %s", self.id, _described(exc))
        finally:
            for task in keepers:
                if task is not self.closer:
                    task.cancel()
            if self.closer in keepers:  # bounded by the close timeout
                await asyncio.gather(self.closer, return_exceptions=True)
            if not self.ws.closed:  # cancelled (the hub stops), or ended above: keep the session resumable
                await self.ws.close(code=RESUMABLE_CLOSE)
            link.failures += 1

    async def _hello(self) -> _Hello | None:
        """The first frame: Hello, or Reconnect (which may come even before it)."""
        assert self.ws is not None
        try:
            message = await asyncio.wait_for(self.ws.receive(), _HELLO_TIMEOUT)
        except TimeoutError:
            log.warning("%s: the Discord gateway sent no Hello within %gs", self.id, _HELLO_TIMEOUT)
            await self._close("no Hello")
            return None
        received = await self._frame(message)
        if received is None:
            return None
        frame, data = received
        if frame.op == RECONNECT:
            await self._close("Reconnect (op 7) before Hello")
            return None
        if frame.op != HELLO:
            await self._park_and_close(data, f"a first frame with op {frame.op}, not Hello (10)")
            return None
        try:
            return msgspec.json.decode(frame.d, type=_Hello)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self._park_and_close(data, f"a Hello that is unreadable: {exc}")
            return None

    async def _read(self) -> None:
        assert self.ws is not None
        while not self.ws.closed:
            received = await self._frame(await self.ws.receive())
            if received is None:
                return
            await self._handle(*received)

    async def _frame(self, message: aiohttp.WSMessage) -> tuple[_Frame, bytes] | None:
        """The gateway payload in `message` and its bytes; None when the socket ended or the frame was
        refused."""
        if message.type == aiohttp.WSMsgType.TEXT:
            data = message.data.encode()
        elif message.type == aiohttp.WSMsgType.BINARY:  # compression was not asked for
            await self._park_and_close(message.data, "a binary frame (compression was not asked for)")
            return None
        else:
            if message.type == aiohttp.WSMsgType.CLOSE:
                self.close_code = message.data
            elif message.type == aiohttp.WSMsgType.ERROR:
                log.warning("%s: the gateway socket failed: %s", self.id, _described(message.data))
            return None
        try:
            frame = msgspec.json.decode(data, type=_Frame)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            await self._park_and_close(data, f"a frame that is no gateway payload: {exc}")
            return None
        return frame, data

    async def _handle(self, frame: _Frame, data: bytes) -> None:
        link = self.link
        if frame.op == DISPATCH:
            await self._dispatch(frame, data)
        elif frame.op == HEARTBEAT:  # the gateway asks for one now
            await self._send(link.heartbeat())
        elif frame.op == HEARTBEAT_ACK:
            self.acked = True
            if self.established:  # a session that works: the next drop starts the backoff over
                link.failures = 0
        elif frame.op == RECONNECT:
            await self._close("Reconnect (op 7)")
        elif frame.op == INVALID_SESSION:
            resumable = bytes(frame.d) == b"true"
            if not resumable:
                link.forget_session()
                link.pause_next = random.uniform(*_INVALID_SESSION_PAUSE)
            await self._close(f"Invalid Session (op 9, {'resumable' if resumable else 'not resumable'})")

    async def _dispatch(self, frame: _Frame, data: bytes) -> None:
        link = self.link
        if frame.t == "READY":
            try:
                ready = msgspec.json.decode(frame.d, type=_Ready)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                await self._park_and_close(data, f"READY is unreadable: {exc}")
                return
            link.session = GatewaySession(session_id=ready.session_id, resume_gateway_url=ready.resume_gateway_url)
            self._established("READY")
        elif frame.t == "RESUMED":
            self._established("RESUMED")
        elif frame.t in RECORDED_EVENTS:
            new = await link.record(data, self.url)
            if new and frame.t == "INTERACTION_CREATE":
                await link.answer_interaction(bytes(frame.d))
        if frame.s is not None and (link.session.seq is None or frame.s > link.session.seq):
            link.session.seq = frame.s
            if frame.t in RECORDED_EVENTS or frame.t == "READY":
                await link.save()

    def _established(self, how: str) -> None:
        link = self.link
        self.established = True
        link.resume_failures = 0
        link.health.ok()
        log.info("%s: Discord gateway session %s", self.id, "resumed" if how == "RESUMED" else "started")

    async def _beat(self, interval: float) -> None:
        """Heartbeat every `interval` seconds, the first after a random part of it; an interval without
        an ACK means the connection is a zombie: close it (resumable) and connect again."""
        await asyncio.sleep(interval * random.random())
        while True:
            self.acked = False
            await self._send(self.link.heartbeat())
            await asyncio.sleep(interval)
            if not self.acked:
                await self._close("no heartbeat ACK: a zombied connection")
                return

    async def _watch_ownership(self) -> None:
        while True:
            await asyncio.sleep(_OWNERSHIP_CHECK)
            if not self.link.owned:
                break
        await self._close("this hub no longer owns the connection")

    async def _send(self, payload: dict[str, Any]) -> None:
        assert self.ws is not None
        if self.ws.closed:
            return
        try:
            await self.ws.send_str(msgspec.json.encode(payload).decode())
        except (aiohttp.ClientError, ConnectionError) as exc:  # the socket is ending: the reader sees how
            log.debug("%s: could not send op %s: %s", self.id, payload["op"], type(exc).__name__)

    async def _close(self, why: str) -> None:
        assert self.ws is not None
        if not self.ending:
            self.ending = why
            self.closer = asyncio.current_task()
            log.info("%s: closing the Discord gateway socket: %s", self.id, why)
        await self.ws.close(code=RESUMABLE_CLOSE)

    async def _park_and_close(self, frame: bytes, why: str) -> None:
        log.warning("%s: the Discord gateway sent %s; kept as a dead letter, connecting again", self.id, why)
        await self.link.park(frame, f"discord gateway: {why}")
        await self._close(why)

    def _closed(self) -> None:
        """The socket ended: what its close code says about the session."""
        assert self.ws is not None
        if self.ending:
            return
        code = self.close_code if self.close_code is not None else self.ws.close_code
        if code in FATAL_CLOSE_CODES:
            raise _Fatal(f"close code {code}, {FATAL_CLOSE_CODES[code]}")
        if code in NEW_SESSION_CLOSE_CODES:
            self.link.forget_session()
        log.warning("%s: the Discord gateway closed the socket (code %s); %s", self.id, code,
                    "resuming" if self.link.session.resumable else "identifying afresh")


def _described(exc: object) -> str:
    """An error without its text when that may carry a URL (never a token: none is in the gateway's URLs,
    but an error body could echo anything)."""
    if isinstance(exc, DecodeError):
        return exc.reason
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status}"
    return type(exc).__name__
