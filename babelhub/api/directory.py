"""The `directory` API: what a connection's channel account itself knows, listed by the channel's own API
in one shape whatever the channel.

* `GET /v1/connections/{id}/chats`, `/contacts`, `/channels` (`?cursor=&limit=`): answers
  `{"data": [{"id", "name", "kind", "handle", "channel_specific"}], "metadata": {"total_count",
  "has_more", "next_cursor"}}`. `next_cursor` is opaque: it wraps the channel's own cursor (and the
  connection and kind it belongs to), and is handed back as `cursor` for the next page.

A key with scope `read` of the connection's tenant is needed; another tenant's connection is answered
404, like one that does not exist. A channel that cannot list the kind answers 501 `not_implemented`
naming the channel; a channel that fails answers 502 `channel_error` naming its HTTP status (never its
credentials or body), and one that rate-limits the account answers 503 `channel_rate_limited` with the
channel's `Retry-After`. Pages are cached for `hub.directory_cache_seconds` (`babelhub.services.directory`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from typing import Final

import msgspec
from aiohttp import web

from babelhub.codecs.base import DIRECTORY_KINDS, DirectoryItem, DirectoryKind, DirectoryPage
from babelhub.plugins import RestApi, Services
from babelhub.services.apikeys import Caller
from babelhub.services.connections import ConnectionService
from babelhub.services.directory import BadCursor, ChannelFailed, Directory, NotListed, retry_seconds
from babelhub.services.outbox import Refusal
from babelhub.services.rest import Endpoint, Param, Refused

__all__ = ["MAX_LIMIT", "DirectoryAnswer", "DirectoryApi"]

DEFAULT_LIMIT: Final = 50
MAX_LIMIT: Final = 200
"""The largest page a client may ask for: every listing channel gives at least this many in one call."""
MAX_CURSOR_CHARS: Final = 4096
_WHOLE_NUMBER: Final = re.compile(r"[0-9]{1,4}")


class DirectoryMetadata(msgspec.Struct, frozen=True, kw_only=True):
    total_count: int | None
    """How many there are in all, when the channel says (lists it returns whole); else null."""
    has_more: bool
    next_cursor: str | None
    """The `cursor` of the next page; null on the last one."""


class DirectoryAnswer(msgspec.Struct, frozen=True, kw_only=True):
    data: list[DirectoryItem]
    metadata: DirectoryMetadata


class _Cursor(msgspec.Struct, frozen=True, array_like=True):
    """What an opaque cursor holds: the connection and kind it pages, and the channel's own cursor."""

    connection: str
    kind: str
    channel_cursor: str


class DirectoryApi(RestApi):
    """`GET /v1/connections/{id}/chats|contacts|channels`."""

    name = "directory"

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        hub = services.config.hub
        self.directory = Directory(services.http, ttl=hub.directory_cache_seconds, timeout=hub.call_timeout_seconds)

    async def stop(self) -> None:
        await self.directory.close()

    def endpoints(self) -> list[Endpoint]:
        params = (Param("cursor", "the `metadata.next_cursor` of the previous page; none for the first"),
                  Param("limit", f"items per page, 1-{MAX_LIMIT} (default {DEFAULT_LIMIT})", type="integer"))
        return [Endpoint("GET", f"/v1/connections/{{id}}/{kind}", functools.partial(self._list, kind), "read",
                         f"The {kind} the connection's channel account knows, from the channel's own API",
                         answer=DirectoryAnswer, params=params, errors=(501, 502))
                for kind in DIRECTORY_KINDS]

    async def _list(self, kind: DirectoryKind, request: web.Request, caller: Caller) -> web.Response:
        connection = self._connection(caller, request.match_info["id"])
        limit = _limit(request.query.get("limit"))
        channel_cursor = _unwrap(request.query.get("cursor", ""), connection.id, kind)
        try:
            page = await self.directory.page(connection, kind, channel_cursor, limit)
        except NotListed as exc:
            raise Refusal(501, "not_implemented", str(exc)) from None
        except BadCursor:
            raise Refusal(400, "invalid", "the cursor is not one this directory gave out", "cursor") from None
        except ChannelFailed as exc:
            if exc.status == 429:
                raise Refused(503, "channel_rate_limited", f"{exc}; retry later", "",
                              {"Retry-After": retry_seconds(exc)}) from None
            raise Refusal(502, "channel_error", str(exc)) from None
        return web.Response(body=msgspec.json.encode(_answer(page, connection.id, kind)),
                            content_type="application/json")

    def _connection(self, caller: Caller, connection_id: str) -> ConnectionService:
        connection = self.services.ctx.connections.get(connection_id)
        if connection is None or connection.tenant != caller.tenant:  # another tenant's: as if none
            raise Refusal(404, "not_found", f"no connection {connection_id[:64]!r}", "id")
        return connection


def _limit(given: str | None) -> int:
    if given is None:
        return DEFAULT_LIMIT
    if not _WHOLE_NUMBER.fullmatch(given) or not 1 <= int(given) <= MAX_LIMIT:
        raise Refusal(400, "invalid", f"limit must be a whole number from 1 to {MAX_LIMIT}", "limit")
    return int(given)


def _wrap(connection: str, kind: str, channel_cursor: str) -> str:
    packed = msgspec.json.encode(_Cursor(connection, kind, channel_cursor))
    return base64.urlsafe_b64encode(packed).decode().rstrip("=")


def _unwrap(cursor: str, connection: str, kind: str) -> str:
    """The channel's cursor inside `cursor` ("" for the first page); 400 naming `cursor` when it is not
    one this API gave out for this connection and kind."""
    if not cursor:
        return ""
    bad = Refusal(400, "invalid", f"the cursor is not one this API gave out for {kind} of this connection", "cursor")
    if len(cursor) > MAX_CURSOR_CHARS:
        raise bad
    try:
        packed = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        unwrapped = msgspec.json.decode(packed, type=_Cursor)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise bad from None
    if unwrapped.connection != connection or unwrapped.kind != kind or not unwrapped.channel_cursor:
        raise bad
    return unwrapped.channel_cursor


def _answer(page: DirectoryPage, connection: str, kind: str) -> DirectoryAnswer:
    next_cursor = _wrap(connection, kind, page.next_cursor) if page.next_cursor else None
    return DirectoryAnswer(data=page.items, metadata=DirectoryMetadata(
        total_count=page.total, has_more=next_cursor is not None, next_cursor=next_cursor))
