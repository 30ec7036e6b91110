"""What the media provider tests share, so that each `tests/test_media_<provider>.py` holds only its
provider's cases: reading a provider's fixtures, tones to stream and the measures that find them again
in decoded audio, the shape of documented JSON, and the hostile variants of documented messages (every
member replaced by other JSON) with the one outcome allowed for them."""

from __future__ import annotations

import base64
import itertools
import json
import math
import struct
from typing import Any, get_args

import pytest
from hypothesis import strategies as st

from babelhub.codecs.base import HttpRequest
from babelhub.errors import DecodeError
from babelhub.media import MediaEvent, MediaSession, WsFrame
from tests.codeckit import Fixtures
from tests.strategies import json_values

__all__ = [
    "REPLACEMENTS",
    "MediaFixtures",
    "basic",
    "changed",
    "crossings",
    "goertzel",
    "members",
    "mutated",
    "opening",
    "pcm",
    "reads_or_refuses",
    "refusal_path",
    "replaced",
    "same_shape",
    "samples_of",
    "tone",
    "tone_samples",
    "tone_strength",
]


class MediaFixtures(Fixtures):
    """One provider's fixture folder, `tests/fixtures/<channel>/`, with frames read as the text the
    provider sends."""

    def text(self, name: str) -> str:
        return self.path(name).read_text("utf-8")

    def inbound(self) -> list[str]:
        """The names of the JSON fixtures the provider sends (those not named `out_…`), sorted."""
        return sorted(path.name for path in self.folder.glob("*.json") if not path.name.startswith("out_"))


# ------------------------------------------------------------------------------------------ tones


def tone_samples(hz: float, rate: int, ms: int, amplitude: int = 8000) -> list[int]:
    """`ms` milliseconds of a sine of `hz` at `rate` samples a second, as 16-bit sample values."""
    return [int(amplitude * math.sin(2 * math.pi * hz * n / rate)) for n in range(rate * ms // 1000)]


def tone(hz: float, rate: int, ms: int, amplitude: int = 8000) -> bytes:
    """The same tone as 16-bit little-endian PCM (the hub's `pcm16`)."""
    return pcm(tone_samples(hz, rate, ms, amplitude))


def pcm(samples: list[int]) -> bytes:
    """16-bit sample values as little-endian PCM."""
    return struct.pack(f"<{len(samples)}h", *samples)


def samples_of(linear: bytes) -> list[int]:
    """The 16-bit sample values of little-endian PCM (a trailing odd byte left out)."""
    return list(struct.unpack(f"<{len(linear) // 2}h", linear[: len(linear) - len(linear) % 2]))


def crossings(linear: bytes) -> int:
    """How often 16-bit little-endian `linear` changes sign (twice a period for a tone)."""
    return sum(1 for a, b in itertools.pairwise(samples_of(linear)) if (a < 0) != (b < 0))


def goertzel(linear: bytes, rate: int, hz: float) -> float:
    """The strength of `hz` in 16-bit little-endian samples (normalised DFT magnitude at one frequency)."""
    samples = samples_of(linear)
    real = sum(s * math.cos(2 * math.pi * hz * n / rate) for n, s in enumerate(samples))
    imaginary = sum(s * math.sin(2 * math.pi * hz * n / rate) for n, s in enumerate(samples))
    return math.hypot(real, imaginary) / len(samples)


def tone_strength(linear: bytes, rate: int, hz: float = 400) -> tuple[float, float]:
    """The RMS of 16-bit little-endian `linear`, and the share of it a sine of `hz` explains (1.0: all)."""
    samples = samples_of(linear)
    sine = [math.sin(2 * math.pi * hz * n / rate) for n in range(len(samples))]
    rms = math.sqrt(sum(s * s for s in samples) / len(samples))
    correlation = sum(s * w for s, w in zip(samples, sine, strict=True)) / len(samples)
    return rms, correlation / (rms / math.sqrt(2))


# ----------------------------------------------------------------------------------- JSON shapes


def same_shape(ours: Any, documented: Any) -> bool:
    """Whether two JSON values have the same members at every level (values aside)."""
    if isinstance(documented, dict):
        return isinstance(ours, dict) and ours.keys() == documented.keys() and all(
            same_shape(ours[key], value) for key, value in documented.items())
    return type(ours) is type(documented)


# ------------------------------------------------------------------------------ hostile messages


def members(value: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """The path of every member of a JSON value, itself included."""
    found = [path]
    if isinstance(value, dict):
        for key, inner in value.items():
            found += members(inner, (*path, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found += members(inner, (*path, index))
    return found


def replaced(value: Any, path: tuple[str | int, ...], new: Any) -> Any:
    """A copy of the JSON `value` with the member at `path` replaced by `new`."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[head] = replaced(value[head], rest, new)  # type: ignore[index]
    return copy


REPLACEMENTS = st.one_of(st.text(max_size=12), st.integers(-10, 10**6), st.none(), st.booleans(), json_values)
"""Scalars as often as containers: the fields of these messages are mostly strings and numbers."""


def mutated(data: st.DataObject, message: Any, new: st.SearchStrategy[Any] = json_values) -> str:
    """`message` (decoded JSON) as a frame, with one member drawn from it replaced by a value of `new`."""
    path = data.draw(st.sampled_from(members(message)))
    return json.dumps(replaced(message, path, data.draw(new)))


def reads_or_refuses(session: MediaSession, frame: WsFrame) -> None:
    """What a provider may do with any frame: read it into events, or raise `DecodeError` naming where
    (a JSON path, or a plain-text line's `EVENT.field`)."""
    try:
        events = session.receive(frame)
    except DecodeError as error:
        assert error.path.startswith("$") or error.path.split(".")[0].isupper()
        return
    assert all(isinstance(event, get_args(MediaEvent)) for event in events)


def changed(message: Any, at: tuple[str, ...], **fields: Any) -> str:
    """`message` (decoded JSON, left as it is) as a frame, with `fields` set in its member at `at`."""
    copy = json.loads(json.dumps(message))
    member = copy
    for key in at:
        member = member[key]
    member |= fields
    return json.dumps(copy)


def refusal_path(session: MediaSession, frame: WsFrame) -> str:
    """The path of the `DecodeError` that `session` raises for `frame` (fails when it reads it)."""
    with pytest.raises(DecodeError) as caught:
        session.receive(frame)
    return caught.value.path


def basic(user: str, password: str) -> str:
    """An `Authorization` header of HTTP Basic credentials."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def opening(path: str, url: str = "", received_at: float = 0.0, **headers: str | None) -> HttpRequest:
    """The provider's WebSocket opening request (a GET) for `path`, with `headers` (`x_api_key` is sent as
    `x-api-key`; one given as None is left out)."""
    given = {name.replace("_", "-"): value for name, value in headers.items() if value is not None}
    return HttpRequest(method="GET", path=path, headers={"upgrade": "websocket", **given}, url=url,
                       received_at=received_at)
