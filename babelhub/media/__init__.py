"""Telephony media streams: one module per provider behind the small `MediaSession` base class.

Providers are found through the `babelhub.media` entry-point group, as channel codecs are through
`babelhub.codecs`; a connection whose `channel` names one takes calls at `WebSocket /media/{connection}`.
What the providers share (reading text and binary frames, base64 audio, DTMF keys, media time, Basic
credentials, the outbound JSON) is in `babelhub.media.support`, as `babelhub.codecs.native` is for codecs.
"""

from babelhub.media.base import (
    Audio,
    Dtmf,
    FlowControl,
    MediaEvent,
    MediaSession,
    Played,
    Start,
    Stop,
    Trouble,
    WsFrame,
)

__all__ = ["Audio", "Dtmf", "FlowControl", "MediaEvent", "MediaSession", "Played", "Start", "Stop", "Trouble",
           "WsFrame"]
