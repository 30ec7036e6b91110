"""Audio conversion between the formats providers and audio services speak: G.711 µ-law and A-law,
16-bit linear PCM, any sample rate and channel count.

Conversion is stateful where it must be: resampling carries its filter state from one frame to the
next (`audioop.ratecv`), so a stream converted frame by frame sounds as if converted whole. Opus is
relayed as it is, never transcoded: a party that cannot take the stream's Opus gets an `EncodeError`.

`audioop` is the standard library's in Python 3.11 and 3.12 (deprecated there) and the `audioop-lts`
package from 3.13 on, with the same functions.
"""

from __future__ import annotations

import warnings
from typing import Any

from babelhub.audio.frame import AudioFormat
from babelhub.errors import EncodeError

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = ["Chunker", "Converter", "silence"]

_WIDTH = 2  # bytes per linear sample


def silence(audio: AudioFormat, ms: int) -> bytes:
    """`ms` milliseconds of silence in `audio`'s encoding (opus has no fixed silence: empty)."""
    if audio.codec == "opus":
        return b""
    linear = bytes(_WIDTH * audio.channels * audio.rate * ms // 1000)
    return _from_linear(linear, audio.codec)


class Converter:
    """Turns one stream's payloads from `source` into `target`, frame after frame."""

    def __init__(self, source: AudioFormat, target: AudioFormat) -> None:
        self.source = source
        self.target = target
        self._passthrough = (source.codec, source.rate, source.channels) == (target.codec, target.rate,
                                                                            target.channels)
        if not self._passthrough and "opus" in (source.codec, target.codec):
            raise EncodeError(f"opus is relayed as it is, not converted ({source.codec} {source.rate} Hz → "
                              f"{target.codec} {target.rate} Hz)")
        self._resampling: Any = None  # audioop.ratecv's state, carried from frame to frame

    def convert(self, payload: bytes) -> bytes:
        if self._passthrough:
            return payload
        linear = _to_linear(payload, self.source.codec)
        linear = _channels(linear, self.source.channels, self.target.channels)
        if self.source.rate != self.target.rate:
            linear, self._resampling = audioop.ratecv(linear, _WIDTH, self.target.channels, self.source.rate,
                                                      self.target.rate, self._resampling)
        return _from_linear(linear, self.target.codec)


class Chunker:
    """Cuts a byte stream into frames of `size` bytes (a provider's packet size): what does not fill a
    frame waits for the next payload."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._buffer = bytearray()

    def push(self, payload: bytes) -> list[bytes]:
        if self.size <= 0:
            return [payload] if payload else []
        self._buffer += payload
        frames: list[bytes] = []
        while len(self._buffer) >= self.size:
            frames.append(bytes(self._buffer[:self.size]))
            del self._buffer[:self.size]
        return frames

    def clear(self) -> None:
        """Drop what waits (barge-in)."""
        self._buffer.clear()

    def rest(self) -> bytes:
        """What waits, taken out (the end of a stream)."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest


def _to_linear(payload: bytes, codec: str) -> bytes:
    if codec == "mulaw":
        return audioop.ulaw2lin(payload, _WIDTH)
    if codec == "alaw":
        return audioop.alaw2lin(payload, _WIDTH)
    return payload[:len(payload) - len(payload) % _WIDTH]  # a torn sample is dropped


def _from_linear(linear: bytes, codec: str) -> bytes:
    if codec == "mulaw":
        return audioop.lin2ulaw(linear, _WIDTH)
    if codec == "alaw":
        return audioop.lin2alaw(linear, _WIDTH)
    return linear


def _channels(linear: bytes, have: int, want: int) -> bytes:
    """Mono from stereo (the mean), stereo from mono (copied); other counts are kept as they are."""
    if have == want:
        return linear
    if have == 2 and want == 1:
        return audioop.tomono(linear, _WIDTH, 0.5, 0.5)
    if have == 1 and want == 2:
        return audioop.tostereo(linear, _WIDTH, 1, 1)
    raise EncodeError(f"audio of {have} channels cannot be turned into {want}")
