"""Channel codecs: one module per channel behind the small `Codec` base class.

Codecs are found through the `babelhub.codecs` entry-point group, so a channel can ship as its own
package: `[project.entry-points."babelhub.codecs"] mychannel = "mypackage.codec:MyCodec"`.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points

from babelhub.codecs.base import (
    Capabilities,
    Codec,
    DecodeContext,
    EncodeContext,
    HttpRequest,
    HttpResponse,
    OutboundRequest,
    SendResult,
)
from babelhub.errors import DecodeError, EncodeError, SignatureError

__all__ = [
    "Capabilities",
    "Codec",
    "DecodeContext",
    "DecodeError",
    "EncodeContext",
    "EncodeError",
    "HttpRequest",
    "HttpResponse",
    "OutboundRequest",
    "SendResult",
    "SignatureError",
    "available",
    "load",
]

GROUP = "babelhub.codecs"


def available() -> list[str]:
    """The channel names of every installed codec."""
    return sorted(ep.name for ep in entry_points(group=GROUP))


@cache
def load(channel: str) -> Codec:
    """The codec registered for `channel`; one shared instance (codecs hold no state)."""
    matches = entry_points(group=GROUP, name=channel)
    if not matches:
        raise LookupError(f"no codec for channel {channel!r}; installed: {', '.join(available()) or 'none'}")
    (entry_point,) = tuple(matches)[:1]
    codec_class = entry_point.load()
    if not (isinstance(codec_class, type) and issubclass(codec_class, Codec)):
        raise TypeError(f"entry point {entry_point.value!r} is not a babelhub Codec subclass")
    return codec_class()
