"""What the history API's lists share: the query's limit and cursor, and the answer's shape.

A list answers `{"data": [...], "metadata": {"total_count"?, "has_more", "next_cursor"}}`. A cursor is
opaque to clients: base64url of a small JSON document saying where the next page starts; one that
cannot be read is answered 400 naming `cursor`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from datetime import datetime
from typing import Final, TypeVar

import msgspec
from aiohttp import web

from babelhub.services.outbox import Refusal

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "Metadata", "answer", "check_params", "cursor_of", "limit_of",
           "make_cursor", "time_of"]

DEFAULT_LIMIT: Final = 20
MAX_LIMIT: Final = 100
_MAX_CURSOR: Final = 512
_MAX_PARAM: Final = 256
T = TypeVar("T")


class Metadata(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    has_more: bool
    next_cursor: str | None = None
    total_count: int | None = None


def check_params(request: web.Request, allowed: Iterable[str]) -> None:
    """400 for a query parameter the endpoint does not take (a typo would otherwise filter nothing), a
    repeated one, or one longer than any it takes."""
    known = set(allowed)
    for name in request.query:
        if name not in known:
            raise Refusal(400, "invalid", f"unknown query parameter; this endpoint takes {', '.join(sorted(known))}",
                          name[:64])
        if len(request.query.getall(name)) > 1:
            raise Refusal(400, "invalid", "given more than once", name)
        if len(request.query[name]) > _MAX_PARAM:
            raise Refusal(400, "invalid", f"longer than {_MAX_PARAM} characters", name)


def limit_of(request: web.Request) -> int:
    text = request.query.get("limit", "")
    if not text:
        return DEFAULT_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise Refusal(400, "invalid", f"limit is a whole number from 1 to {MAX_LIMIT}", "limit")
    return int(text)


def time_of(request: web.Request, name: str) -> datetime | None:
    """The query parameter `name` as an RFC 3339 time with an offset, or None when not given."""
    text = request.query.get(name, "")
    if not text:
        return None
    try:
        value = msgspec.json.decode(msgspec.json.encode(text), type=datetime)
    except msgspec.DecodeError:
        value = None
    if value is None or value.tzinfo is None:
        raise Refusal(400, "invalid", "an RFC 3339 time with an offset, e.g. 2026-01-31T12:00:00Z", name)
    return value


def make_cursor(position: msgspec.Struct) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(position)).decode().rstrip("=")


def cursor_of(request: web.Request, position: type[T]) -> T | None:
    """Where the page asked for starts (None: at the beginning); 400 naming `cursor` for one that is not
    one of this list's."""
    text = request.query.get("cursor", "")
    if not text:
        return None
    try:
        if len(text) > _MAX_CURSOR:
            raise ValueError("too long")
        decoded: T = msgspec.json.decode(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), type=position)
    except (ValueError, binascii.Error, msgspec.DecodeError):
        raise Refusal(400, "invalid", "not a cursor this list gave (pass next_cursor back as it is)",
                      "cursor") from None
    return decoded


def answer(data: list[T], *, has_more: bool, next_cursor: str | None, total_count: int | None = None) -> web.Response:
    metadata = Metadata(has_more=has_more, next_cursor=next_cursor if has_more else None, total_count=total_count)
    return web.Response(body=msgspec.json.encode({"data": data, "metadata": metadata}),
                        content_type="application/json")
