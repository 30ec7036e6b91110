"""The frames of the processor protocol at `WebSocket /ws/processor`: JSON text frames told apart by `type`.

The hub sends `hello` (first), `envelope` (an inbound envelope routed to the processor, with its
sequence in the messages stream), `accepted` (a `send` was stored), `error` and `pong`; the app sends
`ack`, `send` and `ping`. `schemas()` is one JSON Schema per frame type, as `babelhub schema
--processor-frames` prints it.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeAlias

import msgspec

from babelhub import canonical as c
from babelhub.sessions.frames import decode_json

__all__ = ["Accepted", "Ack", "AppFrame", "EnvelopeFrame", "ErrorFrame", "Hello", "HubFrame", "Ping", "Pong", "Send",
           "decode_app_frame", "encode", "schemas"]

Seq = Annotated[int, msgspec.Meta(ge=1)]
Ref = Annotated[str, msgspec.Meta(max_length=64)]


class _Frame(msgspec.Struct, tag_field="type", frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


# ------------------------------------------------------------------------------- app → hub


class Ack(_Frame, tag="ack", frozen=True, kw_only=True):
    """Cumulative: acknowledges the envelope frame with this `seq` and every envelope frame the hub sent
    before it on this socket. Acknowledged envelopes are never delivered again."""

    seq: Seq


class Send(_Frame, tag="send", frozen=True, kw_only=True):
    """An outbound message or activity (a canonical envelope; `kind`, `id`, `tenant`, `ts` and `direction`
    may be left out, and the conversation named by `connection` + `native_id`). Answered by `accepted`
    or by `error` with the same `ref`."""

    ref: Ref = ""
    envelope: dict[str, Any]
    idempotency_key: str = ""
    """The same key again (within a day) stores nothing new and answers the first id, `duplicate: true`."""


class Ping(_Frame, tag="ping", frozen=True, kw_only=True):
    id: Ref = ""


AppFrame: TypeAlias = Ack | Send | Ping

# ------------------------------------------------------------------------------- hub → app


class Hello(_Frame, tag="hello", frozen=True, kw_only=True):
    """The first frame of every socket."""

    processor: str
    resumed_from: int
    """The `?after=` the socket gave (0: none): what the last socket of this processor on this hub process
    was sent up to that seq is taken as acknowledged."""
    window: int
    """Envelope frames the hub sends at most before it waits for an `ack`."""


class EnvelopeFrame(_Frame, tag="envelope", frozen=True, kw_only=True):
    seq: int
    """The envelope's sequence in the messages stream: grows with every stored message, the same on every
    redelivery (dedup by it)."""
    envelope: c.Envelope


class Accepted(_Frame, tag="accepted", frozen=True, kw_only=True):
    ref: str
    id: str
    conversation: str
    duplicate: bool
    """The idempotency key was used before: nothing new was stored, `id` is the first one's."""


class ErrorFrame(_Frame, tag="error", frozen=True, kw_only=True):
    ref: str = ""
    """The `ref` of the `send` refused (empty for a frame that could not be read)."""
    code: str
    message: str
    path: str = "$"
    """The JSON path of what is wrong in the app's frame."""


class Pong(_Frame, tag="pong", frozen=True, kw_only=True):
    id: str = ""


HubFrame: TypeAlias = Hello | EnvelopeFrame | Accepted | ErrorFrame | Pong

_decoder = msgspec.json.Decoder(AppFrame)
_encoder = msgspec.json.Encoder()


def decode_app_frame(data: str | bytes) -> AppFrame:
    """Read an app's frame; `DecodeError.path` names the JSON path of what is wrong."""
    frame: AppFrame = decode_json(_decoder, data)
    return frame


def encode(frame: HubFrame) -> str:
    return _encoder.encode(frame).decode("utf-8")


def schemas() -> dict[str, dict[str, Any]]:
    """One JSON Schema (draft 2020-12) per frame type, keyed `app.<type>` or `hub.<type>`."""
    documents: dict[str, dict[str, Any]] = {}
    for side, union in (("app", AppFrame), ("hub", HubFrame)):
        for frame_type in union.__args__:
            tag = frame_type.__struct_config__.tag
            documents[f"{side}.{tag}"] = {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "$id": f"https://babelhub.dev/schema/processor-frames/{side}.{tag}.json",
                "title": f"babelhub processor frame `{tag}` ({side} to {'hub' if side == 'app' else 'app'})",
                **msgspec.json.schema(frame_type),
            }
    return documents
