"""Who a client session is: a tenant API key, or a session token issued by `POST /v1/sessions`.

An API key (`babelhub.services.apikeys`) may read and send in every conversation of its tenant, as its
scopes allow. A session
token is the short-lived, narrower credential a backend hands to a browser: signed claims (tenant,
conversations, rights, expiry) under a key the hub keeps in the `<prefix>_clients` KV bucket, so every
hub process on the same NATS accepts it and the hub keeps no state per token. A token is
`v1.<claims>.<signature>`: the claims as URL-safe base64 of JSON, the signature an HMAC-SHA256 of
`v1.<claims>` (URL-safe base64).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Final, Literal

import msgspec

from babelhub.sessions.frames import ConversationId, ConversationIds, decode_json

__all__ = ["DEFAULT_TOKEN_TTL", "MAX_TOKEN_TTL", "Credential", "IssuedToken", "Refused", "SessionRequest",
           "SessionTokens", "read_request"]

Right = Literal["read", "send"]
MAX_TOKEN_TTL: Final = 3600
"""The longest a session token lives, in seconds: a leaked one is useful for at most an hour."""
DEFAULT_TOKEN_TTL: Final = 600
_VERSION: Final = "v1"
_MAX_TOKEN_LENGTH: Final = 4096


class Refused(Exception):
    """A credential the hub does not accept; the message says why (it never repeats the credential)."""


@dataclass(frozen=True)
class Credential:
    tenant: str
    rights: frozenset[str]
    conversations: frozenset[str] | None = None
    """The conversations it may use; None: every conversation of the tenant (an API key)."""

    def may(self, right: Right, conversation: str) -> bool:
        in_scope = self.conversations is None or conversation in self.conversations
        return in_scope and right in self.rights


class SessionRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The body of `POST /v1/sessions`."""

    conversations: ConversationIds
    rights: Annotated[list[Right], msgspec.Meta(min_length=1, max_length=2)] = msgspec.field(
        default_factory=lambda: ["read"])
    ttl_seconds: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKEN_TTL)] = DEFAULT_TOKEN_TTL


class IssuedToken(msgspec.Struct, frozen=True, kw_only=True):
    """The answer of `POST /v1/sessions`."""

    token: str
    expires_at: str
    tenant: str
    conversations: list[str]
    rights: list[Right]


_requests = msgspec.json.Decoder(SessionRequest)


def read_request(body: bytes) -> SessionRequest:
    """The request body; `DecodeError` with the JSON path of what is wrong."""
    request: SessionRequest = decode_json(_requests, body)
    return request


class _Claims(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tenant: str
    conversations: list[ConversationId]
    rights: list[Right]
    expires: int
    """Unix time, seconds."""


_claims = msgspec.json.Decoder(_Claims)


class SessionTokens:
    def __init__(self, key: bytes, *, clock: Callable[[], float] = time.time) -> None:
        self._key = key
        self._clock = clock

    def issue(self, tenant: str, request: SessionRequest) -> tuple[str, int]:
        """A token for `request` on behalf of `tenant`, and when it expires (Unix seconds)."""
        expires = int(self._clock()) + request.ttl_seconds
        claims = _Claims(tenant=tenant, conversations=sorted(set(request.conversations)),
                         rights=sorted(set(request.rights)), expires=expires)
        body = f"{_VERSION}.{_b64(msgspec.json.encode(claims))}"
        return f"{body}.{self._sign(body)}", expires

    def credential(self, token: str) -> Credential:
        if len(token) > _MAX_TOKEN_LENGTH or token.count(".") != 2:
            raise Refused("malformed session token")
        version, encoded, signature = token.split(".")
        body = f"{version}.{encoded}"
        if version != _VERSION or not hmac.compare_digest(self._sign(body).encode(), signature.encode("utf-8")):
            raise Refused("session token signature does not verify")
        try:
            claims = _claims.decode(_unb64(encoded))
        except (msgspec.DecodeError, binascii.Error, ValueError):  # signed by this key, yet unreadable
            raise Refused("malformed session token") from None
        if claims.expires <= self._clock():
            raise Refused("session token expired")
        return Credential(tenant=claims.tenant, rights=frozenset(claims.rights),
                          conversations=frozenset(claims.conversations))

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self._key, body.encode("utf-8"), hashlib.sha256).digest())


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

