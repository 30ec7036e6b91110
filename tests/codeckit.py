"""What the codec tests share, so that each `tests/test_codec_<channel>.py` holds only its channel's cases:
reading a channel's fixtures and the shared corpus, the canonical ids and conversations a codec derives
for a connection, times, outbound messages, API answers, JSON bodies of outbound requests, Meta's body
signature, RS256 tokens and RSA keys for the channels that sign with JWTs, the canonical JSON round trip,
and one send through `deliver` to a local fake API."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from babelhub import canonical as c
from babelhub.codecs.base import Codec, HttpRequest, HttpResponse, OutboundRequest, SendResult
from babelhub.services.delivery import RetryPolicy, deliver

FIXTURES = Path(__file__).parent / "fixtures"
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
"""Real-shaped payloads collected beside the checkout (not in the repository): swept when present."""


class Fixtures:
    """One channel's fixture folder, `tests/fixtures/<channel>/`. `suffix` is added to every name
    (".json" for the folders whose tests name fixtures without it)."""

    def __init__(self, channel: str, suffix: str = "") -> None:
        self.folder = FIXTURES / channel
        self.suffix = suffix

    def __truediv__(self, name: str) -> Path:
        return self.folder / name

    def path(self, name: str) -> Path:
        return self.folder / f"{name}{self.suffix}"

    def bytes(self, name: str) -> bytes:
        return self.path(name).read_bytes()

    def json(self, name: str) -> Any:
        return json.loads(self.bytes(name))


def corpus_files(folder: Path) -> list[Path]:
    """The corpus payloads of one channel (`inbound/` then `status/`), none when the corpus is absent."""
    return sorted((folder / "inbound").glob("*.json")) + sorted((folder / "status").glob("*.json"))


class Ids:
    """The canonical ids a codec derives on one connection from the channel's own ids, written out here
    from the canonical id functions, apart from the codecs' own builders."""

    def __init__(self, tenant: str, connection: str, channel: str = "") -> None:
        self.tenant = tenant
        self.connection = connection
        self.channel = channel

    def message(self, native_id: str) -> str:
        return c.message_id(self.tenant, self.connection, native_id)

    def sender(self, native_id: str) -> str:
        return c.sender_id(self.tenant, self.connection, native_id)

    def conversation(self, native_id: str, kind: c.ConversationType = "direct") -> c.Conversation:
        return c.Conversation(
            id=c.conversation_id(self.tenant, self.connection, native_id),
            channel=self.channel,
            connection=self.connection,
            native_id=native_id,
            type=kind,
        )


def utc(unix_time: float) -> datetime:
    """A Unix time as the aware UTC datetime codecs put in `ts`."""
    return datetime.fromtimestamp(unix_time, UTC)


def outbound_message(
    tenant: str, conversation: c.Conversation, parts: Iterable[c.Part], *, id: str, **fields: Any
) -> c.Message:
    """A message the application sends into `conversation`, stamped now unless `fields` give a `ts`."""
    fields.setdefault("ts", c.now())
    return c.Message(id=id, tenant=tenant, conversation=conversation, direction="outbound", parts=list(parts), **fields)


def response(status: int, body: Any, headers: dict[str, str] | None = None) -> HttpResponse:
    """An API answer: `body` as it is when it is bytes (a fixture), else as JSON."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return HttpResponse(status=status, headers=headers or {}, body=raw)


def json_body(request: OutboundRequest) -> Any:
    return json.loads(request.body)


def json_bodies(requests: list[OutboundRequest]) -> list[Any]:
    return [json_body(request) for request in requests]


def meta_signed(body: bytes, secret: str, *, upper: bool = False) -> HttpRequest:
    """A request as Meta's Graph API webhooks send it: `X-Hub-Signature-256` over the body."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return HttpRequest(body=body, headers={"x-hub-signature-256": f"sha256={digest.upper() if upper else digest}"})


def b64url(data: bytes) -> str:
    """Base64url without padding, as JWTs and JWKs write it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def rsa_key() -> rsa.RSAPrivateKey:
    """A fresh RSA key, for signing the JWTs that Teams, Google Chat and Pub/Sub send."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def rs256_signed(key: rsa.RSAPrivateKey, header: bytes, payload: bytes) -> str:
    """A JWT over exactly these header and payload bytes, signed with RS256 (RSASSA-PKCS1-v1_5, SHA-256)."""
    signing_input = f"{b64url(header)}.{b64url(payload)}"
    return f"{signing_input}.{b64url(key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()))}"


def rs256_token(key: rsa.RSAPrivateKey, header: dict[str, Any], claims: dict[str, Any]) -> str:
    return rs256_signed(key, json.dumps(header).encode(), json.dumps(claims).encode())


def round_trips(envelope: c.Envelope) -> bool:
    """Whether `envelope` reads back from canonical JSON as it is."""
    return c.decode(c.encode(envelope)) == envelope


async def deliver_one(codec: Codec, request: OutboundRequest, policy: RetryPolicy) -> SendResult:
    """`request` sent with retries through the hub's own `deliver`, in a session of its own."""
    async with aiohttp.ClientSession() as session:
        return await deliver(session, codec, request, policy)
