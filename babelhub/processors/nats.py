"""The `nats` processor transport, the default: the app talks to NATS itself.

The hub always publishes a tenant's inbound envelopes on `<prefix>.<tenant>.in.<conversation>` (the
`messages` stream) and takes replies from `<prefix>.<tenant>.out.<conversation>`; an app on NATS
subscribes to the one and publishes on the other with its tenant's credentials (`babelhub credentials
<tenant>`), so there is nothing for the hub to run on its behalf.
"""

from __future__ import annotations

from babelhub.plugins import ProcessorTransport

__all__ = ["NatsTransport"]


class NatsTransport(ProcessorTransport):
    name = "nats"
