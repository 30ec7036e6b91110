"""A processing app behind the `http` processor transport: it checks each request's signature and answers
an inbound text message with a reply in the same HTTP answer (a sync reply).

    APP_SIGNING_SECRET=... python examples/http_processor.py [--port 8090]

with, in the hub's configuration:

    [[processors]]
    id = "my-app"
    tenant = "acme"
    transport = "http"
    secrets = { signing_secret = "<the same value as APP_SIGNING_SECRET>" }
    options = { url = "http://127.0.0.1:8090/babelhub" }

It needs only aiohttp (and no part of babelhub): envelopes are plain JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import time
from typing import Any

from aiohttp import web

TOLERANCE_SECONDS = 300
"""How old (or how far ahead) a signature's timestamp may be: the hub signs every attempt afresh, so
only a replayed request or a badly set clock is older than this."""


def verify(secret: str, header: str, body: bytes, *, now: float | None = None,
           tolerance: int = TOLERANCE_SECONDS) -> bool:
    """Whether `X-Babelhub-Signature` (`t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`) is the
    hub's signature of exactly `body`, made within `tolerance` seconds of `now`."""
    fields = dict(item.strip().split("=", 1) for item in header.split(",") if "=" in item)
    timestamp, given = fields.get("t", ""), fields.get("v1", "")
    if not timestamp.isdigit() or abs((time.time() if now is None else now) - int(timestamp)) > tolerance:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, given)


def answer_to(envelope: dict[str, Any]) -> list[dict[str, Any]]:
    """The outbound envelopes answering one inbound envelope (none for anything but a text message)."""
    if envelope.get("kind") != "message" or envelope.get("direction") != "inbound":
        return []
    texts = [part["text"] for part in envelope.get("parts", []) if part.get("type") == "text"]
    if not texts:
        return []
    # Only the conversation and the parts are needed: the hub fills in the id, tenant, time and direction.
    return [{"conversation": {"id": envelope["conversation"]["id"]}, "reply_to": envelope["id"],
             "parts": [{"type": "text", "text": f"You said: {' '.join(texts)}"}]}]


def make_app(secret: str) -> web.Application:
    async def inbound(request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(secret, request.headers.get("X-Babelhub-Signature", ""), body):
            # A 4xx other than 408/429 is not retried: the hub keeps the envelope as a dead letter.
            return web.json_response({"error": "bad signature"}, status=401)
        replies = answer_to(json.loads(body))
        return web.json_response(replies) if replies else web.Response(status=204)

    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/babelhub", inbound)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    web.run_app(make_app(os.environ["APP_SIGNING_SECRET"]), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
