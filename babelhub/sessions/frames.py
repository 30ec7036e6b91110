"""The frames of the client-session protocol at `WebSocket /ws`: JSON text frames told apart by `type`.

A client sends `auth`, `subscribe`, `unsubscribe`, `send` and `ping`; the hub sends `message`,
`activity` and `status` (a canonical envelope with the `offset` it has in its stream and the `epoch`
of the streams), `subscribed`, `unsubscribed`, `error` and `pong`. A web chat visitor (the built-in
page, at `WebSocket /ws/<connection>`) gets a `session` frame first and sends `post` instead of `send`.
`schemas()` is one JSON Schema per frame type, as `babelhub schema --frames` prints it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, TypeAlias, TypeVar

import msgspec

from babelhub import canonical as c
from babelhub.errors import DecodeError

__all__ = [
    "ActivityFrame",
    "Auth",
    "ClientFrame",
    "Cursor",
    "ErrorFrame",
    "HubFrame",
    "MessageFrame",
    "Ping",
    "Pong",
    "Post",
    "Send",
    "StatusFrame",
    "Subscribe",
    "Subscribed",
    "Unsubscribe",
    "Unsubscribed",
    "VisitorSession",
    "decode_client_frame",
    "decode_json",
    "encode",
    "schemas",
]

CONVERSATION_ID: Final = r"^[A-Za-z0-9_-]{1,64}$"
"""A conversation id a client may name: one subject token (canonical ids are 24 base32 characters)."""

ConversationId = Annotated[str, msgspec.Meta(pattern=CONVERSATION_ID)]
Offset = Annotated[int, msgspec.Meta(ge=0)]
MAX_CONVERSATIONS_PER_FRAME: Final = 64
ConversationIds = Annotated[list[ConversationId], msgspec.Meta(min_length=1, max_length=MAX_CONVERSATIONS_PER_FRAME)]


class _Frame(msgspec.Struct, tag_field="type", frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class Cursor(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where a client stands in one conversation: the `epoch` of the frames it got, and the last
    `offset` it got from each stream (0: none yet). Message and activity frames count in `messages`,
    status frames in `statuses`."""

    epoch: Annotated[str, msgspec.Meta(max_length=64)]
    messages: Offset = 0
    statuses: Offset = 0


# ------------------------------------------------------------------------------- client → hub


class Auth(_Frame, tag="auth", frozen=True, kw_only=True):
    """The first frame of a client that could not authenticate with the upgrade request."""

    token: Annotated[str, msgspec.Meta(max_length=4096)]


class Subscribe(_Frame, tag="subscribe", frozen=True, kw_only=True):
    conversations: ConversationIds
    since: dict[ConversationId, Cursor] = {}
    """To resume: per conversation, the cursor of the last frames received."""


class Unsubscribe(_Frame, tag="unsubscribe", frozen=True, kw_only=True):
    conversations: ConversationIds


class Send(_Frame, tag="send", frozen=True, kw_only=True):
    """An outbound message or activity for a subscribed conversation, published like a processor's answer."""

    envelope: c.Message | c.Activity


class Post(_Frame, tag="post", frozen=True, kw_only=True):
    """A web chat visitor's own message, in its connection's channel format (the built-in web chat's:
    `{"id": …, "text": …}` or `{"id": …, "action": {"id": …, "title": …}}`). It is recorded like a
    webhook and comes back as a `message` frame once stored."""

    message: msgspec.Raw


class Ping(_Frame, tag="ping", frozen=True, kw_only=True):
    id: Annotated[str, msgspec.Meta(max_length=64)] = ""


ClientFrame: TypeAlias = Auth | Subscribe | Unsubscribe | Send | Post | Ping

# ------------------------------------------------------------------------------- hub → client


class MessageFrame(_Frame, tag="message", frozen=True, kw_only=True):
    offset: int
    """The envelope's sequence in the messages stream."""
    epoch: str
    envelope: c.Message


class ActivityFrame(_Frame, tag="activity", frozen=True, kw_only=True):
    offset: int
    """The envelope's sequence in the messages stream."""
    epoch: str
    envelope: c.Activity


class StatusFrame(_Frame, tag="status", frozen=True, kw_only=True):
    offset: int
    """The envelope's sequence in the statuses stream."""
    epoch: str
    envelope: c.Status


class Subscribed(_Frame, tag="subscribed", frozen=True, kw_only=True):
    conversation: str
    recovered: bool
    """True when every frame after the client's cursor follows; false when none was given or it
    cannot be trusted (another epoch, or the streams no longer hold what came after it)."""
    since: Cursor
    """Where delivery starts: the frames after these offsets follow (a fresh cursor to resume from)."""


class Unsubscribed(_Frame, tag="unsubscribed", frozen=True, kw_only=True):
    conversation: str


class ErrorFrame(_Frame, tag="error", frozen=True, kw_only=True):
    code: str
    message: str
    path: str = "$"
    """The JSON path of what is wrong in the client's frame."""


class Pong(_Frame, tag="pong", frozen=True, kw_only=True):
    id: str = ""


class VisitorSession(_Frame, tag="session", frozen=True, kw_only=True):
    """The first frame a web chat visitor gets: its session, the token that resumes it, and the one
    conversation it may subscribe to."""

    session: str
    token: str
    resumed: bool
    """True when the socket resumed the session its URL named (`?session=…&token=…`)."""
    conversation: str


HubFrame: TypeAlias = (MessageFrame | ActivityFrame | StatusFrame | Subscribed | Unsubscribed | ErrorFrame | Pong
                       | VisitorSession)

_decoder = msgspec.json.Decoder(ClientFrame)
_encoder = msgspec.json.Encoder()
_T = TypeVar("_T")
_PATH_SUFFIX = re.compile(r" - at (?:`key` in )?`(?P<path>\$[^`]*)`$")


def decode_client_frame(data: str | bytes) -> ClientFrame:
    """Read a client frame; `DecodeError.path` names the JSON path of what is wrong."""
    frame: ClientFrame = decode_json(_decoder, data)
    return frame


def decode_json(decoder: msgspec.json.Decoder[_T], data: str | bytes) -> _T:
    """`decoder.decode(data)`, its errors as `DecodeError` with the JSON path of what is wrong."""
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _PATH_SUFFIX.search(text)
        if match is None:
            raise DecodeError(text, path="$") from None
        raise DecodeError(text[:match.start()], path=match["path"]) from None
    except msgspec.DecodeError as exc:
        raise DecodeError(f"malformed JSON: {exc}", path="$") from None
    except RecursionError:
        raise DecodeError("malformed JSON: nested too deeply", path="$") from None


def encode(frame: HubFrame) -> str:
    return _encoder.encode(frame).decode("utf-8")


def schemas() -> dict[str, dict[str, Any]]:
    """One JSON Schema (draft 2020-12) per frame type, keyed `client.<type>` or `hub.<type>`."""
    documents: dict[str, dict[str, Any]] = {}
    for side, union in (("client", ClientFrame), ("hub", HubFrame)):
        for frame_type in union.__args__:
            tag = frame_type.__struct_config__.tag
            documents[f"{side}.{tag}"] = {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "$id": f"https://babelhub.dev/schema/frames/{side}.{tag}.json",
                "title": f"babelhub client-session frame `{tag}` ({side} to {'hub' if side == 'client' else 'client'})",
                **msgspec.json.schema(frame_type),
            }
    return documents

