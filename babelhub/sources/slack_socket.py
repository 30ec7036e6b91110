"""The `slack_socket` inbound source: Slack's Socket Mode, so a Slack connection needs no public URL.

Instead of Slack calling the hub, the hub asks Slack for a WebSocket URL (`POST apps.connections.open`
with the app-level token, `secrets.app_token`), connects, waits for Slack's `hello`, and then receives
what a Request URL would: `events_api`, `interactive` and `slash_commands` envelopes. Each envelope's
payload is recorded shaped as its webhook would be (the Events API's JSON, interactivity's form field
`payload=`, a slash command's form fields), so the Slack codec decodes it as it decodes webhooks; and
only once the raw record is stored is the envelope acknowledged (`{"envelope_id": …}`, within Slack's
3 s). A record that cannot be stored now (NATS away) is not acknowledged: Slack delivers it again
(`retry_attempt`), and the codec's dedup key (the Events API's `event_id`, an interaction's
`trigger_id`) absorbs the copies that were stored after all. Acknowledgements carry no response payload
(`accepts_response_payload` is not used): processors answer through the Web API or `response_url`, as
they do for webhooks.

Slack refreshes its sockets: on `disconnect` (`refresh_requested`, `warning`) the hub opens the next
socket and waits for its `hello` before it closes the old one, which keeps being read meanwhile, so
nothing sent in between is missed. `link_disabled` (Socket Mode turned off for the app) closes the
socket; asking for a new one is then retried with backoff, as are failed or rate-limited (429,
Retry-After) `apps.connections.open` calls and lost sockets. A token Slack refuses (`invalid_auth` and
the like) is not retried: the connection's task says why in `/readyz` until the hub is restarted.

Each connection gets one supervised task, which holds the socket only while this process holds the
connection's partition (`Services.ownership`), so that one process at a time receives its envelopes.

Limits: a frame larger than `hub.max_body_bytes` closes the socket (aiohttp, 1009) and is noted in the
dead-letter stream; a frame that is no JSON object, or an envelope of an unknown type, is kept there
and acknowledged, since Slack's retries would bring the same. The app token is sent only in the
`Authorization` header of `apps.connections.open`, and the socket URL (a one-time ticket) is never
logged nor recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
import urllib.parse
from typing import Any, Final, Literal

import aiohttp
import msgspec
from aiohttp import WSMsgType

from babelhub.codecs.base import HttpRequest
from babelhub.codecs.slack import SlackSecrets
from babelhub.errors import DecodeError, PayloadTooLarge
from babelhub.plugins import InboundSource, Services
from babelhub.services.connections import ConnectionService
from babelhub.services.ingest import NATS_UNAVAILABLE
from babelhub.services.supervise import TaskHealth

__all__ = ["SlackSocketMode"]

log = logging.getLogger("babelhub.slack_socket")

HELLO_TIMEOUT: Final = 10.0
"""Seconds a new socket may take to say `hello` before it is given up and another one asked for."""
OPEN_TIMEOUT: Final = 10.0
"""Seconds an `apps.connections.open` call or a WebSocket handshake may take."""
HEARTBEAT: Final = 20.0
"""Seconds between the hub's pings on an idle socket: a socket that stops answering is replaced."""
MAX_PAUSE: Final = 30.0
"""Longest wait between two tries to open a socket."""

REFUSED_TOKEN_ERRORS: Final = frozenset({
    "invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired", "missing_args",
    "not_allowed_token_type", "forbidden_team",
})
"""`apps.connections.open` errors that no retry can mend: the token must be changed."""

_ENVELOPE_TYPES: Final = frozenset({"events_api", "interactive", "slash_commands"})
_CLOSED: Final = "closed"
_REFRESH: Final = "refresh"
_DISABLED: Final = "link_disabled"
Ending = Literal["closed", "refresh", "link_disabled"]
"""Why reading a socket stopped: it closed, Slack asked for a new one, or Socket Mode was turned off."""


class SlackSocketMode(InboundSource):
    """One Socket Mode link per Slack connection whose mode is `slack_socket`."""

    name = "slack_socket"

    @classmethod
    def check(cls, connection: ConnectionService) -> str:
        if not issubclass(connection.codec.secret_settings, SlackSecrets):  # a codec speaking Slack's API
            return f"channel {connection.channel} has no Slack Socket Mode; use mode = \"webhook\""
        if not connection.settings.secrets.get("app_token"):
            return ("Slack Socket Mode needs secrets.app_token, an app-level token (xapp-…) with the "
                    "connections:write scope")
        return ""

    def address(self, connection: ConnectionService, http_url: str) -> str:
        return "Slack Socket Mode (the hub connects to Slack: no public URL)"

    async def start(self) -> None:
        for connection in self.connections.values():
            self.services.spawn(f"slack_socket:{connection.id}", functools.partial(self._hold, connection))

    async def _hold(self, connection: ConnectionService, health: TaskHealth) -> None:
        """Keep `connection`'s socket while this process holds its partition, until cancelled."""
        ownership = self.services.ownership
        partition = self.services.ctx.subjects.partition(connection.tenant, connection.id)
        link = SocketLink(connection, self.services, health)
        while True:
            while not ownership.owns(partition):  # another hub process holds the socket
                health.ok()
                await asyncio.sleep(ownership.interval)
            linked = asyncio.create_task(link.run(), name=f"slack_socket:{connection.id}:link")
            try:
                while ownership.owns(partition) and not linked.done():
                    await asyncio.wait({linked}, timeout=ownership.interval)
            finally:
                await _cancelled(linked)
            if not linked.cancelled() and (error := linked.exception()) is not None:
                raise error  # the supervisor restarts the task with backoff


async def _cancelled(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait for it to end (its own failure is left for the caller to read)."""
    if task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait({task})
    current = asyncio.current_task()
    if current is not None and current.cancelling():
        raise asyncio.CancelledError


class TokenRefused(Exception):
    """Slack refused the app-level token: retrying cannot help until the configuration changes."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


class SocketLink:
    """The Socket Mode link of one connection: opens sockets, records and acknowledges envelopes."""

    def __init__(self, connection: ConnectionService, services: Services, health: TaskHealth) -> None:
        self.connection = connection
        self.services = services
        self.health = health
        self.max_frame = services.config.hub.max_body_bytes
        self._failures = 0
        self._socket: aiohttp.ClientWebSocketResponse | None = None

    async def run(self) -> None:
        """Hold a socket (replacing it when Slack asks or it drops) until cancelled. A refused token
        stops the link: it is reported and waits, without asking Slack again."""
        try:
            self._socket = await self._next_socket()
            while True:
                ending = await self._serve(self._socket)
                if ending == _REFRESH:
                    await self._replace()
                    continue
                await self._socket.close()
                if ending == _DISABLED:
                    log.warning("%s: Slack turned Socket Mode off for this app (link_disabled); asking for a "
                                "socket again with backoff", self.connection.id)
                # A pause even after a plain drop, so that a socket dropped at once cannot make a tight loop
                # (what it did not acknowledge, Slack sends again).
                await self._pause()
                self._socket = await self._next_socket()
        except TokenRefused as refused:
            log.error("%s: Slack refused the app token (%s): fix secrets.app_token and restart the hub; "
                      "no new socket is asked for until then", self.connection.id, refused.error)
            self.health.state = f"failing: Slack refused secrets.app_token ({refused.error})"
            await asyncio.Event().wait()
        finally:
            if self._socket is not None:  # this process no longer holds the connection, or the hub stops
                await asyncio.shield(self._socket.close())
                self._socket = None

    async def _replace(self) -> None:
        """Open the next socket while the current one is still read; close that one once the new one
        said hello."""
        old = self._socket
        assert old is not None
        draining = asyncio.create_task(self._drain(old), name=f"slack_socket:{self.connection.id}:drain")
        try:
            self._socket = await self._next_socket()
        finally:
            await asyncio.shield(old.close())
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(draining), OPEN_TIMEOUT)
            await _cancelled(draining)

    async def _drain(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        while await self._serve(socket) != _CLOSED:
            pass  # a second disconnect notice changes nothing: the replacement is on its way

    async def _next_socket(self) -> aiohttp.ClientWebSocketResponse:
        """A socket that said hello, retrying with backoff until one does (TokenRefused excepted)."""
        while True:
            try:
                socket = await self._connect(await self._open_url())
            except _Retry as retry:
                log.warning("%s: no Socket Mode connection: %s", self.connection.id, retry.reason)
                await self._pause(retry.after)
                continue
            self._failures = 0
            self.health.ok()
            return socket

    async def _pause(self, at_least: float = 0.0) -> None:
        self._failures += 1
        backoff = random.uniform(0.5, 1.0) * min(MAX_PAUSE, 0.5 * 2 ** min(self._failures, 16))
        await asyncio.sleep(max(at_least, backoff))

    async def _open_url(self) -> str:
        """`apps.connections.open`: the URL of a new socket (a one-time ticket: never logged)."""
        url = f"{self._api_base()}/apps.connections.open"
        headers = {"Authorization": f"Bearer {self.connection.settings.secrets['app_token']}"}
        try:
            async with self.services.http.post(url, headers=headers,
                                               timeout=aiohttp.ClientTimeout(total=OPEN_TIMEOUT)) as response:
                body = await response.read()
                status, retry_after = response.status, response.headers.get("Retry-After", "")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Retry(f"apps.connections.open failed ({type(exc).__name__})") from None
        answer = _json_object(body)
        error = answer.get("error") if isinstance(answer.get("error"), str) else ""
        if error in REFUSED_TOKEN_ERRORS:
            raise TokenRefused(error)
        if status == 429 or error == "ratelimited":
            raise _Retry("apps.connections.open is rate limited", _seconds(retry_after))
        socket_url = answer.get("url")
        if status != 200 or answer.get("ok") is not True or not isinstance(socket_url, str) or not socket_url:
            raise _Retry(f"apps.connections.open answered HTTP {status} {error or 'without a socket URL'}")
        return socket_url

    def _api_base(self) -> str:
        return (self.connection.settings.api_base or self.connection.codec.default_api_base).rstrip("/")

    async def _connect(self, url: str) -> aiohttp.ClientWebSocketResponse:
        """Connect to `url` and read Slack's `hello`; anything else first, or nothing in time, is a retry."""
        try:
            socket = await self.services.http.ws_connect(
                url, max_msg_size=self.max_frame, heartbeat=HEARTBEAT, timeout=aiohttp.ClientWSTimeout(
                    ws_receive=None, ws_close=OPEN_TIMEOUT))
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The exception's text would name the URL, whose ticket is a credential: its type only.
            raise _Retry(f"the WebSocket handshake failed ({type(exc).__name__})") from None
        try:
            first = await socket.receive(HELLO_TIMEOUT)
        except TimeoutError:
            await socket.close()
            raise _Retry(f"no hello within {HELLO_TIMEOUT:g}s") from None
        if first.type != WSMsgType.TEXT or _json_object(first.data).get("type") != "hello":
            await socket.close()
            raise _Retry(f"the socket began with a {first.type.name} frame, not hello")
        return socket

    async def _serve(self, socket: aiohttp.ClientWebSocketResponse) -> Ending:
        """Read `socket` until it closes or Slack sends `disconnect`; record and acknowledge envelopes."""
        while True:
            frame = await socket.receive()
            if frame.type == WSMsgType.TEXT:
                ending = await self._on_text(socket, frame.data)
                if ending is not None:
                    return ending
            elif frame.type == WSMsgType.BINARY:
                await self._park(frame.data, "a Socket Mode frame is text (JSON), not binary", "$")
            elif frame.type == WSMsgType.ERROR:
                await self._on_error(frame.data)
                return _CLOSED
            elif frame.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return _CLOSED

    async def _on_error(self, error: object) -> None:
        if isinstance(error, aiohttp.WebSocketError) and error.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG:
            reason = (f"a Socket Mode frame was larger than the hub's limit of {self.max_frame} bytes "
                      f"(hub.max_body_bytes): the socket was closed, and Slack retries the envelope")
            log.warning("%s: %s", self.connection.id, reason)
            await self._park(b"", reason, "$")
        else:
            log.warning("%s: the Socket Mode connection failed (%s)", self.connection.id, type(error).__name__)

    async def _on_text(self, socket: aiohttp.ClientWebSocketResponse, text: str) -> Ending | None:
        try:
            frame = msgspec.json.decode(text, type=_Frame)
        except msgspec.DecodeError as exc:
            await self._park(text.encode(), f"a Socket Mode frame that is no JSON object: {exc}", "$")
            return None
        if frame.type == "disconnect":
            log.info("%s: Slack asks for a new socket (%s)", self.connection.id, frame.reason)
            return _DISABLED if frame.reason == _DISABLED else _REFRESH
        if frame.type == "hello":
            return None  # a repeated hello says nothing new
        if frame.type not in _ENVELOPE_TYPES:
            await self._park(text.encode(), f"a Socket Mode envelope of unknown type {frame.type!r}", "$.type")
            await self._ack(socket, frame.envelope_id)
            return None
        if await self._record(frame, text):
            await self._ack(socket, frame.envelope_id)
        return None

    async def _record(self, frame: _Frame, text: str) -> bool:
        """Store the envelope's payload as a raw record: True when it may be acknowledged (stored, a copy
        already stored, or refused as unreadable and kept as a dead letter), False to leave it to Slack's retry."""
        try:
            request = self._request(frame)
        except DecodeError as exc:
            await self._park(text.encode(), exc.reason, exc.path)
            return True
        try:
            await self.services.ingest.record(self.connection, request)
        except (DecodeError, PayloadTooLarge):
            return True  # parked by `record`; Slack's retries would only bring the same
        except NATS_UNAVAILABLE as exc:
            log.warning("%s: could not record a Socket Mode envelope (%s): left unacknowledged for Slack "
                        "to send again", self.connection.id, type(exc).__name__)
            return False
        return True

    def _request(self, frame: _Frame) -> HttpRequest:
        """The envelope's payload as the webhook Slack would have sent: the Events API's JSON body,
        interactivity's form field `payload`, a slash command's form fields. Slack's HTTP retries say
        which try they are in headers; Socket Mode says it in the envelope, kept in the same headers."""
        raw = frame.payload
        if not bytes(raw).lstrip().startswith(b"{"):
            raise DecodeError(f"a Socket Mode {frame.type} envelope carries its payload as a JSON object",
                              path="$.payload")
        if frame.type == "events_api":
            content_type, body = "application/json", bytes(raw)
        elif frame.type == "interactive":
            content_type = "application/x-www-form-urlencoded"
            body = urllib.parse.urlencode({"payload": bytes(raw).decode()}).encode()
        else:
            content_type, body = "application/x-www-form-urlencoded", _form(raw)
        headers = {"content-type": content_type}
        if frame.retry_attempt:
            headers["x-slack-retry-num"] = str(frame.retry_attempt)
            headers["x-slack-retry-reason"] = frame.retry_reason or ""
        return HttpRequest(method="POST", path=f"/slack_socket/{self.connection.id}", headers=headers, body=body,
                           url=f"slack-socket:{self.connection.id}", received_at=time.time())

    async def _ack(self, socket: aiohttp.ClientWebSocketResponse, envelope_id: str | None) -> None:
        if not envelope_id:
            return  # nothing to answer: Slack sent no id
        with contextlib.suppress(ConnectionError, aiohttp.ClientError):  # a closed socket: Slack sends it again
            await socket.send_str(msgspec.json.encode({"envelope_id": envelope_id}).decode())

    async def _park(self, body: bytes, error: str, path: str) -> None:
        """Keep what could not be used in the dead-letter stream, if NATS can take it now."""
        request = HttpRequest(method="WS", path=f"/slack_socket/{self.connection.id}", body=body,
                              url=f"slack-socket:{self.connection.id}", received_at=time.time())
        try:
            await self.services.ingest.park(self.connection, request, error, path)
        except (*NATS_UNAVAILABLE, PayloadTooLarge) as exc:
            log.warning("%s: a refused Socket Mode frame could not be kept (%s): %s", self.connection.id,
                        type(exc).__name__, error)


class _Frame(msgspec.Struct, kw_only=True):
    """A Socket Mode message: `hello`, `disconnect`, or an envelope (`events_api`, `interactive`,
    `slash_commands`) to acknowledge by its `envelope_id`. Only the fields read here."""

    type: str
    envelope_id: str | None = None
    payload: msgspec.Raw = msgspec.Raw(b"")
    reason: str | None = None
    retry_attempt: int | None = None
    retry_reason: str | None = None


class _Retry(Exception):
    def __init__(self, reason: str, after: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.after = after


def _json_object(data: bytes | str) -> dict[str, Any]:
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _seconds(retry_after: str) -> float:
    try:
        return min(MAX_PAUSE, max(0.0, float(retry_after)))
    except ValueError:
        return 0.0


def _form(raw: msgspec.Raw) -> bytes:
    """A slash command's fields as Slack posts them: a form of strings (a value that is not text is
    written as JSON, as the hub cannot know Slack's own spelling of it)."""
    fields = msgspec.json.decode(raw)
    assert isinstance(fields, dict)  # `_request` checked that the payload is an object
    return urllib.parse.urlencode({str(name): value if isinstance(value, str) else msgspec.json.encode(value).decode()
                                   for name, value in fields.items()}).encode()
