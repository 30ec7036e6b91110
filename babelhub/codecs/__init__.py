"""Channel codecs: one module per channel behind the small `Codec` base class.

Codecs are found through the `babelhub.codecs` entry-point group, so a channel can ship as its own
package: `[project.entry-points."babelhub.codecs"] mychannel = "mypackage.codec:MyCodec"`.
"""

from __future__ import annotations

from functools import cache

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
from babelhub.entrypoints import installed, load_class
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
    return installed(GROUP)


@cache
def load(channel: str) -> Codec:
    """The codec registered for `channel`; one shared instance (codecs hold no state)."""
    # Codec is abstract, and only a concrete subclass is ever returned.
    return load_class(GROUP, channel, Codec, "codec for channel")()  # type: ignore[type-abstract]
