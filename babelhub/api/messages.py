"""The `messages` API: an app sends canonical outbound messages over REST and follows what became of them.

* `POST /v1/messages`: the body is a canonical outbound envelope, with what `Outbox.submit` fills in left
  out; `Idempotency-Key: <key>` makes a retry safe (the same key: the same id, sent once). Answers 202
  `{"id", "conversation", "status": "accepted", "duplicate": false}`, or 200 with `"duplicate": true` for
  a key seen before.
* `GET /v1/messages/{id}`: the message's status history (`babelhub.services.history`):
  `{"id", "conversation", "state", "statuses": [{"state", "at", "native_id"?, "error"?}]}`.
* `DELETE /v1/messages/{id}`: cancels a message still held for later (`send_at`, quiet hours;
  `babelhub.services.scheduling`): 200 `{"id", "state": "deleted"}`; 409 `not_held` when it is no longer
  held (sent, or being sent); 404 when the tenant has no such message.

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
from typing import Any, Final

import msgspec
from aiohttp import web
from nats.aio.msg import Msg

from babelhub import canonical as c
from babelhub.errors import DecodeError
from babelhub.plugins import RestApi, Services
from babelhub.services.apikeys import Caller
from babelhub.services.deadletters import DeadLetter
from babelhub.services.history import MESSAGE_ID, History, MessageHistory, is_message_id
from babelhub.services.ingest import NATS_UNAVAILABLE
from babelhub.services.outbox import Refusal
from babelhub.services.rest import Endpoint, Param, read_body

__all__ = ["HISTORY_CONSUMER", "MessagesApi"]

log = logging.getLogger("babelhub.api.messages")

HISTORY_CONSUMER: Final = "message-history"
"""The durable consumer on the statuses stream that appends each status to its message's history."""
_NAK_SECONDS: Final = 1.0


class SendAnswer(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    conversation: str
    status: str
    duplicate: bool


class CancelAnswer(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    state: str


class MessagesApi(RestApi):
    """`POST /v1/messages`, `GET` and `DELETE /v1/messages/{id}`, and the consumer that keeps the histories."""

    name = "messages"

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self._history: MessageHistory | None = None

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint("POST", "/v1/messages", self._send, "send", "Send a canonical outbound message",
                     body=c.Message, answer=SendAnswer, status=202,
                     params=(Param("Idempotency-Key", "the same key: the same id, sent once", "header"),)),
            Endpoint("GET", "/v1/messages/{id}", self._status, "read", "A message's status history",
                     answer=History),
            Endpoint("DELETE", "/v1/messages/{id}", self._cancel, "send",
                     "Cancel a message held for later (send_at, quiet hours)", answer=CancelAnswer,
                     errors=(409,)),
        ]

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

    async def _send(self, request: web.Request, caller: Caller) -> web.Response:
        body = await read_body(request, self.services.config.hub.max_body_bytes)
        accepted = await self.services.outbox.submit(caller.tenant, body,
                                                     idempotency_key=request.headers.get("Idempotency-Key", ""))
        return web.json_response({"id": accepted.id, "conversation": accepted.conversation,
                                  "status": accepted.status, "duplicate": accepted.duplicate},
                                 status=200 if accepted.duplicate else 202)

    async def _status(self, request: web.Request, caller: Caller) -> web.Response:
        message_id = request.match_info["id"]
        if not is_message_id(message_id):
            raise Refusal(400, "invalid", f"a message id matches {MESSAGE_ID}", "id")
        history = await self.history.get(caller.tenant, message_id)
        if history is None:  # another tenant's message is answered the same: nothing leaks
            raise Refusal(404, "not_found", f"no message {message_id!r}", "id")
        return web.json_response(_answer(history))

    async def _cancel(self, request: web.Request, caller: Caller) -> web.Response:
        message_id, tenant = request.match_info["id"], caller.tenant
        if not is_message_id(message_id):
            raise Refusal(400, "invalid", f"a message id matches {MESSAGE_ID}", "id")
        scheduler = self.services.ctx.scheduler
        if scheduler is not None and await scheduler.cancel(tenant, message_id):
            return web.json_response({"id": message_id, "state": "deleted"})
        if await self.history.get(tenant, message_id) is None:
            raise Refusal(404, "not_found", f"no message {message_id!r}", "id")
        raise Refusal(409, "not_held", f"message {message_id!r} is not held for later (sent, or being sent): "
                      "only a message waiting for its send_at or the end of quiet hours can be cancelled", "id")

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


def _answer(history: History) -> dict[str, Any]:
    document: dict[str, Any] = msgspec.to_builtins(history)
    document["state"] = history.state
    return document
