"""A processing app behind the `nats` processor transport in request mode: it answers each inbound
envelope's NATS request with the outbound envelopes to send (a JSON list; an empty body sends nothing).

    BABELHUB_NATS_PASSWORD=... python examples/nats_request_processor.py --tenant acme --processor my-app

with, in the hub's configuration:

    [[processors]]
    id = "my-app"
    tenant = "acme"
    transport = "nats"
    options = { mode = "request" }

It connects as the tenant's NATS user (`babelhub credentials acme` prints it), which may subscribe to
`bh.acme.requests.>` and answer the requests it gets. Several copies may run: they share the requests
as a queue group.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg


def answer_to(envelope: dict[str, Any]) -> list[dict[str, Any]]:
    """The outbound envelopes answering one inbound envelope (none for anything but a text message)."""
    if envelope.get("kind") != "message" or envelope.get("direction") != "inbound":
        return []
    texts = [part["text"] for part in envelope.get("parts", []) if part.get("type") == "text"]
    if not texts:
        return []
    return [{"conversation": {"id": envelope["conversation"]["id"]}, "reply_to": envelope["id"],
             "parts": [{"type": "text", "text": f"You said: {' '.join(texts)}"}]}]


async def serve(nc: Client, subject: str) -> None:
    """Answer every request on `subject` until cancelled."""

    async def on_request(msg: Msg) -> None:
        # `Babelhub-Delivery` is the same on every retry of one envelope: an app with side effects can
        # remember it to do them once. The replies themselves are sent once by the hub whatever happens.
        replies = answer_to(json.loads(msg.data))
        await msg.respond(json.dumps(replies).encode() if replies else b"")

    subscription = await nc.subscribe(subject, queue="processors", cb=on_request)
    try:
        await asyncio.Event().wait()
    finally:
        await subscription.unsubscribe()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--prefix", default="bh")
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--processor", required=True)
    args = parser.parse_args()
    nc = await nats.connect(args.nats, user=f"tenant-{args.tenant}", password=os.environ.get("BABELHUB_NATS_PASSWORD"),
                            inbox_prefix=f"_INBOX.{args.tenant}")
    try:
        await serve(nc, f"{args.prefix}.{args.tenant}.requests.{args.processor}")
    finally:
        await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
