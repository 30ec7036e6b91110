"""Discord: the interactions endpoint (and a gateway bridge) in, the REST API v10 out.

Inbound, one webhook URL takes three kinds of body, all signed the same way:

* Interactions — what Discord posts to the app's Interactions Endpoint URL: `PING` (Discord checking the
  URL), application commands (slash commands, user and message context-menu commands), message
  components (a button clicked, an option chosen), modal submits and autocomplete requests.
* Gateway dispatches forwarded by a bridge — Discord delivers ordinary messages, edits, deletions and
  reactions only over the Gateway WebSocket, so a bridge process that holds that connection posts each
  dispatch here, `{"op": 0, "t": "MESSAGE_CREATE", "s": 42, "d": {...}}`, or just the message object.
  MESSAGE_CREATE, MESSAGE_UPDATE (an edit), MESSAGE_DELETE, MESSAGE_REACTION_ADD/REMOVE and
  INTERACTION_CREATE are decoded; any other event is kept whole as `unsupported`.
* Webhook events — what Discord posts to the app's Webhook Events URL (APPLICATION_AUTHORIZED, …):
  kept whole as `unsupported`.

Every request is signed with Ed25519 over `X-Signature-Timestamp` + the raw body (hex signature in
`X-Signature-Ed25519`), verified with the application's public key (`secrets["public_key"]`, hex). A
gateway bridge cannot sign with Discord's key: it signs the same way with a key of its own, whose public
half is `secrets["bridge_public_key"]`. Discord documents no timestamp window; requests more than five
minutes away from their arrival are refused as replays, as for Slack.

Discord wants an answer to every interaction within 3 seconds. The hub records the raw interaction
first, then answers with `handshake`: PONG to a PING; otherwise a deferred response, so that the app can
reply at its own pace — DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE (type 5, "… is thinking") for commands and
for modals submitted from a command, DEFERRED_UPDATE_MESSAGE (type 6, nothing shown) for components and
for modals opened from one, and an empty choice list for autocomplete (the app cannot answer in time).
Webhook events get the 204 they expect. Interactions a bridge forwards from the gateway are answered by
the bridge (the gateway takes no inline answer), so they get no handshake. With `mode = "discord_gateway"`
the hub holds the gateway itself (`babelhub.sources.discord_gateway`): no bridge, and it answers them.

Ids: every Discord id is a snowflake. A message is addressed by its channel and its id, so the native
message id is `"{channel_id}:{message_id}"` — the form `parse_response` gives our sent messages too, so a
reaction, reply or click on one of them refers to it. An interaction is not a message: its envelope's
native id is `"{channel_id}:interaction:{id}"` and its time the one inside the snowflake. The
conversation is the channel (a thread is a channel of its own, of type "thread"); a DM is "direct", a
group DM "group", a guild channel "channel". Interaction envelopes keep in meta what a reply needs:
`discord.interaction_token` (valid 15 minutes) and `discord.application_id`. The interaction token is a
credential: for those 15 minutes it lets whoever holds it post follow-ups and edit the interaction's
messages as the app, without the bot token. It is kept in meta on purpose (apps need it to answer), so
it is published, with the envelope, to every processor of the tenant; treat those as trusted. The
gateway also echoes the bot's own messages and reactions; with `options["bot_user_id"]` set they are
never re-ingested.

Outbound, content parts become `POST /channels/{to}/messages`. Discord shows a message's content first,
then its embeds (up to 10), then its action rows (up to 5), so consecutive parts share one message as
long as that keeps their order; a part that would show above an earlier one starts the next message.
Text is content (Markdown, up to 2,000 characters); buttons are action rows of up to 5 (reply/postback →
style 1 with the id, or a postback's value, as `custom_id`; url → style 5); a list is one string select
per section (option value = row id); a card is an embed (title, description, image) followed by its
buttons; an image by URL is an embed image, another file by URL a link in the content (uploading bytes
needs multipart, out of scope). `allowed_mentions` is `{"parse": []}` unless `options["allowed_mentions"]`
says otherwise, so nothing a message quotes pings anyone. A `nonce` derived from the idempotency key with
`enforce_nonce` makes Discord itself return the first message when a create is retried. `reply_to`
becomes a `message_reference` (with `fail_if_not_exists: false`: the reply still goes out if the
original was deleted). A reaction is `PUT`/`DELETE .../reactions/{emoji}/@me`, a delete `DELETE`, an
edit `PATCH` of the message with the new content; typing is `POST /channels/{to}/typing`.

Every id that goes into a path (`to`, the channel and message of a native id, the application id) must
be a snowflake, digits only, and the interaction token is escaped: a `to` such as `123/invites?` would
otherwise call another endpoint. Nothing is sent that Discord would refuse for its length: labels
(button 80, option label and description 100, placeholder 150, embed title 256) are cut with an
ellipsis; content over 2,000 characters, an embed description over 4,096 and ids over their limits
are refused (degradation splits text, moving a buttons' or list's longer text before them:
`choice_text_limit`); embeds over 6,000 characters together go into the next message. Media are shown
by url only: a file with only a file id (Discord's attachment ids cannot be sent again) or only bytes
is refused, in a card too.

Replies to an interaction: when the outbound message's meta holds `discord.interaction_token` (copy it,
with `discord.application_id`, from the inbound interaction; `options["application_id"]` also serves),
its content goes to the interaction's webhook, `POST /webhooks/{application_id}/{token}`: a follow-up,
which needs no bot token and works where the bot cannot post (user-installed apps). After a deferred
command the first follow-up replaces the "thinking" message (Discord calls this behaviour deprecated in
favour of editing `@original`, but still documents it). Without the token a reply to an interaction is
posted to the channel with no `message_reference` (there is no message to point at).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, ClassVar, Final, TypeAlias
from urllib.parse import quote, urlencode

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from babelhub import __version__
from babelhub import canonical as c
from babelhub.codecs import native
from babelhub.codecs.base import (
    Capabilities,
    Codec,
    DecodeContext,
    DirectoryItem,
    DirectoryKind,
    DirectoryPage,
    EncodeContext,
    HttpRequest,
    HttpResponse,
    ItemKind,
    OutboundRequest,
    SendResult,
    offset_cursor,
    page_of,
)
from babelhub.codecs.settings import ConnectionOptions, Settings
from babelhub.errors import DecodeError, EncodeError, SignatureError

__all__ = ["DEFAULT_INTENTS", "DiscordCodec", "DiscordOptions", "DiscordSecrets", "reaction_emoji", "snowflake_time"]

CHANNEL: Final = "discord"

#: Discord documents no window; this one refuses replays of old requests, as for Slack.
SIGNATURE_WINDOW_SECONDS: Final = 300

#: Discord asks every HTTP API client to name itself this way ("DiscordBot ($url, $versionNumber)").
USER_AGENT: Final = f"DiscordBot (https://babelhub.dev, {__version__})"

TEXT_LIMIT: Final = 2000  # message content
MAX_EMBEDS: Final = 10
MAX_ACTION_ROWS: Final = 5
MAX_ROW_BUTTONS: Final = 5
MAX_SELECT_OPTIONS: Final = 25
MAX_CUSTOM_ID: Final = 100
NONCE_LENGTH: Final = 25
# Discord's documented lengths ("Embed Limits", "Button", "String Select" structures), in characters.
EMBED_TITLE_LIMIT: Final = 256
EMBED_DESCRIPTION_LIMIT: Final = 4096
EMBEDS_TOTAL_LIMIT: Final = 6000  # all embeds of one message together
BUTTON_LABEL_LIMIT: Final = 80
BUTTON_URL_LIMIT: Final = 512
OPTION_TEXT_LIMIT: Final = 100  # a select option's label, value and description
PLACEHOLDER_LIMIT: Final = 150

#: A snowflake as ids are written in paths: an unsigned 64-bit number in decimal.
_SNOWFLAKE: Final = re.compile(r"[0-9]{1,20}")

#: The first millisecond of 2015: snowflakes count their time from it.
DISCORD_EPOCH_MS: Final = 1_420_070_400_000

# Interaction types
PING: Final = 1
APPLICATION_COMMAND: Final = 2
MESSAGE_COMPONENT: Final = 3
AUTOCOMPLETE: Final = 4
MODAL_SUBMIT: Final = 5

# Interaction callback types (the answers to an interaction)
PONG: Final = 1
DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE: Final = 5
DEFERRED_UPDATE_MESSAGE: Final = 6
AUTOCOMPLETE_RESULT: Final = 8

# Application command types and option types
MESSAGE_COMMAND: Final = 3
SUB_COMMAND: Final = 1
SUB_COMMAND_GROUP: Final = 2

# Component types and button styles
ACTION_ROW: Final = 1
BUTTON: Final = 2
STRING_SELECT: Final = 3
PRIMARY: Final = 1
LINK: Final = 5

#: Message types whose content is an ordinary message: DEFAULT, REPLY, CHAT_INPUT_COMMAND and
#: CONTEXT_MENU_COMMAND (the last two are bots' answers to commands). The rest are system messages.
_CONTENT_TYPES: Final = frozenset({0, 19, 20, 23})
REPLY: Final = 19
CONTEXT_MENU_COMMAND: Final = 23
FORWARD: Final = 1  # message reference type

IS_VOICE_MESSAGE: Final = 1 << 13  # message flag

#: JSON error codes that say "later" rather than "never": slowmode, write rate limits, a rate-limited
#: service resource, "not yet available" and "overloaded".
_TRANSIENT_CODES: Final = frozenset({20016, 20028, 20029, 40062, 110000, 110001, 130000})

Json: TypeAlias = dict[str, Any]
"""A Discord JSON object as the API takes it."""


# -------------------------------------------------------------------------------------- wire format
# Only the fields this codec reads; the rest is kept in meta or in `unsupported` parts. Discord ids are
# snowflakes serialized as strings.


class _User(msgspec.Struct):
    id: str
    username: str = ""
    global_name: str | None = None
    bot: bool = False


class _Member(msgspec.Struct):
    user: _User | None = None
    nick: str | None = None


class _Attachment(msgspec.Struct):
    id: str
    filename: str = ""
    url: str = ""
    content_type: str | None = None
    size: int = 0
    width: int | None = None
    height: int | None = None
    duration_secs: float | None = None
    description: str | None = None


class _StickerItem(msgspec.Struct):
    id: str
    name: str = ""
    format_type: int = 1


class _Reference(msgspec.Struct):
    type: int = 0
    message_id: str | None = None
    channel_id: str | None = None
    guild_id: str | None = None


class _Message(msgspec.Struct):
    """A message object, as in MESSAGE_CREATE / MESSAGE_UPDATE (with their extra fields)."""

    id: str
    channel_id: str
    author: _User
    timestamp: str  # ISO 8601, read by `native.parse_time`
    content: str = ""
    type: int = 0
    flags: int = 0
    edited_timestamp: str | None = None
    guild_id: str | None = None
    channel_type: int | None = None
    member: _Member | None = None
    webhook_id: str | None = None
    mentions: list[_User] = []
    attachments: list[Any] = []
    """Each read on its own (`_Attachment`, `_StickerItem`): one unreadable file is an Unsupported part."""
    sticker_items: list[Any] = []
    message_reference: _Reference | None = None


class _Channel(msgspec.Struct):
    id: str = ""
    type: int | None = None


class _SourceMessage(msgspec.Struct):
    """The message a component was on (only its ids are read)."""

    id: str
    channel_id: str = ""


class _Interaction(msgspec.Struct):
    id: str
    type: int
    token: str
    application_id: str = ""  # always sent, though some of Discord's own examples leave it out
    data: dict[str, Any] = {}
    guild_id: str | None = None
    channel_id: str | None = None
    channel: _Channel | None = None
    member: _Member | None = None
    user: _User | None = None
    message: _SourceMessage | None = None


class _Option(msgspec.Struct):
    name: str
    type: int
    value: Any = None
    options: list[_Option] = []


class _CommandData(msgspec.Struct):
    name: str
    type: int = 1
    options: list[_Option] = []
    target_id: str | None = None


class _ComponentData(msgspec.Struct):
    custom_id: str
    component_type: int
    values: list[str] = []


class _ModalData(msgspec.Struct):
    custom_id: str
    components: list[Any] = []


class _Dispatch(msgspec.Struct):
    """A gateway event payload."""

    t: str | None = None
    d: Any = None
    s: int | None = None


class _DeleteEvent(msgspec.Struct):
    id: str
    channel_id: str
    guild_id: str | None = None


class _Emoji(msgspec.Struct):
    id: str | None = None
    name: str | None = None
    animated: bool = False


class _ReactionEvent(msgspec.Struct):
    user_id: str
    channel_id: str
    message_id: str
    emoji: _Emoji
    guild_id: str | None = None
    member: _Member | None = None
    burst: bool = False


# ------------------------------------------------------------------------------------------- codec


class DiscordSecrets(Settings, frozen=True, kw_only=True):
    public_key: str
    """The application's public key (hex, from the Developer Portal): interactions are signed with it."""
    bot_token: str
    """The bot's token: REST calls carry it as `Authorization: Bot …`."""
    bridge_public_key: str = ""
    """The public half (hex) of the Ed25519 key a gateway bridge signs what it forwards with."""


# Gateway Intents (Discord's "Gateway Intents" list): which events a gateway session receives.
GUILDS: Final = 1 << 0
GUILD_MESSAGES: Final = 1 << 9
GUILD_MESSAGE_REACTIONS: Final = 1 << 10
DIRECT_MESSAGES: Final = 1 << 12
DIRECT_MESSAGE_REACTIONS: Final = 1 << 13
MESSAGE_CONTENT: Final = 1 << 15
DEFAULT_INTENTS: Final = (GUILDS | GUILD_MESSAGES | GUILD_MESSAGE_REACTIONS | DIRECT_MESSAGES
                          | DIRECT_MESSAGE_REACTIONS | MESSAGE_CONTENT)
"""The events this codec decodes: messages, edits, deletions and reactions in guilds and DMs, with their
content (interactions need no intent)."""


class DiscordOptions(ConnectionOptions, frozen=True, kw_only=True):
    application_id: str = ""
    """The application id interaction replies are posted under when the message's meta names none."""
    bot_user_id: str = ""
    """The bot's own user id: its messages and reactions echoed by the gateway are not taken in again."""
    allowed_mentions: dict[str, Any] = msgspec.field(default_factory=lambda: {"parse": []})
    """Discord's `allowed_mentions` object sent with every message; the default pings nobody."""
    intents: int = DEFAULT_INTENTS
    """With `mode = "discord_gateway"`: the Gateway Intents bits sent when identifying; the default is GUILDS,
    GUILD_MESSAGES, GUILD_MESSAGE_REACTIONS, DIRECT_MESSAGES, DIRECT_MESSAGE_REACTIONS and MESSAGE_CONTENT
    (privileged: enable it in the Developer Portal)."""
    guild_id: str = ""
    """The guild (server) whose channels and members the directory API lists (`/v1/connections/{id}/channels`,
    `/contacts`); unset: they answer 501."""
    gateway_max_frame_bytes: int = 8 * 1024 * 1024
    """With `mode = "discord_gateway"`: the largest gateway frame read; a larger one closes the socket, which is
    resumed."""


class DiscordCodec(Codec):
    """Discord interactions (and a gateway bridge) in, REST API v10 out. See the module docstring."""

    channel: ClassVar[str] = CHANNEL
    secret_settings: ClassVar[type[Settings]] = DiscordSecrets
    option_settings: ClassVar[type[Settings]] = DiscordOptions
    default_api_base: ClassVar[str] = "https://discord.com/api/v10"
    # Global rate limit: a bot can make up to 50 requests per second.
    send_rate: ClassVar[float] = 50.0
    capabilities: ClassVar[Capabilities] = Capabilities(
        parts=frozenset({"text", "media", "buttons", "list", "card", "reaction", "edit", "delete"}),
        # Images show by URL in an embed. Other files can only be uploaded (multipart, out of scope), so
        # degradation sends them as links.
        media=frozenset({"image"}),
        text_limit=TEXT_LIMIT,
        caption_limit=EMBED_DESCRIPTION_LIMIT,  # an image's caption is its embed's description
        choice_text_limit=TEXT_LIMIT,  # buttons' and lists' text is the content of their message
        markup="markdown",
        max_buttons=MAX_ACTION_ROWS * MAX_ROW_BUTTONS,
        max_button_title=BUTTON_LABEL_LIMIT,
        button_actions=frozenset({"reply", "url", "postback"}),
        max_list_rows=MAX_SELECT_OPTIONS,  # options in one string select
        max_list_sections=MAX_ACTION_ROWS,  # one select (one action row) per section
        max_row_title=OPTION_TEXT_LIMIT,  # option label
        max_cards=MAX_EMBEDS,
        reply=True,
        edit=True,
        delete=True,
        reaction=True,
        typing=True,
    )

    # ----------------------------------------------------------------------------------- decode

    def verify(self, request: HttpRequest, secrets: Mapping[str, str]) -> None:
        """Ed25519 over `X-Signature-Timestamp` + raw body, by Discord's key or the bridge's, and a
        timestamp within five minutes of the request's arrival."""
        keys = [key for key in (secrets.get("public_key", ""), secrets.get("bridge_public_key", "")) if key]
        if not keys:
            raise SignatureError("discord: no public_key configured for this connection")
        signature = request.headers.get("x-signature-ed25519", "")
        timestamp = request.headers.get("x-signature-timestamp", "")
        if not signature or not timestamp:
            raise SignatureError("discord: missing X-Signature-Ed25519 or X-Signature-Timestamp header")
        try:
            signed_at = int(timestamp)
            signature_bytes = bytes.fromhex(signature)
        except ValueError:
            raise SignatureError("discord: X-Signature-Timestamp is no number or X-Signature-Ed25519 no hex") from None
        if abs(request.received_at - signed_at) > SIGNATURE_WINDOW_SECONDS:
            raise SignatureError(
                f"discord: request timestamp {signed_at} is more than {SIGNATURE_WINDOW_SECONDS} s away from "
                f"its arrival ({request.received_at:.0f}): stale or replayed"
            )
        signed = timestamp.encode() + request.body
        if not any(_signed_by(key, signature_bytes, signed) for key in keys):
            raise SignatureError("discord: X-Signature-Ed25519 does not match the body")

    def handshake(self, request: HttpRequest, secrets: Mapping[str, str]) -> HttpResponse | None:
        """The answer Discord waits for: PONG to a PING, a deferred response to any other interaction
        (the hub sends it after recording the interaction), 204 to a webhook event."""
        if request.method != "POST":
            return None
        try:
            payload = _read_object(request)
        except DecodeError:
            return None  # decode reports the broken body
        if _is_webhook_event(payload):
            return HttpResponse(status=204, headers={"content-type": "application/json"})  # Discord asks for one
        if not _is_interaction(payload):
            return None  # a bridge's gateway event: the hub's ordinary acknowledgement
        answer = _interaction_answer(payload)
        if answer is None:
            return None
        return HttpResponse(status=200, headers={"content-type": "application/json"}, body=native.json_body(answer))

    def dedup_key(self, request: HttpRequest) -> str:
        """The interaction's id, or the message's id for a new message (bare or MESSAGE_CREATE); other
        gateway events and webhook events carry no id of their own (the hub hashes the body)."""
        payload = _read_object(request)
        if _is_dispatch(payload):
            event = payload.get("d")
            if payload.get("t") in ("MESSAGE_CREATE", "INTERACTION_CREATE") and isinstance(event, dict):
                return native.str_field(event, "id")
            return ""
        if _is_webhook_event(payload):
            return ""
        return native.str_field(payload, "id")

    def decode(self, request: HttpRequest, ctx: DecodeContext) -> list[c.Envelope]:
        payload = _read_object(request)
        decoder = _Decoder.of(ctx, request)
        if _is_dispatch(payload):
            return _decode_dispatch(native.convert(payload, _Dispatch), request, decoder)
        if _is_webhook_event(payload):
            return _webhook_event(payload, decoder)
        if "author" in payload:  # a bare message object: only messages have an author
            return _message_created(native.convert(payload, _Message), payload, "$", decoder)
        return _decode_interaction(native.convert(payload, _Interaction), payload, "$", decoder)

    # ----------------------------------------------------------------------------------- encode

    def encode(self, message: c.Message, ctx: EncodeContext) -> list[OutboundRequest]:
        """The API calls of `message`, in part order: content parts laid out as Discord messages (see
        `_Layout`), each reaction and deletion its own call, an `edit` part turning the content into a
        PATCH of the edited message."""
        encoder = _Encoder(self.api_base(ctx), message, ctx)
        edit = next((part for part in message.parts if isinstance(part, c.Edit)), None)
        if edit is not None and all(isinstance(part, c.Edit | c.Reaction | c.Delete) for part in message.parts):
            raise EncodeError("discord: an edit needs new content to put into the message")
        layout = _Layout()
        for index, part in enumerate(message.parts):
            if isinstance(part, c.Reaction | c.Delete):
                encoder.send(layout, edit)
                layout = _Layout()
                encoder.marker(part)
            elif not isinstance(part, c.Edit):
                layout.add(part, index)
        encoder.send(layout, edit)
        return encoder.requests

    def encode_activity(self, activity: c.Activity, ctx: EncodeContext) -> list[OutboundRequest]:
        """Typing is `POST /channels/{to}/typing` (shown for 10 seconds); Discord has no read marker."""
        if activity.activity != "typing":
            return []
        return [
            OutboundRequest(
                method="POST",
                url=f"{self.api_base(ctx)}/channels/{_channel(ctx)}/typing",
                headers=_bot_headers(ctx),
                idempotency_key=f"{activity.id}:0",
                message_id=activity.id,
            )
        ]

    def safe_to_resend(self, request: OutboundRequest) -> bool:
        """A create carries a `nonce` with `enforce_nonce` (Discord returns the message already made for
        a nonce it saw in the last few minutes); edits, reactions and deletions set rather than add.
        Interaction follow-ups take no nonce."""
        return request.method in ("PATCH", "PUT", "DELETE") or b'"enforce_nonce":true' in request.body

    # ------------------------------------------------------------------------------------ directory

    def directory_request(self, kind: DirectoryKind, ctx: EncodeContext, cursor: str,
                          limit: int) -> OutboundRequest | None:
        """The guild's channels (`GET /guilds/{guild.id}/channels`, the whole list, paged here) or members
        (`GET /guilds/{guild.id}/members?limit&after`, paged by the highest user id so far; needs the
        privileged GUILD_MEMBERS intent). A bot cannot list its DMs ("Get User DMs" returns none to bots),
        so chats are not listed."""
        if kind == "chats":
            return None
        guild = str(ctx.options.get("guild_id", ""))
        if not guild:
            raise EncodeError("set the connection's options.guild_id to the guild to list")
        base = f"{self.api_base(ctx)}/guilds/{guild}"
        if kind == "channels":
            offset_cursor(cursor)
            return OutboundRequest(method="GET", url=f"{base}/channels", headers=_bot_headers(ctx))
        if cursor and not _SNOWFLAKE.fullmatch(cursor):
            raise ValueError("a member cursor is a user id")
        query = {"limit": str(limit), **({"after": cursor} if cursor else {})}
        return OutboundRequest(method="GET", url=f"{base}/members?{urlencode(query)}", headers=_bot_headers(ctx))

    def parse_directory(self, kind: DirectoryKind, request: OutboundRequest, response: HttpResponse,
                        cursor: str, limit: int) -> DirectoryPage:
        listed = native.read_json(response)
        if not isinstance(listed, list):
            raise DecodeError("a list of guild channels or members is a JSON array", path="$")
        if kind == "channels":
            items = [_directory_channel(raw, f"$[{index}]") for index, raw in enumerate(listed)]
            return page_of(items, cursor, limit)
        items = [_directory_member(raw, f"$[{index}]") for index, raw in enumerate(listed)]
        # A full page may be followed by more: the next one starts after the highest user id seen.
        last = max((item.id for item in items), key=int) if items and len(items) >= limit else ""
        return DirectoryPage(items=items, next_cursor=last)

    def parse_response(self, request: OutboundRequest, response: HttpResponse) -> SendResult:
        """Success: the message object (creates, edits, follow-ups) or 204 (reactions, deletes, typing).
        Failure: `{"code", "message", "errors"}`; 429 adds `retry_after` (seconds) and `global`."""
        try:
            answer = msgspec.json.decode(response.body) if response.body else None
        except msgspec.DecodeError:
            answer = None
        if 200 <= response.status < 300:
            return SendResult(ok=True, native_ids=_sent_ids(answer))
        if not isinstance(answer, dict):
            return native.http_failure(response)  # not Discord talking (a proxy's page, an empty body)
        return _api_failure(response, answer)


def snowflake_time(snowflake: str, path: str = "$") -> datetime:
    """When a snowflake id was made: its top 42 bits count milliseconds since the Discord epoch."""
    return native.from_unix(((int(snowflake) >> 22) + DISCORD_EPOCH_MS) / 1000, path)


def reaction_emoji(emoji: str) -> str:
    """An emoji as the reactions endpoints take it in their path: a Unicode emoji URL-encoded, a custom
    emoji (`<:name:id>`, `<a:name:id>` or `name:id`) as `name:id`."""
    custom = _CUSTOM_EMOJI.fullmatch(emoji)
    value = f"{custom['name']}:{custom['id']}" if custom else emoji
    if not value.strip("."):
        raise EncodeError(f"discord: {emoji!r} is no emoji")
    return quote(value, safe=":")


def _signed_by(public_key: str, signature: bytes, signed: bytes) -> bool:
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key))
    except ValueError:
        raise SignatureError("discord: the configured public key is not a 32-byte hex Ed25519 key") from None
    try:
        key.verify(signature, signed)
    except InvalidSignature:
        return False
    return True


# ------------------------------------------------------------------------------------ reading bodies


def _read_object(request: HttpRequest) -> Json:
    body = native.read_json(request)
    if not isinstance(body, dict):
        raise DecodeError("a Discord body is a JSON object", path="$")
    return body


def _is_dispatch(payload: Json) -> bool:
    """A gateway event payload: `{"op", "t", "s", "d"}`."""
    return "t" in payload and "d" in payload


def _is_webhook_event(payload: Json) -> bool:
    """A webhook event: `{"version", "application_id", "type": 0 (PING) | 1, "event"}`. Interactions
    carry a `version` too, but always with a token; messages have no `version`."""
    return "version" in payload and "token" not in payload and "author" not in payload


def _is_interaction(payload: Json) -> bool:
    return "token" in payload and isinstance(payload.get("type"), int)


def _interaction_answer(payload: Json) -> Json | None:
    kind = payload.get("type")
    if kind == PING:
        return {"type": PONG}
    if kind == APPLICATION_COMMAND:
        return {"type": DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE}
    if kind == MESSAGE_COMPONENT:
        return {"type": DEFERRED_UPDATE_MESSAGE}
    if kind == MODAL_SUBMIT:
        # Updating the message is only allowed when a component (on that message) opened the modal.
        from_component = isinstance(payload.get("message"), dict)
        return {"type": DEFERRED_UPDATE_MESSAGE if from_component else DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE}
    if kind == AUTOCOMPLETE:
        return {"type": AUTOCOMPLETE_RESULT, "data": {"choices": []}}
    return None


def _object(raw: Mapping[str, Any], key: str) -> Json:
    value = raw.get(key)
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------------------------- decoding: helpers

#: Channel types with a conversation type of their own; any other guild channel is a "channel".
_CHAT_TYPES: Final[dict[int, c.ConversationType]] = {1: "direct", 3: "group", 10: "thread", 11: "thread", 12: "thread"}


def _chat_type(channel_type: int | None, in_guild: bool) -> c.ConversationType:
    if channel_type is not None and channel_type in _CHAT_TYPES:
        return _CHAT_TYPES[channel_type]
    return "channel" if in_guild else "direct"


def _display_name(user: _User, member: _Member | None = None) -> str:
    """How Discord shows a person: the server nickname, else the display name, else the username."""
    return (member.nick if member else None) or user.global_name or user.username


@dataclass(frozen=True)
class _Decoder:
    """What every envelope of one decode shares: whose connection, when it arrived, who "we" are."""

    tenant: str
    connection: str
    seq: int
    received: datetime
    own_user: str

    @classmethod
    def of(cls, ctx: DecodeContext, request: HttpRequest) -> _Decoder:
        own = ctx.options.get("bot_user_id")
        own_user = own if isinstance(own, str) else ""
        return cls(ctx.tenant, ctx.connection, ctx.seq, native.from_unix(request.received_at), own_user)

    def is_own(self, user: str) -> bool:
        return bool(self.own_user) and user == self.own_user

    def message_id(self, chat: str, message: str) -> str:
        return c.message_id(self.tenant, self.connection, f"{chat}:{message}")

    def person(self, user: str) -> str:
        return c.sender_id(self.tenant, self.connection, user)

    def sender(self, user: _User, member: _Member | None = None, role: c.Role = "user") -> c.Sender:
        return native.sender(
            self, user.id,
            name=_display_name(user, member),
            role="bot" if user.bot else role,
            handle=user.username,
        )

    def envelope(
        self,
        *,
        native_id: str,
        chat: str,
        chat_type: c.ConversationType,
        ts: datetime,
        sender: c.Sender | None,
        parts: list[c.Part],
        reply_to: str = "",
        meta: dict[str, Any] | None = None,
    ) -> c.Message:
        return c.Message(
            id=c.message_id(self.tenant, self.connection, native_id),
            tenant=self.tenant,
            conversation=native.conversation(self, CHANNEL, chat, chat_type),
            ts=ts,
            sender=sender,
            native=c.Native(id=native_id, seq=self.seq),
            reply_to=reply_to,
            meta=meta or {},
            parts=parts,
        )


# ---------------------------------------------------------------------------------- decoding: messages


def _decode_dispatch(dispatch: _Dispatch, request: HttpRequest, decoder: _Decoder) -> list[c.Envelope]:
    event, kind = dispatch.d, dispatch.t
    if kind == "MESSAGE_CREATE":
        return _message_created(native.convert(event, _Message, "$.d"), event, "$.d", decoder)
    if kind == "MESSAGE_UPDATE" and isinstance(event, dict) and event.get("edited_timestamp"):
        return _message_edited(native.convert(event, _Message, "$.d"), event, "$.d", decoder)
    if kind == "MESSAGE_DELETE":
        return [_message_deleted(native.convert(event, _DeleteEvent, "$.d"), decoder)]
    if kind in ("MESSAGE_REACTION_ADD", "MESSAGE_REACTION_REMOVE"):
        return _reaction(native.convert(event, _ReactionEvent, "$.d"), kind, dispatch.s, decoder)
    if kind == "INTERACTION_CREATE":
        return _decode_interaction(native.convert(event, _Interaction, "$.d"), event, "$.d", decoder)
    # Anything else (a MESSAGE_UPDATE that only resolved link previews, guild events, …) is kept whole.
    return [_unsupported_dispatch(dispatch, request, decoder)]


def _message_created(message: _Message, raw: Json, root: str, decoder: _Decoder) -> list[c.Envelope]:
    ts = native.parse_time(message.timestamp, f"{root}.timestamp")
    if decoder.is_own(message.author.id):
        return []  # our own message, echoed back by the gateway: never re-ingested
    parts, meta = _content(message, raw, decoder)
    return [
        decoder.envelope(
            native_id=f"{message.channel_id}:{message.id}",
            chat=message.channel_id,
            chat_type=_message_chat_type(message),
            ts=ts,
            sender=_author(message, decoder),
            parts=parts,
            reply_to=_replied(message, decoder),
            meta=meta,
        )
    ]


def _message_edited(message: _Message, raw: Json, root: str, decoder: _Decoder) -> list[c.Envelope]:
    """MESSAGE_UPDATE with an `edited_timestamp`: an Edit marker followed by the new content."""
    native.parse_time(message.timestamp, f"{root}.timestamp")
    if decoder.is_own(message.author.id) or message.edited_timestamp is None:
        return []
    edited = native.parse_time(message.edited_timestamp, f"{root}.edited_timestamp")
    parts, meta = _content(message, raw, decoder)
    return [
        decoder.envelope(
            native_id=f"{message.channel_id}:{message.id}:edited:{edited.isoformat()}",
            chat=message.channel_id,
            chat_type=_message_chat_type(message),
            ts=edited,
            sender=_author(message, decoder),
            parts=[c.Edit(target=decoder.message_id(message.channel_id, message.id)), *parts],
            meta=meta,
        )
    ]


def _message_deleted(event: _DeleteEvent, decoder: _Decoder) -> c.Message:
    """MESSAGE_DELETE: a Delete marker. Discord does not say who deleted it, nor when (arrival time)."""
    return decoder.envelope(
        native_id=f"{event.channel_id}:{event.id}:deleted",
        chat=event.channel_id,
        chat_type=_chat_type(None, event.guild_id is not None),
        ts=decoder.received,
        sender=None,
        parts=[c.Delete(target=decoder.message_id(event.channel_id, event.id))],
    )


def _reaction(event: _ReactionEvent, kind: str, sequence: int | None, decoder: _Decoder) -> list[c.Envelope]:
    if decoder.is_own(event.user_id):
        return []  # our own reaction, echoed back
    removed = kind == "MESSAGE_REACTION_REMOVE"
    emoji = _emoji_text(event.emoji)
    member_user = event.member.user if event.member else None
    person = member_user or _User(id=event.user_id)
    meta: dict[str, Any] = {"discord.burst": True} if event.burst else {}
    # Reactions have no id of their own; the gateway's sequence number tells a re-added reaction apart.
    native_id = f"{event.channel_id}:{event.message_id}:reaction:{event.user_id}:{emoji}"
    native_id += ":removed" if removed else ":added"
    if sequence is not None:
        native_id += f":{sequence}"
    return [
        decoder.envelope(
            native_id=native_id,
            chat=event.channel_id,
            chat_type=_chat_type(None, event.guild_id is not None),
            ts=decoder.received,
            sender=decoder.sender(person, event.member),
            parts=[
                c.Reaction(emoji=emoji, target=decoder.message_id(event.channel_id, event.message_id), removed=removed)
            ],
            meta=meta,
        )
    ]


def _emoji_text(emoji: _Emoji) -> str:
    """A Unicode emoji as itself, a custom one the way message content writes it: `<:name:id>`."""
    if emoji.id:
        return f"<{'a' if emoji.animated else ''}:{emoji.name or '_'}:{emoji.id}>"
    return emoji.name or ""


def _unsupported_dispatch(dispatch: _Dispatch, request: HttpRequest, decoder: _Decoder) -> c.Message:
    event = dispatch.d if isinstance(dispatch.d, dict) else {}
    chat = native.str_field(event, "channel_id") or native.str_field(event, "guild_id") or native.str_field(event, "id")
    user = event.get("user") or event.get("author")
    user_id = user.get("id") if isinstance(user, dict) else event.get("user_id")
    return decoder.envelope(
        native_id=f"{chat}:{dispatch.t}:{c.stable_id(request.body.decode('utf-8', 'replace'))}",
        chat=chat,
        chat_type=_chat_type(None, "guild_id" in event),
        ts=decoder.received,
        sender=decoder.sender(_User(id=user_id)) if isinstance(user_id, str) and user_id else None,
        parts=[c.Unsupported(reason=f"discord gateway event {dispatch.t}", native=dispatch.d)],
    )


def _message_chat_type(message: _Message) -> c.ConversationType:
    """From MESSAGE_CREATE's `channel_type` when present; else a message with a guild is in a guild
    channel and one without is a DM. MESSAGE_CREATE always names the guild of a guild message; a bare
    message object may only show it in its reference (replies and crossposts are guild messages)."""
    reference = message.message_reference
    in_guild = message.guild_id is not None or message.member is not None
    return _chat_type(message.channel_type, in_guild or (reference is not None and reference.guild_id is not None))


def _author(message: _Message, decoder: _Decoder) -> c.Sender:
    role: c.Role = "bot" if message.webhook_id else "user"
    return decoder.sender(message.author, message.member, role)


def _replied(message: _Message, decoder: _Decoder) -> str:
    """A reply (type 19) and a context-menu command's message (type 23) point at their message; other
    references (crossposts, pins, forwards) say where content came from and stay in meta."""
    reference = message.message_reference
    if message.type not in (REPLY, CONTEXT_MENU_COMMAND) or reference is None or not reference.message_id:
        return ""
    return decoder.message_id(reference.channel_id or message.channel_id, reference.message_id)


#: Sticker format types → the file Discord serves: PNG, APNG, Lottie (JSON), GIF.
_STICKER_FILES: Final[dict[int, tuple[str, str]]] = {
    1: ("png", "image/png"),
    2: ("png", "image/png"),
    3: ("json", "application/json"),
    4: ("gif", "image/gif"),
}


def _content(message: _Message, raw: Json, decoder: _Decoder) -> tuple[list[c.Part], dict[str, Any]]:
    """A message's text, files and stickers as parts. Embeds with content of their own (`rich`),
    components, polls and forwarded snapshots become `unsupported` parts; link previews and
    references go to meta."""
    meta: dict[str, Any] = {}
    if message.guild_id:
        meta["discord.guild_id"] = message.guild_id
    if message.type not in _CONTENT_TYPES:
        return [c.Unsupported(reason=f"discord message type {message.type}", native=raw)], meta
    parts: list[c.Part] = []
    if message.content:
        text = _mentions_resolved(message.content, message.mentions, decoder)
        parts.append(text)
        if text.text != message.content:
            meta["discord.content"] = message.content  # the original, with <@id> mentions
    voice = bool(message.flags & IS_VOICE_MESSAGE)
    for n, attachment in enumerate(message.attachments):
        read = partial(_attachment, attachment, f"attachments[{n}]", voice)
        parts.extend(native.lenient_parts(read, attachment, "discord attachment"))
    for n, item in enumerate(message.sticker_items):
        parts.extend(native.lenient_parts(partial(_sticker, item, f"sticker_items[{n}]"), item, "discord sticker"))
    previews = []
    for embed in native.list_field(raw, "embeds"):
        if isinstance(embed, dict) and embed.get("type", "rich") != "rich":
            previews.append(embed)  # link previews Discord generated from the content
        else:
            parts.append(c.Unsupported(reason="discord embed", native=embed))
    if previews:
        meta["discord.embeds"] = previews
    if native.list_field(raw, "components"):
        parts.append(c.Unsupported(reason="discord components", native=raw["components"]))
    if isinstance(raw.get("poll"), dict):
        parts.append(c.Unsupported(reason="discord poll", native=raw["poll"]))
    for snapshot in native.list_field(raw, "message_snapshots"):
        parts.append(c.Unsupported(reason="discord forwarded message", native=snapshot))
    reference = raw.get("message_reference")
    if isinstance(reference, dict) and message.type not in (REPLY, CONTEXT_MENU_COMMAND):
        meta["discord.message_reference"] = reference
    if native.list_field(raw, "reactions"):
        meta["discord.reactions"] = raw["reactions"]  # the counts so far (a fetched message carries them)
    return parts, meta


_USER_MENTION: Final = re.compile(r"<@!?(?P<user>\d+)>")


def _mentions_resolved(content: str, mentioned: list[_User], decoder: _Decoder) -> c.Text:
    """Markdown content with `<@id>` user mentions written as `@name`, each with a Mention (offset and
    length in code points). Role, channel and emoji tokens are left as Discord wrote them."""
    names = {user.id: user.global_name or user.username for user in mentioned}
    pieces: list[str] = []
    mentions: list[c.Mention] = []
    written = cursor = 0
    for match in _USER_MENTION.finditer(content):
        before = content[cursor : match.start()]
        pieces.append(before)
        written += len(before)
        user = match["user"]
        shown = "@" + (names.get(user) or user)
        mentions.append(
            c.Mention(
                id=decoder.person(user), native_id=user, name=names.get(user, ""), offset=written, length=len(shown)
            )
        )
        pieces.append(shown)
        written += len(shown)
        cursor = match.end()
    pieces.append(content[cursor:])
    return c.Text(text="".join(pieces), format="markdown", mentions=mentions)


def _attachment(raw: Any, where: str, voice_message: bool) -> c.Media:
    attachment = native.convert(raw, _Attachment, where)
    mime = attachment.content_type or ""
    kind = native.media_kind(mime)
    if voice_message and kind == "audio":
        kind = "voice"
    duration = attachment.duration_secs
    return c.Media(
        media=kind,
        url=attachment.url,
        file_id=attachment.id,
        mime=mime,
        size=attachment.size,
        filename=attachment.filename,
        caption=attachment.description or "",  # the file's alt text
        duration_ms=round(duration * 1000) if duration else 0,
        width=attachment.width or 0,
        height=attachment.height or 0,
    )


def _sticker(raw: Any, where: str) -> c.Media:
    """Stickers are served from Discord's CDN by id (GIF stickers from the media host)."""
    item = native.convert(raw, _StickerItem, where)
    extension, mime = _STICKER_FILES.get(item.format_type, ("png", "image/png"))
    host = "https://media.discordapp.net" if extension == "gif" else "https://cdn.discordapp.com"
    return c.Media(
        media="sticker",
        url=f"{host}/stickers/{item.id}.{extension}",
        file_id=item.id,
        mime=mime,
        filename=f"{item.name}.{extension}",
    )


def _webhook_event(payload: Json, decoder: _Decoder) -> list[c.Envelope]:
    """A webhook event, kept whole; its PING (type 0) only checks the URL."""
    if payload.get("type") == 0:
        return []
    event = _object(payload, "event")
    kind = native.str_field(event, "type")
    user_id = native.str_field(_object(_object(event, "data"), "user"), "id")
    application = native.str_field(payload, "application_id")
    timestamp = native.str_field(event, "timestamp")
    ts = native.parse_time(timestamp, "$.event.timestamp") if timestamp else decoder.received
    return [
        decoder.envelope(
            native_id=f"{application}:event:{kind}:{timestamp}:{user_id}",
            chat=application,
            chat_type="direct",
            ts=ts,
            sender=decoder.sender(_User(id=user_id)) if user_id else None,
            parts=[c.Unsupported(reason=f"discord webhook event {kind}", native=payload)],
        )
    ]


# ------------------------------------------------------------------------------- decoding: interactions


def _decode_interaction(interaction: _Interaction, raw: Json, root: str, decoder: _Decoder) -> list[c.Envelope]:
    if interaction.type == PING:
        return []  # Discord checking the URL, answered by `handshake`
    chat = interaction.channel_id or (interaction.channel.id if interaction.channel else "")
    if not chat:
        raise DecodeError("an interaction needs `channel_id`", path=f"{root}.channel_id")
    member = interaction.member
    user = (member.user if member else None) or interaction.user
    if user is None:
        raise DecodeError("an interaction needs `member.user` or `user`", path=f"{root}.user")
    meta: dict[str, Any] = {"discord.interaction_id": interaction.id, "discord.interaction_token": interaction.token}
    if interaction.application_id:
        meta["discord.application_id"] = interaction.application_id
    if interaction.guild_id:
        meta["discord.guild_id"] = interaction.guild_id
    data, data_path = interaction.data, f"{root}.data"
    reply_to = ""
    parts: list[c.Part]
    if interaction.type == APPLICATION_COMMAND:
        command = native.convert(data, _CommandData, data_path)
        parts = [c.Text(text=_command_text(command))]
        meta["discord.command"] = _command_meta(command, data)
        if command.type == MESSAGE_COMMAND and command.target_id:
            reply_to = decoder.message_id(chat, command.target_id)  # the message the command was used on
    elif interaction.type == MESSAGE_COMPONENT:
        component = native.convert(data, _ComponentData, data_path)
        parts = list(_component_actions(component, interaction, raw, chat, decoder))
        meta["discord.component"] = data
    elif interaction.type == MODAL_SUBMIT:
        parts = [_form(native.convert(data, _ModalData, data_path))]
    elif interaction.type == AUTOCOMPLETE:
        parts = [c.Unsupported(reason="discord autocomplete", native=data)]
    else:
        parts = [c.Unsupported(reason=f"discord interaction type {interaction.type}", native=raw)]
    if isinstance(data.get("resolved"), dict):
        meta["discord.resolved"] = data["resolved"]  # the users, roles, channels, files the data names
    channel_type = interaction.channel.type if interaction.channel else None
    return [
        decoder.envelope(
            native_id=f"{chat}:interaction:{interaction.id}",
            chat=chat,
            chat_type=_chat_type(channel_type, interaction.guild_id is not None),
            ts=_interaction_time(interaction.id, f"{root}.id"),
            sender=decoder.sender(user, member),
            parts=parts,
            reply_to=reply_to,
            meta=meta,
        )
    ]


def _interaction_time(snowflake: str, path: str) -> datetime:
    """Interactions carry no timestamp: their id's snowflake says when Discord made them."""
    if not _SNOWFLAKE.fullmatch(snowflake):
        raise DecodeError(f"{snowflake!r} is not a snowflake", path=path)
    return snowflake_time(snowflake, path)


def _command_text(command: _CommandData) -> str:
    """What the user ran, as Discord shows it: `/name [group] [subcommand] option=value …`."""
    words = [f"/{command.name}"]
    options = command.options
    while len(options) == 1 and options[0].type in (SUB_COMMAND, SUB_COMMAND_GROUP):
        words.append(options[0].name)
        options = options[0].options
    words.extend(f"{option.name}={_option_value(option.value)}" for option in options)
    return " ".join(words)


def _option_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _command_meta(command: _CommandData, data: Json) -> Json:
    meta: Json = {"name": command.name, "type": command.type, "options": native.list_field(data, "options")}
    if command.target_id:
        meta["target_id"] = command.target_id
    return meta


def _component_actions(
    component: _ComponentData, interaction: _Interaction, raw: Json, chat: str, decoder: _Decoder
) -> list[c.Action]:
    """A button click is one Action (its custom_id); a select, one Action per chosen value. Titles come
    from the component's definition on the message it was on."""
    source_message = interaction.message
    source = decoder.message_id(source_message.channel_id or chat, source_message.id) if source_message else ""
    message = raw.get("message")
    definition = _find_component(message.get("components") if isinstance(message, dict) else None, component.custom_id)
    if not component.values:
        return [c.Action(id=component.custom_id, title=native.str_field(definition, "label"), source=source)]
    # The definition is the message as the interaction quotes it: an option whose value is no string
    # (a list, an object) labels nothing, rather than breaking the lookup.
    labels = {
        option["value"]: native.str_field(option, "label")
        for option in native.list_field(definition, "options")
        if isinstance(option, dict) and isinstance(option.get("value"), str)
    }
    return [c.Action(id=value, title=labels.get(value, ""), source=source) for value in component.values]


def _find_component(components: Any, custom_id: str) -> Json:
    """The component with `custom_id`, wherever it sits (action rows, sections' accessories,
    containers); empty when the message does not show it."""
    if isinstance(components, list):
        for component in components:
            found = _find_component(component, custom_id)
            if found:
                return found
    elif isinstance(components, dict):
        if components.get("custom_id") == custom_id:
            return components
        for key in ("components", "accessory", "component"):
            found = _find_component(components.get(key), custom_id)
            if found:
                return found
    return {}


#: Component types a modal returns values for → the FormField kind.
_INPUT_KINDS: Final[dict[int, str]] = {
    3: "select",
    4: "text",
    5: "user",
    6: "role",
    7: "mentionable",
    8: "channel",
    19: "file",
    21: "radio",
    22: "checkboxes",
    23: "checkbox",
}


def _form(modal: _ModalData) -> c.Form:
    return c.Form(id=modal.custom_id, fields=[answer for part in modal.components for answer in _form_fields(part)])


def _form_fields(component: Any) -> list[c.FormField]:
    """The values in one submitted modal component. A label wraps one input (`component`), a legacy
    action row several (`components`); text displays hold no value. A text input, radio group or
    checkbox answers `value`; selects, checkbox groups and file uploads answer `values`."""
    if not isinstance(component, dict):
        return []
    if "component" in component:
        return _form_fields(component["component"])
    if "components" in component:
        return [answer for child in native.list_field(component, "components") for answer in _form_fields(child)]
    custom_id = component.get("custom_id")
    if not isinstance(custom_id, str):
        return []
    kind = component.get("type")
    name = _INPUT_KINDS.get(kind, f"component_{kind}") if isinstance(kind, int) else "unknown"
    value = component["value"] if "value" in component else component.get("values")
    return [c.FormField(id=custom_id, kind=name, value=value)]


# ----------------------------------------------------------------------------------- encoding: layout


def _embed_size(embed: Json) -> int:
    """The characters Discord counts against an embed's limits (of what this codec sets)."""
    return sum(len(embed.get(key, "")) for key in ("title", "description"))


@dataclass
class _Draft:
    """One Discord message being filled: its content, embeds and action rows, shown in that order."""

    content: str = ""
    embeds: list[Json] = field(default_factory=list)
    rows: list[Json] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.content or self.embeds or self.rows)

    def body(self) -> Json:
        body: Json = {}
        if self.content:
            body["content"] = self.content
        if self.embeds:
            body["embeds"] = self.embeds
        if self.rows:
            body["components"] = self.rows
        return body


class _Layout:
    """Content parts laid out as Discord messages: a part joins the current message as long as it fits
    and shows below what came before it; otherwise it starts the next message."""

    def __init__(self) -> None:
        self.drafts = [_Draft()]

    @property
    def current(self) -> _Draft:
        return self.drafts[-1]

    def messages(self) -> list[Json]:
        return [draft.body() for draft in self.drafts if not draft.is_empty()]

    def add(self, part: c.Part, index: int) -> None:
        match part:
            case c.Text():
                self.text(part.text)
            case c.Buttons():
                self.text(part.text)
                self.rows(_button_rows(part.buttons))
            case c.List():
                # Line by line: the three fit one message when they fit 2,000 characters together.
                for line in (part.header, part.text, part.footer):
                    self.text(line)
                self.rows([_select_row(part, section, f"list:{index}:{n}") for n, section in enumerate(part.sections)])
            case c.Card():
                self.embed(_card_embed(part))
                self.rows(_button_rows(part.buttons))
            case c.Media():
                self.media(part)
            case _:
                raise EncodeError(f"discord: cannot send a {type(part).__name__.lower()} part")

    def next(self) -> None:
        if not self.current.is_empty():
            self.drafts.append(_Draft())

    def text(self, text: str) -> None:
        if not text:
            return
        if len(text) > TEXT_LIMIT:
            # Degradation splits longer text (`text_limit`, `choice_text_limit`); cutting it here would
            # lose words without a record, and Discord would refuse the message.
            raise EncodeError(
                f"discord: a text of {len(text)} characters is longer than the {TEXT_LIMIT} a message takes"
            )
        draft = self.current
        joined = f"{draft.content}\n{text}" if draft.content else text
        if draft.embeds or draft.rows or len(joined) > TEXT_LIMIT:
            self.next()
            joined = text
        self.current.content = joined

    def embed(self, embed: Json) -> None:
        draft = self.current
        total = sum(_embed_size(shown) for shown in draft.embeds) + _embed_size(embed)
        if draft.rows or len(draft.embeds) >= MAX_EMBEDS or total > EMBEDS_TOTAL_LIMIT:
            self.next()
        self.current.embeds.append(embed)

    def rows(self, rows: list[Json]) -> None:
        for row in rows:
            if len(self.current.rows) >= MAX_ACTION_ROWS:
                self.next()
            self.current.rows.append(row)

    def media(self, media: c.Media) -> None:
        """An image by URL shows in an embed; any other file (when a message was not degraded first)
        as a link. Bytes would need a multipart upload, which this codec does not do."""
        url = _media_url(media, "media")
        if media.media == "image":
            embed: Json = {"image": {"url": url}}
            if media.caption:
                embed["description"] = _description(media.caption, "an image's caption")
            self.embed(embed)
        else:
            self.text(f"{media.caption or media.filename} {media.url}".strip())


def _button_rows(buttons: list[c.Button]) -> list[Json]:
    """Buttons in action rows of at most five."""
    return [
        {"type": ACTION_ROW, "components": [_button(button) for button in buttons[start : start + MAX_ROW_BUTTONS]]}
        for start in range(0, len(buttons), MAX_ROW_BUTTONS)
    ]


def _button(button: c.Button) -> Json:
    """A url button is a link (style 5); a reply or postback button sends back its `custom_id` — the
    button's id, or a postback's value — which comes back as `Action.id`."""
    label = native.clip(button.title, BUTTON_LABEL_LIMIT)
    if button.action == "url":
        if not 1 <= len(button.value) <= BUTTON_URL_LIMIT:
            raise EncodeError(f"discord: a link button's url takes 1-{BUTTON_URL_LIMIT} characters: {button.value!r}")
        return {"type": BUTTON, "style": LINK, "label": label, "url": button.value}
    if button.action not in ("reply", "postback"):
        raise EncodeError(f"discord: buttons cannot {button.action}")
    return {"type": BUTTON, "style": PRIMARY, "label": label, "custom_id": _custom_id(button)}


def _custom_id(button: c.Button) -> str:
    custom_id = button.value if button.action == "postback" and button.value else button.id
    if not 1 <= len(custom_id) <= MAX_CUSTOM_ID:
        raise EncodeError(f"discord: a button's custom_id takes 1-{MAX_CUSTOM_ID} characters: {custom_id!r}")
    return custom_id


def _select_row(part: c.List, section: c.ListSection, custom_id: str) -> Json:
    """A section as a string select in its own action row; a chosen option sends back the row's id.
    Labels, descriptions and the placeholder are cut to Discord's lengths; the value, which must come
    back unchanged, is refused when it does not fit."""
    if not 1 <= len(section.rows) <= MAX_SELECT_OPTIONS:
        raise EncodeError(f"discord: a list section takes 1-{MAX_SELECT_OPTIONS} rows, not {len(section.rows)}")
    options = []
    for row in section.rows:
        if not 1 <= len(row.id) <= OPTION_TEXT_LIMIT:
            raise EncodeError(f"discord: a list row's id takes 1-{OPTION_TEXT_LIMIT} characters: {row.id!r}")
        option = {"label": native.clip(row.title, OPTION_TEXT_LIMIT), "value": row.id}
        if row.description:
            option["description"] = native.clip(row.description, OPTION_TEXT_LIMIT)
        options.append(option)
    select: Json = {"type": STRING_SELECT, "custom_id": custom_id, "options": options}
    placeholder = section.title or part.button
    if placeholder:
        select["placeholder"] = native.clip(placeholder, PLACEHOLDER_LIMIT)
    return {"type": ACTION_ROW, "components": [select]}


def _card_embed(card: c.Card) -> Json:
    """A card as an embed: title (cut to 256 characters), subtitle as description, an image; another
    file links the title. A card's media without a url cannot be shown: refused, never left out."""
    embed: Json = {}
    if card.title:
        embed["title"] = native.clip(card.title, EMBED_TITLE_LIMIT)
    if card.subtitle:
        embed["description"] = _description(card.subtitle, "a card's subtitle")
    media = card.media
    if media is not None:
        url = _media_url(media, "a card's media")
        if media.media == "image":
            embed["image"] = {"url": url}
        else:
            embed["url"] = url
            embed.setdefault("title", native.clip(media.filename or url, EMBED_TITLE_LIMIT))
    if not embed:
        raise EncodeError("discord: an empty card has nothing to show")
    return embed


def _media_url(media: c.Media, what: str) -> str:
    """The url a file is shown by. Discord takes no file ids (its attachment ids cannot be sent again)
    and this codec uploads no bytes (multipart), so a file without a url is refused by name."""
    if media.url:
        return media.url
    if media.file_id:
        raise EncodeError(
            f"discord: {what} has only a file id ({media.file_id!r}), which Discord cannot send: it needs a url"
        )
    raise EncodeError(f"discord: {what} needs a url (uploading files is not supported)")


def _description(text: str, what: str) -> str:
    """An embed description, which Discord takes up to 4,096 characters of."""
    if len(text) > EMBED_DESCRIPTION_LIMIT:
        raise EncodeError(
            f"discord: {what} of {len(text)} characters is longer than the {EMBED_DESCRIPTION_LIMIT} an embed shows"
        )
    return text


# ------------------------------------------------------------------------------------ encoding: calls


# ------------------------------------------------------------------------------------ directory

#: Channel types (Discord's "Channel Types") as directory kinds; others (DMs never appear in a guild) are "other".
_DIRECTORY_CHANNEL_KINDS: Final[dict[int, ItemKind]] = {
    0: "channel", 2: "channel", 5: "channel", 13: "channel", 15: "channel", 16: "channel",  # text, voice, …
    4: "category", 10: "thread", 11: "thread", 12: "thread",
}


class _DirectoryChannel(msgspec.Struct):
    id: str
    type: int
    name: str | None = None


class _DirectoryMember(msgspec.Struct):
    user: _User
    nick: str | None = None


def _directory_channel(raw: Any, path: str) -> DirectoryItem:
    channel = native.convert(raw, _DirectoryChannel, path)
    kind = _DIRECTORY_CHANNEL_KINDS.get(channel.type, "other")
    return DirectoryItem(id=channel.id, name=channel.name or "", kind=kind,
                         channel_specific=native.unmapped(raw, {"id", "name"}))


def _directory_member(raw: Any, path: str) -> DirectoryItem:
    member = native.convert(raw, _DirectoryMember, path)
    user = member.user
    if not _SNOWFLAKE.fullmatch(user.id):
        raise DecodeError("a user id is a snowflake", path=f"{path}.user.id")
    return DirectoryItem(id=user.id, name=member.nick or user.global_name or user.username,
                         kind="bot" if user.bot else "user", handle=f"@{user.username}" if user.username else "",
                         channel_specific=native.unmapped(raw, {"nick"}))


def _bot_headers(ctx: EncodeContext) -> dict[str, str]:
    token = native.required_secret(ctx.secrets, "bot_token", "Discord")
    return {"Authorization": f"Bot {token}", "User-Agent": USER_AGENT}


class _Encoder:
    """The API calls of one outbound message, numbered for their idempotency keys."""

    def __init__(self, base: str, message: c.Message, ctx: EncodeContext) -> None:
        self.base = base
        self.message = message
        self.ctx = ctx
        self.requests: list[OutboundRequest] = []
        self.follow_up = _follow_up_url(base, message, ctx)
        self.reference = None if self.follow_up else _message_reference(message, ctx)
        mentions = ctx.options.get("allowed_mentions")
        self.allowed_mentions: Json = mentions if isinstance(mentions, dict) else {"parse": []}

    def add(self, method: str, url: str, headers: dict[str, str], body: Json | None = None) -> None:
        if body is not None:
            headers = {**headers, "Content-Type": "application/json"}
        self.requests.append(
            OutboundRequest(
                method=method,
                url=url,
                headers=headers,
                body=native.json_body(body) if body is not None else b"",
                idempotency_key=self.next_key(),
                message_id=self.message.id,
            )
        )

    def next_key(self) -> str:
        return f"{self.message.id}:{len(self.requests)}"

    def send(self, layout: _Layout, edit: c.Edit | None) -> None:
        """Post the laid-out messages, or, for an edit, put them into the edited message."""
        bodies = layout.messages()
        if not bodies:
            return
        if edit is not None:
            self.edit(bodies, edit)
            return
        for body in bodies:
            self.post({**body, "allowed_mentions": self.allowed_mentions})

    def post(self, body: Json) -> None:
        if self.follow_up:
            self.add("POST", self.follow_up, {"User-Agent": USER_AGENT}, body)
            return
        chat = _channel(self.ctx)
        if self.reference is not None:
            body["message_reference"] = self.reference
            self.reference = None  # only the first message of a reply points at the original
        # Discord returns the message already made when a create with the same nonce is retried.
        body["nonce"] = c.stable_id(self.next_key())[:NONCE_LENGTH]
        body["enforce_nonce"] = True
        self.add("POST", f"{self.base}/channels/{chat}/messages", _bot_headers(self.ctx), body)

    def edit(self, bodies: list[Json], edit: c.Edit) -> None:
        """PATCH the message with all three of content, embeds and components, so that what the new
        version leaves out is removed rather than kept."""
        if len(bodies) > 1:
            raise EncodeError("discord: an edit's new content must fit in one message")
        (body,) = bodies
        chat, message = _native_message(self.ctx, edit.target, "edit")
        patch = {
            "content": body.get("content", ""),
            "embeds": body.get("embeds", []),
            "components": body.get("components", []),
            "allowed_mentions": self.allowed_mentions,
        }
        self.add("PATCH", f"{self.base}/channels/{chat}/messages/{message}", _bot_headers(self.ctx), patch)

    def marker(self, part: c.Reaction | c.Delete) -> None:
        if isinstance(part, c.Delete):
            chat, message = _native_message(self.ctx, part.target, "delete")
            self.add("DELETE", f"{self.base}/channels/{chat}/messages/{message}", _bot_headers(self.ctx))
            return
        chat, message = _native_message(self.ctx, part.target, "reaction")
        url = f"{self.base}/channels/{chat}/messages/{message}/reactions/{reaction_emoji(part.emoji)}/@me"
        self.add("DELETE" if part.removed else "PUT", url, _bot_headers(self.ctx))


def _follow_up_url(base: str, message: c.Message, ctx: EncodeContext) -> str:
    """The interaction's webhook when `message` answers an interaction (its meta holds the token)."""
    token = message.meta.get("discord.interaction_token")
    if not isinstance(token, str) or not token:
        return ""
    application = message.meta.get("discord.application_id") or ctx.options.get("application_id")
    if not isinstance(application, str) or not application:
        raise EncodeError("discord: an interaction reply needs meta discord.application_id (or option application_id)")
    return f"{base}/webhooks/{_snowflake(application, 'application id')}/{_segment(token, 'interaction token')}"


def _message_reference(message: c.Message, ctx: EncodeContext) -> Json | None:
    """What a reply points at. An interaction is no message, so a reply to one points at nothing."""
    if not message.reply_to:
        return None
    native_id = ctx.native_ids.get(message.reply_to, "")
    if ":interaction:" in native_id:
        return None
    _, original = _native_message(ctx, message.reply_to, "reply_to")
    return {"message_id": original, "fail_if_not_exists": False}


_CUSTOM_EMOJI: Final = re.compile(r"<?a?:?(?P<name>\w+):(?P<id>\d+)>?")


def _native_message(ctx: EncodeContext, canonical: str, purpose: str) -> tuple[str, str]:
    """The channel and message id a canonical id maps to (native ids are `channel:message`)."""
    chat, _, message = native.native_id(ctx, canonical, f"{purpose} target", "Discord").partition(":")
    if not (_SNOWFLAKE.fullmatch(chat) and _SNOWFLAKE.fullmatch(message)):
        raise EncodeError(f"discord: no Discord message known for {purpose} target {canonical!r}")
    return chat, message


def _snowflake(value: str, what: str) -> str:
    """An id that goes into a request path: a snowflake, digits only. Anything else (`123/invites?`)
    would address another endpoint."""
    if not _SNOWFLAKE.fullmatch(value):
        raise EncodeError(f"discord: the {what} {value!r} is no snowflake (digits only)")
    return value


def _channel(ctx: EncodeContext) -> str:
    if not ctx.to:
        raise EncodeError("discord: no channel to send to (EncodeContext.to is empty)")
    return _snowflake(ctx.to, "channel id (EncodeContext.to)")


def _segment(value: str, what: str) -> str:
    """A free-form value as one path segment: escaped, and never `.` or `..`."""
    if not value.strip("."):
        raise EncodeError(f"discord: the {what} {value!r} cannot be a path segment")
    return quote(value, safe="")


# ----------------------------------------------------------------------------------- parse_response


def _sent_ids(answer: Any) -> list[str]:
    """A created or edited message answers with the message object: `channel_id` and `id`."""
    if not isinstance(answer, dict):
        return []
    chat, message = answer.get("channel_id"), answer.get("id")
    return [f"{chat}:{message}"] if isinstance(chat, str) and isinstance(message, str) else []


def _api_failure(response: HttpResponse, answer: Json) -> SendResult:
    code = answer.get("code")
    details = _field_errors(answer.get("errors"))
    message = "; ".join(text for text in [native.str_field(answer, "message"), *details] if text)
    if response.status == 429:
        name = "rate_limited_global" if answer.get("global") is True else "rate_limited"
    elif isinstance(code, int) and not isinstance(code, bool) and code:
        name = f"discord_{code}"
    else:
        name = f"http_{response.status}"
    generic = native.http_failure(response, code=name, message=message, native=answer)
    retryable = generic.retryable or code in _TRANSIENT_CODES
    wait = answer.get("retry_after")
    retry_after = float(wait) if isinstance(wait, int | float) and not isinstance(wait, bool) else generic.retry_after
    return SendResult(
        ok=False,
        retryable=retryable,
        retry_after=retry_after if retryable else None,
        error=c.Error(code=name, message=message, retryable=retryable, native=answer),
    )


def _field_errors(errors: Any, path: str = "") -> list[str]:
    """Discord's nested `errors` object ({"embeds": {"0": {"title": {"_errors": [{code, message}]}}}})
    as `embeds.0.title: message` lines."""
    if not isinstance(errors, dict):
        return []
    lines: list[str] = []
    for key, value in errors.items():
        if key == "_errors" and isinstance(value, list):
            lines.extend(f"{path or '$'}: {error.get('message', '')}" for error in value if isinstance(error, dict))
        else:
            lines.extend(_field_errors(value, f"{path}.{key}" if path else str(key)))
    return lines
