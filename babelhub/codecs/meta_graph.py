"""Meta's webhook mechanics, shared by the WhatsApp Cloud API codec and the Messenger Platform codecs
(Messenger and Instagram): both are Graph API webhooks, set up and signed the same way.

* Subscribing: Meta calls the callback URL with `GET ?hub.mode=subscribe&hub.verify_token=…&hub.challenge=…`
  and expects the challenge back, but only from the owner of the verify token.
* Deliveries: each POST carries `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body, keyed
  with the app secret>`. The signature has no timestamp, so replays are caught by dedup, not here.

What differs per channel (which secrets name the tokens, when an unsigned webhook may pass) stays in
the codecs.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Final

from babelhub.codecs import native
from babelhub.codecs.base import HttpRequest, HttpResponse
from babelhub.errors import DecodeError, SignatureError

__all__ = ["MAX_UPDATES", "SIGNATURE_HEADER", "check_batch", "handshake", "verify_signature"]

SIGNATURE_HEADER: Final = "x-hub-signature-256"

MAX_UPDATES: Final = 1000
"""Meta aggregates event notifications "in a batch with a maximum of 1000 updates" (Graph API webhooks
docs). A body with more is not Meta's, and each update costs a decoder its envelopes: refused."""

_SHA256_HEX_LENGTH: Final = 64
_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")


def handshake(request: HttpRequest, verify_token: str) -> HttpResponse | None:
    """The answer to Meta's subscription check: the challenge echoed when the request names the
    connection's verify token, 403 for any other `hub.mode` request (a wrong token, another mode), and
    None for requests that are no subscription check (ordinary deliveries)."""
    if request.method.upper() != "GET" or "hub.mode" not in request.query:
        return None
    token = request.query.get("hub.verify_token", "")
    if request.query["hub.mode"] != "subscribe" or not native.same_secret(token, verify_token):
        return _plain_text(403, b"verify token mismatch")
    return _plain_text(200, request.query.get("hub.challenge", "").encode())


def verify_signature(request: HttpRequest, app_secret: str, channel: str) -> None:
    """Raise SignatureError unless `X-Hub-Signature-256` is the HMAC of the raw body with `app_secret`
    (which the codec has checked is configured). Meta writes the hex digest in lower case; upper case
    is accepted too. The header is checked for its form first, so that whatever a sender puts in it
    ends as a SignatureError, never another exception."""
    scheme, _, given = request.headers.get(SIGNATURE_HEADER, "").partition("=")
    if scheme != "sha256" or len(given) != _SHA256_HEX_LENGTH or not set(given) <= _HEX_DIGITS:
        raise SignatureError(f"{channel}: missing or malformed X-Hub-Signature-256")
    expected = hmac.new(app_secret.encode(), request.body, hashlib.sha256).hexdigest()
    if not native.same_secret(given.lower(), expected):
        raise SignatureError(f"{channel}: X-Hub-Signature-256 does not match the body")


def check_batch(update_paths: Iterable[str]) -> None:
    """Raise DecodeError at the first update beyond `MAX_UPDATES`; `update_paths` yields the JSON path
    of each update of a webhook (a `changes[]` or `messaging[]` item, a message or status in one), in
    order, and is read no further than that."""
    for count, path in enumerate(update_paths, start=1):
        if count > MAX_UPDATES:
            raise DecodeError(f"a Meta webhook carries at most {MAX_UPDATES} updates", path=path)


def _plain_text(status: int, body: bytes) -> HttpResponse:
    return HttpResponse(status=status, headers={"content-type": "text/plain"}, body=body)
