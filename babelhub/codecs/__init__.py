"""Channel codecs: one module per channel behind the small `Codec` base class.

Codecs are found through the `babelhub.codecs` entry-point group, so a channel can ship as its own
package: `[project.entry-points."babelhub.codecs"] mychannel = "mypackage.codec:MyCodec"`.

Every channel module uses the same names for the same roles:

* `from babelhub import canonical as c`; the channel's wire format is private msgspec Structs (`_Message`,
  `_User`, …) under a `# --- wire format` heading, so `_Message` is the channel's and `c.Message` the hub's.
* `_Decoder`: what every envelope decoded from one request (or entry, change, update) shares, with a
  function or method per kind of event; `_Encoder`: one canonical message turned into the channel's calls.
  (Messenger encodes in its codec class, whose methods the Instagram codec overrides; webchat, a plain
  pass-through, needs neither.)
* The shared toolkit is `native` (`from babelhub.codecs import native`): JSON and form reading, the
  canonical conversation and sender of a native chat and user (`native.conversation`, `native.sender`),
  keeping unmapped fields (`native.unmapped`, `native.extras`, `native.keep_unmapped`), dropping credentials
  from what is kept (`native.without`), and unreadable fragments (`native.unsupported`, `native.lenient_parts`).
  `meta_graph` holds Meta's webhook mechanics, `jwt` the RS256 bearer-token check, `markup` the text
  dialects, `degrade` the degradation rules, `settings` the kind of Struct a codec declares its
  connections' secrets and options in.
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
