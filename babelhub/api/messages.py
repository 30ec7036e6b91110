"""The `messages` API: an app sends canonical outbound messages over REST and follows what became of them.

* `POST /v1/messages`: the body is a canonical outbound envelope, with what `Outbox.submit` fills in left
  out; `Idempotency-Key: <key>` makes a retry safe (the same key: the same id, sent once). Answers 202
  `{"id", "conversation", "status": "accepted", "duplicate": false}`, or 200 with `"duplicate": true` for
  a key seen before.
* `GET /v1/messages/{id}`: the message's status history (`babelhub.services.history`):
  `{"id", "conversation", "state", "statuses": [{"state", "at", "native_id"?, "error"?}]}`.

Every call carries a tenant API key, `Authorization: Bearer <key>`, and sees only its tenant: another
tenant's message or connection is answered 404, as if it did not exist. Every error has one shape,
`{"error": {"code", "message", "path"}}`, where `path` is the JSON path in the body (or the name of the
URL part or header) of what is wrong, empty when it is the request as a whole: 400 what cannot be used,
401 no or an unknown key (with `WWW-Authenticate: Bearer`), 404, 405, 413 a body over
`hub.max_body_bytes`, 503 with `Retry-After` while NATS cannot take the message.

The histories are written by `Outbox.submit` (`accepted`) and by one durable consumer on the statuses
stream, shared by every hub process (`history`): a status that is not a step forward is left out.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec
from aiohttp import web
from nats.aio.msg import Msg

from babelhub import canonical as c
from babelhub.errors import DecodeError
from babelhub.plugins import Api, Services
from babelhub.services.deadletters import DeadLetter
from babelhub.services.history import MESSAGE_ID, History, MessageHistory, is_message_id
from babelhub.services.ingest import NATS_UNAVAILABLE
from babelhub.services.outbox import Refusal
from babelhub.sessions.auth import ApiKeys, Refused, bearer

__all__ = ["HISTORY_CONSUMER", "RETRY_AFTER_SECONDS", "MessagesApi"]

log = logging.getLogger("babelhub.api.messages")

RETRY_AFTER_SECONDS: Final = 2
HISTORY_CONSUMER: Final = "message-history"
"""The durable consumer on the statuses stream that appends each status to its message's history."""
_NAK_SECONDS: Final = 1.0

Handler = Callable[[web.Request], Awaitable[web.Response]]


class MessagesApi(Api):
    """`POST /v1/messages` and `GET /v1/messages/{id}`, and the consumer that keeps the histories."""

    name = "messages"

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self._keys = ApiKeys(services.config.tenants)
        self._history: MessageHistory | None = None

    def routes(self) -> list[web.RouteDef]:
        return [web.route("*", "/v1/messages", self._answering({"POST": self._send})),
                web.route("*", "/v1/messages/{id}", self._answering({"GET": self._status}))]

    async def start(self) -> None:
        ctx = self.services.ctx
        self._history = await MessageHistory.open(ctx.js, ctx.subjects)
        await self.services.consume("statuses", f"{ctx.subjects.prefix}.*.status.>", HISTORY_CONSUMER,
                                    self._on_status)

    @property
    def history(self) -> MessageHistory:
        if self._history is None:
            raise RuntimeError("the messages API is not started")
        return self._history

    # ------------------------------------------------------------------------------------ requests

    def _answering(self, methods: dict[str, Callable[[web.Request, str], Awaitable[web.Response]]]) -> Handler:
        """One route's handler: the method chosen, the caller's tenant found, and every refusal answered
        in the one error shape."""

        async def handle(request: web.Request) -> web.Response:
            try:
                tenant = self._tenant(request)
                method = methods.get(request.method)
                if method is None:
                    allowed = ", ".join(methods)
                    raise _Refused(Refusal(405, "method_not_allowed", f"{request.path} takes {allowed}"),
                                   {"Allow": allowed})
                return await method(request, tenant)
            except Refusal as refusal:
                return _error(refusal)
            except _Refused as refused:
                return _error(refused.refusal, refused.headers)
            except NATS_UNAVAILABLE as exc:
                log.warning("%s %s met NATS unavailable: %r", request.method, request.path, exc)
                return _error(Refusal(503, "unavailable", "the hub cannot reach its streams right now; retry later"),
                              {"Retry-After": str(RETRY_AFTER_SECONDS)})

        return handle

    def _tenant(self, request: web.Request) -> str:
        try:
            return self._keys.credential(bearer(request.headers.get("Authorization", ""))).tenant
        except Refused as exc:
            raise _Refused(Refusal(401, "unauthenticated", f"{exc}: send `Authorization: Bearer <tenant API key>`"),
                           {"WWW-Authenticate": "Bearer"}) from None

    async def _send(self, request: web.Request, tenant: str) -> web.Response:
        body = await _body(request, self.services.config.hub.max_body_bytes)
        accepted = await self.services.outbox.submit(tenant, body,
                                                     idempotency_key=request.headers.get("Idempotency-Key", ""))
        return web.json_response({"id": accepted.id, "conversation": accepted.conversation,
                                  "status": accepted.status, "duplicate": accepted.duplicate},
                                 status=200 if accepted.duplicate else 202)

    async def _status(self, request: web.Request, tenant: str) -> web.Response:
        message_id = request.match_info["id"]
        if not is_message_id(message_id):
            raise Refusal(400, "invalid", f"a message id matches {MESSAGE_ID}", "id")
        history = await self.history.get(tenant, message_id)
        if history is None:  # another tenant's message is answered the same: nothing leaks
            raise Refusal(404, "not_found", f"no message {message_id!r}", "id")
        return web.json_response(_answer(history))

    # ------------------------------------------------------------------------------------ statuses

    async def _on_status(self, msg: Msg) -> None:
        """Append one status to its message's history. A status that names another tenant than its
        subject, or cannot be read, is kept as a dead letter; a write NATS cannot take now comes again."""
        tenant = msg.subject.split(".")[1]
        try:
            envelope = c.decode(msg.data)
        except DecodeError as exc:
            await self._park(msg, tenant, exc.reason, exc.path)
            return
        if not isinstance(envelope, c.Status):
            await msg.ack()
            return
        if envelope.tenant != tenant:
            await self._park(msg, tenant, f"a status of tenant {envelope.tenant[:64]!r} on another's subject",
                             "$.tenant")
            return
        try:
            await self.history.record(envelope)
        except (*NATS_UNAVAILABLE, RuntimeError) as exc:
            log.warning("status %s of message %s not recorded yet: %r", envelope.id, envelope.message_id, exc)
            await msg.nak(delay=_NAK_SECONDS)
            return
        await msg.ack()

    async def _park(self, msg: Msg, tenant: str, error: str, path: str) -> None:
        await self.services.ctx.dead_letters.park(DeadLetter(
            stage="history", error=error, path=path, tenant=tenant, subject=msg.subject, body=msg.data))
        await msg.term()


class _Refused(Exception):
    """A refusal answered with headers of its own."""

    def __init__(self, refusal: Refusal, headers: dict[str, str]) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal
        self.headers = headers


async def _body(request: web.Request, limit: int) -> bytes:
    too_large = Refusal(413, "too_large", f"the body is larger than the hub's limit of {limit} bytes "
                                          "(hub.max_body_bytes)")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    if len(body) > limit:
        raise too_large
    return body


def _answer(history: History) -> dict[str, Any]:
    document: dict[str, Any] = msgspec.to_builtins(history)
    document["state"] = history.state
    return document


def _error(refusal: Refusal, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(refusal.body(), status=refusal.status, headers=headers)
