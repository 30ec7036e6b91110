"""Microsoft Teams, through the Bot Framework Connector (REST API v3).

Inbound, Teams POSTs one Bot Framework *Activity* per request, signed with an RS256 JWT
(`Authorization: Bearer`, issuer `https://api.botframework.com`, audience = the bot's app id, key from
Bot Framework's key set, which is configuration here: `secrets["signing_keys"]`).

* `message` → text (with `<at>` mentions turned into canonical mentions), pictures and files; a
  message whose `value` carries an Adaptive Card `Action.Submit` / `messageBack` payload is a click →
  `action` (+ `form` for the card's inputs).
* `invoke` `adaptiveCard/action` (Universal Actions' `Action.Execute`) → `action` (+ `form`). The
  Adaptive Cards docs require the bot to answer such an invoke with HTTP 200 and an
  `{"statusCode", "type", "value"}` body: `handshake` builds that answer, which the hub gives *after*
  it recorded the raw request (the click itself is decoded from the record like any delivery).
* `messageUpdate` (edit / undelete) → `edit`; `messageDelete` → `delete`; `messageReaction` → `reaction`.
* `conversationUpdate` / `installationUpdate` → `joined` / `left` activities; `typing` → `typing`;
  `endOfConversation` → `ended`; the read-receipt event → a `read` status.
* Everything else (other invokes, meeting events, commands…) → an `unsupported` part that keeps the
  native activity.

Outbound, every call goes to the conversation's `serviceUrl`, which differs per conversation and
region. Decode records it in `meta["babelhub.reply_api_base"]` (the conversation actor keeps it and
hands it back as `EncodeContext.api_base`) and in `meta["teams.service_url"]`;
`ctx.options["service_url"]` is the fallback. The bearer token (`secrets["bot_token"]`) is obtained by
the hub: fetching it from Microsoft Entra ID is I/O and stays out of the codec.

Text goes out as Teams markdown. Reply buttons that fit become `suggestedActions` (`imBack`, the only
type Teams documents for them, at most three shown); other buttons, cards and carousels become
Adaptive Cards (`Action.Submit` carrying `{"id": ...}`, `Action.OpenUrl`).
"""

from __future__ import annotations

import mimetypes
from base64 import b64encode
from collections.abc import Mapping
from datetime import datetime
from functools import partial
from typing import Any, ClassVar, Final
from urllib.parse import quote, unquote, urlencode

import msgspec

from babelhub import canonical as c
from babelhub.codecs import jwt, native
from babelhub.codecs.base import (
    REPLY_API_BASE,
    Capabilities,
    Codec,
    DecodeContext,
    DirectoryItem,
    DirectoryKind,
    DirectoryPage,
    EncodeContext,
    HttpRequest,
    HttpResponse,
    OutboundRequest,
    SendResult,
)
from babelhub.codecs.settings import ConnectionOptions, Settings
from babelhub.errors import DecodeError, EncodeError, SignatureError

__all__ = ["TeamsCodec"]

CHANNEL: Final = "teams"
ISSUER: Final = "https://api.botframework.com"
"""The `iss` of tokens the Bot Connector service sends to bots (Bot Framework authentication docs)."""


INVOKE_ACK: Final = "application/vnd.microsoft.activity.message"
"""Universal Actions response type: "the response includes a message that the client should display"."""

READ_RECEIPT_EVENT: Final = "application/vnd.microsoft.readReceipt"
CARD_SUBMIT_INVOKES: Final = frozenset({"suggestedActions/submit", "suggestedAction/submit"})
"""Teams' suggested `Action.Submit` invoke; its docs spell the name both ways."""

SUGGESTED_ACTIONS_SHOWN: Final = 3
"""Teams "displays only the first three" suggested actions: more reply buttons go into a card."""

# Errors the Teams docs ("Status codes from bot conversational APIs") say to retry; 500 is not one.
RETRYABLE_STATUSES: Final = frozenset({412, 429, 502, 503, 504})

# Teams' named reactions (docs: "like"; the Teams client offers these six); anything else is passed on.
REACTION_EMOJI: Final[Mapping[str, str]] = {
    "like": "👍",
    "heart": "❤️",
    "laugh": "😆",
    "surprised": "😮",
    "sad": "😢",
    "angry": "😠",
}

TEXT_FORMATS: Final[Mapping[str, c.TextFormat]] = {"plain": "plain", "markdown": "markdown", "xml": "html"}
ADAPTIVE_CARD: Final = "application/vnd.microsoft.card.adaptive"
FILE_DOWNLOAD_INFO: Final = "application/vnd.microsoft.teams.file.download.info"
HTML_COPY: Final = "text/html"
"""Teams attaches the formatted version of a user's text as a `text/html` attachment."""
THREAD_MARKER: Final = ";messageid="
"""A channel conversation id ending in `;messageid=<root>` is the reply thread of that root message."""


# -------------------------------------------------------------------------------------- wire format


class _Account(msgspec.Struct, kw_only=True):
    id: str = ""
    name: str = ""
    aadObjectId: str = ""
    role: str = ""


class _ConversationAccount(msgspec.Struct, kw_only=True):
    id: str
    conversationType: str = ""
    isGroup: bool = False
    tenantId: str = ""
    name: str = ""


class _Attachment(msgspec.Struct, kw_only=True):
    contentType: str = ""
    contentUrl: str = ""
    content: Any = None
    name: str = ""
    thumbnailUrl: str = ""


class _MessageReaction(msgspec.Struct, kw_only=True):
    type: str


class _Activity(msgspec.Struct, kw_only=True):
    """The parts of a Bot Framework Activity this codec reads (Connector API v3 `Activity`)."""

    type: str
    id: str = ""
    timestamp: str = ""
    serviceUrl: str = ""
    channelId: str = ""
    sender: _Account | None = msgspec.field(default=None, name="from")
    conversation: _ConversationAccount | None = None
    recipient: _Account | None = None
    text: str = ""
    textFormat: str = ""
    attachments: list[Any] = []
    """Each read on its own (`_Attachment`): one unreadable attachment is an Unsupported part."""
    entities: list[Any] = []
    """Mentions and client info; an entity that is no object is skipped (it names no one)."""
    channelData: dict[str, Any] = {}
    replyToId: str = ""
    value: Any = None
    name: str = ""
    membersAdded: list[_Account] = []
    membersRemoved: list[_Account] = []
    reactionsAdded: list[_MessageReaction] = []
    reactionsRemoved: list[_MessageReaction] = []
    action: str = ""
    locale: str = ""
    code: str = ""


class _ConversationId(msgspec.Struct, kw_only=True):
    id: str = ""


class _ActivityIds(msgspec.Struct, kw_only=True):
    """Only what the dedup key needs, read on the request path."""

    type: str = ""
    id: str = ""
    timestamp: str = ""
    conversation: _ConversationId | None = None


MAPPED_FIELDS: Final = frozenset(field.encode_name for field in msgspec.structs.fields(_Activity))
"""Activity fields decode maps to parts or meta; the rest is kept in `meta["teams.extra"]`."""


class _ResourceResponse(msgspec.Struct, kw_only=True):
    id: str = ""


class _ErrorDetail(msgspec.Struct, kw_only=True):
    code: str = ""
    message: str = ""


class _ErrorResponse(msgspec.Struct, kw_only=True):
    error: _ErrorDetail | None = None


# -------------------------------------------------------------------------------------------- codec


class TeamsSecrets(Settings, frozen=True, kw_only=True):
    app_id: str
    """The bot's Microsoft app id, the audience of Bot Framework's JWTs."""
    signing_keys: str
    """Bot Framework's signing keys (its OpenID key set as JWKS, or PEM), refreshed outside the hub."""
    bot_token: str
    """A Bot Framework access token (from Microsoft Entra ID, refreshed outside the hub): replies carry it."""
    invoke_reply: str = ""
    """The `value` of the answer to an Adaptive Card `Action.Execute` invoke."""


class TeamsOptions(ConnectionOptions, frozen=True, kw_only=True):
    service_url: str = ""
    """The Bot Connector URL to send to when the conversation has not given its own `serviceUrl`."""
    directory_conversation: str = ""
    """The conversation (a team's id, `19:…`, or a group chat's) whose members the directory API lists as
    contacts, through `service_url`; unset: `/v1/connections/{id}/contacts` answers 501."""


class TeamsCodec(Codec):
    channel: ClassVar[str] = CHANNEL
    secret_settings: ClassVar[type[Settings]] = TeamsSecrets
    option_settings: ClassVar[type[Settings]] = TeamsOptions
    capabilities: ClassVar[Capabilities] = Capabilities(
        parts=frozenset({"text", "media", "buttons", "card", "carousel", "edit", "delete"}),
        # Pictures only: PNG/JPEG/GIF up to 1 MB ("Use picture messages"); other files need the
        # file-consent flow, which is not a single API call.
        media=frozenset({"image"}),
        media_max_bytes=1024 * 1024,
        # The bot message limit is ~100 KB of UTF-16 (80 KB recommended); 28,000 characters stay well
        # inside it with the activity around them.
        text_limit=28_000,
        caption_limit=28_000,
        markup="markdown",
        # Teams' Adaptive Card host config shows at most 6 actions.
        max_buttons=6,
        max_button_title=40,
        button_actions=frozenset({"reply", "postback", "url"}),
        max_cards=10,
        reply=True,
        edit=True,
        delete=True,
        reaction=False,
        typing=True,
    )
    # Rate limiting: "the global limit per app per tenant is 50 requests per second".
    send_rate: ClassVar[float] = 50.0

    # ------------------------------------------------------------------------------- verification

    def verify(self, request: HttpRequest, secrets: Mapping[str, str]) -> None:
        """The Bot Framework "Connector to Bot" checks: RS256 signature by a configured key, issuer,
        audience = app id, expiry with 5 minutes of skew, the `serviceUrl` claim matching the
        activity, and the key's endorsement of the activity's channel when it lists endorsements."""
        token = jwt.verify_rs256(
            jwt.bearer_token(request),
            secrets.get("signing_keys", ""),
            issuers={ISSUER},
            audience=secrets.get("app_id", ""),
            now=request.received_at or None,
        )
        try:
            activity = native.convert(native.read_json(request), _Activity)
        except DecodeError as exc:
            raise SignatureError(f"cannot read the activity the token signs for: {exc}") from None
        service_url = token.claims.get("serviceUrl", token.claims.get("serviceurl"))
        if service_url != activity.serviceUrl:
            raise SignatureError(f"token serviceUrl {service_url!r} does not match the activity's")
        if token.key.endorsements and activity.channelId not in token.key.endorsements:
            raise SignatureError(f"signing key is not endorsed for channel {activity.channelId!r}")

    def handshake(self, request: HttpRequest, secrets: Mapping[str, str]) -> HttpResponse | None:
        """The synchronous answer an `adaptiveCard/action` invoke requires (HTTP 200 + response body);
        None for everything else, which the hub answers with a plain 200. Only a POST is answered: Bot
        Framework POSTs every activity, and the hub calls this only once the POST's token verified."""
        if request.method.upper() != "POST":
            return None
        try:
            activity = native.convert(native.read_json(request), _Activity)
        except DecodeError:
            return None
        if activity.type != "invoke" or activity.name != "adaptiveCard/action":
            return None
        body = {"statusCode": 200, "type": INVOKE_ACK, "value": secrets.get("invoke_reply", "")}
        return HttpResponse(status=200, headers={"content-type": "application/json"}, body=native.json_body(body))

    def dedup_key(self, request: HttpRequest) -> str:
        # An edit reuses the message's activity id, so the type and timestamp are part of the key.
        ids = native.convert(native.read_json(request), _ActivityIds)
        if not ids.id or ids.conversation is None or not ids.conversation.id:
            return ""
        return "|".join((ids.conversation.id, ids.id, ids.type, ids.timestamp))

    # ------------------------------------------------------------------------------------- decode

    def decode(self, request: HttpRequest, ctx: DecodeContext) -> list[c.Envelope]:
        raw = native.read_json(request)
        activity = native.convert(raw, _Activity)
        decoder = _Decoder(activity, raw, request, ctx)
        match activity.type:
            case "message":
                return [decoder.as_message(_message_parts(decoder))]
            case "messageUpdate":
                return [_edited(decoder)]
            case "messageDelete":
                return [decoder.as_message([c.Delete(target=decoder.message_id(activity.id))], suffix="#delete")]
            case "messageReaction":
                return [decoder.as_message(_reactions(decoder), suffix="#reaction")]
            case "invoke":
                return [decoder.as_message(_invoke_parts(decoder), suffix="#invoke")]
            case "conversationUpdate" | "installationUpdate":
                return _membership(decoder)
            case "typing":
                return [decoder.as_activity("typing")]
            case "endOfConversation":
                return [decoder.as_activity("ended", {"teams.code": activity.code} if activity.code else {})]
            case "event" if activity.name == READ_RECEIPT_EVENT:
                return [_read_receipt(decoder)]
        kept = native.unsupported(f"teams {activity.type} activity", raw)
        return [decoder.as_message([kept], suffix=f"#{activity.type}")]

    # ------------------------------------------------------------------------------------- encode

    def encode(self, message: c.Message, ctx: EncodeContext) -> list[OutboundRequest]:
        encoder = _Encoder(message, ctx, self.api_base(ctx))
        edits = [part for part in message.parts if isinstance(part, c.Edit)]
        if edits:
            return encoder.replace(edits[0].target, [p for p in message.parts if not isinstance(p, c.Edit)])
        return encoder.send(message.parts)

    def encode_activity(self, activity: c.Activity, ctx: EncodeContext) -> list[OutboundRequest]:
        if activity.activity != "typing":
            return []
        conversation = quote(ctx.to, safe="")
        return [
            OutboundRequest(
                method="POST",
                url=f"{self.api_base(ctx)}/v3/conversations/{conversation}/activities",
                headers=_headers(ctx),
                body=native.json_body({"type": "typing"}),
                idempotency_key=f"{activity.id}:0",
                message_id=activity.id,
            )
        ]

    def api_base(self, ctx: EncodeContext) -> str:
        """The conversation's serviceUrl: there is no global Bot Connector endpoint for Teams."""
        base = ctx.api_base or str(ctx.options.get("service_url", ""))
        if not base:
            raise EncodeError("teams needs the conversation's serviceUrl (EncodeContext.api_base)")
        return base.rstrip("/")

    # ------------------------------------------------------------------------------------ directory

    def directory_request(self, kind: DirectoryKind, ctx: EncodeContext, cursor: str,
                          limit: int) -> OutboundRequest | None:
        """The members of `options.directory_conversation` (`GET /v3/conversations/{id}/pagedmembers`,
        paged by Bot Framework's `continuationToken`; Teams gives at least 50 a page, and a chat's whole
        roster in one). Bots have no documented way to list their chats or a team's channels here."""
        if kind != "contacts":
            return None
        conversation = str(ctx.options.get("directory_conversation", ""))
        if not conversation:
            raise EncodeError("set the connection's options.directory_conversation to the team or chat to list")
        query = {"pageSize": str(limit), **({"continuationToken": cursor} if cursor else {})}
        url = f"{self.api_base(ctx)}/v3/conversations/{quote(conversation, safe='')}/pagedmembers?{urlencode(query)}"
        return OutboundRequest(method="GET", url=url, headers={"Authorization": _headers(ctx)["Authorization"]})

    def parse_directory(self, kind: DirectoryKind, request: OutboundRequest, response: HttpResponse,
                        cursor: str, limit: int) -> DirectoryPage:
        answer = native.convert(native.read_json(response), _PagedMembers)
        items = [_directory_member(raw, f"$.members[{index}]") for index, raw in enumerate(answer.members)]
        return DirectoryPage(items=items, next_cursor=answer.continuationToken or "")

    def parse_response(self, request: OutboundRequest, response: HttpResponse) -> SendResult:
        if 200 <= response.status < 300:
            return SendResult(ok=True, native_ids=_sent_ids(request, response))
        try:
            error = native.convert(native.read_json(response), _ErrorResponse).error or _ErrorDetail()
        except DecodeError:
            error = _ErrorDetail()
        failure = native.http_failure(response, code=error.code, message=error.message)
        retryable = response.status in RETRYABLE_STATUSES
        assert failure.error is not None  # http_failure always describes the error
        return msgspec.structs.replace(
            failure, retryable=retryable, error=msgspec.structs.replace(failure.error, retryable=retryable)
        )


# ----------------------------------------------------------------------------------------- decoding


class _Decoder:
    """One received activity and the header every envelope made from it shares."""

    def __init__(self, activity: _Activity, raw: Any, request: HttpRequest, ctx: DecodeContext) -> None:
        if activity.conversation is None or not activity.conversation.id:
            raise DecodeError("activity has no conversation id", path="$.conversation.id")
        self.activity = activity
        self.raw = raw
        self.ctx = ctx
        self.conversation_id = activity.conversation.id
        # Teams message ids are per conversation (channel ones are millisecond timestamps), so the
        # key that makes them unique within a connection includes the conversation, without the
        # thread suffix so a thread's root and its replies agree.
        self.base_conversation = self.conversation_id.split(THREAD_MARKER, 1)[0]
        self.ts = _timestamp(activity, request)
        self.key = activity.id or "body:" + c.stable_id(request.body.decode("utf-8", "replace"))

    def message_id(self, native_id: str) -> str:
        """The canonical id of the message `native_id` in this conversation."""
        return c.message_id(self.ctx.tenant, self.ctx.connection, f"{self.base_conversation}|{native_id}")

    def sender_id(self, native_user_id: str) -> str:
        return c.sender_id(self.ctx.tenant, self.ctx.connection, native_user_id)

    def as_message(self, parts: list[c.Part], *, suffix: str = "", meta: Mapping[str, Any] | None = None) -> c.Message:
        activity = self.activity
        if not parts:
            parts = [native.unsupported(f"teams {activity.type} activity without content", self.raw)]
        return c.Message(
            id=self.message_id(self.key + suffix),
            parts=parts,
            reply_to=self.message_id(activity.replyToId) if activity.replyToId else "",
            **self.header(meta),
        )

    def as_activity(self, kind: c.ActivityType, detail: Mapping[str, Any] | None = None) -> c.Activity:
        return c.Activity(
            id=c.stable_id("activity", self.ctx.tenant, self.ctx.connection, self.base_conversation, self.key, kind),
            activity=kind,
            detail=dict(detail or {}),
            **self.header(None),
        )

    def header(self, meta: Mapping[str, Any] | None) -> dict[str, Any]:
        activity = self.activity
        return {
            "tenant": self.ctx.tenant,
            "conversation": self._conversation(),
            "ts": self.ts,
            "sender": self._sender(),
            "native": c.Native(id=activity.id, seq=self.ctx.seq),
            "thread": self._thread(),
            "meta": {**self._meta(), **(meta or {})},
        }

    def _conversation(self) -> c.Conversation:
        assert self.activity.conversation is not None
        kind = _conversation_type(self.activity.conversation)
        return native.conversation(self.ctx, CHANNEL, self.conversation_id, kind)

    def _thread(self) -> str:
        _, marker, root = self.conversation_id.partition(THREAD_MARKER)
        return self.message_id(root) if marker and root else ""

    def _sender(self) -> c.Sender | None:
        account = self.activity.sender
        if account is None or not account.id:
            return None
        return native.sender(
            self.ctx, account.id,
            name=account.name,
            role="bot" if account.role == "bot" else "user",
        )

    def _meta(self) -> dict[str, Any]:
        """What the envelope carries besides its parts, so nothing Teams sent is lost."""
        activity = self.activity
        meta: dict[str, Any] = {}
        if activity.serviceUrl:
            meta[REPLY_API_BASE] = activity.serviceUrl
            meta["teams.service_url"] = activity.serviceUrl
        assert activity.conversation is not None
        optional = {
            "teams.channel_id": activity.channelId,
            "teams.tenant_id": activity.conversation.tenantId,
            "teams.locale": activity.locale,
            "teams.aad_object_id": activity.sender.aadObjectId if activity.sender else "",
            "teams.recipient": msgspec.to_builtins(activity.recipient) if activity.recipient else None,
            "teams.channel_data": activity.channelData,
            "teams.entities": [entity for entity in activity.entities if _entity_type(entity) != "mention"],
            "teams.html": [a.get("content") for a in activity.attachments if _content_type(a) == HTML_COPY],
            "teams.conversation_name": activity.conversation.name,
            "teams.extra": native.unmapped(self.raw, MAPPED_FIELDS),  # speak, summary, importance…
        }
        meta.update({key: value for key, value in optional.items() if value})
        return meta


def _timestamp(activity: _Activity, request: HttpRequest) -> datetime:
    """The activity's UTC timestamp (one without an offset is UTC, so the envelope can be re-read); an
    activity without one is dated when the hub received it."""
    if activity.timestamp:
        return native.parse_time(activity.timestamp, "$.timestamp")
    if request.received_at:
        return native.from_unix(request.received_at, "$.timestamp")
    raise DecodeError("activity has no timestamp", path="$.timestamp")


def _conversation_type(conversation: _ConversationAccount) -> c.ConversationType:
    match conversation.conversationType:
        case "personal":
            return "direct"
        case "groupChat":
            return "group"
        case "channel":
            return "thread" if THREAD_MARKER in conversation.id else "channel"
    return "group" if conversation.isGroup else "direct"


def _message_parts(decoder: _Decoder) -> list[c.Part]:
    """A user's message: a card click when it carries a `value`, otherwise text and attachments."""
    activity = decoder.activity
    if activity.value is not None:
        return _card_submission(decoder, activity.value, title=activity.text)
    return _content_parts(decoder)


def _content_parts(decoder: _Decoder) -> list[c.Part]:
    activity = decoder.activity
    parts: list[c.Part] = []
    if activity.text:
        parts.append(_text(decoder))
    # The `text/html` attachment is Teams' formatted copy of the text: it goes to meta (`teams.html`).
    for n, raw in enumerate(activity.attachments):
        if _content_type(raw) != HTML_COPY:
            parts.extend(native.lenient_parts(partial(_attachment_part, raw, n), raw, "teams attachment"))
    return parts


def _entity_type(raw: Any) -> Any:
    return raw.get("type") if isinstance(raw, dict) else None


def _content_type(raw: Any) -> Any:
    return raw.get("contentType") if isinstance(raw, dict) else None


def _text(decoder: _Decoder) -> c.Text:
    """The text with each `<at>name</at>` mention replaced by `@name` and described as a Mention."""
    activity = decoder.activity
    text, cursor = activity.text, 0
    pieces: list[str] = []
    mentions: list[c.Mention] = []
    for entity in activity.entities:
        if _entity_type(entity) != "mention":
            continue
        tag, mentioned = entity.get("text"), entity.get("mentioned")
        if not isinstance(tag, str) or not isinstance(mentioned, dict):
            continue
        at = text.find(tag, cursor)
        if not tag or at < 0:
            continue
        pieces.append(text[cursor:at])
        name = str(mentioned.get("name") or tag.removeprefix("<at>").removesuffix("</at>"))
        offset = sum(len(piece) for piece in pieces)
        pieces.append(f"@{name}")
        native_id = str(mentioned.get("id", ""))
        mention_id = decoder.sender_id(native_id)
        mentions.append(c.Mention(id=mention_id, native_id=native_id, name=name, offset=offset, length=len(name) + 1))
        cursor = at + len(tag)
    pieces.append(text[cursor:])
    return c.Text(text="".join(pieces), format=TEXT_FORMATS.get(activity.textFormat, "plain"), mentions=mentions)


def _attachment_part(raw: Any, n: int) -> c.Part:
    attachment = native.convert(raw, _Attachment, f"$.attachments[{n}]")
    kind = attachment.contentType
    if kind == FILE_DOWNLOAD_INFO and isinstance(attachment.content, dict):
        return c.Media(
            media=native.media_kind("", filename=attachment.name),
            url=str(attachment.content.get("downloadUrl", "")),
            file_id=str(attachment.content.get("uniqueId", "")),
            filename=attachment.name,
            mime=mimetypes.guess_type(attachment.name)[0] or "",
        )
    if kind.startswith(("image/", "video/", "audio/")) and attachment.contentUrl:
        return c.Media(
            media=native.media_kind(kind),
            url=attachment.contentUrl,
            mime=kind if "*" not in kind else "",
            filename=attachment.name,
        )
    return native.unsupported(f"teams attachment {kind or 'without contentType'}", raw)


def _card_submission(decoder: _Decoder, value: Any, *, title: str = "", verb: str = "") -> list[c.Part]:
    """A card button press: the data it carried (`{"id": ...}` for buttons babelhub sent) becomes the
    action, the card's other inputs a form."""
    data = _as_object(value)
    if data is None:
        return [c.Action(id=str(value), title=title, source=_source(decoder))]
    action_id = str(data.get("id") or verb)
    inputs = native.unmapped(data, ("id", "msteams"))
    parts: list[c.Part] = [c.Action(id=action_id, title=title, source=_source(decoder))]
    if inputs:
        fields = [c.FormField(id=key, value=item) for key, item in inputs.items()]
        parts.append(c.Form(id=action_id, fields=fields))
    return parts


def _as_object(value: Any) -> dict[str, Any] | None:
    """A card's data: an object, or (messageBack allows it) an object serialized as a string."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            # msgspec, not json: JSON has no NaN, Infinity or lone surrogates, and an envelope cannot carry them
            parsed = msgspec.json.decode(value)
        except (ValueError, RecursionError):
            return None
        return parsed if isinstance(parsed, dict) else None
    return None


def _source(decoder: _Decoder) -> str:
    """The card's message: Teams puts its id in `replyToId` of the click."""
    reply_to = decoder.activity.replyToId
    return decoder.message_id(reply_to) if reply_to else ""


def _invoke_parts(decoder: _Decoder) -> list[c.Part]:
    activity = decoder.activity
    if activity.name == "adaptiveCard/action" and isinstance(activity.value, dict):
        action = activity.value.get("action")
        if isinstance(action, dict):
            return _card_submission(
                decoder, action.get("data") or {}, title=str(action.get("title", "")), verb=str(action.get("verb", ""))
            )
    if activity.name in CARD_SUBMIT_INVOKES:
        return _card_submission(decoder, activity.value)
    return [native.unsupported(f"teams invoke {activity.name}", {"name": activity.name, "value": activity.value})]


def _edited(decoder: _Decoder) -> c.Message:
    """`messageUpdate` names the edited message by its own id; an undelete restores its content."""
    activity = decoder.activity
    event = str(activity.channelData.get("eventType", "")) or "messageUpdate"
    parts: list[c.Part] = [c.Edit(target=decoder.message_id(activity.id)), *_content_parts(decoder)]
    return decoder.as_message(parts, suffix=f"#{event}@{activity.timestamp}", meta={"teams.event_type": event})


def _reactions(decoder: _Decoder) -> list[c.Part]:
    activity = decoder.activity
    target = decoder.message_id(activity.replyToId) if activity.replyToId else ""
    added = [c.Reaction(emoji=_emoji(r.type), target=target) for r in activity.reactionsAdded]
    removed = [c.Reaction(emoji=_emoji(r.type), target=target, removed=True) for r in activity.reactionsRemoved]
    return [*added, *removed]


def _emoji(reaction_type: str) -> str:
    return REACTION_EMOJI.get(reaction_type, reaction_type)


def _membership(decoder: _Decoder) -> list[c.Envelope]:
    """Members added/removed (or the bot installed/uninstalled) → joined / left activities."""
    activity = decoder.activity
    added, removed = activity.membersAdded, activity.membersRemoved
    if activity.type == "installationUpdate" and activity.recipient is not None:
        installed = activity.action.startswith("add")
        added, removed = ([activity.recipient], []) if installed else ([], [activity.recipient])
    event = {"teams.event_type": activity.channelData["eventType"]} if "eventType" in activity.channelData else {}
    envelopes: list[c.Envelope] = []
    if added:
        envelopes.append(decoder.as_activity("joined", {"members": _members(decoder, added), **event}))
    if removed:
        envelopes.append(decoder.as_activity("left", {"members": _members(decoder, removed), **event}))
    if not envelopes:
        # Channel created/renamed/deleted, team renamed…: no canonical activity says that.
        kept = native.unsupported("teams conversationUpdate", decoder.raw)
        envelopes.append(decoder.as_message([kept], suffix="#update"))
    return envelopes


def _members(decoder: _Decoder, accounts: list[_Account]) -> list[dict[str, str]]:
    bot_id = decoder.activity.recipient.id if decoder.activity.recipient else ""
    return [
        {
            "id": decoder.sender_id(account.id),
            "native_id": account.id,
            "name": account.name,
            "role": "bot" if account.id == bot_id or account.role == "bot" else "user",
        }
        for account in accounts
    ]


def _read_receipt(decoder: _Decoder) -> c.Status:
    """The user read the bot's messages up to `value.lastReadMessageId`."""
    value = decoder.activity.value if isinstance(decoder.activity.value, dict) else {}
    native_id = str(value.get("lastReadMessageId", ""))
    if not native_id:
        raise DecodeError("read receipt without lastReadMessageId", path="$.value.lastReadMessageId")
    ctx = decoder.ctx
    header = decoder.header(None)
    return c.Status(
        id=c.stable_id("status", ctx.tenant, ctx.connection, native_id, "read"),
        native_id=native_id,
        state="read",
        **header,
    )


# ----------------------------------------------------------------------------------------- encoding


class _Encoder:
    """Turns one canonical message into Connector API calls, one activity per call."""

    def __init__(self, message: c.Message, ctx: EncodeContext, base: str) -> None:
        self.message = message
        self.ctx = ctx
        self.activities_url = f"{base}/v3/conversations/{quote(ctx.to, safe='')}/activities"
        self.headers = _headers(ctx)
        # A reply is posted to the replied-to activity; when its native id is unknown the message still
        # goes to the conversation (which, for a channel thread, already is the thread).
        self.reply_to = ctx.native_ids.get(message.reply_to, "") if message.reply_to else ""

    def send(self, parts: list[c.Part]) -> list[OutboundRequest]:
        calls: list[tuple[str, str, dict[str, Any] | None]] = []
        content: list[c.Part] = []
        for part in parts:
            if isinstance(part, c.Delete):
                calls.extend(("POST", self._post_url(), body) for body in _activities(content))
                content = []
                target = native.native_id(self.ctx, part.target, "delete target", "Teams")
                calls.append(("DELETE", self._activity_url(target), None))
            else:
                content.append(part)
        calls.extend(("POST", self._post_url(), body) for body in _activities(content))
        return [self._request(n, method, url, body) for n, (method, url, body) in enumerate(calls)]

    def replace(self, target: str, parts: list[c.Part]) -> list[OutboundRequest]:
        """An edit: the message's new content replaces the target activity (PUT), which must be one."""
        bodies = _activities(parts)
        if len(bodies) != 1:
            raise EncodeError(f"a teams edit replaces one activity, but the new content makes {len(bodies)}")
        body = {**bodies[0], "id": native.native_id(self.ctx, target, "edit target", "Teams")}
        return [self._request(0, "PUT", self._activity_url(body["id"]), body)]

    def _post_url(self) -> str:
        return self._activity_url(self.reply_to) if self.reply_to else self.activities_url

    def _activity_url(self, activity_id: str) -> str:
        return f"{self.activities_url}/{quote(activity_id, safe='')}"

    def _request(self, n: int, method: str, url: str, body: dict[str, Any] | None) -> OutboundRequest:
        if body is not None and self.reply_to and method == "POST":
            body = {**body, "replyToId": self.reply_to}
        return OutboundRequest(
            method=method,
            url=url,
            headers=self.headers if body is not None else {"Authorization": self.headers["Authorization"]},
            body=native.json_body(body) if body is not None else b"",
            idempotency_key=f"{self.message.id}:{n}",
            message_id=self.message.id,
        )


def _headers(ctx: EncodeContext) -> dict[str, str]:
    token = native.required_secret(ctx.secrets, "bot_token", "Teams", "a Bot Framework access token")
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def _activities(parts: list[c.Part]) -> list[dict[str, Any]]:
    """Message activities for `parts`, in order. A text followed by buttons is one activity; text and
    attachments are sent apart (Teams would split them itself and return no id for either)."""
    activities: list[dict[str, Any]] = []
    pending: c.Text | None = None
    for part in parts:
        if isinstance(part, c.Buttons):
            activities.append(_buttons_activity(pending, part))
            pending = None
            continue
        if pending is not None:
            activities.append(_text_activity(pending))
            pending = None
        match part:
            case c.Text():
                pending = part
            case c.Card():
                activities.append(_attachments_activity([_adaptive_card(part)]))
            case c.Carousel():
                carousel = _attachments_activity([_adaptive_card(card) for card in part.cards])
                activities.append({**carousel, "attachmentLayout": "carousel"})
            case c.Media():
                activities.append(_media_activity(part))
            case _:
                raise EncodeError(f"teams cannot send a {part.__struct_config__.tag} part")
    if pending is not None:
        activities.append(_text_activity(pending))
    return activities


def _text_activity(text: c.Text) -> dict[str, Any]:
    """Text in Teams markdown; mentions become `<at>name</at>` with a `mention` entity each."""
    rendered, entities = _with_mentions(text)
    activity: dict[str, Any] = {"type": "message", "text": rendered, "textFormat": _text_format(text)}
    if entities:
        activity["entities"] = entities
    return activity


def _text_format(text: c.Text) -> str:
    return {"markdown": "markdown", "html": "xml"}.get(text.format, "plain")


def _with_mentions(text: c.Text) -> tuple[str, list[dict[str, Any]]]:
    pieces: list[str] = []
    entities: list[dict[str, Any]] = []
    cursor = 0
    for mention in sorted(text.mentions, key=lambda m: m.offset):
        if not mention.native_id or mention.offset < cursor:
            continue
        name = mention.name or text.text[mention.offset : mention.offset + mention.length].lstrip("@")
        tag = f"<at>{name}</at>"
        pieces += [text.text[cursor : mention.offset], tag]
        entities.append({"type": "mention", "text": tag, "mentioned": {"id": mention.native_id, "name": name}})
        cursor = mention.offset + mention.length
    pieces.append(text.text[cursor:])
    return "".join(pieces), entities


def _buttons_activity(text: c.Text | None, buttons: c.Buttons) -> dict[str, Any]:
    """Up to three reply buttons under a text → suggested actions; anything else → an Adaptive Card."""
    said = "\n\n".join(part for part in (text.text if text else "", buttons.text) if part)
    quick_replies = all(button.action == "reply" for button in buttons.buttons)
    if said and quick_replies and len(buttons.buttons) <= SUGGESTED_ACTIONS_SHOWN:
        # The buttons' own text follows the text's, so the text's mention offsets still hold.
        activity = _text_activity(
            c.Text(text=said, format=text.format, mentions=text.mentions) if text else c.Text(text=said)
        )
        actions = [{"type": "imBack", "title": b.title, "value": b.title} for b in buttons.buttons]
        return {**activity, "suggestedActions": {"actions": actions}}
    card = _card_content(body=[_text_block(said)] if said else [], buttons=buttons.buttons)
    return _attachments_activity([{"contentType": ADAPTIVE_CARD, "content": card}])


def _attachments_activity(attachments: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "message", "attachments": attachments}


def _adaptive_card(card: c.Card) -> dict[str, Any]:
    body: list[dict[str, Any]] = []
    if card.title:
        body.append({**_text_block(card.title), "weight": "bolder", "size": "medium"})
    if card.subtitle:
        body.append({**_text_block(card.subtitle), "isSubtle": True})
    if card.media is not None:
        body.append(_image(card.media))
    return {"contentType": ADAPTIVE_CARD, "content": _card_content(body=body, buttons=card.buttons)}


def _card_content(*, body: list[dict[str, Any]], buttons: list[c.Button]) -> dict[str, Any]:
    content: dict[str, Any] = {
        "type": "AdaptiveCard",
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        # Everything used here exists since 1.2, the version older and mobile Teams clients render.
        "version": "1.2",
        "body": body,
    }
    if buttons:
        content["actions"] = [_card_action(button) for button in buttons]
    return content


def _text_block(text: str) -> dict[str, Any]:
    return {"type": "TextBlock", "text": text, "wrap": True}


def _card_action(button: c.Button) -> dict[str, Any]:
    match button.action:
        case "url":
            return {"type": "Action.OpenUrl", "title": button.title, "url": button.value}
        case "postback":
            # Invisible to the chat: Teams sends a message activity whose `value` is this data.
            return {"type": "Action.Submit", "title": button.title, "data": {"id": button.id}}
        case "reply":
            # messageBack echoes the title into the chat as the user's answer and sends the id along.
            message_back = {
                "type": "messageBack",
                "displayText": button.title,
                "text": button.title,
                "value": {"id": button.id},
            }
            return {"type": "Action.Submit", "title": button.title, "data": {"id": button.id, "msteams": message_back}}
    raise EncodeError(f"teams cards have no {button.action} buttons")


def _media_activity(media: c.Media) -> dict[str, Any]:
    """A picture as an attachment; with a caption, as a card (a text beside an attachment would be
    split by Teams into two messages)."""
    if media.caption:
        content = _card_content(body=[_image(media), _text_block(media.caption)], buttons=[])
        return _attachments_activity([{"contentType": ADAPTIVE_CARD, "content": content}])
    attachment = {"contentType": _image_mime(media), "contentUrl": _image_url(media)}
    if media.filename:
        attachment["name"] = media.filename
    return _attachments_activity([attachment])


def _image(media: c.Media) -> dict[str, Any]:
    if media.media != "image":
        raise EncodeError(f"teams cards show images, not {media.media}")
    return {"type": "Image", "url": _image_url(media), "altText": media.caption or media.filename}


def _image_url(media: c.Media) -> str:
    if media.url:
        return media.url
    if media.data:
        # Teams accepts inline pictures as data URIs (base64 images are outside the size limit).
        return f"data:{_image_mime(media)};base64,{b64encode(media.data).decode('ascii')}"
    raise EncodeError("a teams picture needs a url or inline data (teams has no reusable file ids)")


def _image_mime(media: c.Media) -> str:
    return media.mime or mimetypes.guess_type(media.filename or media.url)[0] or "image/png"


def _sent_ids(request: OutboundRequest, response: HttpResponse) -> list[str]:
    """The activity id: from the ResourceResponse, else (update/delete) from the URL itself."""
    if response.body:
        try:
            sent = native.convert(native.read_json(response), _ResourceResponse)
        except DecodeError:
            sent = _ResourceResponse()
        if sent.id:
            return [sent.id]
    if request.method in ("PUT", "DELETE"):
        return [unquote(request.url.rsplit("/", 1)[-1])]
    return []


# =========================================================================================== directory


class _PagedMembers(msgspec.Struct):
    """`PagedMembersResult`: no `continuationToken` on the last page."""

    members: list[Any] = []
    continuationToken: str | None = None


class _DirectoryMember(msgspec.Struct):
    """A `TeamsChannelAccount`."""

    id: str
    name: str = ""
    givenName: str = ""
    surname: str = ""
    email: str = ""
    userPrincipalName: str = ""
    role: str = ""


def _directory_member(raw: Any, path: str) -> DirectoryItem:
    member = native.convert(raw, _DirectoryMember, path)
    name = member.name or f"{member.givenName} {member.surname}".strip()
    return DirectoryItem(id=member.id, name=name, kind="bot" if member.role == "bot" else "user",
                         handle=member.userPrincipalName or member.email,
                         channel_specific=native.unmapped(raw, {"id", "name"}))
