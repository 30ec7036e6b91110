"""The audio streams' protocol on NATS: subjects, control operations and events.

Every call's audio stream has four core-NATS subjects (no JetStream: latency first, nothing kept):

    <prefix>.<tenant>.audio.<stream>.up       AudioFrame bytes from the caller (published by the hub)
    <prefix>.<tenant>.audio.<stream>.down     AudioFrame bytes to the caller, any codec and rate
    <prefix>.<tenant>.audio.<stream>.control  JSON control operations (`Control`)
    <prefix>.<tenant>.audio.<stream>.events   JSON events of the stream (`StreamEvent`)

Control operations: `{"op": "clear"}` drops the audio queued for the caller (barge-in);
`{"op": "mark", "name": "…"}` queues a mark after the audio sent so far, reported as a `played` event
when that audio has been played; `{"op": "dtmf", "digits": "12#"}` plays tones to the call;
`{"op": "hangup", "reason": "…"}` ends the stream.

Events (`"event"` names the kind): `started` (the call's ids and both formats), `dtmf` (a key pressed
by the caller), `played` (a mark; `heard` false on a listen-only session), `stopped` (why, and the
frames relayed and dropped each way).
"""

from __future__ import annotations

from typing import Literal, TypeAlias

import msgspec

from babelhub.audio.frame import AudioFormat

__all__ = ["Clear", "Control", "DtmfPressed", "Hangup", "Mark", "Played", "SendDtmf", "Started",
           "Stopped", "StreamEvent", "audio_subject", "decode_control", "decode_event"]

SubjectKind: TypeAlias = Literal["up", "down", "control", "events"]


def audio_subject(prefix: str, tenant: str, stream: str, kind: SubjectKind) -> str:
    """`stream` may be `*` to subscribe to every stream of the tenant."""
    return f"{prefix}.{tenant}.audio.{stream}.{kind}"


# ------------------------------------------------------------------------------------------ control


class _Op(msgspec.Struct, tag_field="op", frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class Clear(_Op, tag="clear", frozen=True, kw_only=True):
    """Drop the audio queued for the caller, here and in the provider's buffer."""


class Mark(_Op, tag="mark", frozen=True, kw_only=True):
    name: str


class SendDtmf(_Op, tag="dtmf", frozen=True, kw_only=True):
    digits: str


class Hangup(_Op, tag="hangup", frozen=True, kw_only=True):
    reason: str = ""


Control: TypeAlias = Clear | Mark | SendDtmf | Hangup

_MAX_MARK_NAME = 256
_DTMF_DIGITS = frozenset("0123456789*#ABCDabcd")
_MAX_DIGITS = 64


def decode_control(data: bytes) -> Control:
    """The operation in `data`; `msgspec.ValidationError` / `DecodeError` say what is wrong and where."""
    op: Control = msgspec.json.decode(data, type=Control)
    if isinstance(op, Mark) and not 0 < len(op.name) <= _MAX_MARK_NAME:
        raise msgspec.ValidationError(f"a mark's name is 1-{_MAX_MARK_NAME} characters - at `$.name`")
    if isinstance(op, SendDtmf) and not (0 < len(op.digits) <= _MAX_DIGITS and set(op.digits) <= _DTMF_DIGITS):
        raise msgspec.ValidationError(f"DTMF digits are 1-{_MAX_DIGITS} of 0-9, *, #, A-D - at `$.digits`")
    return op


# ------------------------------------------------------------------------------------------- events


class _Event(msgspec.Struct, tag_field="event", frozen=True, kw_only=True):
    stream: str


class Started(_Event, tag="started", frozen=True, kw_only=True):
    connection: str
    channel: str
    conversation: str
    """The canonical conversation of the caller: the call's activities are on its `in` subject."""
    call_id: str
    provider_stream: str = ""
    caller: str = ""
    callee: str = ""
    inbound: AudioFormat
    """The format of the `up` frames."""
    outbound: AudioFormat
    """What the provider plays; `down` frames in any other format are converted to it."""
    parameters: dict[str, str] = {}


class DtmfPressed(_Event, tag="dtmf", frozen=True, kw_only=True):
    digit: str


class Played(_Event, tag="played", frozen=True, kw_only=True):
    name: str
    acknowledged: bool
    """True when the provider said so; False when the hub's pacing clock played the audio out."""
    heard: bool = True
    """False when the session is listen-only (AudioHook Monitor): nothing before the mark was played to
    the call, and the mark is reported at once so that nobody waits for it."""


class Stopped(_Event, tag="stopped", frozen=True, kw_only=True):
    reason: str = ""
    relayed: dict[str, int] = {}
    """Frames relayed by direction (`up`, `down`)."""
    dropped: dict[str, int] = {}
    """Frames dropped by cause: `up` (NATS could not take the caller's audio), `down` (outbound queue
    full, the oldest went), `foreign` (a `down` frame naming another stream), `unreadable`, `unplayed`
    (a `down` frame for a listen-only session, which plays nothing)."""


StreamEvent: TypeAlias = Started | DtmfPressed | Played | Stopped


def decode_event(data: bytes) -> StreamEvent:
    event: StreamEvent = msgspec.json.decode(data, type=StreamEvent)
    return event
