"""The built-in web chat: browsers talk to the hub over `WebSocket /ws/{connection}`.

Inbound frames are small JSON objects: `{"id": "<client message id>", "text": "hi"}` or, when a
button was clicked, `{"id": "…", "action": {"id": "menu:hours", "title": "Opening hours"}}`. The hub
records each frame like a webhook (with the session id in the `x-babelhub-session` header), so web
chat goes through the same durable path as every other channel. Outbound, the browser receives the
canonical message itself (degraded to the capabilities below) and renders its parts.

Every field of a frame is bounded (`id` 1 to 64 characters, `text` 10,000, `name` 100, an action's
fields 256), so what a browser sends cannot grow ids, dedup keys or conversation state.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import msgspec

from babelhub import canonical as c
from babelhub.codecs import native
from babelhub.codecs.base import (
    SESSION_HEADER,
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
from babelhub.errors import DecodeError

__all__ = ["WebchatCodec"]


# -------------------------------------------------------------------------------------- wire format

# Anything a browser sends ends up in ids, dedup keys and conversation state: every field is bounded.
FrameId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
"""The client's own id of a frame; a resent frame with the same id is recorded once."""
ShortText = Annotated[str, msgspec.Meta(max_length=256)]


class _ClickedAction(msgspec.Struct, frozen=True):
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    title: ShortText = ""
    source: ShortText = ""


class _Frame(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a browser sends. Exactly one of `text` or `action`."""

    id: FrameId
    text: Annotated[str, msgspec.Meta(max_length=10_000)] = ""
    action: _ClickedAction | None = None
    name: Annotated[str, msgspec.Meta(max_length=100)] = ""


class WebchatSecrets(Settings, frozen=True, kw_only=True):
    session_key: str = ""
    """Signs the session resume tokens (unset: a random key made once and kept in NATS KV)."""


class WebchatOptions(ConnectionOptions, frozen=True, kw_only=True):
    allowed_origins: list[str] = []
    """Browser origins besides the hub's own that may open the socket (`["*"]`: any site)."""


# -------------------------------------------------------------------------------------------- codec


class WebchatCodec(Codec):
    channel = "webchat"
    secret_settings: ClassVar[type[Settings]] = WebchatSecrets
    option_settings: ClassVar[type[Settings]] = WebchatOptions
    inbound = "websocket"
    capabilities: ClassVar[Capabilities] = Capabilities(
        parts=frozenset({"text", "media", "buttons", "list", "card", "carousel"}),
        media=frozenset({"image", "audio", "voice", "video", "document", "animation", "sticker"}),
        media_upload=True,  # bytes travel inside the canonical JSON to the browser
        text_limit=10_000,
        caption_limit=1_000,
        markup="plain",
        max_buttons=10,
        max_button_title=40,
        button_actions=frozenset({"reply", "url", "postback"}),
        max_list_rows=20,
        max_list_sections=5,
        max_row_title=60,
        max_cards=10,
        reply=True,
    )

    def dedup_key(self, request: HttpRequest) -> str:
        return f"{_session(request)}:{self._frame(request).id}"

    def decode(self, request: HttpRequest, ctx: DecodeContext) -> list[c.Envelope]:
        session = _session(request)
        frame = self._frame(request)
        native_id = f"{session}:{frame.id}"
        parts: list[c.Part] = []
        if frame.text:
            parts.append(c.Text(text=frame.text))
        if frame.action is not None:
            parts.append(c.Action(id=frame.action.id, title=frame.action.title, source=frame.action.source))
        return [c.Message(
            id=c.message_id(ctx.tenant, ctx.connection, native_id),
            tenant=ctx.tenant,
            conversation=native.conversation(ctx, self.channel, session),
            ts=native.from_unix(request.received_at) if request.received_at else c.now(),
            sender=native.sender(ctx, session, name=frame.name or "web visitor"),
            native=c.Native(id=native_id, seq=ctx.seq),
            parts=parts,
        )]

    def encode(self, message: c.Message, ctx: EncodeContext) -> list[OutboundRequest]:
        return [OutboundRequest(method="PUBLISH", url=f"session:{ctx.to}", body=c.encode(message),
                                idempotency_key=message.id, message_id=message.id)]

    def parse_response(self, request: OutboundRequest, response: HttpResponse) -> SendResult:
        return SendResult(ok=200 <= response.status < 300, native_ids=[request.message_id])

    @staticmethod
    def _frame(request: HttpRequest) -> _Frame:
        frame = native.convert(native.read_json(request), _Frame)
        if bool(frame.text) == (frame.action is not None):
            raise DecodeError("a frame carries either `text` or `action`", path="$")
        return frame


def _session(request: HttpRequest) -> str:
    session = request.headers.get(SESSION_HEADER, "")
    if not session:
        raise DecodeError(f"missing {SESSION_HEADER} header", path="headers")
    return session

