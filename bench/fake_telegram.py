"""A fake Telegram Bot API for `e2e_bench.py` and `cluster_bench.py`: answers sendMessage like the real one
and notes when each text arrived, so the bench can compute webhook → channel API latency."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time

import uvloop
from aiohttp import web


async def serve(port: int) -> None:
    arrivals: list[tuple[str, float]] = []
    ids = itertools.count(1)

    async def send_message(request: web.Request) -> web.Response:
        body = await request.json()
        arrivals.append((str(body.get("text", "")), time.time()))
        return web.json_response({"ok": True, "result": {"message_id": next(ids), "date": int(time.time()),
                                                         "chat": {"id": body.get("chat_id"), "type": "private"}}})

    async def stats(request: web.Request) -> web.Response:
        """Every (text, arrival time) so far, or those after the first `since` (a poller's cursor)."""
        since = int(request.query.get("since", "0"))
        return web.Response(text=json.dumps(arrivals[since:]), content_type="application/json")

    async def reset(_: web.Request) -> web.Response:
        arrivals.clear()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/bot{token}/sendMessage", send_message)
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
