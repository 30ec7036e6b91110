"""A processing app on the hub's processor WebSocket: it answers every inbound text with "echo: <text>".

    python examples/ws_processor.py --url ws://127.0.0.1:8080 --key <tenant API key> --processor <id>

It needs only aiohttp. It acknowledges each envelope after answering it, remembers the last `seq` it
acknowledged, and reconnects with `?after=<seq>`, so nothing is lost and nothing it acknowledged comes
twice. Its answers carry an idempotency key made from the envelope's id: an envelope that comes again
(it had not been acknowledged yet) is answered once all the same.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import aiohttp


async def serve(url: str, key: str, processor: str) -> None:
    last_acked = 0
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.ws_connect(f"{url}/ws/processor", params={"processor": processor,
                                                                         "after": str(last_acked)},
                                           headers={"Authorization": f"Bearer {key}"}) as socket:
                    async for frame in socket:
                        if frame.type != aiohttp.WSMsgType.TEXT:
                            break
                        message = json.loads(frame.data)
                        if message["type"] == "envelope":
                            await answer(socket, message["envelope"])
                            await socket.send_json({"type": "ack", "seq": message["seq"]})
                            last_acked = message["seq"]
                        elif message["type"] == "error":
                            print("refused:", message["code"], message["message"], message["path"], flush=True)
            except aiohttp.ClientError as exc:
                print("disconnected:", exc, flush=True)
            await asyncio.sleep(1.0)


async def answer(socket: aiohttp.ClientWebSocketResponse, envelope: dict[str, Any]) -> None:
    if envelope.get("kind") != "message" or envelope.get("direction") != "inbound":
        return
    texts = [part["text"] for part in envelope.get("parts", []) if part.get("type") == "text"]
    if not texts:
        return
    await socket.send_json({
        "type": "send",
        "ref": envelope["id"],
        "idempotency_key": f"echo-{envelope['id']}",
        "envelope": {"conversation": envelope["conversation"], "reply_to": envelope["id"],
                     "parts": [{"type": "text", "text": f"echo: {text}"} for text in texts]},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8080", help="the hub's address (ws://host:port)")
    parser.add_argument("--key", required=True, help="a tenant API key (tenants[].api_keys)")
    parser.add_argument("--processor", required=True, help="the processor's id (processors[].id)")
    args = parser.parse_args()
    asyncio.run(serve(args.url, args.key, args.processor))


if __name__ == "__main__":
    main()
