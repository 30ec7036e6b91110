"""A processing app on the `redis` processor transport: it reads its tenant's inbound envelopes from the
hub's inbound stream with a consumer group of its own, and answers each text with "echo: <text>" by
appending to the outbound stream, which the hub reads.

    python examples/redis_processor.py --url redis://127.0.0.1:6379/0 --tenant acme

It needs only redis-py and JSON: envelopes are plain canonical JSON. Every answer carries the inbound
entry's `delivery` id as its `idempotency_key`, so an inbound envelope read twice (the app died before
XACK) is still answered once, and its `hops`, so that two apps answering each other are stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError


def answer(envelope: dict[str, Any]) -> dict[str, Any] | None:
    """The reply to one inbound envelope, or None (not a message, nothing to echo)."""
    if envelope.get("kind") != "message" or envelope.get("direction") != "inbound":
        return None
    texts = [part["text"] for part in envelope.get("parts", []) if part.get("type") == "text"]
    if not texts:
        return None
    return {
        "conversation": {"id": envelope["conversation"]["id"]},
        "reply_to": envelope["id"],
        "parts": [{"type": "text", "text": f"echo: {text}"} for text in texts],
    }


async def serve(url: str, tenant: str, group: str, consumer: str) -> None:
    client = aioredis.Redis.from_url(url)
    inbound, outbound = f"babelhub:{tenant}:inbound", f"babelhub:{tenant}:outbound"
    try:
        await client.xgroup_create(inbound, group, id="0", mkstream=True)
    except ResponseError as exc:
        if not str(exc).startswith("BUSYGROUP"):  # the group exists: carry on where it left off
            raise
    print(f"reading {inbound} as {group}/{consumer}", flush=True)
    since = "0"  # first what this consumer read before and did not acknowledge, then new entries
    while True:
        # Blocks less than redis-py's socket timeout (5 s), which would end a longer wait with an error.
        streams = await client.xreadgroup(group, consumer, {inbound: since}, count=100, block=2000)
        entries = [entry for _, items in streams or [] for entry in items]
        if since == "0" and not entries:
            since = ">"
        for entry_id, fields in entries:
            reply = answer(json.loads(fields[b"envelope"])) if fields else None
            if reply is not None:
                await client.xadd(outbound, {"envelope": json.dumps(reply), "hops": fields[b"hops"],
                                             "idempotency_key": fields[b"delivery"]})
            await client.xack(inbound, group, entry_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--group", default="app")
    parser.add_argument("--consumer", default="app-1")
    arguments = parser.parse_args()
    asyncio.run(serve(arguments.url, arguments.tenant, arguments.group, arguments.consumer))


if __name__ == "__main__":
    main()
