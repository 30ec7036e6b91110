"""Helpers every codec needs for reading native payloads and API answers, so that each codec module
holds only what is particular to its channel."""

from __future__ import annotations

import hmac
import json
import math
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import msgspec

from babelhub.canonical import Error
from babelhub.codecs.base import HttpRequest, HttpResponse, SendResult
from babelhub.errors import DecodeError

__all__ = [
    "ErrorRule",
    "convert",
    "finite",
    "from_unix",
    "http_failure",
    "json_body",
    "parse_time",
    "read_json",
    "retry_after",
    "same_secret",
]

T = TypeVar("T")


class ErrorRule(msgspec.Struct, frozen=True):
    """What a channel's error code means: whether sending again later can succeed, and in words an
    operator can act on. Codecs keep a table `{code: ErrorRule(...)}` from the channel's error list."""

    retryable: bool
    meaning: str

_encoder = msgspec.json.Encoder()


def read_json(request: HttpRequest | HttpResponse) -> Any:
    """The body as JSON, or a DecodeError at `$`."""
    try:
        return msgspec.json.decode(request.body)
    except msgspec.DecodeError as exc:
        raise DecodeError(f"body is not valid JSON: {exc}", path="$") from None
    except RecursionError:
        raise DecodeError("body is nested too deeply to read", path="$") from None


def convert(value: Any, into: type[T], path: str = "$") -> T:
    """`value` (decoded JSON) as the typed native Struct `into`; a DecodeError names the path."""
    try:
        return msgspec.convert(value, into, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        marker = " - at `$"
        if marker in text:
            reason, _, rest = text.partition(marker)
            return_path = path + rest.rstrip("`")
            raise DecodeError(reason, path=return_path) from None
        raise DecodeError(text, path=path) from None


def json_body(value: Any) -> bytes:
    """Compact JSON for a request body (msgspec Structs and plain values alike)."""
    return _encoder.encode(value)


def from_unix(seconds: float, path: str = "$") -> datetime:
    """A Unix time as an aware UTC datetime; a DecodeError at `path` when it is no real time."""
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, ValueError, OSError, TypeError) as exc:
        raise DecodeError(f"not a usable Unix time: {seconds!r} ({exc})", path=path) from None


def parse_time(value: str, path: str = "$") -> datetime:
    """An ISO 8601 / RFC 3339 timestamp as an aware UTC datetime. Channels that leave out the offset
    mean UTC; canonical timestamps always carry one."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (TypeError, ValueError):
        raise DecodeError(f"not an ISO 8601 timestamp: {value!r}", path=path) from None
    except OverflowError:  # at the edge of the calendar, the offset moves it out of range
        raise DecodeError(f"timestamp {value!r} is out of range", path=path) from None


def finite(value: float, path: str = "$") -> float:
    """`value` if it is a finite number (JSON cannot carry NaN or infinity), else a DecodeError."""
    if not math.isfinite(value):
        raise DecodeError(f"not a finite number: {value!r}", path=path)
    return value


def retry_after(headers: dict[str, str]) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), if there is one."""
    value = headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def http_failure(response: HttpResponse, code: str = "", message: str = "", native: Any = None) -> SendResult:
    """A failed API call: 408, 429 and 5xx may succeed later; other 4xx will not."""
    if native is None:
        try:
            native = json.loads(response.body) if response.body else None
        except ValueError:
            native = response.body.decode("utf-8", "replace")
    retryable = response.status in (408, 425, 429) or response.status >= 500
    return SendResult(
        ok=False,
        retryable=retryable,
        retry_after=retry_after(response.headers),
        error=Error(code=code or f"http_{response.status}", message=message, retryable=retryable, native=native),
    )


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison, false when no secret is configured."""
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())
