"""A processing app on the default `nats` processor transport: it subscribes to its tenant's inbound
envelopes on `<prefix>.<tenant>.in.>` and answers each text with "echo: <text>" on the conversation's
`<prefix>.<tenant>.out.<conversation>` subject.

    NATS_PASSWORD=... python examples/nats_processor.py --tenant acme

with, in the hub's configuration, nothing more than the tenant (a processor entry with `transport =
"nats"` only names it). It connects as the tenant's NATS user (`babelhub credentials acme` prints it),
which may subscribe to its own `in` subjects and publish to its own `out` ones; without a password it
connects as nobody (a server that admits anyone). Envelopes are plain canonical JSON.

A core-NATS subscription gets what arrives while it is connected; for at-least-once across restarts,
use a durable JetStream consumer (see the README's "Writing a processor").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from typing import Any

import nats
from nats.aio.msg import Msg


def answer(envelope: dict[str, Any]) -> dict[str, Any] | None:
    """The reply to one inbound envelope, or None (not a text message)."""
    if envelope.get("kind") != "message" or envelope.get("direction") != "inbound":
        return None
    texts = [part["text"] for part in envelope.get("parts", []) if part.get("type") == "text"]
    if not texts:
        return None
    # A complete outbound envelope: on NATS the hub fills nothing in (POST /v1/messages does).
    return {"kind": "message", "id": f"echo-{envelope['id']}", "tenant": envelope["tenant"],
            "ts": envelope["ts"], "direction": "outbound", "reply_to": envelope["id"],
            "conversation": {"id": envelope["conversation"]["id"]},
            "parts": [{"type": "text", "text": f"echo: {text}"} for text in texts]}


async def serve(url: str, prefix: str, tenant: str, password: str) -> None:
    credentials: dict[str, Any] = {"user": f"tenant-{tenant}", "password": password,
                                   "inbox_prefix": f"_INBOX.{tenant}"} if password else {}
    nc = await nats.connect(url, **credentials)

    async def on_inbound(msg: Msg) -> None:
        reply = answer(json.loads(msg.data))
        if reply is not None:
            # The trace context travels on: one trace from the channel's webhook to its API call.
            trace = {name: value for name, value in (msg.headers or {}).items() if name.startswith("trace")}
            await nc.publish(f"{prefix}.{tenant}.out.{reply['conversation']['id']}", json.dumps(reply).encode(),
                             headers=trace or None)

    await nc.subscribe(f"{prefix}.{tenant}.in.>", cb=on_inbound)
    await nc.flush()
    print(f"answering {prefix}.{tenant}.in.>", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await nc.drain()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--prefix", default="bh")
    parser.add_argument("--tenant", required=True)
    arguments = parser.parse_args()
    password = os.environ.get("NATS_PASSWORD", "")  # (not BABELHUB_…: the hub refuses names it does not know)
    asyncio.run(serve(arguments.nats, arguments.prefix, arguments.tenant, password))


if __name__ == "__main__":
    main()
