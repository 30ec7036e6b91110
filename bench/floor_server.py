"""The floor for `e2e_bench.py` (b): the whole path with no hub logic, as little as any durable relay
must do. A webhook is published to JetStream and answered 200; a push consumer takes it, turns the
Telegram update into a bare canonical message (the processor app needs one to answer) and publishes it
on core NATS; the processor's reply is POSTed to the channel API as `sendMessage`. No verification, no
dedup, no actors, no state, no retries, no statuses: what the hub adds on top of this is its cost."""

from __future__ import annotations

import argparse
import asyncio
import json

import aiohttp
import nats
import uvloop
from aiohttp import web
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from babelhub import canonical as c

STREAM, SUBJECT = "FLOOR", "floor.raw"


async def serve(nats_url: str, port: int, prefix: str, tenant: str, api_base: str, token: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=STREAM, subjects=[SUBJECT]))
    http = aiohttp.ClientSession()

    async def webhook(request: web.Request) -> web.Response:
        await js.publish(SUBJECT, await request.read())
        return web.json_response({"ok": True})

    async def to_processor(msg: Msg) -> None:
        update = json.loads(msg.data)["message"]
        chat = str(update["chat"]["id"])
        inbound = c.Message(id=c.new_id(), tenant=tenant, conversation=c.Conversation(id=chat), ts=c.now(),
                            direction="inbound", parts=[c.Text(text=update["text"])])
        await nc.publish(f"{prefix}.{tenant}.in.{chat}", c.encode(inbound))
        await msg.ack()

    async def to_channel(msg: Msg) -> None:
        reply = c.decode(msg.data)
        assert isinstance(reply, c.Message)
        text = " ".join(part.text for part in reply.parts if isinstance(part, c.Text))
        async with http.post(f"{api_base}/bot{token}/sendMessage",
                             json={"chat_id": reply.conversation.id, "text": text}) as response:
            await response.read()

    await js.subscribe(SUBJECT, durable="floor", stream=STREAM, cb=to_processor, manual_ack=True,
                       config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=20_000))
    await nc.subscribe(f"{prefix}.{tenant}.out.>", cb=to_channel)
    app = web.Application()
    app.router.add_post("/webhooks/{channel}/{connection}", webhook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nats", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--api-base", required=True)
    parser.add_argument("--token", required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.nats, args.port, args.prefix, args.tenant, args.api_base, args.token))


if __name__ == "__main__":
    main()
