"""Stored templates rendered in an outbound message, for the channel of each connection it goes to.

Where an app's message enters the hub decides where this happens: `Outbox.submit` renders what comes over
REST and the transports that submit (so a part that cannot be rendered is refused at once with its JSON
path), and the conversation actor renders what an app publishes straight on a NATS `out` subject (a part
that cannot be rendered makes the message `failed`, naming the path). Either marks the message
(`DONE_META`), so it is rendered once: an approved template that shares a stored template's name is
not taken for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import msgspec

from babelhub import canonical as c
from babelhub.services.templates import (
    MAX_TEMPLATES_PER_MESSAGE,
    RENDERED_META,
    WINDOW_TEMPLATE_META,
    Template,
    TemplateError,
    Templates,
    is_template_name,
    render,
    rendered_meta,
    window_template,
)

__all__ = ["DONE_META", "HUB_META", "Renderer"]

DONE_META: Final = "babelhub.templates_rendered"
"""Meta on a message whose stored templates were rendered by the hub."""
HUB_META: Final = (RENDERED_META, DONE_META)
"""The hub's own meta keys: stripped from what an app submits."""


class Renderer:
    def __init__(self, templates: Templates, template_format_of: Callable[[str], str | None]) -> None:
        """`template_format_of(connection id)`: the approved templates one of the hub's connections sends
        (its codec's `Capabilities.template_format`), None when the hub has no such connection."""
        self.templates = templates
        self._template_format_of = template_format_of

    @staticmethod
    def pending(message: c.Message) -> bool:
        """Whether `message` may name stored templates the hub has not rendered yet."""
        if message.meta.get(DONE_META) is True:
            return False
        return WINDOW_TEMPLATE_META in message.meta or any(isinstance(part, c.Template) for part in message.parts)

    async def rendered(self, message: c.Message) -> c.Message:
        """`message` with each `template` part naming one of its tenant's stored templates rendered for the
        channel of each connection it goes to: the first one's parts in `parts`, the others' in meta
        `RENDERED_META` where they differ; marked `DONE_META`. `TemplateError` names the path of what
        cannot be rendered."""
        message = await self._window_template(message)
        meta = {**message.meta, DONE_META: True}
        stored = await self._stored(message)
        if not stored:
            return msgspec.structs.replace(message, meta=meta)
        connections = _connections(message)
        by_connection = {connection: self._render_parts(message.parts, stored, connection)
                         for connection in dict.fromkeys(connections)}
        parts = by_connection[connections[0]]
        if others := rendered_meta(by_connection, parts):
            meta[RENDERED_META] = others
        return msgspec.structs.replace(message, parts=parts, meta=meta)

    async def _window_template(self, message: c.Message) -> c.Message:
        """The message with meta `WINDOW_TEMPLATE_META` naming a stored template replaced by the approved
        template it renders to on its channel (what the conversation actor sends outside the window)."""
        named = message.meta.get(WINDOW_TEMPLATE_META)
        if not isinstance(named, dict) or not isinstance(named.get("name"), str):
            return message
        template = await self.templates.get(message.tenant, named["name"])
        if template is None:
            return message  # a raw approved template: the actor checks it
        template_format = self._template_format(_connections(message)[0])
        approved = window_template(template, named, template_format, f'$.meta["{WINDOW_TEMPLATE_META}"]')
        return msgspec.structs.replace(message, meta={**message.meta, WINDOW_TEMPLATE_META: approved})

    async def _stored(self, message: c.Message) -> dict[str, Template]:
        """The stored templates the message's template parts name (by the part's `name`)."""
        names = {part.name for part in message.parts if isinstance(part, c.Template) and is_template_name(part.name)}
        if len(names) > MAX_TEMPLATES_PER_MESSAGE:
            raise TemplateError("invalid", f"a message names at most {MAX_TEMPLATES_PER_MESSAGE} templates", "$.parts")
        found = {name: await self.templates.get(message.tenant, name) for name in names}
        return {name: template for name, template in found.items() if template is not None}

    def _template_format(self, connection_id: str) -> str:
        template_format = self._template_format_of(connection_id)
        if template_format is None:  # removed since the message was checked
            raise TemplateError("not_found", f"no connection {connection_id!r}", "$.conversation.connection", 404)
        return template_format

    def _render_parts(self, parts: list[c.Part], stored: dict[str, Template], connection_id: str) -> list[c.Part]:
        template_format = self._template_format(connection_id)
        rendered: list[c.Part] = []
        for index, part in enumerate(parts):
            template = stored.get(part.name) if isinstance(part, c.Template) else None
            if template is None or not isinstance(part, c.Template):
                rendered.append(part)
                continue
            rendered.append(render(template, part, template_format, f"$.parts[{index}]"))
        return rendered


def _connections(message: c.Message) -> list[str]:
    """The connections `message` goes to, its first one first."""
    connections = [target.connection for target in message.targets] or [message.conversation.connection]
    if not connections[0]:
        raise TemplateError("connection_needed", "a stored template is rendered for the channel it goes to: "
                            "name the conversation's connection (or targets)", "$.conversation.connection")
    return connections
