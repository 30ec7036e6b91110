"""Asterisk `chan_websocket` (Asterisk 20.16, 21.11, 22.6, 23.0 and later): a channel's media on a
WebSocket Asterisk opens to the hub, set up in `websocket_client.conf` (`connection_type =
per_call_config`, `uri = wss://<hub>/media/<connection>`) and dialled as `WebSocket/<client>/c(<codec>)`
or created with ARI `/channels/externalMedia?transport=websocket&encapsulation=none`.

Control messages are TEXT frames in one of two formats, chosen in `chan_websocket.conf` or per call with
the `f(json)` / `f(plain-text)` dial option: JSON objects (`{"event": "MEDIA_START", ...}`, Asterisk
20.18, 22.8, 23.2 and later) or the older single line (`MEDIA_START connection_id:... format:ulaw ...`).
Both are read; commands are sent in the format `MEDIA_START` arrived in.

Inbound, what maps to what:

* `MEDIA_START` → `Start`: `call_id` is the channel's unique id (`channel_id`; the `connection_id` on
  versions without it), `stream_id` the `connection_id`, `parameters` the `channel_variables` (JSON
  format only). `format` is the codec: `ulaw` and `alaw` (8 kHz), `slin` (8 kHz), `slin12`, `slin16`,
  `slin24`, `slin32` and `slin48` (16-bit linear, host byte order, i.e. little-endian on the machines
  Asterisk runs on). Passthrough
  codecs (opus, speex, g729), which chan_websocket neither re-frames nor acknowledges marks on, and codecs
  the hub cannot convert (g722, gsm, …) are refused with a `DecodeError` naming `format`.
* BINARY frames → `Audio`, raw media in that format, one `ptime` (20 ms) frame each; the media time is
  counted from the bytes (Asterisk sends none).
* `DTMF_END` → `Dtmf`; `MEDIA_MARK_PROCESSED` → `Played` (its `correlation_id` is the mark's name).
* `MEDIA_XOFF` / `MEDIA_XON` → `FlowControl` (paused / not), and `paused` says whether Asterisk asked
  the hub to stop sending (its queue of about 1000 frames is nearly full: what is sent then is dropped);
  the hub holds the call's outbound audio until `MEDIA_XON`. `STATUS`,
  `MEDIA_BUFFERING_COMPLETED`, `QUEUE_DRAINED`, `ERROR` (kept in `last_error`) and unknown events →
  nothing. Asterisk sends no hang-up event: it closes the socket when the channel hangs up.

Outbound: `send_audio` writes BINARY frames in the channel's format, padded with the codec's silence to
a whole number of `optimal_frame_size` frames (chan_websocket drops a partial frame) and cut below the
65500-byte message limit (a larger one closes the socket and hangs the call up). Asterisk re-times what
it receives, so the hub may send ahead up to the flow-control limit. `clear()` is `FLUSH_MEDIA`,
`mark(name)` is `MARK_MEDIA` with `name` as `correlation_id`, `hangup()` is `HANGUP`. With the
connection option `answer = true` (for channels dialled with the `n` option, which Asterisk does not
answer itself) the hub answers `MEDIA_START` with `ANSWER`.

Authentication: `websocket_client.conf`'s `username` and `password` make Asterisk send HTTP Basic
credentials on the opening request; `verify` checks them when the connection's secrets hold them. Without
them Asterisk proves nothing: restrict the endpoint by network (or client certificates at a proxy).

What chan_websocket cannot do: send DTMF to the channel, carry more than 128 bytes in a command (a longer
mark name is refused here with `EncodeError`, since Asterisk would silently ignore it), or give a hang-up
cause over the socket.

Sources: Asterisk documentation "WebSocket" channel driver (docs.asterisk.org/Configuration/Channel-Drivers/
WebSocket: media transfer, flow control, control commands and events in both formats, dial string
options), `configs/samples/websocket_client.conf.sample` (`username`, `password`) and
`channels/chan_websocket.c` (the exact plain-text event lines, `MAX_TEXT_MESSAGE_LEN`, the queue levels).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Final

import msgspec

from babelhub.audio.frame import AudioCodec, AudioFormat
from babelhub.codecs.base import HttpRequest
from babelhub.codecs.settings import ConnectionOptions, Settings
from babelhub.errors import DecodeError, EncodeError
from babelhub.media import support
from babelhub.media.base import Dtmf, FlowControl, MediaEvent, MediaSession, Played, Start, WsFrame

__all__ = ["AsteriskMedia", "AsteriskMediaOptions", "AsteriskMediaSecrets"]

CHANNEL: Final = "asterisk_media"
MAX_COMMAND_BYTES: Final = 128
"""chan_websocket ignores a TEXT message longer than this (`MAX_TEXT_MESSAGE_LEN`)."""
MAX_MEDIA_BYTES: Final = 65500
"""The largest BINARY message Asterisk reads; a larger one closes the socket and hangs the call up."""

#: Asterisk format names → the hub's codec and rate (the formats chan_websocket re-frames and the hub
#: converts). slin96 and slin192 are beyond the hub's 48 kHz; slin44 is left out because 20 ms of it is
#: 882 samples, which `AudioFormat.frame_bytes` (whole bytes a millisecond) cannot express.
FORMATS: Final[dict[str, tuple[AudioCodec, int]]] = {
    "ulaw": ("mulaw", 8000),
    "alaw": ("alaw", 8000),
    "slin": ("pcm16", 8000),
    "slin12": ("pcm16", 12000),
    "slin16": ("pcm16", 16000),
    "slin24": ("pcm16", 24000),
    "slin32": ("pcm16", 32000),
    "slin48": ("pcm16", 48000),
}


class AsteriskMediaSecrets(Settings, frozen=True, kw_only=True):
    """The HTTP Basic credentials of the `websocket_client.conf` connection (none: not checked)."""

    username: str = ""
    """`username` of the websocket_client.conf connection Asterisk opens the socket with."""
    password: str = ""
    """Its `password`."""


class AsteriskMediaOptions(ConnectionOptions, frozen=True, kw_only=True):
    answer: bool = False
    """Answer the channel (`ANSWER`) once `MEDIA_START` arrives: for channels dialled with the `n` option,
    which Asterisk does not answer itself."""


# --- wire format


class _Event(msgspec.Struct, frozen=True):
    """Any JSON control message: its kind only."""

    event: str = ""


class _MediaStart(msgspec.Struct, frozen=True):
    connection_id: str
    format: str
    optimal_frame_size: int
    channel: str = ""
    channel_id: str = ""
    """Absent from the plain-text line of the first releases."""
    ptime: int = 20
    channel_variables: dict[str, Any] = {}


class _DtmfEnd(msgspec.Struct, frozen=True):
    digit: str
    channel_id: str = ""


class _MarkProcessed(msgspec.Struct, frozen=True):
    correlation_id: str = ""
    channel_id: str = ""


class _Error(msgspec.Struct, frozen=True):
    error_text: str = ""


#: Events whose plain-text line is `EVENT key:value key:value …`.
_KEYED_LINES: Final = frozenset({"MEDIA_START", "DTMF_END", "STATUS"})
#: Events whose plain-text line is `EVENT [<correlation id>]`.
_ID_LINES: Final = frozenset({"MEDIA_MARK_PROCESSED", "MEDIA_BUFFERING_COMPLETED"})


class _Message(msgspec.Struct, frozen=True):
    """One control message, whichever its format: its event and parameters."""

    event: str
    fields: dict[str, Any]
    is_json: bool

    def read(self, struct: type[Any]) -> Any:
        """The parameters as `struct`; DecodeError naming the parameter (`$.name` in JSON, `EVENT.name`
        in plain text, where every value is text and numbers are read from it)."""
        try:
            return msgspec.convert(self.fields, struct, strict=self.is_json)
        except msgspec.ValidationError as exc:
            reason, _, where = str(exc).partition(" - at `")
            path = where.rstrip("`") or "$"
            raise DecodeError(reason, path if self.is_json else self.event + path[1:]) from None


def _parse(text: str) -> _Message:
    if not text.strip():
        raise DecodeError("an empty control message", "$")
    if text.lstrip().startswith("{"):
        return _parse_json(text)
    return _parse_line(text.strip())


def _parse_json(text: str) -> _Message:
    event = support.decode_frame(text, _Event).event
    return _Message(event=event, fields=support.decode_frame(text, dict[str, Any]), is_json=True)


def _parse_line(line: str) -> _Message:
    event, _, rest = line.partition(" ")
    rest = rest.strip()
    if event in _ID_LINES:
        return _Message(event=event, fields={"correlation_id": rest} if rest else {}, is_json=False)
    if event == "ERROR":  # `ERROR channel_id:<id> error_text:<free text>`
        return _Message(event=event, fields={"error_text": rest.partition("error_text:")[2]}, is_json=False)
    if event not in _KEYED_LINES:
        return _Message(event=event, fields={}, is_json=False)
    fields: dict[str, Any] = {}
    for pair in rest.split():
        name, colon, value = pair.partition(":")
        if not colon:
            raise DecodeError(f"{pair[:40]!r} is no name:value pair", event)
        fields[name] = value
    return _Message(event=event, fields=fields, is_json=False)


# --- the session


class AsteriskMedia(MediaSession):
    channel: ClassVar[str] = CHANNEL
    outbound_format: AudioFormat = AudioFormat(codec="mulaw", rate=8000, frame_ms=20)
    acknowledges_marks: ClassVar[bool] = True
    secret_settings: ClassVar[type[Settings]] = AsteriskMediaSecrets
    option_settings: ClassVar[type[Settings]] = AsteriskMediaOptions
    settings: AsteriskMediaOptions

    def __init__(self, secrets: Mapping[str, str], options: Mapping[str, Any]) -> None:
        super().__init__(secrets, options)
        self.paused = False
        """Asterisk sent MEDIA_XOFF and no MEDIA_XON since: audio sent now is likely dropped."""
        self.last_error = ""
        """The text of the last ERROR event (a command Asterisk refused)."""
        self._json_commands = False  # plain text until MEDIA_START says otherwise (Asterisk's default)
        self._frame_size = 0  # optimal_frame_size
        self._caller_audio = support.BinaryAudio()

    # ------------------------------------------------------------------------------- the handshake

    def verify(self, request: HttpRequest) -> None:
        """HTTP Basic credentials equal to the configured `username` and `password`, when configured."""
        support.check_basic_credentials(request, self.secrets.get("username", ""), self.secrets.get("password", ""))

    # --------------------------------------------------------------------------------- inbound

    def receive(self, frame: WsFrame) -> list[MediaEvent]:
        if isinstance(frame, bytes):
            return [self._caller_audio.read(frame, self.inbound_format, "the MEDIA_START event")]
        message = _parse(frame)
        if message.event == "MEDIA_START":
            return self._start(message)
        if message.event == "DTMF_END":
            return [_dtmf(message)]
        if message.event == "MEDIA_MARK_PROCESSED":
            name = message.read(_MarkProcessed).correlation_id
            return [Played(name=name)] if name else []  # a mark without an id is none of ours
        if message.event in ("MEDIA_XOFF", "MEDIA_XON"):
            self.paused = message.event == "MEDIA_XOFF"
            return [FlowControl(paused=self.paused)]
        if message.event == "ERROR":
            self.last_error = message.read(_Error).error_text
        return []  # STATUS, MEDIA_BUFFERING_COMPLETED, QUEUE_DRAINED and events Asterisk adds later

    def _start(self, message: _Message) -> list[MediaEvent]:
        if self.inbound_format is not None:
            return []  # one per socket; a repeat may not change the stream's format
        start: _MediaStart = message.read(_MediaStart)
        audio = _format(start, message)
        self._json_commands = message.is_json
        self._frame_size = start.optimal_frame_size
        self.inbound_format = audio
        self.outbound_format = audio  # the channel's format, both ways
        if self.settings.answer:
            self._replies.append(self._command("ANSWER"))
        variables = {name: support.parameter_text(value) for name, value in start.channel_variables.items()}
        return [Start(call_id=start.channel_id or start.connection_id, stream_id=start.connection_id,
                      inbound_format=audio, parameters=variables)]

    # -------------------------------------------------------------------------------- outbound

    def send_audio(self, payload: bytes) -> list[WsFrame]:
        """BINARY messages of whole frames, the last one padded with silence, none over 65500 bytes."""
        size = self._frame_size or self.outbound_format.frame_bytes()
        return list(support.packets(payload, self.outbound_format, size, MAX_MEDIA_BYTES // size * size))

    def clear(self) -> list[WsFrame]:
        return [self._command("FLUSH_MEDIA")]

    def mark(self, name: str) -> list[WsFrame]:
        if not name or name != name.strip():
            raise EncodeError("an Asterisk mark needs a name without leading or trailing spaces")
        command = self._command("MARK_MEDIA", correlation_id=name)
        if len(command.encode()) > MAX_COMMAND_BYTES:
            raise EncodeError(f"the mark name is too long: Asterisk ignores commands over {MAX_COMMAND_BYTES} bytes")
        return [command]

    def hangup(self, reason: str = "") -> list[WsFrame]:
        return [self._command("HANGUP")]

    def _command(self, command: str, correlation_id: str = "") -> str:
        """A command in the format the channel's events arrive in."""
        if self._json_commands:
            fields = {"command": command, **({"correlation_id": correlation_id} if correlation_id else {})}
            return support.text(fields)
        return f"{command} {correlation_id}" if correlation_id else command


def _format(start: _MediaStart, message: _Message) -> AudioFormat:
    where = "$.{}" if message.is_json else "MEDIA_START.{}"
    known = FORMATS.get(start.format)
    if known is None:
        raise DecodeError(f"format {start.format[:20]!r} is none the hub takes ({', '.join(FORMATS)}); dial the "
                          "channel with c(<one of them>)", where.format("format"))
    codec, rate = known
    if not 1 <= start.ptime <= 200:
        raise DecodeError(f"ptime must be 1-200 ms, not {start.ptime}", where.format("ptime"))
    if not 0 < start.optimal_frame_size <= MAX_MEDIA_BYTES:
        raise DecodeError(f"optimal_frame_size must be 1-{MAX_MEDIA_BYTES} bytes, not {start.optimal_frame_size}",
                          where.format("optimal_frame_size"))
    return AudioFormat(codec=codec, rate=rate, frame_ms=start.ptime)


def _dtmf(message: _Message) -> Dtmf:
    return support.dtmf_event(message.read(_DtmfEnd).digit, "$.digit" if message.is_json else "DTMF_END.digit")
