"""Masking configured secret values wherever text or bytes leave the hub (records, logs, statuses).

Secrets are masked by value, so a token is caught in whatever carries it: a URL path (the Telegram Bot
API puts the bot token there), an exception's repr, an error body a channel echoed back. The URL-encoded
and JSON-escaped forms of each value are masked too. Values shorter than `MIN_SECRET_LENGTH` are not
masked (they would mangle ordinary text, and are too short to be secrets worth the name).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import lru_cache
from urllib.parse import quote, quote_plus

__all__ = ["MASK", "MIN_SECRET_LENGTH", "SecretMask", "mask_of"]

MASK = "***"
MIN_SECRET_LENGTH = 8


class SecretMask:
    """Replaces every occurrence of the given secret values with `MASK`; `learn` adds more while the hub
    runs (the secrets of connections made over the API), seen at once by everything holding this mask."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.values: frozenset[str] = frozenset()
        self._text: re.Pattern[str] | None = None
        self._bytes: re.Pattern[bytes] | None = None
        self.learn(secrets)

    def learn(self, secrets: Iterable[str]) -> None:
        """Mask `secrets` too from now on."""
        forms: set[str] = set()
        for secret in secrets:
            if isinstance(secret, str) and len(secret) >= MIN_SECRET_LENGTH:
                forms.update({secret, quote(secret, safe=""), quote(secret), quote_plus(secret),
                              json.dumps(secret)[1:-1]})
        if forms <= self.values:
            return
        self.values = self.values | forms
        # Longest first, so a secret that contains another is masked whole.
        ordered = sorted(self.values, key=len, reverse=True)
        self._text, self._bytes = (re.compile("|".join(map(re.escape, ordered))),
                                   re.compile(b"|".join(re.escape(form.encode()) for form in ordered)))

    def __bool__(self) -> bool:
        return self._text is not None

    def text(self, value: str) -> str:
        return value if self._text is None else self._text.sub(MASK, value)

    def data(self, value: bytes) -> bytes:
        return value if self._bytes is None else self._bytes.sub(MASK.encode(), value)

    def found_in(self, value: str) -> bool:
        return self._text is not None and self._text.search(value) is not None


@lru_cache(maxsize=1024)
def mask_of(secrets: tuple[str, ...]) -> SecretMask:
    """The mask of one connection's secrets, made once: codecs redact every request they store with it."""
    return SecretMask(secrets)
