"""Extensions found by name: codecs, processor transports and inbound sources are classes registered
under an entry-point group (`babelhub.codecs`, `babelhub.transports`, `babelhub.sources`), so one can
live in this repository or ship as a package of its own, and the config chooses it by name."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import TypeVar

__all__ = ["installed", "load_class"]

T = TypeVar("T")


def installed(group: str) -> list[str]:
    """The names registered under `group`, sorted."""
    return sorted({entry_point.name for entry_point in entry_points(group=group)})


def load_class(group: str, name: str, base: type[T], what: str) -> type[T]:
    """The class registered as `name` under `group`; LookupError naming what is installed when there is
    none, TypeError when it is not a `base` (`what` says what was looked for, in both messages)."""
    matches = tuple(entry_points(group=group, name=name))
    if not matches:
        raise LookupError(f"no {what} {name!r}; installed: {', '.join(installed(group)) or 'none'}")
    registered = matches[0].load()
    if not (isinstance(registered, type) and issubclass(registered, base)):
        raise TypeError(f"entry point {matches[0].value!r} is not a {base.__name__} subclass")
    return registered
