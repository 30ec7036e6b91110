"""A deadline for receiving request bodies.

aiohttp waits for a body as long as the client keeps the connection open, so a client that sends
headers and part of a body, then stalls, would hold a handler (and whatever it holds) forever. Each
request gets `seconds` from its headers to its last body byte; the deadline is lifted the moment the
body is complete, so what the handler does afterwards (a JetStream publish, a WebSocket session) is
not limited by it.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

__all__ = ["body_timeout"]


def body_timeout(seconds: float) -> Middleware:
    @web.middleware
    async def answer_408_to_stalled_bodies(request: web.Request, handler: Handler) -> web.StreamResponse:
        deadline = asyncio.timeout(seconds)
        handling = True

        def body_complete() -> None:
            if handling:  # the body may end after the handler answered (an early 413)
                deadline.reschedule(None)

        try:
            async with deadline:
                request.content.on_eof(body_complete)  # called at once when there is no body
                try:
                    return await handler(request)
                finally:
                    handling = False
        except TimeoutError:
            if not deadline.expired():
                raise  # the handler's own timeout, not this deadline
        response = web.json_response({"error": f"the request body did not arrive within {seconds:g} s "
                                               "(hub.body_timeout_seconds)"}, status=408)
        response.force_close()
        return response

    return answer_408_to_stalled_bodies
