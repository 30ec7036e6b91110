"""The codec contract: what one channel module implements.

A codec is pure: it turns recorded requests into canonical envelopes and canonical messages into the
HTTP requests the channel's API expects, and reads the API's answers. It never does I/O, so every
codec is tested on fixtures alone and a decode bug can be fixed and the raw records replayed.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeAlias

import msgspec

from babelhub import canonical as c
from babelhub.codecs.settings import ConnectionOptions, NoSecrets, Settings
from babelhub.redaction import mask_of

__all__ = [
    "CREDENTIAL_HEADERS",
    "DIRECTORY_KINDS",
    "Capabilities",
    "Codec",
    "DecodeContext",
    "DirectoryItem",
    "DirectoryKind",
    "DirectoryPage",
    "EncodeContext",
    "HttpRequest",
    "HttpResponse",
    "ItemKind",
    "Lookup",
    "OutboundRequest",
    "PartType",
    "PollResult",
    "SendResult",
    "offset_cursor",
    "page_of",
]

PartType: TypeAlias = Literal[
    "text",
    "media",
    "location",
    "contact",
    "buttons",
    "list",
    "card",
    "carousel",
    "template",
    "reaction",
    "poll",
    "form",
    "product",
    "action",
    "edit",
    "delete",
    "unsupported",
]

SESSION_HEADER = "x-babelhub-session"

CREDENTIAL_HEADERS: frozenset[str] = frozenset({
    "authorization", "proxy-authorization", "cookie", "x-api-key", "api-key", "apikey", "x-auth-token",
    "x-access-token",
})
"""Request headers that carry credentials in common use (bearer tokens such as Teams' and Google Chat's
JWTs, API keys, cookies): never stored by `Codec.redact`."""

REPLY_API_BASE = "babelhub.reply_api_base"
"""An inbound envelope may name, in this meta key, the API base to reply through (Bot Framework's
per-conversation serviceUrl, for instance); the hub hands it back as `EncodeContext.api_base`."""

ALL_MEDIA: frozenset[c.MediaKind] = frozenset(
    ("image", "audio", "voice", "video", "document", "sticker", "animation")
)


class Capabilities(msgspec.Struct, frozen=True, kw_only=True):
    """What a channel can show. Degradation rewrites a message until it fits these, so declare them
    truthfully, from the channel's documentation. For every count and length below, 0 means "no
    documented limit"."""

    parts: frozenset[PartType] = frozenset({"text"})
    media: frozenset[c.MediaKind] = frozenset()
    media_max_bytes: int = 0
    """Largest file the channel takes; larger ones are sent as links."""
    media_limits: dict[c.MediaKind, int] = {}
    """Per-kind limits where they differ from `media_max_bytes` (WhatsApp: images 5 MB, video 16 MB)."""
    media_upload: bool = False
    """True when the channel takes the file's bytes (`Media.data`); otherwise media needs a `url` or a
    `file_id`, and bytes-only media (a generated vCard) are left out and recorded."""
    text_limit: int = 4096
    """Characters in one text message; longer text is split on word boundaries."""
    caption_limit: int = 1024
    choice_text_limit: int = 0
    """Characters of text shown together with buttons or a list (WhatsApp's interactive body: 1024); a
    longer text is sent before them, as text of its own."""
    markup: c.TextFormat = "plain"
    """The dialect the channel renders: markdown in canonical text is converted into it."""
    max_buttons: int = 0
    max_button_title: int = 20
    button_actions: frozenset[c.ButtonAction] = frozenset({"reply"})
    max_list_rows: int = 0
    max_list_sections: int = 0
    max_row_title: int = 24
    max_cards: int = 0
    reply: bool = False
    edit: bool = False
    delete: bool = False
    reaction: bool = False
    typing: bool = False
    window_hours: int = 0
    """Hours after the user's last message in which free-form messages may be sent (0 = no window)."""
    template_format: str = ""
    """The approved templates the channel sends as `template` parts, named as a stored template's version
    keeps them (`whatsapp`: Meta's message templates); "" for none: such a channel gets a stored
    template's text."""

    def media_limit(self, kind: c.MediaKind) -> int:
        return self.media_limits.get(kind, self.media_max_bytes)


class HttpRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A request as the hub received it (webhook) and recorded it: header names are lower-case."""

    method: str = "POST"
    path: str = "/"
    query: dict[str, str] = {}
    headers: dict[str, str] = {}
    body: bytes = b""
    url: str = ""
    """The full URL the channel called, as the channel saw it (some signatures cover it)."""
    received_at: float = 0.0
    """Unix time at which the hub received it, for timestamp windows."""
    canonical: bool = False
    """The body is a canonical envelope another service injected (NATS `inject`, a Redis stream), read
    with the canonical decoder instead of the channel's codec. Set only by `Ingest.record_canonical`:
    `Ingest.record`, through which every channel's request passes, clears it, so no request can carry it."""

    def json(self) -> Any:
        """The body as JSON; codecs turn the ValueError into a DecodeError."""
        return json.loads(self.body)


class HttpResponse(msgspec.Struct, frozen=True, kw_only=True):
    """A channel API's answer, or a handshake answer the hub gives a channel."""

    status: int = 200
    headers: dict[str, str] = {}
    body: bytes = b""


class OutboundRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One call to the channel's API, ready to send."""

    method: str
    url: str
    headers: dict[str, str] = {}
    body: bytes = b""
    idempotency_key: str = ""
    """Stable across retries of the same call, so the sender (and the channel, where it can) dedups."""
    message_id: str = ""
    """The canonical message this call sends (part of it, for multi-call messages)."""


class SendResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a channel API's answer means."""

    ok: bool
    native_ids: list[str] = []
    retryable: bool = False
    retry_after: float | None = None
    error: c.Error | None = None
    ambiguous: bool = False
    """The request left and no definite answer came back (a timeout, a connection dropped mid-call, a
    500 or 504): the channel may have acted. The hub does not simply send it again (`Codec.safe_to_resend`,
    `Codec.lookup_request`)."""


class Lookup(msgspec.Struct, frozen=True, kw_only=True):
    """What a channel said when asked whether a call whose outcome was not known took effect."""

    found: bool | None
    """True: the channel has it (`native_ids`); False: it certainly has not; None: it cannot tell."""
    native_ids: list[str] = []


class PollResult(msgspec.Struct, frozen=True, kw_only=True):
    """What one poll of a channel returned: each delivery as if it had come by webhook, and where the
    next poll starts."""

    records: list[HttpRequest] = []
    cursor: str = ""
    error: c.Error | None = None


DirectoryKind: TypeAlias = Literal["chats", "contacts", "channels"]
"""What a channel account's directory lists: the chats it is in, the people it knows, its groups and channels."""
DIRECTORY_KINDS: tuple[DirectoryKind, ...] = ("chats", "contacts", "channels")
ItemKind: TypeAlias = Literal["user", "bot", "direct", "group", "channel", "category", "thread", "other"]
"""What one directory entry is: a person or a bot (contacts), a one-to-one chat, a group chat, a channel,
a category of channels (Discord), a thread."""


class DirectoryItem(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of a channel account's own directory, in the one shape every channel maps to."""

    id: str
    """The channel's native id (a chat id, a user id), as a canonical `Conversation.native_id` or a send's
    target names it."""
    name: str = ""
    kind: ItemKind = "other"
    handle: str = ""
    """A handle people know it by: `@username`, a phone number, an email address."""
    channel_specific: dict[str, Any] = {}
    """What the channel says of it that maps to no field above, verbatim (never a credential)."""


class DirectoryPage(msgspec.Struct, frozen=True, kw_only=True):
    """One page of a directory, as one answer of the channel's API reads."""

    items: list[DirectoryItem] = []
    next_cursor: str = ""
    """Where the next page starts, in the channel's own terms; empty on the last page."""
    total: int | None = None
    """How many there are in all, when the channel says."""
    error: c.Error | None = None
    """The channel refused inside a successful HTTP answer (Slack's `{"ok": false, "error": …}`)."""


_OFFSET = re.compile(r"[0-9]{1,9}")


def page_of(items: list[DirectoryItem], cursor: str, limit: int) -> DirectoryPage:
    """A page of a list a channel returns whole (no paging of its own): the cursor is an offset into it.
    `cursor` was checked by `offset_cursor` when the request was made."""
    start = offset_cursor(cursor)
    end = start + limit
    return DirectoryPage(items=items[start:end], next_cursor=str(end) if end < len(items) else "", total=len(items))


def offset_cursor(cursor: str) -> int:
    """The offset a `page_of` cursor holds; `ValueError` when it holds none."""
    if cursor == "":
        return 0
    if not _OFFSET.fullmatch(cursor):
        raise ValueError("not a cursor of this directory")
    return int(cursor)


class DecodeContext(msgspec.Struct, frozen=True, kw_only=True):
    """What decoding needs besides the request: whose connection it came in on."""

    tenant: str
    connection: str
    seq: int = 0
    """The raw record's stream sequence, copied into `Envelope.native.seq`."""
    options: dict[str, Any] = {}


class EncodeContext(msgspec.Struct, frozen=True, kw_only=True):
    """What encoding needs besides the message: where and as whom to send."""

    tenant: str
    connection: str
    to: str
    """The native chat id to send to."""
    api_base: str = ""
    """Overrides the channel API's base URL (tests point it at a local fake)."""
    secrets: dict[str, str] = {}
    options: dict[str, Any] = {}
    native_ids: dict[str, str] = {}
    """Canonical message id → native id, for replies, reactions, edits and deletes."""


class Codec(ABC):
    """One channel. Subclasses set `channel` and `capabilities` and implement the four methods."""

    channel: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    default_api_base: ClassVar[str] = ""
    send_rate: ClassVar[float] = 0.0
    """API calls per second one account may make, from the channel's documentation; the hub paces each
    connection to it (`max_rate` overrides). 0: no account-wide rate is documented (the channel
    queues, or meters per chat); its 429s are honoured either way."""
    delivers_by_get: ClassVar[bool] = False
    """True for channels that may deliver by GET, the fields in the query string (Twilio can be set to
    call the webhook with GET): such a GET is verified and recorded like a POST. Other channels' GETs are
    only checks of the endpoint, answered by `handshake` (Meta's `hub.challenge`); a GET never has a body."""
    inbound: ClassVar[str] = "webhook"
    """The inbound source a connection of this channel uses unless its `mode` names another: `webhook`
    (the channel calls the hub), or `websocket` for channels whose clients connect to the hub's own
    WebSocket (`/ws/{connection}`): each frame is then recorded with the session id in the
    `SESSION_HEADER` header, and a `session:<id>` URL in an `OutboundRequest` names a visitor, who reads
    the message from the conversation's stream (no call is made)."""
    secret_settings: ClassVar[type[Settings]] = NoSecrets
    """The connection's `secrets` this channel reads: a `Settings` Struct whose fields without a default
    are required and whose field docstrings tell an operator what to set (see `babelhub.codecs.settings`)."""
    option_settings: ClassVar[type[Settings]] = ConnectionOptions
    """The connection's `options` this channel reads: a subclass of `ConnectionOptions`."""

    def check_settings(self, secrets: Any, options: Any) -> None:  # noqa: B027
        """Raise `MissingSetting` when neither of the alternatives the channel documents is configured
        (`secrets` and `options` are instances of the two Structs above). Default: no alternatives."""

    def verify(self, request: HttpRequest, secrets: Mapping[str, str]) -> None:  # noqa: B027
        """Raise `SignatureError` unless the request is signed by the channel. Default: unsigned."""

    def handshake(self, request: HttpRequest, secrets: Mapping[str, str]) -> HttpResponse | None:
        """The answer to a channel's verification request (Meta `hub.challenge`, Slack
        `url_verification`), or None when this request is an ordinary delivery."""
        return None

    credential_headers: ClassVar[frozenset[str]] = CREDENTIAL_HEADERS
    """Header names (lower-case) `redact` removes; a codec adds its channel's own credential headers."""

    def redact(self, request: HttpRequest, secrets: Mapping[str, str]) -> HttpRequest:
        """The request as it may be stored (raw record, dead letter), once `verify` and `dedup_key` have
        seen it whole: without the `credential_headers`, without any header that carries one of the
        connection's `secrets`, and with those secrets' values masked in the URL, query and body.
        `decode` must not need what is removed. A codec whose bodies carry credentials extends this."""
        mask = mask_of(tuple(secrets.values()))
        headers = {name: value for name, value in request.headers.items()
                   if name.lower() not in self.credential_headers and not mask.found_in(value)}
        return msgspec.structs.replace(
            request,
            path=mask.text(request.path),
            query={name: mask.text(value) for name, value in request.query.items()},
            headers=headers,
            body=mask.data(request.body),
            url=mask.text(request.url),
        )

    def dedup_key(self, request: HttpRequest) -> str:
        """A key derived from the channel's own ids: the same delivery retried yields the same key.
        Empty when the channel gives no id (the hub then hashes the body). Raise `DecodeError` when the
        body is too broken to hold any id (not JSON, not an object): the hub answers 400 with the path
        and keeps the body in the dead-letter stream. This runs on the request path: read no more than
        the ids."""
        return ""

    @abstractmethod
    def decode(self, request: HttpRequest, ctx: DecodeContext) -> list[c.Envelope]:
        """The canonical envelopes in one request; raise `DecodeError` naming the path if unreadable."""

    @abstractmethod
    def encode(self, message: c.Message, ctx: EncodeContext) -> list[OutboundRequest]:
        """The API calls that send `message` (already degraded to `capabilities`). Pure: no I/O."""

    @abstractmethod
    def parse_response(self, request: OutboundRequest, response: HttpResponse) -> SendResult:
        """What the API's answer to `request` means: native ids, or an error and whether to retry."""

    def encode_activity(self, activity: c.Activity, ctx: EncodeContext) -> list[OutboundRequest]:
        """The API calls for an outbound activity (typing, read marker); none by default."""
        return []

    def on_inbound(self, envelope: c.Envelope, ctx: EncodeContext) -> list[OutboundRequest]:
        """Calls the channel expects after an inbound envelope was accepted (Telegram
        `answerCallbackQuery` stops the button's spinner); none by default."""
        return []

    def safe_to_resend(self, request: OutboundRequest) -> bool:
        """Whether making `request` again cannot duplicate what the channel shows: the channel honours
        the request's idempotency key (Discord's `enforce_nonce`, Google Chat's `requestId`), or the call
        sets rather than adds (an edit). Such a call is retried after an ambiguous failure; any other is
        reconciled first (`lookup_request`). Default: not safe."""
        return False

    def lookup_request(self, request: OutboundRequest) -> OutboundRequest | None:
        """The API call that finds out whether `request` (a call whose answer never came) took effect,
        by a reference it carried; None when the channel offers no such lookup (the default)."""
        return None

    def parse_lookup(self, lookup: OutboundRequest, request: OutboundRequest, response: HttpResponse) -> Lookup:
        """What the answer to `lookup_request(request)` says of `request`."""
        return Lookup(found=None)

    def poll_request(self, ctx: EncodeContext, cursor: str) -> OutboundRequest | None:
        """For channels that can be polled instead of calling a webhook (Telegram `getUpdates`): the
        request that fetches deliveries after `cursor`. None: this channel cannot be polled."""
        return None

    def parse_poll(self, request: OutboundRequest, response: HttpResponse, cursor: str) -> PollResult:
        """Split a poll's answer into webhook-shaped records and the next cursor."""
        raise NotImplementedError(f"{self.channel} cannot be polled")

    def directory_request(self, kind: DirectoryKind, ctx: EncodeContext, cursor: str,
                          limit: int) -> OutboundRequest | None:
        """For channels whose API lists what the account knows (Slack `conversations.list`): the request
        for the page of `kind` that starts at `cursor` (the channel's own; "" for the first), with at most
        `limit` items. None: this channel cannot list `kind` (the default); `EncodeError`: this connection
        cannot, for the reason it gives (a setting the listing needs is not set); `ValueError` when
        `cursor` is not one this channel's directory gave out."""
        return None

    def parse_directory(self, kind: DirectoryKind, request: OutboundRequest, response: HttpResponse,
                        cursor: str, limit: int) -> DirectoryPage:
        """The page in a successful (2xx) answer to `directory_request(kind, …, cursor, limit)`; raise
        `DecodeError` naming the path when the answer cannot be read."""
        raise NotImplementedError(f"{self.channel} cannot list {kind}")

    def api_base(self, ctx: EncodeContext) -> str:
        return (ctx.api_base or self.default_api_base).rstrip("/")
