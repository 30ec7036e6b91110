"""Telegram Bot API: updates in (webhook or getUpdates long polling), Bot API method calls out.

Reference: https://core.telegram.org/bots/api (the Bot API), and its "Making requests", "Sending files",
"Formatting options" and `setWebhook` sections.

How Telegram's shapes map onto the canonical format:

* One `Update` carries exactly one thing (a message, an edit, a button press, a reaction, a membership
  change, …) and becomes one envelope.
* Message ids are only unique inside a chat, so the native message id is `"<chat_id>:<message_id>"`;
  the conversation is the chat, and a forum topic (`message_thread_id`) is the envelope's thread.
* Text entities count UTF-16 code units; canonical offsets count code points, so every offset is
  converted. Formatting entities turn the text into markdown; mentions become `Mention`s.
* Whatever has no canonical home is kept: descriptive fields go to `meta["telegram.<field>"]`, content
  babelhub cannot express becomes an `Unsupported` part holding the native fragment.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Final

import msgspec

from babelhub import canonical as c
from babelhub.codecs import native
from babelhub.codecs.base import (
    ALL_MEDIA,
    Capabilities,
    Codec,
    DecodeContext,
    EncodeContext,
    HttpRequest,
    HttpResponse,
    OutboundRequest,
    PollResult,
    SendResult,
)
from babelhub.codecs.settings import ConnectionOptions, Settings
from babelhub.errors import DecodeError, EncodeError, SignatureError

__all__ = ["TelegramCodec"]

SECRET_HEADER: Final = "x-telegram-bot-api-secret-token"
"""setWebhook's `secret_token` comes back in this header on every webhook request."""

# --------------------------------------------------------------------------------------- wire format
# Only the fields this codec reads; msgspec ignores the rest, which stays in the raw dict for `meta`.
# Everything but the ids is optional: the doc samples on core.telegram.org/bots/webhooks predate
# fields such as `is_bot` and `file_unique_id`.


class _User(msgspec.Struct):
    id: int
    is_bot: bool = False
    first_name: str = ""
    last_name: str = ""
    username: str = ""


class _Chat(msgspec.Struct):
    id: int
    type: str = "private"
    title: str = ""
    username: str = ""
    first_name: str = ""
    last_name: str = ""


class _Entity(msgspec.Struct):
    type: str
    offset: int
    length: int
    url: str = ""
    user: _User | None = None
    language: str = ""


class _PhotoSize(msgspec.Struct):
    file_id: str
    width: int = 0
    height: int = 0
    file_size: int = 0


class _File(msgspec.Struct):
    """Audio, Voice, Video, VideoNote, Animation, Document and Sticker share these fields (each has a
    subset; `length` is a video note's diameter)."""

    file_id: str
    file_unique_id: str = ""
    mime_type: str = ""
    file_size: int = 0
    file_name: str = ""
    duration: int = 0
    width: int = 0
    height: int = 0
    length: int = 0


class _Location(msgspec.Struct):
    latitude: float
    longitude: float


class _Venue(msgspec.Struct):
    location: _Location
    title: str = ""
    address: str = ""


class _Contact(msgspec.Struct):
    phone_number: str
    first_name: str = ""
    last_name: str = ""


class _PollOption(msgspec.Struct):
    text: str


class _Poll(msgspec.Struct):
    question: str
    options: list[_PollOption] = []
    allows_multiple_answers: bool = False


class _Button(msgspec.Struct):
    text: str = ""
    callback_data: str = ""


class _Keyboard(msgspec.Struct):
    inline_keyboard: list[list[_Button]] = []


class _MessageRef(msgspec.Struct):
    """A message referred to (`reply_to_message`), or one that may be inaccessible (`date` 0)."""

    message_id: int
    chat: _Chat
    date: int = 0
    message_thread_id: int | None = None
    is_topic_message: bool = False
    reply_markup: _Keyboard | None = None


class _Message(msgspec.Struct):
    message_id: int
    date: int
    chat: _Chat
    from_: _User | None = msgspec.field(default=None, name="from")
    sender_chat: _Chat | None = None
    message_thread_id: int | None = None
    is_topic_message: bool = False
    reply_to_message: _MessageRef | None = None
    edit_date: int = 0
    text: str = ""
    entities: list[_Entity] = []
    caption: str = ""
    caption_entities: list[_Entity] = []
    photo: list[_PhotoSize] = []
    animation: _File | None = None
    audio: _File | None = None
    document: _File | None = None
    sticker: _File | None = None
    video: _File | None = None
    video_note: _File | None = None
    voice: _File | None = None
    location: _Location | None = None
    venue: _Venue | None = None
    contact: _Contact | None = None
    poll: _Poll | None = None
    new_chat_members: list[_User] = []
    left_chat_member: _User | None = None


class _CallbackQuery(msgspec.Struct):
    id: str
    from_: _User = msgspec.field(name="from")
    message: _MessageRef | None = None
    inline_message_id: str = ""
    data: str | None = None


class _ReactionType(msgspec.Struct):
    type: str
    emoji: str = ""
    custom_emoji_id: str = ""


class _ReactionUpdate(msgspec.Struct):
    chat: _Chat
    message_id: int
    date: int
    old_reaction: list[_ReactionType]
    new_reaction: list[_ReactionType]
    user: _User | None = None
    actor_chat: _Chat | None = None


class _ChatMember(msgspec.Struct):
    status: str
    user: _User
    is_member: bool = False


class _MemberUpdate(msgspec.Struct):
    chat: _Chat
    from_: _User = msgspec.field(name="from")
    date: int = 0
    old_chat_member: _ChatMember | None = None
    new_chat_member: _ChatMember | None = None


class _DeletedMessages(msgspec.Struct):
    chat: _Chat
    message_ids: list[int] = []


class _Located(msgspec.Struct):
    """Where any other update happened and who caused it, as far as its fields tell."""

    chat: _Chat | None = None
    from_: _User | None = msgspec.field(default=None, name="from")
    user: _User | None = None
    date: int = 0


class _Sent(msgspec.Struct):
    """The part of a sent Message that `parse_response` needs."""

    message_id: int
    chat: _Chat


# ---------------------------------------------------------------------------- decoding: constants

#: Update fields that carry a Message, and whether it is a new message or a new version of one.
_NEW_MESSAGE_UPDATES: Final = ("message", "channel_post", "business_message", "guest_message")
_EDITED_MESSAGE_UPDATES: Final = ("edited_message", "edited_channel_post", "edited_business_message")

_CONVERSATION_TYPES: Final[dict[str, c.ConversationType]] = {
    "private": "direct",
    "group": "group",
    "supergroup": "group",
    "channel": "channel",
}

#: Message fields mapped onto the canonical header or parts.
_MAPPED_FIELDS: Final = frozenset(
    {
        "message_id", "date", "chat", "from", "sender_chat", "message_thread_id", "is_topic_message",
        "reply_to_message", "text", "entities", "caption", "caption_entities", "photo", "animation",
        "audio", "document", "sticker", "video", "video_note", "voice", "location", "venue", "contact",
        "poll",
    }
)  # fmt: skip

#: Message fields that carry content (or point at other messages): one of them that cannot be read becomes
#: an Unsupported part, and the rest of the message still arrives.
_CONTENT_FIELDS: Final = frozenset(
    {
        "reply_to_message", "entities", "caption_entities", "photo", "animation", "audio", "document",
        "sticker", "video", "video_note", "voice", "location", "venue", "contact", "poll",
    }
)  # fmt: skip

#: Message fields that describe a message rather than carry content: kept in meta when present.
_DESCRIPTIVE_FIELDS: Final = frozenset(
    {
        "edit_date", "forward_origin", "forward_from", "forward_from_chat", "forward_from_message_id",
        "forward_signature", "forward_sender_name", "forward_date", "is_automatic_forward",
        "external_reply", "quote", "reply_to_story", "reply_to_checklist_task_id",
        "reply_to_poll_option_id", "via_bot", "sender_boost_count", "sender_business_bot", "sender_tag",
        "business_connection_id", "guest_query_id", "guest_bot_caller_user", "guest_bot_caller_chat",
        "direct_messages_topic", "has_protected_content", "is_from_offline", "is_paid_post",
        "media_group_id", "author_signature", "paid_star_count", "link_preview_options",
        "suggested_post_info", "effect_id", "show_caption_above_media", "has_media_spoiler",
        "reply_markup",
    }
)  # fmt: skip

#: Entities Telegram clients detect from the text itself: the plain text already says everything.
_SELF_EVIDENT_ENTITIES: Final = frozenset(
    {"mention", "hashtag", "cashtag", "bot_command", "url", "email", "phone_number"}
)
#: Entities rendered as markdown markers around their text.
_MARKDOWN_MARKERS: Final = {
    "bold": ("**", "**"),
    "italic": ("*", "*"),
    "strikethrough": ("~~", "~~"),
    "code": ("`", "`"),
}
_FORMATTING_ENTITIES: Final = frozenset({*_MARKDOWN_MARKERS, "pre", "text_link", "blockquote", "expandable_blockquote"})
_QUOTE_ENTITIES: Final = frozenset({"blockquote", "expandable_blockquote"})
_VERBATIM_ENTITIES: Final = frozenset({"code", "pre"})
_MENTION_ENTITIES: Final = frozenset({"mention", "text_mention"})
#: Characters escaped with a backslash in markdown output, so that the user's `*` stays a `*`.
_MARKDOWN_SPECIALS: Final = frozenset("\\`*_[]~<>#")

_MEMBER_UPDATE_META: Final = (
    "old_chat_member", "new_chat_member", "invite_link", "via_join_request", "via_chat_folder_invite_link",
)  # fmt: skip

#: ChatMember statuses of someone who is in the chat (`restricted` members carry `is_member`).
_PRESENT_STATUSES: Final = frozenset({"creator", "owner", "administrator", "member"})

# ---------------------------------------------------------------------------- encoding: constants

#: Media kind → (Bot API method, name of the field that takes the file).
_SEND_MEDIA: Final = {
    "image": ("sendPhoto", "photo"),
    "audio": ("sendAudio", "audio"),
    "voice": ("sendVoice", "voice"),
    "video": ("sendVideo", "video"),
    "document": ("sendDocument", "document"),
    "sticker": ("sendSticker", "sticker"),
    "animation": ("sendAnimation", "animation"),
}
_WITH_DURATION: Final = frozenset({"audio", "voice", "video", "animation"})
_WITH_DIMENSIONS: Final = frozenset({"video", "animation"})
#: sendMediaGroup takes 2-10 photos/videos; longer runs are split into several albums.
_ALBUM_KINDS: Final = {"image": "photo", "video": "video"}
_ALBUM_MAX: Final = 10
_CALLBACK_DATA_MAX_BYTES: Final = 64  # InlineKeyboardButton.callback_data: "1-64 bytes"
_PARSE_MODES: Final = {"telegram_html": "HTML", "telegram_markdownv2": "MarkdownV2"}
_NUMERIC_CHAT_ID: Final = re.compile(r"-?\d+")

#: What getUpdates asks for by default: every update this codec maps to something meaningful.
#: `message_reaction` and `chat_member` are only delivered when listed explicitly.
DEFAULT_ALLOWED_UPDATES: Final = (
    "message", "edited_message", "channel_post", "edited_channel_post", "business_message",
    "edited_business_message", "deleted_business_messages", "callback_query", "message_reaction",
    "my_chat_member", "chat_member",
)  # fmt: skip

_MB: Final = 1024 * 1024


class TelegramSecrets(Settings, frozen=True, kw_only=True):
    bot_token: str
    """The bot's token from @BotFather (`123456:ABC-DEF…`): every Bot API call carries it."""
    secret_token: str = ""
    """The `secret_token` given to `setWebhook`, which Telegram sends back in
    `X-Telegram-Bot-Api-Secret-Token`; webhooks are refused without it (polling needs none)."""


class TelegramOptions(ConnectionOptions, frozen=True, kw_only=True):
    poll_timeout: int = 25
    """Seconds one `getUpdates` long poll waits for updates (`mode = "polling"`)."""
    allowed_updates: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_ALLOWED_UPDATES))
    """The update types `getUpdates` asks for (`mode = "polling"`)."""


class TelegramCodec(Codec):
    channel: ClassVar[str] = "telegram"
    secret_settings: ClassVar[type[Settings]] = TelegramSecrets
    option_settings: ClassVar[type[Settings]] = TelegramOptions
    default_api_base: ClassVar[str] = "https://api.telegram.org"
    # Bot FAQ: "the API will not allow bulk notifications to more than ~30 users per second".
    send_rate: ClassVar[float] = 30.0
    credential_headers: ClassVar[frozenset[str]] = Codec.credential_headers | {SECRET_HEADER}
    capabilities: ClassVar[Capabilities] = Capabilities(
        parts=frozenset(
            {"text", "media", "location", "contact", "buttons", "list", "poll", "reaction", "edit", "delete"}
        ),
        media=ALL_MEDIA,
        # "Sending files": by URL Telegram fetches at most 5 MB for photos and 20 MB for other files
        # (file_id has no limit; multipart uploads are out of scope, so no media_upload).
        media_max_bytes=20 * _MB,
        media_limits={"image": 5 * _MB},
        text_limit=4096,  # sendMessage text: "1-4096 characters after entities parsing"
        caption_limit=1024,  # captions: "0-1024 characters after entities parsing"
        markup="telegram_html",
        # The Bot API reference documents no limit on inline keyboard size or button label length,
        # only callback_data's 64 bytes. Servers are widely reported to refuse keyboards of more than
        # 100 buttons, so that is the ceiling declared here; labels are clipped by clients, not the API.
        max_buttons=100,
        max_button_title=64,
        button_actions=frozenset({"reply", "url", "postback"}),
        max_list_rows=100,
        max_list_sections=1,  # a keyboard has rows, no section headings
        max_row_title=64,
        reply=True,
        edit=True,
        delete=True,
        reaction=True,
        typing=True,
    )

    # ------------------------------------------------------------------------------------ webhook

    def verify(self, request: HttpRequest, secrets: Mapping[str, str]) -> None:
        expected = secrets.get("secret_token", "")
        if not expected:
            # Without a secret anyone who guesses the URL can inject updates: refuse rather than trust.
            raise SignatureError("telegram: no secret_token configured; set one with setWebhook(secret_token=...)")
        if not native.same_secret(request.headers.get(SECRET_HEADER, ""), expected):
            raise SignatureError(f"telegram: {SECRET_HEADER} header missing or wrong")

    def dedup_key(self, request: HttpRequest) -> str:
        raw = native.read_json(request)
        if not isinstance(raw, dict):
            raise DecodeError("an Update must be a JSON object", path="$")
        update_id = native.convert(raw.get("update_id"), int, "$.update_id")
        return f"update:{update_id}"

    # ------------------------------------------------------------------------------------- decode

    def decode(self, request: HttpRequest, ctx: DecodeContext) -> list[c.Envelope]:
        raw = native.read_json(request)
        if not isinstance(raw, dict):
            raise DecodeError("an Update must be a JSON object", path="$")
        update_id = native.convert(raw.get("update_id"), int, "$.update_id")
        kind = next((key for key in raw if key != "update_id"), None)
        if kind is None:
            raise DecodeError("the Update carries nothing besides update_id", path="$")
        return [_Decoder(ctx, request, update_id, kind, raw[kind]).decode()]

    # ------------------------------------------------------------------------------------- encode

    def encode(self, message: c.Message, ctx: EncodeContext) -> list[OutboundRequest]:
        calls = _Encoder(message, ctx).calls()
        return [
            self._request(ctx, call.method, call.payload, f"{message.id}:{index}", message.id)
            for index, call in enumerate(calls)
        ]

    def encode_activity(self, activity: c.Activity, ctx: EncodeContext) -> list[OutboundRequest]:
        if activity.activity != "typing":
            return []
        payload: dict[str, Any] = {"chat_id": _chat_ref(ctx.to), "action": "typing"}
        if activity.thread:
            payload["message_thread_id"] = _native_message(ctx, activity.thread, "thread")[1]
        return [self._request(ctx, "sendChatAction", payload, f"{activity.id}:0", "")]

    def on_inbound(self, envelope: c.Envelope, ctx: EncodeContext) -> list[OutboundRequest]:
        # A pressed button shows a spinner until the bot answers the callback query.
        query_id = envelope.meta.get("telegram.callback_query_id")
        if not isinstance(envelope, c.Message) or not isinstance(query_id, str):
            return []
        if not any(isinstance(part, c.Action) for part in envelope.parts):
            return []
        payload = {"callback_query_id": query_id}
        return [self._request(ctx, "answerCallbackQuery", payload, f"{envelope.id}:answer", envelope.id)]

    def parse_response(self, request: OutboundRequest, response: HttpResponse) -> SendResult:
        try:
            answer = native.read_json(response)
        except DecodeError:
            answer = None
        if not isinstance(answer, dict):
            # Not the Bot API talking (a proxy's HTML page, an empty body): judge by the status alone.
            return native.http_failure(response) if response.status >= 300 else _unreadable_success(response)
        if answer.get("ok") is True:
            return SendResult(ok=True, native_ids=_sent_ids(answer.get("result")))
        return _api_failure(response, answer)

    # ------------------------------------------------------------------------------------ polling

    def poll_request(self, ctx: EncodeContext, cursor: str) -> OutboundRequest | None:
        payload: dict[str, Any] = {}
        if cursor:
            # Asking from update_id N confirms every update before N: Telegram forgets them.
            payload["offset"] = int(cursor)
        payload["timeout"] = int(ctx.options.get("poll_timeout", 25))
        payload["allowed_updates"] = list(ctx.options.get("allowed_updates", DEFAULT_ALLOWED_UPDATES))
        return self._request(ctx, "getUpdates", payload, f"getUpdates:{cursor}", "")

    def parse_poll(self, request: OutboundRequest, response: HttpResponse, cursor: str) -> PollResult:
        try:
            answer = native.read_json(response)
        except DecodeError:
            answer = None
        if not isinstance(answer, dict) or answer.get("ok") is not True:
            failure = _api_failure(response, answer) if isinstance(answer, dict) else native.http_failure(response)
            return PollResult(cursor=cursor, error=failure.error)
        updates = answer.get("result")
        if not isinstance(updates, list):
            error = c.Error(code="telegram_bad_result", message="getUpdates result is not a list", native=answer)
            return PollResult(cursor=cursor, error=error)
        # Polled updates never pass `verify` (the hub fetched them itself), so they need no header.
        records = [HttpRequest(method="POST", path="/poll", body=native.json_body(update)) for update in updates]
        update_ids = [update_id for update in updates if isinstance(update_id := _update_id(update), int)]
        # The next poll starts after the highest update seen, which confirms all of these to Telegram.
        next_cursor = str(max(update_ids) + 1) if update_ids else cursor
        return PollResult(records=records, cursor=next_cursor)

    # ------------------------------------------------------------------------------------ helpers

    def _request(
        self, ctx: EncodeContext, method: str, payload: dict[str, Any], key: str, message_id: str
    ) -> OutboundRequest:
        token = native.required_secret(ctx.secrets, "bot_token", "Telegram")
        return OutboundRequest(
            method="POST",
            url=f"{self.api_base(ctx)}/bot{token}/{method}",
            headers={"content-type": "application/json"},
            body=native.json_body(payload),
            idempotency_key=key,
            message_id=message_id,
        )


def _update_id(update: Any) -> Any:
    return update.get("update_id") if isinstance(update, dict) else None


# =========================================================================================== decode


class _Decoder:
    """Turns one Update's payload (`kind` names the Update field that is set) into one envelope."""

    def __init__(self, ctx: DecodeContext, request: HttpRequest, update_id: int, kind: str, body: Any) -> None:
        self.ctx = ctx
        self.request = request
        self.update_id = update_id
        self.kind = kind
        self.body = body
        self.path = f"$.{kind}"

    def decode(self) -> c.Envelope:
        if self.kind in _NEW_MESSAGE_UPDATES:
            return self._message(edited=False)
        if self.kind in _EDITED_MESSAGE_UPDATES:
            return self._message(edited=True)
        if self.kind == "callback_query":
            return self._callback_query()
        if self.kind == "message_reaction":
            return self._reaction()
        if self.kind in ("my_chat_member", "chat_member"):
            return self._membership()
        if self.kind == "deleted_business_messages":
            return self._deleted_messages()
        return self._other_update()

    # -------------------------------------------------------------------------------- messages

    def _message(self, *, edited: bool) -> c.Envelope:
        message, raw, unreadable = native.convert_parts(self.body, _Message, self.path, _CONTENT_FIELDS, "telegram")
        if message.new_chat_members or message.left_chat_member:
            return self._membership_service_message(message, raw)
        native_id = _message_key(message.chat.id, message.message_id)
        parts, meta = _content(message, raw, self.ctx, self.path)
        parts.extend(unreadable)
        if edited:
            parts.insert(0, c.Edit(target=self._message_id(native_id)))
            envelope_id = self._message_id(f"{native_id}:{message.edit_date}")
            if message.edit_date:
                ts = native.from_unix(message.edit_date, f"{self.path}.edit_date")
            else:
                ts = native.from_unix(message.date, f"{self.path}.date")
            meta.pop("telegram.edit_date", None)  # carried by the id and ts
        else:
            envelope_id = self._message_id(native_id)
            ts = native.from_unix(message.date, f"{self.path}.date")
        if not parts:
            parts.append(c.Unsupported(reason="telegram message without content", native=raw))
        sender, sender_meta = self._message_sender(message, raw)
        return c.Message(
            id=envelope_id,
            tenant=self.ctx.tenant,
            conversation=self._conversation(message.chat),
            ts=ts,
            sender=sender,
            native=c.Native(id=native_id, seq=self.ctx.seq,
                          thread=self._topic_key(message.chat, message.message_thread_id, message.is_topic_message)),
            reply_to=self._reply_to(message),
            thread=self._thread(message.chat, message.message_thread_id, message.is_topic_message),
            meta={**meta, **sender_meta, **self._thread_meta(message)},
            parts=parts,
        )

    def _message_sender(self, message: _Message, raw: dict[str, Any]) -> tuple[c.Sender | None, dict[str, Any]]:
        # A message sent on behalf of a chat (anonymous admin, linked channel) names that chat in
        # sender_chat; `from` then holds a placeholder user, kept in meta for completeness.
        if message.sender_chat is not None:
            meta = {"telegram.from": raw["from"]} if "from" in raw else {}
            return self._chat_sender(message.sender_chat), meta
        if message.from_ is not None:
            return self._sender(message.from_), {}
        if message.chat.type == "channel":
            return self._chat_sender(message.chat), {}  # channel posts are authored by the channel
        return None, {}

    def _reply_to(self, message: _Message) -> str:
        reply = message.reply_to_message
        if reply is None:
            return ""
        # Inside a forum topic every message "replies" to the topic's first message; that is the
        # thread, not a reply the user chose.
        if message.is_topic_message and reply.message_id == message.message_thread_id:
            return ""
        return self._message_id(_message_key(reply.chat.id, reply.message_id))

    def _thread(self, chat: _Chat, thread_id: int | None, is_topic: bool) -> str:
        # A topic's id is the message id of the message that created it, so the thread id is that
        # message's canonical id. Reply threads outside forums cannot be posted to: meta only.
        key = self._topic_key(chat, thread_id, is_topic)
        return self._message_id(key) if key else ""

    @staticmethod
    def _topic_key(chat: _Chat, thread_id: int | None, is_topic: bool | None) -> str:
        """The native key of a forum topic's first message, which is the topic's id."""
        if thread_id is None or not is_topic:
            return ""
        return _message_key(chat.id, thread_id)

    @staticmethod
    def _thread_meta(message: _Message) -> dict[str, Any]:
        if message.message_thread_id is None or message.is_topic_message:
            return {}
        return {"telegram.message_thread_id": message.message_thread_id}

    def _membership_service_message(self, message: _Message, raw: dict[str, Any]) -> c.Activity:
        joined = bool(message.new_chat_members)
        left = [message.left_chat_member] if message.left_chat_member else []
        members = message.new_chat_members if joined else left
        native_id = _message_key(message.chat.id, message.message_id)
        return c.Activity(
            id=c.stable_id("activity", self.ctx.tenant, self.ctx.connection, native_id),
            tenant=self.ctx.tenant,
            conversation=self._conversation(message.chat),
            ts=native.from_unix(message.date, f"{self.path}.date"),
            sender=self._sender(message.from_) if message.from_ else None,
            native=c.Native(id=native_id, seq=self.ctx.seq),
            meta=_descriptive_meta(raw),
            activity="joined" if joined else "left",
            detail={"members": [_person(member) for member in members]},
        )

    # ------------------------------------------------------------------------- button presses

    def _callback_query(self) -> c.Envelope:
        query = native.convert(self.body, _CallbackQuery, self.path)
        source = query.message
        if source is not None:
            chat = source.chat
            source_id = self._message_id(_message_key(chat.id, source.message_id))
            thread = self._thread(chat, source.message_thread_id, source.is_topic_message)
        else:
            # A button under an inline-mode message: no chat is named. The presser's private chat
            # (its id is the user's id) is the only place the bot can answer.
            chat = _Chat(id=query.from_.id, type="private")
            source_id = thread = ""
        # on_inbound answers the query by this id (it stops the button's spinner).
        meta: dict[str, Any] = {"telegram.callback_query_id": query.id}
        meta.update(_picked_meta(self.body, ("chat_instance", "inline_message_id", "game_short_name")))
        part: c.Part
        if query.data is not None:
            part = c.Action(id=query.data, title=_button_title(source, query.data), source=source_id)
        else:
            part = c.Unsupported(reason="telegram callback_query without data (a game button)", native=self.body)
        return c.Message(
            id=self._message_id(f"callback:{query.id}"),
            tenant=self.ctx.tenant,
            conversation=self._conversation(chat),
            # A callback query has no date: the hub's receipt time is the press; else the keyboard's.
            ts=self._received_or(source.date if source else 0, f"{self.path}.message.date"),
            sender=self._sender(query.from_),
            native=c.Native(id=query.id, seq=self.ctx.seq),
            thread=thread,
            meta=meta,
            parts=[part],
        )

    # ------------------------------------------------------------------------------- reactions

    def _reaction(self) -> c.Envelope:
        update = native.convert(self.body, _ReactionUpdate, self.path)
        target = self._message_id(_message_key(update.chat.id, update.message_id))
        old = _reactions_by_key(update.old_reaction, self.body["old_reaction"])
        new = _reactions_by_key(update.new_reaction, self.body["new_reaction"])
        # Removed first, then added: a changed reaction reads "took ❤ back, put 👍".
        removed = [_reaction_part(*old[key], target, removed=True) for key in old if key not in new]
        added = [_reaction_part(*new[key], target, removed=False) for key in new if key not in old]
        parts = removed + added
        if not parts:
            parts.append(c.Unsupported(reason="telegram message_reaction without a change", native=self.body))
        # Anonymous reactions name the chat they were made on behalf of instead of a user.
        actor = update.user or update.actor_chat
        native_id = (
            f"reaction:{_message_key(update.chat.id, update.message_id)}:{actor.id if actor else 0}:{update.date}"
        )
        if update.user is not None:
            sender: c.Sender | None = self._sender(update.user)
        else:
            sender = self._chat_sender(update.actor_chat) if update.actor_chat else None
        return c.Message(
            id=self._message_id(native_id),
            tenant=self.ctx.tenant,
            conversation=self._conversation(update.chat),
            ts=native.from_unix(update.date, f"{self.path}.date"),
            sender=sender,
            native=c.Native(id=native_id, seq=self.ctx.seq),
            parts=parts,
        )

    # ------------------------------------------------------------------------ membership changes

    def _membership(self) -> c.Envelope:
        update = native.convert(self.body, _MemberUpdate, self.path)
        old, new = update.old_chat_member, update.new_chat_member
        was_in, is_in = _is_present(old), _is_present(new)
        if new is None or was_in == is_in:
            # A promotion, a restriction, …: not a join or a leave, so no activity says it.
            return self._unsupported(f"telegram {self.kind} status change", update.chat, update.from_, update.date)
        detail: dict[str, Any] = {
            "member": _person(new.user),
            "old_status": old.status if old else "",
            "new_status": new.status,
            "bot_itself": self.kind == "my_chat_member",
        }
        return c.Activity(
            id=c.stable_id("activity", self.ctx.tenant, self.ctx.connection, f"update:{self.update_id}"),
            tenant=self.ctx.tenant,
            conversation=self._conversation(update.chat),
            ts=native.from_unix(update.date, f"{self.path}.date"),
            sender=self._sender(update.from_),
            native=c.Native(id=f"update:{self.update_id}", seq=self.ctx.seq),
            # The full member records (an admin's rights, a ban's end) and how they joined.
            meta=_picked_meta(self.body, _MEMBER_UPDATE_META),
            activity="joined" if is_in else "left",
            detail=detail,
        )

    def _deleted_messages(self) -> c.Envelope:
        deleted = native.convert(self.body, _DeletedMessages, self.path)
        native_id = f"update:{self.update_id}"
        targets = [self._message_id(_message_key(deleted.chat.id, number)) for number in deleted.message_ids]
        meta = _picked_meta(self.body, ("business_connection_id",))
        return c.Message(
            id=self._message_id(native_id),
            tenant=self.ctx.tenant,
            conversation=self._conversation(deleted.chat),
            ts=self._received_or(0),
            native=c.Native(id=native_id, seq=self.ctx.seq),
            meta=meta,
            parts=[c.Delete(target=target) for target in targets],
        )

    # ---------------------------------------------------------------------------- everything else

    def _other_update(self) -> c.Envelope:
        where = native.convert(self.body, _Located, self.path) if isinstance(self.body, dict) else _Located()
        person = where.from_ or where.user
        return self._unsupported(f"telegram {self.kind} update", where.chat, person, where.date)

    def _unsupported(self, reason: str, chat: _Chat | None, person: _User | None, date: int) -> c.Message:
        """A Message holding the whole update payload, in the chat it concerns as far as we can tell."""
        if chat is None and person is not None:
            chat = _Chat(id=person.id, type="private")
        native_id = f"update:{self.update_id}"
        # Polls and poll answers name no chat: they gather in one conversation per update type.
        conversation = (
            self._conversation(chat) if chat is not None else native.conversation(self.ctx, "telegram", self.kind)
        )
        return c.Message(
            id=self._message_id(native_id),
            tenant=self.ctx.tenant,
            conversation=conversation,
            ts=native.from_unix(date, f"{self.path}.date") if date else self._received_or(0),
            sender=self._sender(person) if person else None,
            native=c.Native(id=native_id, seq=self.ctx.seq),
            parts=[c.Unsupported(reason=reason, native={self.kind: self.body})],
        )

    # ---------------------------------------------------------------------------------- header

    def _message_id(self, native_id: str) -> str:
        return c.message_id(self.ctx.tenant, self.ctx.connection, native_id)

    def _conversation(self, chat: _Chat) -> c.Conversation:
        return native.conversation(self.ctx, "telegram", str(chat.id), _CONVERSATION_TYPES.get(chat.type, "direct"))

    def _sender(self, user: _User) -> c.Sender:
        return native.sender(
            self.ctx, str(user.id),
            name=_full_name(user.first_name, user.last_name),
            role="bot" if user.is_bot else "user",
            handle=f"@{user.username}" if user.username else "",
        )

    def _chat_sender(self, chat: _Chat) -> c.Sender:
        return native.sender(
            self.ctx, str(chat.id),
            name=chat.title or _full_name(chat.first_name, chat.last_name),
            handle=f"@{chat.username}" if chat.username else "",
        )

    def _received_or(self, unix_time: int, path: str = "$") -> datetime:
        """For updates without a date: when the hub received them, else `unix_time` (read at `path`)."""
        if self.request.received_at > 0:
            return native.from_unix(self.request.received_at)
        return native.from_unix(unix_time, path)


def _content(
    message: _Message, raw: dict[str, Any], ctx: DecodeContext, path: str
) -> tuple[list[c.Part], dict[str, Any]]:
    """A message's parts (`path` is where the message is), and the meta that keeps what the parts cannot say."""
    parts: list[c.Part] = []
    meta = _descriptive_meta(raw)
    if message.text:
        text, entities_meta = _text(message.text, message.entities, raw.get("entities"), ctx)
        parts.append(text)
        meta.update(entities_meta)
    found = _media(message)
    if found is not None:
        media, field_name = found
        parts.append(media)
        if _has_unrendered(message.caption_entities, _SELF_EVIDENT_ENTITIES):
            meta["telegram.caption_entities"] = raw["caption_entities"]
        meta.update(_media_meta(raw, field_name, message.photo))
    else:
        # A caption on content kept as Unsupported (paid media, …) has no Media part to sit in.
        meta.update(_picked_meta(raw, ("caption", "caption_entities")))
    if message.venue is not None:
        venue = message.venue

        def read_venue() -> c.Part:
            lat, lon = _coordinates(venue.location, f"{path}.venue.location")
            native.keep_unmapped(meta, "telegram.location", raw["venue"]["location"], {"latitude", "longitude"})
            return c.Location(lat=lat, lon=lon, name=venue.title, address=venue.address)

        parts.extend(native.lenient_parts(read_venue, {"venue": raw["venue"]}, "telegram venue"))
        native.keep_unmapped(meta, "telegram.venue", raw["venue"], {"location", "title", "address"})
    elif message.location is not None:
        location = message.location

        def read_location() -> c.Part:
            lat, lon = _coordinates(location, f"{path}.location")
            return c.Location(lat=lat, lon=lon)

        parts.extend(native.lenient_parts(read_location, {"location": raw["location"]}, "telegram location"))
        native.keep_unmapped(meta, "telegram.location", raw["location"], {"latitude", "longitude"})
    if message.contact is not None:
        contact = message.contact
        name = _full_name(contact.first_name, contact.last_name)
        parts.append(c.Contact(name=name, phones=[contact.phone_number]))
        native.keep_unmapped(meta, "telegram.contact", raw["contact"], {"phone_number", "first_name", "last_name"})
    if message.poll is not None:
        poll = message.poll
        options = [option.text for option in poll.options]
        parts.append(c.Poll(question=poll.question, options=options, multiple=poll.allows_multiple_answers))
        meta["telegram.poll"] = raw["poll"]  # id, type (quiz), votes: what a canonical Poll cannot hold
    if "dice" in raw:
        # A dice is a random roll the bot may act on (a game): as text "🎲" its value would be lost, so
        # it stays native, with the roll readable in meta without digging into the part.
        parts.append(c.Unsupported(reason="telegram dice", native={"dice": raw["dice"]}))
        meta["telegram.dice"] = raw["dice"]
    for key, value in raw.items():
        if key not in _MAPPED_FIELDS and key not in _DESCRIPTIVE_FIELDS and key != "dice":
            parts.append(c.Unsupported(reason=f"telegram message field {key!r}", native={key: value}))
    return parts, meta


def _coordinates(location: _Location, path: str) -> tuple[float, float]:
    """Latitude and longitude, which must be numbers ("nan" as a string converts to one that is not)."""
    return (
        native.finite(location.latitude, f"{path}.latitude"),
        native.finite(location.longitude, f"{path}.longitude"),
    )


def _descriptive_meta(raw: dict[str, Any]) -> dict[str, Any]:
    return _picked_meta(raw, _DESCRIPTIVE_FIELDS)


def _picked_meta(raw: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """`raw`'s fields named in `keys`, as namespaced meta."""
    return {f"telegram.{key}": raw[key] for key in keys if key in raw}


# ------------------------------------------------------------------------------------------ media


def _media(message: _Message) -> tuple[c.Media, str] | None:
    """The message's file as a Media part, and the name of the message field it came from. Fields that
    are present but null (`"animation": null`) are no file."""
    if message.photo:
        largest = message.photo[_largest_photo(message.photo)]
        media = c.Media(
            media="image",
            file_id=largest.file_id,
            size=largest.file_size,
            width=largest.width,
            height=largest.height,
            caption=message.caption,
        )
        return media, "photo"
    if message.video_note is not None:
        note = message.video_note  # a round video message; `length` is its diameter
        media = c.Media(
            media="video",
            file_id=note.file_id,
            size=note.file_size,
            duration_ms=note.duration * 1000,
            width=note.length,
            height=note.length,
        )
        return media, "video_note"
    # An animation also arrives as `document` for old clients: it comes first so it is read once.
    files: tuple[tuple[c.MediaKind, _File | None], ...] = (
        ("animation", message.animation),
        ("audio", message.audio),
        ("voice", message.voice),
        ("video", message.video),
        ("document", message.document),
        ("sticker", message.sticker),
    )
    for kind, file in files:
        if file is not None:
            media = c.Media(
                media=kind,
                file_id=file.file_id,
                mime=file.mime_type,
                size=file.file_size,
                filename=file.file_name,
                caption=message.caption,
                duration_ms=file.duration * 1000,
                width=file.width,
                height=file.height,
            )
            return media, kind  # each kind is named after its field
    return None


def _largest_photo(sizes: list[_PhotoSize]) -> int:
    """Telegram sends one photo in several sizes, each a downscaled copy: the index of the largest, read
    from the typed sizes (the raw ones may spell numbers as strings)."""
    return max(range(len(sizes)), key=lambda n: (sizes[n].width * sizes[n].height, sizes[n].file_size))


#: For each file field, the native fields its Media part already holds (thumbnails are derived copies).
_FILE_FIELDS_IN_MEDIA: Final = {
    "animation": {"file_id", "file_size", "file_name", "mime_type", "duration", "width", "height", "thumbnail"},
    "audio": {"file_id", "file_size", "file_name", "mime_type", "duration", "thumbnail"},
    "voice": {"file_id", "file_size", "mime_type", "duration"},
    "video": {"file_id", "file_size", "file_name", "mime_type", "duration", "width", "height", "thumbnail"},
    "video_note": {"file_id", "file_size", "duration", "length", "thumbnail"},
    "document": {"file_id", "file_size", "file_name", "mime_type", "thumbnail"},
    "sticker": {"file_id", "file_size", "width", "height", "thumbnail"},
}


def _media_meta(raw: dict[str, Any], name: str, photo: list[_PhotoSize]) -> dict[str, Any]:
    """What the file object in field `name` says beyond its Media part — file_unique_id (the same for
    every bot), an audio's performer and title, a sticker's emoji and set, … — under `telegram.file`."""
    meta: dict[str, Any] = {}
    if name == "photo":
        largest = raw["photo"][_largest_photo(photo)]  # the same size as the Media part's
        native.keep_unmapped(meta, "telegram.file", largest, ("file_id", "file_size", "width", "height"))
        return meta
    native.keep_unmapped(meta, "telegram.file", raw[name], _FILE_FIELDS_IN_MEDIA[name])
    if name == "video_note":
        meta["telegram.video_note"] = True  # a round video message, told apart from an ordinary video
    return meta


# ------------------------------------------------------------------------------------------- text


def _text(text: str, entities: list[_Entity], raw_entities: Any, ctx: DecodeContext) -> tuple[c.Text, dict[str, Any]]:
    """A Text part: markdown when formatting entities are present, else the text as it is."""
    positions = _code_point_positions(text)
    spans = [_Span.of(entity, positions) for entity in entities]
    formatting = [span for span in spans if span.entity.type in _FORMATTING_ENTITIES and span.end > span.start]
    if formatting:
        rendered, start_at, end_at = _render_markdown(text, formatting)
    else:
        rendered, start_at, end_at = text, list(range(len(text) + 1)), list(range(len(text) + 1))
    mentions = [_mention(span, text, start_at, end_at, ctx) for span in spans if span.entity.type in _MENTION_ENTITIES]
    meta: dict[str, Any] = {}
    if _has_unrendered(entities, _SELF_EVIDENT_ENTITIES | _FORMATTING_ENTITIES | _MENTION_ENTITIES):
        meta["telegram.entities"] = raw_entities  # underline, spoiler, custom emoji, …: no markdown for them
    return c.Text(text=rendered, format="markdown" if formatting else "plain", mentions=mentions), meta


def _has_unrendered(entities: Sequence[_Entity], understood: frozenset[str]) -> bool:
    return any(entity.type not in understood for entity in entities)


def _code_point_positions(text: str) -> list[int]:
    """For each UTF-16 offset into `text`, the code point index it falls on (plus one past the end).

    Characters outside the Basic Multilingual Plane (most emoji) take two UTF-16 units; an offset that
    points between the two halves is taken to mean the next character."""
    positions: list[int] = []
    for index, char in enumerate(text):
        positions.append(index)
        if ord(char) > 0xFFFF:
            positions.append(index + 1)
    positions.append(len(text))
    return positions


@dataclass(frozen=True)
class _Span:
    """An entity with its start and end as code point indexes of the text."""

    entity: _Entity
    start: int
    end: int

    @classmethod
    def of(cls, entity: _Entity, positions: list[int]) -> _Span:
        last = len(positions) - 1
        start = positions[min(max(entity.offset, 0), last)]
        end = positions[min(max(entity.offset + entity.length, 0), last)]
        return cls(entity=entity, start=start, end=max(start, end))


def _mention(span: _Span, text: str, start_at: list[int], end_at: list[int], ctx: DecodeContext) -> c.Mention:
    offset = start_at[span.start]
    length = max(0, end_at[span.end] - offset)
    user = span.entity.user
    if user is None:  # "@username": Telegram gives only the name
        return c.Mention(name=text[span.start : span.end], offset=offset, length=length)
    return c.Mention(
        id=c.sender_id(ctx.tenant, ctx.connection, str(user.id)),
        native_id=str(user.id),
        name=_full_name(user.first_name, user.last_name),
        offset=offset,
        length=length,
    )


def _render_markdown(text: str, spans: list[_Span]) -> tuple[str, list[int], list[int]]:
    """The text with its formatting spans as markdown, and where each source position landed.

    `start_at[i]` is where source character i starts in the output (after markers opening at i);
    `end_at[i]` is where text ending just before i ends (before markers closing at i) — so mentions
    keep pointing at their own characters."""
    # Outer spans open first (earliest, then longest); spans close in the reverse order they opened,
    # so that markers nest: **`code`**, never **`code**`.
    opening: dict[int, list[_Span]] = {}
    closing: dict[int, list[_Span]] = {}
    for span in sorted(spans, key=lambda span: (span.start, -span.end)):
        opening.setdefault(span.start, []).append(span)
        closing.setdefault(span.end, []).insert(0, span)
    out = _Output()
    start_at: list[int] = []
    end_at: list[int] = []
    active: list[str] = []  # entity types of the open spans
    for position in range(len(text) + 1):
        end_at.append(out.length)
        char = text[position] if position < len(text) else ""
        for span in closing.get(position, []):
            out.write(_closing_marker(span, char))
            active.remove(span.entity.type)
        for span in opening.get(position, []):
            out.write(_opening_marker(span, out.at_line_start()))
            active.append(span.entity.type)
        start_at.append(out.length)
        verbatim = any(kind in _VERBATIM_ENTITIES for kind in active)
        out.write(char if verbatim or char not in _MARKDOWN_SPECIALS else "\\" + char)
        if char == "\n" and not verbatim and any(kind in _QUOTE_ENTITIES for kind in active):
            out.write("> ")  # every line of a quote starts with its marker
    return out.text(), start_at, end_at


def _opening_marker(span: _Span, at_line_start: bool) -> str:
    kind = span.entity.type
    newline = "" if at_line_start else "\n"
    if kind == "pre":
        return f"{newline}```{span.entity.language}\n"
    if kind in _QUOTE_ENTITIES:
        return f"{newline}> "
    if kind == "text_link":
        return "["
    return _MARKDOWN_MARKERS[kind][0]


def _closing_marker(span: _Span, following: str) -> str:
    kind = span.entity.type
    if kind == "pre":
        return "\n```" + ("\n" if following and following != "\n" else "")
    if kind in _QUOTE_ENTITIES:
        # A blank line ends the quote; otherwise the next line would continue it.
        return "" if not following else "\n" if following == "\n" else "\n\n"
    if kind == "text_link":
        url = span.entity.url.replace("(", "%28").replace(")", "%29").replace(" ", "%20")
        return f"]({url})"
    return _MARKDOWN_MARKERS[kind][1]


class _Output:
    """Markdown being written, with its length in code points so far."""

    def __init__(self) -> None:
        self._pieces: list[str] = []
        self.length = 0

    def write(self, piece: str) -> None:
        if piece:
            self._pieces.append(piece)
            self.length += len(piece)

    def at_line_start(self) -> bool:
        return not self._pieces or self._pieces[-1].endswith("\n")

    def text(self) -> str:
        return "".join(self._pieces)


# --------------------------------------------------------------------------------- decoding: helpers


def _message_key(chat_id: int, message_id: int) -> str:
    """The native message id: Telegram numbers messages per chat."""
    return f"{chat_id}:{message_id}"


def _full_name(first: str, last: str) -> str:
    return f"{first} {last}".strip()


def _person(user: _User) -> dict[str, Any]:
    name = _full_name(user.first_name, user.last_name)
    person: dict[str, Any] = {"id": str(user.id), "name": name, "is_bot": user.is_bot}
    if user.username:
        person["handle"] = f"@{user.username}"
    return person


def _is_present(member: _ChatMember | None) -> bool:
    if member is None:
        return False
    return member.status in _PRESENT_STATUSES or (member.status == "restricted" and member.is_member)


def _button_title(source: _MessageRef | None, data: str) -> str:
    """The label of the pressed button, looked up in the keyboard of the message it was under."""
    if source is None or source.reply_markup is None:
        return ""
    buttons = (button for row in source.reply_markup.inline_keyboard for button in row)
    return next((button.text for button in buttons if button.callback_data == data), "")


def _reactions_by_key(kinds: list[_ReactionType], raw: list[Any]) -> dict[tuple[str, str], tuple[_ReactionType, Any]]:
    """Each reaction (typed and verbatim) by what it is, so old and new lists can be compared."""
    return {
        (kind.type, kind.emoji or kind.custom_emoji_id): (kind, native) for kind, native in zip(kinds, raw, strict=True)
    }


def _reaction_part(kind: _ReactionType, native: Any, target: str, *, removed: bool) -> c.Part:
    if kind.type == "emoji" and kind.emoji:
        return c.Reaction(emoji=kind.emoji, target=target, removed=removed)
    # Custom emoji and paid (star) reactions have no Unicode emoji to show.
    change = "removed" if removed else "added"
    return c.Unsupported(reason=f"telegram {kind.type} reaction {change}", native=native)


# =========================================================================================== encode


@dataclass
class _Call:
    """One Bot API call being assembled. `keyboard` says whether an inline keyboard may still be
    attached to it (`reply_markup`)."""

    method: str
    payload: dict[str, Any]
    keyboard: bool = False


class _Encoder:
    """Turns a degraded canonical message into Bot API calls, in part order."""

    def __init__(self, message: c.Message, ctx: EncodeContext) -> None:
        self.message = message
        self.ctx = ctx
        self._calls: list[_Call] = []
        self._pending_edit: c.Edit | None = None  # an Edit waits for the Text that is its new content
        self._replied = False

    def calls(self) -> list[_Call]:
        for group in _groups(self.message.parts):
            self._encode(group)
        if self._pending_edit is not None:
            raise EncodeError("telegram: an edit must be followed by the new text (only text messages can be edited)")
        return self._calls

    def _encode(self, group: Sequence[c.Part]) -> None:
        part = group[0]
        if self._pending_edit is not None and not isinstance(part, c.Text):
            raise EncodeError(f"telegram: an edit must be followed by text, not {type(part).__name__}")
        match part:
            case c.Media() if len(group) > 1:
                self._album(group)
            case c.Text():
                self._text(part)
            case c.Media():
                self._media(part)
            case c.Buttons() | c.List():
                self._keyboard(part)
            case c.Location():
                self._location(part)
            case c.Contact():
                self._contact(part)
            case c.Poll():
                self._poll(part)
            case c.Reaction():
                self._reaction(part)
            case c.Edit():
                self._pending_edit = part
            case c.Delete():
                chat, number = _native_message(self.ctx, part.target, "delete target")
                self._calls.append(_Call("deleteMessage", {"chat_id": chat, "message_id": number}))
            case _:
                raise EncodeError(f"telegram: a {type(part).__name__} part cannot be sent (not in capabilities)")

    # ----------------------------------------------------------------------------------- parts

    def _text(self, part: c.Text) -> None:
        payload: dict[str, Any] = {}
        if self._pending_edit is not None:
            chat, number = _native_message(self.ctx, self._pending_edit.target, "edit target")
            payload.update(chat_id=chat, message_id=number, text=part.text)
            self._pending_edit = None
            method = "editMessageText"
        else:
            payload = {**self._destination(), "text": part.text}
            method = "sendMessage"
        if part.format in _PARSE_MODES:
            payload["parse_mode"] = _PARSE_MODES[part.format]
        self._add(method, payload, keyboard=True)

    def _media(self, part: c.Media) -> None:
        method, field_name = _SEND_MEDIA[part.media]
        payload = {**self._destination(), field_name: _file_ref(part)}
        if part.media in _WITH_DURATION and part.duration_ms:
            payload["duration"] = round(part.duration_ms / 1000)
        if part.media in _WITH_DIMENSIONS and part.width and part.height:
            payload.update(width=part.width, height=part.height)
        caption_apart = part.media == "sticker"  # stickers take no caption: it follows as text
        if part.caption and not caption_apart:
            payload["caption"] = part.caption
        self._add(method, payload, keyboard=True)
        if part.caption and caption_apart:
            self._add("sendMessage", {**self._destination(), "text": part.caption}, keyboard=True)

    def _album(self, group: Sequence[c.Part]) -> None:
        items: list[dict[str, Any]] = []
        for part in group:
            assert isinstance(part, c.Media)  # _groups only groups media
            item = {"type": _ALBUM_KINDS[part.media], "media": _file_ref(part)}
            if part.caption:
                item["caption"] = part.caption
            items.append(item)
        self._add("sendMediaGroup", {**self._destination(), "media": items}, keyboard=False)

    def _keyboard(self, part: c.Buttons | c.List) -> None:
        markup = {"inline_keyboard": _button_rows(part) if isinstance(part, c.Buttons) else _list_rows(part)}
        text = part.text if isinstance(part, c.Buttons) else _list_text(part)
        if text:
            self._add("sendMessage", {**self._destination(), "text": text, "reply_markup": markup}, keyboard=False)
            return
        # Without text of its own, the keyboard goes under the message just before it.
        previous = self._calls[-1] if self._calls else None
        if previous is None or not previous.keyboard:
            raise EncodeError(f"telegram: {type(part).__name__} without text must follow a text or media part")
        previous.payload["reply_markup"] = markup
        previous.keyboard = False

    def _location(self, part: c.Location) -> None:
        payload = {**self._destination(), "latitude": part.lat, "longitude": part.lon}
        if part.name and part.address:
            self._add("sendVenue", {**payload, "title": part.name, "address": part.address}, keyboard=True)
        else:
            self._add("sendLocation", payload, keyboard=True)

    def _contact(self, part: c.Contact) -> None:
        if not part.phones:
            raise EncodeError(f"telegram: contact {part.name!r} has no phone number (sendContact needs one)")
        payload = {**self._destination(), "phone_number": part.phones[0], "first_name": part.name}
        if part.phones[1:] or part.emails or part.org or part.urls:
            payload["vcard"] = _vcard(part)  # the fields sendContact has no parameter for
        self._add("sendContact", payload, keyboard=True)

    def _poll(self, part: c.Poll) -> None:
        payload = {**self._destination(), "question": part.question, "options": [{"text": o} for o in part.options]}
        if part.multiple:
            payload["allows_multiple_answers"] = True
        self._add("sendPoll", payload, keyboard=True)

    def _reaction(self, part: c.Reaction) -> None:
        chat, number = _native_message(self.ctx, part.target, "reaction target")
        # setMessageReaction replaces the bot's reaction: an empty list takes it back.
        reaction = [] if part.removed else [{"type": "emoji", "emoji": part.emoji}]
        self._calls.append(_Call("setMessageReaction", {"chat_id": chat, "message_id": number, "reaction": reaction}))

    # ---------------------------------------------------------------------------------- helpers

    def _destination(self) -> dict[str, Any]:
        destination: dict[str, Any] = {"chat_id": _chat_ref(self.ctx.to)}
        if self.message.thread:
            destination["message_thread_id"] = _native_message(self.ctx, self.message.thread, "thread")[1]
        return destination

    def _add(self, method: str, payload: dict[str, Any], *, keyboard: bool) -> None:
        # Only the first message sent answers the one replied to; the rest follow it.
        if self.message.reply_to and not self._replied and method != "editMessageText":
            payload["reply_parameters"] = self._reply_parameters()
            self._replied = True
        self._calls.append(_Call(method, payload, keyboard))

    def _reply_parameters(self) -> dict[str, Any]:
        chat, number = _native_message(self.ctx, self.message.reply_to, "reply_to")
        parameters: dict[str, Any] = {"message_id": number}
        if str(chat) != self.ctx.to:
            parameters["chat_id"] = chat  # replying to a message of another chat
        return parameters


def _groups(parts: Sequence[c.Part]) -> Iterator[Sequence[c.Part]]:
    """Parts one by one, except consecutive photos/videos, which go together as albums of 2-10."""
    index = 0
    while index < len(parts):
        end = index
        while end < len(parts) and _album_item(parts[end]) and end - index < _ALBUM_MAX:
            end += 1
        if end - index >= 2:
            yield parts[index:end]
            index = end
        else:
            yield parts[index : index + 1]
            index += 1


def _album_item(part: c.Part) -> bool:
    return isinstance(part, c.Media) and part.media in _ALBUM_KINDS


def _button_rows(part: c.Buttons) -> list[list[dict[str, str]]]:
    # One button per row: labels stay readable on a phone, whatever their length.
    return [[_inline_button(button)] for button in part.buttons]


def _inline_button(button: c.Button) -> dict[str, str]:
    if button.action == "url":
        return {"text": button.title, "url": button.value}
    if button.action not in ("reply", "postback"):
        raise EncodeError(f"telegram: button {button.title!r} has action {button.action!r}, which Telegram lacks")
    data = button.value if button.action == "postback" and button.value else button.id
    return {"text": button.title, "callback_data": _callback_data(data, button.title)}


def _list_rows(part: c.List) -> list[list[dict[str, str]]]:
    rows = [row for section in part.sections for row in section.rows]
    return [[{"text": row.title, "callback_data": _callback_data(row.id, row.title)}] for row in rows]


def _list_text(part: c.List) -> str:
    return "\n\n".join(piece for piece in (part.header, part.text, part.footer) if piece)


def _callback_data(data: str, title: str) -> str:
    size = len(data.encode("utf-8"))
    if not 1 <= size <= _CALLBACK_DATA_MAX_BYTES:
        raise EncodeError(
            f"telegram: button {title!r} has callback data of {size} bytes; Telegram takes 1-{_CALLBACK_DATA_MAX_BYTES}"
        )
    return data


def _file_ref(part: c.Media) -> str:
    if part.file_id or part.url:
        return part.file_id or part.url
    raise EncodeError(
        f"telegram: {part.media} has only inline data; uploading it needs multipart/form-data, which this "
        "codec does not build — give a url or a file_id"
    )


def _vcard(contact: c.Contact) -> str:
    lines = ["BEGIN:VCARD", "VERSION:3.0", f"FN:{contact.name}"]
    lines += [f"TEL:{phone}" for phone in contact.phones]
    lines += [f"EMAIL:{email}" for email in contact.emails]
    lines += [f"ORG:{contact.org}"] if contact.org else []
    lines += [f"URL:{url}" for url in contact.urls]
    return "\n".join([*lines, "END:VCARD"])


def _chat_ref(chat: str) -> int | str:
    """A chat id as the API takes it: a number, or "@channelusername"."""
    return int(chat) if _NUMERIC_CHAT_ID.fullmatch(chat) else chat


def _native_message(ctx: EncodeContext, canonical_id: str, role: str) -> tuple[int | str, int]:
    """The (chat, message number) behind a canonical message id, from the hub's id map."""
    native_id = native.native_id(ctx, canonical_id, role, "Telegram")
    chat, _, number = native_id.rpartition(":")
    if not chat or not number.isdigit():
        raise EncodeError(f"telegram: {role} maps to {native_id!r}, not a '<chat_id>:<message_id>' id")
    return _chat_ref(chat), int(number)


# ======================================================================================== responses


def _sent_ids(result: Any) -> list[str]:
    """Native ids of what a successful call sent: one Message, a list (sendMediaGroup), or just True."""
    messages = result if isinstance(result, list) else [result]
    ids: list[str] = []
    for item in messages:
        if isinstance(item, dict):
            try:
                sent = native.convert(item, _Sent)
            except DecodeError:
                continue
            ids.append(_message_key(sent.chat.id, sent.message_id))
    return ids


def _api_failure(response: HttpResponse, answer: dict[str, Any]) -> SendResult:
    """`{"ok": false, "error_code": …, "description": …, "parameters": {"retry_after": …}}`."""
    error_code = answer.get("error_code")
    code = error_code if isinstance(error_code, int) else response.status
    description = answer.get("description")
    failure = native.http_failure(
        response, code=f"telegram_{code}", message=description if isinstance(description, str) else "", native=answer
    )
    # error_code normally repeats the HTTP status; trust whichever says "try again".
    retryable = failure.retryable or code in (408, 429) or code >= 500
    parameters = answer.get("parameters")
    wait = parameters.get("retry_after") if isinstance(parameters, dict) else None
    retry_after = float(wait) if isinstance(wait, int | float) else failure.retry_after
    assert failure.error is not None
    error = msgspec.structs.replace(failure.error, retryable=retryable)
    return SendResult(ok=False, retryable=retryable, retry_after=retry_after, error=error)


def _unreadable_success(response: HttpResponse) -> SendResult:
    # The call may have gone through; retrying could send twice, so this is a final, reported failure.
    body = response.body.decode("utf-8", "replace")
    error = c.Error(code="telegram_unreadable", message="a 2xx answer without a Bot API body", native=body)
    return SendResult(ok=False, error=error)
