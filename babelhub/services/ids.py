"""Checks for ids the hub takes from subjects and payloads before it uses them as actor keys, KV keys
or subject tokens: a token that is not one of ours is refused (dead letter), never used."""

from __future__ import annotations

import re
from typing import Final

from babelhub import canonical

__all__ = ["CONVERSATION_ID_CHARS", "conversation_id_error", "is_conversation_id"]

CONVERSATION_ID_CHARS: Final = len(canonical.stable_id())
"""Conversation ids are `canonical.conversation_id` hashes: base32, lower case, this many characters."""

_CONVERSATION_ID: Final = re.compile(rf"[a-z2-7]{{{CONVERSATION_ID_CHARS}}}")


def is_conversation_id(token: str) -> bool:
    return _CONVERSATION_ID.fullmatch(token) is not None


def conversation_id_error(token: str) -> str:
    return (f"{token[:64]!r} is not a conversation id ({CONVERSATION_ID_CHARS} characters of a-z and 2-7, "
            "as canonical.conversation_id makes them)")
