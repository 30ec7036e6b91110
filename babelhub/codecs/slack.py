"""Slack: the Events API and interactivity in, the Web API (`chat.*`, `reactions.*`) out.

Inbound, Slack calls one Request URL with three kinds of body:

* Events API deliveries — JSON `{"type": "event_callback", "event_id", "event": {...}}`: messages and their
  subtypes, `app_mention`, reactions, members joining or leaving. Slack retries a delivery it thinks failed
  (header `X-Slack-Retry-Num`) with the same `event_id`, which is the dedup key, and every id decode gives
  is derived from Slack's own ids, so a retry yields the very same envelopes.
* Interactivity — a form post whose single field `payload` holds JSON (`block_actions` when someone clicks
  a button or picks an option; modal and shortcut payloads are kept as `unsupported`).
* Slash commands — a form post of plain fields (`command`, `text`, `channel_id`, `user_id`, …), decoded as
  the text the user typed.

Message text is Slack's mrkdwn; it is decoded to Markdown with the people it mentions (see
`mrkdwn_to_markdown`), and the original kept in meta `slack.text` when it differs.

Credentials in payloads: interaction payloads and slash commands carry `token`, Slack's legacy verification
token, which is removed from every payload kept in an `Unsupported` part or in meta. Meta
`slack.response_url` (block actions, slash commands) is kept on purpose so that a processor can answer
the user: it is a short-lived credential (anyone holding it may post into that conversation, up to five
times within 30 minutes), and it is published with the envelope to every processor of the tenant.

Socket Mode (the `slack_socket` inbound source) receives the same three payloads over the app's own
WebSocket and records each shaped as its webhook would be (JSON, form `payload=`, form fields), unsigned:
the hub opened that socket with the app-level token, so there is no signature to check.

Every webhook request is signed (v0: HMAC-SHA256 over `v0:{timestamp}:{body}` with the app's signing secret) and
carries its timestamp; requests more than five minutes away from when the hub received them are refused
as replays. Slack checks the URL with a `url_verification` challenge, and a slash command URL with
`ssl_check=1` (see `handshake`).

Ids: a Slack message is identified by its channel and its `ts`, so the native message id is
`"{channel}:{ts}"` and the conversation is the channel. A reply inside a thread stays in the channel's
conversation and records the thread's root message in `thread`.

The bot's own messages (and reactions) come back as events too; they are never re-ingested: decode
returns no envelope for them. "Own" means the bot user of this installation (`authorizations[]` entries
with `is_bot`, or the connection option `bot_user_id`) or the bot id in option `bot_id`. Other bots'
messages are decoded with sender role "bot".

Outbound, a message becomes one `chat.postMessage` with Block Kit blocks (a single text alone is sent as
plain `text`); `edit` becomes `chat.update`, `delete` `chat.delete`, a reaction `reactions.add/remove`.
A reply goes into a thread: `thread_ts` is the `thread` root, else the message in `reply_to`.
Files are sent by URL (image blocks, or links); uploading bytes needs the multipart `files.uploadV2`
flow, which is out of scope for this codec, so media without a URL is refused with an EncodeError.
Slack has no typing indicator for bots in the Web API, so outbound activities produce no call.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, ClassVar, Final, TypeAlias
from urllib.parse import parse_qs, urlencode, urlsplit

import msgspec

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
    Lookup,
    OutboundRequest,
    SendResult,
)
from babelhub.codecs.settings import ConnectionOptions, MissingSetting, Settings
from babelhub.errors import DecodeError, EncodeError, SignatureError

__all__ = ["SlackCodec", "SlackSecrets", "emoji_from_name", "mrkdwn_to_markdown", "sign", "slack_emoji_name"]

CHANNEL: Final = "slack"

#: Slack refuses requests whose timestamp is more than five minutes off: older ones may be replays.
SIGNATURE_WINDOW_SECONDS: Final = 300

#: Most blocks a message may carry (Block Kit); longer content is spread over several messages.
MAX_BLOCKS: Final = 50

#: Block Kit text limits (characters), for text the degradation step does not fit: a header block's text
#: and a select's placeholder 150, an option's description and an option group's label 75, a section's
#: text 3,000. Longer text is cut, ending in "…", since Slack refuses the whole message otherwise.
HEADER_LIMIT: Final = 150
PLACEHOLDER_LIMIT: Final = 150
OPTION_DESCRIPTION_LIMIT: Final = 75
OPTION_GROUP_LABEL_LIMIT: Final = 75
SECTION_TEXT_LIMIT: Final = 3000

#: Payload members that are credentials: never copied into an envelope.
_CREDENTIAL_KEYS: Final = frozenset({"token"})

#: Web API errors that say "try again later" rather than "this request is wrong".
LOOKUP_EVENT_TYPE: Final = "babelhub_message"
"""The `metadata.event_type` of the hub's posts; `event_payload[LOOKUP_KEY]` is the call's reference."""
LOOKUP_KEY: Final = "babelhub_call"
LOOKUP_LIMIT: Final = 100
"""Messages a lookup reads: a post not among the latest this many is "cannot tell" (`has_more`)."""

_TRANSIENT_ERRORS: Final = frozenset(
    {"internal_error", "fatal_error", "service_unavailable", "request_timeout", "ratelimited", "rate_limited"}
)

#: Message subtypes whose content is an ordinary message (text and files).
_CONTENT_SUBTYPES: Final = frozenset({"", "bot_message", "thread_broadcast", "file_share", "me_message"})

Block: TypeAlias = dict[str, Any]
"""One Block Kit block (or element) as the Web API takes it: plain JSON."""


# -------------------------------------------------------------------------------------- wire format
# Only the fields this codec reads; unknown fields are ignored, and whatever is not mapped is kept in an
# `Unsupported` part or in `meta`. Slack sends `null` for some absent values, hence the `| None`.


class _Authorization(msgspec.Struct):
    user_id: str | None = None
    is_bot: bool = False


class _Callback(msgspec.Struct):
    """The Events API wrapper around one event."""

    type: str
    event: dict[str, Any] = {}
    event_id: str = ""
    event_time: int = 0
    team_id: str | None = None
    enterprise_id: str | None = None
    authorizations: list[_Authorization] = []


class _UserProfile(msgspec.Struct):
    display_name: str | None = None
    real_name: str | None = None


class _BotProfile(msgspec.Struct):
    name: str | None = None


class _File(msgspec.Struct):
    id: str = ""
    name: str | None = None
    mimetype: str | None = None
    size: int = 0
    url_private: str | None = None
    original_w: int = 0
    original_h: int = 0


class _Message(msgspec.Struct):
    """A `message` or `app_mention` event, or the message nested in `message_changed`."""

    type: str = "message"
    subtype: str = ""
    channel: str = ""
    channel_type: str = ""
    user: str | None = None
    bot_id: str | None = None
    username: str | None = None
    user_profile: _UserProfile | None = None
    bot_profile: _BotProfile | None = None
    text: str | None = None
    ts: str = ""
    thread_ts: str | None = None
    deleted_ts: str | None = None
    files: list[Any] = []
    """Each read on its own (`_File`): one unreadable file is an Unsupported part."""
    message: _Message | None = None
    previous_message: _Message | None = None


class _ReactionItem(msgspec.Struct):
    type: str = ""
    channel: str = ""
    ts: str = ""
    channel_type: str = ""


class _ReactionEvent(msgspec.Struct):
    type: str
    user: str
    reaction: str
    item: _ReactionItem
    event_ts: str = ""


class _MemberEvent(msgspec.Struct):
    type: str
    user: str
    channel: str
    channel_type: str = ""
    inviter: str | None = None


class _TextObject(msgspec.Struct):
    text: str = ""


class _Option(msgspec.Struct):
    value: str = ""
    text: _TextObject | None = None


class _ElementAction(msgspec.Struct):
    """One element a user used, in a `block_actions` payload."""

    type: str = ""
    action_id: str = ""
    text: _TextObject | None = None
    selected_option: _Option | None = None
    action_ts: str = ""


class _Named(msgspec.Struct):
    id: str = ""
    name: str | None = None
    username: str | None = None


class _Container(msgspec.Struct):
    type: str = ""
    channel_id: str = ""
    message_ts: str = ""
    thread_ts: str | None = None


class _SourceMessage(msgspec.Struct):
    ts: str = ""
    thread_ts: str | None = None


class _BlockActions(msgspec.Struct):
    type: str
    user: _Named
    actions: list[_ElementAction]
    trigger_id: str = ""
    response_url: str | None = None
    container: _Container | None = None
    channel: _Named | None = None
    message: _SourceMessage | None = None


class _SlashCommand(msgspec.Struct):
    command: str
    channel_id: str
    user_id: str
    text: str = ""
    user_name: str = ""
    trigger_id: str = ""
    response_url: str = ""


# ------------------------------------------------------------------------------------------- codec


class SlackSecrets(Settings, frozen=True, kw_only=True):
    bot_token: str
    """The bot token (`xoxb-…`): Web API calls carry it as a bearer token."""
    signing_secret: str = ""
    """The app's Signing Secret: Events and Interactivity requests are signed with it (v0); required
    unless the connection uses Socket Mode."""
    app_token: str = ""
    """The app-level token (`xapp-…`, scope `connections:write`) with which Socket Mode
    (`mode = "slack_socket"`) opens its WebSocket; required in that mode only."""


class SlackOptions(ConnectionOptions, frozen=True, kw_only=True):
    bot_user_id: str = ""
    """The bot's user id (`U…`/`W…`): its own messages are not taken in again."""
    bot_id: str = ""
    """The bot's id (`B…`): messages posted as it are not taken in again."""


class SlackCodec(Codec):
    """Slack Events API + interactivity in, Web API out. See the module docstring for the decisions."""

    channel: ClassVar[str] = CHANNEL
    secret_settings: ClassVar[type[Settings]] = SlackSecrets
    option_settings: ClassVar[type[Settings]] = SlackOptions
    default_api_base: ClassVar[str] = "https://slack.com/api"
    capabilities: ClassVar[Capabilities] = Capabilities(
        parts=frozenset({"text", "media", "buttons", "list", "card", "reaction", "edit", "delete"}),
        # Messages show images by URL (image blocks). Other files can only be uploaded (files.uploadV2,
        # multipart, out of scope here), so degradation sends them as links and drops what has no URL.
        media=frozenset({"image"}),
        # chat.postMessage takes 40,000 characters of `text`, but a section block only 3,000 and text
        # followed by buttons must live in a section. One limit that fits everywhere: longer text is
        # split by the degradation step into several sections of one message.
        text_limit=SECTION_TEXT_LIMIT,
        caption_limit=2000,  # image block `title` (plain_text)
        choice_text_limit=SECTION_TEXT_LIMIT,  # the text beside buttons or a select is a section's
        markup="slack",
        max_buttons=25,  # elements in one actions block
        max_button_title=75,
        button_actions=frozenset({"reply", "url", "postback"}),
        max_list_rows=100,  # options in a static_select
        max_list_sections=100,  # option_groups in a static_select
        max_row_title=75,  # option text
        reply=True,  # threads
        edit=True,
        delete=True,
        reaction=True,
        typing=False,
    )

    def check_settings(self, secrets: SlackSecrets, options: SlackOptions) -> None:
        """Deliveries come signed (webhook, `signing_secret`) or over the app's own socket (Socket
        Mode, `app_token`): one of the two is needed. Which one the mode needs is checked by the mode's
        source at start."""
        if not secrets.signing_secret and not secrets.app_token:
            raise MissingSetting("secrets.signing_secret", "webhook deliveries are verified with it (a Socket "
                                 "Mode connection, mode = \"slack_socket\", needs secrets.app_token instead)")

    # ----------------------------------------------------------------------------------- decode

    def verify(self, request: HttpRequest, secrets: Mapping[str, str]) -> None:
        """Slack's v0 signature: `v0=` + hex HMAC-SHA256 of `v0:{timestamp}:{raw body}`, and a timestamp
        within five minutes of when the hub received the request."""
        secret = secrets.get("signing_secret", "")
        if not secret:
            raise SignatureError("slack: no signing_secret configured for this connection")
        timestamp = request.headers.get("x-slack-request-timestamp", "")
        signature = request.headers.get("x-slack-signature", "")
        if not timestamp or not signature:
            raise SignatureError("slack: missing X-Slack-Request-Timestamp or X-Slack-Signature header")
        try:
            sent_at = int(timestamp)
        except ValueError:
            raise SignatureError(f"slack: X-Slack-Request-Timestamp {timestamp!r} is not a number") from None
        if abs(request.received_at - sent_at) > SIGNATURE_WINDOW_SECONDS:
            raise SignatureError(
                f"slack: request timestamp {sent_at} is more than {SIGNATURE_WINDOW_SECONDS} s away from "
                f"its arrival ({request.received_at:.0f}): stale or replayed"
            )
        if not native.same_secret(signature, sign(secret, timestamp, request.body)):
            raise SignatureError("slack: X-Slack-Signature does not match the body")

    def handshake(self, request: HttpRequest, secrets: Mapping[str, str]) -> HttpResponse | None:
        """Answer Slack's checks of a Request URL: `url_verification` with its challenge (Slack accepts
        plain text, form or JSON; JSON here), and a slash command URL's `ssl_check=1` with a plain 200.

        Slack asks apps to verify the request before answering, so this checks the signature itself and
        raises `SignatureError` when it does not hold."""
        try:
            payload, _ = _read_payload(request)
        except DecodeError:
            return None  # not a check; decode reports the broken body
        if payload.get("type") == "url_verification":
            self.verify(request, secrets)
            challenge = native.str_field(payload, "challenge")
            return HttpResponse(
                status=200,
                headers={"content-type": "application/json"},
                body=native.json_body({"challenge": challenge}),
            )
        if payload.get("ssl_check") == "1":
            self.verify(request, secrets)
            return HttpResponse(status=200)
        return None

    def dedup_key(self, request: HttpRequest) -> str:
        """`event_id` for Events API deliveries (a retry with `X-Slack-Retry-Num` keeps it), the
        `trigger_id` (else `action_ts`) of an interaction or slash command; empty when there is none.
        A body that is no JSON object (nor a form holding one) raises DecodeError."""
        payload, _ = _read_payload(request)
        for key in ("event_id", "trigger_id", "action_ts"):
            value = payload.get(key)
            if isinstance(value, str) and value:
                return value
        return ""

    def decode(self, request: HttpRequest, ctx: DecodeContext) -> list[c.Envelope]:
        payload, root = _read_payload(request)
        kind = payload.get("type")
        if kind == "url_verification" or payload.get("ssl_check") == "1":
            return []  # checks of the Request URL, answered by `handshake`: nothing to deliver
        if kind is None and "command" in payload:
            decoder = _Decoder.of(ctx)
            return [_slash_command(native.convert(payload, _SlashCommand, root), request, decoder)]
        if not isinstance(kind, str):
            raise DecodeError("a Slack payload needs a string `type`", path=f"{root}.type")
        if kind == "event_callback":
            callback = native.convert(payload, _Callback, root)
            return _decode_event(callback, _Decoder.of(ctx, callback.authorizations))
        decoder = _Decoder.of(ctx)
        if kind == "block_actions":
            actions = native.convert(payload, _BlockActions, root)
            return [_block_actions(actions, payload, root, request, decoder)]
        return [_other_payload(kind, payload, request, decoder)]

    # ----------------------------------------------------------------------------------- encode

    def encode(self, message: c.Message, ctx: EncodeContext) -> list[OutboundRequest]:
        """One Web API call per Slack message, reaction or deletion, in part order. Content parts between
        two markers (reaction, delete) become one message of blocks (more when over 50 blocks); with an
        `edit` part the content replaces the target message through `chat.update`."""
        encoder = _Encoder(self.api_base(ctx), message, ctx)
        edit = next((part for part in message.parts if isinstance(part, c.Edit)), None)
        if edit is not None and all(isinstance(part, c.Edit | c.Reaction | c.Delete) for part in message.parts):
            raise EncodeError("slack: an edit needs new content to put into the message")
        content: list[c.Part] = []
        for part in message.parts:
            if isinstance(part, c.Reaction | c.Delete):
                encoder.send_content(content, edit)
                content = []
                encoder.add(*_marker_call(part, ctx))
            elif not isinstance(part, c.Edit):
                content.append(part)
        encoder.send_content(content, edit)
        return encoder.requests

    def encode_activity(self, activity: c.Activity, ctx: EncodeContext) -> list[OutboundRequest]:
        """None: the Web API has no typing indicator or read marker for bots."""
        return []

    def safe_to_resend(self, request: OutboundRequest) -> bool:
        """`chat.update` sets the message's content: making it twice shows the same. Posts and reactions
        are not idempotent (Slack's Web API takes no idempotency key)."""
        return request.url.endswith("/chat.update")

    def lookup_request(self, request: OutboundRequest) -> OutboundRequest | None:
        """A `chat.postMessage` carries its call's reference in message metadata; the channel's latest
        messages (`conversations.history`), or the thread's (`conversations.replies`), read with
        `include_all_metadata`, show whether it was posted."""
        if not request.url.endswith("/chat.postMessage"):
            return None
        try:
            body = msgspec.json.decode(request.body)
        except msgspec.DecodeError:
            return None
        if not isinstance(body, dict) or not isinstance(body.get("channel"), str):
            return None
        base = request.url.rsplit("/", 1)[0]
        query = {"channel": body["channel"], "include_all_metadata": "true", "limit": str(LOOKUP_LIMIT)}
        method = "conversations.history"
        if isinstance(body.get("thread_ts"), str):
            method, query["ts"] = "conversations.replies", body["thread_ts"]
        headers = {"Authorization": request.headers.get("Authorization", "")}
        return OutboundRequest(method="GET", url=f"{base}/{method}?{urlencode(query)}", headers=headers,
                               message_id=request.message_id)

    def parse_lookup(self, lookup: OutboundRequest, request: OutboundRequest, response: HttpResponse) -> Lookup:
        """Found when a message carries the post's reference; certainly absent only when Slack listed
        every message of the window (`has_more` false), else it cannot tell."""
        try:
            answer = msgspec.json.decode(response.body) if response.status == 200 else None
            reference = msgspec.json.decode(request.body)["metadata"]["event_payload"][LOOKUP_KEY]
        except (msgspec.DecodeError, KeyError, TypeError):
            return Lookup(found=None)
        if not isinstance(answer, dict) or answer.get("ok") is not True or not isinstance(answer.get("messages"), list):
            return Lookup(found=None)
        channel = parse_qs(urlsplit(lookup.url).query).get("channel", [""])[0]
        for item in answer["messages"]:
            metadata = item.get("metadata") if isinstance(item, dict) else None
            payload = metadata.get("event_payload") if isinstance(metadata, dict) else None
            if isinstance(payload, dict) and payload.get(LOOKUP_KEY) == reference and isinstance(item.get("ts"), str):
                return Lookup(found=True, native_ids=[f"{channel}:{item['ts']}"])
        return Lookup(found=False) if answer.get("has_more") is False else Lookup(found=None)

    # ------------------------------------------------------------------------------------ directory

    def directory_request(self, kind: DirectoryKind, ctx: EncodeContext, cursor: str,
                          limit: int) -> OutboundRequest | None:
        """`conversations.list` (chats: every conversation type; channels: public and private channels) or
        `users.list` (contacts), cursor-paginated: `cursor` is Slack's `response_metadata.next_cursor`."""
        method, query = _DIRECTORY_METHODS[kind]
        query = {**query, "limit": str(limit)}
        if cursor:
            query["cursor"] = cursor
        token = native.required_secret(ctx.secrets, "bot_token", "Slack")
        return OutboundRequest(method="GET", url=f"{self.api_base(ctx)}/{method}?{urlencode(query)}",
                               headers={"Authorization": f"Bearer {token}"})

    def parse_directory(self, kind: DirectoryKind, request: OutboundRequest, response: HttpResponse,
                        cursor: str, limit: int) -> DirectoryPage:
        answer = native.convert(native.read_json(response), _ListAnswer)
        if not answer.ok:
            return DirectoryPage(error=c.Error(code=answer.error or "invalid_response",
                                               message=f"slack {_DIRECTORY_METHODS[kind][0]} refused"))
        if kind == "contacts":
            items = [_directory_user(raw, f"$.members[{index}]") for index, raw in enumerate(answer.members)]
        else:
            items = [_directory_conversation(raw, f"$.channels[{index}]") for index, raw in enumerate(answer.channels)]
        return DirectoryPage(items=items, next_cursor=answer.response_metadata.next_cursor)

    def parse_response(self, request: OutboundRequest, response: HttpResponse) -> SendResult:
        """Slack answers HTTP 200 with `{"ok": false, "error": "..."}` for most failures, HTTP 429 with
        Retry-After when rate limited; a few errors are transient and worth retrying."""
        try:
            answer = msgspec.json.decode(response.body) if response.body else None
        except msgspec.DecodeError:
            answer = None
        body = answer if isinstance(answer, dict) else {}
        error = native.str_field(body, "error")
        if response.status >= 300:
            return native.http_failure(response, code=error, message=_error_detail(body))
        if body.get("ok") is True:
            return SendResult(ok=True, native_ids=_sent_ids(body))
        code = error or "invalid_response"
        retryable = code in _TRANSIENT_ERRORS
        return SendResult(
            ok=False,
            retryable=retryable,
            retry_after=native.retry_after(response.headers) if retryable else None,
            error=c.Error(
                code=code,
                message=_error_detail(body),
                retryable=retryable,
                native=answer if answer is not None else response.body.decode("utf-8", "replace"),
            ),
        )


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The `X-Slack-Signature` value Slack computes for `body` sent at `timestamp`."""
    basestring = b"v0:" + timestamp.encode() + b":" + body
    return "v0=" + hmac.new(secret.encode(), basestring, hashlib.sha256).hexdigest()


# ------------------------------------------------------------------------------------ reading bodies


def _is_form(request: HttpRequest) -> bool:
    content_type = request.headers.get("content-type", "")
    if content_type:
        return "application/x-www-form-urlencoded" in content_type
    return not request.body.lstrip().startswith(b"{")


def _read_payload(request: HttpRequest) -> tuple[dict[str, Any], str]:
    """The request's payload as a JSON object, and the path its DecodeErrors start from: the JSON body
    (Events API), the JSON in form field `payload` (interactivity) or the form fields (slash command)."""
    if not _is_form(request):
        body = native.read_json(request)
        if not isinstance(body, dict):
            raise DecodeError("a Slack body is a JSON object", path="$")
        return body, "$"
    fields = dict(native.parse_form(request.body))
    if "payload" not in fields:
        return fields, "$"
    payload = native.json_value(fields["payload"], path="payload", what="form field `payload`")
    if not isinstance(payload, dict):
        raise DecodeError("form field `payload` must hold a JSON object", path="payload")
    return payload, "payload"


# ---------------------------------------------------------------------------------- decoding: helpers


@dataclass(frozen=True)
class _Decoder:
    """What every envelope of one decode shares: whose connection, and who "we" (the app's bot) are."""

    tenant: str
    connection: str
    seq: int
    own_users: frozenset[str]
    own_bots: frozenset[str]

    @classmethod
    def of(cls, ctx: DecodeContext, authorizations: Iterable[_Authorization] = ()) -> _Decoder:
        own_users = {auth.user_id for auth in authorizations if auth.is_bot and auth.user_id}
        own_bots: set[str] = set()
        if isinstance(user := ctx.options.get("bot_user_id"), str) and user:
            own_users.add(user)
        if isinstance(bot := ctx.options.get("bot_id"), str) and bot:
            own_bots.add(bot)
        return cls(ctx.tenant, ctx.connection, ctx.seq, frozenset(own_users), frozenset(own_bots))

    def is_own(self, user: str | None, bot_id: str | None = None) -> bool:
        return bool(user and user in self.own_users) or bool(bot_id and bot_id in self.own_bots)

    def message_id(self, native_id: str) -> str:
        return c.message_id(self.tenant, self.connection, native_id)

    def person(self, user: str) -> str:
        return c.sender_id(self.tenant, self.connection, user)

    def conversation(self, chat: str, kind: c.ConversationType) -> c.Conversation:
        return native.conversation(self, CHANNEL, chat, kind)

    def sender(self, user: str, name: str = "", role: c.Role = "user") -> c.Sender | None:
        if not user:
            return None
        role = "bot" if role == "user" and self.is_own(user) else role
        return native.sender(self, user, name=name, role=role)

    def message(
        self,
        *,
        native_id: str,
        chat: str,
        chat_type: c.ConversationType,
        ts: datetime,
        sender: c.Sender | None,
        parts: list[c.Part],
        thread_root: str = "",
        meta: dict[str, Any] | None = None,
    ) -> c.Message:
        return c.Message(
            id=self.message_id(native_id),
            tenant=self.tenant,
            conversation=self.conversation(chat, chat_type),
            ts=ts,
            sender=sender,
            native=c.Native(id=native_id, seq=self.seq, thread=thread_root),
            thread=self.message_id(thread_root) if thread_root else "",
            meta=meta or {},
            parts=parts,
        )


#: `channel_type` values (events use words, member events one letter) → the canonical conversation type.
_CHAT_TYPES: Final[dict[str, c.ConversationType]] = {
    "im": "direct",
    "app_home": "direct",
    "mpim": "group",
    "channel": "channel",
    "group": "channel",  # a private channel
    "C": "channel",
    "G": "channel",
}


def _chat_type(channel: str, channel_type: str = "") -> c.ConversationType:
    """From `channel_type` when Slack gives it, else from the id: `D…` are direct messages."""
    if channel_type in _CHAT_TYPES:
        return _CHAT_TYPES[channel_type]
    return "direct" if channel.startswith("D") else "channel"


def _slack_time(ts: str, path: str) -> datetime:
    """A Slack timestamp (`"1355517523.000005"`: Unix seconds, then a sequence) as a UTC datetime."""
    try:
        seconds = float(ts)
    except (TypeError, ValueError):
        raise DecodeError(f"{ts!r} is not a Slack timestamp", path=path) from None
    return native.from_unix(seconds, path)


def _thread_root(chat: str, ts: str, thread_ts: str | None) -> str:
    """The native id (`C1:thread_ts`) of the thread root, when the message is a reply inside a thread."""
    if thread_ts and thread_ts != ts:
        return f"{chat}:{thread_ts}"
    return ""


# ---------------------------------------------------------------------------------- decoding: events


def _decode_event(callback: _Callback, decoder: _Decoder) -> list[c.Envelope]:
    event = callback.event
    kind = event.get("type")
    if kind in ("message", "app_mention"):
        return _message_event(native.convert(event, _Message, "$.event"), event, decoder)
    if kind in ("reaction_added", "reaction_removed"):
        return _reaction_event(native.convert(event, _ReactionEvent, "$.event"), event, callback, decoder)
    if kind in ("member_joined_channel", "member_left_channel"):
        return [_membership(native.convert(event, _MemberEvent, "$.event"), callback, decoder)]
    return [_unsupported_event(event, callback, decoder)]


def _message_event(event: _Message, raw: dict[str, Any], decoder: _Decoder) -> list[c.Envelope]:
    if event.subtype == "message_changed":
        return _edited(event, raw, decoder)
    if event.subtype == "message_deleted":
        return _deleted(event, decoder)
    if decoder.is_own(event.user, event.bot_id):
        return []  # our own message, echoed back: never re-ingested
    if not event.ts:
        raise DecodeError("a message event needs `ts`", path="$.event.ts")
    chat = event.channel
    if event.subtype in _CONTENT_SUBTYPES:
        parts, meta = _content(event, raw, decoder)
    else:
        kept = native.without(raw, _CREDENTIAL_KEYS)
        parts, meta = [c.Unsupported(reason=f"slack message subtype {event.subtype}", native=kept)], {}
    if event.type == "app_mention":
        meta["slack.event"] = "app_mention"  # Slack may also send the same message as a `message` event
    if event.subtype:
        meta["slack.subtype"] = event.subtype
    return [
        decoder.message(
            native_id=f"{chat}:{event.ts}",
            chat=chat,
            chat_type=_chat_type(chat, event.channel_type),
            ts=_slack_time(event.ts, "$.event.ts"),
            sender=_author(event, decoder),
            parts=parts,
            thread_root=_thread_root(chat, event.ts, event.thread_ts),
            meta=meta,
        )
    ]


def _edited(event: _Message, raw: dict[str, Any], decoder: _Decoder) -> list[c.Envelope]:
    """`message_changed`: the new version of a message, as an Edit marker followed by the new content."""
    new = event.message
    if new is None:
        raise DecodeError("message_changed needs `message`", path="$.event.message")
    if decoder.is_own(new.user, new.bot_id):
        return []
    target_ts = new.ts or (event.previous_message.ts if event.previous_message else "")
    if not target_ts:
        raise DecodeError("message_changed needs the edited message's `ts`", path="$.event.message.ts")
    chat = event.channel
    parts, meta = _content(new, raw.get("message", {}), decoder)
    meta["slack.subtype"] = "message_changed"
    return [
        decoder.message(
            native_id=f"{chat}:{event.ts}",
            chat=chat,
            chat_type=_chat_type(chat, event.channel_type),
            ts=_slack_time(event.ts, "$.event.ts"),
            sender=_author(new, decoder),
            parts=[c.Edit(target=decoder.message_id(f"{chat}:{target_ts}")), *parts],
            thread_root=_thread_root(chat, target_ts, new.thread_ts),
            meta=meta,
        )
    ]


def _deleted(event: _Message, decoder: _Decoder) -> list[c.Envelope]:
    """`message_deleted`: a Delete marker. Slack does not say who deleted it, so there is no sender."""
    previous = event.previous_message
    if previous is not None and decoder.is_own(previous.user, previous.bot_id):
        return []  # we deleted our own message
    target_ts = event.deleted_ts or (previous.ts if previous else "")
    if not target_ts:
        raise DecodeError("message_deleted needs `deleted_ts`", path="$.event.deleted_ts")
    chat = event.channel
    return [
        decoder.message(
            native_id=f"{chat}:{event.ts}",
            chat=chat,
            chat_type=_chat_type(chat, event.channel_type),
            ts=_slack_time(event.ts, "$.event.ts"),
            sender=None,
            parts=[c.Delete(target=decoder.message_id(f"{chat}:{target_ts}"))],
            meta={"slack.subtype": "message_deleted"},
        )
    ]


def _author(event: _Message, decoder: _Decoder) -> c.Sender | None:
    """Who wrote a message: a person, or a bot (`bot_id`, or classic `bot_message` without a user)."""
    if event.bot_id or event.subtype == "bot_message":
        name = (event.bot_profile.name if event.bot_profile else None) or event.username or ""
        return decoder.sender(event.user or event.bot_id or "", name, role="bot")
    profile = event.user_profile
    name = (profile.display_name or profile.real_name or "") if profile else ""
    return decoder.sender(event.user or "", name)


def _content(event: _Message, raw: dict[str, Any], decoder: _Decoder) -> tuple[list[c.Part], dict[str, Any]]:
    """A message's text and files as parts. Blocks and attachments are kept: `rich_text` blocks repeat
    the text, so they go to meta; any other block or attachment becomes an `Unsupported` part."""
    parts: list[c.Part] = []
    meta: dict[str, Any] = {}
    if event.text:
        text, mentions = mrkdwn_to_markdown(event.text, decoder.person)
        parts.append(c.Text(text=text, format="markdown", mentions=mentions))
        if text != event.text:
            meta["slack.text"] = event.text  # the original mrkdwn, for whoever needs it verbatim
    for n, raw_file in enumerate(event.files):
        parts.extend(native.lenient_parts(partial(_media, raw_file, f"files[{n}]"), raw_file, "slack file"))
    if event.files:
        meta["slack.files_need_token"] = True  # url_private answers only with `Authorization: Bearer <bot token>`
    rich_text: list[Any] = []
    for block in native.list_field(raw, "blocks"):
        if isinstance(block, dict) and block.get("type") == "rich_text":
            rich_text.append(block)
        else:
            kind = block.get("type") if isinstance(block, dict) else None
            parts.append(c.Unsupported(reason=f"slack block {kind}", native=block))
    if rich_text:
        meta["slack.blocks"] = rich_text
    for attachment in native.list_field(raw, "attachments"):
        parts.append(c.Unsupported(reason="slack attachment", native=attachment))
    return parts, meta


def _media(raw: Any, where: str) -> c.Part:
    """A shared file (`where`: its place in the message). Files Slack no longer serves (deleted, hidden
    by plan limits) have no URL."""
    file = native.convert(raw, _File, where)
    if not file.url_private:
        return c.Unsupported(reason="slack file without url_private", native=raw)
    mime = file.mimetype or ""
    return c.Media(
        media=native.media_kind(mime),
        url=file.url_private,
        file_id=file.id,
        mime=mime,
        size=file.size,
        filename=file.name or "",
        width=file.original_w,
        height=file.original_h,
    )


def _reaction_event(
    event: _ReactionEvent, raw: dict[str, Any], callback: _Callback, decoder: _Decoder
) -> list[c.Envelope]:
    if decoder.is_own(event.user):
        return []  # our own reaction, echoed back
    item = event.item
    if item.type != "message":
        return [_unsupported_event(raw, callback, decoder)]  # reactions to files and file comments
    chat = item.channel
    reaction = c.Reaction(
        emoji=emoji_from_name(event.reaction),
        target=decoder.message_id(f"{chat}:{item.ts}"),
        removed=event.type == "reaction_removed",
    )
    return [
        decoder.message(
            native_id=_event_native_id(chat, callback, event.event_ts),
            chat=chat,
            chat_type=_chat_type(chat, item.channel_type),
            ts=_event_time(event.event_ts, callback, "$.event.event_ts"),
            sender=decoder.sender(event.user),
            parts=[reaction],
            meta={"slack.reaction": event.reaction},
        )
    ]


def _membership(event: _MemberEvent, callback: _Callback, decoder: _Decoder) -> c.Activity:
    native_id = _event_native_id(event.channel, callback, "")
    meta = {"slack.inviter": event.inviter} if event.inviter else {}
    return c.Activity(
        id=c.stable_id("activity", decoder.tenant, decoder.connection, native_id),
        tenant=decoder.tenant,
        conversation=decoder.conversation(event.channel, _chat_type(event.channel, event.channel_type)),
        ts=_event_time("", callback, "$.event_time"),
        sender=decoder.sender(event.user),
        native=c.Native(id=native_id, seq=decoder.seq),
        activity="joined" if event.type == "member_joined_channel" else "left",
        meta=meta,
    )


def _unsupported_event(event: dict[str, Any], callback: _Callback, decoder: _Decoder) -> c.Message:
    """Any other event, kept whole. Events without a channel (app uninstalled, tokens revoked, …) land in
    a conversation keyed by the workspace."""
    kind = event.get("type")
    chat = _channel_of(event) or callback.team_id or callback.enterprise_id or ""
    event_ts = native.str_field(event, "event_ts")
    try:
        ts = _event_time(event_ts, callback, "$.event.event_ts")
    except DecodeError:
        ts = native.from_unix(callback.event_time, "$.event_time")
    return decoder.message(
        native_id=_event_native_id(chat, callback, event_ts),
        chat=chat,
        chat_type=_chat_type(chat),
        ts=ts,
        sender=decoder.sender(_user_of(event)),
        parts=[c.Unsupported(reason=f"slack event {kind}", native=native.without(event, _CREDENTIAL_KEYS))],
    )


def _event_native_id(chat: str, callback: _Callback, event_ts: str) -> str:
    """Events that are not messages have no `ts` of their own: Slack's `event_id` identifies them."""
    return f"{chat}:{callback.event_id or event_ts or callback.event_time}"


def _event_time(event_ts: str, callback: _Callback, path: str) -> datetime:
    if event_ts:
        return _slack_time(event_ts, path)
    return native.from_unix(callback.event_time, "$.event_time")


def _channel_of(payload: Mapping[str, Any]) -> str:
    """The channel an arbitrary event or payload is about, wherever Slack put it."""
    for value in (payload.get("channel"), payload.get("channel_id"), payload.get("item")):
        if isinstance(value, str) and value:
            return value
        if isinstance(value, dict):
            nested = value.get("id") or value.get("channel")
            if isinstance(nested, str) and nested:
                return nested
    thread = payload.get("assistant_thread")
    if isinstance(thread, dict) and isinstance(thread.get("channel_id"), str):
        return str(thread["channel_id"])
    return ""


def _user_of(payload: Mapping[str, Any]) -> str:
    user = payload.get("user") or payload.get("user_id")
    if isinstance(user, dict):
        user = user.get("id")
    return user if isinstance(user, str) else ""


# ---------------------------------------------------------------------------- decoding: interactivity


def _block_actions(
    payload: _BlockActions, raw: dict[str, Any], root: str, request: HttpRequest, decoder: _Decoder
) -> c.Message:
    """A click or choice on a Block Kit element: one `Action` per element used."""
    user = payload.user.id
    container = payload.container or _Container()
    chat = (payload.channel.id if payload.channel else "") or container.channel_id or user
    source_ts = container.message_ts or (payload.message.ts if payload.message else "")
    thread_ts = container.thread_ts or (payload.message.thread_ts if payload.message else None)
    source = decoder.message_id(f"{chat}:{source_ts}") if source_ts else ""
    action_ts, ts_path = _first_action_ts(payload.actions, root)
    meta: dict[str, Any] = {"slack.actions": raw.get("actions"), "slack.trigger_id": payload.trigger_id}
    if payload.response_url:
        meta["slack.response_url"] = payload.response_url
    return decoder.message(
        native_id=f"{chat}:action:{action_ts or payload.trigger_id}",
        chat=chat,
        chat_type="direct" if chat == user else _chat_type(chat),
        ts=_slack_time(action_ts, ts_path) if action_ts else _received(request),
        sender=decoder.sender(user, payload.user.name or payload.user.username or ""),
        parts=[_action(action, source) for action in payload.actions],
        thread_root=_thread_root(chat, source_ts, thread_ts),
        meta=meta,
    )


def _first_action_ts(actions: list[_ElementAction], root: str) -> tuple[str, str]:
    """When the first element was used, and the JSON path to name if that is no timestamp."""
    for index, action in enumerate(actions):
        if action.action_ts:
            return action.action_ts, f"{root}.actions[{index}].action_ts"
    return "", ""


def _action(action: _ElementAction, source: str) -> c.Action:
    """A chosen option is identified by its value (a list row's id); anything else by its action_id
    (a button's id). The element's full JSON stays in meta `slack.actions`."""
    option = action.selected_option
    if option is not None:
        return c.Action(id=option.value, title=option.text.text if option.text else "", source=source)
    return c.Action(id=action.action_id, title=action.text.text if action.text else "", source=source)


def _slash_command(command: _SlashCommand, request: HttpRequest, decoder: _Decoder) -> c.Message:
    """`/command text` as the text the user typed; the command's reply hooks go to meta."""
    text, mentions = mrkdwn_to_markdown(f"{command.command} {command.text}".strip(), decoder.person)
    chat = command.channel_id
    return decoder.message(
        native_id=f"{chat}:command:{command.trigger_id}",
        chat=chat,
        chat_type=_chat_type(chat),
        ts=_received(request),
        sender=decoder.sender(command.user_id, command.user_name),
        parts=[c.Text(text=text, format="markdown", mentions=mentions)],
        meta={
            "slack.command": command.command,
            "slack.trigger_id": command.trigger_id,
            "slack.response_url": command.response_url,
        },
    )


def _other_payload(kind: str, payload: dict[str, Any], request: HttpRequest, decoder: _Decoder) -> c.Message:
    """Modals, shortcuts, legacy attachment actions, … kept whole in an Unsupported part."""
    user = _user_of(payload)
    team = payload.get("team")
    team_id = team.get("id") if isinstance(team, dict) else payload.get("team_id")
    chat = _channel_of(payload) or user or (team_id if isinstance(team_id, str) else "")
    action_ts = native.str_field(payload, "action_ts")
    trigger = native.str_field(payload, "trigger_id")
    try:
        ts = _slack_time(action_ts, "$.action_ts") if action_ts else _received(request)
    except DecodeError:
        ts = _received(request)
    return decoder.message(
        native_id=f"{chat}:{kind}:{trigger or action_ts or c.stable_id(request.body.decode('utf-8', 'replace'))}",
        chat=chat,
        chat_type="direct" if chat == user else _chat_type(chat),
        ts=ts,
        sender=decoder.sender(user),
        parts=[c.Unsupported(reason=f"slack payload {kind}", native=native.without(payload, _CREDENTIAL_KEYS))],
    )


def _received(request: HttpRequest) -> datetime:
    """For payloads without a timestamp of their own: when the hub received them (recorded, so a replay
    gives the same time)."""
    return native.from_unix(request.received_at)


# --------------------------------------------------------------------------- mrkdwn → markdown

_MRKDWN: Final = re.compile(
    r"(?P<fence>```(?P<fenced>.*?)```)"
    r"|(?P<code>`[^`\n]+`)"
    r"|<(?P<link>[^<>\n]+)>"
    r"|(?<![\w*])\*(?P<bold>[^*\s](?:[^*\n]*?[^*\s])?)\*(?![\w*])"
    r"|(?<![\w~])~(?P<strike>[^~\s](?:[^~\n]*?[^~\s])?)~(?![\w~])",
    re.DOTALL,
)


def mrkdwn_to_markdown(text: str, person: Callable[[str], str]) -> tuple[str, list[c.Mention]]:
    """Slack mrkdwn as Markdown, and the people it mentions.

    `*bold*` → `**bold**`, `~strike~` → `~~strike~~` (`_italic_` and code are the same in both),
    `<url|label>` → `[label](url)`, `<@U123|name>` → `@name` with a Mention (offset and length in code
    points of the result), `<#C123|general>` → `#general`, `<!here>` → `@here`, and Slack's three escapes
    (`&amp;` `&lt;` `&gt;`) undone. `person` turns a Slack user id into the canonical sender id.
    """
    pieces: list[str] = []
    mentions: list[c.Mention] = []
    written = 0  # code points in `pieces`, where the next piece starts
    cursor = 0
    for match in _MRKDWN.finditer(text):
        pieces.append(_unescape(text[cursor : match.start()]))
        written += len(pieces[-1])
        cursor = match.end()
        if match["fence"] is not None:
            piece = "```\n" + _unescape(match["fenced"].strip("\n")) + "\n```"
        elif match["code"] is not None:
            piece = _unescape(match["code"])
        elif match["link"] is not None:
            piece, mention = _link(match["link"], person)
            if mention is not None:
                mentions.append(msgspec.structs.replace(mention, offset=written))
        else:
            marker = "**" if match["bold"] is not None else "~~"
            inner, inner_mentions = mrkdwn_to_markdown(match["bold"] or match["strike"], person)
            shift = written + len(marker)
            mentions.extend(msgspec.structs.replace(m, offset=m.offset + shift) for m in inner_mentions)
            piece = marker + inner + marker
        pieces.append(piece)
        written += len(piece)
    pieces.append(_unescape(text[cursor:]))
    return "".join(pieces), mentions


def _link(body: str, person: Callable[[str], str]) -> tuple[str, c.Mention | None]:
    """One `<…>` token: a user mention, a channel link, a special mention or command, or a URL."""
    target, _, label = body.partition("|")
    label = _unescape(label)
    if target.startswith("@"):
        user = target[1:]
        shown = "@" + (label or user)
        return shown, c.Mention(id=person(user), native_id=user, name=label, length=len(shown))
    if target.startswith("#"):
        return "#" + (label or target[1:]), None
    if target.startswith("!"):
        # <!here>, <!channel>, <!everyone>, <!subteam^S123|@team>, <!date^1392734382^{date}|Feb 18>
        name = target[1:].partition("^")[0]
        return (label or f"@{name}"), None
    url = _unescape(target)
    return (f"[{label}]({url})" if label and label != url else url), None


def _unescape(text: str) -> str:
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def _escape(text: str) -> str:
    """Plain text made safe inside mrkdwn: Slack parses only `&`, `<` and `>` as control characters."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ------------------------------------------------------------------------------------ emoji names

#: Unicode emoji ↔ Slack short names, for the common reactions. Slack also accepts any `:name:` as is.
_EMOJI_NAMES: Final[dict[str, str]] = {
    "👍": "thumbsup",
    "👎": "thumbsdown",
    "❤": "heart",
    "😂": "joy",
    "🤣": "rolling_on_the_floor_laughing",
    "😀": "grinning",
    "😄": "smile",
    "😆": "laughing",
    "😅": "sweat_smile",
    "😊": "blush",
    "🙂": "slightly_smiling_face",
    "😉": "wink",
    "😍": "heart_eyes",
    "😎": "sunglasses",
    "🤔": "thinking_face",
    "😮": "open_mouth",
    "😱": "scream",
    "😢": "cry",
    "😭": "sob",
    "😡": "rage",
    "🥳": "partying_face",
    "🙏": "pray",
    "👏": "clap",
    "🙌": "raised_hands",
    "👋": "wave",
    "👌": "ok_hand",
    "💪": "muscle",
    "👀": "eyes",
    "🎉": "tada",
    "🔥": "fire",
    "✨": "sparkles",
    "⭐": "star",
    "🚀": "rocket",
    "💯": "100",
    "✅": "white_check_mark",
    "❌": "x",
    "⚠": "warning",
    "❓": "question",
    "❗": "exclamation",
    "💡": "bulb",
    "☕": "coffee",
}
_EMOJI_BY_NAME: Final[dict[str, str]] = {
    **{name: emoji for emoji, name in _EMOJI_NAMES.items()},
    "+1": "👍",  # Slack reports 👍 and 👎 by these aliases
    "-1": "👎",
}
#: Slack writes a skin tone as a suffix: `thumbsup::skin-tone-3`; Unicode as a modifier after the emoji.
_SKIN_TONES: Final[dict[str, str]] = {f"skin-tone-{n}": chr(0x1F3FB + n - 2) for n in range(2, 7)}
_VARIATION_SELECTOR: Final = "\ufe0f"
_SLACK_NAME: Final = re.compile(r":([a-z0-9_+'\-]+(?:::skin-tone-[2-6])?):")


def emoji_from_name(name: str) -> str:
    """A Slack reaction name as the Unicode emoji when it is a common one, else in `:name:` form."""
    base, _, tone = name.partition("::")
    emoji = _EMOJI_BY_NAME.get(base)
    if emoji is None or (tone and tone not in _SKIN_TONES):
        return f":{name}:"
    if emoji in ("❤", "⚠"):
        emoji += _VARIATION_SELECTOR  # shown as emoji, not as a text symbol
    return emoji + (_SKIN_TONES[tone] if tone else "")


def slack_emoji_name(emoji: str) -> str:
    """The name `reactions.add` takes for a Unicode emoji (common ones) or a `:name:`."""
    named = _SLACK_NAME.fullmatch(emoji)
    if named is not None:
        return named.group(1)
    bare = emoji.replace(_VARIATION_SELECTOR, "")
    tone = next((name for name, modifier in _SKIN_TONES.items() if bare.endswith(modifier)), "")
    if tone:
        bare = bare[:-1]
    name = _EMOJI_NAMES.get(bare)
    if name is None:
        raise EncodeError(f"slack: no Slack name known for emoji {emoji!r}; send it as ':name:'")
    return f"{name}::{tone}" if tone else name


# ---------------------------------------------------------------------------------- encoding: calls


class _Encoder:
    """The Web API calls of one outbound message, numbered for their idempotency keys."""

    def __init__(self, base: str, message: c.Message, ctx: EncodeContext) -> None:
        token = native.required_secret(ctx.secrets, "bot_token", "Slack")
        self.base = base
        self.message = message
        self.ctx = ctx
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json; charset=utf-8"}
        self.requests: list[OutboundRequest] = []

    def add(self, method: str, body: dict[str, Any]) -> None:
        self.requests.append(
            OutboundRequest(
                method="POST",
                url=f"{self.base}/{method}",
                headers=self.headers,
                body=native.json_body(body),
                idempotency_key=f"{self.message.id}:{len(self.requests)}",
                message_id=self.message.id,
            )
        )

    def send_content(self, content: list[c.Part], edit: c.Edit | None) -> None:
        """Post `content` as new message(s), or, for an edit, put it into the edited message."""
        if not content:
            return
        if edit is not None:
            chat, ts = _native_message(self.ctx, edit.target, "edit")
            self.add("chat.update", {"channel": chat, "ts": ts, **_edit_body(content)})
            return
        if not self.ctx.to:
            raise EncodeError("slack: no channel to send to (EncodeContext.to is empty)")
        thread_ts = _thread_ts(self.message, self.ctx)
        for chunk in _chunks(content):
            body = {"channel": self.ctx.to, **_message_body(chunk)}
            if thread_ts:
                body["thread_ts"] = thread_ts
            # The call's own reference, so that a post whose answer was lost can be found (`lookup_request`).
            body["metadata"] = {"event_type": LOOKUP_EVENT_TYPE,
                                "event_payload": {LOOKUP_KEY: f"{self.message.id}:{len(self.requests)}"}}
            self.add("chat.postMessage", body)


def _marker_call(part: c.Reaction | c.Delete, ctx: EncodeContext) -> tuple[str, dict[str, Any]]:
    if isinstance(part, c.Delete):
        chat, ts = _native_message(ctx, part.target, "delete")
        return "chat.delete", {"channel": chat, "ts": ts}
    chat, ts = _native_message(ctx, part.target, "reaction")
    method = "reactions.remove" if part.removed else "reactions.add"
    return method, {"channel": chat, "timestamp": ts, "name": slack_emoji_name(part.emoji)}


def _native_message(ctx: EncodeContext, canonical: str, purpose: str) -> tuple[str, str]:
    """The channel and `ts` of the Slack message a canonical id maps to (native ids are `channel:ts`)."""
    chat, _, ts = native.native_id(ctx, canonical, f"{purpose} target", "Slack").partition(":")
    if not (chat and ts):
        raise EncodeError(f"slack: no Slack message known for {purpose} target {canonical!r}")
    return chat, ts


def _thread_ts(message: c.Message, ctx: EncodeContext) -> str:
    """Slack replies are thread replies: under the message's thread root, else under what it answers."""
    if message.thread:
        return _native_message(ctx, message.thread, "thread")[1]
    if message.reply_to:
        return _native_message(ctx, message.reply_to, "reply_to")[1]
    return ""


def _sent_ids(body: Mapping[str, Any]) -> list[str]:
    """`chat.*` answers name the message (`channel`, `ts`); `reactions.*` answer only `ok`."""
    chat, ts = body.get("channel"), body.get("ts")
    return [f"{chat}:{ts}"] if isinstance(chat, str) and isinstance(ts, str) else []


def _error_detail(body: Mapping[str, Any]) -> str:
    """Slack explains some errors: `response_metadata.messages` (invalid_attachments, invalid_blocks) or
    `errors`; else there may be a `warning`."""
    metadata = body.get("response_metadata")
    for messages in (metadata.get("messages") if isinstance(metadata, dict) else None, body.get("errors")):
        if isinstance(messages, list) and messages:
            return "; ".join(str(message) for message in messages)
    return native.str_field(body, "warning")


# --------------------------------------------------------------------------------- encoding: blocks


def _message_body(content: list[c.Part]) -> dict[str, Any]:
    """`text` (and `blocks`) of one Slack message. A lone text needs no blocks."""
    if len(content) == 1 and isinstance(content[0], c.Text):
        text = content[0]
        if text.format == "plain":
            return {"text": text.text, "mrkdwn": False}
        return {"text": text.text}
    return _blocks_body(content)


def _blocks_body(content: list[c.Part]) -> dict[str, Any]:
    blocks = [block for index, part in enumerate(content) for block in _blocks(part, index)]
    fallback = _fallback(content)
    return {"text": fallback, "blocks": blocks} if fallback else {"blocks": blocks}


def _edit_body(content: list[c.Part]) -> dict[str, Any]:
    """The new content of an edited message. chat.update keeps the old blocks unless given `blocks`
    (even empty), and has no `mrkdwn` switch, so plain text goes into a plain_text section."""
    body = _message_body(content)
    if "mrkdwn" in body:
        body = _blocks_body(content)
    body.setdefault("blocks", [])
    if len(body["blocks"]) > MAX_BLOCKS:
        raise EncodeError(f"slack: an edit fits in one message of at most {MAX_BLOCKS} blocks")
    return body


def _chunks(content: list[c.Part]) -> list[list[c.Part]]:
    """Content split into messages of at most 50 blocks, never splitting one part's blocks."""
    chunks: list[list[c.Part]] = [[]]
    size = 0
    for index, part in enumerate(content):
        count = len(_blocks(part, index))
        if chunks[-1] and size + count > MAX_BLOCKS:
            chunks.append([])
            size = 0
        chunks[-1].append(part)
        size += count
    return chunks


def _fallback(content: list[c.Part]) -> str:
    """The notification text Slack shows where blocks cannot be (push, screen readers)."""
    texts: list[str] = []
    for part in content:
        match part:
            case c.Text(text=text) | c.Buttons(text=text) | c.List(text=text) | c.Card(title=text):
                texts.append(text)
            case c.Media(caption=caption):
                texts.append(caption)
    return "\n".join(text for text in texts if text)[: SlackCodec.capabilities.text_limit]


def _blocks(part: c.Part, index: int) -> list[Block]:
    match part:
        case c.Text():
            return [_section(_text_object(part))] if part.text else []
        case c.Buttons():
            head = [_section(_mrkdwn(_escape(part.text)))] if part.text else []
            return head + _actions(part.buttons)
        case c.List():
            return _list_blocks(part, index)
        case c.Media():
            return [_media_block(part)]
        case c.Card():
            return _card_blocks(part)
    raise EncodeError(f"slack: cannot send a {type(part).__name__.lower()} part")


def _plain(text: str) -> Block:
    return {"type": "plain_text", "text": text}


def _mrkdwn(text: str) -> Block:
    return {"type": "mrkdwn", "text": text}


def _section(text: Block, accessory: Block | None = None) -> Block:
    section: Block = {"type": "section", "text": text}
    if accessory is not None:
        section["accessory"] = accessory
    return section


def _text_object(text: c.Text) -> Block:
    """Text arrives in Slack's dialect from the degradation step; plain text is shown as it is."""
    return _plain(text.text) if text.format == "plain" else _mrkdwn(text.text)


def _button(button: c.Button) -> Block:
    """A reply or postback button sends back its id (as action_id) and value; a url button opens it."""
    element: Block = {"type": "button", "text": _plain(button.title), "action_id": button.id}
    if button.action == "url":
        element["url"] = button.value
    else:
        element["value"] = button.value or button.id
    return element


def _actions(buttons: list[c.Button]) -> list[Block]:
    """An actions block of buttons (none when there are none: Slack refuses an empty actions block)."""
    return [{"type": "actions", "elements": [_button(button) for button in buttons]}] if buttons else []


def _list_blocks(part: c.List, index: int) -> list[Block]:
    """A static_select: beside the list's text when it has one, else on its own in an actions block.
    The chosen option's value is the row id, which comes back as `Action.id`."""
    select: Block = {
        "type": "static_select",
        "action_id": f"list_{index}",
        "placeholder": _plain(native.clip(part.button or "Choose", PLACEHOLDER_LIMIT)),
    }
    if len(part.sections) > 1:
        select["option_groups"] = [
            {
                "label": _plain(native.clip(section.title or " ", OPTION_GROUP_LABEL_LIMIT)),
                "options": [_option(row) for row in section.rows],
            }
            for section in part.sections
        ]
    else:
        select["options"] = [_option(row) for section in part.sections for row in section.rows]
    header = _plain(native.clip(part.header, HEADER_LIMIT))
    blocks: list[Block] = [{"type": "header", "text": header}] if part.header else []
    if part.text:
        blocks.append(_section(_mrkdwn(_escape(part.text)), accessory=select))
    else:
        blocks.append({"type": "actions", "elements": [select]})
    if part.footer:
        blocks.append({"type": "context", "elements": [_mrkdwn(_escape(part.footer))]})
    return blocks


def _option(row: c.ListRow) -> Block:
    option: Block = {"text": _plain(row.title), "value": row.id}
    if row.description:
        option["description"] = _plain(native.clip(row.description, OPTION_DESCRIPTION_LIMIT))
    return option


def _media_block(media: c.Media) -> Block:
    """An image by URL becomes an image block; any other file with a URL (when a message was not
    degraded first) a link. Without a URL there is nothing to point at, and uploading bytes
    (files.uploadV2, multipart) is out of this codec's scope."""
    if not media.url:
        raise EncodeError("slack: media needs a url (uploading files is not supported)")
    if media.media == "image":
        block = {"type": "image", **_image_source(media.url), "alt_text": media.caption or media.filename or "image"}
        if media.caption:
            block["title"] = _plain(media.caption)
        return block
    label = media.caption or media.filename or media.url
    return _section(_mrkdwn(f"<{media.url}|{_escape(label)}>"))


def _image_source(url: str) -> Block:
    """Slack's own files are private: blocks reference them as `slack_file`, public images by URL."""
    if url.startswith("https://files.slack.com/"):
        return {"slack_file": {"url": url}}
    return {"image_url": url}


def _card_blocks(card: c.Card) -> list[Block]:
    """A section with the title (bold) and subtitle, the image as its accessory, the buttons below; a
    non-image file is linked in a context block. Blocks show files by URL only: a card whose media has
    none (a file id, bytes) is an EncodeError rather than a card without its image."""
    lines = [f"*{_escape(card.title)}*" if card.title else "", _escape(card.subtitle)]
    text = "\n".join(line for line in lines if line)
    media = card.media
    if media is not None and not media.url:
        name = repr(card.title or card.subtitle) if card.title or card.subtitle else "without a title"
        raise EncodeError(f"slack: the card {name} has a {media.media} without a url, which blocks cannot show")
    accessory = None
    blocks: list[Block] = []
    if media is not None and media.url and media.media == "image":
        accessory = {"type": "image", **_image_source(media.url), "alt_text": card.title or "image"}
    if text:
        blocks.append(_section(_mrkdwn(text), accessory=accessory))
    elif accessory is not None and media is not None:
        blocks.append(_media_block(media))
    if media is not None and media.url and media.media != "image":
        label = media.filename or media.url
        blocks.append({"type": "context", "elements": [_mrkdwn(f"<{media.url}|{_escape(label)}>")]})
    blocks.extend(_actions(card.buttons))
    if not blocks:
        raise EncodeError("slack: an empty card has nothing to show")
    return blocks


# ---------------------------------------------------------------------------------- directory

#: What each directory kind lists: the Web API method and its fixed query.
_DIRECTORY_METHODS: Final[dict[str, tuple[str, dict[str, str]]]] = {
    "chats": ("conversations.list", {"types": "public_channel,private_channel,mpim,im", "exclude_archived": "true"}),
    "channels": ("conversations.list", {"types": "public_channel,private_channel", "exclude_archived": "true"}),
    "contacts": ("users.list", {}),
}


class _ResponseMetadata(msgspec.Struct):
    next_cursor: str = ""


class _ListAnswer(msgspec.Struct):
    """`conversations.list` and `users.list` answers: `channels` or `members`, and the next cursor."""

    ok: bool = False
    error: str = ""
    channels: list[Any] = []
    members: list[Any] = []
    response_metadata: _ResponseMetadata = msgspec.field(default_factory=_ResponseMetadata)


class _DirectoryConversation(msgspec.Struct):
    id: str
    name: str = ""
    is_im: bool = False
    is_mpim: bool = False
    user: str = ""


class _DirectoryProfile(msgspec.Struct):
    real_name: str = ""
    display_name: str = ""


class _DirectoryUser(msgspec.Struct):
    id: str
    name: str = ""
    real_name: str = ""
    is_bot: bool = False
    profile: _DirectoryProfile = msgspec.field(default_factory=_DirectoryProfile)


def _directory_conversation(raw: Any, path: str) -> DirectoryItem:
    """A conversation object: a DM (`is_im`, with the other `user`), a group DM (`is_mpim`) or a channel."""
    conversation = native.convert(raw, _DirectoryConversation, path)
    kind: ItemKind = "direct" if conversation.is_im else "group" if conversation.is_mpim else "channel"
    return DirectoryItem(id=conversation.id, name=conversation.name, kind=kind,
                         channel_specific=native.unmapped(raw, {"id", "name"}))


def _directory_user(raw: Any, path: str) -> DirectoryItem:
    user = native.convert(raw, _DirectoryUser, path)
    name = user.profile.real_name or user.real_name or user.profile.display_name or user.name
    return DirectoryItem(id=user.id, name=name, kind="bot" if user.is_bot else "user",
                         handle=f"@{user.name}" if user.name else "",
                         channel_specific=native.unmapped(raw, {"id"}))
