"""The canonical envelope: the one message format every babelhub service reads and writes.

Everything that crosses a process boundary (NATS, HTTP, WebSocket, Redis) is an `Envelope` encoded as
JSON with `encode`, and read back with `decode`. An envelope is one of three kinds, told apart by the
`kind` field:

* `Message`  — content: an ordered list of parts (text, media, buttons, …), so mixed content is natural.
* `Status`   — what happened to a message we sent (accepted → queued → sent → delivered → read, or failed).
* `Activity` — everything that is neither: typing, read markers, members joining, opt-outs, handoffs,
  a call starting or ending, its DTMF digits and playback marks.

Evolution is additive only: new fields get defaults, unknown fields are ignored on decode, and `v`
(the schema version) changes only if a field's meaning ever has to change.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, TypeAlias, TypeVar

import msgspec
import msgspec.inspect

from babelhub.errors import DecodeError

__all__ = [
    "PART_TYPES",
    "SCHEMA_VERSION",
    "Action",
    "Activity",
    "Button",
    "Buttons",
    "Card",
    "Carousel",
    "Contact",
    "Conversation",
    "Delete",
    "Edit",
    "Envelope",
    "Error",
    "Form",
    "FormField",
    "List",
    "ListRow",
    "ListSection",
    "Location",
    "Media",
    "Mention",
    "Message",
    "Native",
    "Part",
    "Poll",
    "Product",
    "ProductItem",
    "Reaction",
    "Sender",
    "Status",
    "Target",
    "Template",
    "Text",
    "Unsupported",
    "conversation_id",
    "decode",
    "encode",
    "message_id",
    "new_id",
    "now",
    "schema",
    "sender_id",
    "stable_id",
]

SCHEMA_VERSION: Final = 1
_T = TypeVar("_T")

# The JSON Schema must accept exactly what the decoder accepts, and JSON Schema's `format` keywords only
# annotate. So the two string encodings msgspec parses are spelt out as patterns. Python's `re` (which
# Python validators use) lets `$` match before a final newline; `(?!\n)` stops that, and is a no-op in
# ECMA-262 regular expressions (which other validators use).
_YEAR = "(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"  # 0001-9999, as Python's datetime
_LEAP_YEAR = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (
    f"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    f"|02-(?:0[1-9]|1[0-9]|2[0-8]))|{_LEAP_YEAR}-02-29)"
)
_TIME = "(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]+)?"
_OFFSET = "(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):?[0-5][0-9])"
#: What msgspec reads as a datetime with an offset: RFC 3339 (`T`, `t` or a space between date and time,
#: any number of fraction digits, `Z`/`z` or ±HH:MM, also ±HHMM), real calendar dates only.
_RFC3339_PATTERN: Final = f"^{_DATE}[Tt ]{_TIME}{_OFFSET}$(?!\\n)"
#: Standard base64 with padding, as msgspec reads `bytes`: no URL-safe alphabet, no line breaks.
_BASE64_PATTERN: Final = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$(?!\\n)"

UtcDatetime = Annotated[
    datetime,
    msgspec.Meta(tz=True, description="RFC 3339 timestamp with offset (UTC)",
                 extra_json_schema={"pattern": _RFC3339_PATTERN}),
]
Base64 = Annotated[bytes, msgspec.Meta(extra_json_schema={"pattern": _BASE64_PATTERN})]
#: A JSON number msgspec can read as a float: beyond the double range it answers "Number out of range".
Double = Annotated[
    float, msgspec.Meta(extra_json_schema={"minimum": -sys.float_info.max, "maximum": sys.float_info.max})
]

Direction: TypeAlias = Literal["inbound", "outbound"]
ConversationType: TypeAlias = Literal["direct", "group", "channel", "thread"]
Role: TypeAlias = Literal["user", "bot", "agent", "system"]
#: plain / markdown / html are what applications write. The channel dialects only appear on the way
#: out, after `babelhub.codecs.degrade` converted the text into what the target channel renders.
TextFormat: TypeAlias = Literal[
    "plain", "markdown", "html", "slack", "whatsapp", "telegram_html", "telegram_markdownv2"
]
MediaKind: TypeAlias = Literal["image", "audio", "voice", "video", "document", "sticker", "animation"]
ButtonAction: TypeAlias = Literal["reply", "url", "call", "postback"]
State: TypeAlias = Literal["accepted", "queued", "sent", "delivered", "read", "played", "failed", "deleted"]
ActivityType: TypeAlias = Literal[
    "typing", "read", "presence", "joined", "left", "opt_in", "opt_out", "started", "ended", "handoff",
    "call_started", "call_ended", "dtmf", "mark",
]


class _Struct(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Base of every canonical Struct: immutable, keyword-only, defaults left out of the JSON (except the
    fields declared with `_always_written`)."""


def _always_written(default: _T) -> _T:
    """A default that the JSON always carries: the header fields that give an envelope its meaning, so a
    reader in any language needs no knowledge of defaults. msgspec's `omit_defaults` leaves out plain
    defaults and empty collections from a factory, never the value of any other factory."""
    return msgspec.field(default_factory=lambda: default)


# --------------------------------------------------------------------------------------------- header


class Conversation(_Struct, frozen=True, kw_only=True):
    """Where a message lives. `id` is the hub's id; the rest says which channel chat it maps to."""

    id: str
    channel: str = ""
    connection: str = ""
    native_id: str = ""
    type: ConversationType = _always_written("direct")


class Sender(_Struct, frozen=True, kw_only=True):
    id: str = ""
    native_id: str = ""
    name: str = ""
    role: Role = "user"
    handle: str = ""
    """A phone number, @username or e-mail address: how a person would address the sender."""


class Native(_Struct, frozen=True, kw_only=True):
    """Where an envelope came from: the channel's own message id and the raw record's stream sequence."""

    id: str = ""
    seq: int = 0
    thread: str = ""
    """The channel's own id of the thread (Slack `C1:thread_ts`, a Google Chat thread name), so that
    replies into `Envelope.thread` can name it."""


class Target(_Struct, frozen=True, kw_only=True):
    """One destination of an outbound message: a connection and the native chat id to send to."""

    connection: str
    to: str


class Error(_Struct, frozen=True, kw_only=True):
    code: str
    message: str = ""
    retryable: bool = False
    native: Any = None


# ---------------------------------------------------------------------------------------------- parts


class _Part(_Struct, tag_field="type", frozen=True, kw_only=True):
    """Base of message parts; the JSON field `type` names the part."""


class Mention(_Struct, frozen=True, kw_only=True):
    """Someone named in a text: `offset`/`length` are in Unicode code points of `Text.text`."""

    id: str = ""
    native_id: str = ""
    name: str = ""
    offset: int = 0
    length: int = 0


class Text(_Part, tag="text", frozen=True, kw_only=True):
    text: str
    format: TextFormat = "plain"
    mentions: list[Mention] = []


class Media(_Part, tag="media", frozen=True, kw_only=True):
    """A file. At least one of `url` (fetchable), `file_id` (the channel's handle) or `data` is set."""

    media: MediaKind
    url: str = ""
    file_id: str = ""
    data: Base64 = b""
    mime: str = ""
    size: int = 0
    filename: str = ""
    caption: str = ""
    duration_ms: int = 0
    width: int = 0
    height: int = 0


class Location(_Part, tag="location", frozen=True, kw_only=True):
    lat: Double
    lon: Double
    name: str = ""
    address: str = ""
    url: str = ""


class Contact(_Part, tag="contact", frozen=True, kw_only=True):
    name: str
    phones: list[str] = []
    emails: list[str] = []
    org: str = ""
    urls: list[str] = []


class Button(_Struct, frozen=True, kw_only=True):
    """One button. `value` is the URL, phone number or postback payload; a reply button needs only id."""

    id: str
    title: str
    action: ButtonAction = "reply"
    value: str = ""


class Buttons(_Part, tag="buttons", frozen=True, kw_only=True):
    text: str = ""
    buttons: list[Button] = []


class ListRow(_Struct, frozen=True, kw_only=True):
    id: str
    title: str
    description: str = ""


class ListSection(_Struct, frozen=True, kw_only=True):
    title: str = ""
    rows: list[ListRow] = []


class List(_Part, tag="list", frozen=True, kw_only=True):
    """A menu of rows behind one button (WhatsApp list, Slack select, Telegram keyboard, …)."""

    text: str = ""
    button: str = ""
    header: str = ""
    footer: str = ""
    sections: list[ListSection] = []


class Card(_Part, tag="card", frozen=True, kw_only=True):
    title: str = ""
    subtitle: str = ""
    media: Media | None = None
    buttons: list[Button] = []


class Carousel(_Part, tag="carousel", frozen=True, kw_only=True):
    cards: list[Card] = []


class Template(_Part, tag="template", frozen=True, kw_only=True):
    """A pre-approved template (WhatsApp, …). `fallback_text` uses `{{name}}` / `{{1}}` placeholders
    filled from `params`, for channels without templates."""

    name: str
    language: str = ""
    params: dict[str, str] = {}
    fallback_text: str = ""


class Reaction(_Part, tag="reaction", frozen=True, kw_only=True):
    emoji: str
    target: str = ""
    """The canonical id of the message reacted to."""
    removed: bool = False


class Poll(_Part, tag="poll", frozen=True, kw_only=True):
    question: str
    options: list[str] = []
    multiple: bool = False


class FormField(_Struct, frozen=True, kw_only=True):
    id: str
    label: str = ""
    kind: str = "text"
    required: bool = False
    options: list[str] = []
    value: Any = None
    """Filled in on the way in (a submitted form); empty on the way out."""


class Form(_Part, tag="form", frozen=True, kw_only=True):
    """A form or flow: sent to ask for fields, or received with their values."""

    id: str
    title: str = ""
    fields: list[FormField] = []


class ProductItem(_Struct, frozen=True, kw_only=True):
    product_id: str
    quantity: int = 1
    price: Double | None = None
    currency: str = ""


class Product(_Part, tag="product", frozen=True, kw_only=True):
    """Products from a catalog: shown (outbound) or ordered (inbound)."""

    catalog_id: str = ""
    product_ids: list[str] = []
    items: list[ProductItem] = []


class Action(_Part, tag="action", frozen=True, kw_only=True):
    """What a user clicked or chose: the button/row/option `id`, its `title`, and the message it was on."""

    id: str
    title: str = ""
    source: str = ""


class Edit(_Part, tag="edit", frozen=True, kw_only=True):
    """This message replaces the content of `target` (a canonical message id)."""

    target: str


class Delete(_Part, tag="delete", frozen=True, kw_only=True):
    """The message `target` (a canonical message id) was or is to be deleted."""

    target: str


class Unsupported(_Part, tag="unsupported", frozen=True, kw_only=True):
    """A native fragment babelhub has no part for, kept verbatim: data is never thrown away."""

    reason: str = ""
    native: Any = None


Part: TypeAlias = (
    Text
    | Media
    | Location
    | Contact
    | Buttons
    | List
    | Card
    | Carousel
    | Template
    | Reaction
    | Poll
    | Form
    | Product
    | Action
    | Edit
    | Delete
    | Unsupported
)

PART_TYPES: Final = frozenset(str(part.__struct_config__.tag) for part in typing.get_args(Part))
"""The `type` of every kind of part."""

# ----------------------------------------------------------------------------------------- envelopes


class _Envelope(_Struct, tag_field="kind", frozen=True, kw_only=True):
    """The header every envelope carries."""

    id: str
    tenant: str
    conversation: Conversation
    ts: UtcDatetime
    v: int = _always_written(SCHEMA_VERSION)
    direction: Direction = _always_written("inbound")
    sender: Sender | None = None
    native: Native | None = None
    reply_to: str = ""
    """The canonical id of the message this one answers."""
    thread: str = ""
    """The canonical id of the thread's root message, where the channel has threads."""
    meta: dict[str, Any] = {}
    """Namespaced extensions (`"<channel>.<key>"`, `"babelhub.<key>"`): never needed to understand a message."""


SendAt = Annotated[
    datetime,
    msgspec.Meta(tz=True, description="Outbound only: the message is held (status `queued`) and sent at this "
                 "time (RFC 3339 timestamp with offset); cancel it before then with a `delete` part naming its id",
                 extra_json_schema={"pattern": _RFC3339_PATTERN}),
]


class Message(_Envelope, tag="message", frozen=True, kw_only=True):
    parts: list[Part] = []
    targets: list[Target] = []
    """Outbound only: where to send when not back into `conversation`. Several = fan-out."""
    send_at: SendAt | None = None
    """Outbound only: held durably and sent at this time (README "Scheduled sends and quiet hours")."""


class Status(_Envelope, tag="status", frozen=True, kw_only=True):
    message_id: str = ""
    native_id: str = ""
    state: State = _always_written("accepted")
    error: Error | None = None


class Activity(_Envelope, tag="activity", frozen=True, kw_only=True):
    activity: ActivityType
    detail: dict[str, Any] = {}


Envelope: TypeAlias = Message | Status | Activity

# ---------------------------------------------------------------------------------------------- ids

_ID_BYTES: Final = 15  # 120 bits: 24 base32 characters, collision-free for any realistic volume


_RFC4648_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz234567"
# RFC 4648 base32 puts "2"-"7" after "z", so its strings do not sort like the bytes they encode.
# Outbound ids must sort by time, so they use the same 32 characters in ASCII order instead.
_SORTABLE_ALPHABET: Final = "234567abcdefghijklmnopqrstuvwxyz"


def _pairs(alphabet: str) -> tuple[str, ...]:
    """The characters of every 10-bit value: two base32 digits at a time."""
    return tuple(high + low for high in alphabet for low in alphabet)


_RFC4648_PAIRS: Final = _pairs(_RFC4648_ALPHABET)
_SORTABLE_PAIRS: Final = _pairs(_SORTABLE_ALPHABET)


def _b32(raw: bytes, pairs: tuple[str, ...] = _RFC4648_PAIRS) -> str:
    """`raw` (`_ID_BYTES` long) in lower-case base32 without padding: what `base64.b32encode` gives, at
    a third of its cost (ids are made several times per message)."""
    n = int.from_bytes(raw, "big")
    return "".join([pairs[(n >> shift) & 0x3FF] for shift in _SHIFTS])


_SHIFTS: Final = tuple(range(_ID_BYTES * 8 - 10, -1, -10))


def stable_id(*components: str) -> str:
    """A deterministic id from its components, safe as a NATS subject token ([a-z2-7], no dots).

    Components are length-prefixed before hashing so that ("ab", "c") and ("a", "bc") differ.
    """
    framed: list[bytes] = []
    for component in components:
        encoded = component.encode("utf-8")
        framed += (len(encoded).to_bytes(4, "big"), encoded)
    return _b32(hashlib.blake2b(b"".join(framed), digest_size=_ID_BYTES).digest())


def message_id(tenant: str, connection: str, native_id: str) -> str:
    """The canonical id of an inbound message: the same webhook replayed yields the same id."""
    return stable_id("message", tenant, connection, native_id)


def conversation_id(tenant: str, connection: str, native_chat_id: str) -> str:
    """The canonical id of a conversation, from the chat it maps to on one connection."""
    return stable_id("conversation", tenant, connection, native_chat_id)


def sender_id(tenant: str, connection: str, native_user_id: str) -> str:
    """The canonical id of a person or bot as seen on one connection."""
    return stable_id("sender", tenant, connection, native_user_id)


def new_id() -> str:
    """A fresh id for outbound envelopes: 48-bit milliseconds then 72 random bits, so ids sort by time."""
    millis = time.time_ns() // 1_000_000
    return _b32(millis.to_bytes(6, "big") + os.urandom(_ID_BYTES - 6), _SORTABLE_PAIRS)


def now() -> datetime:
    return datetime.now(UTC)


# ------------------------------------------------------------------------------------ encode / decode

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Envelope)
_PATH_SUFFIX = re.compile(r" - at `(?P<path>\$[^`]*)`$")


def encode(envelope: Envelope) -> bytes:
    """The envelope as compact JSON (defaults left out)."""
    return _encoder.encode(envelope)


def decode(data: bytes | str) -> Envelope:
    """Read an envelope from JSON; `DecodeError.path` names the JSON path of what is wrong."""
    with _as_decode_errors():
        try:
            envelope: Envelope = _decoder.decode(data)
        except msgspec.ValidationError as exc:
            if not str(exc).startswith(_INT_GOT_FLOAT):
                raise
            # JSON Schema counts `2.0` and `2e0` as the integer 2 (numbers compare by value), so the decoder
            # does too, on this slower path: read as plain JSON, make those ints, decode again.
            document = _ints_where_typed(msgspec.json.decode(data), _ENVELOPE_TYPE)
            envelope = _decoder.decode(msgspec.json.encode(document))
    return envelope


_INT_GOT_FLOAT: Final = "Expected `int`, got `float`"
_ENVELOPE_TYPE: Final = msgspec.inspect.type_info(Envelope)


@contextmanager
def _as_decode_errors() -> Iterator[None]:
    try:
        yield
    except msgspec.ValidationError as exc:
        raise _decode_error(exc) from None
    except msgspec.DecodeError as exc:
        raise DecodeError(f"malformed JSON: {exc}", path="$") from None
    except RecursionError:
        raise DecodeError("malformed JSON: nested too deeply", path="$") from None


def _ints_where_typed(value: Any, expected: msgspec.inspect.Type) -> Any:
    """`value` (plain JSON data) with integral floats turned into ints where `expected` has an int."""
    match expected:
        case msgspec.inspect.IntType() if isinstance(value, float) and value.is_integer():
            return int(value)
        case msgspec.inspect.Metadata():
            return _ints_where_typed(value, expected.type)
        case msgspec.inspect.UnionType():
            member = _union_member(value, expected)
            return value if member is None else _ints_where_typed(value, member)
        case msgspec.inspect.StructType() if isinstance(value, dict):
            fields = {field.encode_name: field.type for field in expected.fields}
            return {key: _ints_where_typed(item, fields[key]) if key in fields else item for key, item in value.items()}
        case msgspec.inspect.ListType() if isinstance(value, list):
            return [_ints_where_typed(item, expected.item_type) for item in value]
        case msgspec.inspect.DictType() if isinstance(value, dict):
            return {key: _ints_where_typed(item, expected.value_type) for key, item in value.items()}
    return value


def _union_member(value: Any, union: msgspec.inspect.UnionType) -> msgspec.inspect.Type | None:
    """The member of `union` that the decoder reads `value` as: for an object the only Struct, or the one
    its tag names; for anything else but null the only other type."""
    structs = [member for member in union.types if isinstance(member, msgspec.inspect.StructType)]
    if isinstance(value, dict):
        if len(structs) == 1:
            return structs[0]
        return next((member for member in structs if value.get(member.tag_field) == member.tag), None)
    others = [member for member in union.types
              if not isinstance(member, msgspec.inspect.StructType | msgspec.inspect.NoneType)]
    return others[0] if len(others) == 1 else None


def _decode_error(exc: msgspec.ValidationError) -> DecodeError:
    text = str(exc)
    match = _PATH_SUFFIX.search(text)
    if match is None:
        return DecodeError(text, path="$")
    return DecodeError(text[: match.start()], path=match.group("path"))


def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of `Envelope`: it accepts exactly what `decode` accepts."""
    generated: dict[str, Any] = msgspec.json.schema(Envelope)
    _require_tags_only_in_unions(generated, generated["$defs"])
    _document_always_written_defaults(generated["$defs"])
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://babelhub.dev/schema/envelope-v1.json",
        "title": "babelhub canonical envelope",
        **generated,
    }


def _require_tags_only_in_unions(node: Any, definitions: dict[str, Any]) -> None:
    """The decoder needs a Struct's tag (`kind`, `type`) only where it picks one member of a union; where a
    field holds one Struct (a carousel's cards, a card's media) the tag may be left out. msgspec's schema
    requires the tag everywhere, so the requirement moves from each definition to the union's branches."""
    if isinstance(node, list):
        for item in node:
            _require_tags_only_in_unions(item, definitions)
        return
    if not isinstance(node, dict):
        return
    discriminator = node.get("discriminator")
    if isinstance(discriminator, dict):
        tag = discriminator["propertyName"]
        for branch in node["anyOf"]:
            branch["required"] = [tag]
        for reference in discriminator["mapping"].values():
            definition = definitions[reference.rsplit("/", 1)[-1]]
            definition["required"] = [name for name in definition.get("required", []) if name != tag]
            if not definition["required"]:
                del definition["required"]
    for key, item in node.items():
        if key != "discriminator":
            _require_tags_only_in_unions(item, definitions)


def _document_always_written_defaults(definitions: dict[str, Any]) -> None:
    """msgspec documents no default for a factory; the always-written header fields have one to show."""
    for struct in _canonical_structs():
        if struct.__name__ not in definitions:
            continue  # a base class: its fields are in each subclass's definition
        properties = definitions[struct.__name__]["properties"]
        for field in msgspec.structs.fields(struct):
            if field.default_factory is not msgspec.NODEFAULT and field.default_factory not in (list, dict):
                properties[field.encode_name]["default"] = field.default_factory()


def _canonical_structs() -> list[type[_Struct]]:
    found: list[type[_Struct]] = []
    pending: list[type[_Struct]] = [_Struct]
    while pending:
        struct = pending.pop()
        found.append(struct)
        pending.extend(struct.__subclasses__())
    return found
