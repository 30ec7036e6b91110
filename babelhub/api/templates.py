"""The `templates` API: a tenant's stored message templates (`babelhub.services.templates`).

* `GET /v1/templates` (read): the tenant's templates, by name: `{"data": [template, …]}`.
* `POST /v1/templates` (admin): a new one, `{name, description?, variables, versions}`; 201 with the
  template, 409 `exists` when the tenant has one of that name.
* `GET /v1/templates/{name}` (read), `PUT /v1/templates/{name}` (admin: its whole content, as POST;
  `name`, if given, is the URL's), `DELETE /v1/templates/{name}` (admin; 204).
* `POST /v1/templates/{name}/render` (read): a preview, `{language?, params, channel}` → `{"channel",
  "part"}`, the part a message naming the template would carry on that channel.

Another tenant's template is answered 404, as one that does not exist. Each change is an audit event
(`template.create`, `template.update`, `template.delete`) naming the template and its languages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated

import msgspec
from aiohttp import web

from babelhub import canonical as c
from babelhub.plugins import RestApi, Services
from babelhub.services.apikeys import Caller
from babelhub.services.config import channel_codec
from babelhub.services.outbox import Refusal
from babelhub.services.rest import Endpoint, decode, read_body
from babelhub.services.templates import (
    MAX_VALUE,
    NAME,
    NewTemplate,
    Template,
    TemplateError,
    Templates,
    TemplateUpdate,
    is_template_name,
    render,
)

__all__ = ["TemplatesApi"]


class TemplateList(msgspec.Struct, frozen=True, kw_only=True):
    data: list[Template]


class RenderRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    channel: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9_]{1,32}$")]
    """The channel to render for: one sending approved templates (WhatsApp) gets the approved template
    where a version names one, any other the text."""
    language: str = ""
    params: dict[str, Annotated[str, msgspec.Meta(max_length=MAX_VALUE)]] = {}


class RenderAnswer(msgspec.Struct, frozen=True, kw_only=True):
    channel: str
    part: c.Part


class TemplatesApi(RestApi):
    """CRUD of stored templates, and previews of their rendering."""

    name = "templates"

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self._templates: Templates | None = None

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint("GET", "/v1/templates", self._list, "read", "The tenant's templates", answer=TemplateList),
            Endpoint("POST", "/v1/templates", self._create, "admin", "Store a template",
                     body=NewTemplate, answer=Template, status=201, errors=(409,)),
            Endpoint("GET", "/v1/templates/{name}", self._get, "read", "A template", answer=Template),
            Endpoint("PUT", "/v1/templates/{name}", self._replace, "admin", "Replace a template's content",
                     body=TemplateUpdate, answer=Template, errors=(409,)),
            Endpoint("DELETE", "/v1/templates/{name}", self._delete, "admin", "Delete a template", status=204),
            Endpoint("POST", "/v1/templates/{name}/render", self._render, "read",
                     "What a message naming the template carries on a channel", body=RenderRequest,
                     answer=RenderAnswer),
        ]

    async def start(self) -> None:
        renderer = self.services.ctx.renderer
        if renderer is not None:  # the store the hub renders from: one view of the bucket
            self._templates = renderer.templates
            return
        ctx = self.services.ctx
        self._templates = Templates(await ctx.js.key_value(ctx.subjects.bucket("templates")))

    @property
    def templates(self) -> Templates:
        if self._templates is None:
            raise RuntimeError("the templates API is not started")
        return self._templates

    # ------------------------------------------------------------------------------------ requests

    async def _list(self, _: web.Request, caller: Caller) -> web.Response:
        return _json(TemplateList(data=await self.templates.list(caller.tenant)))

    async def _create(self, request: web.Request, caller: Caller) -> web.Response:
        new = decode(await self._body(request), NewTemplate)
        with _refused():
            template = await self.templates.create(caller.tenant, new)
        if template is None:
            raise Refusal(409, "exists", f"template {new.name!r} exists: change it with PUT", "$.name")
        await self._audit(caller, "template.create", template)
        return _json(template, 201)

    async def _get(self, request: web.Request, caller: Caller) -> web.Response:
        return _json(await self._found(request, caller))

    async def _replace(self, request: web.Request, caller: Caller) -> web.Response:
        name = _name(request)
        fields = decode(await self._body(request), TemplateUpdate)
        if fields.name and fields.name != name:
            raise Refusal(400, "invalid", f"a template is not renamed: create {fields.name[:64]!r} instead", "$.name")
        with _refused():
            template = await self.templates.replace(caller.tenant, name, fields)
        if template is None:
            raise _not_found(name)
        await self._audit(caller, "template.update", template)
        return _json(template)

    async def _delete(self, request: web.Request, caller: Caller) -> web.Response:
        name = _name(request)
        if not await self.templates.delete(caller.tenant, name):
            raise _not_found(name)
        await self.services.audit.record(caller, caller.tenant, "template.delete", name)
        return web.Response(status=204)

    async def _render(self, request: web.Request, caller: Caller) -> web.Response:
        template = await self._found(request, caller)
        asked = decode(await self._body(request), RenderRequest)
        part = c.Template(name=template.name, language=asked.language, params=asked.params)
        try:
            template_format = channel_codec(asked.channel).capabilities.template_format
        except LookupError:
            raise Refusal(400, "invalid", f"no channel {asked.channel!r} is installed", "$.channel") from None
        with _refused():
            rendered = render(template, part, template_format, "$")
        return _json(RenderAnswer(channel=asked.channel, part=rendered))

    # ------------------------------------------------------------------------------------ helpers

    async def _body(self, request: web.Request) -> bytes:
        return await read_body(request, self.services.config.hub.max_body_bytes)

    async def _found(self, request: web.Request, caller: Caller) -> Template:
        name = _name(request)
        template = await self.templates.get(caller.tenant, name)
        if template is None:  # another tenant's is answered the same: nothing leaks
            raise _not_found(name)
        return template

    async def _audit(self, caller: Caller, action: str, template: Template) -> None:
        changes = {"languages": ", ".join(template.versions),
                   "active": ", ".join(language for language, version in template.versions.items() if version.active),
                   "variables": ", ".join(template.variables)}
        await self.services.audit.record(caller, caller.tenant, action, template.name, changes)


@contextlib.contextmanager
def _refused() -> Iterator[None]:
    """Turns a `TemplateError` into the API's refusal (the same code, words and path)."""
    try:
        yield
    except TemplateError as exc:
        raise Refusal(exc.status, exc.code, exc.message, exc.path) from None


def _name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not is_template_name(name):
        raise Refusal(400, "invalid", f"a template name matches {NAME}", "name")
    return name


def _not_found(name: str) -> Refusal:
    return Refusal(404, "not_found", f"no template {name!r}", "name")


def _json(answer: msgspec.Struct, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(answer), status=status, content_type="application/json")
