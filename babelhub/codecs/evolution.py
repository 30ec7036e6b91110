"""Evolution API codec: WhatsApp through a self-hosted Evolution API v2 server.

Evolution API (github.com/EvolutionAPI/evolution-api) keeps one WhatsApp session per *instance* (a
WhatsApp Web session through Baileys, or the Cloud API) and relays what happens as webhooks. Every
webhook has the same envelope (`webhook.controller.ts`):

    {"event": "messages.upsert", "instance": <instance name>, "data": {...}, "destination": <our URL>,
     "date_time": <ISO time>, "sender": <the instance's own JID>, "server_url": ..., "apikey": ...}

`data` is the event's object; what each event becomes:

* `messages.upsert` (a message arrived, or was sent from the phone) and `send.message` (the API sent
  one): `{key: {remoteJid, fromMe, id, participant?}, pushName, message: {<WhatsApp message type>: …},
  contextInfo, messageType, messageTimestamp, …}` → `Message`. Since v2.2 Evolution rewrites
  `extendedTextMessage` into `conversation` and lifts `contextInfo` up into `data`; both shapes are read.
  `fromMe: true` is the instance's own message: it is decoded with direction "outbound" and meta
  `evolution.from_me`, so the hub files it as history and never hands it to the app as user input.
* `messages.update` `{keyId, remoteJid, fromMe, participant, status}` → `Status` of a message we sent
  (SERVER_ACK → sent, DELIVERY_ACK → delivered, READ → read, PLAYED → played, ERROR → failed). On a
  message we received, READ and PLAYED are our own read marks → `Activity` "read", direction outbound.
* `messages.delete` → `Delete`; `messages.edited` and `send.message.update` → `Edit` (or `Delete` for a
  revoke). Evolution forwards only the protocol message of an edit, whose key names the chat as the
  editor's phone saw it: the target id is exact, the conversation may be the instance's own chat.
* `presence.update` → `Activity` "typing" (composing, recording) or "presence" (available, unavailable,
  paused); `group-participants.update` add / remove → "joined" / "left".
* Everything else (connection.update, qrcode.updated, chats.*, contacts.*, call, labels.*, …) → a system
  `Message` in the instance's own conversation carrying `data` verbatim as an `Unsupported` part.

Credentials never leave the codec: the webhook's `apikey` (the instance token) and any field named like a
credential (`apikey`, `token`, `jwt`, …) are dropped wherever they appear, and a qrcode.updated event keeps
only that a QR code was issued — its `code`, `base64` image and `pairingCode` would let whoever sees them
link a device to the WhatsApp account, so they read "[redacted]".

Media files sit encrypted on WhatsApp's servers, so the `url` of a media message is not a usable link and
stays in meta. `Media.file_id` is the message id, which is what Evolution's
`POST /chat/getBase64FromMediaMessage/{instance}` takes to download it; `Media.url` is Evolution's S3 copy
(`message.mediaUrl`) and `Media.data` the bytes when the webhook is set up with `base64: true`.

Outbound, every API call is `POST {api_base}/message/send<Kind>/{instance}` with the `apikey` header;
the answer is the sent message, whose `key.id` is the native id.

Connection settings — api_base: the server's URL (required: Evolution is self-hosted); options:
`instance` (required), `delay` (milliseconds of "typing…" Evolution shows before each message),
`link_preview` (bool), `typing_ms` (how long a typing activity shows, default 3000); secrets: `apikey`
(the instance token or the global key, sent on every call), `webhook_apikey` (what webhooks must carry
when it differs from `apikey`), `webhook_jwt_key` (see `EvolutionCodec.verify`).

Sources: the evolution-api source at 3454bec (webhook.controller.ts, channel.service.ts,
whatsapp.baileys.service.ts, whatsapp.business.service.ts, dto/sendMessage.dto.ts, validate/*.schema.ts,
exceptions/, utils/renderStatus.ts), docs-evolution (openapi-v2.json, configuration/webhooks.mdx) and
Baileys' WAProto.proto for the WhatsApp message fields. Where the published OpenAPI and the server
disagree the server wins: sendList takes `sections` (the OpenAPI says `values`) and sendPresence takes
`{number, presence, delay}` (the OpenAPI nests them in `options`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any, ClassVar, Final, TypeAlias
from urllib.parse import quote, urlsplit

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
    offset_cursor,
    page_of,
)
from babelhub.codecs.settings import ConnectionOptions, Settings
from babelhub.errors import DecodeError, EncodeError, SignatureError

__all__ = ["EvolutionCodec"]

JsonObject: TypeAlias = dict[str, Any]

CHANNEL: Final = "evolution"

# Event names as Evolution sends them (`Events` in wa.types.ts). Older servers and per-event webhook
# URLs spell them MESSAGES_UPSERT / messages-upsert, so every name is compared in this dotted form.
UPSERT: Final = "messages.upsert"
SENT: Final = "send.message"
UPDATE: Final = "messages.update"
DELETED: Final = "messages.delete"
EDITED: Final = "messages.edited"
SENT_EDIT: Final = "send.message.update"
PRESENCE: Final = "presence.update"
PARTICIPANTS: Final = "group.participants.update"

#: `status` of messages.update (renderStatus.ts; the Cloud API integration sends Meta's names upper-cased).
_STATES: Final[dict[str, c.State]] = {
    "PENDING": "queued",
    "SERVER_ACK": "sent",
    "DELIVERY_ACK": "delivered",
    "READ": "read",
    "PLAYED": "played",
    "ERROR": "failed",
    "DELETED": "deleted",
    "SENT": "sent",
    "DELIVERED": "delivered",
    "FAILED": "failed",
}
_READ_STATES: Final = frozenset({"READ", "PLAYED"})
_CLOUD_API_ID_PREFIX: Final = "wamid."

#: presence.update `lastKnownPresence` values that mean "is typing" (recording = a voice note).
_TYPING: Final = frozenset({"composing", "recording"})
#: group-participants.update `action` → activity (promote / demote have no canonical activity).
_MEMBERSHIP: Final[dict[str, c.ActivityType]] = {"add": "joined", "remove": "left"}

#: Keys of the webhook envelope that say how it was delivered (kept in meta; `apikey` is a credential
#: and `destination` our own URL, so neither is kept).
_DELIVERY_FIELDS: Final = ("instance", "sender", "server_url", "date_time")
_ENVELOPE: Final = frozenset({"event", "data", "apikey", "api_key", "destination"})
#: Field names whose values are credentials, compared lower-cased without "_" and "-": dropped from
#: everything decoded, wherever in the webhook they appear (see `_without_credentials`).
_CREDENTIAL_FIELDS: Final = frozenset(
    {"apikey", "token", "accesstoken", "jwt", "jwtkey", "authorization", "secret", "password"}
)
#: qrcode.updated `data.qrcode` is `{instance, pairingCode, code, base64}` (whatsapp.baileys.service.ts):
#: all but these fields link a device to the account, so their values are redacted.
_QRCODE_KEPT: Final = frozenset({"instance", "count"})
_REDACTED: Final = "[redacted]"
#: Keys of a message record the envelope header already carries; every other key is kept in meta.
_RECORD_HEADER: Final = frozenset({"key", "pushName", "message", "messageType", "messageTimestamp", "participant"})
_KEY_HEADER: Final = frozenset({"remoteJid", "fromMe", "id", "participant"})

#: Containers Baileys wraps a message in; the content is read from inside them.
_WRAPPERS: Final = (
    "ephemeralMessage",
    "viewOnceMessage",
    "viewOnceMessageV2",
    "viewOnceMessageV2Extension",
    "documentWithCaptionMessage",
)
#: Keys of `message` that are not its content (Baileys metadata, Evolution's additions).
_NOT_CONTENT: Final = frozenset(
    {"messageContextInfo", "senderKeyDistributionMessage", "base64", "mediaUrl", "speechToText"}
)
_MEDIA_TYPES: Final[dict[str, c.MediaKind]] = {
    "imageMessage": "image",
    "videoMessage": "video",
    "ptvMessage": "video",  # a round "video note"
    "audioMessage": "audio",
    "documentMessage": "document",
    "stickerMessage": "sticker",
}
_POLL_TYPES: Final = frozenset({"pollCreationMessage", "pollCreationMessageV2", "pollCreationMessageV3"})
_PROTOCOL_REVOKE: Final = frozenset({0, "REVOKE"})
_PROTOCOL_EDIT: Final = frozenset({14, "MESSAGE_EDIT"})
_PHONE_SERVERS: Final = frozenset({"s.whatsapp.net", "c.us"})

_DEFAULT_LIST_BUTTON: Final = "Options"
#: Characters of text shown with buttons or a list. WhatsApp's interactive body holds 1024 (the Cloud API
#: integration sends the buttons' title and the list's description there); Baileys' sendButtons writes
#: "*title*\n\ndescription\n", 4 characters more than the text "title\ndescription", so 1020.
_CHOICE_TEXT_LIMIT: Final = 1020
_DEFAULT_TYPING_MS: Final = 3000
_CAPTIONED: Final = frozenset({"image", "video", "document"})  # audio, voice notes and stickers take none
#: Baileys errors Evolution answers with 400 although the instance is only reconnecting
#: (`sendMessageWithTyping` wraps every error in a BadRequestException).
_TRANSIENT_ERRORS: Final = ("Connection Closed", "Timed Out")


# --------------------------------------------------------------------------- wire format: webhooks


class _Native(msgspec.Struct, kw_only=True):
    """Base of the native shapes read here; unknown fields are ignored (they stay in the raw dicts)."""


class _Camel(_Native, kw_only=True, rename="camel"):
    """Baileys and Evolution objects spell their fields in camelCase."""


class _Webhook(_Native, kw_only=True):
    event: str
    instance: str | None = None
    data: Any = None
    sender: str | None = None
    date_time: str | None = None


class _Key(_Camel, kw_only=True):
    """A WhatsApp message key. `participant` is the author in groups; the `*Alt` / `*Pn` fields (newer
    Baileys) carry the phone-number JID when the main one is a privacy id (`@lid`)."""

    remote_jid: str | None = None
    from_me: bool | None = None
    id: str | None = None
    participant: str | None = None
    remote_jid_alt: str | None = None
    participant_alt: str | None = None
    sender_pn: str | None = None
    participant_pn: str | None = None


class _Record(_Camel, kw_only=True):
    """`data` of messages.upsert / send.message: one message as Evolution's `prepareMessage` shapes it."""

    key: _Key
    push_name: str | None = None
    message: JsonObject | None = None
    message_type: str | None = None
    message_timestamp: Any = None
    context_info: JsonObject | None = None
    participant: str | None = None


class _ContextInfo(_Camel, kw_only=True):
    stanza_id: str | None = None
    mentioned_jid: list[str] | None = None


class _StatusUpdate(_Camel, kw_only=True):
    """`data` of messages.update: v2 names the message `keyId`; v1 spread its key (`id`) and added
    `datetime` in milliseconds."""

    key_id: str | None = None
    id: str | None = None
    remote_jid: str | None = None
    from_me: bool | None = None
    participant: str | None = None
    status: str | None = None
    datetime: Any = None


class _Protocol(_Camel, kw_only=True):
    """A protocol message (messages.edited / send.message.update): a revoke or an edit of `key`."""

    key: _Key | None = None
    type: int | str | None = None
    edited_message: JsonObject | None = None
    timestamp_ms: Any = None


class _Presence(_Camel, kw_only=True):
    last_known_presence: str = ""
    last_seen: int | None = None


class _PresenceUpdate(_Native, kw_only=True):
    id: str
    presences: dict[str, _Presence] = {}


class _ParticipantsUpdate(_Native, kw_only=True):
    id: str
    action: str = ""
    participants: list[Any] = []
    author: str | None = None


# ---------------------------------------------------------- wire format: message contents (WAProto)


class _ExtendedText(_Camel, kw_only=True):
    text: str | None = None


class _MediaContent(_Camel, kw_only=True):
    mimetype: str | None = None
    caption: str | None = None
    file_name: str | None = None
    file_length: Any = None
    seconds: int | None = None
    width: int | None = None
    height: int | None = None
    ptt: bool | None = None
    gif_playback: bool | None = None


# `url` is not in this list on purpose: it is the encrypted file on WhatsApp's CDN (see the module doc).
_MEDIA_MAPPED: Final = frozenset(
    {"mimetype", "caption", "fileName", "fileLength", "seconds", "width", "height", "ptt", "gifPlayback"}
)


class _LocationContent(_Camel, kw_only=True):
    degrees_latitude: float
    degrees_longitude: float
    name: str | None = None
    address: str | None = None
    url: str | None = None


_LOCATION_MAPPED: Final = frozenset({"degreesLatitude", "degreesLongitude", "name", "address", "url"})


class _ContactCard(_Camel, kw_only=True):
    display_name: str | None = None
    vcard: str | None = None


class _ContactsArray(_Camel, kw_only=True):
    contacts: list[_ContactCard] = []


class _ReactionContent(_Camel, kw_only=True):
    key: _Key
    text: str | None = None


class _ButtonsResponse(_Camel, kw_only=True):
    selected_button_id: str | None = None
    selected_display_text: str | None = None


class _SingleSelectReply(_Camel, kw_only=True):
    selected_row_id: str | None = None


class _ListResponse(_Camel, kw_only=True):
    title: str | None = None
    single_select_reply: _SingleSelectReply | None = None


class _TemplateButtonReply(_Camel, kw_only=True):
    selected_id: str | None = None
    selected_display_text: str | None = None


class _InteractiveBody(_Camel, kw_only=True):
    text: str | None = None


class _NativeFlowResponse(_Camel, kw_only=True):
    name: str | None = None
    params_json: str | None = None


class _InteractiveResponse(_Camel, kw_only=True):
    """The answer to a native-flow message, which is what Evolution's sendButtons sends: a quick-reply
    tap carries the button's id in `paramsJson`."""

    body: _InteractiveBody | None = None
    native_flow_response_message: _NativeFlowResponse | None = None


class _PollOption(_Camel, kw_only=True):
    option_name: str = ""


class _PollCreation(_Camel, kw_only=True):
    name: str = ""
    options: list[_PollOption] = []
    selectable_options_count: int | None = None


# ------------------------------------------------------------------------ wire format: API answers


class _SentKey(_Camel, kw_only=True):
    id: str | None = None


class _SendAnswer(_Camel, kw_only=True):
    """A send endpoint's 201 answer: the sent message, as in a messages.upsert record."""

    key: _SentKey | None = None


class _ErrorDetail(_Native, kw_only=True):
    message: Any = None


class _ErrorAnswer(_Native, kw_only=True):
    """Evolution's error body (main.ts): `{"status": 400, "error": "Bad Request", "response": {"message": …}}`,
    where `message` is a string or a (nested) list of strings and objects."""

    status: int = 0
    error: str = ""
    response: _ErrorDetail | None = None


# ------------------------------------------------------------------------------------------ codec


class EvolutionSecrets(Settings, frozen=True, kw_only=True):
    apikey: str
    """The instance token or the server's global key, sent as the `apikey` header on every call."""
    webhook_apikey: str = ""
    """What webhooks must carry as `apikey` (body field or header) when it is not `apikey`."""
    webhook_jwt_key: str = ""
    """The `jwt_key` set in the instance's webhook headers: webhooks must then carry an HS256 JWT
    signed with it (the strongest check Evolution offers)."""


class EvolutionOptions(ConnectionOptions, frozen=True, kw_only=True):
    instance: str
    """The Evolution instance name, the last segment of every API path."""
    delay: int = 0
    """Milliseconds of "typing…" Evolution shows before each message (0: none)."""
    link_preview: bool | None = None
    """Force link previews on or off (unset: Evolution's default)."""
    typing_ms: int = _DEFAULT_TYPING_MS
    """Milliseconds a typing activity shows."""


class EvolutionCodec(Codec):
    """WhatsApp through Evolution API v2 (see the module documentation for events and settings).

    Typing and read marks: `encode_activity` turns an `Activity` "typing" into `chat/sendPresence`
    (composing for `options["typing_ms"]`) and "read" into `chat/markMessageAsRead`, for the message
    named by `detail["native_id"]` or, through `ctx.native_ids`, `detail["message_id"]`.
    """

    channel: ClassVar[str] = CHANNEL
    secret_settings: ClassVar[type[Settings]] = EvolutionSecrets
    option_settings: ClassVar[type[Settings]] = EvolutionOptions
    capabilities: ClassVar[Capabilities] = Capabilities(
        parts=frozenset({"text", "media", "location", "contact", "buttons", "list", "reaction", "poll"}),
        media=frozenset({"image", "audio", "voice", "video", "document", "sticker"}),
        media_upload=True,  # send endpoints take the file as base64 as well as a URL
        text_limit=4096,
        caption_limit=1024,
        choice_text_limit=_CHOICE_TEXT_LIMIT,
        markup="whatsapp",
        max_buttons=3,
        max_button_title=20,
        button_actions=frozenset({"reply", "url", "call"}),
        max_list_rows=10,
        max_list_sections=10,
        max_row_title=24,
        reply=True,
        reaction=True,
        edit=False,
        delete=False,
        typing=True,
    )

    # ------------------------------------------------------------------------------ webhook intake

    def verify(self, request: HttpRequest, secrets: Mapping[str, str]) -> None:
        """Evolution does not sign its webhooks. What it offers, strongest first:

        * `secrets["webhook_jwt_key"]`: configure the instance's webhook headers with
          `{"jwt_key": <the same secret>}` and Evolution sends `Authorization: Bearer <JWT>`, signed with
          HS256 and valid for ten minutes. The signature and expiry are checked.
        * `secrets["webhook_apikey"]` (default: `secrets["apikey"]`): the body's `apikey` field (sent when
          the server has AUTHENTICATION_EXPOSE_IN_FETCH_INSTANCES=true; it is the instance token) or an
          `apikey` webhook header must equal it. A shared secret, compared in constant time, but not a
          signature: anyone who saw one webhook can forge the next.
        * neither configured: every webhook is accepted. Then anyone who can reach the webhook URL can
          inject messages; keep the URL secret and the server on a private network.
        """
        jwt_key = secrets.get("webhook_jwt_key", "")
        if jwt_key:
            _verify_webhook_jwt(request, jwt_key)
            return
        expected = secrets.get("webhook_apikey") or secrets.get("apikey", "")
        if not expected:
            return
        given = request.headers.get("apikey") or _body_apikey(request)
        if not given:
            raise SignatureError(
                "webhook carries no apikey: set AUTHENTICATION_EXPOSE_IN_FETCH_INSTANCES=true on the server "
                "or an `apikey` webhook header"
            )
        if not native.same_secret(given, expected):
            raise SignatureError("webhook apikey does not match the connection's")

    def redact(self, request: HttpRequest, secrets: Mapping[str, str]) -> HttpRequest:
        """Besides the credential headers, the body's credential fields (the webhook's `apikey`, any
        field `_without_credentials` drops) are not stored. `decode` drops them as well, so the stored
        record decodes to the same envelopes."""
        stored = super().redact(request, secrets)
        try:
            body = native.read_json(stored)
        except DecodeError:
            return stored  # not JSON: nothing to take out by name (secret values are masked already)
        clean = _without_credentials(body)
        return stored if clean == body else msgspec.structs.replace(stored, body=native.json_body(clean))

    def dedup_key(self, request: HttpRequest) -> str:
        """The event with the WhatsApp message ids it is about (and the state, for status updates)."""
        raw = native.read_json(request)
        if not isinstance(raw, dict):
            raise DecodeError("expected a JSON object", path="$")
        event = _event_name(raw.get("event"))
        ids = sorted(set(_delivery_ids(event, raw.get("data"))))
        return ",".join(f"{event}:{native_id}" for native_id in ids)

    def decode(self, request: HttpRequest, ctx: DecodeContext) -> list[c.Envelope]:
        raw = native.read_json(request)
        if not isinstance(raw, dict):
            raise DecodeError("expected a JSON object", path="$")
        try:
            safe = _without_credentials(raw)
            webhook = native.convert(safe, _Webhook)
            # Event ids are derived from the webhook as sent, so that redacting cannot make two events one.
            return _Decoder(ctx, webhook, safe, request.received_at, sent_data=raw.get("data")).envelopes()
        except RecursionError:
            raise DecodeError("body is nested too deeply to read", path="$") from None

    # ---------------------------------------------------------------------------------- sending

    def encode(self, message: c.Message, ctx: EncodeContext) -> list[OutboundRequest]:
        endpoint = _Endpoint.of(self, ctx)
        encoder = _Encoder(ctx)
        for part in message.parts:
            encoder.add(part)
        calls = encoder.finish()
        quote_id = native.native_id(ctx, message.reply_to, "reply_to", "WhatsApp") if message.reply_to else ""
        requests: list[OutboundRequest] = []
        for n, call in enumerate(calls):
            if quote_id and call.quotable:
                # The reply quote goes on the first message that can carry one, not on every call.
                call.body["quoted"] = {"key": {"id": quote_id}}
                quote_id = ""
            requests.append(endpoint.request(call.method, call.body, key=f"{message.id}:{n}", message_id=message.id))
        return requests

    def encode_activity(self, activity: c.Activity, ctx: EncodeContext) -> list[OutboundRequest]:
        if activity.activity == "typing":
            typing_ms = int(ctx.options.get("typing_ms", _DEFAULT_TYPING_MS))
            body: JsonObject = {"number": ctx.to, "presence": "composing", "delay": typing_ms}
            return [_Endpoint.of(self, ctx).request("chat/sendPresence", body, key=f"{activity.id}:0")]
        if activity.activity == "read":
            read = {"remoteJid": ctx.to, "fromMe": False, "id": _message_to_mark(activity, ctx)}
            body = {"readMessages": [read]}
            return [_Endpoint.of(self, ctx).request("chat/markMessageAsRead", body, key=f"{activity.id}:0")]
        return []

    # ------------------------------------------------------------------------------------ directory

    def directory_request(self, kind: DirectoryKind, ctx: EncodeContext, cursor: str,
                          limit: int) -> OutboundRequest | None:
        """`POST /chat/findChats/{instance}` (chats), `POST /chat/findContacts/{instance}` (contacts) or
        `GET /group/fetchAllGroups/{instance}?getParticipants=false` (channels: the groups). Each returns
        the whole list, which is paged here."""
        offset_cursor(cursor)
        endpoint = _Endpoint.of(self, ctx)
        if kind == "channels":
            return OutboundRequest(method="GET", headers={"apikey": endpoint.headers["apikey"]},
                                   url=f"{endpoint.base}/group/fetchAllGroups/{endpoint.instance}?getParticipants=false")
        if kind == "chats":
            return endpoint.request("chat/findChats", {}, key="")
        return endpoint.request("chat/findContacts", {"where": {}}, key="")

    def parse_directory(self, kind: DirectoryKind, request: OutboundRequest, response: HttpResponse,
                        cursor: str, limit: int) -> DirectoryPage:
        listed = native.read_json(response)
        if not isinstance(listed, list):
            raise DecodeError(f"the {kind} Evolution lists are a JSON array", path="$")
        read = _directory_group if kind == "channels" else _directory_chat
        return page_of([read(raw, f"$[{index}]") for index, raw in enumerate(listed)], cursor, limit)

    def parse_response(self, request: OutboundRequest, response: HttpResponse) -> SendResult:
        """Success (201): the sent message, `{"key": {"remoteJid", "fromMe", "id"}, "message": …, "status":
        "PENDING"}`; chat endpoints answer other objects and give no id. Failure: `{"status", "error",
        "response": {"message"}}` — 400/401/403/404 are final, except the Baileys disconnects Evolution
        also reports as 400; 429 (a proxy in front) and 5xx are worth retrying."""
        if 200 <= response.status < 300:
            try:
                answer = native.convert(native.read_json(response), _SendAnswer)
            except DecodeError:
                return SendResult(ok=True)
            sent_id = answer.key.id if answer.key else None
            return SendResult(ok=True, native_ids=[sent_id] if sent_id else [])
        try:
            raw = native.read_json(response)
            failure = native.convert(raw, _ErrorAnswer)
        except DecodeError:
            return native.http_failure(response)  # not Evolution's own error body (a proxy, a gateway)
        words = _error_words(failure.response.message if failure.response else None)
        code = "evolution_" + (_snake(failure.error) or f"http_{response.status}")
        result = native.http_failure(response, code=code, message=words or failure.error, native=raw)
        if response.status == 400 and any(marker in words for marker in _TRANSIENT_ERRORS):
            # The instance lost its WhatsApp connection and is reconnecting: a later try can succeed.
            error = msgspec.structs.replace(result.error, retryable=True) if result.error else None
            return msgspec.structs.replace(result, retryable=True, error=error)
        return result


# ------------------------------------------------------------------------------------ decoding


class _Decoder:
    """Decodes one webhook into envelopes (see the module doc for what each event becomes)."""

    def __init__(
        self, ctx: DecodeContext, webhook: _Webhook, raw: JsonObject, received_at: float, *, sent_data: Any
    ) -> None:
        self.ctx = ctx
        self.webhook = webhook  # `webhook` and `raw` are without credentials; `sent_data` is `data` as sent
        self.sent_data = sent_data
        self.raw = raw
        self.received_at = received_at
        self.event = _event_name(webhook.event)
        self.owner = webhook.sender or ""  # the instance's own WhatsApp JID
        self.delivery = {name: raw[name] for name in _DELIVERY_FIELDS if raw.get(name) is not None}
        self.delivery |= native.unmapped(raw, {*_DELIVERY_FIELDS, *_ENVELOPE})

    def envelopes(self) -> list[c.Envelope]:
        envelopes: list[c.Envelope] = []
        match self.event:
            case "messages.upsert" | "send.message":
                envelopes = [self._message(item, path) for item, path in self._items()]
            case "messages.update":
                envelopes = [self._status(item, path) for item, path in self._items()]
            case "messages.delete":
                envelopes = [self._delete(item, path) for item, path in self._items()]
            case "messages.edited" | "send.message.update":
                envelopes = [self._protocol_event(item, path) for item, path in self._items()]
            case "presence.update":
                envelopes = self._presence()
            case "group.participants.update":
                envelopes = self._participants()
        # Whatever produced nothing above (instance, chat and contact events, an empty batch) is still
        # delivered, verbatim, so that nothing Evolution sends is lost.
        return envelopes or [self._instance_event()]

    def _items(self) -> Iterator[tuple[JsonObject, str]]:
        """`data` is one object; some servers batch several in a list."""
        data = self.webhook.data
        if isinstance(data, dict):
            yield data, "$.data"
            return
        if not isinstance(data, list):
            raise DecodeError(f"{self.event} data must be an object, got {type(data).__name__}", path="$.data")
        for i, item in enumerate(data):
            if not isinstance(item, dict):
                raise DecodeError(f"{self.event} data must hold objects", path=f"$.data[{i}]")
            yield item, f"$.data[{i}]"

    # ----------------------------------------------------------------------------- messages

    def _message(self, raw: JsonObject, path: str) -> c.Message:
        record = native.convert(raw, _Record, path)
        key = record.key
        message_key = _require(key.id, f"{path}.key.id", "message key has no id")
        chat = _require(key.remote_jid, f"{path}.key.remoteJid", "message key has no remoteJid")
        from_me = bool(key.from_me)
        meta = self._meta()
        meta.update(native.extras("evolution", raw, _RECORD_HEADER))
        native.keep_unmapped(meta, "evolution.key", raw.get("key"), _KEY_HEADER)
        if from_me:
            meta["evolution.from_me"] = True
        content = _Content.read(record.message or {}, record.message_type or "", f"{path}.message", meta)
        context = self._context(record.context_info or content.context_info, path)
        source = self._ref(context.stanza_id) if context.stanza_id else ""
        parts = native.lenient_parts(
            lambda: self._parts(content, context, source, message_key, meta),
            {content.kind: content.body} if content.kind else content.message,
            f"evolution {content.kind or 'message'}",
        )
        return c.Message(
            id=self._ref(message_key),
            tenant=self.ctx.tenant,
            conversation=self._conversation(chat),
            direction="outbound" if from_me else "inbound",
            ts=self._timestamp(record.message_timestamp, f"{path}.messageTimestamp"),
            sender=self._message_sender(record, chat, from_me),
            native=c.Native(id=message_key, seq=self.ctx.seq),
            reply_to=source,
            parts=parts,
            meta=meta,
        )

    def _message_sender(self, record: _Record, chat: str, from_me: bool) -> c.Sender:
        key = record.key
        name = record.push_name or ""
        if from_me:
            # Our own message: typed on the phone by a person (agent), or sent through the API (bot).
            role: c.Role = "bot" if self.event == SENT else "agent"
            return self._person(self.owner, name=name, role=role)
        author = (key.participant or record.participant or "") if _conversation_type(chat) != "direct" else chat
        alternatives = (key.participant_alt, key.participant_pn) if author != chat else (key.remote_jid_alt,)
        return self._person(author, name=name, alternatives=(*alternatives, key.sender_pn))

    def _parts(
        self, content: _Content, context: _ContextInfo, source: str, message_key: str, meta: JsonObject
    ) -> list[c.Part]:
        """The canonical parts of one message; what has no part stays verbatim."""
        kind, body, path = content.kind, content.body, content.path
        match kind:
            case "":
                return [c.Unsupported(reason="message without content", native=content.message)]
            case "conversation" if isinstance(body, str):
                return [self._text(body, context)]
            case "extendedTextMessage":
                text = native.convert(body, _ExtendedText, path)
                native.keep_unmapped(meta, f"evolution.{kind}", body, {"text"})
                return [self._text(text.text or "", context)]
            case _ if kind in _MEDIA_TYPES:
                return [self._media(content, message_key, meta)]
            case "locationMessage" | "liveLocationMessage":
                place = native.convert(body, _LocationContent, path)
                native.keep_unmapped(meta, f"evolution.{kind}", body, _LOCATION_MAPPED)
                return [
                    c.Location(
                        lat=native.finite(place.degrees_latitude, f"{path}.degreesLatitude"),
                        lon=native.finite(place.degrees_longitude, f"{path}.degreesLongitude"),
                        name=place.name or "",
                        address=place.address or "",
                        url=place.url or "",
                    )
                ]
            case "contactMessage":
                card = native.convert(body, _ContactCard, path)
                native.keep_unmapped(meta, f"evolution.{kind}", body, {"displayName"})  # the vCard itself stays in meta
                return [_contact_part(card)]
            case "contactsArrayMessage":
                cards = native.convert(body, _ContactsArray, path)
                native.keep_unmapped(meta, f"evolution.{kind}", body, set())
                return [_contact_part(card) for card in cards.contacts]
            case "reactionMessage":
                reaction = native.convert(body, _ReactionContent, path)
                target = _require(reaction.key.id, f"{path}.key.id", "reaction names no message")
                native.keep_unmapped(meta, f"evolution.{kind}", body, {"text"})
                emoji = reaction.text or ""
                return [c.Reaction(emoji=emoji, target=self._ref(target), removed=not emoji)]
            case "buttonsResponseMessage":
                tap = native.convert(body, _ButtonsResponse, path)
                native.keep_unmapped(meta, f"evolution.{kind}", body, {"selectedButtonId", "selectedDisplayText"})
                return [c.Action(id=tap.selected_button_id or "", title=tap.selected_display_text or "", source=source)]
            case "listResponseMessage":
                choice = native.convert(body, _ListResponse, path)
                row = choice.single_select_reply.selected_row_id if choice.single_select_reply else None
                native.keep_unmapped(meta, f"evolution.{kind}", body, {"title", "singleSelectReply"})
                return [c.Action(id=row or "", title=choice.title or "", source=source)]
            case "templateButtonReplyMessage":
                template_tap = native.convert(body, _TemplateButtonReply, path)
                native.keep_unmapped(meta, f"evolution.{kind}", body, {"selectedId", "selectedDisplayText"})
                return [
                    c.Action(
                        id=template_tap.selected_id or "", title=template_tap.selected_display_text or "", source=source
                    )
                ]
            case "interactiveResponseMessage":
                return [self._interactive_response(content, source, meta)]
            case _ if kind in _POLL_TYPES:
                poll = native.convert(body, _PollCreation, path)
                native.keep_unmapped(meta, f"evolution.{kind}", body, {"name", "options", "selectableOptionsCount"})
                options = [option.option_name for option in poll.options]
                return [c.Poll(question=poll.name, options=options, multiple=poll.selectable_options_count != 1)]
            case "protocolMessage":
                protocol = native.convert(body, _Protocol, path)
                return self._protocol_parts(protocol, body, path, meta)
            case _:
                return [c.Unsupported(reason=f"WhatsApp message type {kind!r}", native={kind: body})]

    def _text(self, text: str, context: _ContextInfo) -> c.Text:
        """A text with its @mentions: WhatsApp writes them as "@<number>" and lists the JIDs apart."""
        mentions: list[c.Mention] = []
        for jid in context.mentioned_jid or []:
            written = "@" + jid.partition("@")[0]
            offset = text.find(written)
            mentions.append(
                c.Mention(
                    id=c.sender_id(*self._scope(), jid),
                    native_id=jid,
                    offset=max(offset, 0),
                    length=len(written) if offset >= 0 else 0,
                )
            )
        return c.Text(text=text, mentions=mentions)

    def _media(self, content: _Content, message_key: str, meta: JsonObject) -> c.Media:
        kind, body = content.kind, content.body
        media = native.convert(body, _MediaContent, content.path)
        native.keep_unmapped(meta, f"evolution.{kind}", body, _MEDIA_MAPPED)
        media_kind = _MEDIA_TYPES[kind]
        if kind == "audioMessage" and media.ptt:
            media_kind = "voice"
        elif kind == "videoMessage" and media.gif_playback:
            media_kind = "animation"
        return c.Media(
            media=media_kind,
            file_id=message_key,
            url=content.media_url,
            data=content.media_bytes(),
            mime=media.mimetype or "",
            size=_integer(media.file_length),
            filename=media.file_name or "",
            caption=media.caption or "",
            duration_ms=(media.seconds or 0) * 1000,
            width=media.width or 0,
            height=media.height or 0,
        )

    def _interactive_response(self, content: _Content, source: str, meta: JsonObject) -> c.Part:
        response = native.convert(content.body, _InteractiveResponse, content.path)
        flow = response.native_flow_response_message
        params: Any = None
        if flow is not None and flow.params_json:
            try:
                params = native.json_value(flow.params_json, f"{content.path}.paramsJson", "paramsJson")
            except DecodeError:  # not JSON, or nested beyond reading: the click is kept as unsupported
                params = None
        if not isinstance(params, dict) or "id" not in params:
            return c.Unsupported(reason="interactive response without a button id", native={content.kind: content.body})
        native.keep_unmapped(meta, f"evolution.{content.kind}", content.body, {"body"})
        title = response.body.text if response.body else ""
        return c.Action(id=str(params["id"]), title=title or "", source=source)

    def _protocol_parts(self, protocol: _Protocol, raw: JsonObject, path: str, meta: JsonObject) -> list[c.Part]:
        """A revoke → `Delete`; an edit → `Edit` and the new content; anything else verbatim."""
        revoke = protocol.type in _PROTOCOL_REVOKE
        if not revoke and protocol.type not in _PROTOCOL_EDIT:
            return [c.Unsupported(reason=f"WhatsApp protocol message {protocol.type!r}", native=raw)]
        key = protocol.key or _Key()
        message_key = _require(key.id, f"{path}.key.id", "protocol message names no message")
        native.keep_unmapped(meta, "evolution.protocolMessage", raw, {"type", "editedMessage"})
        if revoke:
            return [c.Delete(target=self._ref(message_key))]
        content = _Content.read(protocol.edited_message or {}, "", f"{path}.editedMessage", meta)
        context = self._context(content.context_info, path)
        return [c.Edit(target=self._ref(message_key)), *self._parts(content, context, "", message_key, meta)]

    # -------------------------------------------------------------------- edits and deletes

    def _protocol_event(self, raw: JsonObject, path: str) -> c.Message:
        protocol = native.convert(raw, _Protocol, path)
        key = protocol.key or _Key()
        message_key = _require(key.id, f"{path}.key.id", "protocol message names no message")
        chat = _require(key.remote_jid, f"{path}.key.remoteJid", "protocol message key has no remoteJid")
        meta = self._meta()
        parts = self._protocol_parts(protocol, raw, path, meta)
        ours = self.event == SENT_EDIT  # an edit the API made; messages.edited is anyone's
        stamp = str(protocol.timestamp_ms) if protocol.timestamp_ms is not None else native.json_body(raw).decode()
        author = key.participant or chat
        return c.Message(
            id=c.stable_id("evolution.edit", *self._scope(), message_key, stamp),
            tenant=self.ctx.tenant,
            conversation=self._conversation(chat),
            direction="outbound" if ours else "inbound",
            ts=self._millis(protocol.timestamp_ms, f"{path}.timestampMs") or self._event_time(),
            sender=self._person(self.owner, role="bot") if ours else self._person(author),
            native=c.Native(id=message_key, seq=self.ctx.seq),
            parts=parts,
            meta=meta,
        )

    def _delete(self, raw: JsonObject, path: str) -> c.Message:
        """messages.delete carries the deleted message's key, or (deletes made through the API) the
        stored message with its key inside."""
        key_raw = raw.get("key") if isinstance(raw.get("key"), dict) else raw
        key_path = f"{path}.key" if key_raw is not raw else path
        key = native.convert(key_raw, _Key, key_path)
        message_key = _require(key.id, f"{key_path}.id", "deleted message has no id")
        chat = _require(key.remote_jid, f"{key_path}.remoteJid", "deleted message has no remoteJid")
        meta = self._meta()
        if key_raw is not raw:
            meta.update(native.extras("evolution", raw, {"key"}))
        native.keep_unmapped(meta, "evolution.key", key_raw, _KEY_HEADER)
        from_me = bool(key.from_me)
        if from_me:
            meta["evolution.from_me"] = True
        author = (key.participant or chat) if not from_me else self.owner
        return c.Message(
            id=c.stable_id("evolution.delete", *self._scope(), message_key),
            tenant=self.ctx.tenant,
            conversation=self._conversation(chat),
            direction="outbound" if from_me else "inbound",
            ts=self._event_time(),
            sender=self._person(author, role="agent" if from_me else "user"),
            native=c.Native(id=message_key, seq=self.ctx.seq),
            parts=[c.Delete(target=self._ref(message_key))],
            meta=meta,
        )

    # ----------------------------------------------------------------------------- statuses

    def _status(self, raw: JsonObject, path: str) -> c.Envelope:
        update = native.convert(raw, _StatusUpdate, path)
        message_key = _require(update.key_id or update.id, f"{path}.keyId", "status update names no message")
        chat = _require(update.remote_jid, f"{path}.remoteJid", "status update names no chat")
        status = (update.status or "").upper()
        state = _STATES.get(status)
        ts = self._millis(update.datetime, f"{path}.datetime") or self._event_time()
        meta = self._meta()
        meta.update(native.extras("evolution", raw, {"keyId", "id", "remoteJid", "fromMe", "status", "datetime"}))
        # The Cloud API integration always says fromMe false (whatsapp.business.service.ts compares the
        # user's number with the business's phone number id), but Meta only reports on messages the
        # business sent, and only its message ids start with "wamid.".
        ours = bool(update.from_me) or message_key.startswith(_CLOUD_API_ID_PREFIX)
        # In a group each member's receipt names the member: the same message and state per member. (In a
        # direct chat `participant` repeats the chat, and ids stay as they were.)
        member = (update.participant,) if update.participant and update.participant != chat else ()
        if not ours and status in _READ_STATES:
            # Our side read (or played) a message we received: a read marker, not a delivery status.
            return c.Activity(
                id=c.stable_id("evolution.read", *self._scope(), message_key, status, *member),
                tenant=self.ctx.tenant,
                conversation=self._conversation(chat),
                direction="outbound",
                ts=ts,
                sender=self._person(self.owner, role="agent"),
                native=c.Native(id=message_key, seq=self.ctx.seq),
                activity="read",
                detail={"native_id": message_key, "message_id": self._ref(message_key), "state": status},
                meta=meta,
            )
        if not ours or state is None:
            # A delivery state of a message we received, or a state we do not know: kept verbatim.
            whose = "" if ours else " of a received message"
            return c.Message(
                id=c.stable_id("evolution.status", *self._scope(), message_key, status, *member),
                tenant=self.ctx.tenant,
                conversation=self._conversation(chat),
                ts=ts,
                sender=c.Sender(role="system"),
                native=c.Native(id=message_key, seq=self.ctx.seq),
                parts=[c.Unsupported(reason=f"Evolution status {status!r}{whose}", native=raw)],
                meta=meta,
            )
        error = None
        if state == "failed":
            error = c.Error(code="evolution_error", message="WhatsApp did not accept the message", native=raw)
        return c.Status(
            id=c.stable_id("status", *self._scope(), message_key, state, *member),
            tenant=self.ctx.tenant,
            conversation=self._conversation(chat),
            ts=ts,
            native=c.Native(id=message_key, seq=self.ctx.seq),
            native_id=message_key,
            state=state,
            error=error,
            meta=meta,
        )

    # ------------------------------------------------------------------------------ activities

    def _presence(self) -> list[c.Envelope]:
        update = native.convert(self.webhook.data, _PresenceUpdate, "$.data")
        envelopes: list[c.Envelope] = []
        for who, presence in update.presences.items():
            value = presence.last_known_presence
            detail: JsonObject = {"presence": value}
            if presence.last_seen is not None:
                detail["last_seen"] = presence.last_seen
            envelopes.append(
                c.Activity(
                    id=c.stable_id(
                        "evolution.presence",
                        *self._scope(),
                        update.id,
                        who,
                        value,
                        str(presence.last_seen),
                        self.webhook.date_time or "",
                    ),
                    tenant=self.ctx.tenant,
                    conversation=self._conversation(update.id),
                    ts=self._event_time(),
                    sender=self._person(who),
                    activity="typing" if value in _TYPING else "presence",
                    detail=detail,
                    meta=self._meta(),
                )
            )
        return envelopes

    def _participants(self) -> list[c.Envelope]:
        update = native.convert(self.webhook.data, _ParticipantsUpdate, "$.data")
        activity = _MEMBERSHIP.get(update.action)
        if activity is None:
            return []  # promote / demote: delivered verbatim instead
        meta = self._meta()
        meta.update(native.extras("evolution", self.webhook.data, {"id", "action", "participants"}))
        envelopes: list[c.Envelope] = []
        for i, participant in enumerate(update.participants):
            jid = participant.get("id") if isinstance(participant, dict) else participant
            who = _require(jid if isinstance(jid, str) else None, f"$.data.participants[{i}]", "participant has no JID")
            envelopes.append(
                c.Activity(
                    id=c.stable_id(
                        "evolution.participants",
                        *self._scope(),
                        update.id,
                        who,
                        update.action,
                        self.webhook.date_time or "",
                    ),
                    tenant=self.ctx.tenant,
                    conversation=self._conversation(update.id),
                    ts=self._event_time(),
                    sender=self._person(who),
                    activity=activity,
                    detail={"action": update.action, "author": update.author or ""},
                    meta=meta,
                )
            )
        return envelopes

    def _instance_event(self) -> c.Message:
        """An event that is not about a conversation, in the instance's own conversation."""
        instance = self.webhook.instance or CHANNEL
        fingerprint = native.json_body({"data": self.sent_data, "date_time": self.webhook.date_time}).decode()
        return c.Message(
            id=c.stable_id("evolution.event", *self._scope(), self.event, fingerprint),
            tenant=self.ctx.tenant,
            conversation=native.conversation(self.ctx, CHANNEL, instance, "channel"),
            ts=self._event_time(),
            sender=native.sender(self.ctx, instance, role="system"),
            native=c.Native(seq=self.ctx.seq),
            parts=[c.Unsupported(reason=f"Evolution {self.webhook.event!r} event", native=self.webhook.data)],
            meta={**self._meta(), "evolution.event": self.webhook.event},
        )

    # ------------------------------------------------------------------------------- helpers

    def _scope(self) -> tuple[str, str]:
        return self.ctx.tenant, self.ctx.connection

    def _ref(self, message_key: str) -> str:
        """The canonical id the message `message_key` got (or will get) when it came in on this connection."""
        return c.message_id(*self._scope(), message_key)

    def _meta(self) -> JsonObject:
        return {"evolution.webhook": dict(self.delivery)} if self.delivery else {}

    def _conversation(self, chat: str) -> c.Conversation:
        return native.conversation(self.ctx, CHANNEL, chat, _conversation_type(chat))

    def _person(
        self, jid: str, *, name: str = "", role: c.Role = "user", alternatives: tuple[str | None, ...] = ()
    ) -> c.Sender:
        if not jid:
            return c.Sender(name=name, role=role)
        return native.sender(
            self.ctx, jid,
            name=name,
            role=role,
            handle=_phone_handle(jid, *alternatives),
        )

    def _context(self, raw: JsonObject | None, path: str) -> _ContextInfo:
        if not raw:
            return _ContextInfo()
        return native.convert(raw, _ContextInfo, f"{path}.contextInfo")

    def _timestamp(self, value: Any, path: str) -> datetime:
        """`messageTimestamp`: Unix seconds as a number, a string or (older servers) a protobuf Long."""
        if value is None:
            return self._event_time()
        seconds = _integer(value)
        if seconds <= 0:
            raise DecodeError(f"not a Unix timestamp: {value!r}", path=path)
        return native.from_unix(seconds, path)

    def _millis(self, value: Any, path: str) -> datetime | None:
        millis = _integer(value)
        if millis <= 0:
            return None
        try:
            seconds = millis / 1000
        except OverflowError:
            raise DecodeError(f"not a usable Unix time in milliseconds: {value!r}", path=path) from None
        return native.from_unix(seconds, path)

    def _event_time(self) -> datetime:
        """When the event carries no time of its own. `date_time` is the server's local time written with
        a "Z" (channel.service.ts), so the hub's receive time comes first."""
        if self.received_at:
            return native.from_unix(self.received_at)
        if self.webhook.date_time:
            try:
                return native.parse_time(self.webhook.date_time, "$.date_time")
            except DecodeError:
                pass  # a time for the record only: an unreadable one is no reason to refuse the event
        return c.now()


class _Content:
    """The content of a WhatsApp `message` object: which type it is (its one content key), that key's
    value, and what Evolution added beside it (its S3 link, the base64 bytes)."""

    def __init__(self, message: JsonObject, kind: str, path: str) -> None:
        self.message = message
        self.kind = kind
        self.body: Any = message.get(kind) if kind else None
        self.path = f"{path}.{kind}" if kind else path
        self.message_path = path
        media_url = message.get("mediaUrl")
        self.media_url = media_url if isinstance(media_url, str) else ""

    @classmethod
    def read(cls, message: JsonObject, message_type: str, path: str, meta: JsonObject) -> _Content:
        message = _unwrap(message, meta)
        kind = message_type if message_type and message_type in message else ""
        if not kind:
            kind = next((name for name in message if name not in _NOT_CONTENT), "")
        content = cls(message, kind, path)
        consumed = {kind, "mediaUrl", "base64"} if kind in _MEDIA_TYPES else {kind}
        # messageContextInfo, speechToText, a second content
        native.keep_unmapped(meta, "evolution.message", message, consumed)
        return content

    @property
    def context_info(self) -> JsonObject | None:
        """The contextInfo inside the content (servers before v2.2 left it there)."""
        if isinstance(self.body, dict) and isinstance(self.body.get("contextInfo"), dict):
            return dict(self.body["contextInfo"])
        return None

    def media_bytes(self) -> bytes:
        encoded = self.message.get("base64")
        if not encoded:
            return b""
        if not isinstance(encoded, str):
            raise DecodeError("base64 media is not a string", path=f"{self.message_path}.base64")
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise DecodeError("media is not valid base64", path=f"{self.message_path}.base64") from None


def _unwrap(message: JsonObject, meta: JsonObject) -> JsonObject:
    """The message inside Baileys' containers (disappearing, view-once, document with caption)."""
    wrappers: list[str] = []
    while True:
        wrapper = next(
            (
                name
                for name in _WRAPPERS
                if isinstance(message.get(name), dict) and isinstance(message[name].get("message"), dict)
            ),
            None,
        )
        if wrapper is None:
            break
        wrappers.append(wrapper)
        outer = {name: value for name, value in message.items() if name != wrapper}
        message = {**outer, **message[wrapper]["message"]}
    if wrappers:
        meta["evolution.wrappers"] = wrappers
    return message


def _contact_part(card: _ContactCard) -> c.Contact:
    """A shared contact from its vCard (the card itself stays in meta: types and extra fields)."""
    fields = _vcard_fields(card.vcard or "")
    name = card.display_name or next(iter(fields.get("FN", [])), "")
    organization = next(iter(fields.get("ORG", [])), "")
    return c.Contact(
        name=name,
        phones=fields.get("TEL", []),
        emails=fields.get("EMAIL", []),
        org=organization.split(";")[0],
        urls=fields.get("URL", []),
    )


def _vcard_fields(vcard: str) -> dict[str, list[str]]:
    """The values of a vCard's properties by name, e.g. `item1.TEL;waid=5511…:+55 11 …` → TEL."""
    unfolded = vcard.replace("\r\n", "\n").replace("\n ", "").replace("\n\t", "")
    fields: dict[str, list[str]] = {}
    for line in unfolded.split("\n"):
        head, separator, value = line.partition(":")
        if not separator or not value.strip():
            continue
        name = head.split(";")[0].rpartition(".")[2].upper()
        fields.setdefault(name, []).append(value.strip())
    return fields


def _conversation_type(chat: str) -> c.ConversationType:
    server = chat.rpartition("@")[2]
    if server == "g.us":
        return "group"
    if server in ("newsletter", "broadcast"):
        return "channel"  # WhatsApp channels and status updates
    return "direct"


def _phone_handle(*jids: str | None) -> str:
    """ "+<number>" from the first JID that is a phone number (not a privacy id such as `@lid`)."""
    for jid in jids:
        if not jid:
            continue
        user, _, server = jid.partition("@")
        user = user.partition(":")[0]  # a device suffix, "5511…:12@s.whatsapp.net"
        if (server in _PHONE_SERVERS or not server) and user.isdigit():  # the Cloud API gives bare numbers
            return f"+{user}"
    return ""


def _integer(value: Any) -> int:
    """A protobuf 64-bit integer as JSON gives it: a number, a numeric string or a Long
    `{"low", "high", "unsigned"}`; 0 when it is none of these."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) else 0
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, dict):
        low, high = value.get("low"), value.get("high")
        if isinstance(low, int) and isinstance(high, int):
            return (high << 32) + (low & 0xFFFFFFFF)
    return 0


def _require(value: str | None, path: str, reason: str) -> str:
    if not value:
        raise DecodeError(reason, path=path)
    return value


def _without_credentials(value: Any) -> Any:
    """Decoded JSON without the fields named like credentials, and with a QR code's secrets redacted."""
    if isinstance(value, list):
        return [_without_credentials(item) for item in value]
    if not isinstance(value, dict):
        return value
    clean: JsonObject = {}
    for name, item in value.items():
        field = name.lower().replace("_", "").replace("-", "")
        if field in _CREDENTIAL_FIELDS:
            continue
        clean[name] = _redacted_qrcode(item) if field == "qrcode" else _without_credentials(item)
    return clean


def _redacted_qrcode(qrcode: Any) -> Any:
    """A QR code with only its instance and count readable (`true`/`null`, a setting, stays as it is)."""
    if isinstance(qrcode, dict):
        return {name: item if name in _QRCODE_KEPT or item is None else _REDACTED for name, item in qrcode.items()}
    return qrcode if qrcode is None or isinstance(qrcode, bool) else _REDACTED


def _event_name(event: Any) -> str:
    """ "messages.upsert" from any spelling Evolution uses (MESSAGES_UPSERT, messages-upsert)."""
    if not isinstance(event, str):
        return ""
    return event.strip().lower().replace("_", ".").replace("-", ".")


def _delivery_ids(event: str, data: Any) -> Iterator[str]:
    """The WhatsApp ids one webhook is about, for deduplication."""
    items = data if isinstance(data, list) else [data]
    for item in items:
        if not isinstance(item, dict):
            continue
        nested = item.get("key")
        key: JsonObject = nested if isinstance(nested, dict) else {}
        match event:
            case "messages.upsert" | "send.message" if key.get("id"):
                yield str(key["id"])
            case "messages.update" if item.get("keyId") or item.get("id"):
                participant = item.get("participant")
                # a group member's own receipt (in a direct chat `participant` repeats the chat)
                who = f":{participant}" if participant and participant != item.get("remoteJid") else ""
                yield f"{item.get('keyId') or item.get('id')}:{item.get('status', '')}{who}"
            case "messages.delete" if (key or item).get("id"):
                yield str((key or item)["id"])
            case "messages.edited" | "send.message.update" if key.get("id"):
                yield f"{key['id']}:{item.get('timestampMs', '')}"


def _body_apikey(request: HttpRequest) -> str:
    try:
        body = native.read_json(request)
    except DecodeError:
        return ""  # not JSON, or nested too deeply to read: no apikey in it
    apikey = body.get("apikey") if isinstance(body, dict) else None
    return apikey if isinstance(apikey, str) else ""


def _verify_webhook_jwt(request: HttpRequest, secret: str) -> None:
    """Evolution's webhook JWT (webhook.controller.ts `generateJwtToken`): HS256 over
    `{"iat", "exp": iat + 600, "app": "evolution", "action": "webhook"}` with the `jwt_key` header value."""
    header, claims, signing_input, signature = jwt.split_token(jwt.bearer_token(request))
    if header.get("alg") != "HS256":
        raise SignatureError(f"webhook token algorithm {header.get('alg')!r} is not HS256")
    expected = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, signature):
        raise SignatureError("webhook token signature does not match the jwt_key")
    now = request.received_at or time.time()
    expiry = claims.get("exp")
    if not isinstance(expiry, int | float) or isinstance(expiry, bool):
        raise SignatureError("webhook token has no expiry")
    if now > expiry + jwt.DEFAULT_LEEWAY:
        raise SignatureError("webhook token has expired")
    issued = claims.get("iat")
    if isinstance(issued, int | float) and issued > now + jwt.DEFAULT_LEEWAY:
        raise SignatureError("webhook token was issued in the future")


# ------------------------------------------------------------------------------------ encoding


class _Endpoint:
    """Where and how to call one connection's Evolution server."""

    def __init__(self, base: str, instance: str, apikey: str) -> None:
        self.base = base
        self.instance = quote(instance, safe="")
        self.headers = {"apikey": apikey, "Content-Type": "application/json"}

    @classmethod
    def of(cls, codec: Codec, ctx: EncodeContext) -> _Endpoint:
        base = codec.api_base(ctx)
        if not base:
            raise EncodeError("Evolution API is self-hosted: set the connection's api_base to the server's URL")
        instance = native.required_option(ctx.options, "instance", "Evolution")
        apikey = native.required_secret(ctx.secrets, "apikey", "Evolution")
        return cls(base, instance, apikey)

    def request(self, method: str, body: JsonObject, *, key: str, message_id: str = "") -> OutboundRequest:
        return OutboundRequest(
            method="POST",
            url=f"{self.base}/{method}/{self.instance}",
            headers=self.headers,
            body=native.json_body(body),
            idempotency_key=key,
            message_id=message_id,
        )


class _Call:
    """One send call: the API method, its body, and whether a reply quote can go on it (sendReaction
    takes none, and sendContact ignores it)."""

    def __init__(self, method: str, body: JsonObject, *, quotable: bool = True) -> None:
        self.method = method
        self.body = body
        self.quotable = quotable


class _Encoder:
    """Turns a message's parts into Evolution send calls, in order, combining parts the way WhatsApp
    does: a text right before buttons or a list becomes that message's text, and consecutive contacts
    travel in one contact message."""

    def __init__(self, ctx: EncodeContext) -> None:
        self.ctx = ctx
        self.calls: list[_Call] = []
        self._text: c.Text | None = None  # held back in case buttons or a list take it as their text
        self._contacts: list[JsonObject] = []

    def add(self, part: c.Part) -> None:
        if isinstance(part, c.Contact):
            self._flush_text()
            self._contacts.append(_contact_entry(part))
            return
        self._flush_contacts()
        match part:
            case c.Text():
                self._flush_text()
                self._text = part
            case c.Buttons():
                self.calls.extend(self._buttons(part))
            case c.List():
                self.calls.append(self._list(part))
            case c.Media():
                self._flush_text()
                self.calls.extend(self._media(part))
            case c.Location():
                self._flush_text()
                self.calls.append(self._message("message/sendLocation", _location_body(part)))
            case c.Reaction():
                self._flush_text()
                self.calls.append(self._reaction(part))
            case c.Poll():
                self._flush_text()
                self.calls.append(self._message("message/sendPoll", _poll_body(part)))
            case _:
                raise EncodeError(f"Evolution cannot send {part.__class__.__name__} parts (degrade the message first)")

    def finish(self) -> list[_Call]:
        self._flush_text()
        self._flush_contacts()
        return self.calls

    # --------------------------------------------------------------------------------- parts

    def _buttons(self, part: c.Buttons) -> list[_Call]:
        """sendButtons renders `title` in bold above `description`: the text's first line is the title.
        Reply buttons cannot be mixed with link or call buttons, so those are written into the text (or,
        when the text would grow past what WhatsApp shows with buttons, sent just before it)."""
        text = self._own_or_held_text(part.text)
        if not text:
            raise EncodeError("Evolution buttons need a text: set the part's text or put a Text part before it")
        if len(text) > _CHOICE_TEXT_LIMIT:
            raise EncodeError(
                f"Evolution buttons show at most {_CHOICE_TEXT_LIMIT} characters of text, not {len(text)} "
                "(degrade the message first)"
            )
        replies = [button for button in part.buttons if button.action == "reply"]
        others = [button for button in part.buttons if button.action != "reply"]
        unsendable = [button.action for button in others if button.action not in ("url", "call")]
        if unsendable:
            raise EncodeError(f"Evolution buttons can reply, open a URL or call, not {unsendable[0]!r}")
        calls: list[_Call] = []
        title, _, description = text.partition("\n")
        if replies and others:
            lines = "\n".join(f"{button.title}: {button.value}" for button in others)
            with_lines = f"{description}\n\n{lines}" if description else lines
            if len(title) + 1 + len(with_lines) <= _CHOICE_TEXT_LIMIT:
                description = with_lines
            else:
                calls.append(self._message("message/sendText", {"text": lines}))
            buttons = [_button(button) for button in replies]
        else:
            buttons = [_button(button) for button in part.buttons]
        body: JsonObject = {"title": title}
        if description:
            body["description"] = description
        body["buttons"] = buttons
        calls.append(self._message("message/sendButtons", body))
        return calls

    def _list(self, part: c.List) -> _Call:
        description = self._own_or_held_text(part.text)
        if len(description) > _CHOICE_TEXT_LIMIT:
            # A list needs no description: a longer text goes before it, as text of its own.
            self._text, description = c.Text(text=description), ""
            self._flush_text()
        button = part.button or _DEFAULT_LIST_BUTTON
        sections = [
            {
                # Evolution refuses sections without a title.
                "title": section.title or button,
                "rows": [_list_row(row.id, row.title, row.description) for row in section.rows],
            }
            for section in part.sections
        ]
        body: JsonObject = {"title": part.header}
        if description:
            body["description"] = description
        body |= {"buttonText": button, "footerText": part.footer, "sections": sections}
        return self._message("message/sendList", body)

    def _media(self, part: c.Media) -> list[_Call]:
        media = _media_source(part)
        match part.media:
            case "voice":
                calls = [self._message("message/sendWhatsAppAudio", {"audio": media})]
            case "sticker":
                calls = [self._message("message/sendSticker", {"sticker": media})]
            case "image" | "video" | "document" | "audio":
                calls = [self._message("message/sendMedia", self._media_body(part, media))]
            case _:
                raise EncodeError(f"Evolution cannot send {part.media!r} media")
        if part.caption and part.media not in _CAPTIONED:
            # Audio, voice notes and stickers take no caption: it follows as its own text message.
            calls.append(self._message("message/sendText", {"text": part.caption}))
        return calls

    def _media_body(self, part: c.Media, media: str) -> JsonObject:
        body: JsonObject = {"mediatype": part.media}
        if part.mime:
            body["mimetype"] = part.mime
        if part.caption and part.media in _CAPTIONED:
            body["caption"] = part.caption
        body["media"] = media
        filename = part.filename or (_document_name(part.url) if part.media == "document" else "")
        if filename:
            # A document without fileName makes Evolution guess it from the URL, and fail without one.
            body["fileName"] = filename
        return body

    def _reaction(self, part: c.Reaction) -> _Call:
        message_key = native.native_id(self.ctx, part.target, "reaction target", "WhatsApp")
        # WhatsApp names the message by its key: chat, whether we wrote it, id. A target whose canonical id
        # is the one derived from its native id came in from the user; any other is a message we sent.
        ours = part.target != c.message_id(self.ctx.tenant, self.ctx.connection, message_key)
        key = {"remoteJid": self.ctx.to, "fromMe": ours, "id": message_key}
        # WhatsApp removes a reaction when it is sent again with an empty emoji.
        return _Call(
            "message/sendReaction", {"key": key, "reaction": "" if part.removed else part.emoji}, quotable=False
        )

    def _message(self, method: str, fields: JsonObject) -> _Call:
        """A call that sends a message to the chat, with the connection's delay ("typing…" first)."""
        body: JsonObject = {"number": self.ctx.to, **fields}
        delay = self.ctx.options.get("delay")
        if delay:
            body["delay"] = int(delay)
        return _Call(method, body)

    def _own_or_held_text(self, own_text: str) -> str:
        """A part's own text, else the text held just before it (which it then replaces) when it is short
        enough to go with the choices."""
        if own_text:
            self._flush_text()
            return own_text
        if self._text is None or len(self._text.text) > _CHOICE_TEXT_LIMIT:
            self._flush_text()
            return ""
        held, self._text = self._text, None
        return held.text

    def _flush_text(self) -> None:
        if self._text is None:
            return
        body: JsonObject = {"text": self._text.text}
        link_preview = self.ctx.options.get("link_preview")
        if link_preview is not None:
            body["linkPreview"] = bool(link_preview)
        mentioned = [m.native_id.partition("@")[0] for m in self._text.mentions if m.native_id]
        if mentioned:
            body["mentioned"] = mentioned
        self.calls.append(self._message("message/sendText", body))
        self._text = None

    def _flush_contacts(self) -> None:
        if self._contacts:
            self.calls.append(
                _Call("message/sendContact", {"number": self.ctx.to, "contact": self._contacts}, quotable=False)
            )
            self._contacts = []


def _button(button: c.Button) -> JsonObject:
    match button.action:
        case "url":
            return {"type": "url", "displayText": button.title, "url": button.value}
        case "call":
            return {"type": "call", "displayText": button.title, "phoneNumber": button.value}
        case _:
            return {"type": "reply", "displayText": button.title, "id": button.id}


def _list_row(row_id: str, title: str, description: str) -> JsonObject:
    row: JsonObject = {"title": title}
    if description:
        row["description"] = description  # Evolution refuses an empty description
    row["rowId"] = row_id
    return row


def _media_source(part: c.Media) -> str:
    """What `media` takes: a URL or the file as base64 (the channel's own file ids cannot be sent)."""
    if part.url:
        return part.url
    if part.data:
        return base64.b64encode(part.data).decode("ascii")
    raise EncodeError("Evolution media needs a url or the file's bytes (data); a file_id cannot be sent")


def _document_name(url: str) -> str:
    name = urlsplit(url).path.rpartition("/")[2] if url else ""
    return name or "document"


def _location_body(part: c.Location) -> JsonObject:
    # Evolution requires name and address, even empty.
    return {"name": part.name, "address": part.address, "latitude": part.lat, "longitude": part.lon}


def _poll_body(part: c.Poll) -> JsonObject:
    return {
        "name": part.question,
        "selectableCount": len(part.options) if part.multiple else 1,
        "values": list(part.options),
    }


def _contact_entry(part: c.Contact) -> JsonObject:
    """One card of sendContact. Evolution writes one phone, e-mail and URL into the vCard: the first."""
    if not part.phones:
        raise EncodeError(f"Evolution contacts need a phone number ({part.name!r} has none)")
    phone = part.phones[0]
    entry: JsonObject = {"fullName": part.name, "phoneNumber": phone}
    digits = "".join(character for character in phone if character.isdigit())
    if digits:
        entry["wuid"] = digits  # the WhatsApp id the card links to: the number without formatting
    if part.org:
        entry["organization"] = part.org
    if part.emails:
        entry["email"] = part.emails[0]
    if part.urls:
        entry["url"] = part.urls[0]
    return entry


def _message_to_mark(activity: c.Activity, ctx: EncodeContext) -> str:
    """The WhatsApp message id a read mark refers to (see `EvolutionCodec`)."""
    native_id = activity.detail.get("native_id")
    if isinstance(native_id, str) and native_id:
        return native_id
    canonical_id = activity.detail.get("message_id")
    if isinstance(canonical_id, str) and canonical_id:
        return native.native_id(ctx, canonical_id, "read activity", "WhatsApp")
    raise EncodeError("Evolution read marks need detail['native_id'] or detail['message_id'] of the message read")


def _error_words(message: Any) -> str:
    """Evolution's `response.message` (a string or nested lists of strings and objects) as one sentence."""
    match message:
        case None:
            return ""
        case str():
            return message
        case list():
            return "; ".join(words for words in (_error_words(item) for item in message) if words)
        case {"exists": False, **rest}:
            # sendMessageWithTyping's check that the number has WhatsApp failed.
            return f"{rest.get('number') or rest.get('jid') or 'the recipient'} is not on WhatsApp"
        case _:
            return json.dumps(message, ensure_ascii=False)


def _snake(words: str) -> str:
    """ "Bad Request" → "bad_request"."""
    return "_".join(words.lower().split())


# =========================================================================================== directory


_DIRECTORY_KINDS: Final[dict[str, ItemKind]] = {"direct": "direct", "group": "group", "channel": "channel"}


class _DirectoryChat(msgspec.Struct, rename="camel"):
    """A chat (`fetchChats`) or a contact (`fetchContacts`): both are keyed by the WhatsApp JID."""

    remote_jid: str
    name: str | None = None
    push_name: str | None = None


class _DirectoryGroup(msgspec.Struct):
    id: str
    subject: str | None = None


def _directory_chat(raw: Any, path: str) -> DirectoryItem:
    chat = native.convert(raw, _DirectoryChat, path)
    return DirectoryItem(id=chat.remote_jid, name=chat.name or chat.push_name or "",
                         kind=_DIRECTORY_KINDS.get(_conversation_type(chat.remote_jid), "other"),
                         handle=_phone_handle(chat.remote_jid),
                         channel_specific=_without_credentials(native.unmapped(raw, {"remoteJid", "name"})))


def _directory_group(raw: Any, path: str) -> DirectoryItem:
    group = native.convert(raw, _DirectoryGroup, path)
    return DirectoryItem(id=group.id, name=group.subject or "", kind="group",
                         channel_specific=_without_credentials(native.unmapped(raw, {"id", "subject"})))
