"""The `http` processor transport: the hub POSTs each inbound envelope routed to the processor to the app's
URL, signed, and takes the outbound envelopes the app answers with.

* The request: the envelope's canonical JSON, with `Content-Type: application/json`, `User-Agent`,
  `X-Babelhub-Delivery` (the same on every retry of the envelope) and `X-Babelhub-Signature:
  t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" under the signing secret>` (`signature`), plus the
  trace context (`traceparent`).
* The answer: 2xx with an empty body (204) is delivered; 2xx with a JSON list of outbound envelopes is
  delivered and the list sent (`babelhub.processors.lanes`); 408, 429 (its Retry-After honoured), 5xx,
  timeouts and connection errors are retried until the deadline; any other status is a dead letter.
* Isolation: per-conversation lanes (`Lanes`), and an HTTP client of its own with at most
  `max_conversations` connections, so a slow app never takes the connections the hub's channel calls use.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Annotated

import aiohttp
import msgspec

from babelhub import __version__
from babelhub.plugins import ProcessorTransport, Services
from babelhub.processors.lanes import MAX_ANSWER_BYTES, Delivered, Delivery, Lanes, Outcome, Rejected, Retry
from babelhub.services.config import Processor

__all__ = ["HttpTransport", "retry_after", "signature"]

USER_AGENT = f"babelhub/{__version__}"
RETRIED_STATUSES = frozenset({408, 429})


class HttpSecrets(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    signing_secret: Annotated[str, msgspec.Meta(min_length=16)]
    """Shared with the app, which checks `X-Babelhub-Signature` with it (at least 16 characters)."""


class HttpOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    url: Annotated[str, msgspec.Meta(pattern=r"^https?://[^\s]+$")]
    timeout_seconds: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    """How long one request may take, answer included."""
    deadline_seconds: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    """How long after the envelope was stored a delivery is retried before it becomes a dead letter."""
    max_conversations: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 64
    """Conversations whose deliveries are in flight at once (one request each)."""


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The `X-Babelhub-Signature` value for `body` sent at `timestamp` (unix seconds)."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


class HttpTransport(ProcessorTransport):
    name = "http"
    Secrets = HttpSecrets
    Options = HttpOptions

    def __init__(self, processor: Processor, services: Services) -> None:
        super().__init__(processor, services)
        self.secrets = self.read("secrets", HttpSecrets)
        self.options = self.read("options", HttpOptions)
        self.lanes = Lanes(self, self.deliver, deadline_seconds=self.options.deadline_seconds,
                           max_conversations=self.options.max_conversations)
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.options.max_conversations),
            timeout=aiohttp.ClientTimeout(total=self.options.timeout_seconds))
        await self.lanes.start()

    async def stop(self) -> None:
        await self.lanes.stop()
        if self._http is not None:
            await self._http.close()

    async def deliver(self, delivery: Delivery) -> Outcome:
        """One POST of `delivery` to the app, and what came of it."""
        assert self._http is not None, "started"
        headers = {
            **delivery.trace,
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Babelhub-Delivery": delivery.id,
            "X-Babelhub-Signature": signature(self.secrets.signing_secret, int(time.time()), delivery.body),
        }
        try:
            async with self._http.post(self.options.url, data=delivery.body, headers=headers,
                                       allow_redirects=False) as response:
                if 200 <= response.status < 300:
                    return Delivered(await _read_at_most(response, MAX_ANSWER_BYTES + 1))
                error = f"HTTP {response.status} {response.reason or ''}".rstrip()
                if response.status in RETRIED_STATUSES or response.status >= 500:
                    return Retry(error, retry_after(response.headers.get("Retry-After", "")))
                return Rejected(error)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Its type and words (host, port, OS error); aiohttp's texts never quote the request's headers.
            return Retry(f"{type(exc).__name__} reaching the app: {exc}"[:300])


async def _read_at_most(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The answer's body, but no more than `limit` bytes of it: a huge answer is not read to its end."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


def retry_after(value: str) -> float:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date, RFC 9110); 0 when absent or
    unreadable."""
    value = value.strip()
    if value.isdigit():
        return float(min(int(value), 86_400))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())

