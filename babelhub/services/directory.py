"""A channel account's own directory (the chats, contacts and channels its API lists), read through the
connection's codec (`Codec.directory_request`, `Codec.parse_directory`) and cached for a while.

Each page is one call to the channel, made like the connection's other calls: with its credentials,
through its pacer, and a 429 there holds back the whole connection for the time the channel asks. Pages
are cached per tenant, connection, kind, cursor and limit for `hub.directory_cache_seconds`, in a
bounded least-recently-used map, so a client paging through a list, or several clients reading the same
one, does not spend the account's rate limit each time; requests for a page already being read wait for
that one call instead of making their own. What the channel refuses is not cached.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import aiohttp

from babelhub.codecs.base import DirectoryKind, DirectoryPage, HttpResponse, OutboundRequest
from babelhub.codecs.native import retry_after
from babelhub.errors import DecodeError, EncodeError
from babelhub.services.connections import ConnectionService
from babelhub.services.delivery import perform

__all__ = ["MAX_CACHED_PAGES", "BadCursor", "ChannelFailed", "Directory", "NotListed", "retry_seconds"]

log = logging.getLogger("babelhub.directory")

MAX_CACHED_PAGES: Final = 1024
"""Pages kept at once per hub process; the least recently read goes first."""
_DEFAULT_RETRY_AFTER: Final = 1.0
"""What a caller is told to wait when the channel rate-limited the hub without saying for how long."""


class NotListed(Exception):
    """The connection's channel has no documented way to list this kind, or this connection lacks a setting
    the listing needs (`reason`)."""

    def __init__(self, channel: str, kind: DirectoryKind, reason: str = "") -> None:
        super().__init__(f"{channel} cannot list {kind}" + (f": {reason}" if reason else ""))


class BadCursor(ValueError):
    """The cursor is not one this channel's directory gave out."""


class ChannelFailed(Exception):
    """The channel did not give the page: `status` is the HTTP status it answered (0: no answer at all),
    `retry_after` the seconds it asked to wait (on a 429). The message names the channel and the status,
    and never holds a credential or the channel's body."""

    def __init__(self, message: str, status: int = 0, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True)
class _Entry:
    page: DirectoryPage
    until: float


CacheKey = tuple[str, str, str, str, int]


class Directory:
    """Pages of connections' directories, each read from the channel at most once per `ttl` seconds."""

    def __init__(self, http: aiohttp.ClientSession, *, ttl: float, timeout: float = 30.0,
                 max_pages: int = MAX_CACHED_PAGES, clock: Callable[[], float] = time.monotonic) -> None:
        self._http = http
        self._ttl = ttl
        self._timeout = timeout
        self._max_pages = max_pages
        self._clock = clock
        self._pages: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._reading: dict[CacheKey, asyncio.Task[DirectoryPage]] = {}

    async def page(self, connection: ConnectionService, kind: DirectoryKind, cursor: str, limit: int) -> DirectoryPage:
        """The page of `connection`'s `kind` starting at the channel's `cursor`, with at most `limit` items.
        Raises `NotListed`, `BadCursor` or `ChannelFailed`."""
        key: CacheKey = (connection.tenant, connection.id, kind, cursor, limit)
        cached = self._cached(key)
        if cached is not None:
            return cached
        reading = self._reading.get(key)
        if reading is None:
            reading = asyncio.create_task(self._read(key, connection, kind, cursor, limit),
                                          name=f"directory:{connection.id}:{kind}")
            self._reading[key] = reading
            reading.add_done_callback(functools.partial(self._done, key))
        # Shielded: a caller that goes away does not cancel the call the others wait for.
        return await asyncio.shield(reading)

    async def close(self) -> None:
        """Cancel the calls still under way (the hub is stopping) and forget every page."""
        reading = list(self._reading.values())
        for task in reading:
            task.cancel()
        await asyncio.gather(*reading, return_exceptions=True)
        self._pages.clear()

    def _done(self, key: CacheKey, reading: asyncio.Task[DirectoryPage]) -> None:
        if self._reading.get(key) is reading:
            del self._reading[key]
        if not reading.cancelled():
            reading.exception()  # retrieved: a failure every waiter left is not reported as never seen

    async def _read(self, key: CacheKey, connection: ConnectionService, kind: DirectoryKind, cursor: str,
                    limit: int) -> DirectoryPage:
        try:
            request = connection.codec.directory_request(kind, connection.encode_context(to=""), cursor, limit)
        except EncodeError as exc:
            raise NotListed(connection.channel, kind, str(exc)) from None
        except ValueError as exc:
            raise BadCursor(str(exc)) from None
        if request is None:
            raise NotListed(connection.channel, kind)
        response = await self._call(connection, request)
        try:
            page = connection.codec.parse_directory(kind, request, response, cursor, limit)
        except DecodeError as exc:
            raise ChannelFailed(f"{connection.channel} answered with a {kind} list that cannot be read: "
                                f"{exc.reason} at {exc.path}", response.status) from None
        except (ValueError, TypeError, KeyError) as exc:  # a codec's slip on a shape it did not expect
            log.warning("%s: a %s list could not be read: %s", connection.id, kind, type(exc).__name__)
            raise ChannelFailed(f"{connection.channel} answered with a {kind} list that cannot be read",
                                response.status) from None
        if page.error is not None:
            raise ChannelFailed(f"{connection.channel} refused to list {kind}: {page.error.code}", response.status)
        self._keep(key, page)
        return page

    async def _call(self, connection: ConnectionService, request: OutboundRequest) -> HttpResponse:
        """One call through the connection's pacer; any answer but a 2xx is a `ChannelFailed`."""
        await connection.pacer.wait()
        try:
            response = await perform(self._http, request, self._timeout)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("%s: a directory call failed: %s", connection.id, type(exc).__name__)
            raise ChannelFailed(f"{connection.channel} did not answer") from None
        if response.status == 429:
            wait = retry_after(response.headers)
            wait = _DEFAULT_RETRY_AFTER if wait is None else wait
            connection.pacer.pause(wait)  # the channel's word holds for every call of the connection
            raise ChannelFailed(f"{connection.channel} is rate limiting this account (HTTP 429)", 429, wait)
        if not 200 <= response.status < 300:
            raise ChannelFailed(f"{connection.channel} answered HTTP {response.status}", response.status)
        return response

    def _cached(self, key: CacheKey) -> DirectoryPage | None:
        entry = self._pages.get(key)
        if entry is None:
            return None
        if entry.until <= self._clock():
            del self._pages[key]
            return None
        self._pages.move_to_end(key)
        return entry.page

    def _keep(self, key: CacheKey, page: DirectoryPage) -> None:
        if self._ttl <= 0:
            return
        self._pages[key] = _Entry(page, self._clock() + self._ttl)
        self._pages.move_to_end(key)
        while len(self._pages) > self._max_pages:
            self._pages.popitem(last=False)


def retry_seconds(failure: ChannelFailed) -> str:
    """The Retry-After to pass on for `failure`, whole seconds."""
    return str(max(1, math.ceil(failure.retry_after or _DEFAULT_RETRY_AFTER)))
