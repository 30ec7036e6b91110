"""Verifying the RS256 bearer tokens that Bot Framework (Teams) and Google Chat put on their webhooks.

Both channels sign a JSON Web Token with a key from a published key set and send it as
`Authorization: Bearer <token>`. Fetching that key set is I/O, so it is configuration here: the
connection's secrets hold it as text, in any of the forms the channels publish:

* a JWKS document, `{"keys": [{"kid": ..., "kty": "RSA", "n": ..., "e": ...}, ...]}` (Bot Framework's
  `https://login.botframework.com/v1/.well-known/keys`, whose keys may also list `endorsements`);
* a map of key id to PEM certificate, `{"<kid>": "-----BEGIN CERTIFICATE-----..."}` (Google's
  `https://www.googleapis.com/service_accounts/v1/metadata/x509/chat@system.gserviceaccount.com`);
* PEM text: one or more certificates or public keys, without key ids.

Only RS256 is accepted: a token naming any other algorithm (including `none`) is refused before any
key is looked at.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from collections.abc import Collection, Mapping
from typing import Any, Final, TypeGuard

import msgspec
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from babelhub.codecs.base import HttpRequest
from babelhub.errors import SignatureError

__all__ = [
    "DEFAULT_LEEWAY",
    "SigningKey",
    "VerifiedToken",
    "bearer_token",
    "parse_keys",
    "split_token",
    "verify_rs256",
]

DEFAULT_LEEWAY: Final = 300.0
"""Clock skew tolerated on `exp` and `nbf`: Bot Framework documents 5 minutes as industry standard."""

_PEM_BLOCK_END: Final = "-----END "


class SigningKey(msgspec.Struct, frozen=True, kw_only=True):
    """One public key of a key set, with what the key set says about it."""

    kid: str
    """Empty for keys given as bare PEM: such a key is tried for any token."""
    public_key: rsa.RSAPublicKey
    endorsements: tuple[str, ...] = ()
    """Bot Framework: the channel ids this key may sign for."""


class VerifiedToken(msgspec.Struct, frozen=True, kw_only=True):
    """A token whose signature and standard claims checked out."""

    claims: dict[str, Any]
    key: SigningKey


def bearer_token(request: HttpRequest) -> str:
    """The token of an `Authorization: Bearer <token>` header, or a SignatureError."""
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise SignatureError("missing Authorization: Bearer token")
    return token.strip()


def verify_rs256(
    token: str,
    keys: str,
    *,
    issuers: Collection[str],
    audience: str,
    now: float | None = None,
    leeway: float = DEFAULT_LEEWAY,
) -> VerifiedToken:
    """Check `token`'s RS256 signature against `keys` (see the module doc for the accepted forms),
    then its issuer, audience, expiry and not-before. Raises SignatureError saying what failed."""
    if not audience:
        raise SignatureError("no audience configured to check the token against")
    header, claims, signing_input, signature = split_token(token)
    if header.get("alg") != "RS256":
        raise SignatureError(f"token algorithm {header.get('alg')!r} is not RS256")
    key = _verify_signature(signing_input, signature, str(header.get("kid", "")), parse_keys(keys))
    _check_claims(claims, issuers=issuers, audience=audience, now=time.time() if now is None else now, leeway=leeway)
    return VerifiedToken(claims=claims, key=key)


def parse_keys(keys: str) -> list[SigningKey]:
    """The RSA public keys in a configured key set (JWKS, kid→PEM map or PEM text)."""
    text = keys.strip()
    if not text:
        raise SignatureError("no signing keys configured")
    if text.startswith("{"):
        try:
            document = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise SignatureError(f"signing keys are not valid JSON: {exc}") from None
        if isinstance(document, dict) and isinstance(document.get("keys"), list):
            return [_jwk_key(jwk) for jwk in document["keys"] if isinstance(jwk, dict) and jwk.get("kty") == "RSA"]
        if isinstance(document, dict):
            return [_pem_key(str(pem), kid=str(kid)) for kid, pem in document.items()]
        raise SignatureError("signing keys JSON is neither a JWKS nor a key-id → PEM map")
    return [_pem_key(block) for block in _pem_blocks(text)]


# ------------------------------------------------------------------------------------------ parsing


def split_token(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """A JWT's header and claims (JSON objects), the bytes its signature covers and the signature, or
    a SignatureError saying which segment is unreadable. Nothing here is verified yet: the caller checks
    the algorithm and the signature before it trusts a claim."""
    parts = token.split(".")
    if len(parts) != 3:
        raise SignatureError("token is not a JWT (header.payload.signature)")
    header, claims = _json_part(parts[0], "header"), _json_part(parts[1], "payload")
    return header, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), _b64url(parts[2], "signature")


def _json_part(segment: str, name: str) -> dict[str, Any]:
    """A token segment as a JSON object. It is read before any signature is checked, so whatever an
    attacker can put in it (nesting deep enough to exhaust the stack, bytes that are no UTF-8,
    `NaN`, numbers too long to convert) must end as a SignatureError."""
    try:
        value = json.loads(_b64url(segment, name), parse_constant=_no_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise SignatureError(f"token {name} is not JSON") from None
    if not isinstance(value, dict):
        raise SignatureError(f"token {name} is not a JSON object")
    return value


def _no_constant(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _b64url(segment: str, name: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise SignatureError(f"token {name} is not base64url") from None


def _jwk_key(jwk: Mapping[str, Any]) -> SigningKey:
    try:
        numbers = rsa.RSAPublicNumbers(
            e=int.from_bytes(_b64url(str(jwk["e"]), "key exponent"), "big"),
            n=int.from_bytes(_b64url(str(jwk["n"]), "key modulus"), "big"),
        )
        public_key = numbers.public_key()
    except KeyError as exc:
        raise SignatureError(f"JWKS key {jwk.get('kid', '')!r} lacks {exc}") from None
    except ValueError as exc:
        raise SignatureError(f"JWKS key {jwk.get('kid', '')!r} is no usable RSA key: {exc}") from None
    endorsements = jwk.get("endorsements", [])
    return SigningKey(
        kid=str(jwk.get("kid", "")),
        public_key=public_key,
        endorsements=tuple(str(e) for e in endorsements) if isinstance(endorsements, list) else (),
    )


def _pem_blocks(text: str) -> list[str]:
    """Split PEM text holding several certificates or keys into one block each."""
    blocks: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        current.append(line)
        if line.startswith(_PEM_BLOCK_END):
            blocks.append("\n".join(current))
            current = []
    if not blocks:
        raise SignatureError("signing keys are neither JSON nor PEM")
    return blocks


def _pem_key(pem: str, kid: str = "") -> SigningKey:
    data = pem.strip().encode("ascii", "replace")
    try:
        if b"CERTIFICATE" in data.split(b"\n", 1)[0]:
            public_key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            public_key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise SignatureError(f"signing key {kid!r} is not a readable PEM certificate or key: {exc}") from None
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise SignatureError(f"signing key {kid!r} is not an RSA key")
    return SigningKey(kid=kid, public_key=public_key)


# ----------------------------------------------------------------------------------------- checking


def _verify_signature(signing_input: bytes, signature: bytes, kid: str, keys: list[SigningKey]) -> SigningKey:
    # A token names its key; a key without an id (bare PEM) may sign any token.
    candidates = [key for key in keys if key.kid == kid] if kid else []
    candidates += [key for key in keys if not key.kid]
    if not candidates:
        raise SignatureError(f"token key id {kid!r} is not among the configured signing keys")
    for key in candidates:
        try:
            key.public_key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            continue
        return key
    raise SignatureError("token signature does not verify")


def _check_claims(
    claims: Mapping[str, Any], *, issuers: Collection[str], audience: str, now: float, leeway: float
) -> None:
    # Claims are compared only once their type is right: a list `iss` cannot be looked up in a set,
    # and an `exp` of 1e400 (infinity) would never expire.
    issuer = claims.get("iss")
    if not isinstance(issuer, str) or issuer not in issuers:
        raise SignatureError(f"token issuer {issuer!r} is not {' or '.join(sorted(issuers))}")
    audiences = claims.get("aud")
    if audience not in (audiences if isinstance(audiences, list) else [audiences]):
        raise SignatureError(f"token audience {audiences!r} is not {audience!r}")
    expires = claims.get("exp")
    if not _is_time(expires):
        raise SignatureError("token has no expiry")
    if now > expires + leeway:
        raise SignatureError("token has expired")
    not_before = claims.get("nbf")
    if not_before is not None and not _is_time(not_before):
        raise SignatureError(f"token nbf {not_before!r} is not a time")
    if not_before is not None and now < not_before - leeway:
        raise SignatureError("token is not valid yet")


def _is_time(value: Any) -> TypeGuard[float]:
    """A NumericDate: a finite JSON number (not a boolean)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
