"""The baseline for `e2e_bench.py`: a bare aiohttp handler that only publishes the body to JetStream
and answers 200 — the least any durable webhook endpoint must do."""

from __future__ import annotations

import argparse
import asyncio

import nats
import uvloop
from aiohttp import web


async def serve(nats_url: str, port: int, subject: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()

    async def handle(request: web.Request) -> web.Response:
        await js.publish(subject, await request.read())
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/webhooks/{channel}/{connection}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nats", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--subject", required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.nats, args.port, args.subject))


if __name__ == "__main__":
    main()
