"""Twilio Programmable Messaging codec: SMS, MMS and WhatsApp (or any other Twilio channel address).

Inbound, Twilio calls the webhook with an `application/x-www-form-urlencoded` form (a GET puts the same
fields in the query string). One request carries one thing:

* an incoming message — `MessageSid`, `From`, `To`, `Body`, `NumMedia` with `MediaUrl{N}` and
  `MediaContentType{N}`, and for WhatsApp `ProfileName`, `WaId`, a shared location (`Latitude`,
  `Longitude`, `Address`, `Label`), a tapped button (`ButtonPayload`, `ButtonText`), a chosen list
  item (`ListId`, `ListTitle`) and the message it answers (`OriginalRepliedMessageSid`) → `Message`;
* a status callback for a message we sent — `MessageSid`, `MessageStatus` (queued, sent, delivered,
  read, undelivered, failed, …) and, when it failed, `ErrorCode` → `Status`.

Twilio adds parameters without notice, so every field that has no canonical place is kept in `meta`
as `"twilio.<Field>"`: nothing Twilio sends is lost.

Outbound, every call is `POST {base}/Accounts/{account_sid}/Messages.json`, form-encoded, with HTTP
Basic auth. One message becomes as few calls as Twilio allows: texts and media travel together in
one call (up to 1,600 characters of `Body` and up to 10 `MediaUrl`s; one medium per WhatsApp
message), and each template is its own call (`ContentSid` + `ContentVariables` from the Content API,
which Twilio sends without `Body` or `MediaUrl`).

Connection settings — secrets: `account_sid`, `auth_token` (API calls and webhook signatures), or
`api_key_sid` + `api_key_secret` for the API calls; options: `from` (our number or channel address)
or `messaging_service_sid`, `channel_prefix` (`"whatsapp:"` for a WhatsApp sender: prefixed to `To`
and `From` when they lack a prefix), `mms` (default true; false for senders outside the US and
Canada, where Twilio sends no MMS: media is then sent as links in the text), `status_callback` (the
URL Twilio posts status callbacks to), `public_url` (read by the hub: the URL Twilio signs).

Capabilities are declared once per class, for every Twilio connection, so they are the ones SMS/MMS
and WhatsApp share: plain text (markdown is flattened rather than sent as WhatsApp's `*bold*`, which
SMS would show literally), 1,600 characters, media by URL up to 5 MB (Twilio's MMS total, and its
WhatsApp image limit), templates. Buttons, lists, replies and reactions need Content API templates
on Twilio, so they are not declared: degradation turns buttons into numbered text. WhatsApp's
24-hour window is left to Twilio, which refuses late free-form messages with error 63016 (reported
as a final failure).

Sources: Twilio docs "Twilio's request to your incoming message Webhook URL" (webhook-request),
"Secure webhooks" and the twilio-python RequestValidator (signature), "Track the Message Status of
Outbound Messages" and "Outbound Message Status in Status Callbacks", the Messages resource, "Guidance
on WhatsApp Media Messages", the Content API (`ContentSid`, `ContentVariables`) and the error pages
20003, 20429, 21211, 21610, 30001 to 30008 and 63016 to 63018.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import partial
from typing import Any, ClassVar, Final, TypeAlias
from urllib.parse import parse_qsl, urlencode, urlsplit

import msgspec

from babelhub import canonical as c
from babelhub.codecs import native
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

__all__ = ["TwilioCodec"]

Form: TypeAlias = dict[str, str]
Pairs: TypeAlias = list[tuple[str, str]]

CHANNEL: Final = "twilio"
API_BASE: Final = "https://api.twilio.com/2010-04-01"

BODY_LIMIT: Final = 1600  # characters of `Body` in one message
MEDIA_PER_MESSAGE: Final = 10  # `MediaUrl`s in one MMS
MEDIA_PER_WHATSAPP_MESSAGE: Final = 1  # a WhatsApp message carries one medium
MEDIA_MAX_BYTES: Final = 5_000_000  # an MMS in total; also WhatsApp's image limit
_PARAGRAPH: Final = "\n\n"  # between texts (and captions) sharing one Body

#: Twilio's MessageStatus → canonical state. "accepted" means a Messaging Service took the message
#: and is choosing a sender: it is as good as queued. "scheduled" has not been queued yet; "canceled"
#: (a scheduled message called off) will never be sent. Statuses of incoming messages ("receiving",
#: "received") and "partially_delivered" are not states of a message we sent: kept verbatim instead.
_STATES: Final[dict[str, c.State]] = {
    "scheduled": "accepted",
    "accepted": "queued",
    "queued": "queued",
    "sending": "sent",
    "sent": "sent",
    "delivered": "delivered",
    "read": "read",
    "undelivered": "failed",
    "failed": "failed",
    "canceled": "failed",
}
_INCOMING_STATES: Final = frozenset({"receiving", "received"})

#: Form fields an incoming message maps onto canonical fields; the rest go to `meta`. The SID of the
#: message replied to stays in `meta` too: `reply_to` holds only its hash.
_MESSAGE_FIELDS: Final = frozenset({"MessageSid", "From", "Body", "NumMedia", "ProfileName"})
_LOCATION_FIELDS: Final = frozenset({"Latitude", "Longitude", "Address", "Label"})
_BUTTON_FIELDS: Final = frozenset({"ButtonPayload", "ButtonText"})
_LIST_FIELDS: Final = frozenset({"ListId", "ListTitle"})
#: Fields read into parts: one that cannot be read (a `NumMedia` or `Latitude` that is no number) is an
#: Unsupported part, and the rest of the message still arrives.
_PART_FIELDS: Final = frozenset({"NumMedia", "Latitude", "Longitude"})
#: Status fields the envelope header already carries.
_STATUS_FIELDS: Final = frozenset({"MessageSid", "To"})


# ------------------------------------------------------------------------------------ error codes


_rule = native.ErrorRule


#: Twilio error codes (twilio.com/docs/api/errors/<code>) seen when sending messages: whether sending
#: again later can succeed, and what the code means in words an operator can act on. Codes not
#: listed fall back to the HTTP status (API answers) or to "final" (status callbacks).
ERROR_RULES: Final[dict[int, native.ErrorRule]] = {
    20003: _rule(False, "authentication failed: check the account SID and auth token or API key"),
    20008: _rule(False, "the resource is not accessible with these (test) credentials"),
    20404: _rule(False, "the resource was not found: check the account SID"),
    20429: _rule(True, "too many concurrent requests to the Twilio API"),
    20500: _rule(True, "Twilio had an internal error"),
    20503: _rule(True, "the Twilio service is temporarily unavailable"),
    21211: _rule(False, "the 'To' number is not a valid phone number"),
    21408: _rule(False, "sending to this region is not enabled on the account (geo permissions)"),
    21602: _rule(False, "the message needs a body, media or a content template"),
    21606: _rule(False, "the 'From' number cannot send messages of this kind"),
    21608: _rule(False, "a trial account can only send to verified numbers"),
    21610: _rule(False, "the recipient unsubscribed from this sender (replied STOP)"),
    21611: _rule(True, "the sender's queue is full (more than its hours of queued messages)"),
    21612: _rule(False, "the 'To' number cannot be reached from this sender"),
    21614: _rule(False, "the 'To' number is not a mobile number"),
    21617: _rule(False, "the body is longer than 1,600 characters"),
    21619: _rule(False, "the message needs a body, media or a content template"),
    30001: _rule(True, "queue overflow: messages were sent faster than the sender's rate allows"),
    30002: _rule(False, "the account is suspended"),
    30003: _rule(False, "the destination handset is unreachable"),
    30004: _rule(False, "the message was blocked (the recipient blocks this sender, or carrier blocking)"),
    30005: _rule(False, "the destination number is unknown or no longer in service"),
    30006: _rule(False, "the destination is a landline or an unreachable carrier"),
    30007: _rule(False, "the carrier filtered the message as spam or policy violation"),
    30008: _rule(False, "the carrier reported an unknown error"),
    63016: _rule(
        False,
        "outside WhatsApp's 24-hour window: only an approved template (ContentSid) can start the conversation",
    ),
    63017: _rule(True, "the account's combined message rate limit was exceeded"),
    63018: _rule(True, "the WhatsApp sender exceeded its messaging rate limit"),
}


def _error_rule(code: str | int) -> native.ErrorRule | None:
    try:
        return ERROR_RULES.get(int(code))
    except (TypeError, ValueError):
        return None


def _describe_error(code: str | int, native_words: str) -> str:
    """One readable sentence: what the code means, then Twilio's own words."""
    rule = _error_rule(code)
    if rule is None:
        return native_words or f"Twilio error {code}"
    return f"{rule.meaning} ({native_words})" if native_words else rule.meaning


# -------------------------------------------------------------------- wire format: webhook forms


class _Webhook(msgspec.Struct, kw_only=True, rename="pascal"):
    """The fields of a webhook form read here (PascalCase on the wire: `from_` is `From`)."""

    message_sid: str = ""
    from_: str = ""
    to: str = ""
    body: str = ""
    num_media: int = 0
    message_status: str = ""
    profile_name: str = ""
    latitude: float | None = None
    longitude: float | None = None
    address: str = ""
    label: str = ""
    button_payload: str = ""
    button_text: str = ""
    list_id: str = ""
    list_title: str = ""
    original_replied_message_sid: str = ""
    error_code: str = ""
    error_message: str = ""
    channel_status_message: str = ""


# ------------------------------------------------------------------------ wire format: API answers


class _CreatedMessage(msgspec.Struct, kw_only=True):
    """The Message resource returned by `POST .../Messages.json` (201 Created)."""

    sid: str = ""
    status: str = ""


class _ApiError(msgspec.Struct, kw_only=True):
    """Twilio's REST error body: `{"code", "message", "more_info", "status"}`."""

    code: int = 0
    message: str = ""
    more_info: str = ""


# ------------------------------------------------------------------------------------------ codec


class TwilioSecrets(Settings, frozen=True, kw_only=True):
    account_sid: str
    """The account SID (`AC…`), part of every API URL."""
    auth_token: str = ""
    """The account's auth token: webhooks are signed with it (`X-Twilio-Signature`), and API calls use
    it unless an API key is set."""
    api_key_sid: str = ""
    """An API key SID (`SK…`) for the API calls, with `api_key_secret`, instead of the auth token."""
    api_key_secret: str = ""
    """The secret of `api_key_sid`."""


class TwilioOptions(ConnectionOptions, frozen=True, kw_only=True):
    from_: str = msgspec.field(default="", name="from")
    """Our number or channel address messages are sent from (or set `messaging_service_sid`)."""
    messaging_service_sid: str = ""
    """The Messaging Service (`MG…`) that sends, instead of or besides `from`."""
    channel_prefix: str = ""
    """`whatsapp:` for a WhatsApp sender: put before `To` and `From` when they have no prefix."""
    mms: bool = True
    """False for senders outside the US and Canada, where Twilio sends no MMS: media go as links."""
    status_callback: str = ""
    """The URL Twilio posts each sent message's status callbacks to."""


class TwilioCodec(Codec):
    """Twilio Programmable Messaging: SMS and MMS, and WhatsApp through Twilio (`options["channel_prefix"]`)."""

    channel: ClassVar[str] = CHANNEL
    secret_settings: ClassVar[type[Settings]] = TwilioSecrets
    option_settings: ClassVar[type[Settings]] = TwilioOptions
    default_api_base: ClassVar[str] = API_BASE
    # A phone number's or messaging service's webhook may be set to HTTP GET: the fields then come in
    # the query string, signed with the URL ("Secure webhooks"), and are verified and recorded like a POST.
    delivers_by_get: ClassVar[bool] = True
    capabilities: ClassVar[Capabilities] = Capabilities(
        parts=frozenset({"text", "media", "template"}),
        media=frozenset({"image", "audio", "voice", "video", "document"}),
        media_max_bytes=MEDIA_MAX_BYTES,
        text_limit=BODY_LIMIT,
        caption_limit=BODY_LIMIT,  # a caption is sent as (part of) the Body
        markup="plain",
        max_buttons=0,
        reply=False,
        reaction=False,
        edit=False,
        delete=False,
        typing=False,
        window_hours=0,
    )

    # ------------------------------------------------------------------------------ webhook intake

    def check_settings(self, secrets: TwilioSecrets, options: TwilioOptions) -> None:
        """API calls authenticate with the auth token or with an API key pair; a message needs a sender."""
        if secrets.api_key_sid or secrets.api_key_secret:
            for name in ("api_key_sid", "api_key_secret"):
                if not getattr(secrets, name):
                    raise MissingSetting(f"secrets.{name}", "an API key needs both api_key_sid and api_key_secret")
        elif not secrets.auth_token:
            raise MissingSetting("secrets.auth_token", "it signs webhooks and authenticates API calls "
                                 "(or set api_key_sid + api_key_secret for the API calls)")
        if not options.from_ and not options.messaging_service_sid:
            raise MissingSetting("options.from", "the number or address messages are sent from "
                                 "(or set options.messaging_service_sid)")

    def verify(self, request: HttpRequest, secrets: Mapping[str, str]) -> None:
        """`X-Twilio-Signature` = base64(HMAC-SHA1(auth_token, URL + each POST field's name and value,
        sorted by name)). Twilio signs the URL it called, sometimes with and sometimes without the
        port, so both spellings are accepted (as Twilio's own validators do). A GET is signed over its
        URL alone, so its fields (which decode reads from the query) must be the signed URL's query, and
        a GET with a body is refused. The signature holds no timestamp: a replayed request is caught by
        `dedup_key`, not here."""
        auth_token = secrets.get("auth_token", "")
        if not auth_token:
            raise SignatureError("no auth_token configured for this Twilio connection")
        given = request.headers.get("x-twilio-signature", "")
        if not given:
            raise SignatureError("missing X-Twilio-Signature header")
        if not request.url:
            raise SignatureError("the URL Twilio called is unknown: set the connection option public_url")
        try:
            params = _signed_fields(request)
        except DecodeError as exc:
            raise SignatureError(f"cannot check the signature: {exc.reason}") from None
        if _is_get(request) and _query_fields(request.url) != request.query:
            # A GET is signed over its URL alone: the fields decode reads must be the URL's own.
            raise SignatureError("the query string Twilio signed is not the one received")
        for url in _url_spellings(request.url):
            if native.same_secret(given, _signature(auth_token, url, params)):
                return
        raise SignatureError("X-Twilio-Signature does not match the URL and parameters")

    def dedup_key(self, request: HttpRequest) -> str:
        """`MessageSid` for a message; `MessageSid:MessageStatus` for a status callback (one message
        goes through several statuses)."""
        form = dict(_form_pairs(request))
        sid = form.get("MessageSid", "")
        status = form.get("MessageStatus", "")
        return f"{sid}:{status}" if sid and status else sid

    def decode(self, request: HttpRequest, ctx: DecodeContext) -> list[c.Envelope]:
        form = dict(_form_pairs(request))
        webhook, readable, unreadable = native.convert_parts(form, _Webhook, "$", _PART_FIELDS, "twilio")
        if not webhook.message_sid:
            raise DecodeError("no MessageSid: not a Twilio messaging webhook", path="$.MessageSid")
        received = _received_time(request.received_at)
        if _is_status_callback(webhook):
            # a status has no parts: a field that could not be read stays in meta with the others
            return [_Decoder(ctx, form, webhook, received, []).status()]
        return [_Decoder(ctx, readable, webhook, received, unreadable).message()]

    # ---------------------------------------------------------------------------------- sending

    def encode(self, message: c.Message, ctx: EncodeContext) -> list[OutboundRequest]:
        account_sid = native.required_secret(ctx.secrets, "account_sid", "Twilio")
        url = f"{self.api_base(ctx)}/Accounts/{account_sid}/Messages.json"
        headers = {"Authorization": _basic_auth(ctx.secrets), "Content-Type": "application/x-www-form-urlencoded"}
        addressing = _addressing(ctx)
        trailer = _status_callback(ctx)
        recipient = dict(addressing)["To"]
        encoder = _Encoder(channel_address=_is_channel_address(recipient), mms=_mms_enabled(ctx))
        for part in message.parts:
            encoder.add(part)
        return [
            OutboundRequest(
                method="POST",
                url=url,
                headers=headers,
                body=urlencode([*addressing, *content, *trailer]).encode("ascii"),
                idempotency_key=f"{message.id}:{n}",
                message_id=message.id,
            )
            for n, content in enumerate(encoder.finish())
        ]

    def parse_response(self, request: OutboundRequest, response: HttpResponse) -> SendResult:
        """Success: 201 with the Message resource (`{"sid": "SM…", "status": "queued", …}`).
        Failure: `{"code": 21211, "message": …, "more_info": …, "status": 400}`; 429 (code 20429) and
        5xx may succeed later, honouring Retry-After."""
        if 200 <= response.status < 300:
            try:
                created = native.convert(native.read_json(response), _CreatedMessage)
            except DecodeError:
                return SendResult(ok=True)
            return SendResult(ok=True, native_ids=[created.sid] if created.sid else [])
        try:
            raw = native.read_json(response)
            api_error = native.convert(raw, _ApiError)
        except DecodeError:
            return native.http_failure(response)  # not Twilio's error body (a proxy, a load balancer)
        if not api_error.code:
            return native.http_failure(response, message=api_error.message, native=raw)
        rule = _error_rule(api_error.code)
        retryable = rule.retryable if rule else (response.status in (408, 425, 429) or response.status >= 500)
        error = c.Error(
            code=f"twilio_{api_error.code}",
            message=_describe_error(api_error.code, api_error.message),
            retryable=retryable,
            native=raw,
        )
        return SendResult(ok=False, retryable=retryable, retry_after=native.retry_after(response.headers), error=error)


# ------------------------------------------------------------------------------------- signatures


def _signature(auth_token: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    """The X-Twilio-Signature of a request to `url` with POST fields `params` (repeated names allowed)."""
    signed = url + "".join(name + value for name, value in sorted(params))
    digest = hmac.new(auth_token.encode("utf-8"), signed.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def _signed_fields(request: HttpRequest) -> Pairs:
    """The POST fields Twilio signs: none for a GET, whose fields are in the signed URL already (a GET
    with a body is refused: no signature covers its body)."""
    if _is_get(request):
        _refuse_get_body(request)
        return []
    if not request.body:
        return []
    return _parse_form(request.body)


def _query_fields(url: str) -> Form:
    """The fields of `url`'s query string, the first value of a repeated name (as the hub records them)."""
    fields: Form = {}
    for name, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        fields.setdefault(name, value)
    return fields


def _url_spellings(url: str) -> list[str]:
    """`url` as given, and with its default port added or its port removed."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        other = parts._replace(netloc=_netloc(parts.username, parts.password, host)).geturl()
    else:
        default_port = 443 if parts.scheme == "https" else 80
        other = parts._replace(netloc=_netloc(parts.username, parts.password, f"{host}:{default_port}")).geturl()
    return [url, other]


def _netloc(username: str | None, password: str | None, host: str) -> str:
    if username is None:
        return host
    credentials = f"{username}:{password}" if password is not None else username
    return f"{credentials}@{host}"


# ------------------------------------------------------------------------------------ form reading


def _form_pairs(request: HttpRequest) -> Pairs:
    """The webhook's fields: the form body, or the query string of a GET webhook. These are the fields
    `verify` checks: a GET is signed over its URL only, so its fields come from the query alone."""
    if _is_get(request):
        _refuse_get_body(request)
        # A query is any text the caller decoded; an envelope cannot carry lone surrogates.
        return [(native.well_formed(name), native.well_formed(value)) for name, value in request.query.items()]
    return _parse_form(request.body)


def _is_get(request: HttpRequest) -> bool:
    return request.method.upper() == "GET"


def _refuse_get_body(request: HttpRequest) -> None:
    if request.body:
        raise DecodeError("a GET webhook carries its fields in the query string, but this one has a body", path="$")


def _parse_form(body: bytes) -> Pairs:
    if not body:
        raise DecodeError("empty body: expected a form post", path="$")
    return list(native.parse_form(body, strict=True))


def _is_status_callback(webhook: _Webhook) -> bool:
    """A status callback reports on a message we sent; incoming messages may carry `SmsStatus` (and,
    rarely, `MessageStatus`) "received", which is no status of ours."""
    return bool(webhook.message_status) and webhook.message_status not in _INCOMING_STATES


def _received_time(received_at: float) -> datetime:
    """Twilio's webhooks carry no timestamp: the hub's time of receipt, recorded with the request."""
    return native.from_unix(received_at) if received_at else c.now()


# ------------------------------------------------------------------------------------ decoding


class _Decoder:
    """Turns one webhook form into its envelope."""

    def __init__(
        self, ctx: DecodeContext, form: Form, webhook: _Webhook, ts: datetime, unreadable: list[c.Part]
    ) -> None:
        self.ctx = ctx
        self.form = form
        self.webhook = webhook
        self.ts = ts
        self.unreadable = unreadable  # fields that could not be read, as Unsupported parts
        self.mapped: set[str] = set()  # fields a canonical field holds; the others go to meta

    # ---------------------------------------------------------------------------- messages

    def message(self) -> c.Message:
        webhook = self.webhook
        user = webhook.from_
        self.mapped.update(_MESSAGE_FIELDS)
        reply_to = self._ref(webhook.original_replied_message_sid) if webhook.original_replied_message_sid else ""
        parts = [*self._text(), *self._media(), *self._location(), *self._choice(reply_to), *self.unreadable]
        meta: dict[str, Any] = {"twilio.channel": _channel_kind(user, webhook.num_media)}
        meta.update(self._unmapped())
        return c.Message(
            id=c.message_id(*self._scope(), webhook.message_sid),
            tenant=self.ctx.tenant,
            conversation=self._conversation(user),
            direction="inbound",
            ts=self.ts,
            sender=native.sender(
                self.ctx, user,
                name=webhook.profile_name,
                role="user",
                handle=user,
            ),
            native=c.Native(id=webhook.message_sid, seq=self.ctx.seq),
            reply_to=reply_to,
            parts=parts,
            meta=meta,
        )

    def _text(self) -> list[c.Part]:
        body = self.webhook.body
        # A tapped button or list item also puts its title in Body: the Action already says so.
        if not body or body in (self.webhook.button_text, self.webhook.list_title):
            return []
        return [c.Text(text=body)]

    def _media(self) -> list[c.Part]:
        parts: list[c.Part] = []
        # Twilio sends at most 10 media; a larger NumMedia names media that are not there
        for n in range(min(self.webhook.num_media, MEDIA_PER_MESSAGE + 1)):
            url_field, type_field = f"MediaUrl{n}", f"MediaContentType{n}"
            fields = {name: self.form[name] for name in (url_field, type_field) if name in self.form}
            self.mapped.update(fields)
            parts.extend(native.lenient_parts(partial(self._medium, n), fields or {"NumMedia": self.webhook.num_media},
                                              "twilio medium"))
        return parts

    def _medium(self, n: int) -> c.Part:
        url_field, type_field = f"MediaUrl{n}", f"MediaContentType{n}"
        url = self.form.get(url_field, "")
        if not url:
            raise DecodeError(f"NumMedia is {self.webhook.num_media} but {url_field} is missing", f"$.{url_field}")
        mime = self.form.get(type_field, "")
        return c.Media(media=native.media_kind(mime), url=url, mime=mime)

    def _location(self) -> list[c.Part]:
        webhook = self.webhook
        if webhook.latitude is None or webhook.longitude is None:
            return []  # half a coordinate stays in meta
        self.mapped.update(_LOCATION_FIELDS)
        fields = {name: self.form[name] for name in _LOCATION_FIELDS if name in self.form}
        return native.lenient_parts(self._place, fields, "twilio location")

    def _place(self) -> c.Part:
        webhook = self.webhook
        assert webhook.latitude is not None and webhook.longitude is not None  # checked by _location
        lat = native.finite(webhook.latitude, "$.Latitude")
        lon = native.finite(webhook.longitude, "$.Longitude")
        return c.Location(lat=lat, lon=lon, name=webhook.label, address=webhook.address)

    def _choice(self, source: str) -> list[c.Part]:
        """A tapped quick-reply or call-to-action button, or a chosen list item."""
        webhook = self.webhook
        parts: list[c.Part] = []
        if webhook.button_payload or webhook.button_text:
            self.mapped.update(_BUTTON_FIELDS)
            button = webhook.button_payload or webhook.button_text  # a button without payload answers with its text
            parts.append(c.Action(id=button, title=webhook.button_text, source=source))
        if webhook.list_id:
            self.mapped.update(_LIST_FIELDS)
            parts.append(c.Action(id=webhook.list_id, title=webhook.list_title, source=source))
        return parts

    # ---------------------------------------------------------------------------- statuses

    def status(self) -> c.Envelope:
        webhook = self.webhook
        sid = webhook.message_sid
        self.mapped.update(_STATUS_FIELDS)
        meta: dict[str, Any] = {"twilio.channel": _channel_kind(webhook.to, 0)}
        meta.update(self._unmapped())
        state = _STATES.get(webhook.message_status)
        if state is None:
            return c.Message(
                id=c.stable_id("twilio.status", *self._scope(), sid, webhook.message_status),
                tenant=self.ctx.tenant,
                conversation=self._conversation(webhook.to),
                ts=self.ts,
                sender=c.Sender(role="system"),
                native=c.Native(id=sid, seq=self.ctx.seq),
                parts=[c.Unsupported(reason=f"Twilio message status {webhook.message_status!r}", native=self.form)],
                meta=meta,
            )
        return c.Status(
            id=c.stable_id("status", *self._scope(), sid, state),
            tenant=self.ctx.tenant,
            conversation=self._conversation(webhook.to),
            ts=self.ts,
            native=c.Native(id=sid, seq=self.ctx.seq),
            native_id=sid,
            state=state,
            error=self._status_error() if state == "failed" else None,
            meta=meta,
        )

    def _status_error(self) -> c.Error:
        webhook = self.webhook
        words = webhook.error_message or webhook.channel_status_message
        fields = ("ErrorCode", "ErrorMessage", "ChannelStatusMessage", "MessageStatus")
        details = {name: self.form[name] for name in fields if name in self.form}
        if not webhook.error_code:
            return c.Error(code=f"twilio_{webhook.message_status}", message=words, native=details)
        rule = _error_rule(webhook.error_code)
        return c.Error(
            code=f"twilio_{webhook.error_code}",
            message=_describe_error(webhook.error_code, words),
            retryable=rule.retryable if rule else False,
            native=details,
        )

    # ------------------------------------------------------------------------------ helpers

    def _scope(self) -> tuple[str, str]:
        return self.ctx.tenant, self.ctx.connection

    def _ref(self, sid: str) -> str:
        """The canonical id the message `sid` got (or will get) when it came in on this connection."""
        return c.message_id(*self._scope(), sid)

    def _conversation(self, address: str) -> c.Conversation:
        return native.conversation(self.ctx, CHANNEL, address, "direct")

    def _unmapped(self) -> dict[str, str]:
        return native.extras("twilio", self.form, self.mapped)


def _channel_kind(address: str, num_media: int) -> str:
    """The channel named by the address prefix ("whatsapp"), else "mms" or "sms"."""
    prefix, colon, _ = address.partition(":")
    if colon and prefix:
        return prefix
    return "mms" if num_media else "sms"


# ------------------------------------------------------------------------------------ encoding


class _Encoder:
    """Groups a message's parts into Messages API calls, in order: texts and media share a call while
    the Body stays within 1,600 characters and the media within the per-message count; a template is
    always a call of its own."""

    def __init__(self, *, channel_address: bool, mms: bool) -> None:
        # WhatsApp (a channel address) takes one medium per message, and always takes media.
        self.media_per_message = MEDIA_PER_WHATSAPP_MESSAGE if channel_address else MEDIA_PER_MESSAGE
        self.mms = mms or channel_address
        self.calls: list[Pairs] = []
        self._texts: list[str] = []
        self._media: list[str] = []

    def add(self, part: c.Part) -> None:
        match part:
            case c.Text():
                self._add_text(part.text)
            case c.Media():
                self._add_media(part)
            case c.Template():
                self._flush()
                self.calls.append(_template_fields(part))
            case _:
                raise EncodeError(f"Twilio cannot send {part.__class__.__name__} parts (degrade the message first)")

    def finish(self) -> list[Pairs]:
        self._flush()
        return self.calls

    def _add_text(self, text: str) -> None:
        if len(text) > BODY_LIMIT:
            raise EncodeError(f"a text of {len(text)} characters is over Twilio's {BODY_LIMIT}-character Body limit")
        if self._texts and len(_PARAGRAPH.join([*self._texts, text])) > BODY_LIMIT:
            self._flush()
        self._texts.append(text)

    def _add_media(self, part: c.Media) -> None:
        if not part.url:
            raise EncodeError("Twilio sends media by public URL only (MediaUrl): this medium has no url")
        if not self.mms:
            # No MMS for this sender: the medium goes as a link in the text, as Twilio's own MMS
            # converter would send it.
            self._add_text(f"{part.caption} {part.url}".strip())
            return
        if len(self._media) == self.media_per_message:
            self._flush()
        self._media.append(part.url)
        if part.caption:
            self._add_text(part.caption)

    def _flush(self) -> None:
        if not self._texts and not self._media:
            return
        fields: Pairs = [("Body", _PARAGRAPH.join(self._texts))] if self._texts else []
        fields.extend(("MediaUrl", url) for url in self._media)
        self.calls.append(fields)
        self._texts, self._media = [], []


def _template_fields(part: c.Template) -> Pairs:
    """A Content API template: `Template.name` is its Content SID, `params` its variables."""
    if not part.name.startswith("HX"):
        raise EncodeError(
            f"Twilio templates are Content API templates: Template.name must be a Content SID (HX…), not {part.name!r}"
        )
    fields: Pairs = [("ContentSid", part.name)]
    if part.params:
        fields.append(("ContentVariables", json.dumps(part.params, ensure_ascii=False, separators=(",", ":"))))
    return fields


def _addressing(ctx: EncodeContext) -> Pairs:
    """`To`, then `From` and/or `MessagingServiceSid`, with the channel prefix where it is missing."""
    prefix = str(ctx.options.get("channel_prefix", ""))
    if not ctx.to:
        raise EncodeError("Twilio message has no recipient (EncodeContext.to)")
    fields: Pairs = [("To", _with_prefix(prefix, ctx.to))]
    sender = str(ctx.options.get("from", ""))
    service = str(ctx.options.get("messaging_service_sid", ""))
    if not sender and not service:
        raise EncodeError("Twilio connection has neither a 'from' nor a 'messaging_service_sid' option")
    if sender:
        fields.append(("From", _with_prefix(prefix, sender)))
    if service:
        fields.append(("MessagingServiceSid", service))
    return fields


def _with_prefix(prefix: str, address: str) -> str:
    """A bare number gets the connection's prefix ("whatsapp:"); a prefixed address is left alone."""
    return address if not prefix or _is_channel_address(address) else prefix + address


def _is_channel_address(address: str) -> bool:
    return ":" in address


def _status_callback(ctx: EncodeContext) -> Pairs:
    """Where Twilio should post this message's status callbacks, when the connection says."""
    url = ctx.options.get("status_callback")
    return [("StatusCallback", str(url))] if url else []


def _mms_enabled(ctx: EncodeContext) -> bool:
    setting = ctx.options.get("mms", True)
    if isinstance(setting, str):
        return setting.strip().lower() not in ("false", "no", "0", "off")
    return bool(setting)


def _basic_auth(secrets: Mapping[str, str]) -> str:
    """HTTP Basic with an API key when one is configured, else the account SID and auth token."""
    if secrets.get("api_key_sid") or secrets.get("api_key_secret"):
        user = native.required_secret(secrets, "api_key_sid", "Twilio")
        password = native.required_secret(secrets, "api_key_secret", "Twilio")
    else:
        user = native.required_secret(secrets, "account_sid", "Twilio")
        password = native.required_secret(secrets, "auth_token", "Twilio")
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
