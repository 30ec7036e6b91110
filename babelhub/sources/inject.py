"""The `inject` inbound source: other services publish canonical envelopes on
`<prefix>.<tenant>.inject.<connection>` (core NATS) for a connection whose mode is `inject`.

Each hub process subscribes in one queue group, so each injection is taken by one of them. It is
checked (size, the subject's tenant and connection, the envelope: `babelhub.services.injected`) and
recorded as a raw record marked canonical (`Ingest.record_canonical`, deduplicated on the envelope's
native id or id) before it is answered; from there it goes the way of every channel delivery: the
connection actor decodes it, the conversation actor applies it, and the tenant's processors get it.

Injections are taken one at a time, in the order they arrive, so what one service publishes in order
is recorded in that order. A request (`msg.reply` set) is answered `{"id": <hub id>, "duplicate":
<bool>}` once recorded, or `{"error": {"code", "message", "path"}}`; what is refused is kept in the
dead-letter stream (stage `inject`), a plain publish's too. A tenant's NATS user may publish on its
own `inject.>` only (`babelhub.services.credentials`).
"""

from __future__ import annotations

import json
import logging

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from babelhub.errors import DecodeError, PayloadTooLarge
from babelhub.plugins import InboundSource, Services
from babelhub.services.connections import ConnectionService
from babelhub.services.deadletters import DeadLetter
from babelhub.services.ingest import NATS_UNAVAILABLE

__all__ = ["INJECT_STAGE", "Injections", "inject_subject"]

log = logging.getLogger("babelhub.inject")

INJECT_STAGE = "inject"
"""The dead-letter stage of refused injections (NATS and Redis)."""


def inject_subject(prefix: str, tenant: str, connection: str) -> str:
    return f"{prefix}.{tenant}.inject.{connection}"


class Refused(Exception):
    """An injection the hub does not record: `code` and `path` go into the error answer."""

    def __init__(self, code: str, message: str, path: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.path = path


class Injections(InboundSource):
    """Canonical envelopes published on NATS for every connection whose mode is `inject`."""

    name = "inject"

    def __init__(self, connections: list[ConnectionService], services: Services) -> None:
        super().__init__(connections, services)
        self._subscription: Subscription | None = None

    def address(self, connection: ConnectionService, http_url: str) -> str:
        subject = inject_subject(self.services.ctx.subjects.prefix, connection.tenant, connection.id)
        return f"canonical envelopes published on NATS {subject}"

    async def start(self) -> None:
        prefix = self.services.ctx.subjects.prefix
        # One queue group over every hub process: each injection is recorded by one of them.
        self._subscription = await self.services.ctx.nats.subscribe(
            inject_subject(prefix, "*", "*"), queue=f"{prefix}-inject", cb=self._on_injection)

    async def stop(self) -> None:
        if self._subscription is not None:
            try:
                await self._subscription.unsubscribe()
            except Exception:  # the connection may be gone already: the server forgets the interest anyway
                log.debug("inject: unsubscribing failed", exc_info=True)
            self._subscription = None

    async def _on_injection(self, msg: Msg) -> None:
        tenant = msg.subject.split(".")[-3]
        try:
            connection = self._connection(msg.subject)
            hub_id, duplicate = await self._record(connection, msg)
        except Refused as exc:
            await self._park(msg, tenant, exc)
            await self._answer(msg, {"error": {"code": exc.code, "message": exc.message, "path": exc.path}})
            return
        except NATS_UNAVAILABLE as exc:  # not recorded: the sender tries again
            log.warning("inject: could not record an injection: %r", exc)
            await self._answer(msg, {"error": {"code": "unavailable", "path": "",
                                               "message": "the hub cannot record injections right now; retry"}})
            return
        await self._answer(msg, {"id": hub_id, "duplicate": duplicate})

    def _connection(self, subject: str) -> ConnectionService:
        """The inject connection `subject` names, of the tenant it names."""
        tenant, _, connection_id = subject.removeprefix(self.services.ctx.subjects.prefix + ".").split(".")
        connection = self.connections.get(connection_id)
        if connection is None or connection.tenant != tenant:
            raise Refused("unknown_connection", f"tenant {tenant[:64]!r} has no inject connection named "
                                                f"{connection_id[:64]!r}", "")
        return connection

    async def _record(self, connection: ConnectionService, msg: Msg) -> tuple[str, bool]:
        limit = self.services.config.hub.max_body_bytes
        if len(msg.data) > limit:
            raise Refused("too_large", f"the envelope is {len(msg.data)} bytes; the hub takes at most {limit} "
                                       "(hub.max_body_bytes)", "$")
        try:
            return await self.services.ingest.record_canonical(connection, msg.data, msg.subject)
        except DecodeError as exc:
            raise Refused("invalid", exc.reason, exc.path) from None
        except PayloadTooLarge as exc:
            raise Refused("too_large", str(exc), "$") from None

    async def _park(self, msg: Msg, tenant: str, refused: Refused) -> None:
        """Keep a refused injection; under the subject's tenant only when the hub serves that tenant."""
        connection = msg.subject.split(".")[-1]
        await self.services.ctx.dead_letters.park(DeadLetter(
            stage=INJECT_STAGE, error=f"{refused.code}: {refused.message}", path=refused.path,
            tenant=tenant if self.services.tenants.known(tenant) else "", connection=connection[:64],
            subject=msg.subject[:256],
            body=msg.data))

    @staticmethod
    async def _answer(msg: Msg, answer: dict[str, object]) -> None:
        if msg.reply:
            await msg.respond(json.dumps(answer).encode())
