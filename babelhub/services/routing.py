"""Which processors an inbound envelope goes to, and the headers that keep messages from looping.

A processor is handed its tenant's inbound envelopes that match one of its `routes` (all of them when
it has none). Two NATS headers travel with what processors send and what the hub derives from it:

* `Babelhub-Origin` names the processor a message came from, so that what it injected or sent is never
  routed back to it;
* `Babelhub-Hops` counts how many times a message went through a processor and back: past `MAX_HOPS` it
  is stopped and reported (a dead letter and a `failed` status), never silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping

from babelhub import canonical as c
from babelhub.services.config import Processor, Route

__all__ = ["HOPS_HEADER", "MAX_HOPS", "ORIGIN_HEADER", "hops_of", "matches", "routed_to"]

ORIGIN_HEADER = "Babelhub-Origin"
HOPS_HEADER = "Babelhub-Hops"
MAX_HOPS = 8
"""How many processor round trips a message may make: enough for a relay through a few services, few
enough that two apps answering each other are stopped within seconds."""


def matches(route: Route, envelope: c.Envelope) -> bool:
    conversation = envelope.conversation
    if route.connections and conversation.connection not in route.connections:
        return False
    if route.channels and conversation.channel not in route.channels:
        return False
    if route.conversation_types and conversation.type not in route.conversation_types:
        return False
    if route.kinds and envelope.__struct_config__.tag not in route.kinds:
        return False
    if route.parts:
        if not isinstance(envelope, c.Message):
            return False
        return any(part.__struct_config__.tag in route.parts for part in envelope.parts)
    return True


def routed_to(processor: Processor, envelope: c.Envelope, headers: Mapping[str, str] | None = None) -> bool:
    """Whether `processor` is handed `envelope`: its tenant's, not from itself, matching one of its
    routes (or it has none)."""
    if envelope.tenant != processor.tenant:
        return False
    if headers is not None and headers.get(ORIGIN_HEADER) == processor.id:
        return False
    return not processor.routes or any(matches(route, envelope) for route in processor.routes)


def hops_of(headers: Mapping[str, str] | None) -> int:
    """The hop count a message carries (0 when absent or unreadable: a client cannot make it negative)."""
    value = (headers or {}).get(HOPS_HEADER, "")
    return int(value) if value.isascii() and value.isdigit() and len(value) < 4 else 0
