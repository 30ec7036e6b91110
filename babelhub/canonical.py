"""The canonical envelope: the one message format every babelhub service reads and writes.

Everything that crosses a process boundary (NATS, HTTP, WebSocket, Redis) is an `Envelope` encoded as
JSON with `encode`, and read back with `decode`. An envelope is one of three kinds, told apart by the
`kind` field:

* `Message`  — content: an ordered list of parts (text, media, buttons, …), so mixed content is natural.
* `Status`   — what happened to a message we sent (accepted → queued → sent → delivered → read, or failed).
* `Activity` — everything that is neither: typing, read markers, members joining, opt-outs, handoffs.

Evolution is additive only: new fields get defaults, unknown fields are ignored on decode, and `v`
(the schema version) changes only if a field's meaning ever has to change.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, TypeAlias

import msgspec

from babelhub.errors import DecodeError

__all__ = [
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

UtcDatetime = Annotated[datetime, msgspec.Meta(tz=True, description="RFC 3339 timestamp with offset (UTC)")]

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
    "typing", "read", "presence", "joined", "left", "opt_in", "opt_out", "started", "ended", "handoff"
]


class _Struct(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Base of every canonical Struct: immutable, keyword-only, defaults left out of the JSON."""


# --------------------------------------------------------------------------------------------- header


class Conversation(_Struct, frozen=True, kw_only=True):
    """Where a message lives. `id` is the hub's id; the rest says which channel chat it maps to."""

    id: str
    channel: str = ""
    connection: str = ""
    native_id: str = ""
    type: ConversationType = "direct"


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
    data: bytes = b""
    mime: str = ""
    size: int = 0
    filename: str = ""
    caption: str = ""
    duration_ms: int = 0
    width: int = 0
    height: int = 0


class Location(_Part, tag="location", frozen=True, kw_only=True):
    lat: float
    lon: float
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
    price: float | None = None
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

# ----------------------------------------------------------------------------------------- envelopes


class _Envelope(_Struct, tag_field="kind", frozen=True, kw_only=True):
    """The header every envelope carries."""

    id: str
    tenant: str
    conversation: Conversation
    ts: UtcDatetime
    v: int = SCHEMA_VERSION
    direction: Direction = "inbound"
    sender: Sender | None = None
    native: Native | None = None
    reply_to: str = ""
    """The canonical id of the message this one answers."""
    thread: str = ""
    """The canonical id of the thread's root message, where the channel has threads."""
    meta: dict[str, Any] = {}
    """Namespaced extensions (`"<channel>.<key>"`, `"babelhub.<key>"`): never needed to understand a message."""


class Message(_Envelope, tag="message", frozen=True, kw_only=True):
    parts: list[Part] = []
    targets: list[Target] = []
    """Outbound only: where to send when not back into `conversation`. Several = fan-out."""


class Status(_Envelope, tag="status", frozen=True, kw_only=True):
    message_id: str = ""
    native_id: str = ""
    state: State = "accepted"
    error: Error | None = None


class Activity(_Envelope, tag="activity", frozen=True, kw_only=True):
    activity: ActivityType
    detail: dict[str, Any] = {}


Envelope: TypeAlias = Message | Status | Activity

# ---------------------------------------------------------------------------------------------- ids

_ID_BYTES: Final = 15  # 120 bits: 24 base32 characters, collision-free for any realistic volume


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


# RFC 4648 base32 puts "2"-"7" after "z", so its strings do not sort like the bytes they encode.
# Outbound ids must sort by time, so they use the same 32 characters in ASCII order instead.
_SORTABLE: Final = str.maketrans("abcdefghijklmnopqrstuvwxyz234567", "234567abcdefghijklmnopqrstuvwxyz")


def stable_id(*components: str) -> str:
    """A deterministic id from its components, safe as a NATS subject token ([a-z2-7], no dots).

    Components are length-prefixed before hashing so that ("ab", "c") and ("a", "bc") differ.
    """
    digest = hashlib.blake2b(digest_size=_ID_BYTES)
    for component in components:
        encoded = component.encode("utf-8")
        digest.update(len(encoded).to_bytes(4, "big"))
        digest.update(encoded)
    return _b32(digest.digest())


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
    return _b32(millis.to_bytes(6, "big") + os.urandom(_ID_BYTES - 6)).translate(_SORTABLE)


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
    try:
        envelope: Envelope = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise _decode_error(exc) from None
    except msgspec.DecodeError as exc:
        raise DecodeError(f"malformed JSON: {exc}", path="$") from None
    except RecursionError:
        raise DecodeError("malformed JSON: nested too deeply", path="$") from None
    return envelope


def _decode_error(exc: msgspec.ValidationError) -> DecodeError:
    text = str(exc)
    match = _PATH_SUFFIX.search(text)
    if match is None:
        return DecodeError(text, path="$")
    return DecodeError(text[: match.start()], path=match.group("path"))


def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of `Envelope`."""
    generated: dict[str, Any] = msgspec.json.schema(Envelope)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://babelhub.dev/schema/envelope-v1.json",
        "title": "babelhub canonical envelope",
        **generated,
    }
