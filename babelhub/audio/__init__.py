"""Realtime audio: the frame every audio party exchanges, the conversions between formats, the pacing
of a call's outbound audio, the streams' protocol on NATS and the helper for audio services."""

from babelhub.audio.convert import Chunker, Converter, silence
from babelhub.audio.frame import CODECS, AudioCodec, AudioFormat, AudioFrame, valid_stream_id
from babelhub.audio.protocol import StreamEvent, audio_subject
from babelhub.audio.service import AudioService, Feed

__all__ = ["CODECS", "AudioCodec", "AudioFormat", "AudioFrame", "AudioService", "Chunker", "Converter", "Feed",
           "StreamEvent", "audio_subject", "silence", "valid_stream_id"]
