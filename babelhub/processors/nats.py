"""The `nats` processor transport, the default: the app talks to NATS itself, in one of two modes.

* `mode = "publish"` (the default): the hub always publishes a tenant's inbound envelopes on
  `<prefix>.<tenant>.in.<conversation>` (the `messages` stream) and takes replies from
  `<prefix>.<tenant>.out.<conversation>`; an app on NATS subscribes to the one and publishes on the other
  with its tenant's credentials (`babelhub credentials <tenant>`), so there is nothing for the hub to run
  on its behalf.
* `mode = "request"`: the hub sends each inbound envelope routed to the processor as a NATS request on
  `subject` (default `<prefix>.<tenant>.requests.<processor id>`), with the headers `Babelhub-Delivery`
  (the same on every retry) and the trace context, and takes the reply's body (a JSON list of outbound
  envelopes, or nothing) through the outbox. No responders or no reply within `timeout_seconds` is
  retried until `deadline_seconds`, in per-conversation lanes (`babelhub.processors.lanes`).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
import nats.errors

from babelhub.errors import ConfigError
from babelhub.plugins import ProcessorTransport, Services
from babelhub.processors.lanes import Delivered, Delivery, Lanes, Outcome, Retry
from babelhub.services.config import Processor

__all__ = ["DELIVERY_HEADER", "NatsTransport", "request_subject"]

DELIVERY_HEADER = "Babelhub-Delivery"


class NatsOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    mode: Literal["publish", "request"] = "publish"
    subject: str = ""
    """Request mode: where requests go; under `<prefix>.<tenant>.requests.` (the default ends with the
    processor's id), where the tenant's NATS user may answer them."""
    timeout_seconds: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    deadline_seconds: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    max_conversations: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 64


def request_subject(prefix: str, tenant: str, processor_id: str) -> str:
    """The default subject of a request-mode processor's requests."""
    return f"{prefix}.{tenant}.requests.{processor_id}"


class NatsTransport(ProcessorTransport):
    name = "nats"
    Options = NatsOptions

    def __init__(self, processor: Processor, services: Services) -> None:
        super().__init__(processor, services)
        self.options = self.read("options", NatsOptions)
        self.subject = self._subject()
        self.lanes = Lanes(self, self.deliver, deadline_seconds=self.options.deadline_seconds,
                           max_conversations=self.options.max_conversations)

    def _subject(self) -> str:
        prefix, tenant = self.services.ctx.subjects.prefix, self.processor.tenant
        subject = self.options.subject or request_subject(prefix, tenant, self.processor.id)
        under = f"{prefix}.{tenant}.requests."
        tokens = subject.removeprefix(under).split(".")
        if not subject.startswith(under) or not all(token and token.isprintable() and " " not in token
                                                    and token not in ("*", ">") for token in tokens):
            index = self.services.config.processors.index(self.processor)
            raise ConfigError(f"$.processors[{index}].options.subject: {subject!r} is not a subject under {under!r}")
        return subject

    async def start(self) -> None:
        if self.options.mode == "request":
            await self.lanes.start()

    async def stop(self) -> None:
        await self.lanes.stop()

    async def deliver(self, delivery: Delivery) -> Outcome:
        """One request to the app, and what came of it."""
        try:
            reply = await self.services.ctx.nats.request(
                self.subject, delivery.body, timeout=self.options.timeout_seconds,
                headers={**delivery.trace, DELIVERY_HEADER: delivery.id})
        except nats.errors.NoRespondersError:
            return Retry("no app is subscribed to " + self.subject)
        except nats.errors.TimeoutError:
            return Retry(f"no reply within {self.options.timeout_seconds:g} s")
        except nats.errors.Error as exc:
            return Retry(f"{type(exc).__name__}: {exc}"[:300])
        return Delivered(reply.data)
