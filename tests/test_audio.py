"""The audio frame and format conversion (`babelhub.audio`): round trips, hostile headers, and
conversions that keep the signal (measured, not compared byte for byte)."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from babelhub.audio import CODECS, AudioFormat, AudioFrame, Chunker, Converter, silence
from babelhub.audio.frame import HEADER_BYTES, FrameWriter
from babelhub.errors import DecodeError, EncodeError

STREAM_IDS = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)


@given(stream=STREAM_IDS, seq=st.integers(0, 2**32 - 1), timestamp=st.integers(0, 2**64 - 1),
       codec=st.sampled_from(CODECS), rate=st.integers(8000, 48000), channels=st.integers(1, 8),
       payload=st.binary(max_size=2000))
def test_a_frame_reads_back_as_it_was_written(stream: str, seq: int, timestamp: int, codec: str, rate: int,
                                              channels: int, payload: bytes) -> None:
    frame = AudioFrame(stream=stream, seq=seq, timestamp=timestamp, codec=codec,  # type: ignore[arg-type]
                       rate=rate, channels=channels, payload=payload)
    data = frame.to_bytes()
    assert len(data) == HEADER_BYTES + len(stream) + len(payload)
    assert AudioFrame.from_bytes(data) == frame


@given(stream=STREAM_IDS, seq=st.integers(0, 2**40), timestamp=st.integers(0, 2**64 - 1),
       codec=st.sampled_from(CODECS), rate=st.integers(8000, 48000), channels=st.integers(1, 8),
       payload=st.binary(max_size=2000))
def test_a_frame_writer_writes_what_the_frame_would(stream: str, seq: int, timestamp: int, codec: str, rate: int,
                                                    channels: int, payload: bytes) -> None:
    """The hub's up path packs each stream's shared header fields once (`FrameWriter`): its frames are the
    bytes `AudioFrame.to_bytes` writes, sequence wrapping included, and it counts the same duration."""
    frame = AudioFrame(stream=stream, seq=seq, timestamp=timestamp, codec=codec,  # type: ignore[arg-type]
                       rate=rate, channels=channels, payload=payload)
    writer = FrameWriter(stream, frame.format)
    assert writer.frame(seq, timestamp, payload) == frame.to_bytes()
    assert writer.duration_us(payload) == frame.duration_us()


def header(version: int = 1, codec: int = 1, channels: int = 1, rate: int = 8000, stream: bytes = b"call-1",
           length: int | None = None) -> bytes:
    return struct.pack(">BBBBIIQB", version, codec, channels, 0, rate, 7, 20_000,
                       len(stream) if length is None else length) + stream


@pytest.mark.parametrize(("data", "field"), [
    (b"", "header"),
    (header()[:HEADER_BYTES - 1], "header"),
    (header(version=2), "version"),
    (header(codec=4), "codec"),
    (header(channels=0), "channels"),
    (header(channels=9), "channels"),
    (header(rate=7999), "rate"),
    (header(rate=96000), "rate"),
    (header(stream=b""), "stream"),
    (header(stream=b"a" * 65), "stream"),
    (header(stream=b"call", length=40), "stream"),
    (header(stream=b"bh.*.>"), "stream"),
    (header(stream="é".encode()), "stream"),
])
def test_a_bad_header_is_refused_naming_its_field(data: bytes, field: str) -> None:
    with pytest.raises(DecodeError) as refused:
        AudioFrame.from_bytes(data)
    assert refused.value.path == field


def tone(rate: int, ms: int, hz: float = 440.0, amplitude: int = 8000) -> bytes:
    samples = rate * ms // 1000
    return struct.pack(f"<{samples}h", *(int(amplitude * math.sin(2 * math.pi * hz * n / rate))
                                         for n in range(samples)))


def rms(linear: bytes) -> float:
    samples = struct.unpack(f"<{len(linear) // 2}h", linear)
    return math.sqrt(sum(s * s for s in samples) / max(1, len(samples)))


def test_pcm16_at_16khz_to_mulaw_at_8khz_and_back_keeps_the_tone() -> None:
    wide = AudioFormat(codec="pcm16", rate=16000)
    phone = AudioFormat(codec="mulaw", rate=8000)
    down, up = Converter(wide, phone), Converter(phone, wide)
    source = tone(16000, 1000)
    frames = [source[i:i + 640] for i in range(0, len(source), 640)]  # 20 ms at a time, as streamed
    encoded = [down.convert(frame) for frame in frames]
    assert sum(len(frame) for frame in encoded) == pytest.approx(8000, abs=8)  # one byte per sample
    back = b"".join(up.convert(frame) for frame in encoded)
    assert rms(back[3200:]) == pytest.approx(rms(source), rel=0.1)  # the level survives, past the filter's start


def test_alaw_stereo_to_pcm16_mono() -> None:
    stereo = AudioFormat(codec="pcm16", rate=8000, channels=2)
    mono_tone = tone(8000, 100)
    samples = struct.unpack(f"<{len(mono_tone) // 2}h", mono_tone)
    interleaved = struct.pack(f"<{2 * len(samples)}h", *(s for sample in samples for s in (sample, sample)))
    alaw = Converter(stereo, AudioFormat(codec="alaw", rate=8000, channels=2)).convert(interleaved)
    mono = Converter(AudioFormat(codec="alaw", rate=8000, channels=2), AudioFormat(codec="pcm16", rate=8000))
    assert rms(mono.convert(alaw)) == pytest.approx(rms(mono_tone), rel=0.05)


def test_the_same_format_passes_through_and_opus_is_never_transcoded() -> None:
    opus = AudioFormat(codec="opus", rate=48000)
    assert Converter(opus, opus).convert(b"\x01\x02") == b"\x01\x02"
    with pytest.raises(EncodeError):
        Converter(opus, AudioFormat(codec="pcm16", rate=16000))


def test_silence_is_silent_in_every_encoding() -> None:
    for codec in ("pcm16", "mulaw", "alaw"):
        audio = AudioFormat(codec=codec, rate=8000)  # type: ignore[arg-type]
        quiet = silence(audio, 20)
        assert len(quiet) == audio.frame_bytes()
        assert rms(Converter(audio, AudioFormat(codec="pcm16", rate=8000)).convert(quiet)) < 10


def test_a_chunker_cuts_packets_of_the_providers_size_and_drops_them_on_clear() -> None:
    chunker = Chunker(160)
    assert chunker.push(b"a" * 100) == []
    assert chunker.push(b"b" * 300) == [b"a" * 100 + b"b" * 60, b"b" * 160]
    chunker.clear()
    assert chunker.push(b"c" * 160) == [b"c" * 160] and chunker.rest() == b""
