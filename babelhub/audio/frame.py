"""The audio frame: what every realtime audio source and sink of the hub exchanges.

A frame is a few milliseconds of one stream's audio with a small fixed header, the same bytes on a
client's WebSocket (a binary frame) and on NATS (`<prefix>.<tenant>.audio.<stream>.up|down`):

    offset  size  field
    0       1     version (1)
    1       1     codec: 0 pcm16 (signed 16-bit little-endian), 1 mulaw, 2 alaw, 3 opus
    2       1     channels (1-8)
    3       1     flags (0; reserved)
    4       4     sample rate in Hz (unsigned, big-endian, 8000-48000)
    8       4     sequence (unsigned, big-endian; wraps at 2**32)
    12      8     timestamp: microseconds of media time since the stream began (unsigned, big-endian)
    20      1     length of the stream id in bytes (1-64)
    21      n     stream id (ASCII: letters, digits, `_` and `-`)
    21+n    ...   payload: the encoded audio

`AudioFrame.from_bytes` raises `DecodeError` naming the field that is wrong; nothing else is trusted
before it has been read.
"""

from __future__ import annotations

import re
import struct
from typing import Final, Literal, TypeAlias

import msgspec

from babelhub.errors import DecodeError

__all__ = ["CODECS", "HEADER_BYTES", "MAX_STREAM_ID", "AudioCodec", "AudioFormat", "AudioFrame", "FrameWriter",
           "valid_stream_id"]

AudioCodec: TypeAlias = Literal["pcm16", "mulaw", "alaw", "opus"]
CODECS: Final[tuple[AudioCodec, ...]] = ("pcm16", "mulaw", "alaw", "opus")
"""The codecs in the order of their number in the header."""

_VERSION: Final = 1
_HEADER: Final = struct.Struct(">BBBBIIQB")
_FORMAT_FIELDS: Final = struct.Struct(">BBBBI")
"""The header's first fields, the same for every frame of a stream in one format."""
_SEQ_AND_TIME: Final = struct.Struct(">IQ")
HEADER_BYTES: Final = _HEADER.size
"""Bytes of the fixed header, before the stream id."""
MAX_STREAM_ID: Final = 64
_STREAM_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_RATES: Final = range(8000, 48001)
_MAX_CHANNELS: Final = 8


def valid_stream_id(stream: str) -> bool:
    """Whether `stream` may name a stream: it becomes a NATS subject token."""
    return _STREAM_ID.fullmatch(stream) is not None


class AudioFormat(msgspec.Struct, frozen=True, kw_only=True):
    """How audio is encoded: codec, sample rate and channels (and the frame length a party works in)."""

    codec: AudioCodec = "pcm16"
    rate: int = 16000
    channels: int = 1
    frame_ms: int = 20
    """Milliseconds of audio per frame this party sends and expects."""

    def bytes_per_ms(self) -> int:
        """Payload bytes per millisecond of audio (0 for opus, whose frames vary in size)."""
        sample_bytes = {"pcm16": 2, "mulaw": 1, "alaw": 1, "opus": 0}[self.codec]
        return sample_bytes * self.channels * self.rate // 1000

    def frame_bytes(self) -> int:
        """Payload bytes of one frame of `frame_ms` (0 for opus)."""
        return self.bytes_per_ms() * self.frame_ms


class AudioFrame(msgspec.Struct, frozen=True, kw_only=True):
    stream: str
    seq: int
    timestamp: int
    """Microseconds of media time since the stream began, at the frame's first sample."""
    codec: AudioCodec
    rate: int
    channels: int = 1
    payload: bytes = b""

    @property
    def format(self) -> AudioFormat:
        return AudioFormat(codec=self.codec, rate=self.rate, channels=self.channels)

    def duration_us(self) -> int:
        """Microseconds of audio in the payload (0 for opus: its length is in the packet)."""
        per_ms = self.format.bytes_per_ms()
        return len(self.payload) * 1000 // per_ms if per_ms else 0

    def to_bytes(self) -> bytes:
        stream = self.stream.encode("ascii")
        header = _HEADER.pack(_VERSION, CODECS.index(self.codec), self.channels, 0, self.rate,
                              self.seq % 2**32, self.timestamp, len(stream))
        return b"".join((header, stream, self.payload))

    @classmethod
    def from_bytes(cls, data: bytes) -> AudioFrame:
        """The frame in `data`; `DecodeError` naming the field when it is not a valid one."""
        if len(data) < HEADER_BYTES:
            raise DecodeError(f"an audio frame has a {HEADER_BYTES}-byte header; got {len(data)} bytes", "header")
        version, codec, channels, _flags, rate, seq, timestamp, length = _HEADER.unpack_from(data)
        if version != _VERSION:
            raise DecodeError(f"audio frame version {version} is not {_VERSION}", "version")
        if codec >= len(CODECS):
            raise DecodeError(f"codec {codec} is none of 0-{len(CODECS) - 1} ({', '.join(CODECS)})", "codec")
        if not 1 <= channels <= _MAX_CHANNELS:
            raise DecodeError(f"channels must be 1-{_MAX_CHANNELS}, not {channels}", "channels")
        if rate not in _RATES:
            raise DecodeError(f"sample rate must be 8000-48000 Hz, not {rate}", "rate")
        end = HEADER_BYTES + length
        if length == 0 or length > MAX_STREAM_ID or len(data) < end:
            raise DecodeError(f"the stream id must be 1-{MAX_STREAM_ID} bytes and present", "stream")
        stream = data[HEADER_BYTES:end].decode("ascii", errors="replace")
        if not valid_stream_id(stream):
            raise DecodeError("the stream id may hold only letters, digits, '_' and '-'", "stream")
        return cls(stream=stream, seq=seq, timestamp=timestamp, codec=CODECS[codec], rate=rate,
                   channels=channels, payload=data[end:])


class FrameWriter:
    """Writes one stream's frames in one format, as `AudioFrame.to_bytes` would: what every frame shares
    (version, format, stream id) is packed once, so each frame packs only its sequence and timestamp — the
    hub writes one per packet of every call it relays."""

    def __init__(self, stream: str, audio: AudioFormat) -> None:
        encoded = stream.encode("ascii")
        self._format = _FORMAT_FIELDS.pack(_VERSION, CODECS.index(audio.codec), audio.channels, 0, audio.rate)
        self._stream = bytes((len(encoded),)) + encoded
        self._bytes_per_ms = audio.bytes_per_ms()

    def frame(self, seq: int, timestamp: int, payload: bytes) -> bytes:
        return b"".join((self._format, _SEQ_AND_TIME.pack(seq % 2**32, timestamp), self._stream, payload))

    def duration_us(self, payload: bytes) -> int:
        """Microseconds of audio in `payload` (0 for opus), as `AudioFrame.duration_us`."""
        return len(payload) * 1000 // self._bytes_per_ms if self._bytes_per_ms else 0
