"""The `contacts` API: the people a tenant's conversations were with, one contact per person.

* `GET /v1/contacts`: the tenant's contacts by id; filters `channel`, `connection`, `q` (name, handle or
  native id, any case); `limit` 1-100, `cursor`.
* `GET /v1/contacts/{id}`: one contact, with its identities and conversations.
* `POST /v1/contacts/{id}/identities` `{"contact": "<other id>"}` (admin): the other contact's identities
  and conversations become this one's (one person across channels); the other is deleted.
* `DELETE /v1/contacts/{id}` (admin): erases the person (`babelhub.services.erasure`): their messages,
  raw records, identities and the conversations only they were in; answers what was removed.

Contacts are made by the records keeper when it hears a sender (`babelhub.services.contacts`). Another
tenant's contact is answered 404, as one that does not exist. Linking and erasing are audited
(`contact.link`, `contact.erase`).
"""

from __future__ import annotations

from typing import Final

import msgspec
from aiohttp import web

from babelhub.api.paging import Metadata, answer, check_params, cursor_of, limit_of, make_cursor
from babelhub.api.records import Records, open_records
from babelhub.plugins import RestApi, Services
from babelhub.services.apikeys import Caller
from babelhub.services.contacts import Contact
from babelhub.services.erasure import Erased, Erasure
from babelhub.services.history import MESSAGE_ID, is_message_id
from babelhub.services.outbox import Refusal
from babelhub.services.rest import Endpoint, Param, decode, read_body

__all__ = ["ContactsApi"]


class ContactList(msgspec.Struct, frozen=True, kw_only=True):
    data: list[Contact]
    metadata: Metadata


class LinkBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    contact: str
    """The contact whose identities join this one (it is deleted)."""


class _ContactCursor(msgspec.Struct, frozen=True, array_like=True):
    id: str


_LIST_PARAMS: Final = (
    Param("channel", "only contacts with an identity on this channel"),
    Param("connection", "only contacts with an identity on this connection"),
    Param("q", "text in a name, handle or native id (any case)"),
    Param("limit", "1 to 100 (default 20)", type="integer"),
    Param("cursor", "next_cursor of the previous page"),
)


class ContactsApi(RestApi):
    name = "contacts"

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self._records: Records | None = None

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint("GET", "/v1/contacts", self._list, "read", "The tenant's contacts", answer=ContactList,
                     params=_LIST_PARAMS),
            Endpoint("GET", "/v1/contacts/{id}", self._one, "read", "A contact, its identities and conversations",
                     answer=Contact),
            Endpoint("DELETE", "/v1/contacts/{id}", self._erase, "admin",
                     "Erase a person: their messages, raw records, identities and their own conversations",
                     answer=Erased),
            Endpoint("POST", "/v1/contacts/{id}/identities", self._link, "admin",
                     "Link another contact's identities into this one (one person across channels)",
                     body=LinkBody, answer=Contact),
        ]

    @property
    def records(self) -> Records:
        if self._records is None:
            raise RuntimeError("the contacts API is not started")
        return self._records

    async def start(self) -> None:
        self._records = await open_records(self.services)

    async def _list(self, request: web.Request, caller: Caller) -> web.Response:
        check_params(request, [p.name for p in _LIST_PARAMS])
        limit, after = limit_of(request), cursor_of(request, _ContactCursor)
        query = request.query
        matching = sorted((contact for contact in await self.records.contacts.all(caller.tenant)
                           if _matches(contact, query.get("channel", ""), query.get("connection", ""),
                                       query.get("q", "").casefold())), key=lambda contact: contact.id)
        start = [contact for contact in matching if after is None or contact.id > after.id]
        page, more = start[:limit], len(start) > limit
        return answer(page, has_more=more, next_cursor=make_cursor(_ContactCursor(page[-1].id)) if more else None,
                      total_count=len(matching))

    async def _one(self, request: web.Request, caller: Caller) -> web.Response:
        return _json(await self._contact(request.match_info["id"], caller.tenant, "id"))

    async def _link(self, request: web.Request, caller: Caller) -> web.Response:
        contact_id = (await self._contact(request.match_info["id"], caller.tenant, "id")).id
        body = decode(await read_body(request, self.services.config.hub.max_body_bytes), LinkBody)
        other = await self._contact(body.contact, caller.tenant, "$.contact")
        if other.id == contact_id:
            raise Refusal(400, "invalid", "a contact cannot be linked to itself", "$.contact")
        linked = await self.records.contacts.link(caller.tenant, contact_id, other.id)
        if linked is None:  # one of them went meanwhile (erased, linked elsewhere)
            raise Refusal(404, "not_found", f"no contact {other.id!r}", "$.contact")
        await self.services.audit.record(caller, caller.tenant, "contact.link", contact_id,
                                         {"linked": other.id, "identities": str(len(other.identities))})
        return _json(linked)

    async def _erase(self, request: web.Request, caller: Caller) -> web.Response:
        contact = await self._contact(request.match_info["id"], caller.tenant, "id")
        records, ctx = self.records, self.services.ctx
        erased = await Erasure(ctx.js, ctx.subjects, records.store, records.index, records.contacts).erase(
            caller.tenant, contact)
        await self.services.audit.record(caller, caller.tenant, "contact.erase", contact.id, {
            "conversations": str(erased.conversations), "messages": str(erased.messages),
            "raw_records": str(erased.raw_records), "identities": str(erased.identities)})
        return _json(erased)

    async def _contact(self, contact_id: str, tenant: str, path: str) -> Contact:
        if not is_message_id(contact_id):
            raise Refusal(400, "invalid", f"a contact id matches {MESSAGE_ID}", path)
        contact = await self.records.contacts.get(tenant, contact_id)
        if contact is None:  # another tenant's contact is answered the same: nothing leaks
            raise Refusal(404, "not_found", f"no contact {contact_id!r}", path)
        return contact


def _matches(contact: Contact, channel: str, connection: str, text: str) -> bool:
    identities = contact.identities
    if channel and all(identity.channel != channel for identity in identities):
        return False
    if connection and all(identity.connection != connection for identity in identities):
        return False
    if text:
        words = [contact.name, *(f"{i.name} {i.handle} {i.native_id}" for i in identities)]
        return any(text in word.casefold() for word in words)
    return True


def _json(document: msgspec.Struct) -> web.Response:
    return web.Response(body=msgspec.json.encode(document), content_type="application/json")
