"""Stored message templates: named, with declared variables and one version per language, rendered for
the channel each message goes to.

A tenant's templates live in the `<prefix>_templates` KV bucket, one key per template (`<tenant>.<name>`).
A template declares its `variables`; each of its `versions`, keyed by language (`en`, `pt_BR`: BCP 47 as
WhatsApp writes it), holds a `text` with `{{variable}}` placeholders, an `active` flag, and optionally the
approved WhatsApp template it stands for (`whatsapp`: that template's name and language, and which
variables fill the parameters of its header and its body, in order).

`render` is how an outbound `template` part naming a stored template becomes what one channel takes: the
part's `language` picks the version (else the first active one); every declared variable must be in the
part's `params`, and nothing else; then a channel whose codec sends WhatsApp's approved templates
(`Capabilities.template_format`), where the version names one, gets a canonical `Template` part with its
name, language and parameters, and any other channel the text with the values filled in (one pass: a
value is never read as a placeholder). `Outbox.submit` renders each message once per connection it goes
to; when `targets` on different channels need different parts, the others' are kept in meta
`RENDERED_META` and the conversation actor's fan-out takes them (`for_connection`). `window_template`
does the same for the template a message names for outside the messaging window (meta
`WINDOW_TEMPLATE_META`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Final, Literal

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from babelhub import canonical as c
from babelhub.services import kvscan
from babelhub.services.apikeys import utc_now

__all__ = [
    "MAX_TEMPLATES_PER_MESSAGE",
    "MAX_TEMPLATE_BYTES",
    "MAX_VALUE",
    "RENDERED_META",
    "WHATSAPP_FORMAT",
    "WINDOW_TEMPLATE_META",
    "NewTemplate",
    "Template",
    "TemplateError",
    "TemplateFields",
    "TemplateUpdate",
    "Templates",
    "Version",
    "WhatsAppComponents",
    "WhatsAppTemplate",
    "check",
    "fill",
    "for_connection",
    "is_template_name",
    "pick_version",
    "placeholders",
    "render",
    "rendered_meta",
    "window_template",
]

NAME: Final = r"^[a-z0-9][a-z0-9_-]{0,63}$"
"""A stored template's name: one KV key token, no wildcards, dots or spaces."""
VARIABLE: Final = r"^[a-z][a-z0-9_]{0,63}$"
"""A variable's name: what WhatsApp takes for a named parameter (lowercase letters, digits, underscores)."""
LANGUAGE: Final = r"^[a-z]{2,3}([_-][A-Za-z0-9]{2,8}){0,2}$"
"""A language code as WhatsApp names them: `en`, `en_US`, `pt_BR`, `zh-Hant-TW`."""
WHATSAPP_NAME: Final = r"^[a-z0-9_]{1,512}$"
"""An approved WhatsApp template's name (Meta: lowercase letters, digits and underscores, at most 512)."""
MAX_TEXT: Final = 4096
MAX_VARIABLES: Final = 50
MAX_VERSIONS: Final = 50
MAX_VALUE: Final = 1024
"""Characters of one variable's value in a message."""
MAX_TEMPLATES_PER_MESSAGE: Final = 16
"""Distinct stored templates one message may name: each is a lookup."""
MAX_TEMPLATE_BYTES: Final = 256 * 1024
"""A stored template, encoded: far below what one KV value may hold."""
WINDOW_TEMPLATE_META: Final = "babelhub.window_template"
"""The conversation actor's meta naming the template sent outside a messaging window (the same name as
`babelhub.actors.conversation.WINDOW_TEMPLATE_META`): one naming a stored template is rendered for WhatsApp
(`window_template`) before the actor reads it."""
RENDERED_META: Final = "babelhub.rendered"
"""Meta the outbox writes (and strips from what apps send): `{connection id: [parts]}` for the targets
whose channel takes other parts than the message's `parts`."""

Name = Annotated[str, msgspec.Meta(pattern=NAME, description="letters a-z, digits, '_' and '-' (64 at most)")]
Variable = Annotated[str, msgspec.Meta(pattern=VARIABLE)]
Language = Annotated[str, msgspec.Meta(pattern=LANGUAGE, max_length=35)]

_PLACEHOLDER: Final = re.compile(r"\{\{\s*([A-Za-z0-9_.:-]*)\s*\}\}")
"""A placeholder as written; its name is checked against `VARIABLE` and the declared variables."""
_VARIABLE: Final = re.compile(VARIABLE)
_NAME: Final = re.compile(NAME)
WHATSAPP_FORMAT: Final = "whatsapp"
"""The approved templates a version can name (`Version.whatsapp`): a channel whose codec sends them
declares this `Capabilities.template_format`."""


class TemplateError(Exception):
    """A template that cannot be stored, or a part that cannot be rendered: a code, words, the JSON path."""

    def __init__(self, code: str, message: str, path: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.path = path
        self.status = status


class WhatsAppComponents(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Which variables fill the approved template's parameters, in their order."""

    header: Annotated[list[Variable], msgspec.Meta(max_length=1)] = []
    """The text header's parameter (Meta: a text header takes one)."""
    body: Annotated[list[Variable], msgspec.Meta(max_length=MAX_VARIABLES)] = []


class WhatsAppTemplate(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The approved WhatsApp template a version stands for."""

    name: Annotated[str, msgspec.Meta(pattern=WHATSAPP_NAME)]
    language: Language
    parameter_format: Literal["positional", "named"] = "positional"
    """Meta's `parameter_format`: positional parameters are sent in order; named ones carry
    `parameter_name`, the variable's name."""
    components: WhatsAppComponents = WhatsAppComponents()


class Version(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT)]
    """The message with `{{variable}}` placeholders: what channels without the approved template get."""
    active: bool = True
    """An inactive version is kept but never sent."""
    whatsapp: WhatsAppTemplate | None = None


class TemplateFields(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A template's content."""

    description: Annotated[str, msgspec.Meta(max_length=500)] = ""
    variables: Annotated[list[Variable], msgspec.Meta(max_length=MAX_VARIABLES)] = []
    versions: Annotated[dict[Language, Version], msgspec.Meta(min_length=1, max_length=MAX_VERSIONS)]
    """By language; the first active one is used when a message names none."""


class TemplateUpdate(TemplateFields, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What `PUT /v1/templates/{name}` takes: the whole content, or the template as GET answered it (its
    `name` must be the URL's: a template is not renamed; the times are the hub's)."""

    name: str = ""
    created_at: str = ""
    updated_at: str = ""


class NewTemplate(TemplateFields, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What `POST /v1/templates` takes."""

    name: Name


class Template(msgspec.Struct, frozen=True, kw_only=True):
    """A stored template, as the API answers it."""

    name: str
    description: str = ""
    variables: list[str] = []
    versions: dict[str, Version] = {}
    created_at: str = ""
    updated_at: str = ""


# ------------------------------------------------------------------------------------------ checks

def is_template_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def placeholders(text: str, path: str) -> list[str]:
    """The variable names `text` uses, in order. A `{{` or `}}` that is not part of a well-formed
    `{{name}}` is refused: it would reach the recipient as it is, or hide a placeholder."""
    names: list[str] = []
    rest: list[str] = []
    position = 0
    for found in _PLACEHOLDER.finditer(text):
        name = found.group(1)
        if not _VARIABLE.fullmatch(name):
            raise TemplateError("invalid_placeholder", f"placeholder {found.group(0)[:80]!r} at character "
                                f"{found.start()} does not name a variable ({VARIABLE})", path)
        names.append(name)
        rest.append(text[position:found.start()])
        position = found.end()
    rest.append(text[position:])
    for piece in rest:
        for brace in ("{{", "}}"):
            if brace in piece:
                raise TemplateError("invalid_placeholder", f"a {brace!r} that is not part of a placeholder: "
                                    "write placeholders as {{name}}", path)
    return names


def check(fields: TemplateFields) -> None:
    """What decoding cannot check: every placeholder and mapped parameter names a declared variable,
    declared once. Raises `TemplateError` naming the path."""
    declared: set[str] = set()
    for index, name in enumerate(fields.variables):
        if name in declared:
            raise TemplateError("invalid", f"variable {name!r} is declared twice", f"$.variables[{index}]")
        declared.add(name)
    for language, version in fields.versions.items():
        path = f"$.versions.{language}"
        for name in placeholders(version.text, f"{path}.text"):
            if name not in declared:
                raise TemplateError("undeclared_variable", f"{{{{{name}}}}} is not a declared variable "
                                    f"(declared: {_listed(fields.variables)})", f"{path}.text")
        if version.whatsapp is not None:
            _check_whatsapp(version.whatsapp, declared, f"{path}.whatsapp.components")


def _check_whatsapp(whatsapp: WhatsAppTemplate, declared: set[str], path: str) -> None:
    for component in ("header", "body"):
        names: list[str] = getattr(whatsapp.components, component)
        for index, name in enumerate(names):
            if name not in declared:
                raise TemplateError("undeclared_variable", f"{name!r} is not a declared variable",
                                    f"{path}.{component}[{index}]")
        if len(set(names)) != len(names):
            raise TemplateError("invalid", "a variable fills one parameter of a component", f"{path}.{component}")


def _listed(names: Iterable[str]) -> str:
    return ", ".join(names) or "none"


# ------------------------------------------------------------------------------------------ rendering

def pick_version(template: Template, language: str, path: str) -> Version:
    """The version `language` names (active), else the first active one."""
    if language:
        version = template.versions.get(language)
        if version is None:
            raise TemplateError("unknown_language", f"template {template.name!r} has no {language!r} version "
                                f"(it has: {_listed(template.versions)})", path)
        if not version.active:
            raise TemplateError("inactive_version", f"the {language!r} version of template {template.name!r} "
                                "is inactive", path)
        return version
    for version in template.versions.values():
        if version.active:
            return version
    raise TemplateError("inactive_version", f"template {template.name!r} has no active version", path)


def _values(template: Template, params: Mapping[str, str], path: str) -> dict[str, str]:
    for name in template.variables:
        if name not in params:
            raise TemplateError("missing_variable", f"template {template.name!r} needs variable {name!r} "
                                f"(declared: {_listed(template.variables)})", f"{path}.{name}")
    for name, value in params.items():
        if name not in template.variables:
            shown = name if _VARIABLE.fullmatch(name) else "(key)"
            raise TemplateError("unknown_variable", f"template {template.name!r} declares no variable "
                                f"{name[:64]!r} (declared: {_listed(template.variables)})", f"{path}.{shown}")
        if len(value) > MAX_VALUE:
            raise TemplateError("invalid", f"a value is at most {MAX_VALUE} characters", f"{path}.{name}")
    return dict(params)


def fill(text: str, values: Mapping[str, str]) -> str:
    """`text` with each `{{name}}` replaced by its value, in one pass."""
    return _PLACEHOLDER.sub(lambda found: values.get(found.group(1), found.group(0)), text)


def render(template: Template, part: c.Template, template_format: str, path: str) -> c.Part:
    """What `part` (naming `template`; at JSON path `path`) becomes on a channel sending the approved
    templates of `template_format` ("" for none: `Capabilities.template_format`). Raises `TemplateError`."""
    version = pick_version(template, part.language, f"{path}.language")
    values = _values(template, part.params, f"{path}.params")
    if template_format == WHATSAPP_FORMAT and version.whatsapp is not None:
        return _whatsapp_part(version.whatsapp, values)
    return c.Text(text=fill(version.text, values))


def window_template(template: Template, named: Mapping[str, Any], template_format: str,
                    path: str) -> dict[str, Any]:
    """The `{name, language, params}` of the approved template `named` (a `WINDOW_TEMPLATE_META` value
    naming `template`) stands for on a channel sending `template_format`: only an approved template can be
    sent outside the window."""
    language, params = named.get("language", ""), named.get("params", {})
    if not isinstance(language, str) or not isinstance(params, dict) or not all(
            isinstance(value, str) for value in params.values()):
        raise TemplateError("invalid_window_template", "a window template is {name, language, params} "
                            "with text values", path)
    if not template_format:
        raise TemplateError("invalid_window_template", "the conversation's channel sends no approved templates",
                            path)
    part = c.Template(name=template.name, language=language, params=params)
    rendered = render(template, part, template_format, path)
    if not isinstance(rendered, c.Template):
        raise TemplateError("invalid_window_template", f"this version of template {template.name!r} names no "
                            f"approved template (versions.<language>.{template_format})", f"{path}.language")
    return {"name": rendered.name, "language": rendered.language, "params": rendered.params}


def _whatsapp_part(whatsapp: WhatsAppTemplate, values: Mapping[str, str]) -> c.Template:
    """The approved template with its parameters as the WhatsApp codec sends them: the body's by position
    (`1`, `2`, …) or by name, the header's with a `header.` prefix."""
    params: dict[str, str] = {}
    for component, prefix in (("header", "header."), ("body", "")):
        names: list[str] = getattr(whatsapp.components, component)
        for position, name in enumerate(names, start=1):
            key = name if whatsapp.parameter_format == "named" else str(position)
            params[prefix + key] = values[name]
    return c.Template(name=whatsapp.name, language=whatsapp.language, params=params)


def for_connection(message: c.Message, connection_id: str) -> c.Message:
    """`message` as it goes out through `connection_id`: its parts, or those `RENDERED_META` keeps for
    that connection; the meta itself is left out either way. Unreadable meta is ignored (it is the hub's
    own, stripped from what apps send)."""
    rendered = message.meta.get(RENDERED_META)
    if rendered is None:
        return message
    meta = {key: value for key, value in message.meta.items() if key != RENDERED_META}
    parts = message.parts
    if isinstance(rendered, dict) and connection_id in rendered:
        with contextlib.suppress(msgspec.ValidationError):
            parts = msgspec.convert(rendered[connection_id], list[c.Part])
    return msgspec.structs.replace(message, parts=parts, meta=meta)


def rendered_meta(parts_by_connection: Mapping[str, list[c.Part]], parts: list[c.Part]) -> dict[str, Any]:
    """`RENDERED_META`'s value: the connections whose parts are not `parts`."""
    return {connection: msgspec.to_builtins(theirs) for connection, theirs in parts_by_connection.items()
            if theirs != parts}


# ------------------------------------------------------------------------------------------ storage

_template: Final = msgspec.json.Decoder(Template)


class Templates:
    """A tenant's templates in the `<prefix>_templates` KV bucket. Every method takes the tenant: a name
    is looked up only under it, so another tenant's template is one that does not exist."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    async def get(self, tenant: str, name: str) -> Template | None:
        if not is_template_name(name):
            return None
        try:
            entry = await self._kv.get(_key(tenant, name))
        except KeyNotFoundError:
            return None
        return _template.decode(entry.value) if entry.value else None

    async def list(self, tenant: str) -> list[Template]:
        """`tenant`'s templates by name (only its keys are read: `<tenant>.*`)."""
        found = [_template.decode(entry.value or b"") for entry in await kvscan.current_values(self._kv, f"{tenant}.*")
                 if is_template_name(entry.key.removeprefix(f"{tenant}."))]
        return sorted(found, key=lambda template: template.name)

    async def create(self, tenant: str, new: NewTemplate) -> Template | None:
        """Store `new`; None when `tenant` has a template of that name already."""
        check(new)
        now = utc_now()
        template = Template(name=new.name, description=new.description, variables=new.variables,
                            versions=new.versions, created_at=now, updated_at=now)
        try:
            await self._kv.create(_key(tenant, new.name), _encoded(template))
        except KeyWrongLastSequenceError:
            return None
        return template

    async def replace(self, tenant: str, name: str, fields: TemplateFields) -> Template | None:
        """Replace the content of `tenant`'s template `name`; None when it has none."""
        check(fields)
        if not is_template_name(name):
            return None
        try:
            entry = await self._kv.get(_key(tenant, name))
        except KeyNotFoundError:
            return None
        if not entry.value or entry.revision is None:
            return None
        earlier = _template.decode(entry.value)
        template = Template(name=name, description=fields.description, variables=fields.variables,
                            versions=fields.versions, created_at=earlier.created_at, updated_at=utc_now())
        try:  # a change made meanwhile (or a delete) is not silently overwritten
            await self._kv.update(_key(tenant, name), _encoded(template), last=entry.revision)
        except KeyWrongLastSequenceError:
            raise TemplateError("conflict", f"template {name!r} changed meanwhile: read it and try again",
                                "", 409) from None
        return template

    async def delete(self, tenant: str, name: str) -> bool:
        if await self.get(tenant, name) is None:
            return False
        await self._kv.delete(_key(tenant, name))
        return True


def _key(tenant: str, name: str) -> str:
    return f"{tenant}.{name}"


def _encoded(template: Template) -> bytes:
    data = msgspec.json.encode(template)
    if len(data) > MAX_TEMPLATE_BYTES:
        raise TemplateError("too_large", f"a template is at most {MAX_TEMPLATE_BYTES} bytes encoded", "$", 413)
    return data
