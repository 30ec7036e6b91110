"""Helpers every media provider needs for reading the frames its provider sends and writing the ones it
plays, so that each provider module holds only what is particular to its protocol (as
`babelhub.codecs.native` serves the channel codecs, whose `json_value` and `convert` these build on)."""

from __future__ import annotations

import base64
import hmac
import json
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeAlias, TypeVar

import msgspec

from babelhub.audio.convert import silence
from babelhub.audio.frame import AudioFormat
from babelhub.codecs import native
from babelhub.codecs.base import HttpRequest
from babelhub.errors import DecodeError, SignatureError
from babelhub.media.base import Audio, Dtmf, MediaEvent, MediaSession, WsFrame

__all__ = [
    "DTMF_DIGITS",
    "BinaryAudio",
    "Number",
    "TimestampClock",
    "audio_payload",
    "check_basic_credentials",
    "decode_frame",
    "dispatch",
    "dtmf_event",
    "json_frame",
    "packets",
    "parameter_text",
    "sample_rate",
    "text",
    "text_frame",
]

T = TypeVar("T")
Session = TypeVar("Session", bound=MediaSession)

DTMF_DIGITS: Final = frozenset("0123456789*#ABCD")
"""The 16 DTMF keys: what a provider may report and the most one may play (some document fewer)."""

Number: TypeAlias = int | str
"""A number some providers write as a JSON number in one message and as a string of digits in another
(Plivo's `sampleRate`, Exotel's `sequence_number`)."""

_encoder: Final = msgspec.json.Encoder()


# ---------------------------------------------------------------------------------------- inbound


def text_frame(frame: WsFrame, provider: str) -> str:
    """`frame` when it is text; a DecodeError at `$` when `provider`, which sends JSON text, sent binary."""
    if isinstance(frame, bytes):
        raise DecodeError(f"{provider} sends JSON text frames, not binary ones", path="$")
    return frame


def json_frame(frame: WsFrame, provider: str) -> Any:
    """A text frame as JSON, to read with `native.convert` into the Struct its event names; a DecodeError
    at `$` for a binary frame, invalid JSON, or JSON nested too deeply to read."""
    return native.json_value(text_frame(frame, provider), what="the frame")


class _Head(msgspec.Struct):
    event: str


def dispatch(session: Session, message: Any,
             readers: Mapping[str, Callable[[Session, Any], list[MediaEvent]]]) -> list[MediaEvent]:
    """The events of `message` (decoded JSON with an `event` string) as the reader for its event makes
    them; none for an event without one (informational, or added by the provider since: forward
    compatible). A DecodeError names the path when `event` is missing or no string."""
    read = readers.get(native.convert(message, _Head).event)
    return read(session, message) if read else []


def decode_frame(data: str | bytes, into: type[T], path: str = "$") -> T:
    """JSON `data` (a frame, or a member at `path` kept raw) read straight into the wire Struct `into`, as
    strictly as msgspec types it (a number written as a string is refused unless `into` says so); a
    DecodeError under `path` names the member that does not fit, and invalid or too deeply nested JSON."""
    try:
        return msgspec.json.decode(data, type=into)
    except msgspec.ValidationError as exc:
        reason, _, where = str(exc).partition(" - at `$")
        raise DecodeError(reason, path=path + where.rstrip("`")) from None
    except msgspec.DecodeError as exc:
        raise DecodeError(f"the frame is not valid JSON: {exc}", path=path) from None
    except RecursionError:  # msgspec stops at Python's recursion limit, even inside a member it skips
        raise DecodeError("the frame is nested too deeply to read", path=path) from None


def audio_payload(encoded: str, path: str) -> bytes:
    """Base64 audio, strictly (no stray characters); a DecodeError at `path` otherwise."""
    try:
        return base64.b64decode(encoded, validate=True)
    except ValueError:  # binascii.Error, or a character outside ASCII
        raise DecodeError("the audio payload is not valid base64", path=path) from None


def dtmf_event(digit: str, path: str, digits: frozenset[str] = DTMF_DIGITS) -> Dtmf:
    """The key press `digit`, one of `digits`; a DecodeError at `path` otherwise."""
    if len(digit) != 1 or digit not in digits:
        raise DecodeError(f"a DTMF digit is one of {_keys(digits)}, not {digit[:8]!r}", path=path)
    return Dtmf(digit=digit)


def _keys(digits: frozenset[str]) -> str:
    named = [key for key in ("*", "#") if key in digits] + (["A-D"] if "A" in digits else [])
    return ", ".join(["0-9", *named])


def sample_rate(value: Number, allowed: frozenset[int], path: str) -> int:
    """A sample rate written as a number or a string of digits, one of `allowed`; a DecodeError at
    `path` otherwise."""
    try:
        rate = int(value)
    except ValueError:
        rate = 0
    if rate not in allowed:
        rates = ", ".join(str(rate) for rate in sorted(allowed))
        raise DecodeError(f"the sample rate must be one of {rates} Hz, not {value!r}", path=path)
    return rate


class TimestampClock:
    """Media time from a provider's `timestamp` in milliseconds, counted from the first one read: Plivo
    documents its timestamps both as Unix time and as time since the stream began, and the difference
    is right for both."""

    def __init__(self) -> None:
        self._first_ms: int | None = None

    def media_time_us(self, timestamp: Number | None, path: str) -> int | None:
        """Microseconds since the first timestamp; None when the message has none."""
        if timestamp is None:
            return None
        try:
            ms = int(timestamp)
        except ValueError:
            raise DecodeError(f"the timestamp {timestamp!r} is no number of milliseconds", path=path) from None
        if self._first_ms is None:
            self._first_ms = ms
        return max(0, ms - self._first_ms) * 1000


class BinaryAudio:
    """The caller's audio in binary frames, for providers that send it raw and give it no time (Vonage,
    Asterisk, Genesys): each frame must hold whole samples of the stream's format, and its media time is
    counted from the bytes received before it, plus any gap the provider reports (`skip`)."""

    def __init__(self) -> None:
        self._received_bytes = 0
        self._skipped_us = 0

    def read(self, payload: bytes, audio: AudioFormat | None, start: str) -> Audio:
        """`payload` as `Audio` in the format `audio`; a DecodeError at `$` when the stream has not started
        (`audio` is None: `start` names what starts it) or the frame ends inside a sample."""
        if audio is None:
            raise DecodeError(f"binary audio before {start}", "$")
        sample = (2 if audio.codec == "pcm16" else 1) * audio.channels
        if len(payload) % sample:
            raise DecodeError(f"{len(payload)} bytes do not hold whole samples: {audio.codec} of {audio.channels} "
                              f"channel(s) has {sample} bytes a sample", "$")
        timestamp = self._skipped_us + self._received_bytes * 1000 // audio.bytes_per_ms()
        self._received_bytes += len(payload)
        return Audio(payload=payload, timestamp_us=timestamp)

    def skip(self, us: int) -> None:
        """Move the media time on by `us` microseconds of audio the provider did not send."""
        self._skipped_us += us


# -------------------------------------------------------------------------------- opening request


def check_basic_credentials(request: HttpRequest, username: str, password: str) -> None:
    """The opening request's `Authorization: Basic` must carry `username:password`, when the connection
    configures either; nothing is checked when it configures neither (the endpoint is then restricted by
    network). `SignatureError` otherwise, naming no credential."""
    if not username and not password:
        return
    scheme, _, encoded = request.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        raise SignatureError("missing Authorization: Basic credentials")
    try:
        given = base64.b64decode(encoded.strip(), validate=True)
    except ValueError:  # binascii.Error, or a character outside ASCII
        raise SignatureError("the Basic credentials are not base64") from None
    if not hmac.compare_digest(given, f"{username}:{password}".encode()):
        raise SignatureError("the Basic credentials do not match the connection's")


# --------------------------------------------------------------------------------------- outbound


def packets(payload: bytes, audio: AudioFormat, step: int, largest: int) -> list[bytes]:
    """`payload` (in `audio`) padded with the codec's silence to a whole number of `step` bytes (a frame, a
    chunk size the provider plays without gaps) and cut into packets of at most `largest` bytes, itself a
    multiple of `step`: for providers that drop or garble a partial frame or refuse a larger message."""
    short = -len(payload) % step
    if short:
        quiet = silence(audio, 1)  # one millisecond of the codec's silence
        payload += (quiet * (short // len(quiet) + 1))[:short]
    return [payload[start:start + largest] for start in range(0, len(payload), largest)]


def text(message: Any) -> str:
    """An outbound message (a wire Struct, or plain JSON values) as a compact JSON text frame."""
    return _encoder.encode(message).decode("utf-8")


def parameter_text(value: Any) -> str:
    """A provider's custom parameter (a header, a channel variable) as `Start.parameters` holds it: a
    string as it is, any other JSON value as its compact JSON."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
