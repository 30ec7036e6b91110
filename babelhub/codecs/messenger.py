"""Facebook Messenger and Instagram Direct: Meta's Messenger Platform, one module for both.

Both channels share the webhook format (`{"object", "entry": [{"messaging": [...]}]}`, signed with
`X-Hub-Signature-256`, verified by the `hub.challenge` handshake) and the Send API
(`POST /{id}/messages`). `InstagramCodec` is a small subclass for what differs: the `object` name,
the secret's name, the host for "Instagram API with Instagram Login", fewer media and button kinds,
shorter text, and reactions limited to "love".

Inbound, one messaging item becomes one envelope (a delivery receipt, one per message it names):

* `message` → Message: text, attachments (image/audio/video/file → Media, sticker → Media sticker,
  location → Location, shares such as fallback/template/reel/story_mention → Unsupported with the
  native attachment), `quick_reply` → Action, `reply_to.mid` → `reply_to`, IG `is_deleted` → Delete.
* Echoes (`message.is_echo`: a message the Page itself sent, through this app or another) decode to a
  Message with direction "outbound", sender role "bot" and meta `"<channel>.echo": true`, so the hub
  can keep them in the conversation without ever handing them to the app as user input.
* `postback` → Action; `reaction` → Reaction; `message_edit` → Edit + the new Text.
* `delivery` → one Status "delivered" per mid (receipts carry no sender: they are not the person
  speaking, and must not reopen the 24-hour window). Messenger's `read` only carries a watermark ("every
  message sent before this time was read"), which names no message, so it becomes an Activity "read"
  with the watermark; the conversation actor knows which messages were sent before it. Instagram's
  `read` names one `mid` and becomes a Status "read".
* `referral` → Activity "started"; `optin` → Activity "opt_in"/"opt_out"; handover events → Activity
  "handoff" (the native object in `detail`); `standby[]` items (another app owns the thread) decode
  like `messaging[]` items with meta `"<channel>.standby": true`; anything else → Unsupported.

Nothing is dropped: fields without a canonical home go to meta (`"<channel>.<key>"`), and keys this
module does not know are kept under `"<channel>.unmapped"`.

Outbound, each part becomes one Send API call in part order; a Text followed by Buttons becomes one
message. Reply buttons → `quick_replies`; url/call/postback buttons → button template (3 buttons a
template); Card/Carousel → generic template (images by URL; a lone card of only an uploaded image or
video by attachment id → media template on Messenger; other card media without a URL → EncodeError,
never dropped); Media → attachment by URL or attachment id (a caption follows as its own text; inline
bytes are uploaded as multipart `filedata` on Messenger); Reaction → `sender_action: react`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterator, Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Any, ClassVar, Final

import msgspec

from babelhub import canonical as c
from babelhub.codecs import meta_graph, native
from babelhub.codecs.base import (
    Capabilities,
    Codec,
    DecodeContext,
    EncodeContext,
    HttpRequest,
    HttpResponse,
    OutboundRequest,
    SendResult,
)
from babelhub.codecs.settings import ConnectionOptions, Settings
from babelhub.errors import DecodeError, EncodeError, SignatureError

__all__ = ["InstagramCodec", "MessengerCodec"]

_MB: Final = 1024 * 1024
UPLOAD: Final = "__upload__"
"""Marks a Send API `message` whose attachment is inline bytes: it goes as multipart `filedata`."""
FILLER: Final = "\u2026"
"""Text for a button template or quick replies, which Meta requires, when the message has none."""

# Send API limits (Messenger Platform reference: quick replies, button and generic templates).
TEMPLATE_TEXT_LIMIT: Final = 640
TEMPLATE_BUTTONS: Final = 3
ELEMENT_TITLE_LIMIT: Final = 80
MEDIA_TEMPLATE_BUTTONS: Final = 1

# Graph API error codes worth retrying: 1/2 unknown or unexpected ("retry your request later"),
# 4/17/32/613 rate limits (application, user, page, call rate), 1200 "temporary send message failure".
RETRYABLE_CODES: Final = frozenset({1, 2, 4, 17, 32, 613, 1200})

HANDOVER_EVENTS: Final = ("pass_thread_control", "take_thread_control", "request_thread_control", "app_roles")
_EVENT_KEYS: Final = (
    "message",
    "message_edit",
    "postback",
    "reaction",
    "delivery",
    "read",
    "referral",
    "optin",
    *HANDOVER_EVENTS,
)
# Webhook fields whose `changes[].value` (App Dashboard "Test" button) is a messaging item.
_MESSAGING_FIELDS: Final = frozenset(
    {
        "messages",
        "message_echoes",
        "message_edits",
        "message_reactions",
        "message_deliveries",
        "message_reads",
        "messaging_seen",
        "messaging_postbacks",
        "messaging_referral",
        "messaging_referrals",
        "messaging_optins",
        "messaging_handovers",
        "standby",
    }
)

_MEDIA_ATTACHMENTS: Final[dict[str, c.MediaKind]] = {
    "image": "image",
    "audio": "audio",
    "video": "video",
    "file": "document",
    "sticker": "sticker",
}
#: Media kinds a media template shows (GIFs are images there).
_MEDIA_TEMPLATE_TYPES: Final[dict[c.MediaKind, str]] = {"image": "image", "animation": "image", "video": "video"}
_ATTACHMENT_TYPES: Final[dict[c.MediaKind, str]] = {
    "image": "image",
    "animation": "image",
    "sticker": "image",
    "audio": "audio",
    "voice": "audio",
    "video": "video",
    "document": "file",
}

# ------------------------------------------------------------------------------ wire format: webhooks
#
# Only the fields this module reads; ids are `str | int` because older payloads carry numeric ids,
# timestamps `int | float | str` because the App Dashboard test sends strings.

NativeId = str | int
Timestamp = int | float | str


class _Native(msgspec.Struct, frozen=True, kw_only=True):
    """Base of the native shapes: unknown fields are ignored here and recovered from the raw JSON."""


class _Party(_Native, frozen=True, kw_only=True):
    id: NativeId = ""
    user_ref: NativeId = ""
    """Chat plugin and checkbox plugin users have a `user_ref` instead of a page-scoped id."""

    @property
    def key(self) -> str:
        return str(self.id or self.user_ref)


class _QuickReply(_Native, frozen=True, kw_only=True):
    payload: str = ""


class _ReplyTo(_Native, frozen=True, kw_only=True):
    mid: str = ""


class _Attachment(_Native, frozen=True, kw_only=True):
    type: str
    payload: dict[str, Any] | None = None
    title: str = ""
    url: str = ""


class _Message(_Native, frozen=True, kw_only=True):
    mid: str
    text: str = ""
    attachments: list[Any] = []
    """Each read on its own (`_Attachment`): one unreadable attachment is an Unsupported part."""
    quick_reply: Any = None
    """Read on its own (`_QuickReply`): an unreadable one is an Unsupported part."""
    reply_to: _ReplyTo | None = None
    is_echo: bool = False
    is_deleted: bool = False
    is_unsupported: bool = False


class _MessageEdit(_Native, frozen=True, kw_only=True):
    mid: str
    text: str = ""
    num_edit: int | str = 0


class _Postback(_Native, frozen=True, kw_only=True):
    payload: str = ""
    title: str = ""
    mid: str = ""


class _Reaction(_Native, frozen=True, kw_only=True):
    mid: str
    action: str = "react"
    emoji: str = ""
    reaction: str = ""


class _Delivery(_Native, frozen=True, kw_only=True):
    mids: list[str] = []
    watermark: Timestamp | None = None


class _Read(_Native, frozen=True, kw_only=True):
    watermark: Timestamp | None = None
    mid: str = ""


class _Item(_Native, frozen=True, kw_only=True):
    """One `messaging[]` (or `standby[]`) item: who, when, and exactly one event."""

    sender: _Party | None = None
    recipient: _Party | None = None
    timestamp: Timestamp | None = None
    message: _Message | None = None
    message_edit: _MessageEdit | None = None
    postback: _Postback | None = None
    reaction: _Reaction | None = None
    delivery: _Delivery | None = None
    read: _Read | None = None


class _Change(_Native, frozen=True, kw_only=True):
    field: str
    value: Any = None


class _Entry(_Native, frozen=True, kw_only=True):
    id: NativeId = ""
    time: Timestamp | None = None
    messaging: list[_Item] = []
    standby: list[_Item] = []
    changes: list[_Change] = []


class _Webhook(_Native, frozen=True, kw_only=True):
    object: str = ""
    entry: list[_Entry]


class _SendError(_Native, frozen=True, kw_only=True):
    message: str = ""
    type: str = ""
    code: int = 0
    error_subcode: int = 0


# ------------------------------------------------------------------------------------- helpers


def to_datetime(value: Timestamp, path: str) -> datetime:
    """A webhook time as UTC: epoch milliseconds (live), epoch seconds or ISO 8601 (test payloads)."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            try:
                parsed = datetime.fromisoformat(value)
            except ValueError:
                raise DecodeError(f"not a timestamp: {value!r}", path=path) from None
            if parsed.tzinfo is None:
                raise DecodeError(f"timestamp without a UTC offset: {value!r}", path=path) from None
            return parsed.astimezone(UTC)
    else:
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            raise DecodeError(f"not a usable Unix time: {value!r}", path=path) from None
    # Epoch milliseconds pass 1e11 in 1973; epoch seconds reach it in the year 5138.
    return native.from_unix(number / 1000 if number >= 1e11 else number, path)


def _entry_path(path: str) -> str:
    """`$.entry[0]` of a path inside that entry (`$.entry[0].messaging[2]`)."""
    return path.partition("].")[0] + "]"


def chunks(items: list[c.Button], size: int) -> Iterator[list[c.Button]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ----------------------------------------------------------------------------------- decoding


class _Decoder:
    """One messaging item and what every envelope decoded from it shares (header, ids, meta)."""

    def __init__(
        self,
        codec: MessengerCodec,
        ctx: DecodeContext,
        entry: _Entry,
        item: _Item,
        raw: Mapping[str, Any],
        path: str,
        *,
        standby: bool,
        timestamp_path: str = "",
    ) -> None:
        self.codec = codec
        self.ctx = ctx
        self.item = item
        self.raw = raw
        self.path = path
        self.standby = standby
        self.timestamp_path = timestamp_path or f"{path}.timestamp"
        """Where the item's `timestamp` came from (the entry's `time` for a change that has none)."""
        sender = item.sender.key if item.sender else ""
        recipient = item.recipient.key if item.recipient else ""
        echo = item.message is not None and item.message.is_echo
        # The conversation is always the person's: for an echo the Page is the sender.
        self.user_id = recipient if echo else sender
        self.page_id = (sender if echo else recipient) or str(entry.id)
        self.ts = self._time(entry)
        self.unmapped: dict[str, Any] = {}

    def _time(self, entry: _Entry) -> datetime:
        item = self.item
        if item.timestamp is not None:
            return to_datetime(item.timestamp, self.timestamp_path)
        # Delivery receipts come without a timestamp: their watermark is the time they speak of.
        if item.delivery is not None and item.delivery.watermark is not None:
            return to_datetime(item.delivery.watermark, f"{self.path}.delivery.watermark")
        if entry.time is not None:
            return to_datetime(entry.time, f"{_entry_path(self.path)}.time")
        raise DecodeError("messaging item without a timestamp", path=f"{self.path}.timestamp")

    # ---- ids

    def message_id(self, native_message_id: str) -> str:
        return c.message_id(self.ctx.tenant, self.ctx.connection, native_message_id)

    def event_id(self, *components: str) -> str:
        """A deterministic id for events that have no message id of their own (reactions, clicks)."""
        return self.message_id(":".join((*components, self.user_id, str(self.item.timestamp))))

    # ---- header

    def conversation(self) -> c.Conversation:
        chat = self.user_id or self.page_id
        return native.conversation(self.ctx, self.codec.channel, chat, "direct" if self.user_id else "channel")

    def user(self) -> c.Sender | None:
        if not self.user_id:
            return None
        return native.sender(self.ctx, self.user_id, role="user")

    def page(self) -> c.Sender:
        return native.sender(self.ctx, self.page_id, role="bot")

    def native(self, native_message_id: str = "") -> c.Native:
        return c.Native(id=native_message_id, seq=self.ctx.seq)

    def keep(self, where: str, raw: Mapping[str, Any], known: Collection[str]) -> None:
        """Remember the members of `raw` (at `where`) that no canonical field took."""
        native.keep_unmapped(self.unmapped, where, raw, known)

    def meta(self, **extra: Any) -> dict[str, Any]:
        """The envelope's meta: `extra` plus standby and unmapped fields, namespaced by channel."""
        values = {key: value for key, value in extra.items() if value is not None and value is not False}
        values = {key: value for key, value in values.items() if value != "" and value != {}}
        if self.standby:
            values["standby"] = True
        native.keep_unmapped(self.unmapped, "item", self.raw, ("sender", "recipient", "timestamp", *_EVENT_KEYS))
        if self.unmapped:
            values["unmapped"] = self.unmapped
        return {f"{self.codec.channel}.{key}": value for key, value in values.items()}


# -------------------------------------------------------------------------------------- codec


class MetaAppSecrets(Settings, frozen=True, kw_only=True):
    """The secrets of a Meta app's webhooks, which Messenger and Instagram share."""

    app_secret: str
    """The Meta app's secret: webhooks are signed with it (`X-Hub-Signature-256`)."""
    verify_token: str = ""
    """The Verify Token entered in the app's webhook settings, for Meta's `hub.challenge` check."""


class MessengerSecrets(MetaAppSecrets, frozen=True, kw_only=True):
    page_access_token: str
    """The Page access token: Send API calls carry it as a bearer token."""


class MessengerOptions(ConnectionOptions, frozen=True, kw_only=True):
    page_id: str = ""
    """The Page whose `/messages` edge is called (unset: `me`, the Page of the token)."""


class MessengerCodec(Codec):
    """Facebook Messenger through a Page: webhooks in, Send API out."""

    channel: ClassVar[str] = "messenger"
    secret_settings: ClassVar[type[Settings]] = MessengerSecrets
    option_settings: ClassVar[type[Settings]] = MessengerOptions
    default_api_base: ClassVar[str] = "https://graph.facebook.com/v23.0"
    # Send API: 300 calls per second per Page (and per Instagram professional account) for text, links,
    # reactions and stickers; audio and video have a lower limit the channel enforces with 429s.
    send_rate: ClassVar[float] = 300.0
    capabilities: ClassVar[Capabilities] = Capabilities(
        parts=frozenset({"text", "media", "buttons", "card", "carousel", "reaction"}),
        media=frozenset({"image", "audio", "voice", "video", "document", "sticker", "animation"}),
        media_max_bytes=25 * _MB,
        media_limits={"image": 8 * _MB},
        media_upload=True,  # multipart `filedata`
        text_limit=2000,
        caption_limit=2000,  # Messenger attachments have no caption: it follows as a text message
        markup="plain",
        max_buttons=13,  # quick replies; url/call/postback buttons go out three to a template
        max_button_title=20,
        button_actions=frozenset({"reply", "url", "call", "postback"}),
        max_cards=10,
        reply=True,
        reaction=True,
        typing=True,
        window_hours=24,
    )

    webhook_object: ClassVar[str] = "page"
    token_secret: ClassVar[str] = "page_access_token"
    uploads: ClassVar[bool] = True
    """Whether the Send API takes a file in the request (multipart `filedata`), not only by URL."""
    media_template: ClassVar[bool] = True
    """Whether the media template (an image or video by attachment id, with a button) can be sent."""

    # ------------------------------------------------------------------------------- webhooks

    def handshake(self, request: HttpRequest, secrets: Mapping[str, str]) -> HttpResponse | None:
        """Meta's subscription check: GET `?hub.mode=subscribe&hub.verify_token=…&hub.challenge=…`."""
        return meta_graph.handshake(request, secrets.get("verify_token", ""))

    def verify(self, request: HttpRequest, secrets: Mapping[str, str]) -> None:
        """`X-Hub-Signature-256`, the HMAC of the raw body with the app secret (see `meta_graph`)."""
        app_secret = secrets.get("app_secret", "")
        if not app_secret:
            raise SignatureError(f"{self.channel}: no app_secret configured")
        meta_graph.verify_signature(request, app_secret, self.channel)

    def dedup_key(self, request: HttpRequest) -> str:
        """A hash of every event's own ids (mids, or who + when + what), so a redelivery matches. A body
        too broken to hold them (not JSON, not a webhook's shape) is a DecodeError naming the path."""
        body = native.read_json(request)
        if not isinstance(body, dict):
            raise DecodeError("a webhook body is a JSON object", path="$")
        keys = sorted({event_key(item, path) for path, item in raw_items(body.get("entry"))})
        return c.stable_id(self.channel, *keys) if keys else ""

    # --------------------------------------------------------------------------------- decode

    def decode(self, request: HttpRequest, ctx: DecodeContext) -> list[c.Envelope]:
        body = native.read_json(request)
        webhook = native.convert(body, _Webhook)
        if webhook.object and webhook.object != self.webhook_object:
            raise DecodeError(f"expected object {self.webhook_object!r}, got {webhook.object!r}", path="$.object")
        meta_graph.check_batch(
            f"$.entry[{e}].{lane}[{m}]" for e, entry in enumerate(webhook.entry)
            for lane in ("messaging", "standby", "changes") for m in range(len(getattr(entry, lane))))
        envelopes: list[c.Envelope] = []
        for e, entry in enumerate(webhook.entry):
            raw_entry = body["entry"][e]
            for lane in ("messaging", "standby"):
                for m, item in enumerate(getattr(entry, lane)):
                    path = f"$.entry[{e}].{lane}[{m}]"
                    event = _Decoder(self, ctx, entry, item, raw_entry[lane][m], path, standby=lane == "standby")
                    envelopes.extend(self._decode_item(event))
            for n, change in enumerate(entry.changes):
                path = f"$.entry[{e}].changes[{n}]"
                envelopes.extend(self._decode_change(ctx, entry, change, raw_entry["changes"][n], path))
        return envelopes

    def _decode_change(
        self, ctx: DecodeContext, entry: _Entry, change: _Change, raw: Mapping[str, Any], path: str
    ) -> list[c.Envelope]:
        """`changes[]` carry messaging items only in the App Dashboard test; other fields (comments,
        feed, …) are kept whole as Unsupported on the account's own conversation."""
        if change.field in _MESSAGING_FIELDS and isinstance(change.value, dict):
            item = native.convert(change.value, _Item, path=f"{path}.value")
            standby = change.field == "standby"
            return self._decode_item(_Decoder(self, ctx, entry, item, change.value, f"{path}.value", standby=standby))
        time_path = f"{_entry_path(path)}.time"
        event = _Decoder(
            self, ctx, entry, _Item(timestamp=entry.time), {}, path, standby=False, timestamp_path=time_path
        )
        reason = f"{self.channel} webhook field {change.field!r}"
        parts: list[c.Part] = [native.unsupported(reason, raw)]
        return [self._message_envelope(event, event.event_id("change", change.field), parts)]

    def _decode_item(self, event: _Decoder) -> list[c.Envelope]:
        item = event.item
        if item.message is not None:
            return [self._message(event, item.message, event.raw["message"])]
        if item.message_edit is not None:
            return [self._edit(event, item.message_edit, event.raw["message_edit"])]
        if item.postback is not None:
            return [self._postback(event, item.postback, event.raw["postback"])]
        if item.reaction is not None:
            return [self._reaction(event, item.reaction, event.raw["reaction"])]
        if item.delivery is not None:
            return self._deliveries(event, item.delivery, event.raw["delivery"])
        if item.read is not None:
            return [self._read(event, item.read, event.raw["read"])]
        if isinstance(event.raw.get("referral"), dict):
            return [self._activity(event, "referral", "started", {"referral": event.raw["referral"]})]
        if isinstance(event.raw.get("optin"), dict):
            optin: dict[str, Any] = event.raw["optin"]
            stopped = optin.get("notification_messages_status") == "STOP NOTIFICATIONS"
            return [self._activity(event, "optin", "opt_out" if stopped else "opt_in", optin)]
        for handover in HANDOVER_EVENTS:
            if isinstance(event.raw.get(handover), dict):
                return [self._activity(event, handover, "handoff", {"event": handover, **event.raw[handover]})]
        kinds = sorted(native.unmapped(event.raw, ("sender", "recipient", "timestamp"))) or ["empty"]
        reason = f"{self.channel} messaging event {', '.join(kinds)}"
        return [self._message_envelope(event, event.event_id(*kinds), [native.unsupported(reason, dict(event.raw))])]

    # ---- messages

    def _message(self, event: _Decoder, message: _Message, raw: Mapping[str, Any]) -> c.Message:
        known = {"mid", "text", "attachments", "quick_reply", "reply_to", "is_echo", "is_deleted", "is_unsupported"}
        known |= {"app_id", "metadata", "referral", "sticker_id"}
        event.keep("message", raw, known)
        if message.is_deleted:
            # Instagram "unsend": the person removed a message they sent earlier.
            envelope_id = event.message_id(f"{message.mid}:deleted")
            parts: list[c.Part] = [c.Delete(target=event.message_id(message.mid))]
            return self._message_envelope(event, envelope_id, parts, native_id=message.mid)
        parts = self._message_parts(event, message, raw)
        reply_to = event.message_id(message.reply_to.mid) if message.reply_to and message.reply_to.mid else ""
        # is_self_reply, IG story replies (lax conversion reads a "null" string as no reply_to at all)
        raw_reply = raw.get("reply_to")
        reply_extra = native.unmapped(raw_reply, ("mid",))
        meta = event.meta(
            echo=message.is_echo,
            app_id=raw.get("app_id"),
            metadata=raw.get("metadata"),
            referral=raw.get("referral"),
            reply_to=reply_extra,
        )
        return c.Message(
            id=event.message_id(message.mid),
            tenant=event.ctx.tenant,
            conversation=event.conversation(),
            ts=event.ts,
            direction="outbound" if message.is_echo else "inbound",
            sender=event.page() if message.is_echo else event.user(),
            native=event.native(message.mid),
            reply_to=reply_to,
            meta=meta,
            parts=parts,
        )

    def _message_parts(self, event: _Decoder, message: _Message, raw: Mapping[str, Any]) -> list[c.Part]:
        parts: list[c.Part] = []
        if message.quick_reply is not None:
            # The quick reply's title is the message text: one Action says both.
            tap = partial(self._quick_reply, message.quick_reply, message.text, f"{event.path}.message.quick_reply")
            parts.extend(native.lenient_parts(tap, {"quick_reply": message.quick_reply}, f"{self.channel} quick reply"))
            if isinstance(parts[-1], c.Unsupported) and message.text:
                parts.append(c.Text(text=message.text))  # the tap is unreadable, what it said is not
        elif message.text:
            parts.append(c.Text(text=message.text))
        has_sticker = any(_attachment_type(attachment) == "sticker" for attachment in message.attachments)
        for index, raw_attachment in enumerate(message.attachments):
            if has_sticker and _attachment_type(raw_attachment) == "image":
                # Until 2026-08-30 Meta sends a sticker twice: as `sticker` and as the old `image`.
                parts.append(native.unsupported("image copy of a sticker (Meta transition)", raw_attachment))
                continue
            read = partial(self._attachment, event, index, raw_attachment)
            parts.extend(native.lenient_parts(read, raw_attachment, f"{self.channel} attachment"))
        if message.is_unsupported:
            parts.append(native.unsupported(f"{self.channel} message type the API does not deliver", dict(raw)))
        if not parts:
            parts.append(native.unsupported(f"{self.channel} message without content", dict(raw)))
        return parts

    @staticmethod
    def _quick_reply(raw: Any, text: str, path: str) -> c.Part:
        return c.Action(id=native.convert(raw, _QuickReply, path).payload, title=text)

    def _attachment(self, event: _Decoder, index: int, raw: Mapping[str, Any]) -> c.Part:
        attachment = native.convert(raw, _Attachment, f"{event.path}.message.attachments[{index}]")
        payload = attachment.payload or {}
        kind = _MEDIA_ATTACHMENTS.get(attachment.type)
        if kind is not None and isinstance(payload.get("url"), str):
            sticker_id = payload.get("sticker_id")
            event.keep(f"message.attachments[{index}]", raw, ("type", "payload"))
            event.keep(f"message.attachments[{index}].payload", payload, ("url", "sticker_id"))
            return c.Media(
                media="sticker" if sticker_id is not None else kind,
                url=payload["url"],
                file_id=str(sticker_id) if sticker_id is not None else "",
            )
        coordinates = payload.get("coordinates")
        if attachment.type == "location" and isinstance(coordinates, dict):
            return _location(attachment, coordinates, raw)
        # Shares (fallback links, templates, posts, reels, stories, …) point at content elsewhere.
        return native.unsupported(f"{self.channel} attachment {attachment.type!r}", raw)

    def _edit(self, event: _Decoder, edit: _MessageEdit, raw: Mapping[str, Any]) -> c.Message:
        event.keep("message_edit", raw, ("mid", "text", "num_edit"))
        parts: list[c.Part] = [c.Edit(target=event.message_id(edit.mid)), c.Text(text=edit.text)]
        envelope_id = event.message_id(f"{edit.mid}:edit:{edit.num_edit}")
        return self._message_envelope(event, envelope_id, parts, native_id=edit.mid)

    def _postback(self, event: _Decoder, postback: _Postback, raw: Mapping[str, Any]) -> c.Message:
        event.keep("postback", raw, ("payload", "title", "mid", "referral"))
        source = event.message_id(postback.mid) if postback.mid else ""
        action = c.Action(id=postback.payload, title=postback.title, source=source)
        return self._message_envelope(
            event,
            event.event_id("postback", postback.mid),
            [action],
            native_id=postback.mid,
            referral=raw.get("referral"),
        )

    def _reaction(self, event: _Decoder, reaction: _Reaction, raw: Mapping[str, Any]) -> c.Message:
        event.keep("reaction", raw, ("mid", "action", "emoji", "reaction"))
        part = c.Reaction(
            emoji=reaction.emoji or reaction.reaction,
            target=event.message_id(reaction.mid),
            removed=reaction.action == "unreact",
        )
        envelope_id = event.event_id("reaction", reaction.mid, reaction.action)
        return self._message_envelope(event, envelope_id, [part], reaction=reaction.reaction)

    def _message_envelope(
        self, event: _Decoder, envelope_id: str, parts: list[c.Part], *, native_id: str = "", **meta: Any
    ) -> c.Message:
        return c.Message(
            id=envelope_id,
            tenant=event.ctx.tenant,
            conversation=event.conversation(),
            ts=event.ts,
            sender=event.user(),
            native=event.native(native_id),
            meta=event.meta(**meta),
            parts=parts,
        )

    # ---- receipts and activities

    def _deliveries(self, event: _Decoder, delivery: _Delivery, raw: Mapping[str, Any]) -> list[c.Envelope]:
        event.keep("delivery", raw, ("mids", "watermark"))
        # Without mids the receipt only says "everything before the watermark": no message to name.
        return [self._status(event, mid, "delivered", watermark=delivery.watermark) for mid in delivery.mids or [""]]

    def _read(self, event: _Decoder, read: _Read, raw: Mapping[str, Any]) -> c.Envelope:
        event.keep("read", raw, ("mid", "watermark"))
        if read.mid:  # Instagram `messaging_seen` names the message
            return self._status(event, read.mid, "read", watermark=read.watermark)
        return self._activity(event, "read", "read", {"watermark": read.watermark}, from_user=False)

    def _status(self, event: _Decoder, mid: str, state: c.State, **meta: Any) -> c.Status:
        # No sender: a receipt is not something the person said, and must not reopen the 24-hour window.
        ctx = event.ctx
        watermark = meta.get("watermark")
        key = mid or f"watermark:{watermark}"
        return c.Status(
            id=c.stable_id("status", ctx.tenant, ctx.connection, key, state),
            tenant=ctx.tenant,
            conversation=event.conversation(),
            ts=event.ts,
            native=event.native(mid),
            meta=event.meta(**meta),
            native_id=mid,
            state=state,
        )

    def _activity(
        self, event: _Decoder, key: str, activity: c.ActivityType, detail: dict[str, Any], *, from_user: bool = True
    ) -> c.Activity:
        """An Activity; `from_user=False` for markers (read) that are not the person acting."""
        ctx = event.ctx
        return c.Activity(
            id=c.stable_id("activity", ctx.tenant, ctx.connection, key, event.user_id, str(event.item.timestamp)),
            tenant=ctx.tenant,
            conversation=event.conversation(),
            ts=event.ts,
            sender=event.user() if from_user else None,
            native=event.native(),
            meta=event.meta(),
            activity=activity,
            detail=detail,
        )

    # --------------------------------------------------------------------------------- encode

    def encode(self, message: c.Message, ctx: EncodeContext) -> list[OutboundRequest]:
        calls = self._calls(message, ctx)
        if message.reply_to and self.capabilities.reply:
            first = next((call for call in calls if "message" in call), None)
            if first is not None:
                replied_to = native.native_id(ctx, message.reply_to, "the replied-to message", self.channel)
                first["reply_to"] = {"mid": replied_to}
        return [self._request(call, ctx, message.id, n) for n, call in enumerate(calls)]

    def encode_activity(self, activity: c.Activity, ctx: EncodeContext) -> list[OutboundRequest]:
        """Typing → `typing_on` (`typing_off` with `detail={"on": False}`); read → `mark_seen`."""
        if activity.activity == "typing":
            action = "typing_off" if activity.detail.get("on") is False else "typing_on"
        elif activity.activity == "read":
            action = "mark_seen"
        else:
            return []
        call = {"recipient": {"id": ctx.to}, "sender_action": action}
        return [self._request(call, ctx, activity.id, 0)]

    def _request(self, call: dict[str, Any], ctx: EncodeContext, message_id: str, n: int) -> OutboundRequest:
        token = native.required_secret(ctx.secrets, self.token_secret, self.channel)
        upload = call.get("message", {}).get(UPLOAD)
        if isinstance(upload, c.Media):
            body, content_type = multipart(call, upload)
        else:
            body, content_type = native.json_body(call), "application/json"
        return OutboundRequest(
            method="POST",
            url=f"{self.api_base(ctx)}/{self._account(ctx)}/messages",
            headers={"content-type": content_type, "authorization": f"Bearer {token}"},
            body=body,
            idempotency_key=f"{message_id}:{n}",
            message_id=message_id,
        )

    def _account(self, ctx: EncodeContext) -> str:
        """Whose `/messages` edge: the Page, or `me` (the Page the token belongs to)."""
        return str(ctx.options.get("page_id") or "me")

    def _messaging_type(self, message: c.Message) -> dict[str, str]:
        """RESPONSE inside the 24-hour window; a message tag (meta `"<channel>.tag"`, e.g.
        HUMAN_AGENT) sends outside it."""
        tag = message.meta.get(f"{self.channel}.tag")
        if isinstance(tag, str) and tag:
            return {"messaging_type": "MESSAGE_TAG", "tag": tag}
        return {"messaging_type": "RESPONSE"}

    def _calls(self, message: c.Message, ctx: EncodeContext) -> list[dict[str, Any]]:
        """The Send API calls, in part order: messages, and reactions as sender actions."""
        envelope = {"recipient": {"id": ctx.to}, **self._messaging_type(message)}
        calls: list[dict[str, Any]] = []
        parts = message.parts
        for index, part in enumerate(parts):
            following = parts[index + 1] if index + 1 < len(parts) else None
            previous = parts[index - 1] if index else None
            last_body: dict[str, Any] | None = calls[-1].get("message") if calls else None
            match part:
                case c.Text() if isinstance(following, c.Buttons) and not following.text:
                    continue  # the buttons that follow carry this text
                case c.Text():
                    bodies = [{"text": part.text}]
                case c.Buttons():
                    carried = previous.text if isinstance(previous, c.Text) and not part.text else part.text
                    bodies = self._buttons(carried, part.buttons, last_body)
                case c.Media():
                    bodies = [self._media(part), *([{"text": part.caption}] if part.caption else [])]
                case c.Card():
                    bodies = self._generic([part])
                case c.Carousel():
                    bodies = self._generic(part.cards)
                case c.Reaction():
                    calls.append(self._reaction_call(part, ctx))
                    continue
                case _:
                    raise EncodeError(f"{self.channel} cannot send a {type(part).__name__} part")
            calls.extend({**envelope, "message": body} for body in bodies)
        return calls

    def _buttons(self, text: str, buttons: list[c.Button], previous: dict[str, Any] | None) -> list[dict[str, Any]]:
        """The messages for `text` with `buttons`: url/call/postback buttons go three to a button
        template; reply buttons become quick replies on the last of those messages, or on `previous`
        (the message just before, e.g. an image) when there is no text of their own."""
        replies = [button for button in buttons if button.action == "reply"]
        linked = [button for button in buttons if button.action != "reply"]
        bodies: list[dict[str, Any]] = []
        if linked:
            if len(text) > TEMPLATE_TEXT_LIMIT:
                bodies.append({"text": text})
                text = ""
            for group in chunks(linked, TEMPLATE_BUTTONS):
                buttons_json = [self._button(button) for button in group]
                bodies.append(_template({"template_type": "button", "text": text or FILLER, "buttons": buttons_json}))
                text = ""
        elif text:
            bodies.append({"text": text})
        if replies:
            carrier = bodies[-1] if bodies else previous
            if carrier is None or "quick_replies" in carrier:
                carrier = {"text": FILLER}  # Meta shows quick replies under a text or an attachment
                bodies.append(carrier)
            carrier["quick_replies"] = [
                {"content_type": "text", "title": button.title, "payload": button.id} for button in replies
            ]
        return bodies

    def _button(self, button: c.Button) -> dict[str, str]:
        if button.action not in self.capabilities.button_actions:
            raise EncodeError(f"{self.channel} has no {button.action} buttons")
        match button.action:
            case "url":
                return {"type": "web_url", "url": button.value, "title": button.title}
            case "call":
                return {"type": "phone_number", "title": button.title, "payload": button.value}
            case _:  # postback, and reply buttons on cards (a card has no quick replies)
                return {"type": "postback", "title": button.title, "payload": button.value or button.id}

    def _generic(self, cards: list[c.Card]) -> list[dict[str, Any]]:
        """A generic template (a carousel when several cards). A card takes three buttons: the rest
        follow as button templates, or as quick replies on the template. A generic template shows its
        image by URL only: a lone card of just an uploaded image or video (an attachment id) becomes a
        media template, and any other card whose media has no URL is an EncodeError."""
        if len(cards) == 1 and (media_template := self._media_template(cards[0])) is not None:
            return [media_template, *self._buttons("", cards[0].buttons[MEDIA_TEMPLATE_BUTTONS:], media_template)]
        elements: list[dict[str, Any]] = []
        for card in cards:
            element: dict[str, Any] = {"title": native.clip(card.title or card.subtitle or FILLER, ELEMENT_TITLE_LIMIT)}
            if card.subtitle and card.title:
                element["subtitle"] = native.clip(card.subtitle, ELEMENT_TITLE_LIMIT)
            if card.media is not None:
                if not card.media.url:
                    name = repr(card.title or card.subtitle) if card.title or card.subtitle else "without a title"
                    raise EncodeError(
                        f"{self.channel}: the card {name} has {card.media.media} media without a url; "
                        "a generic template shows its image by url only (image_url)"
                    )
                element["image_url"] = card.media.url
            if card.buttons:
                element["buttons"] = [self._button(button) for button in card.buttons[:TEMPLATE_BUTTONS]]
            elements.append(element)
        template = _template({"template_type": "generic", "elements": elements})
        extra = [button for card in cards for button in card.buttons[TEMPLATE_BUTTONS:]]
        return [template, *self._buttons("", extra, template)]

    def _media_template(self, card: c.Card) -> dict[str, Any] | None:
        """A card of nothing but an uploaded image or video (and a button) as a media template, which
        takes an attachment id where the generic template takes only an image URL; None otherwise."""
        media = card.media
        if not self.media_template or card.title or card.subtitle or media is None or media.url:
            return None
        media_type = _MEDIA_TEMPLATE_TYPES.get(media.media)
        if media_type is None or not media.file_id:
            return None
        element: dict[str, Any] = {"media_type": media_type, "attachment_id": media.file_id}
        if card.buttons:
            element["buttons"] = [self._button(button) for button in card.buttons[:MEDIA_TEMPLATE_BUTTONS]]
        return _template({"template_type": "media", "elements": [element]})

    def _media(self, media: c.Media) -> dict[str, Any]:
        if media.media not in self.capabilities.media:
            raise EncodeError(f"{self.channel} cannot send {media.media} media")
        if media.media == "sticker" and media.file_id.isdigit():
            return {"sticker_id": int(media.file_id)}  # a first-party sticker (Sticker API)
        kind = _ATTACHMENT_TYPES[media.media]
        if media.file_id:
            return {"attachment": {"type": kind, "payload": {"attachment_id": media.file_id}}}
        if media.url:
            return {"attachment": {"type": kind, "payload": {"url": media.url, "is_reusable": True}}}
        if media.data and self.uploads:
            return {"attachment": {"type": kind, "payload": {"is_reusable": True}}, UPLOAD: media}
        raise EncodeError(f"{self.channel}: media needs a url or an attachment id")

    def _reaction_call(self, reaction: c.Reaction, ctx: EncodeContext) -> dict[str, Any]:
        target = native.native_id(ctx, reaction.target, "the message reacted to", self.channel)
        if reaction.removed:
            return {"recipient": {"id": ctx.to}, "sender_action": "unreact", "payload": {"message_id": target}}
        payload = {"message_id": target, "reaction": self._reaction_value(reaction.emoji)}
        return {"recipient": {"id": ctx.to}, "sender_action": "react", "payload": payload}

    def _reaction_value(self, emoji: str) -> str:
        return emoji

    # -------------------------------------------------------------------------------- answers

    def parse_response(self, request: OutboundRequest, response: HttpResponse) -> SendResult:
        """Success: `{"recipient_id", "message_id"}` (sender actions: no message_id). Failure:
        `{"error": {"message", "type", "code", "error_subcode", "fbtrace_id"}}`."""
        try:
            body = msgspec.json.decode(response.body) if response.body else None
        except msgspec.DecodeError:
            body = None
        if 200 <= response.status < 300:
            message_id = body.get("message_id") if isinstance(body, dict) else None
            return SendResult(ok=True, native_ids=[message_id] if isinstance(message_id, str) and message_id else [])
        raw_error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(raw_error, dict):
            return native.http_failure(response)
        try:
            error = msgspec.convert(raw_error, _SendError, strict=False)
        except msgspec.ValidationError:
            return native.http_failure(response, native=raw_error)
        retryable = error.code in RETRYABLE_CODES or response.status in (408, 429) or response.status >= 500
        code = f"{self.channel}_{error.code}" + (f"_{error.error_subcode}" if error.error_subcode else "")
        return SendResult(
            ok=False,
            retryable=retryable,
            retry_after=native.retry_after(response.headers),
            error=c.Error(code=code, message=error.message, retryable=retryable, native=raw_error),
        )


class InstagramSecrets(MetaAppSecrets, frozen=True, kw_only=True):
    access_token: str
    """The Instagram (or Page) access token: Send API calls carry it as a bearer token."""


class InstagramOptions(ConnectionOptions, frozen=True, kw_only=True):
    ig_user_id: str = ""
    """The Instagram professional account's id: messages are sent through the Instagram API with
    Instagram Login (`graph.instagram.com`) as this account."""
    page_id: str = ""
    """With Facebook Login instead: the linked Page whose `/messages` edge is called."""


class InstagramCodec(MessengerCodec):
    """Instagram Direct for professional accounts. Through a Facebook Page (Messenger Platform):
    option `page_id` (or none: `/me`) and a Page token. Through "Instagram API with Instagram Login":
    option `ig_user_id`, which also switches the default host to graph.instagram.com."""

    channel: ClassVar[str] = "instagram"
    secret_settings: ClassVar[type[Settings]] = InstagramSecrets
    option_settings: ClassVar[type[Settings]] = InstagramOptions
    instagram_login_api_base: ClassVar[str] = "https://graph.instagram.com/v23.0"
    capabilities: ClassVar[Capabilities] = Capabilities(
        parts=frozenset({"text", "media", "buttons", "card", "carousel", "reaction"}),
        # Files (PDF) go as links: a document would also be how contacts arrive (an inline vCard), and
        # Instagram cannot take inline files.
        media=frozenset({"image", "audio", "voice", "video", "animation"}),
        media_max_bytes=8 * _MB,  # images 8 MB (audio, video and files 25 MB): the smallest, so none is refused
        text_limit=1000,
        caption_limit=1000,
        markup="plain",
        max_buttons=13,
        max_button_title=20,
        button_actions=frozenset({"reply", "url", "postback"}),  # no call buttons on Instagram
        max_cards=10,
        reply=False,  # the Instagram reply API's request shape is not documented where we could read it
        reaction=True,
        typing=True,
        window_hours=24,
    )

    webhook_object: ClassVar[str] = "instagram"
    token_secret: ClassVar[str] = "access_token"
    uploads: ClassVar[bool] = False  # Instagram takes media by URL (or a prior upload's attachment id)
    media_template: ClassVar[bool] = False  # Instagram documents generic templates only

    def api_base(self, ctx: EncodeContext) -> str:
        if not ctx.api_base and ctx.options.get("ig_user_id"):
            return self.instagram_login_api_base.rstrip("/")
        return super().api_base(ctx)

    def _account(self, ctx: EncodeContext) -> str:
        return str(ctx.options.get("ig_user_id") or ctx.options.get("page_id") or "me")

    def _reaction_value(self, emoji: str) -> str:
        return "love"  # Instagram's Send API takes the one reaction it has, whatever the emoji


# ------------------------------------------------------------------------------- small builders


def _attachment_type(raw: Any) -> Any:
    return raw.get("type") if isinstance(raw, dict) else None


def _location(attachment: _Attachment, coordinates: Mapping[str, Any], raw: Mapping[str, Any]) -> c.Part:
    """The legacy `location` attachment: `payload.coordinates{lat,long}`, a title and a map link."""
    lat, lon = coordinates.get("lat"), coordinates.get("long")
    if not isinstance(lat, int | float) or not isinstance(lon, int | float):
        return native.unsupported("location attachment without coordinates", raw)
    # float() of an integer beyond a double's range raises OverflowError: the part is then unreadable
    return c.Location(lat=native.finite(float(lat)), lon=native.finite(float(lon)), name=attachment.title,
                      url=attachment.url)


def multipart(call: dict[str, Any], media: c.Media) -> tuple[bytes, str]:
    """`call` as multipart/form-data: each top-level field JSON-encoded, the file as `filedata`
    (the Send API's upload form). The boundary comes from the file's hash, so a retry is identical."""
    boundary = "babelhub-" + hashlib.sha256(media.data).hexdigest()[:32]
    message = {key: value for key, value in call["message"].items() if key != UPLOAD}
    fields = {**call, "message": message}
    lines: list[bytes] = []
    for name, value in fields.items():
        text = value if isinstance(value, str) else native.json_body(value).decode()
        disposition = f'Content-Disposition: form-data; name="{name}"'
        lines += [f"--{boundary}".encode(), disposition.encode(), b"", text.encode()]
    # Both go into part headers: a line break would start a header (or the body) of the sender's choosing.
    filename = "".join(ch for ch in media.filename if ch not in '"\\' and not _is_control(ch)) or "attachment"
    mime = media.mime or "application/octet-stream"
    if any(_is_control(ch) for ch in mime):
        raise EncodeError(f"media type {mime!r} holds control characters (a line break would forge a header)")
    lines += [
        f"--{boundary}".encode(),
        f'Content-Disposition: form-data; name="filedata"; filename="{filename}"'.encode(),
        f"Content-Type: {mime}".encode(),
        b"",
        media.data,
        f"--{boundary}--".encode(),
        b"",
    ]
    return b"\r\n".join(lines), f"multipart/form-data; boundary={boundary}"


def _is_control(ch: str) -> bool:
    return ch < " " or ch == "\x7f"


def _template(payload: dict[str, Any]) -> dict[str, Any]:
    return {"attachment": {"type": "template", "payload": payload}}


def raw_items(entries: Any, path: str = "$.entry") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every messaging item of a webhook body and its path, read before decoding (for dedup keys):
    absent lists are empty, and a member of the wrong type is a DecodeError naming its path."""
    for e, entry in enumerate(_raw_list(entries, path)):
        entry_path = f"{path}[{e}]"
        entry_object = _raw_object(entry, entry_path)
        for lane in ("messaging", "standby"):
            for m, item in enumerate(_raw_list(entry_object.get(lane), f"{entry_path}.{lane}")):
                yield f"{entry_path}.{lane}[{m}]", _raw_object(item, f"{entry_path}.{lane}[{m}]")
        for n, change in enumerate(_raw_list(entry_object.get("changes"), f"{entry_path}.changes")):
            change_path = f"{entry_path}.changes[{n}]"
            change_object = _raw_object(change, change_path)
            field = change_object.get("field")
            if not isinstance(field, str):
                raise DecodeError("a change's `field` must be a string", path=f"{change_path}.field")
            value = change_object.get("value")
            if field in _MESSAGING_FIELDS and isinstance(value, dict):
                yield f"{change_path}.value", value
            else:
                yield change_path, change_object


def _raw_list(value: Any, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise DecodeError(f"expected an array, got {type(value).__name__}", path=path)
    return value


def _raw_object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DecodeError(f"expected an object, got {type(value).__name__}", path=path)
    return value


def event_key(item: Mapping[str, Any], path: str = "$") -> str:
    """What identifies one event (the item at `path`): its mid(s), else who did what when, else all of it."""
    kind = next((key for key in _EVENT_KEYS if key in item), None)
    if kind is None:  # an event this module does not know, or a non-messaging change
        return "other:" + msgspec.json.encode(item, order="sorted").decode()
    event: Mapping[str, Any] = item[kind] if isinstance(item.get(kind), dict) else {}
    sender: Mapping[str, Any] = item["sender"] if isinstance(item.get("sender"), dict) else {}
    who = str(sender.get("id") or sender.get("user_ref") or "")
    if kind == "message" and event.get("mid"):
        return f"message:{event['mid']}:{'deleted' if event.get('is_deleted') else ''}"
    if kind == "delivery":
        mids = _raw_list(event.get("mids"), f"{path}.delivery.mids")
        return f"delivery:{','.join(map(str, mids))}:{event.get('watermark')}"
    details = (event.get("mid", ""), event.get("action", ""), event.get("num_edit", ""), event.get("watermark", ""))
    return ":".join(map(str, (kind, who, item.get("timestamp", ""), *details)))
