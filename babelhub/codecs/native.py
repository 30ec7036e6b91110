"""Helpers every codec needs for reading native payloads and API answers and for building requests,
so that each codec module holds only what is particular to its channel."""

from __future__ import annotations

import gc
import hmac
import json
import math
import mimetypes
import re
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any, Final, Protocol, TypeVar

import msgspec

from babelhub import canonical as c
from babelhub.codecs.base import EncodeContext, HttpRequest, HttpResponse, SendResult
from babelhub.errors import DecodeError, EncodeError

__all__ = [
    "ErrorRule",
    "Scope",
    "clip",
    "conversation",
    "convert",
    "convert_parts",
    "extras",
    "finite",
    "from_unix",
    "http_failure",
    "json_body",
    "json_value",
    "keep_unmapped",
    "lenient_parts",
    "list_field",
    "media_kind",
    "native_id",
    "parse_form",
    "parse_time",
    "read_json",
    "required_option",
    "required_secret",
    "retry_after",
    "same_secret",
    "sender",
    "str_field",
    "unmapped",
    "unsupported",
    "well_formed",
    "without",
    "without_collector",
]

T = TypeVar("T")


class ErrorRule(msgspec.Struct, frozen=True):
    """What a channel's error code means: whether sending again later can succeed, and in words an
    operator can act on. Codecs keep a table `{code: ErrorRule(...)}` from the channel's error list."""

    retryable: bool
    meaning: str

_encoder = msgspec.json.Encoder()


def read_json(request: HttpRequest | HttpResponse) -> Any:
    """The body as JSON, or a DecodeError at `$`."""
    return json_value(request.body)


def json_value(text: bytes | str, path: str = "$", what: str = "body") -> Any:
    """`text` (a body, or JSON carried in a field at `path`) as JSON, or a DecodeError at `path` saying
    that `what` is no JSON or nests deeper than msgspec reads (it stops at Python's recursion limit with a
    RecursionError, which would otherwise escape as a crash)."""
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise DecodeError(f"{what} is not valid JSON: {exc}", path=path) from None
    except RecursionError:
        raise DecodeError(f"{what} is nested too deeply to read", path=path) from None


def without_collector(read: Callable[[], T]) -> T:
    """`read()`, a codec's `dedup_key` or `decode` of one body, with the cyclic garbage collector held
    off (the hub calls codecs so, through `ConnectionService`).

    A body of tiny JSON objects and arrays (a few hundred KB of `{}` and `[]`) makes some 100,000
    containers at once. Every 700 of them would start a collection, some of which walk every object of
    the process, and each collection after the tree is built walks it again. Held off for the whole
    call, the tree is freed before the collector runs again and it never sees it: on a 370 KB body of
    nested containers, `dedup_key` + `decode` took 47 ms instead of 250. A `DecodeError` leaves without
    its traceback and context, whose frames would keep the tree alive (its path says where the input is
    wrong).
    Codecs are pure and run on the event loop's thread, so nothing else runs meanwhile; a collector that
    was already off stays off."""
    if not gc.isenabled():
        return read()
    gc.disable()
    try:
        return read()
    except DecodeError as exc:
        exc.__context__ = None  # an exception it was raised from holds frames too
        raise exc.with_traceback(None)  # noqa: B904 - the same exception, without the codec's frames
    finally:
        gc.enable()


def convert(value: Any, into: type[T], path: str = "$") -> T:
    """`value` (decoded JSON) as the typed native Struct `into`; a DecodeError names the path."""
    try:
        return msgspec.convert(value, into, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        marker = " - at `$"
        if marker in text:
            reason, _, rest = text.partition(marker)
            return_path = path + rest.rstrip("`")
            raise DecodeError(reason, path=return_path) from None
        raise DecodeError(text, path=path) from None


# ---------------------------------------------------------------------------------------- forms

MAX_FORM_FIELDS: Final = 1_000
"""Fields an `application/x-www-form-urlencoded` body may hold: the channels that post forms send a few
dozen (Twilio's largest webhook, ten media, has under a hundred); more is an attack on the time spent
reading them."""

_STRAY_PERCENT: Final = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def parse_form(body: bytes, *, strict: bool = False) -> tuple[tuple[str, str], ...]:
    """The (name, value) fields of a form body, as `urllib.parse.parse_qsl(body.decode(),
    keep_blank_values=True, strict_parsing=strict)` reads them, in a fraction of its time: a body of
    several hundred KB of percent escapes (JSON in a form field) takes `parse_qsl` a Python step per
    escape. Read once per body (the last few are kept: dedup, verify and decode all read the same one).
    A DecodeError at `$` when the body is not UTF-8, holds more than `MAX_FORM_FIELDS` fields, or (with
    `strict`) has a field without `=` or an empty one."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"form body is not UTF-8: {exc}", path="$") from None
    if body.count(b"&") >= MAX_FORM_FIELDS:
        raise DecodeError(f"form body holds more than {MAX_FORM_FIELDS} fields", path="$")
    return _form_fields(body, strict)


@lru_cache(maxsize=4)
def _form_fields(body: bytes, strict: bool) -> tuple[tuple[str, str], ...]:
    fields: list[tuple[str, str]] = []
    for field in body.split(b"&") if body else []:
        name, equals, value = field.partition(b"=")
        if strict and not equals:
            shown = field[:40].decode("utf-8", "replace")
            raise DecodeError(f"body is not an application/x-www-form-urlencoded form: field {shown!r} has no '='",
                              path="$")
        if field:
            fields.append((_form_text(name), _form_text(value)))
    return tuple(fields)


def _form_text(encoded: bytes) -> str:
    """One name or value of a form: `+` is a space, `%XX` a byte, and the bytes are UTF-8 (an invalid
    sequence becomes U+FFFD, as with `urllib.parse.unquote`)."""
    encoded = encoded.replace(b"+", b" ")
    if b"%" in encoded:
        # `%XX` as the `\xXX` escapes the unicode_escape codec decodes in C; a `%` that starts no escape
        # stands for itself, and a backslash that is in the text is escaped first.
        escaped = _STRAY_PERCENT.sub(b"%25", encoded).replace(b"\\", b"\\\\").replace(b"%", b"\\x")
        encoded = escaped.decode("unicode_escape").encode("latin-1")
    return encoded.decode("utf-8", "replace")


# ------------------------------------------------------------------------------ lenient decoding
#
# Decoding is lenient per part: one native field the hub cannot read becomes an `Unsupported` part with
# the reason and the fragment, and the rest of the message (its text, caption, sender) still arrives.
# Only an envelope that cannot be read as a whole (no id, no chat, a body that is no JSON) is a
# DecodeError. Codecs read each part through `lenient_parts`, and convert whole messages whose content
# objects are typed fields through `convert_parts`.

#: What reading a malformed fragment raises: DecodeError (a ValueError) from `convert`, `finite` and
#: `from_unix`, and the lookup and arithmetic errors of a fragment of an unexpected shape.
_UNREADABLE: Final = (ValueError, KeyError, IndexError, TypeError, AttributeError, OverflowError)

_FIELD_OF_PATH: Final = re.compile(r"^\$\.([^.\[]+)")
_LONE_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def unsupported(reason: str, fragment: Any) -> c.Unsupported:
    """An `Unsupported` part keeping `fragment` verbatim, as the JSON it reads back as (a typed native
    Struct becomes the object it was read from, a NaN null), so that the part survives canonical JSON;
    a fragment JSON cannot hold at all (lone surrogates) is kept as its repr."""
    try:
        plain = msgspec.json.decode(_encoder.encode(fragment))
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
        plain = well_formed(repr(fragment))
    return c.Unsupported(reason=well_formed(reason), native=plain)


def lenient_parts(build: Callable[[], c.Part | list[c.Part]], fragment: Any, what: str) -> list[c.Part]:
    """The parts `build` reads from one native fragment (`what`, e.g. "whatsapp location"); when the
    fragment cannot be read, one `Unsupported` part with the reason and the fragment instead."""
    try:
        built = build()
    except _UNREADABLE as exc:
        return [unsupported(f"{what} unreadable: {_reason(exc)}", fragment)]
    parts = built if isinstance(built, list) else [built]
    if not all(_portable(part) for part in parts):
        # e.g. a NaN or a lone surrogate read from JSON that a payload carries as a string
        return [unsupported(f"{what} holds values canonical JSON cannot carry", fragment)]
    return parts


_part_decoder: Final = msgspec.json.Decoder(c.Part)


def _portable(part: c.Part) -> bool:
    """Whether `part` reads back from canonical JSON as it is."""
    try:
        return bool(_part_decoder.decode(_encoder.encode(part)) == part)
    except (msgspec.DecodeError, UnicodeEncodeError, OverflowError, TypeError, ValueError):
        return False


def convert_parts(
    value: Any, into: type[T], path: str, part_fields: Collection[str], what: str
) -> tuple[T, dict[str, Any], list[c.Part]]:
    """`value` (a message object) as the Struct `into`, leniently: a member named in `part_fields` (the
    content objects, by their JSON names) that does not fit its type is left out and becomes an
    `Unsupported` part, so that the message still decodes. Returns the Struct, `value` without the left
    out members, and their parts; an error outside `part_fields` is a DecodeError as with `convert`."""
    if not isinstance(value, Mapping):
        return convert(value, into, path), {}, []  # the DecodeError that says what was expected
    readable = dict(value)
    parts: list[c.Part] = []
    for _ in range(len(part_fields) + 1):
        try:
            return msgspec.convert(readable, into, strict=False), readable, parts
        except msgspec.ValidationError as exc:
            field = _failed_field(str(exc))
            if field not in part_fields or field not in readable:
                break
            parts.append(unsupported(f"{what} {field!r} unreadable: {_validation_reason(str(exc), path)}",
                                     {field: readable.pop(field)}))
    return convert(readable, into, path), readable, parts


def _failed_field(message: str) -> str:
    """The top-level member a msgspec ValidationError points at (`... - at `$.location.latitude``)."""
    _, _, where = message.partition(" - at `")
    found = _FIELD_OF_PATH.match(where.rstrip("`"))
    return found.group(1) if found else ""


def _validation_reason(message: str, path: str) -> str:
    reason, _, where = message.partition(" - at `$")
    return f"{reason} (at {path}{where.rstrip('`')})" if where else reason


def _reason(exc: BaseException) -> str:
    if isinstance(exc, DecodeError):
        return f"{exc.reason} (at {exc.path})"
    return f"{type(exc).__name__}: {exc}"


def well_formed(text: str) -> str:
    """`text` with lone surrogates (which no UTF-8 encoder takes) replaced by U+FFFD."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def json_body(value: Any) -> bytes:
    """Compact JSON for a request body (msgspec Structs and plain values alike)."""
    return _encoder.encode(value)


def from_unix(seconds: float, path: str = "$") -> datetime:
    """A Unix time as an aware UTC datetime; a DecodeError at `path` when it is no real time."""
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, ValueError, OSError, TypeError) as exc:
        raise DecodeError(f"not a usable Unix time: {seconds!r} ({exc})", path=path) from None


def parse_time(value: str, path: str = "$") -> datetime:
    """An ISO 8601 / RFC 3339 timestamp as an aware UTC datetime. Channels that leave out the offset
    mean UTC; canonical timestamps always carry one."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (TypeError, ValueError):
        raise DecodeError(f"not an ISO 8601 timestamp: {value!r}", path=path) from None
    except OverflowError:  # at the edge of the calendar, the offset moves it out of range
        raise DecodeError(f"timestamp {value!r} is out of range", path=path) from None


def finite(value: float, path: str = "$") -> float:
    """`value` if it is a finite number (JSON cannot carry NaN or infinity), else a DecodeError."""
    if not math.isfinite(value):
        raise DecodeError(f"not a finite number: {value!r}", path=path)
    return value


def retry_after(headers: dict[str, str]) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), if there is one."""
    value = headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def http_failure(response: HttpResponse, code: str = "", message: str = "", native: Any = None) -> SendResult:
    """A failed API call: 408, 429 and 5xx may succeed later; other 4xx will not."""
    if native is None:
        try:
            native = json.loads(response.body) if response.body else None
        except ValueError:
            native = response.body.decode("utf-8", "replace")
    retryable = response.status in (408, 425, 429) or response.status >= 500
    return SendResult(
        ok=False,
        retryable=retryable,
        retry_after=retry_after(response.headers),
        error=c.Error(code=code or f"http_{response.status}", message=message, retryable=retryable, native=native),
    )


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison, false when no secret is configured."""
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


# ------------------------------------------------------------------------- reading native payloads


def str_field(raw: Mapping[str, Any], key: str) -> str:
    """`raw[key]` when it is a string, else "": for payloads read as plain JSON, not as a Struct."""
    value = raw.get(key)
    return value if isinstance(value, str) else ""


def list_field(raw: Mapping[str, Any], key: str) -> list[Any]:
    """`raw[key]` when it is a list, else an empty one."""
    value = raw.get(key)
    return value if isinstance(value, list) else []


# ---------------------------------------------------------------------- keeping what is not mapped
#
# A native field that no canonical field takes is kept, so that an application can still read it: in
# `meta` under the channel's namespace, or in an `Unsupported` part. Credentials a payload carries are
# dropped before any of it is kept.


def unmapped(raw: Any, mapped: Collection[str]) -> dict[str, Any]:
    """The members of a native object (`raw`, decoded JSON) that `mapped` does not name: what no
    canonical field took. Nothing when `raw` is no object."""
    if not isinstance(raw, Mapping):
        return {}
    return {name: value for name, value in raw.items() if name not in mapped}


def extras(namespace: str, raw: Any, mapped: Collection[str]) -> dict[str, Any]:
    """The unmapped members of `raw`, each as a `meta` key of its own in `namespace` (the channel):
    `{"<namespace>.<member>": value}`."""
    return {f"{namespace}.{name}": value for name, value in unmapped(raw, mapped).items()}


def keep_unmapped(meta: dict[str, Any], key: str, raw: Any, mapped: Collection[str]) -> None:
    """Keep the unmapped members of `raw` together under `meta[key]` (`"whatsapp.location"`: the fields
    of a location that its canonical part has no room for); nothing is added when every member was mapped."""
    rest = unmapped(raw, mapped)
    if rest:
        meta[key] = rest


def without(raw: Any, names: Collection[str]) -> Any:
    """`raw` without the members `names` names (the credentials a payload carries, such as Slack's
    legacy verification `token`), to be kept in an envelope; anything but an object as it is."""
    if not isinstance(raw, Mapping):
        return raw
    return unmapped(raw, names)


# ------------------------------------------------------------------------- building envelopes


class Scope(Protocol):
    """Whose connection an envelope is decoded for: the `DecodeContext`, or a codec's decoder that
    carries its tenant and connection."""

    @property
    def tenant(self) -> str: ...

    @property
    def connection(self) -> str: ...


def conversation(
    scope: Scope, channel: str, native_id: str, kind: c.ConversationType = "direct"
) -> c.Conversation:
    """The conversation of the channel's chat `native_id` on `scope`'s connection. Its id is derived from
    tenant, connection and chat, so every envelope of that chat, and a replay, lands in the same one."""
    return c.Conversation(
        id=c.conversation_id(scope.tenant, scope.connection, native_id),
        channel=channel,
        connection=scope.connection,
        native_id=native_id,
        type=kind,
    )


def sender(scope: Scope, native_id: str, *, name: str = "", role: c.Role = "user", handle: str = "") -> c.Sender:
    """The sender who is `native_id` on the channel (a user id, phone number or page id), with the hub's
    id for that person on `scope`'s connection, so that the same person is one sender in every envelope."""
    return c.Sender(
        id=c.sender_id(scope.tenant, scope.connection, native_id),
        native_id=native_id,
        name=name,
        role=role,
        handle=handle,
    )


_MEDIA_KINDS: Final[dict[str, c.MediaKind]] = {"image": "image", "video": "video", "audio": "audio"}


def media_kind(mime: str, filename: str = "") -> c.MediaKind:
    """The media kind a MIME type names, by its major part (`image/*`, `video/*`, `audio/*`, in any
    case, as MIME types are case-insensitive); anything else (PDFs, vCards, archives) is a document.
    Without a MIME type it is guessed from `filename`. Kinds a channel marks in its own way (a voice
    note, a sticker) are the codec's to set."""
    mime = mime or mimetypes.guess_type(filename)[0] or ""
    return _MEDIA_KINDS.get(mime.partition("/")[0].lower(), "document")


# ---------------------------------------------------------------------------------- encoding


_ELLIPSIS: Final = "\u2026"


def clip(text: str, limit: int) -> str:
    """`text` within `limit` characters, the last one an ellipsis when it was cut: for labels and
    titles, which channels refuse whole when they are too long."""
    return text if len(text) <= limit else text[: limit - 1] + _ELLIPSIS


def native_id(ctx: EncodeContext, canonical_id: str, what: str, channel: str) -> str:
    """The channel's own id for the canonical message `canonical_id`, as the hub recorded it when the
    message was sent or received. Replies, reactions, edits and deletes must name the channel's
    message; when the hub knows none, the EncodeError says which part of the message (`what`: "reply_to",
    "reaction target") pointed at it. Splitting the id ("chat:message") is the codec's business."""
    found = ctx.native_ids.get(canonical_id, "")
    if not found:
        raise EncodeError(f"the {channel} message id of {what} {canonical_id!r} is unknown")
    return found


def required_secret(secrets: Mapping[str, str], name: str, channel: str, hint: str = "") -> str:
    """A secret the connection cannot send without; when it is not configured, an EncodeError names
    it (and what it is, from `hint`), so that an operator knows what to set."""
    return _required(secrets, name, f"{channel} connection has no {name!r} secret", hint)


def required_option(options: Mapping[str, Any], name: str, channel: str) -> str:
    """An option the connection cannot send without, as a string; when it is not set, an EncodeError
    names it."""
    return _required(options, name, f"{channel} connection has no {name!r} option")


def _required(settings: Mapping[str, Any], name: str, complaint: str, hint: str = "") -> str:
    value = settings.get(name)
    if not value:
        raise EncodeError(f"{complaint} ({hint})" if hint else complaint)
    return str(value)
