"""babelhub: one canonical message format for every messaging channel."""

from babelhub.canonical import SCHEMA_VERSION, Envelope, Message, decode, encode

__all__ = ["SCHEMA_VERSION", "Envelope", "Message", "decode", "encode"]
__version__ = "0.1.0"
