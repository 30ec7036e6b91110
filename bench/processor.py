"""The processing app for `e2e_bench.py`, as a user would write it: subscribe to inbound envelopes on
NATS, answer each with the same text on the conversation's `out` subject."""

from __future__ import annotations

import argparse
import asyncio

import nats
import uvloop
from nats.aio.msg import Msg

from babelhub import canonical as c


async def serve(nats_url: str, prefix: str, tenant: str) -> None:
    nc = await nats.connect(nats_url)

    async def answer(msg: Msg) -> None:
        inbound = c.decode(msg.data)
        if not isinstance(inbound, c.Message):
            return
        reply = c.Message(id=c.new_id(), tenant=tenant, conversation=c.Conversation(id=inbound.conversation.id),
                          ts=c.now(), direction="outbound", parts=inbound.parts)
        await nc.publish(f"{prefix}.{tenant}.out.{inbound.conversation.id}", c.encode(reply))

    await nc.subscribe(f"{prefix}.{tenant}.in.>", cb=answer)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nats", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--tenant", required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.nats, args.prefix, args.tenant))


if __name__ == "__main__":
    main()
