"""The baseline for `rest_bench.py`: a bare aiohttp handler that answers `GET /v1/messages/{id}` with one
NATS KV get of the same key in the same bucket the hub reads (`<prefix>_messages`, `<tenant>.<id>`), its
MessagePack value answered as JSON. No authentication, no rate limit, no checks: the least the endpoint
must do."""

from __future__ import annotations

import argparse
import asyncio

import msgspec
import nats
import uvloop
from aiohttp import web
from nats.js.errors import KeyNotFoundError


async def serve(nats_url: str, port: int, bucket: str, tenant: str) -> None:
    nc = await nats.connect(nats_url)
    kv = await nc.jetstream().key_value(bucket)

    async def handle(request: web.Request) -> web.Response:
        try:
            entry = await kv.get(f"{tenant}.{request.match_info['id']}")
        except KeyNotFoundError:
            raise web.HTTPNotFound() from None
        body = msgspec.json.encode(msgspec.msgpack.decode(entry.value or b"\xc0"))
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/messages/{id}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nats", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--tenant", required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.nats, args.port, args.bucket, args.tenant))


if __name__ == "__main__":
    main()
