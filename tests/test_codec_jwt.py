"""The RS256 bearer-token check Teams and Google Chat share (babelhub/codecs/jwt.py): whatever a token
holds, verifying it ends in a SignatureError or a verified token, never in another exception."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from babelhub.codecs import jwt
from babelhub.errors import SignatureError
from tests.codeckit import b64url, rs256_signed, rsa_key

ISSUER = "https://issuer.example"
AUDIENCE = "app-1"
_b64url = b64url


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa_key()


def _keys(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


_signed = rs256_signed


def _claims(**overrides: Any) -> bytes:
    now = int(time.time())
    return json.dumps({"iss": ISSUER, "aud": AUDIENCE, "exp": now + 3600} | overrides).encode()


HEADER = b'{"alg": "RS256", "typ": "JWT"}'


def _verify(token: str, key: rsa.RSAPrivateKey) -> jwt.VerifiedToken:
    return jwt.verify_rs256(token, _keys(key), issuers={ISSUER}, audience=AUDIENCE)


def test_a_good_token_verifies(signing_key: rsa.RSAPrivateKey) -> None:
    assert _verify(_signed(signing_key, HEADER, _claims()), signing_key).claims["aud"] == AUDIENCE


@pytest.mark.parametrize(
    ("header", "payload"),
    [
        (b"[" * 3000, b"{}"),  # deep enough to exhaust the parser's stack, before any signature check
        (HEADER, b"[" * 3000),
        (b"\xff\xfe{}", b"{}"),  # not UTF-8
        (b'{"alg": NaN}', b"{}"),  # Python's json reads NaN; JSON has none
        (b'{"alg": "RS256", "n": ' + b"1" * 5000 + b"}", b"{}"),  # an int too long to convert
        (b'"RS256"', b"{}"),
        (HEADER, b"null"),
    ],
)
def test_malformed_segments_are_signature_errors(signing_key: rsa.RSAPrivateKey, header: bytes, payload: bytes) -> None:
    token = f"{_b64url(header)}.{_b64url(payload)}.{_b64url(b'sig')}"
    with pytest.raises(SignatureError, match=r"token (header|payload) is not"):
        _verify(token, signing_key)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (_claims(iss=[ISSUER]), "issuer"),  # a list cannot be looked up among the issuers
        (_claims(iss={"a": 1}), "issuer"),
        (_claims(exp="tomorrow"), "no expiry"),
        (_claims(exp=True), "no expiry"),
        (_claims().replace(b'"exp": ', b'"exp": 1e400, "x": '), "no expiry"),  # infinity never expires
        (_claims(nbf="now"), "nbf"),
        (_claims(nbf=[1]), "nbf"),
    ],
)
def test_signed_but_malformed_claims_are_signature_errors(
    signing_key: rsa.RSAPrivateKey, payload: bytes, match: str
) -> None:
    with pytest.raises(SignatureError, match=match):
        _verify(_signed(signing_key, HEADER, payload), signing_key)


@pytest.mark.parametrize(
    "keys",
    [
        '{"keys": ' + "[" * 3000,
        '{"keys": [{"kty": "RSA", "kid": "k", "n": "AA", "e": "AA"}]}',  # a modulus of 0 is no key
    ],
)
def test_unusable_configured_keys_are_signature_errors(signing_key: rsa.RSAPrivateKey, keys: str) -> None:
    with pytest.raises(SignatureError):
        jwt.verify_rs256(_signed(signing_key, HEADER, _claims()), keys, issuers={ISSUER}, audience=AUDIENCE)
