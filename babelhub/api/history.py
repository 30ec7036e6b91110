"""The `history` API: a tenant's conversations and their messages, the same shape for every channel.

* `GET /v1/conversations`: the tenant's conversations, most recently active first; filters `channel`,
  `connection`, `participant` (a contact id: any of its identities), `since` / `until` (last activity,
  RFC 3339), `q` (text in the last message or a participant's name, any case); `limit` 1-100, `cursor`.
* `GET /v1/conversations/{id}`: one conversation, with its participants and its messaging window.
* `GET /v1/conversations/{id}/messages`: its canonical envelopes newest first, each with its statuses
  (outbound ones: `GET /v1/messages/{id}`'s history); `limit`, `cursor`. A cursor is the position of the
  last message of a page, so the next page starts right below it however many messages arrived meanwhile.

Served from the hub's own records, kept by the records keeper (`babelhub.services.keeper`) from the
messages stream; this API also runs retention (`babelhub.services.retention`) in the process holding
partition 0. Another tenant's conversation is answered 404, as one that does not exist.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated, Final

import msgspec
from aiohttp import web
from nats.js.errors import KeyNotFoundError

from babelhub import canonical as c
from babelhub.actors.conversation import ConversationState, actor_key
from babelhub.api.paging import Metadata, answer, check_params, cursor_of, limit_of, make_cursor, time_of
from babelhub.api.records import Records, open_records
from babelhub.plugins import RestApi, Services
from babelhub.services.apikeys import Caller
from babelhub.services.conversationindex import ConversationRecord, Participant
from babelhub.services.history import MESSAGE_ID, Step, is_message_id
from babelhub.services.keeper import KEEPER_CONSUMER, RecordsKeeper
from babelhub.services.outbox import Refusal
from babelhub.services.rest import Endpoint, Param
from babelhub.services.retention import INTERVAL_SECONDS, Retention
from babelhub.services.supervise import TaskHealth

__all__ = ["HistoryApi"]

log = logging.getLogger("babelhub.api.history")

RETENTION_PARTITION: Final = 0
"""The process holding this partition runs retention."""


# ------------------------------------------------------------------------------------ answers

class Window(msgspec.Struct, frozen=True, kw_only=True):
    """The channel's messaging window (free-form messages only so long after the user's last one)."""

    hours: int
    """0: the channel has none."""
    open: bool
    last_inbound: datetime | None = None
    closes_at: datetime | None = None


class ConversationView(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    channel: str
    connection: str
    native_id: str
    type: str
    participants: list[Participant]
    first_activity: datetime
    last_activity: datetime
    last_message_id: str
    preview: str
    message_count: int


class ConversationDetail(ConversationView, frozen=True, kw_only=True):
    window: Window


class ConversationList(msgspec.Struct, frozen=True, kw_only=True):
    data: list[ConversationView]
    metadata: Metadata


class MessageItem(msgspec.Struct, frozen=True, kw_only=True):
    envelope: c.Message
    statuses: list[Step]
    """An outbound message's states so far (empty for inbound ones)."""


class MessageList(msgspec.Struct, frozen=True, kw_only=True):
    data: list[MessageItem]
    metadata: Metadata


class _ConversationCursor(msgspec.Struct, frozen=True, array_like=True):
    last_activity: Annotated[datetime, msgspec.Meta(tz=True)]
    """With its offset: it is compared with the conversations' times, which all have one."""
    id: str


class _MessageCursor(msgspec.Struct, frozen=True, array_like=True):
    seq: int


_LIST_PARAMS: Final = (
    Param("channel", "only conversations on this channel"),
    Param("connection", "only conversations on this connection"),
    Param("participant", "only conversations with this contact (any of its identities)"),
    Param("since", "last activity at or after (RFC 3339)"),
    Param("until", "last activity before (RFC 3339)"),
    Param("q", "text in the last message or a participant's name (any case)"),
    Param("limit", "1 to 100 (default 20)", type="integer"),
    Param("cursor", "next_cursor of the previous page"),
)
_PAGE_PARAMS: Final = (Param("limit", "1 to 100 (default 20)", type="integer"),
                       Param("cursor", "next_cursor of the previous page"))


class HistoryApi(RestApi):
    """The conversation endpoints, the records keeper's consumer and the retention task."""

    name = "history"

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self._records: Records | None = None
        self.retention: Retention | None = None
        self.keeper: RecordsKeeper | None = None

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint("GET", "/v1/conversations", self._list, "read", "The tenant's conversations, most recent first",
                     answer=ConversationList, params=_LIST_PARAMS),
            Endpoint("GET", "/v1/conversations/{id}", self._one, "read",
                     "A conversation: participants, channel, messaging window", answer=ConversationDetail),
            Endpoint("GET", "/v1/conversations/{id}/messages", self._messages, "read",
                     "A conversation's messages, newest first, with their statuses", answer=MessageList,
                     params=_PAGE_PARAMS),
        ]

    @property
    def records(self) -> Records:
        if self._records is None:
            raise RuntimeError("the history API is not started")
        return self._records

    async def start(self) -> None:
        records = self._records = await open_records(self.services)
        ctx = self.services.ctx
        keeper = self.keeper = RecordsKeeper(records.store, records.index, records.contacts, ctx.dead_letters)
        self.retention = Retention(ctx.nats, ctx.js, ctx.subjects, records.store, records.index, self._retention_days)
        await self.services.consume("messages", f"{ctx.subjects.prefix}.>", KEEPER_CONSUMER, keeper.on_message)
        self.services.spawn("retention", self._retain)

    def _retention_days(self, tenant: str) -> int:
        """The tenant's own retention (config or made at run time), else the hub's."""
        record = self.services.tenants.record(tenant)
        if record is not None and record.retention_days is not None:
            return record.retention_days
        return self.services.config.hub.retention_days

    async def _retain(self, health: TaskHealth) -> None:
        """Purge what is past each tenant's retention, every few minutes, where partition 0 is held."""
        while True:
            if self.retention is not None and self.services.ctx.holds(RETENTION_PARTITION):
                now = datetime.fromtimestamp(self.services.ctx.clock(), UTC)
                await self.retention.purge(sorted(self.services.tenants.ids), now)
            health.ok()
            await asyncio.sleep(INTERVAL_SECONDS)

    # ------------------------------------------------------------------------------------ requests

    async def _list(self, request: web.Request, caller: Caller) -> web.Response:
        check_params(request, [p.name for p in _LIST_PARAMS])
        limit, after = limit_of(request), cursor_of(request, _ConversationCursor)
        since, until = time_of(request, "since"), time_of(request, "until")
        query = request.query
        wanted = await self._identities(caller.tenant, query.get("participant", ""))
        text = query.get("q", "").casefold()
        matching = [record for record in await self.records.index.all(caller.tenant)
                    if _matches(record, query.get("channel", ""), query.get("connection", ""), wanted, text)
                    and (since is None or record.last_activity >= since)
                    and (until is None or record.last_activity < until)]
        matching.sort(key=lambda record: (record.last_activity, record.id), reverse=True)
        start = [r for r in matching if after is None or (r.last_activity, r.id) < (after.last_activity, after.id)]
        page, more = start[:limit], len(start) > limit
        cursor = make_cursor(_ConversationCursor(page[-1].last_activity, page[-1].id)) if more else None
        return answer([_view(record) for record in page], has_more=more, next_cursor=cursor,
                      total_count=len(matching))

    async def _identities(self, tenant: str, participant: str) -> set[str] | None:
        """The sender ids a `participant` filter matches: the contact's identities (None: no filter)."""
        if not participant:
            return None
        contact = await self.records.contacts.get(tenant, participant) if is_message_id(participant) else None
        return {participant} | ({identity.id for identity in contact.identities} if contact else set())

    async def _one(self, request: web.Request, caller: Caller) -> web.Response:
        record = await self._conversation(request, caller)
        detail = ConversationDetail(**msgspec.structs.asdict(_view(record)), window=await self._window(caller.tenant,
                                                                                                        record))
        return web.Response(body=msgspec.json.encode(detail), content_type="application/json")

    async def _messages(self, request: web.Request, caller: Caller) -> web.Response:
        check_params(request, [p.name for p in _PAGE_PARAMS])
        limit, after = limit_of(request), cursor_of(request, _MessageCursor)
        record = await self._conversation(request, caller)
        before = after.seq if after is not None else 0
        if after is not None and before < 1:
            raise Refusal(400, "invalid", "not a cursor this list gave (pass next_cursor back as it is)", "cursor")
        stored = await self.records.store.newest_first(caller.tenant, record.id, before, limit + 1)
        page, more = stored[:limit], len(stored) > limit
        # the statuses of a page's outbound messages are read side by side: one round trip, not one each
        items = [item for item in await asyncio.gather(*(self._item(caller.tenant, s.data) for s in page))
                 if item is not None]
        cursor = make_cursor(_MessageCursor(page[-1].seq)) if more else None
        return answer(items, has_more=more, next_cursor=cursor)

    async def _item(self, tenant: str, data: bytes) -> MessageItem | None:
        envelope = c.decode(data)
        if not isinstance(envelope, c.Message):
            return None
        statuses: list[Step] = []
        if envelope.direction == "outbound":
            history = await self.records.statuses.get(tenant, envelope.id)
            statuses = history.statuses if history is not None else []
        return MessageItem(envelope=envelope, statuses=statuses)

    async def _conversation(self, request: web.Request, caller: Caller) -> ConversationRecord:
        conversation = request.match_info["id"]
        if not is_message_id(conversation):
            raise Refusal(400, "invalid", f"a conversation id matches {MESSAGE_ID}", "id")
        record = await self.records.index.get(caller.tenant, conversation)
        if record is None:  # another tenant's conversation is answered the same: nothing leaks
            raise Refusal(404, "not_found", f"no conversation {conversation!r}", "id")
        return record

    async def _window(self, tenant: str, record: ConversationRecord) -> Window:
        ctx = self.services.ctx
        connection = ctx.connections.get(record.connection)
        hours = connection.codec.capabilities.window_hours if connection is not None else 0
        last = record.last_inbound
        try:
            entry = await ctx.snapshots.get(actor_key(tenant, record.id))
        except KeyNotFoundError:
            entry = None
        if entry is not None and entry.value:
            state = msgspec.msgpack.decode(entry.value, type=ConversationState)
            if state.last_inbound:
                heard = datetime.fromtimestamp(state.last_inbound, UTC)
                last = max(last, heard) if last is not None else heard
        if not hours:
            return Window(hours=0, open=True, last_inbound=last)
        closes = last + timedelta(hours=hours) if last is not None else None
        now = datetime.fromtimestamp(ctx.clock(), UTC)
        return Window(hours=hours, open=closes is not None and now < closes, last_inbound=last, closes_at=closes)


def _matches(record: ConversationRecord, channel: str, connection: str, wanted: set[str] | None, text: str) -> bool:
    if (channel and record.channel != channel) or (connection and record.connection != connection):
        return False
    if wanted is not None and not any(participant.id in wanted for participant in record.participants):
        return False
    if text:
        names = " ".join(participant.name for participant in record.participants)
        return text in record.preview.casefold() or text in names.casefold()
    return True


def _view(record: ConversationRecord) -> ConversationView:
    return ConversationView(
        id=record.id, channel=record.channel, connection=record.connection, native_id=record.native_id,
        type=record.type, participants=record.participants, first_activity=record.first_activity,
        last_activity=record.last_activity, last_message_id=record.last_message_id, preview=record.preview,
        message_count=record.message_count)
