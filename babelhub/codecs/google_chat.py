"""Google Chat apps on an HTTP endpoint (Chat API v1).

Inbound, Google Chat POSTs one interaction event per request with `Authorization: Bearer <JWT>`:
issuer `chat@system.gserviceaccount.com`, audience = the Cloud project number
(`secrets["audience"]`), RS256 with a key from Google's published set for that account
(`secrets["signing_keys"]`: the x509 map as Google serves it, a JWKS or PEM — fetching it is I/O).

* `MESSAGE` → text (user mentions from `annotations`) and attachments.
* `ADDED_TO_SPACE` / `REMOVED_FROM_SPACE` → `joined` / `left` activities (plus the message, when a user
  added the app by @mentioning it).
* `CARD_CLICKED` → `action` (the button's `id` parameter, else the invoked function) and, for dialogs
  and card inputs, a `form` with `common.formInputs`.
* The Google Workspace add-on event format (`{"chat": {"messagePayload": ...}, "commonEventObject": ...}`)
  is read the same way; other event types (app commands, widget updates…) → `unsupported`.
* Credentials in an event — the legacy verification `token`, an add-on's `authorizationEventObject`
  (user OAuth and ID tokens) — are removed before any of it is kept (meta, `unsupported` parts).

A Chat app whose connection setting is Cloud Pub/Sub has Chat publish each event to a topic; a push
subscription then POSTs `{"message": {"data": <the event, base64>, "messageId", "publishTime",
"attributes"}, "subscription"}` with an OIDC token of the subscription's service account
(`Authorization: Bearer`, issuer `accounts.google.com`, audience as configured on the subscription,
`email` = the service account). A connection takes these with `options["pubsub"] = true` and the
secrets `pubsub_audience`, `pubsub_service_account` and `pubsub_signing_keys` (Google's OAuth2 keys,
`https://www.googleapis.com/oauth2/v3/certs`). The event inside is read as if Chat had POSTed it; the
delivery's ids go to `meta["google_chat.pubsub"]`. A body that is neither a Chat event nor a push
envelope is refused as such.

Outbound: `POST {base}/v1/{space}/messages` with `Authorization: Bearer secrets["access_token"]`, the
idempotency key as `requestId` (Chat returns the already-created message for a repeated id), threads via
`thread.name` + `messageReplyOption`. Text is Chat's own markup — `*bold*`, `_italic_`, `~strike~`,
`` `code` ``, `<url|text>` — which is exactly the Slack mrkdwn dialect, so `markup="slack"`. Buttons and
cards become `cardsV2` (button `onClick.action` with parameter `id`, or `onClick.openLink`). Edits are
`PATCH {name}?updateMask=...`, deletes `DELETE {name}`. Reactions need user authentication in Chat,
which an app cannot hold, so they are not offered. The space (`spaces/<id>`) and message names that go
into request paths are checked and their segments escaped: a name that would address another endpoint is
refused.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from datetime import datetime
from functools import partial
from typing import Any, ClassVar, Final
from urllib.parse import quote, urlencode

import msgspec

from babelhub import canonical as c
from babelhub.codecs import jwt, native
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
)
from babelhub.codecs.settings import ConnectionOptions, MissingSetting, Settings
from babelhub.errors import DecodeError, EncodeError, SignatureError

__all__ = ["GoogleChatCodec"]

CHANNEL: Final = "google_chat"
ISSUER: Final = "chat@system.gserviceaccount.com"
"""The `iss` of bearer tokens Chat sends when the authentication audience is the project number."""

PUBSUB_ISSUERS: Final = frozenset({"https://accounts.google.com", "accounts.google.com"})
"""The `iss` of the OIDC tokens Pub/Sub puts on push requests (Google documents both spellings)."""

UNSUPPORTED_BODY: Final = "not a Google Chat event or Pub/Sub push envelope"

DEFAULT_ACTION_FUNCTION: Final = "babelhub_action"
"""The `function` babelhub's buttons invoke; Chat echoes it back as `invokedFunction`."""

THREAD_REPLY: Final = "REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD"

# Resource names that go into request paths. Anything else (`spaces/A/members?x`, `spaces/../…`) would
# address another endpoint, so it is refused; the segments are escaped all the same.
SPACE_NAME: Final = re.compile(r"spaces/[A-Za-z0-9_-]+")
MESSAGE_NAME: Final = re.compile(r"spaces/[A-Za-z0-9_-]+/messages/[A-Za-z0-9_-][A-Za-z0-9_.-]*")

# Classic `space.type` and current `spaceType` → canonical conversation type.
SPACE_TYPES: Final[Mapping[str, c.ConversationType]] = {
    "DIRECT_MESSAGE": "direct",
    "DM": "direct",
    "GROUP_CHAT": "group",
    "SPACE": "channel",
    "ROOM": "channel",
}


# -------------------------------------------------------------------------------------- wire format


class _User(msgspec.Struct, kw_only=True):
    name: str = ""
    displayName: str = ""
    email: str = ""
    type: str = ""


class _Space(msgspec.Struct, kw_only=True):
    name: str = ""
    type: str = ""
    spaceType: str = ""
    displayName: str = ""


class _Thread(msgspec.Struct, kw_only=True):
    name: str = ""
    threadKey: str = ""


class _UserMention(msgspec.Struct, kw_only=True):
    type: str = ""
    user: _User | None = None


class _Annotation(msgspec.Struct, kw_only=True):
    type: str = ""
    startIndex: int = 0
    length: int = 0
    userMention: _UserMention | None = None


class _AttachmentDataRef(msgspec.Struct, kw_only=True):
    resourceName: str = ""


class _DriveDataRef(msgspec.Struct, kw_only=True):
    driveFileId: str = ""


class _Attachment(msgspec.Struct, kw_only=True):
    name: str = ""
    contentName: str = ""
    contentType: str = ""
    downloadUri: str = ""
    thumbnailUri: str = ""
    source: str = ""
    attachmentDataRef: _AttachmentDataRef | None = None
    driveDataRef: _DriveDataRef | None = None


class _Message(msgspec.Struct, kw_only=True):
    name: str = ""
    sender: _User | None = None
    createTime: str = ""
    text: str = ""
    argumentText: str = ""
    thread: _Thread | None = None
    space: _Space | None = None
    annotations: list[_Annotation] = []
    attachment: list[Any] = []
    """Each read on its own (`_Attachment`): one unreadable attachment is an Unsupported part."""
    cardsV2: list[Any] = []
    cards: list[Any] = []
    slashCommand: dict[str, Any] | None = None


class _ActionParameter(msgspec.Struct, kw_only=True):
    key: str = ""
    value: str = ""


class _FormAction(msgspec.Struct, kw_only=True):
    actionMethodName: str = ""
    parameters: list[_ActionParameter] = []


class _Common(msgspec.Struct, kw_only=True):
    invokedFunction: str = ""
    parameters: dict[str, str] = {}
    formInputs: dict[str, Any] = {}


class _Event(msgspec.Struct, kw_only=True):
    """A Chat interaction event (the Chat API's `Event`, `DeprecatedEvent` in the discovery doc)."""

    type: str = ""
    eventTime: str = ""
    message: _Message | None = None
    user: _User | None = None
    space: _Space | None = None
    thread: _Thread | None = None
    action: _FormAction | None = None
    common: _Common | None = None
    isDialogEvent: bool = False
    dialogEventType: str = ""


MAPPED_EVENT_FIELDS: Final = frozenset(
    # `common` (locale, host app, and the form inputs also read into a click's form) is kept whole;
    # `token` is the legacy static verification secret: it must not travel on in meta.
    ({field.encode_name for field in msgspec.structs.fields(_Event)} - {"common"}) | {"token"}
)
"""Event fields decode reads; the others are kept in `meta["google_chat.extra"]`."""

ADD_ON_READ_FIELDS: Final = frozenset({"chat", "authorizationEventObject"})
"""An add-on event's `chat` is read; `authorizationEventObject` holds tokens and never goes to meta."""

CREDENTIAL_FIELDS: Final = frozenset({"token", "authorizationEventObject"})
"""Top-level event fields that are credentials: the legacy static verification `token`, and an add-on
event's `authorizationEventObject` (`userOAuthToken`, `userIdToken`, `systemIdToken`). They are removed
before the event is kept anywhere (meta, `Unsupported.native`)."""


class _AddOnPayload(msgspec.Struct, kw_only=True):
    message: _Message | None = None
    space: _Space | None = None
    isDialogEvent: bool = False
    dialogEventType: str = ""


class _AddOnChat(msgspec.Struct, kw_only=True):
    user: _User | None = None
    space: _Space | None = None
    eventTime: str = ""
    messagePayload: _AddOnPayload | None = None
    addedToSpacePayload: _AddOnPayload | None = None
    removedFromSpacePayload: _AddOnPayload | None = None
    buttonClickedPayload: _AddOnPayload | None = None


class _AddOnEvent(msgspec.Struct, kw_only=True):
    """A Google Workspace add-on event object whose host app is Chat."""

    chat: _AddOnChat
    commonEventObject: _Common | None = None


# The add-on payload that says which interaction happened, and its classic event type.
ADD_ON_TYPES: Final = (
    ("messagePayload", "MESSAGE"),
    ("addedToSpacePayload", "ADDED_TO_SPACE"),
    ("removedFromSpacePayload", "REMOVED_FROM_SPACE"),
    ("buttonClickedPayload", "CARD_CLICKED"),
)


class _ApiError(msgspec.Struct, kw_only=True):
    code: int = 0
    message: str = ""
    status: str = ""


class _ErrorResponse(msgspec.Struct, kw_only=True):
    error: _ApiError | None = None


class _Created(msgspec.Struct, kw_only=True):
    name: str = ""


class _PubSubMessage(msgspec.Struct, kw_only=True):
    data: str = ""
    messageId: str = ""
    publishTime: str = ""
    attributes: dict[str, str] = {}


class _PushEnvelope(msgspec.Struct, kw_only=True):
    """What a Pub/Sub push subscription POSTs: one message and the subscription it came through."""

    message: _PubSubMessage
    subscription: str = ""


# -------------------------------------------------------------------------------------------- codec


class GoogleChatSecrets(Settings, frozen=True, kw_only=True):
    access_token: str
    """An OAuth access token of the app (refreshed outside the hub): sends carry it as a bearer token."""
    audience: str = ""
    """The Cloud project number, the audience of Chat's bearer JWTs (needed unless `options.pubsub`)."""
    signing_keys: str = ""
    """The public keys of `chat@system.gserviceaccount.com`: the x509 map Google serves, a JWKS or PEM
    (needed unless `options.pubsub`)."""
    pubsub_audience: str = ""
    """With `options.pubsub`: the push subscription's OIDC audience (by default its push endpoint URL)."""
    pubsub_service_account: str = ""
    """With `options.pubsub`: the service account the push subscription signs its tokens as."""
    pubsub_signing_keys: str = ""
    """With `options.pubsub`: Google's OAuth2 keys (`https://www.googleapis.com/oauth2/v3/certs`)."""


class GoogleChatOptions(ConnectionOptions, frozen=True, kw_only=True):
    pubsub: bool = False
    """True: the app's events come through a Cloud Pub/Sub push subscription (the `pubsub_*` secrets)."""
    action_function: str = DEFAULT_ACTION_FUNCTION
    """The function name button clicks invoke (the click's `id` parameter names the button)."""
    directory_space: str = ""
    """The space (`spaces/<id>`) whose members the directory API lists as contacts (`spaces.members.list`);
    unset: `/v1/connections/{id}/contacts` answers 501."""


class GoogleChatCodec(Codec):
    channel: ClassVar[str] = CHANNEL
    secret_settings: ClassVar[type[Settings]] = GoogleChatSecrets
    option_settings: ClassVar[type[Settings]] = GoogleChatOptions
    default_api_base: ClassVar[str] = "https://chat.googleapis.com"
    # Usage limits: 3,000 message writes per minute per project.
    send_rate: ClassVar[float] = 50.0
    capabilities: ClassVar[Capabilities] = Capabilities(
        parts=frozenset({"text", "media", "buttons", "card", "edit", "delete"}),
        # Pictures go out as card image widgets (by URL); uploading files is a separate media API.
        media=frozenset({"image"}),
        # A message (text and cards) is at most 32,000 bytes: 8,000 characters fit even at 4 bytes each.
        text_limit=8_000,
        caption_limit=8_000,
        markup="slack",
        # Chat documents no per-list button limit, only 100 widgets and 32 KB per card.
        max_buttons=10,
        max_button_title=40,
        button_actions=frozenset({"reply", "postback", "url"}),
        reply=True,
        edit=True,
        delete=True,
        reaction=False,
        typing=False,
    )

    def check_settings(self, secrets: GoogleChatSecrets, options: GoogleChatOptions) -> None:
        """Events come from Chat itself (its JWTs) or, with `options.pubsub`, through Pub/Sub push."""
        needed: tuple[str, ...]
        if options.pubsub:
            needed = ("pubsub_audience", "pubsub_service_account", "pubsub_signing_keys")
            reason = "options.pubsub takes Pub/Sub push deliveries, checked with it"
        else:
            needed = ("audience", "signing_keys")
            reason = "Chat's bearer tokens are checked with it (or set options.pubsub for Pub/Sub push)"
        for name in needed:
            if not getattr(secrets, name):
                raise MissingSetting(f"secrets.{name}", reason)

    def verify(self, request: HttpRequest, secrets: Mapping[str, str]) -> None:
        """The bearer token must be a JWT from Chat's service account for this project number; a Pub/Sub
        push envelope's, an OIDC token of the push subscription's service account (see the module doc)."""
        if _is_push(_json_or_none(request)):
            _verify_push(request, secrets)
            return
        jwt.verify_rs256(
            jwt.bearer_token(request),
            secrets.get("signing_keys", ""),
            issuers={ISSUER},
            audience=secrets.get("audience", ""),
            now=request.received_at or None,
        )

    def dedup_key(self, request: HttpRequest) -> str:
        raw = native.read_json(request)
        if _is_push(raw):
            # Pub/Sub redelivers a message with its id. The event inside is read by decode, so that a
            # message Pub/Sub cannot get acknowledged (an error answer) is not pushed again and again.
            message_id = native.convert(raw, _PushEnvelope).message.messageId
            return f"pubsub:{message_id}" if message_id else ""
        # A card can be clicked many times: the event's time and user are part of the key.
        event = _read_event(_chat_event(raw, "$"))
        if not event.eventTime:
            return ""
        space = _space_of(event)
        user = event.user.name if event.user else ""
        message = event.message.name if event.message else ""
        return "|".join((event.type, space.name if space else "", message, user, event.eventTime))

    # ------------------------------------------------------------------------------------- decode

    def decode(self, request: HttpRequest, ctx: DecodeContext) -> list[c.Envelope]:
        raw = native.read_json(request)
        if _is_push(raw):
            return _decode_push(raw, ctx)
        return _decode_event(_chat_event(raw, "$"), ctx)

    # ------------------------------------------------------------------------------------- encode

    def encode(self, message: c.Message, ctx: EncodeContext) -> list[OutboundRequest]:
        encoder = _Encoder(message, ctx, self.api_base(ctx))
        edits = [part for part in message.parts if isinstance(part, c.Edit)]
        if edits:
            return encoder.replace(edits[0].target, [p for p in message.parts if not isinstance(p, c.Edit)])
        return encoder.send(message.parts)

    def safe_to_resend(self, request: OutboundRequest) -> bool:
        """A create carries `requestId` (Chat returns the message already made for an id it saw); edits
        and deletions set rather than add."""
        return request.method in ("PATCH", "PUT", "DELETE") or "requestId=" in request.url

    # ------------------------------------------------------------------------------------ directory

    def directory_request(self, kind: DirectoryKind, ctx: EncodeContext, cursor: str,
                          limit: int) -> OutboundRequest | None:
        """`spaces.list` (chats: every space the app is in; channels: `spaceType = "SPACE"` only) or
        `spaces.members.list` of `options.directory_space` (contacts), paged by Chat's `nextPageToken`."""
        query = {"pageSize": str(limit), **({"pageToken": cursor} if cursor else {})}
        if kind == "contacts":
            space = str(ctx.options.get("directory_space", ""))
            if not SPACE_NAME.fullmatch(space):
                raise EncodeError("set the connection's options.directory_space to the space (spaces/<id>) to list")
            path = f"v1/{space}/members"
        else:
            path = "v1/spaces"
            if kind == "channels":
                query["filter"] = 'spaceType = "SPACE"'
        token = native.required_secret(ctx.secrets, "access_token", "Google Chat", "an OAuth token of the app")
        return OutboundRequest(method="GET", url=f"{self.api_base(ctx)}/{path}?{urlencode(query)}",
                               headers={"Authorization": f"Bearer {token}"})

    def parse_directory(self, kind: DirectoryKind, request: OutboundRequest, response: HttpResponse,
                        cursor: str, limit: int) -> DirectoryPage:
        answer = native.convert(native.read_json(response), _ListAnswer)
        if kind == "contacts":
            items = [_directory_member(raw, f"$.memberships[{index}]") for index, raw in enumerate(answer.memberships)]
        else:
            items = [_directory_space(raw, f"$.spaces[{index}]") for index, raw in enumerate(answer.spaces)]
        return DirectoryPage(items=items, next_cursor=answer.nextPageToken)

    def parse_response(self, request: OutboundRequest, response: HttpResponse) -> SendResult:
        if 200 <= response.status < 300:
            return SendResult(ok=True, native_ids=_sent_names(request, response))
        try:
            error = native.convert(native.read_json(response), _ErrorResponse).error or _ApiError()
        except DecodeError:
            error = _ApiError()
        return native.http_failure(response, code=error.status, message=error.message)


# ----------------------------------------------------------------------------------------- decoding


def _decode_event(raw: Any, ctx: DecodeContext, delivery: Mapping[str, Any] | None = None) -> list[c.Envelope]:
    decoder = _Decoder(_read_event(raw), raw, ctx, delivery)
    event = decoder.event
    match event.type:
        case "MESSAGE" if event.message is not None:
            return [decoder.as_message(event.message)]
        case "ADDED_TO_SPACE":
            joined: list[c.Envelope] = [decoder.as_activity("joined")]
            return joined + ([decoder.as_message(event.message)] if event.message else [])
        case "REMOVED_FROM_SPACE":
            return [decoder.as_activity("left")]
        case "CARD_CLICKED":
            return [decoder.as_click()]
    return [decoder.as_unsupported()]


def _chat_event(raw: Any, path: str) -> Any:
    """`raw` if it is a Chat interaction event (classic or add-on); else a DecodeError naming the formats
    this codec reads, rather than the first field such a body lacks."""
    if isinstance(raw, dict) and ("type" in raw or "chat" in raw):
        return raw
    raise DecodeError(UNSUPPORTED_BODY, path=path)


def _is_push(raw: Any) -> bool:
    """A Pub/Sub push envelope: a `message` object and the `subscription` it was pushed through (a Chat
    event names its `type`, an add-on event its `chat`)."""
    return (
        isinstance(raw, dict)
        and isinstance(raw.get("message"), dict)
        and "subscription" in raw
        and "type" not in raw
        and "chat" not in raw
    )


def _json_or_none(request: HttpRequest) -> Any:
    try:
        return native.read_json(request)
    except DecodeError:
        return None


def _verify_push(request: HttpRequest, secrets: Mapping[str, str]) -> None:
    """Pub/Sub's OIDC token: Google-signed, for the subscription's audience, naming its service account."""
    audience, account = secrets.get("pubsub_audience", ""), secrets.get("pubsub_service_account", "")
    if not audience or not account:
        raise SignatureError(
            "a Pub/Sub push delivery, but this connection takes none: set the secrets pubsub_audience, "
            "pubsub_service_account and pubsub_signing_keys"
        )
    token = jwt.verify_rs256(
        jwt.bearer_token(request),
        secrets.get("pubsub_signing_keys", ""),
        issuers=PUBSUB_ISSUERS,
        audience=audience,
        now=request.received_at or None,
    )
    email = token.claims.get("email")
    if email != account or token.claims.get("email_verified") is not True:
        raise SignatureError(f"token email {email!r} is not the push subscription's verified service account")


def _decode_push(raw: Any, ctx: DecodeContext) -> list[c.Envelope]:
    """The Chat event inside a Pub/Sub push envelope, decoded as if Chat had POSTed it. Paths of what is
    wrong inside the event are given under `$.message.data`, where the event lies base64-encoded."""
    if not ctx.options.get("pubsub"):
        raise DecodeError(
            "a Pub/Sub push envelope, but this connection does not take Pub/Sub deliveries (options.pubsub)",
            path="$.message",
        )
    push = native.convert(raw, _PushEnvelope)
    try:
        data = base64.b64decode(push.message.data, validate=True)
    except (binascii.Error, ValueError):
        raise DecodeError("message data is not base64", path="$.message.data") from None
    delivery = {
        "subscription": push.subscription,
        "message_id": push.message.messageId,
        "publish_time": push.message.publishTime,
        "attributes": push.message.attributes,
    }
    try:
        event = _chat_event(native.read_json(HttpRequest(body=data)), "$")
        return _decode_event(event, ctx, {key: value for key, value in delivery.items() if value})
    except DecodeError as exc:
        raise DecodeError(exc.reason, path="$.message.data" + exc.path.removeprefix("$")) from None


def _read_event(raw: Any) -> _Event:
    """A classic interaction event, or an add-on event put into the same shape."""
    if _is_add_on(raw):
        return _from_add_on(native.convert(raw, _AddOnEvent))
    return native.convert(raw, _Event)


def _is_add_on(raw: Any) -> bool:
    """The Workspace add-on event format: `chat` instead of the classic event's `type`."""
    return isinstance(raw, dict) and "chat" in raw and "type" not in raw


def _from_add_on(add_on: _AddOnEvent) -> _Event:
    chat = add_on.chat
    for field, event_type in ADD_ON_TYPES:
        payload: _AddOnPayload | None = getattr(chat, field)
        if payload is not None:
            return _Event(
                type=event_type,
                eventTime=chat.eventTime,
                message=payload.message,
                user=chat.user,
                space=payload.space or chat.space,
                common=add_on.commonEventObject,
                isDialogEvent=payload.isDialogEvent,
                dialogEventType=payload.dialogEventType,
            )
    return _Event(type="ADD_ON", eventTime=chat.eventTime, user=chat.user, space=chat.space)


def _space_of(event: _Event) -> _Space | None:
    if event.space is not None and event.space.name:
        return event.space
    if event.message is not None and event.message.space is not None:
        return event.message.space
    return None


class _Decoder:
    """One interaction event and the envelope header it gives."""

    def __init__(self, event: _Event, raw: Any, ctx: DecodeContext, delivery: Mapping[str, Any] | None = None) -> None:
        space = _space_of(event)
        if space is None or not space.name:
            raise DecodeError("event has no space name", path="$.space.name")
        self.event = event
        # Every copy of the raw event an envelope keeps is made from this one, so it holds no secrets.
        self.raw = native.without(raw, CREDENTIAL_FIELDS)  # kept in meta and unsupported parts
        self.add_on = _is_add_on(raw)
        self.ctx = ctx
        self.space = space
        self.ts = native.parse_time(event.eventTime, "$.eventTime") if event.eventTime else None
        self.delivery = dict(delivery or {})
        """How the event came, when not straight from Chat (the Pub/Sub message's ids)."""

    def message_id(self, name: str) -> str:
        # A message name (`spaces/S/messages/M`) is unique in all of Chat.
        return c.message_id(self.ctx.tenant, self.ctx.connection, name)

    def as_message(self, message: _Message) -> c.Message:
        ts = native.parse_time(message.createTime, "$.message.createTime") if message.createTime else self._event_time()
        parts = _message_parts(self, message) or [c.Unsupported(reason="google chat empty message", native=self.raw)]
        return c.Message(
            id=self.message_id(message.name or self._event_key()),
            parts=parts,
            **self._header(message, ts),
        )

    def as_click(self) -> c.Message:
        event = self.event
        parameters = dict(event.common.parameters) if event.common else {}
        if event.action is not None:
            parameters |= {p.key: p.value for p in event.action.parameters}
        function = (event.common.invokedFunction if event.common else "") or (
            event.action.actionMethodName if event.action else ""
        )
        action_id = parameters.get("id") or function
        card = event.message
        parts: list[c.Part] = [c.Action(id=action_id, source=self.message_id(card.name) if card and card.name else "")]
        inputs_path = "$.commonEventObject.formInputs" if self.add_on else "$.common.formInputs"
        form = _form(action_id, event.common.formInputs if event.common else {}, inputs_path)
        if form is not None:
            parts.append(form)
        meta = {
            "google_chat.function": function,
            "google_chat.parameters": parameters,
            "google_chat.dialog_event_type": event.dialogEventType,
        }
        return c.Message(
            id=self.message_id(f"{self._event_key()}#click"),
            parts=parts,
            **self._header(card, self._event_time(), {k: v for k, v in meta.items() if v}),
        )

    def as_activity(self, kind: c.ActivityType) -> c.Activity:
        # The app itself joined or left; the event's user is who added or removed it.
        return c.Activity(
            id=c.stable_id("activity", self.ctx.tenant, self.ctx.connection, self._event_key(), kind),
            activity=kind,
            detail={"members": [{"role": "bot", "native_id": "users/app"}]},
            **self._header(None, self._event_time()),
        )

    def as_unsupported(self) -> c.Message:
        reason = f"google chat {self.event.type or 'unknown'} event"
        return c.Message(
            id=self.message_id(f"{self._event_key()}#{self.event.type}"),
            parts=[c.Unsupported(reason=reason, native=self.raw)],
            **self._header(self.event.message, self._event_time()),
        )

    def _event_key(self) -> str:
        event = self.event
        user = event.user.name if event.user else ""
        return f"{self.space.name}|{event.type}|{user}|{event.eventTime}"

    def _event_time(self) -> datetime:
        if self.ts is None:
            raise DecodeError("event has no eventTime", path="$.eventTime")
        return self.ts

    def _header(self, message: _Message | None, ts: datetime, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
        thread = message.thread if message and message.thread else self.event.thread
        all_meta = {**self._event_meta(), **_message_meta(message), **(meta or {})}
        if thread is not None and thread.name:
            all_meta["google_chat.thread_name"] = thread.name
        space_type = SPACE_TYPES.get(self.space.spaceType or self.space.type, "channel")
        return {
            "tenant": self.ctx.tenant,
            "conversation": native.conversation(self.ctx, CHANNEL, self.space.name, space_type),
            "ts": ts,
            "sender": self._sender(),
            "native": c.Native(id=message.name if message else "", seq=self.ctx.seq,
                               thread=thread.name if thread is not None and thread.name else ""),
            # Chat threads are resources of their own (`spaces/S/threads/T`), keyed here by that name.
            "thread": self.message_id(thread.name) if thread is not None and thread.name else "",
            "meta": all_meta,
        }

    def _event_meta(self) -> dict[str, Any]:
        """Event fields no part carries (dialog flags, redirect URL…), minus secrets."""
        meta: dict[str, Any] = {}
        if self.delivery:
            meta["google_chat.pubsub"] = self.delivery
        if self.space.displayName:
            meta["google_chat.space_display_name"] = self.space.displayName
        read = ADD_ON_READ_FIELDS if self.add_on else MAPPED_EVENT_FIELDS
        native.keep_unmapped(meta, "google_chat.extra", self.raw, read)
        return meta

    def _sender(self) -> c.Sender | None:
        user = self.event.user
        if user is None or not user.name:
            return None
        return native.sender(
            self.ctx, user.name,
            name=user.displayName,
            role="bot" if user.type == "BOT" else "user",
            handle=user.email,
        )


def _message_parts(decoder: _Decoder, message: _Message) -> list[c.Part]:
    parts: list[c.Part] = []
    if message.text:
        parts.append(_text(decoder, message))
    for n, attachment in enumerate(message.attachment):
        parts.extend(native.lenient_parts(partial(_media, attachment, n), attachment, "google chat attachment"))
    if message.cardsV2 or message.cards:
        # Cards in a received message are the app's own (or another app's): kept, not interpreted.
        parts.append(c.Unsupported(reason="google chat cards", native=message.cardsV2 or message.cards))
    return parts


def _text(decoder: _Decoder, message: _Message) -> c.Text:
    mentions = [
        c.Mention(
            id=c.sender_id(decoder.ctx.tenant, decoder.ctx.connection, note.userMention.user.name),
            native_id=note.userMention.user.name,
            name=note.userMention.user.displayName,
            offset=note.startIndex,
            length=note.length,
        )
        for note in message.annotations
        if note.type == "USER_MENTION" and note.userMention is not None and note.userMention.user is not None
    ]
    return c.Text(text=message.text, format="slack", mentions=mentions)


def _attachment_name(raw: Any) -> str:
    return native.str_field(raw, "name") if isinstance(raw, dict) else ""


def _media(raw: Any, n: int) -> c.Media:
    attachment = native.convert(raw, _Attachment, f"attachment[{n}]")
    mime = attachment.contentType
    file_id = (attachment.attachmentDataRef.resourceName if attachment.attachmentDataRef else "") or (
        attachment.driveDataRef.driveFileId if attachment.driveDataRef else ""
    )
    return c.Media(
        media=native.media_kind(mime),
        url=attachment.downloadUri,
        file_id=file_id,
        mime=mime,
        filename=attachment.contentName,
    )


def _message_meta(message: _Message | None) -> dict[str, Any]:
    if message is None:
        return {}
    meta = {
        "google_chat.argument_text": message.argumentText,
        "google_chat.slash_command": message.slashCommand,
        "google_chat.attachment_names": [name for a in message.attachment if (name := _attachment_name(a))],
    }
    return {key: value for key, value in meta.items() if value}


def _form(form_id: str, inputs: Mapping[str, Any], path: str) -> c.Form | None:
    """`common.formInputs` (one entry per input widget name) as a submitted form."""
    fields = [_form_field(name, value, f"{path}.{name}") for name, value in inputs.items() if isinstance(value, dict)]
    return c.Form(id=form_id, fields=fields) if fields else None


def _form_field(name: str, inputs: Mapping[str, Any], path: str) -> c.FormField:
    """One input's value, by the Chat API's `Inputs` shape: `stringInputs.value` (a list of strings),
    `dateTimeInput` / `dateInput` `.msSinceEpoch` (an int64, as JSON string or number), `timeInput`
    `.hours` / `.minutes`."""
    if isinstance(inputs.get("stringInputs"), dict):
        values = _strings(inputs["stringInputs"].get("value"), f"{path}.stringInputs.value")
        return c.FormField(id=name, kind="text", value=values[0] if len(values) == 1 else values)
    for key, kind in (("dateTimeInput", "datetime"), ("dateInput", "date")):
        if isinstance(inputs.get(key), dict):
            value = _integer(inputs[key].get("msSinceEpoch", 0), f"{path}.{key}.msSinceEpoch")
            return c.FormField(id=name, kind=kind, value=value)
    if isinstance(inputs.get("timeInput"), dict):
        time_input = inputs["timeInput"]
        hours = _integer(time_input.get("hours", 0), f"{path}.timeInput.hours")
        minutes = _integer(time_input.get("minutes", 0), f"{path}.timeInput.minutes")
        return c.FormField(id=name, kind="time", value=f"{hours:02}:{minutes:02}")
    return c.FormField(id=name, kind="unknown", value=dict(inputs))


def _strings(value: Any, path: str) -> list[str]:
    """A list of strings; missing or null is none, a lone string is one."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise DecodeError(f"expected a list of strings, got {type(value).__name__}", path=path)
    for n, item in enumerate(value):
        if not isinstance(item, str):
            raise DecodeError(f"expected a string, got {type(item).__name__}", path=f"{path}[{n}]")
    return value


_INTEGER: Final = re.compile(r"-?[0-9]{1,20}")


def _integer(value: Any, path: str) -> int:
    """A JSON integer, or an int64 the way Google's JSON writes it: as a string of digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        return int(value)
    raise DecodeError(f"expected an integer, got {value!r}", path=path)


# ----------------------------------------------------------------------------------------- encoding


class _Draft(msgspec.Struct, kw_only=True):
    """One Chat message being assembled: a text and the cards below it."""

    text: str = ""
    cards: list[dict[str, Any]] = []

    def empty(self) -> bool:
        return not self.text and not self.cards


class _Encoder:
    def __init__(self, message: c.Message, ctx: EncodeContext, base: str) -> None:
        if not SPACE_NAME.fullmatch(ctx.to):
            raise EncodeError(f"a google chat space is named spaces/<id> (letters, digits, _ and -), not {ctx.to!r}")
        token = native.required_secret(ctx.secrets, "access_token", "Google Chat", "an OAuth token of the app")
        self.message = message
        self.ctx = ctx
        self.base = base
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.function = str(ctx.options.get("action_function", DEFAULT_ACTION_FUNCTION))

    def send(self, parts: list[c.Part]) -> list[OutboundRequest]:
        calls: list[tuple[str, str, dict[str, Any] | None]] = []
        for item in self._drafts_and_deletes(parts):
            if isinstance(item, c.Delete):
                calls.append(("DELETE", f"{self.base}/v1/{self._native(item.target, 'delete')}", None))
            else:
                calls.append(("POST", self._create_url(len(calls)), self._body(item)))
        return [self._request(n, method, url, body) for n, (method, url, body) in enumerate(calls)]

    def replace(self, target: str, parts: list[c.Part]) -> list[OutboundRequest]:
        """An edit: PATCH the message's text and cards (only the fields the new content has)."""
        drafts = [item for item in self._drafts_and_deletes(parts) if isinstance(item, _Draft)]
        if len(drafts) != 1:
            raise EncodeError(f"a google chat edit replaces one message, but the new content makes {len(drafts)}")
        body = self._body(drafts[0], threaded=False)
        mask = ",".join(field for field, key in (("text", "text"), ("cards_v2", "cardsV2")) if key in body)
        url = f"{self.base}/v1/{self._native(target, 'edit')}?{urlencode({'updateMask': mask})}"
        return [self._request(0, "PATCH", url, body)]

    def _drafts_and_deletes(self, parts: list[c.Part]) -> list[_Draft | c.Delete]:
        """Group parts into messages: a text and the buttons or cards after it make one message."""
        items: list[_Draft | c.Delete] = []
        draft = _Draft()
        for part in parts:
            if isinstance(part, c.Text | c.Delete) and not draft.empty():
                items.append(draft)
                draft = _Draft()
            match part:
                case c.Text():
                    draft.text = _with_mentions(part)
                case c.Delete():
                    items.append(part)
                case c.Buttons():
                    # The buttons' own text is the message text, or a paragraph above them when the
                    # message already has one.
                    above: list[dict[str, Any]] = []
                    if part.text and not draft.text:
                        draft.text = part.text
                    elif part.text:
                        above = [_paragraph(part.text)]
                    draft.cards.append(self._card(above, part.buttons, len(draft.cards)))
                case c.Card():
                    draft.cards.append(self._card_part(part, len(draft.cards)))
                case c.Media():
                    widgets = [_image(part)] + ([_paragraph(part.caption)] if part.caption else [])
                    draft.cards.append(self._card(widgets, [], len(draft.cards)))
                case _:
                    raise EncodeError(f"google chat cannot send a {part.__struct_config__.tag} part")
        if not draft.empty():
            items.append(draft)
        return items

    def _card_part(self, card: c.Card, index: int) -> dict[str, Any]:
        widgets = [_image(card.media)] if card.media is not None else []
        built = self._card(widgets, card.buttons, index)
        if card.title:
            header = {"title": card.title, **({"subtitle": card.subtitle} if card.subtitle else {})}
            built["card"]["header"] = header
        elif card.subtitle:
            built["card"]["sections"][0]["widgets"].insert(0, _paragraph(card.subtitle))
        return built

    def _card(self, widgets: list[dict[str, Any]], buttons: list[c.Button], index: int) -> dict[str, Any]:
        if buttons:
            widgets = [*widgets, {"buttonList": {"buttons": [self._button(button) for button in buttons]}}]
        if not widgets:
            raise EncodeError("a google chat card needs at least one widget")
        # `cardId` is required once a message holds several cards; unique per message.
        return {"cardId": f"{self.message.id}-{index}", "card": {"sections": [{"widgets": widgets}]}}

    def _button(self, button: c.Button) -> dict[str, Any]:
        match button.action:
            case "url":
                return {"text": button.title, "onClick": {"openLink": {"url": button.value}}}
            case "reply" | "postback":
                parameters = [{"key": "id", "value": button.id}]
                return {
                    "text": button.title,
                    "onClick": {"action": {"function": self.function, "parameters": parameters}},
                }
        raise EncodeError(f"google chat cards have no {button.action} buttons")

    def _body(self, draft: _Draft, *, threaded: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if draft.text:
            body["text"] = draft.text
        if draft.cards:
            body["cardsV2"] = draft.cards
        thread = self._thread() if threaded else ""
        if thread:
            body["thread"] = {"name": thread}
        return body

    def _thread(self) -> str:
        """The thread to post in: named in meta, or the native thread of the message's `thread`."""
        named = self.message.meta.get("google_chat.thread_name")
        if isinstance(named, str) and named:
            return named
        return self.ctx.native_ids.get(self.message.thread, "") if self.message.thread else ""

    def _create_url(self, n: int) -> str:
        # requestId makes the create idempotent: Chat returns the message already made for that id.
        query = {"requestId": f"{self.message.id}:{n}"}
        if self._thread():
            query["messageReplyOption"] = THREAD_REPLY
        return f"{self.base}/v1/{_path(self.ctx.to)}/messages?{urlencode(query)}"

    def _native(self, canonical_id: str, what: str) -> str:
        """The message's resource name, as a URL path (validated and escaped)."""
        name = native.native_id(self.ctx, canonical_id, f"{what} target", "Google Chat")
        if not MESSAGE_NAME.fullmatch(name):
            raise EncodeError(f"cannot {what} message {canonical_id!r}: {name!r} is no google chat message name")
        return _path(name)

    def _request(self, n: int, method: str, url: str, body: dict[str, Any] | None) -> OutboundRequest:
        headers = self.headers if body is not None else {"Authorization": self.headers["Authorization"]}
        return OutboundRequest(
            method=method,
            url=url,
            headers=headers,
            body=native.json_body(body) if body is not None else b"",
            idempotency_key=f"{self.message.id}:{n}",
            message_id=self.message.id,
        )


def _with_mentions(text: c.Text) -> str:
    """Mentions written the Chat way, `<users/123>`, in place of their span of the text."""
    pieces: list[str] = []
    cursor = 0
    for mention in sorted(text.mentions, key=lambda m: m.offset):
        if not mention.native_id.startswith("users/") or mention.offset < cursor:
            continue
        pieces += [text.text[cursor : mention.offset], f"<{mention.native_id}>"]
        cursor = mention.offset + mention.length
    pieces.append(text.text[cursor:])
    return "".join(pieces)


def _path(name: str) -> str:
    """A resource name with each of its segments escaped for a URL path."""
    return "/".join(quote(segment, safe="") for segment in name.split("/"))


def _paragraph(text: str) -> dict[str, Any]:
    return {"textParagraph": {"text": text}}


def _image(media: c.Media) -> dict[str, Any]:
    if media.media != "image" or not media.url:
        raise EncodeError("google chat cards show images by URL only")
    return {"image": {"imageUrl": media.url, "altText": media.caption or media.filename}}


def _sent_names(request: OutboundRequest, response: HttpResponse) -> list[str]:
    """The message's resource name: from the returned Message, or (delete) the URL itself."""
    if response.body:
        try:
            created = native.convert(native.read_json(response), _Created)
        except DecodeError:
            created = _Created()
        if created.name:
            return [created.name]
    if request.method in ("DELETE", "PATCH"):
        return [request.url.split("/v1/", 1)[-1].split("?", 1)[0]]
    return []


# =========================================================================================== directory

#: Space types (`Space.spaceType`) as directory kinds.
_SPACE_KINDS: Final[dict[str, ItemKind]] = {"SPACE": "channel", "GROUP_CHAT": "group", "DIRECT_MESSAGE": "direct"}


class _ListAnswer(msgspec.Struct):
    """`ListSpacesResponse` or `ListMembershipsResponse`."""

    spaces: list[Any] = []
    memberships: list[Any] = []
    nextPageToken: str = ""


class _DirectorySpace(msgspec.Struct, rename="camel"):
    name: str
    display_name: str = ""
    space_type: str = ""


class _DirectoryMembership(msgspec.Struct):
    member: _User | None = None
    groupMember: _User | None = None


def _directory_space(raw: Any, path: str) -> DirectoryItem:
    space = native.convert(raw, _DirectorySpace, path)
    return DirectoryItem(id=space.name, name=space.display_name, kind=_SPACE_KINDS.get(space.space_type, "other"),
                         channel_specific=native.unmapped(raw, {"name", "displayName"}))


def _directory_member(raw: Any, path: str) -> DirectoryItem:
    """A membership: of a user (`member`, `users/<id>`) or of a Google Group (`groupMember`, `groups/<id>`)."""
    membership = native.convert(raw, _DirectoryMembership, path)
    if membership.member is None and membership.groupMember is not None:
        group = membership.groupMember
        return DirectoryItem(id=group.name, kind="group", channel_specific=native.unmapped(raw, {"groupMember"}))
    user = membership.member or _User()
    if not user.name:
        raise DecodeError("a membership names its member", path=f"{path}.member.name")
    return DirectoryItem(id=user.name, name=user.displayName, kind="bot" if user.type == "BOT" else "user",
                         handle=user.email, channel_specific=native.unmapped(raw, {"member"}))
