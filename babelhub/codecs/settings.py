"""What a connection must configure for its channel: each codec declares its `secrets` and `options`
as Structs of this module's kind, so a connection's settings are checked when the config is read.

A field without a default is required; one with a default is optional. A field's docstring is the
meaning an operator needs: it is shown in the README's channel settings table
(`babelhub.codecs.support.settings_table`, printed by `babelhub channels`) and in the error that names
a missing field. Names a channel does not
declare are refused, so a misspelt secret fails at start instead of at the first send.

Where a channel documents alternatives (Twilio's auth token or API key pair, WhatsApp's Meta or
360dialog credentials), each alternative's fields are optional and the codec's `check_settings` says
which one is missing by raising `MissingSetting`.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Mapping
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

if TYPE_CHECKING:  # base.py imports this module for the defaults of the Codec contract
    from babelhub.codecs.base import Codec

__all__ = [
    "ConnectionOptions",
    "MissingSetting",
    "NoSecrets",
    "QuietHours",
    "SettingRow",
    "Settings",
    "SettingsError",
    "WindowTemplate",
    "field_docs",
    "read_settings",
    "settings_rows",
]


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A connection's secrets or options for one channel: unknown names are refused."""


class NoSecrets(Settings, frozen=True, kw_only=True):
    """The secrets of a channel that needs none."""


class WindowTemplate(Settings, frozen=True, kw_only=True):
    """A pre-approved template sent in place of a free-form message outside the messaging window."""

    name: str
    language: str = ""
    params: dict[str, str] = {}


ClockTime = Annotated[str, msgspec.Meta(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")]


class QuietHours(Settings, frozen=True, kw_only=True):
    """Local hours in which non-urgent outbound messages are held until `end`."""

    start: ClockTime
    end: ClockTime
    time_zone: str = "UTC"

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {self.time_zone!r} (an IANA name such as Europe/Paris)") from None


class ConnectionOptions(Settings, frozen=True, kw_only=True):
    """The options every connection takes, whatever its channel; a channel's options extend these."""

    public_url: str = ""
    """The URL the channel calls and signs, when the hub is behind a proxy and sees another one."""
    window_template: WindowTemplate | None = None
    """`{name, language, params}`: the template sent instead of a free-form message once the channel's
    messaging window has closed (WhatsApp: 24 h after the user's last message); unset: such a message
    fails with `outside_window`."""
    quiet_hours: QuietHours | None = None
    """`{start = "21:00", end = "08:00", time_zone = "Europe/Paris"}`: non-urgent messages that would go
    out in these local hours (the recipient's time zone when the conversation knows it) are held,
    `queued`, until `end`."""


class MissingSetting(ValueError):
    """A setting a codec's `check_settings` finds missing: `name` is its path inside the connection
    (`secrets.auth_token`, `options.phone_number_id`), `reason` says when it is needed."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class SettingsError(ValueError):
    """A connection's settings do not fit its channel: `path` names the setting inside the connection
    (`secrets.bot_token`), `reason` what is wrong. Neither holds a secret's value."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def read_settings(codec: Codec, secrets: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[Settings, Settings]:
    """A connection's `secrets` and `options` as `codec` declares them; `SettingsError` names the first
    missing, unknown or mistyped one. Messages name settings, never a secret's value."""
    typed_secrets = _convert(codec, "secrets", codec.secret_settings, secrets)
    typed_options = _convert(codec, "options", codec.option_settings, options)
    try:
        codec.check_settings(typed_secrets, typed_options)
    except MissingSetting as exc:
        raise SettingsError(exc.name, f"missing; {exc.reason}") from None
    return typed_secrets, typed_options


def _convert(codec: Codec, kind: str, struct: type[Settings], raw: Mapping[str, Any]) -> Settings:
    fields = {field.encode_name: field for field in msgspec.structs.fields(struct)}
    for name in raw:
        if name not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise SettingsError(f"{kind}.{name}", f"{codec.channel} takes no such {kind[:-1]} (known: {known})")
    docs = field_docs(struct)
    for name, field in fields.items():
        if field.required and name not in raw:
            hint = docs.get(field.name, "")
            raise SettingsError(f"{kind}.{name}", f"missing; {codec.channel} needs it" + (f": {hint}" if hint else ""))
    try:
        # Strict: codecs read the connection's dicts, so a value must already be of the declared type
        # (`auto_read = "false"` would be read as true).
        return msgspec.convert(dict(raw), struct)
    except msgspec.ValidationError as exc:
        # msgspec says "<what is wrong> - at `$.<field>…`", naming types, never values (settings are str,
        # bool, int, lists and tables: no enum, whose error would quote the value).
        reason, _, where = str(exc).partition(" - at `$")
        raise SettingsError(kind + where.rstrip("`"), reason) from None


@cache
def field_docs(struct: type[msgspec.Struct]) -> dict[str, str]:
    """Each field's docstring (the string literal right after its annotation), by attribute name,
    inherited ones included; fields without one are left out. msgspec keeps no field docs, so they
    are read from the source."""
    docs: dict[str, str] = {}
    for cls in reversed(struct.__mro__):
        if not (isinstance(cls, type) and issubclass(cls, msgspec.Struct)) or cls is msgspec.Struct:
            continue
        docs.update(_own_field_docs(cls))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source shipped (a compiled package): no docs, the names still work
        return {}
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    for statement, following in zip(body.body, body.body[1:], strict=False):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[statement.target.id] = " ".join(inspect.cleandoc(following.value.value).split())
    return docs


class SettingRow(msgspec.Struct, frozen=True, kw_only=True):
    """One setting as the README's table shows it."""

    path: str
    """`secrets.<name>` or `options.<name>`, with the name as written in the config."""
    required: bool
    default: Any
    meaning: str


def settings_rows(struct: type[Settings], kind: str, inherited: bool = True) -> list[SettingRow]:
    """The fields of `struct` (a codec's secrets or options), the required ones first, each kind in
    declaration order; without those of `ConnectionOptions` when `inherited` is false (the table lists
    them once, for every channel)."""
    docs = field_docs(struct)
    skip = set() if inherited else set(ConnectionOptions.__struct_fields__)
    rows = []
    for field in msgspec.structs.fields(struct):
        if field.name in skip:
            continue
        required = field.required
        default = None if required else (field.default_factory() if field.default is msgspec.NODEFAULT
                                          else field.default)
        rows.append(SettingRow(path=f"{kind}.{field.encode_name}", required=required, default=default,
                               meaning=docs.get(field.name, "")))
    return sorted(rows, key=lambda row: not row.required)
