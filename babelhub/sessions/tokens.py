"""Web chat session ids and the resume tokens that prove a browser was given its id.

The hub issues every session id. With it the browser gets a token, an HMAC-SHA256 of the tenant,
connection and session id under the connection's session key; to resume, it presents both. Knowing a
session id (from a log line, a screenshot, a shared link) is therefore not enough to read it, and the
hub keeps no per-session state to check a token.

The key is the connection's `session_key` secret when configured; otherwise a random key made once
and kept in the `<prefix>_webchat` KV bucket, so every hub process on the same NATS shares it and
sessions survive restarts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import secrets

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import (
    BadRequestError,
    KeyWrongLastSequenceError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)

from babelhub.services.broker import Subjects
from babelhub.services.publisher import STORE_RETRY_MAX_PAUSE, STORE_RETRY_PAUSE, STORE_TRIES

__all__ = ["SessionSigner", "load_session_key", "well_formed"]

_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_MAX_LENGTH = 64


def well_formed(value: str) -> bool:
    """Session ids and tokens are URL-safe base64 text of bounded length (they end up in subjects)."""
    return 0 < len(value) <= _MAX_LENGTH and set(value) <= _ALPHABET


class SessionSigner:
    def __init__(self, key: bytes, tenant: str, connection: str) -> None:
        self._key = key
        self._scope = f"{tenant}/{connection}/"

    def new_session(self) -> tuple[str, str]:
        """A fresh session id (128 random bits) and its token."""
        session = secrets.token_urlsafe(16)
        return session, self.token(session)

    def token(self, session: str) -> str:
        digest = hmac.new(self._key, (self._scope + session).encode("utf-8"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def valid(self, session: str, token: str) -> bool:
        return hmac.compare_digest(self.token(session).encode("ascii"), token.encode("utf-8"))


async def load_session_key(js: JetStreamContext, subjects: Subjects, connection: str, role: str = "webchat",
                           replicas: int = 1) -> bytes:
    """The connection's random session key from KV (bucket `<prefix>_<role>`, `replicas` copies, key
    `connection`), made on first use. When several hub processes start at once, the first write wins and
    the others read it. On a cluster a bucket just made answers once its stream is reachable from this
    client's server, and a lookup or a write may go unanswered while a leader is elected or the meta
    leader is busy with other processes' streams: tried again, a few times (a write that landed
    unanswered is then read back, as another process's would be)."""
    bucket = subjects.bucket(role)
    for attempt in range(1, STORE_TRIES + 1):
        try:
            try:
                kv = await js.key_value(bucket)
            except (NotFoundError, BadRequestError):
                kv = await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, replicas=replicas))
            with contextlib.suppress(KeyWrongLastSequenceError):  # made before, by this process or another
                await kv.create(connection, secrets.token_bytes(32))
            entry = await kv.get(connection)
            break
        except (nats.errors.TimeoutError, NoStreamResponseError, ServiceUnavailableError):
            if attempt == STORE_TRIES:
                raise
            await asyncio.sleep(min(STORE_RETRY_MAX_PAUSE, STORE_RETRY_PAUSE * 2 ** (attempt - 1)))
    if not entry.value:
        raise RuntimeError(f"the session key of connection {connection!r} in KV bucket {bucket} is empty")
    return entry.value
