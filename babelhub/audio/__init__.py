"""Realtime audio: the frame every audio party exchanges and the conversions between formats."""

from babelhub.audio.convert import Chunker, Converter, silence
from babelhub.audio.frame import CODECS, AudioCodec, AudioFormat, AudioFrame, valid_stream_id

__all__ = ["CODECS", "AudioCodec", "AudioFormat", "AudioFrame", "Chunker", "Converter", "silence",
           "valid_stream_id"]
