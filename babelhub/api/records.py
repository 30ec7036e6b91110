"""The history API's stores, opened once per API plug-in from the hub's `Services`."""

from __future__ import annotations

from dataclasses import dataclass

from babelhub.plugins import Services
from babelhub.services.contacts import Contacts
from babelhub.services.conversationindex import ConversationIndex
from babelhub.services.history import MessageHistory
from babelhub.services.historystore import HistoryStore
from babelhub.services.kvscan import open_bucket

__all__ = ["Records", "open_records"]


@dataclass(frozen=True)
class Records:
    store: HistoryStore
    index: ConversationIndex
    contacts: Contacts
    statuses: MessageHistory


async def open_records(services: Services) -> Records:
    ctx, hub = services.ctx, services.config.hub
    store = await HistoryStore.open(ctx.nats, ctx.js, ctx.publisher, ctx.subjects,
                                    dedup_window=hub.dedup_window_seconds, replicas=hub.replicas)
    index = ConversationIndex(await open_bucket(ctx.js, ctx.subjects.bucket("conversation_index"), hub.replicas),
                              ctx.publisher)
    contacts = Contacts(await open_bucket(ctx.js, ctx.subjects.bucket("contacts"), hub.replicas), ctx.publisher)
    return Records(store, index, contacts, await MessageHistory.open(ctx.js, ctx.subjects))
