"""What a read-modify-write of a KV key last saw, so that the next one of the same key skips its read.

The records keeper updates a conversation's index record and its sender's contact at every message, each
a read and then a revision-checked write. The value and revision this process last read or wrote of a key
stand for that read: when another writer changed the key since (another hub process, an erase, a link),
the write's revision check fails, and the caller forgets what it kept and reads again. Bounded: the least
recently used key goes first.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final, Generic, TypeVar

__all__ = ["REMEMBERED_KEYS", "Revisions"]

T = TypeVar("T")

REMEMBERED_KEYS: Final = 4096
"""Keys remembered by default (0: none, every write reads first)."""


class Revisions(Generic[T]):
    def __init__(self, size: int = REMEMBERED_KEYS) -> None:
        self._entries: OrderedDict[str, tuple[T, int]] = OrderedDict()
        self._size = size

    def get(self, key: str) -> tuple[T, int] | None:
        """The value and revision last seen of `key`; None when none is kept."""
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def seen(self, key: str, value: T, revision: int) -> None:
        self._entries[key] = (value, revision)
        self._entries.move_to_end(key)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def forget(self, key: str) -> None:
        self._entries.pop(key, None)
