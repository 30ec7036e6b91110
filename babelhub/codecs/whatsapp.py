"""WhatsApp Business Platform (Meta Cloud API) codec, also used for 360dialog's hosted Cloud API.

Inbound, Meta calls the webhook with `{"object": "whatsapp_business_account", "entry": [{"id": <WABA id>,
"changes": [{"field": ..., "value": ...}]}]}`. One POST may carry several entries, changes, messages and
statuses; each becomes its own envelope:

* `messages` changes: user messages → `Message`, delivery receipts (`statuses`) → `Status`.
* `smb_message_echoes`: what the business sent from the WhatsApp Business app → `Message`, direction
  "outbound", sender role "agent".
* `user_preferences`: marketing stop / resume → `Activity` opt_out / opt_in.
* Anything else (account_update, message templates, calls, groups, …) → a `Message` from the system in
  the business account's own conversation, carrying the change verbatim as an `Unsupported` part.

Users are known by phone number (`from`, `wa_id`, `recipient_id`) and by business-scoped user id (BSUID:
`from_user_id`, `contacts[].user_id`, `recipient_user_id`, e.g. `US.13491208655302741918`). A user who
adopted a WhatsApp username may come without a phone number: the chat is then the BSUID, and replies to it
name the user in the send API's `recipient` field instead of `to`. A connection with a `phone_number_id`
takes only the changes for that number (`value.metadata.phone_number_id`): a webhook whose every change
is for another number of the business account is refused with the reason (a dead letter).

Outbound, every message is a `POST .../messages` with the same JSON body on both providers:

* Meta (default): `https://graph.facebook.com/v23.0/<phone_number_id>/messages`, `Authorization: Bearer`.
* 360dialog (`provider = "360dialog"` in the connection's secrets; options are read too):
  `https://waba-v2.360dialog.io/messages` (360dialog adds the phone number id itself) with the
  `D360-API-KEY` header.

Connection settings — secrets: `access_token` (Meta), `api_key` (360dialog), `app_secret` (webhook
signatures), `verify_token` (subscription handshake); options: `phone_number_id` (Meta), `provider`,
`auto_read` (mark every inbound message as read), `preview_url` (force link previews on or off; by
default a text gets a preview when it contains a link).

Sources: Meta's OpenAPI business-messaging-api_v23.0.yaml (webhook and send schemas), the Cloud API
pages on webhooks, interactive CTA URL messages, typing indicators, supported media types and error
codes, "Business-scoped user IDs" (usernames, BSUIDs), and 360dialog's Cloud API, typing-indicator,
webhook and "Usernames & BSUID" pages.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any, ClassVar, Final, TypeAlias

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
from babelhub.codecs.settings import ConnectionOptions, MissingSetting, Settings
from babelhub.errors import DecodeError, EncodeError, SignatureError

__all__ = ["WhatsAppCodec"]

JsonObject: TypeAlias = dict[str, Any]

CHANNEL: Final = "whatsapp"
META_API_BASE: Final = "https://graph.facebook.com/v23.0"
D360_API_BASE: Final = "https://waba-v2.360dialog.io"
WEBHOOK_OBJECT: Final = "whatsapp_business_account"

_MB: Final = 1_000_000  # decimal megabytes: the documented limits, rounded down rather than up
#: Largest file per kind, from "Supported media types" (stickers: 100 KB static, 500 KB animated).
MEDIA_MAX_BYTES: Final[dict[c.MediaKind, int]] = {
    "image": 5 * _MB,
    "audio": 16 * _MB,
    "voice": 16 * _MB,
    "video": 16 * _MB,
    "document": 100 * _MB,
    "sticker": 500_000,
}
_CAPTIONED: Final = frozenset({"image", "video", "document"})  # audio and stickers take no caption
_INTERACTIVE_BODY_LIMIT: Final = 1024  # characters of an interactive message's body
_TEXT_LIMIT: Final = 4096  # characters of a text message's body
_DEFAULT_LIST_BUTTON: Final = "Options"  # the list's opening button label is required by WhatsApp
#: A business-scoped user id: a two-letter country code, a period and up to 128 alphanumerics; a parent
#: BSUID (shared across a business's portfolios) has `ENT.` after the country code. Phone numbers are
#: digits only, so the two never mix.
BSUID: Final = re.compile(r"[A-Z]{2}\.(?:ENT\.)?[A-Za-z0-9]{1,128}")

#: WhatsApp status name → canonical state. Anything else (call statuses such as "RINGING") is kept as
#: an unsupported message instead.
_STATES: Final[dict[str, c.State]] = {
    "sent": "sent",
    "delivered": "delivered",
    "read": "read",
    "played": "played",
    "failed": "failed",
    "deleted": "deleted",
}
#: user_preferences values (marketing messages) → activity.
_PREFERENCES: Final[dict[str, c.ActivityType]] = {"stop": "opt_out", "resume": "opt_in", "signup": "opt_in"}
#: Inbound media message types → canonical media kind (audio becomes "voice" when it is a voice note).
_INBOUND_MEDIA: Final[dict[str, c.MediaKind]] = {
    "image": "image",
    "audio": "audio",
    "video": "video",
    "document": "document",
    "sticker": "sticker",
}
#: Message keys the envelope header already carries; every other key (the sender's BSUID in
#: `from_user_id` too) is kept in `meta`.
_MESSAGE_HEADER: Final = frozenset({"from", "id", "timestamp", "type", "to"})
#: A message's members besides its header: one of them that cannot be read becomes an Unsupported part.
_CONTENT_FIELDS: Final = frozenset(
    {"context", "errors", "text", "image", "audio", "video", "document", "sticker", "location", "contacts",
     "interactive", "button", "reaction", "order", "system", "revoke", "edit"}
)


# ------------------------------------------------------------------------------------ error codes


_rule = native.ErrorRule


#: Meta's Cloud API error codes ("Error codes" page): whether sending again later can succeed, and what
#: the code means in words an operator can act on. Codes not listed fall back to the HTTP status.
ERROR_RULES: Final[dict[int, native.ErrorRule]] = {
    0: _rule(False, "authentication failed: the access token is invalid"),
    1: _rule(True, "unknown API error, possibly a temporary server problem"),
    2: _rule(True, "the API service is temporarily down or overloaded"),
    3: _rule(False, "the app lacks the capability or permission for this call"),
    4: _rule(True, "the app reached its API call rate limit"),
    10: _rule(False, "permission denied"),
    100: _rule(False, "the request has an invalid or unsupported parameter"),
    190: _rule(False, "the access token has expired or was invalidated"),
    368: _rule(False, "the business account is temporarily blocked for policy violations"),
    613: _rule(True, "API call rate limit exceeded"),
    80007: _rule(True, "the WhatsApp Business Account reached its rate limit"),
    130429: _rule(True, "Cloud API message throughput reached"),
    130472: _rule(False, "the user's number is part of an experiment and cannot receive this message"),
    131000: _rule(True, "something went wrong on WhatsApp's side"),
    131005: _rule(False, "access denied"),
    131008: _rule(False, "a required parameter is missing"),
    131009: _rule(False, "a parameter value is invalid"),
    131016: _rule(True, "the WhatsApp service is temporarily unavailable"),
    131021: _rule(False, "the recipient is the sending business number itself"),
    131026: _rule(
        False,
        "message undeliverable: the recipient is not on WhatsApp, has not accepted the "
        "current terms, or uses a client too old for this message",
    ),
    131031: _rule(False, "the business account is locked"),
    131042: _rule(False, "the business account has a payment problem"),
    131045: _rule(False, "the business phone number is not registered"),
    131047: _rule(
        False,
        "more than 24 hours passed since the user last wrote: only an approved template can re-open the conversation",
    ),
    131048: _rule(False, "spam rate limit: too many earlier messages were blocked or flagged as spam"),
    131049: _rule(False, "Meta chose not to deliver this message to keep user engagement healthy"),
    131050: _rule(False, "the user stopped receiving marketing messages"),
    131051: _rule(False, "unsupported message type"),
    131052: _rule(False, "the media could not be downloaded"),
    131053: _rule(False, "the media could not be uploaded"),
    131056: _rule(True, "too many messages to the same user in a short time (pair rate limit)"),
    131057: _rule(True, "the business account is in maintenance mode"),
    132000: _rule(False, "the template's parameter count does not match its definition"),
    132001: _rule(False, "the template does not exist in this language or is not approved"),
    132005: _rule(False, "the filled-in template text is too long"),
    132007: _rule(False, "the template's content violates a WhatsApp policy"),
    132012: _rule(False, "a template parameter has the wrong format"),
    132015: _rule(False, "the template is paused for low quality"),
    132016: _rule(False, "the template is disabled for low quality"),
    133010: _rule(False, "the phone number is not registered on the WhatsApp Business Platform"),
    135000: _rule(False, "generic user error"),
}
_PERMISSION_CODES: Final = range(200, 300)  # "API Permission": not granted or removed


def _error_rule(code: int) -> native.ErrorRule | None:
    if code in _PERMISSION_CODES:
        return _rule(False, "the app lacks a permission for this call")
    return ERROR_RULES.get(code)


def _describe_error(code: int, message: str, details: str) -> str:
    """One readable sentence: what the code means, then Meta's own words."""
    rule = _error_rule(code)
    native_words = ": ".join(part for part in (message, details) if part)
    if rule is None:
        return native_words or f"WhatsApp error {code}"
    return f"{rule.meaning} ({native_words})" if native_words else rule.meaning


# --------------------------------------------------------------------------- wire format: webhooks


class _Native(msgspec.Struct, kw_only=True):
    """Base of the native shapes read here; unknown fields are ignored (they stay in the raw dicts)."""


class _Change(_Native, kw_only=True):
    field: str = ""
    value: JsonObject = {}


class _Entry(_Native, kw_only=True):
    id: str = ""
    time: int = 0
    changes: list[_Change] = []


class _Webhook(_Native, kw_only=True):
    object: str = ""
    entry: list[_Entry] = []


class _Profile(_Native, kw_only=True):
    name: str = ""
    username: str = ""
    """Only for users who adopted a WhatsApp username."""


class _Contact(_Native, kw_only=True):
    """`value.contacts[]`: the profile of whoever wrote. `wa_id` (the phone number) is left out for a
    user with a username whose number the business may not see; `user_id` (the BSUID) is always there."""

    wa_id: str = ""
    user_id: str = ""
    profile: _Profile | None = None

    @property
    def ids(self) -> list[str]:
        return [user for user in (self.wa_id, self.user_id) if user]


class _ErrorData(_Native, kw_only=True):
    details: str = ""


class _ErrorObject(_Native, kw_only=True):
    code: int = 0
    title: str = ""
    message: str = ""
    error_data: _ErrorData | None = None

    @property
    def details(self) -> str:
        return self.error_data.details if self.error_data else ""


class _Context(_Native, kw_only=True, rename={"from_": "from"}):
    id: str = ""
    from_: str = ""


class _TextObject(_Native, kw_only=True):
    body: str


class _MediaObject(_Native, kw_only=True):
    id: str = ""
    url: str = ""
    mime_type: str = ""
    caption: str = ""
    filename: str = ""
    voice: bool = False


_MEDIA_MAPPED: Final = frozenset({"id", "url", "mime_type", "caption", "filename", "voice"})


class _LocationObject(_Native, kw_only=True):
    latitude: float
    longitude: float
    name: str = ""
    address: str = ""
    url: str = ""


class _Name(_Native, kw_only=True):
    formatted_name: str = ""
    first_name: str = ""
    last_name: str = ""


class _Phone(_Native, kw_only=True):
    phone: str = ""
    wa_id: str = ""


class _Email(_Native, kw_only=True):
    email: str = ""


class _Org(_Native, kw_only=True):
    company: str = ""


class _Url(_Native, kw_only=True):
    url: str = ""


class _ContactCard(_Native, kw_only=True):
    name: _Name | None = None
    phones: list[_Phone] = []
    emails: list[_Email] = []
    org: _Org | None = None
    urls: list[_Url] = []


class _Reply(_Native, kw_only=True):
    id: str
    title: str = ""


class _FlowReply(_Native, kw_only=True):
    response_json: str = "{}"
    name: str = ""


class _Interactive(_Native, kw_only=True):
    type: str = ""
    button_reply: _Reply | None = None
    list_reply: _Reply | None = None
    nfm_reply: _FlowReply | None = None


class _QuickReply(_Native, kw_only=True):
    """A template's quick-reply button (`type: button`)."""

    payload: str = ""
    text: str = ""


class _ReactionObject(_Native, kw_only=True):
    message_id: str
    emoji: str = ""


class _OrderItem(_Native, kw_only=True):
    product_retailer_id: str
    quantity: int = 1
    item_price: float | None = None
    currency: str = ""


class _Order(_Native, kw_only=True):
    catalog_id: str = ""
    text: str = ""
    product_items: list[_OrderItem] = []


class _System(_Native, kw_only=True):
    body: str = ""


class _Revoke(_Native, kw_only=True):
    original_message_id: str


class _EditObject(_Native, kw_only=True):
    original_message_id: str
    message: JsonObject = {}


class _Content(_Native, kw_only=True):
    """What a message says: its type and the object named after the type."""

    type: str = ""
    context: _Context | None = None
    errors: list[_ErrorObject] = []
    text: _TextObject | None = None
    image: _MediaObject | None = None
    audio: _MediaObject | None = None
    video: _MediaObject | None = None
    document: _MediaObject | None = None
    sticker: _MediaObject | None = None
    location: _LocationObject | None = None
    contacts: list[_ContactCard] | None = None
    interactive: _Interactive | None = None
    button: _QuickReply | None = None
    reaction: _ReactionObject | None = None
    order: _Order | None = None
    system: _System | None = None
    revoke: _Revoke | None = None
    edit: _EditObject | None = None


class _Message(_Content, kw_only=True, rename={"from_": "from"}):
    """`value.messages[]` (from a user) or `value.message_echoes[]` (from the business app). A user
    message names the user by phone number (`from`) and BSUID (`from_user_id`); `from` is left out for
    a user with a username whose number the business may not see."""

    id: str
    timestamp: int
    from_: str = ""
    from_user_id: str = ""
    to: str = ""
    group_id: str = ""

    def user(self, *, echo: bool) -> str:
        """Who the chat is with: the phone number, else the BSUID."""
        return self.to if echo else (self.from_ or self.from_user_id)


class _StatusObject(_Native, kw_only=True):
    """`value.statuses[]`: what happened to a message the business sent. In a group, each member's
    receipt comes on its own, naming the member in `recipient_participant_id`."""

    id: str
    status: str
    timestamp: int
    recipient_id: str = ""
    recipient_user_id: str = ""
    """The user's BSUID, when the message was sent to it (`recipient_id` is then left out)."""
    recipient_type: str = ""
    recipient_participant_id: str = ""
    group_id: str = ""
    errors: list[_ErrorObject] = []


class _Metadata(_Native, kw_only=True):
    display_phone_number: str = ""
    phone_number_id: str = ""


class _MessagesValue(_Native, kw_only=True):
    metadata: _Metadata | None = None
    contacts: list[_Contact] = []
    messages: list[JsonObject] = []
    message_echoes: list[JsonObject] = []
    statuses: list[JsonObject] = []
    errors: list[JsonObject] = []


class _Preference(_Native, kw_only=True):
    wa_id: str
    value: str
    category: str = ""
    detail: str = ""
    timestamp: int = 0


class _PreferencesValue(_Native, kw_only=True):
    contacts: list[_Contact] = []
    user_preferences: list[JsonObject] = []


# ------------------------------------------------------------------------ wire format: API answers


class _SentMessage(_Native, kw_only=True):
    id: str = ""


class _SendAnswer(_Native, kw_only=True):
    messages: list[_SentMessage] = []


class _GraphError(_Native, kw_only=True):
    code: int = 0
    message: str = ""
    error_data: _ErrorData | None = None


class _ErrorAnswer(_Native, kw_only=True):
    error: _GraphError


# ------------------------------------------------------------------------------------------ codec


class WhatsAppSecrets(Settings, frozen=True, kw_only=True):
    access_token: str = ""
    """Meta: the Cloud API access token (required unless 360dialog)."""
    app_secret: str = ""
    """Meta: the app's secret, which signs webhooks (`X-Hub-Signature-256`; required unless 360dialog)."""
    verify_token: str = ""
    """The Verify Token entered in the app's webhook settings, for Meta's `hub.challenge` check."""
    api_key: str = ""
    """360dialog: the channel's API key (`D360-API-KEY`; required with `provider = "360dialog"`)."""
    provider: str = ""
    """`360dialog` for a connection through 360dialog, whose webhooks come unsigned (webhook checks
    see only the secrets, so it is named here); unset: Meta."""


class WhatsAppOptions(ConnectionOptions, frozen=True, kw_only=True):
    phone_number_id: str = ""
    """Meta: the business phone number's id (required unless 360dialog). Only webhooks for this number
    are taken."""
    provider: str = ""
    """`360dialog` also picks 360dialog's API when named here, but only `secrets.provider` lets its
    unsigned webhooks in."""
    auto_read: bool = False
    """Mark every inbound user message as read (blue ticks)."""
    preview_url: bool | None = None
    """Force link previews on or off (unset: a text with a link gets a preview)."""


class WhatsAppCodec(Codec):
    """WhatsApp Cloud API, directly from Meta or through 360dialog (`options["provider"]`).

    Read receipts and typing: `encode_activity` takes an `Activity` "read" or "typing" and marks one
    inbound message as read (typing also shows the typing indicator, which WhatsApp ties to a message).
    The message is named, first match wins, by `detail["native_id"]` (its wamid), `detail["message_id"]`
    (its canonical id, looked up in `ctx.native_ids`) or `meta["whatsapp.message_id"]` (a wamid).
    """

    channel: ClassVar[str] = CHANNEL
    secret_settings: ClassVar[type[Settings]] = WhatsAppSecrets
    option_settings: ClassVar[type[Settings]] = WhatsAppOptions
    default_api_base: ClassVar[str] = META_API_BASE
    # Throughput: "up to 80 messages per second (mps) by default" per business phone number.
    send_rate: ClassVar[float] = 80.0
    capabilities: ClassVar[Capabilities] = Capabilities(
        parts=frozenset({"text", "media", "location", "contact", "buttons", "list", "template", "reaction"}),
        media=frozenset({"image", "audio", "voice", "video", "document", "sticker"}),
        media_max_bytes=max(MEDIA_MAX_BYTES.values()),
        media_limits=dict(MEDIA_MAX_BYTES),
        text_limit=_TEXT_LIMIT,
        caption_limit=1024,
        choice_text_limit=_INTERACTIVE_BODY_LIMIT,  # an interactive message's body: "maximum 1024 characters"
        markup="whatsapp",
        max_buttons=3,
        max_button_title=20,
        button_actions=frozenset({"reply", "url"}),
        max_list_rows=10,
        max_list_sections=10,
        max_row_title=24,
        reply=True,
        reaction=True,
        edit=False,
        delete=False,
        typing=True,
        window_hours=24,
        template_format="whatsapp",
    )

    # ------------------------------------------------------------------------------ webhook intake

    def check_settings(self, secrets: WhatsAppSecrets, options: WhatsAppOptions) -> None:
        """Meta needs its token, app secret and phone number id; 360dialog its API key."""
        if "360dialog" in (secrets.provider.lower(), options.provider.lower()):
            if not secrets.api_key:
                raise MissingSetting("secrets.api_key", "a 360dialog connection sends with its API key")
            return
        for path, value in (("secrets.access_token", secrets.access_token), ("secrets.app_secret", secrets.app_secret),
                            ("options.phone_number_id", options.phone_number_id)):
            if not value:
                raise MissingSetting(path, 'a Meta Cloud API connection needs it '
                                     '(a 360dialog one sets secrets.provider = "360dialog")')

    def verify(self, request: HttpRequest, secrets: Mapping[str, str]) -> None:
        """Meta signs the raw body with the `app_secret` (`X-Hub-Signature-256`, checked by `meta_graph`).

        Without an `app_secret` every webhook is refused, except on 360dialog connections: 360dialog relays
        the Cloud API webhooks without Meta's signature (and signs nothing itself), so they are accepted
        unsigned. `verify` sees only the secrets, so a 360dialog connection says so there too:
        `secrets["provider"] = "360dialog"` (beside its `api_key`; it also picks 360dialog's API).
        Anyone who learns such a connection's webhook URL can post to it: keep the URL secret.
        """
        app_secret = secrets.get("app_secret", "")
        if not app_secret:
            if str(secrets.get("provider", "")).lower() == "360dialog":
                return
            raise SignatureError(
                "no app_secret configured for this WhatsApp connection (360dialog connections, whose "
                "webhooks are unsigned, set secrets['provider'] = '360dialog')"
            )
        meta_graph.verify_signature(request, app_secret, self.channel)

    def handshake(self, request: HttpRequest, secrets: Mapping[str, str]) -> HttpResponse | None:
        """Meta verifies the callback URL with `GET ?hub.mode=subscribe&hub.verify_token=…&hub.challenge=…`."""
        return meta_graph.handshake(request, secrets.get("verify_token", ""))

    def dedup_key(self, request: HttpRequest) -> str:
        """The ids of the messages, statuses (with their state: one message has several) and calls."""
        try:
            webhook = native.convert(native.read_json(request), _Webhook)
        except DecodeError:
            return ""
        keys = {key for entry in webhook.entry for change in entry.changes for key in _delivery_keys(change.value)}
        return ",".join(sorted(keys))

    def decode(self, request: HttpRequest, ctx: DecodeContext) -> list[c.Envelope]:
        webhook = native.convert(native.read_json(request), _Webhook)
        if webhook.object != WEBHOOK_OBJECT:
            raise DecodeError(f"expected object {WEBHOOK_OBJECT!r}, got {webhook.object!r}", path="$.object")
        meta_graph.check_batch(_update_paths(webhook))
        own_number = str(ctx.options.get("phone_number_id") or "")
        envelopes: list[c.Envelope] = []
        foreign: list[tuple[str, str]] = []
        for i, entry in enumerate(webhook.entry):
            for j, change in enumerate(entry.changes):
                path = f"$.entry[{i}].changes[{j}].value"
                number = _phone_number_id(change.value)
                if own_number and number and number != own_number:
                    foreign.append((f"{path}.metadata.phone_number_id", number))
                    continue
                decoder = _Decoder(ctx, entry, change, path, request.received_at, entry_path=f"$.entry[{i}]")
                envelopes.extend(decoder.envelopes())
        if foreign and not envelopes:
            # One business account may have several numbers, and one app gets all their webhooks: the
            # other numbers' conversations are not this connection's. Refused, the reason is kept. (Beside
            # changes of its own number they are only left out: the raw record still holds them.)
            path, number = foreign[0]
            raise DecodeError(
                f"event for WhatsApp phone number id {number!r}, not this connection's {own_number!r}", path=path
            )
        return envelopes

    # ---------------------------------------------------------------------------------- sending

    def api_base(self, ctx: EncodeContext) -> str:
        default = D360_API_BASE if _uses_360dialog(ctx) else self.default_api_base
        return (ctx.api_base or default).rstrip("/")

    def encode(self, message: c.Message, ctx: EncodeContext) -> list[OutboundRequest]:
        url, headers = self._endpoint(ctx)
        encoder = _Encoder(ctx)
        for part in message.parts:
            encoder.add(part)
        bodies = encoder.finish()
        context = self._reply_context(message, ctx)
        recipient_type = "group" if message.conversation.type == "group" else "individual"
        # A user known only by BSUID is named in `recipient`; `to` takes a phone number or a group id.
        address = "recipient" if recipient_type == "individual" and BSUID.fullmatch(ctx.to) else "to"
        requests: list[OutboundRequest] = []
        for n, body in enumerate(bodies):
            envelope: JsonObject = {"messaging_product": "whatsapp", "recipient_type": recipient_type, address: ctx.to}
            if context and body["type"] != "reaction":
                # The reply quote goes on the first message that can carry one, not on every call.
                envelope["context"] = context
                context = None
            envelope.update(body)
            requests.append(
                OutboundRequest(
                    method="POST",
                    url=url,
                    headers=headers,
                    body=native.json_body(envelope),
                    idempotency_key=f"{message.id}:{n}",
                    message_id=message.id,
                )
            )
        return requests

    def encode_activity(self, activity: c.Activity, ctx: EncodeContext) -> list[OutboundRequest]:
        if activity.activity not in ("read", "typing"):
            return []
        wamid = _message_to_mark(activity, ctx)
        return [self._read_receipt(wamid, ctx, key=f"{activity.id}:0", typing=activity.activity == "typing")]

    def on_inbound(self, envelope: c.Envelope, ctx: EncodeContext) -> list[OutboundRequest]:
        """With `options["auto_read"]`, every inbound user message is marked as read (blue ticks)."""
        if not ctx.options.get("auto_read") or not isinstance(envelope, c.Message):
            return []
        if envelope.direction != "inbound" or envelope.native is None or not envelope.native.id:
            return []
        return [self._read_receipt(envelope.native.id, ctx, key=f"{envelope.id}:read", typing=False)]

    def parse_response(self, request: OutboundRequest, response: HttpResponse) -> SendResult:
        """Success: `{"messages": [{"id": "wamid…"}]}` (or `{"success": true}` for read receipts).
        Failure: Graph's `{"error": {"message", "type", "code", "error_data": {"details"}, "fbtrace_id"}}`."""
        if 200 <= response.status < 300:
            try:
                answer = native.convert(native.read_json(response), _SendAnswer)
            except DecodeError:
                return SendResult(ok=True)
            return SendResult(ok=True, native_ids=[sent.id for sent in answer.messages if sent.id])
        try:
            raw = native.read_json(response)
            graph_error = native.convert(raw, _ErrorAnswer).error
        except DecodeError:
            return native.http_failure(response)  # not a Graph error body (a proxy, 360dialog's own errors)
        rule = _error_rule(graph_error.code)
        retryable = rule.retryable if rule else (response.status in (408, 425, 429) or response.status >= 500)
        details = graph_error.error_data.details if graph_error.error_data else ""
        error = c.Error(
            code=f"whatsapp_{graph_error.code}",
            message=_describe_error(graph_error.code, graph_error.message, details),
            retryable=retryable,
            native=raw["error"],
        )
        return SendResult(ok=False, retryable=retryable, retry_after=native.retry_after(response.headers), error=error)

    # ------------------------------------------------------------------------------------ helpers

    def _endpoint(self, ctx: EncodeContext) -> tuple[str, dict[str, str]]:
        """The messages URL and auth headers for the connection's provider."""
        base = self.api_base(ctx)
        if _uses_360dialog(ctx):
            api_key = native.required_secret(ctx.secrets, "api_key", "WhatsApp")
            return f"{base}/messages", {"D360-API-KEY": api_key, "Content-Type": "application/json"}
        phone_number_id = native.required_option(ctx.options, "phone_number_id", "WhatsApp")
        token = native.required_secret(ctx.secrets, "access_token", "WhatsApp")
        return f"{base}/{phone_number_id}/messages", {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
        }

    def _read_receipt(self, wamid: str, ctx: EncodeContext, *, key: str, typing: bool) -> OutboundRequest:
        url, headers = self._endpoint(ctx)
        body: JsonObject = {"messaging_product": "whatsapp", "status": "read", "message_id": wamid}
        if typing:
            body["typing_indicator"] = {"type": "text"}
        return OutboundRequest(
            method="POST", url=url, headers=headers, body=native.json_body(body), idempotency_key=key
        )

    @staticmethod
    def _reply_context(message: c.Message, ctx: EncodeContext) -> JsonObject | None:
        if not message.reply_to:
            return None
        return {"message_id": native.native_id(ctx, message.reply_to, "reply_to", "WhatsApp")}


# ------------------------------------------------------------------------------------ decoding


class _Decoder:
    """Decodes one `entry[].changes[]` item into envelopes."""

    def __init__(
        self, ctx: DecodeContext, entry: _Entry, change: _Change, path: str, received_at: float, *, entry_path: str
    ) -> None:
        self.ctx = ctx
        self.entry = entry
        self.entry_path = entry_path
        self.change = change
        self.path = path
        self.received_at = received_at
        self.names: dict[str, str] = {}
        self.usernames: dict[str, str] = {}
        self.contacts: dict[str, JsonObject] = {}
        self.change_errors: list[JsonObject] = []

    def envelopes(self) -> list[c.Envelope]:
        match self.change.field:
            case "messages":
                envelopes = self._messages()
            case "smb_message_echoes":
                envelopes = self._echoes()
            case "user_preferences":
                envelopes = self._preferences()
            case _:
                envelopes = []
        # Whatever produced nothing above (account updates, templates, calls, groups, errors-only
        # changes) is still delivered, verbatim, so that nothing Meta sends is lost.
        return envelopes or [self._account_event()]

    # ------------------------------------------------------------------------------- by field

    def _messages(self) -> list[c.Envelope]:
        value = native.convert(self.change.value, _MessagesValue, self.path)
        self._remember_contacts(value.contacts)
        self.change_errors = value.errors
        envelopes: list[c.Envelope] = []
        for k, raw in enumerate(value.messages):
            envelopes.append(self._message(raw, f"{self.path}.messages[{k}]", echo=False))
        for k, raw in enumerate(value.statuses):
            envelopes.append(self._status(raw, f"{self.path}.statuses[{k}]"))
        return envelopes

    def _echoes(self) -> list[c.Envelope]:
        value = native.convert(self.change.value, _MessagesValue, self.path)
        self._remember_contacts(value.contacts)
        return [
            self._message(raw, f"{self.path}.message_echoes[{k}]", echo=True)
            for k, raw in enumerate(value.message_echoes)
        ]

    def _preferences(self) -> list[c.Envelope]:
        value = native.convert(self.change.value, _PreferencesValue, self.path)
        self._remember_contacts(value.contacts)
        envelopes: list[c.Envelope] = []
        for k, raw in enumerate(value.user_preferences):
            preference = native.convert(raw, _Preference, f"{self.path}.user_preferences[{k}]")
            activity = _PREFERENCES.get(preference.value)
            if activity is None:
                return []  # an unknown preference: the whole change goes out verbatim instead
            envelopes.append(
                c.Activity(
                    id=c.stable_id(
                        "whatsapp.preference",
                        *self._scope(),
                        preference.wa_id,
                        preference.category,
                        preference.value,
                        str(preference.timestamp),
                    ),
                    tenant=self.ctx.tenant,
                    conversation=self._conversation(preference.wa_id),
                    ts=(
                        native.from_unix(preference.timestamp, f"{self.path}.user_preferences[{k}].timestamp")
                        if preference.timestamp
                        else self._event_time()
                    ),
                    sender=self._user(preference.wa_id),
                    activity=activity,
                    detail={"category": preference.category, "value": preference.value, "detail": preference.detail},
                    meta=native.extras("whatsapp", raw, {"wa_id", "value", "category", "detail", "timestamp"}),
                )
            )
        return envelopes

    def _account_event(self) -> c.Message:
        """A change that is not a conversation message, in the business account's own conversation."""
        waba = self.entry.id
        value = self.change.value
        fingerprint = native.json_body(value).decode()
        return c.Message(
            id=c.stable_id("whatsapp.event", *self._scope(), waba, self.change.field, fingerprint),
            tenant=self.ctx.tenant,
            conversation=native.conversation(self.ctx, CHANNEL, waba, "channel"),
            ts=self._event_time(),
            sender=native.sender(self.ctx, waba, role="system"),
            native=c.Native(seq=self.ctx.seq),
            parts=[c.Unsupported(reason=f"WhatsApp {self.change.field!r} webhook", native=value)],
            meta={"whatsapp.field": self.change.field, "whatsapp.waba_id": waba},
        )

    # ----------------------------------------------------------------------------- messages

    def _message(self, received: JsonObject, path: str, *, echo: bool) -> c.Message:
        message, raw, unreadable = native.convert_parts(received, _Message, path, _CONTENT_FIELDS, "whatsapp")
        # Echoes go from the business to the user; everything else comes from the user.
        user = message.user(echo=echo)
        if not user and not message.group_id:
            raise DecodeError("the message names no user: neither 'from' nor 'from_user_id'", path=f"{path}.from")
        meta = native.extras("whatsapp", raw, _MESSAGE_HEADER | {message.type})
        if not echo:
            meta.update(self._contact_meta(user))
        if self.change_errors:
            meta["whatsapp.change_errors"] = self.change_errors
        source = self._ref(message.context.id) if message.context and message.context.id else ""
        if message.type in received and message.type not in raw:
            parts = unreadable  # the content object itself could not be read: its Unsupported part says why
        else:
            fragment = raw.get(message.type, raw)
            parts = native.lenient_parts(
                lambda: self._parts(message, raw, path, meta, source), fragment, f"whatsapp {message.type}"
            )
            parts.extend(unreadable)  # a reply context or error list that could not be read
        if echo:
            sender = native.sender(
                self.ctx, message.from_,
                role="agent",
                handle=_phone_handle(message.from_),
            )
        else:
            sender = self._user(user, role="system" if message.type == "system" else "user")
        return c.Message(
            id=c.message_id(*self._scope(), message.id),
            tenant=self.ctx.tenant,
            conversation=self._conversation(message.group_id or user, group=bool(message.group_id)),
            direction="outbound" if echo else "inbound",
            ts=native.from_unix(message.timestamp, f"{path}.timestamp"),
            sender=sender,
            native=c.Native(id=message.id, seq=self.ctx.seq),
            reply_to=source,
            parts=parts,
            meta=meta,
        )

    def _parts(self, content: _Content, raw: JsonObject, path: str, meta: JsonObject, source: str) -> list[c.Part]:
        """The canonical parts of one message's content; what has no part stays verbatim."""
        kind = content.type
        body = raw.get(kind)
        match kind:
            case "text" if content.text is not None:
                return [c.Text(text=content.text.body)]
            case _ if kind in _INBOUND_MEDIA and isinstance(body, dict):
                media: _MediaObject = getattr(content, kind)
                native.keep_unmapped(meta, f"whatsapp.{kind}", body, _MEDIA_MAPPED)
                return [_media_part(kind, media)]
            case "location" if content.location is not None and isinstance(body, dict):
                mapped = {"latitude", "longitude", "name", "address", "url"}
                native.keep_unmapped(meta, "whatsapp.location", body, mapped)
                place = content.location
                return [
                    c.Location(
                        lat=native.finite(place.latitude, f"{path}.location.latitude"),
                        lon=native.finite(place.longitude, f"{path}.location.longitude"),
                        name=place.name,
                        address=place.address,
                        url=place.url,
                    )
                ]
            case "contacts" if content.contacts:
                meta["whatsapp.contacts"] = body  # phone types, WhatsApp ids, addresses, birthdays…
                return [_contact_part(card) for card in content.contacts]
            case "interactive" if content.interactive is not None and isinstance(body, dict):
                return [self._interactive(content.interactive, body, f"{path}.interactive", meta, source)]
            case "button" if content.button is not None:
                return [c.Action(id=content.button.payload, title=content.button.text, source=source)]
            case "reaction" if content.reaction is not None:
                reaction = content.reaction
                return [
                    c.Reaction(emoji=reaction.emoji, target=self._ref(reaction.message_id), removed=not reaction.emoji)
                ]
            case "order" if content.order is not None and isinstance(body, dict):
                native.keep_unmapped(meta, "whatsapp.order", body, {"catalog_id", "text", "product_items"})
                return _order_parts(content.order, f"{path}.order")
            case "system" if content.system is not None and isinstance(body, dict):
                native.keep_unmapped(meta, "whatsapp.system", body, {"body"})
                return [c.Text(text=content.system.body)]
            case "revoke" if content.revoke is not None:
                return [c.Delete(target=self._ref(content.revoke.original_message_id))]
            case "edit" if content.edit is not None and isinstance(content, _Message):
                # (only a received message can be an edit: an edit inside an edit is kept verbatim)
                return self._edit(content.edit, f"{path}.edit.message", meta)
            case "unsupported" | "unknown":
                return [
                    c.Unsupported(reason=_errors_reason(content.errors) or "not supported by the Cloud API", native=raw)
                ]
            case _ if body is None and kind:
                return [c.Unsupported(reason=f"{kind} message without its {kind!r} object", native=raw)]
            case _:
                return [c.Unsupported(reason=f"WhatsApp message type {kind!r}", native=raw)]

    def _interactive(
        self, interactive: _Interactive, raw: JsonObject, path: str, meta: JsonObject, source: str
    ) -> c.Part:
        """A tap on a reply button or list row → `Action`; a completed Flow → `Form`."""
        replies = {"button_reply": interactive.button_reply, "list_reply": interactive.list_reply}
        reply = replies.get(interactive.type)
        raw_reply = raw.get(interactive.type)
        if reply is not None and isinstance(raw_reply, dict):
            native.keep_unmapped(meta, f"whatsapp.{interactive.type}", raw_reply, {"id", "title"})  # row descriptions
            return c.Action(id=reply.id, title=reply.title, source=source)
        flow = interactive.nfm_reply
        raw_flow = raw.get("nfm_reply")
        if interactive.type == "nfm_reply" and flow is not None and isinstance(raw_flow, dict):
            native.keep_unmapped(meta, "whatsapp.nfm_reply", raw_flow, {"response_json"})
            return _flow_form(flow, f"{path}.nfm_reply.response_json")
        return c.Unsupported(reason=f"interactive reply {interactive.type!r}", native=raw)

    def _edit(self, edit: _EditObject, path: str, meta: JsonObject) -> list[c.Part]:
        """An edited message: the `Edit` marker, then the new content."""
        content = native.convert(edit.message, _Content, path)
        native.keep_unmapped(meta, "whatsapp.edit.message", edit.message, {"type", content.type})
        return [c.Edit(target=self._ref(edit.original_message_id)), *self._parts(content, edit.message, path, meta, "")]

    # ----------------------------------------------------------------------------- statuses

    def _status(self, raw: JsonObject, path: str) -> c.Envelope:
        status = native.convert(raw, _StatusObject, path)
        chat = status.group_id or status.recipient_id or status.recipient_user_id
        is_group = bool(status.group_id) or status.recipient_type == "group"
        state = _STATES.get(status.status)
        meta = native.extras("whatsapp", raw, {"id", "status", "timestamp", "recipient_id", "errors"})
        if len(status.errors) > 1:
            meta["whatsapp.errors"] = raw["errors"]
        ts = native.from_unix(status.timestamp, f"{path}.timestamp")
        # A group member's receipt is told apart from the other members' by the member.
        member = (status.recipient_participant_id,) if status.recipient_participant_id else ()
        if state is None:
            return c.Message(
                id=c.stable_id("whatsapp.status", *self._scope(), status.id, status.status, *member),
                tenant=self.ctx.tenant,
                conversation=self._conversation(chat, group=is_group),
                ts=ts,
                sender=c.Sender(role="system"),
                native=c.Native(id=status.id, seq=self.ctx.seq),
                parts=[c.Unsupported(reason=f"WhatsApp status {status.status!r}", native=raw)],
                meta=meta,
            )
        return c.Status(
            id=c.stable_id("status", *self._scope(), status.id, state, *member),
            tenant=self.ctx.tenant,
            conversation=self._conversation(chat, group=is_group),
            ts=ts,
            native=c.Native(id=status.id, seq=self.ctx.seq),
            native_id=status.id,
            state=state,
            error=_status_error(status.errors[0], raw["errors"][0]) if status.errors else None,
            meta=meta,
        )

    # ------------------------------------------------------------------------------- helpers

    def _scope(self) -> tuple[str, str]:
        return self.ctx.tenant, self.ctx.connection

    def _ref(self, wamid: str) -> str:
        """The canonical id the message `wamid` got (or will get) when it came in on this connection."""
        return c.message_id(*self._scope(), wamid)

    def _conversation(self, chat: str, *, group: bool = False) -> c.Conversation:
        return native.conversation(self.ctx, CHANNEL, chat, "group" if group else "direct")

    def _user(self, user: str, role: c.Role = "user") -> c.Sender:
        """A user, by phone number or (a user with a username) by BSUID."""
        return native.sender(
            self.ctx, user,
            name=self.names.get(user, ""),
            role=role,
            handle=_phone_handle(user) or self.usernames.get(user, ""),
        )

    def _remember_contacts(self, contacts: list[_Contact]) -> None:
        """`value.contacts[]`: the profile names and usernames of whoever wrote, and their raw entries
        for `meta`, by phone number and by BSUID (a message names its user by either)."""
        raw_contacts: list[JsonObject] = self.change.value.get("contacts", [])
        self.names, self.usernames, self.contacts = {}, {}, {}
        for contact, raw in zip(contacts, raw_contacts, strict=True):
            for user in contact.ids:
                self.contacts[user] = raw
                if contact.profile is not None:
                    self.names[user] = contact.profile.name
                    self.usernames[user] = _username_handle(contact.profile.username)

    def _contact_meta(self, wa_id: str) -> JsonObject:
        """The sender's contact entry when it says more than wa_id and profile name (user ids, …)."""
        raw = self.contacts.get(wa_id)
        if raw is None or (not native.extras("whatsapp", raw, {"wa_id", "profile"}) and _only_name(raw.get("profile"))):
            return {}
        return {"whatsapp.contact": raw}

    def _event_time(self) -> datetime:
        if self.entry.time:
            return native.from_unix(self.entry.time, f"{self.entry_path}.time")
        if self.received_at:
            return native.from_unix(self.received_at)
        return c.now()


def _media_part(kind: str, media: _MediaObject) -> c.Media:
    return c.Media(
        media="voice" if kind == "audio" and media.voice else _INBOUND_MEDIA[kind],
        file_id=media.id,
        url=media.url,
        mime=media.mime_type,
        caption=media.caption,
        filename=media.filename,
    )


def _contact_part(card: _ContactCard) -> c.Contact:
    name = ""
    if card.name is not None:
        name = card.name.formatted_name or " ".join(p for p in (card.name.first_name, card.name.last_name) if p)
    return c.Contact(
        name=name,
        phones=[phone.phone or phone.wa_id for phone in card.phones if phone.phone or phone.wa_id],
        emails=[email.email for email in card.emails if email.email],
        org=card.org.company if card.org else "",
        urls=[url.url for url in card.urls if url.url],
    )


def _order_parts(order: _Order, path: str) -> list[c.Part]:
    items = [
        c.ProductItem(
            product_id=item.product_retailer_id,
            quantity=item.quantity,
            price=native.finite(item.item_price, f"{path}.product_items[{n}].item_price")
            if item.item_price is not None
            else None,
            currency=item.currency,
        )
        for n, item in enumerate(order.product_items)
    ]
    parts: list[c.Part] = [c.Product(catalog_id=order.catalog_id, items=items)]
    if order.text:
        parts.append(c.Text(text=order.text))
    return parts


def _flow_form(flow: _FlowReply, path: str) -> c.Form:
    """A completed WhatsApp Flow: its answers (`response_json`, a JSON string) as form fields."""
    try:
        # msgspec, not json: JSON has no NaN, Infinity or lone surrogates, and an envelope cannot carry them
        answers = msgspec.json.decode(flow.response_json)
    except (ValueError, RecursionError):
        raise DecodeError("response_json is not valid JSON", path=path) from None
    if not isinstance(answers, dict):
        raise DecodeError("response_json is not a JSON object", path=path)
    token = answers.pop("flow_token", "")
    return c.Form(
        id=str(token) or flow.name,
        fields=[c.FormField(id=key, value=value) for key, value in answers.items()],
    )


def _status_error(error: _ErrorObject, raw: JsonObject) -> c.Error:
    rule = _error_rule(error.code)
    return c.Error(
        code=f"whatsapp_{error.code}",
        message=_describe_error(error.code, error.title or error.message, error.details),
        retryable=rule.retryable if rule else False,
        native=raw,
    )


def _errors_reason(errors: list[_ErrorObject]) -> str:
    if not errors:
        return ""
    first = errors[0]
    return ": ".join(part for part in (first.title or first.message, first.details) if part)


def _only_name(profile: Any) -> bool:
    return profile is None or (isinstance(profile, dict) and set(profile) <= {"name"})


def _phone_handle(wa_id: str) -> str:
    return f"+{wa_id}" if wa_id.isdigit() else ""


def _username_handle(username: str) -> str:
    return username if not username or username.startswith("@") else f"@{username}"


def _update_paths(webhook: _Webhook) -> Iterator[str]:
    """The path of each update: every message and status a change carries, or the change itself when
    it carries none (an account update, a template status)."""
    for i, entry in enumerate(webhook.entry):
        for j, change in enumerate(entry.changes):
            path = f"$.entry[{i}].changes[{j}]"
            value = change.value if isinstance(change.value, dict) else {}
            items = [f"{path}.value.{key}[{k}]" for key in ("messages", "statuses")
                     for k in range(len(value[key]) if isinstance(value.get(key), list) else 0)]
            yield from items or [path]


def _phone_number_id(value: JsonObject) -> str:
    """The business phone number a change is for (`value.metadata.phone_number_id`); empty when the
    change names none (account-level changes)."""
    metadata = value.get("metadata")
    number = metadata.get("phone_number_id") if isinstance(metadata, dict) else None
    return str(number) if isinstance(number, str | int) and not isinstance(number, bool) else ""


def _delivery_keys(value: JsonObject) -> Iterator[str]:
    """The channel's own ids in one change value, for deduplication."""
    for name in ("messages", "message_echoes"):
        for item in _objects(value.get(name)):
            if item.get("id"):
                yield str(item["id"])
    for item in _objects(value.get("statuses")):
        if item.get("id"):
            # In groups every member's receipt is its own delivery: the same id and state per member.
            participant = item.get("recipient_participant_id")
            who = f":{participant}" if participant else ""
            yield f"{item['id']}:{item.get('status', '')}{who}"
    for item in _objects(value.get("calls")):
        if item.get("id"):
            yield f"{item['id']}:{item.get('event', '')}"


def _objects(items: Any) -> list[JsonObject]:
    return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []


# ------------------------------------------------------------------------------------ encoding


class _Encoder:
    """Turns a message's parts into WhatsApp message bodies, in order, combining parts the way WhatsApp
    does: a text right before buttons or a list becomes that interactive message's body, and consecutive
    contacts travel in one contacts message."""

    def __init__(self, ctx: EncodeContext) -> None:
        self.ctx = ctx
        self.bodies: list[JsonObject] = []
        self._text: str | None = None  # held back in case an interactive part takes it as its body
        self._contacts: list[JsonObject] = []

    def add(self, part: c.Part) -> None:
        if isinstance(part, c.Contact):
            self._flush_text()
            self._contacts.append(_contact_card(part))
            return
        self._flush_contacts()
        match part:
            case c.Text():
                self._flush_text()
                self._text = part.text
            case c.Buttons():
                self.bodies.extend(self._buttons(part))
            case c.List():
                self.bodies.append(self._list(part))
            case c.Media():
                self._flush_text()
                self.bodies.extend(_media_bodies(part))
            case c.Location():
                self._flush_text()
                self.bodies.append(_location_body(part))
            case c.Template():
                self._flush_text()
                self.bodies.append(_template_body(part))
            case c.Reaction():
                self._flush_text()
                self.bodies.append(self._reaction(part))
            case _:
                raise EncodeError(f"WhatsApp cannot send {part.__class__.__name__} parts (degrade the message first)")

    def finish(self) -> list[JsonObject]:
        self._flush_text()
        self._flush_contacts()
        return self.bodies

    # --------------------------------------------------------------------------------- parts

    def _buttons(self, part: c.Buttons) -> list[JsonObject]:
        replies = [button for button in part.buttons if button.action == "reply"]
        links = [button for button in part.buttons if button.action == "url"]
        unsendable = [button.action for button in part.buttons if button.action not in ("reply", "url")]
        if unsendable:
            raise EncodeError(f"WhatsApp buttons can only reply or open a URL, not {unsendable[0]!r}")
        body = self._interactive_body(part.text, "buttons")
        if len(links) == 1 and not replies:
            return [_cta_url_body(body, links[0])]
        # A CTA URL message holds exactly one link and no reply buttons, so further links are written
        # out as text instead of being dropped.
        link_lines = [f"{link.title}: {link.value}" for link in links]
        if not replies:
            return [self._text_body(text) for text in _packed([body, *link_lines], _TEXT_LIMIT)]
        bodies: list[JsonObject] = []
        if link_lines:
            with_links = "\n\n".join([body, *link_lines])
            if len(with_links) <= _INTERACTIVE_BODY_LIMIT:
                body = with_links
            else:
                # Too long to go with the buttons: the links go just before them, as text of their own.
                bodies.extend(self._text_body(text) for text in _packed(link_lines, _TEXT_LIMIT))
        bodies.append(
            {
                "type": "interactive",
                "interactive": {
                    "type": "button",
                    "body": {"text": body},
                    "action": {
                        "buttons": [{"type": "reply", "reply": {"id": b.id, "title": b.title}} for b in replies]
                    },
                },
            }
        )
        return bodies

    def _list(self, part: c.List) -> JsonObject:
        interactive: JsonObject = {"type": "list"}
        if part.header:
            interactive["header"] = {"type": "text", "text": part.header}
        interactive["body"] = {"text": self._interactive_body(part.text, "lists")}
        if part.footer:
            interactive["footer"] = {"text": part.footer}
        sections: list[JsonObject] = []
        for section in part.sections:
            rows = [_list_row(row.id, row.title, row.description) for row in section.rows]
            sections.append({"title": section.title, "rows": rows} if section.title else {"rows": rows})
        interactive["action"] = {"button": part.button or _DEFAULT_LIST_BUTTON, "sections": sections}
        return {"type": "interactive", "interactive": interactive}

    def _reaction(self, part: c.Reaction) -> JsonObject:
        wamid = native.native_id(self.ctx, part.target, "reaction target", "WhatsApp")
        # WhatsApp removes a reaction when it is sent again with an empty emoji.
        return {"type": "reaction", "reaction": {"message_id": wamid, "emoji": "" if part.removed else part.emoji}}

    def _interactive_body(self, own_text: str, what: str) -> str:
        """An interactive message's required body: its own text, else the text just before it when it fits."""
        if own_text:
            self._flush_text()
            if len(own_text) > _INTERACTIVE_BODY_LIMIT:
                # Degradation (choice_text_limit) sends the start of a longer text before the choices.
                raise EncodeError(
                    f"WhatsApp {what} show at most {_INTERACTIVE_BODY_LIMIT} characters of text, not "
                    f"{len(own_text)} (degrade the message first)"
                )
            return own_text
        held = self._text
        if held is not None and len(held) <= _INTERACTIVE_BODY_LIMIT:
            self._text = None
            return held
        self._flush_text()
        raise EncodeError(f"WhatsApp {what} need a body text: set the part's text or put a short Text part before it")

    def _text_body(self, text: str) -> JsonObject:
        preview = self.ctx.options.get("preview_url")
        if preview is None:
            preview = "https://" in text or "http://" in text
        return {"type": "text", "text": {"body": text, "preview_url": bool(preview)}}

    def _flush_text(self) -> None:
        if self._text is not None:
            self.bodies.append(self._text_body(self._text))
            self._text = None

    def _flush_contacts(self) -> None:
        if self._contacts:
            self.bodies.append({"type": "contacts", "contacts": self._contacts})
            self._contacts = []


def _packed(pieces: list[str], limit: int) -> list[str]:
    """`pieces` joined by blank lines into as few texts of at most `limit` characters as they fit in (a
    piece longer than `limit` on its own stays whole: cutting a link would break it)."""
    texts: list[str] = []
    for piece in pieces:
        if texts and len(texts[-1]) + 2 + len(piece) <= limit:
            texts[-1] = f"{texts[-1]}\n\n{piece}"
        else:
            texts.append(piece)
    return texts


def _cta_url_body(body: str, link: c.Button) -> JsonObject:
    return {
        "type": "interactive",
        "interactive": {
            "type": "cta_url",
            "body": {"text": body},
            "action": {"name": "cta_url", "parameters": {"display_text": link.title, "url": link.value}},
        },
    }


def _list_row(row_id: str, title: str, description: str) -> JsonObject:
    row: JsonObject = {"id": row_id, "title": title}
    if description:
        row["description"] = description
    return row


def _media_bodies(part: c.Media) -> list[JsonObject]:
    kind = "audio" if part.media == "voice" else part.media  # a voice note is an audio message (OGG/Opus)
    if kind not in MEDIA_MAX_BYTES:
        raise EncodeError(f"WhatsApp cannot send {part.media!r} media")
    limit = MEDIA_MAX_BYTES[part.media]
    if part.size > limit:
        raise EncodeError(f"{part.media} of {part.size} bytes is over WhatsApp's limit of {limit} bytes")
    # The channel's own media id is preferred: Meta then need not fetch the link.
    if part.file_id:
        media: JsonObject = {"id": part.file_id}
    elif part.url:
        media = {"link": part.url}
    else:
        raise EncodeError("WhatsApp media needs a url or an uploaded media id (file_id); inline bytes are not sent")
    if part.caption and kind in _CAPTIONED:
        media["caption"] = part.caption
    if part.filename and kind == "document":
        media["filename"] = part.filename
    bodies: list[JsonObject] = [{"type": kind, kind: media}]
    if part.caption and kind not in _CAPTIONED:
        # Audio and stickers take no caption: the caption follows as its own text message.
        bodies.append({"type": "text", "text": {"body": part.caption, "preview_url": False}})
    return bodies


def _location_body(part: c.Location) -> JsonObject:
    location: JsonObject = {"latitude": part.lat, "longitude": part.lon}
    if part.name:
        location["name"] = part.name
    if part.address:
        location["address"] = part.address
    return {"type": "location", "location": location}


def _contact_card(part: c.Contact) -> JsonObject:
    # WhatsApp requires formatted_name plus at least one other name field; splitting a full name into
    # first and last is not reliable across cultures, so the whole name is the first name.
    card: JsonObject = {"name": {"formatted_name": part.name, "first_name": part.name}}
    if part.phones:
        card["phones"] = [{"phone": phone} for phone in part.phones]
    if part.emails:
        card["emails"] = [{"email": email} for email in part.emails]
    if part.org:
        card["org"] = {"company": part.org}
    if part.urls:
        card["urls"] = [{"url": url} for url in part.urls]
    return card


def _template_body(part: c.Template) -> JsonObject:
    if not part.language:
        raise EncodeError(f"WhatsApp template {part.name!r} needs a language code (Template.language)")
    template: JsonObject = {"name": part.name, "language": {"code": part.language}}
    header = {key.removeprefix(_HEADER): value for key, value in part.params.items() if key.startswith(_HEADER)}
    body = {key: value for key, value in part.params.items() if not key.startswith(_HEADER)}
    components: list[JsonObject] = [
        {"type": component, "parameters": _template_parameters(part.name, params)}
        for component, params in (("header", header), ("body", body)) if params
    ]
    if components:
        template["components"] = components
    return {"type": "template", "template": template}


_HEADER: Final = "header."
"""`Template.params` keys with this prefix fill the text header's parameter (`header.1`, `header.<name>`)."""


def _template_parameters(name: str, params: dict[str, str]) -> list[JsonObject]:
    """Positional templates ({{1}}, {{2}}) get their values in numeric order; named ones by name."""
    keys = list(params)
    if all(key.isdigit() for key in keys):
        return [{"type": "text", "text": params[key]} for key in sorted(keys, key=int)]
    if any(key.isdigit() for key in keys):
        raise EncodeError(f"template {name!r} mixes numbered and named parameters")
    return [{"type": "text", "parameter_name": key, "text": value} for key, value in params.items()]


def _message_to_mark(activity: c.Activity, ctx: EncodeContext) -> str:
    """The wamid a read receipt or typing indicator refers to (see `WhatsAppCodec`)."""
    wamid = activity.detail.get("native_id")
    if isinstance(wamid, str) and wamid:
        return wamid
    canonical_id = activity.detail.get("message_id")
    if isinstance(canonical_id, str) and canonical_id:
        return native.native_id(ctx, canonical_id, f"{activity.activity} activity", "WhatsApp")
    wamid = activity.meta.get("whatsapp.message_id")
    if isinstance(wamid, str) and wamid:
        return wamid
    raise EncodeError(
        f"WhatsApp {activity.activity} needs the message it refers to: detail['native_id'] (wamid), "
        "detail['message_id'] (canonical id) or meta['whatsapp.message_id']"
    )


def _uses_360dialog(ctx: EncodeContext) -> bool:
    # The provider may be named in options or, since verify() sees only secrets, in secrets alone.
    provider = ctx.options.get("provider") or ctx.secrets.get("provider", "")
    return str(provider).lower() == "360dialog"
