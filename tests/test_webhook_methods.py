"""The webhook endpoint's GET and handshake paths, on real codecs: GETs are endpoint checks unless the
codec says its channel delivers by GET (Twilio), a GET never carries a body, a channel's own answer to a
request (Teams' invoke answer) is given only once the POST verified, and a handshake that raises is a 400
with the request kept — never a 500."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from yarl import URL

from babelhub import canonical as c
from babelhub.codecs.base import (
    Capabilities,
    Codec,
    DecodeContext,
    EncodeContext,
    HttpRequest,
    HttpResponse,
    OutboundRequest,
    SendResult,
)
from babelhub.codecs.google_chat import GoogleChatCodec
from babelhub.codecs.slack import SlackCodec
from babelhub.codecs.teams import TeamsCodec
from babelhub.codecs.twilio import TwilioCodec
from babelhub.codecs.whatsapp import WhatsAppCodec
from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from babelhub.services.broker import Subjects, provision
from babelhub.services.connections import ConnectionService
from babelhub.services.delivery import RetryPolicy
from babelhub.services.telemetry import Metrics
from tests.hubkit import Processor, stream_messages, unique_prefix, webhook_app

FIXTURES = Path(__file__).parent / "fixtures"
AUTH_TOKEN = "twilio-auth-token"
APP_ID = "0b6fe6d1-fece-44f7-9a48-56465e2d5ab8"
VERIFY_TOKEN = "meta-verify-token"
PUBLIC_URL = "https://hooks.example.com/webhooks/twilio/tw-proxied"
PROJECT_NUMBER = "1234567890"
PUSH_AUDIENCE = "https://hooks.example.com/webhooks/google_chat/gc"
PUSH_ACCOUNT = "chat-push@chuck-norris-bot.iam.gserviceaccount.com"
OPTIONS: dict[str, dict[str, Any]] = {"tw-proxied": {"public_url": PUBLIC_URL}, "gc": {"pubsub": True}}


class Brittle(Codec):
    """A codec whose handshake trips over whatever it is given (a codec bug on odd input)."""

    channel = "brittle"
    capabilities = Capabilities()

    def handshake(self, request: HttpRequest, secrets: Mapping[str, str]) -> HttpResponse | None:
        return HttpResponse(body=secrets["missing"].encode())  # KeyError

    def decode(self, request: HttpRequest, ctx: DecodeContext) -> list[c.Envelope]:
        return []

    def encode(self, message: c.Message, ctx: EncodeContext) -> list[OutboundRequest]:
        return []

    def parse_response(self, request: OutboundRequest, response: HttpResponse) -> SendResult:
        return SendResult(ok=True)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _jwks(key: rsa.RSAPrivateKey) -> str:
    numbers = key.public_key().public_numbers()
    n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
    e = numbers.e.to_bytes(3, "big")
    return json.dumps({"keys": [{"kty": "RSA", "kid": "key-1", "n": _b64url(n), "e": _b64url(e)}]})


def _bot_framework_token(key: rsa.RSAPrivateKey, service_url: str) -> str:
    now = int(time.time())
    return _rs256(key, {"iss": "https://api.botframework.com", "aud": APP_ID, "nbf": now - 10, "exp": now + 3600,
                        "serviceurl": service_url})


def _rs256(key: rsa.RSAPrivateKey, claims: dict[str, Any]) -> str:
    header = _b64url(json.dumps({"typ": "JWT", "alg": "RS256", "kid": "key-1"}).encode())
    payload = _b64url(json.dumps(claims).encode())
    signature = key.sign(f"{header}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{payload}.{_b64url(signature)}"


def _twilio_signature(url: str) -> str:
    """Twilio's scheme for a GET: HMAC-SHA1 of the URL alone (its query included), base64."""
    return base64.b64encode(hmac.new(AUTH_TOKEN.encode(), url.encode(), hashlib.sha1).digest()).decode()


@pytest.fixture(scope="module")
def bot_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Endpoint:
    def __init__(self, base: str, subjects: Subjects) -> None:
        self.base = base
        self.subjects = subjects

    def url(self, channel: str, connection: str) -> str:
        return f"{self.base}/webhooks/{channel}/{connection}"


@pytest.fixture
async def endpoint(nats_client, bot_key: rsa.RSAPrivateKey) -> AsyncIterator[Endpoint]:  # type: ignore[no-untyped-def]
    subjects, metrics = Subjects(unique_prefix()), Metrics()
    js = nats_client.jetstream()
    await provision(js, subjects, 60.0)
    codecs: dict[str, tuple[Codec, dict[str, str]]] = {
        "tw": (TwilioCodec(), {"auth_token": AUTH_TOKEN}),
        "tw-proxied": (TwilioCodec(), {"auth_token": AUTH_TOKEN}),
        "teams": (TeamsCodec(), {"app_id": APP_ID, "signing_keys": _jwks(bot_key)}),
        "sl": (SlackCodec(), {"signing_secret": "slack-secret"}),
        "wa": (WhatsAppCodec(), {"app_secret": "meta-app-secret", "verify_token": VERIFY_TOKEN}),
        "br": (Brittle(), {}),
        "gc": (GoogleChatCodec(), {"audience": PROJECT_NUMBER, "signing_keys": _jwks(bot_key),
                                   "pubsub_audience": PUSH_AUDIENCE, "pubsub_service_account": PUSH_ACCOUNT,
                                   "pubsub_signing_keys": _jwks(bot_key)}),
    }
    async with aiohttp.ClientSession() as http:
        connections = {
            name: ConnectionService(cfg.Connection(id=name, tenant="acme", channel=codec.channel, secrets=secrets,
                                                   options=OPTIONS.get(name, {})),
                                    codec, http, metrics, RetryPolicy())
            for name, (codec, secrets) in codecs.items()
        }
        runner = await webhook_app(nats_client, subjects, metrics, http, connections)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        yield Endpoint(f"http://127.0.0.1:{port}", subjects)
        await runner.cleanup()


async def _raw_records(nats_client, endpoint: Endpoint) -> list[bytes]:  # type: ignore[no-untyped-def]
    subjects = endpoint.subjects
    return await stream_messages(nats_client, f"{subjects.prefix}.acme.raw.>", subjects.stream_name("raw"))


async def _dead_letters(nats_client, endpoint: Endpoint) -> list[bytes]:  # type: ignore[no-untyped-def]
    subjects = endpoint.subjects
    return await stream_messages(nats_client, f"{subjects.prefix}.acme.dlq.>", subjects.stream_name("dead_letters"))


def _twilio_query() -> str:
    return str(json.loads((FIXTURES / "twilio" / "sms_text.json").read_text())["_raw"])


# ----------------------------------------------------------------------------------------- Twilio GET


async def _signed_get(url: str, signed_url: str) -> tuple[int, str]:
    """GET `url` exactly as written (Twilio signs the URL as it calls it) with Twilio's signature of
    `signed_url`: the answer's status and text."""
    headers = {"X-Twilio-Signature": _twilio_signature(signed_url)}
    async with aiohttp.ClientSession() as session, session.get(URL(url, encoded=True), headers=headers) as response:
        return response.status, await response.text()


async def test_a_signed_twilio_get_delivery_is_recorded(endpoint: Endpoint, nats_client) -> None:  # type: ignore[no-untyped-def]
    url = f"{endpoint.url('twilio', 'tw')}?{_twilio_query()}"
    status, text = await _signed_get(url, url)
    assert status == 200, text
    (record,) = await _raw_records(nats_client, endpoint)
    assert b"SMXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX" in record  # the query's MessageSid, as received


async def test_a_twilio_get_behind_a_proxy_is_signed_over_the_public_url_and_query(  # type: ignore[no-untyped-def]
    endpoint: Endpoint, nats_client
) -> None:
    # Twilio called the proxy's URL (the connection's public_url) with the fields in the query.
    status, text = await _signed_get(f"{endpoint.url('twilio', 'tw-proxied')}?{_twilio_query()}",
                                     f"{PUBLIC_URL}?{_twilio_query()}")
    assert status == 200, text
    assert len(await _raw_records(nats_client, endpoint)) == 1


async def test_a_twilio_get_is_verified_like_a_post(endpoint: Endpoint, nats_client) -> None:  # type: ignore[no-untyped-def]
    url = f"{endpoint.url('twilio', 'tw')}?{_twilio_query()}"
    forged = url.replace("Ahoy", "Pay+up")  # a query other than the one signed
    status, text = await _signed_get(forged, url)
    assert status == 401 and "signature" in json.loads(text)["error"]
    assert await _raw_records(nats_client, endpoint) == []


# ------------------------------------------------------------------------------------ GET with a body


@pytest.mark.parametrize("connection", ["tw", "teams", "sl", "wa"])
async def test_a_get_with_a_body_is_a_400_on_every_channel(endpoint: Endpoint, nats_client, connection: str) -> None:  # type: ignore[no-untyped-def]
    channel = {"tw": "twilio", "teams": "teams", "sl": "slack", "wa": "whatsapp"}[connection]
    body = json.dumps({"type": "url_verification", "token": "x", "challenge": "c"}).encode()
    url = endpoint.url(channel, connection)
    if connection == "tw":
        url = f"{url}?{_twilio_query()}"
    async with aiohttp.ClientSession() as session:
        signature = {"X-Twilio-Signature": _twilio_signature(url)}
        async with session.get(URL(url, encoded=True), data=body, headers=signature) as response:
            assert response.status == 400
            assert "GET request carries no body" in (await response.json())["error"]
    assert await _raw_records(nats_client, endpoint) == []


# ------------------------------------------------------------------------------------- Teams invokes


def _invoke_body() -> bytes:
    return (FIXTURES / "teams" / "invoke_adaptive_card_action.json").read_bytes()


def _service_url() -> str:
    return str(json.loads(_invoke_body())["serviceUrl"])


async def test_a_teams_invoke_is_answered_only_on_a_verified_post(  # type: ignore[no-untyped-def]
    endpoint: Endpoint, nats_client, bot_key: rsa.RSAPrivateKey
) -> None:
    url = endpoint.url("teams", "teams")
    token = _bot_framework_token(bot_key, _service_url())
    stranger = _bot_framework_token(rsa.generate_private_key(public_exponent=65537, key_size=2048), _service_url())
    async with aiohttp.ClientSession() as session:
        # Neither a GET (with or without the token) nor a POST signed by another key gets the invoke answer.
        for method, bearer in (("GET", token), ("GET", None), ("POST", stranger), ("POST", None)):
            headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
            async with session.request(method, url, data=_invoke_body(), headers=headers) as response:
                assert response.status in (400, 401), (method, response.status)
                assert "invokeResponse" not in await response.text()
        async with session.post(url, data=_invoke_body(), headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 200
            answer = await response.json()
            assert answer["statusCode"] == 200 and answer["type"] == "application/vnd.microsoft.activity.message"
    assert len(await _raw_records(nats_client, endpoint)) == 1


# -------------------------------------------------------------------------------- handshakes that fail


async def test_a_meta_subscription_check_is_still_answered_by_get(endpoint: Endpoint) -> None:
    query = f"hub.mode=subscribe&hub.verify_token={VERIFY_TOKEN}&hub.challenge=1158201444"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{endpoint.url('whatsapp', 'wa')}?{query}") as response:
            assert response.status == 200 and await response.text() == "1158201444"
        async with session.get(endpoint.url("whatsapp", "wa")) as response:
            assert response.status == 405
            assert "POST" in (await response.json())["error"]


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_raising_handshake_is_a_400_and_a_dead_letter(endpoint: Endpoint, nats_client, method: str) -> None:  # type: ignore[no-untyped-def]
    async with aiohttp.ClientSession() as session:
        data = b'{"id": 1}' if method == "POST" else None
        async with session.request(method, endpoint.url("brittle", "br"), data=data) as response:
            assert response.status == 400
            body = await response.json()
            assert body["path"] == "$" and "could not be read" in body["error"]
    assert len(await _dead_letters(nats_client, endpoint)) == 1


async def test_a_handshake_that_fails_its_signature_check_is_a_401(endpoint: Endpoint) -> None:
    # Slack checks the signature of a url_verification inside its handshake: POSTed unsigned, that is
    # a 401 from the signature check, not an exception escaping the endpoint.
    body = json.dumps({"type": "url_verification", "token": "x", "challenge": "c"}).encode()
    async with aiohttp.ClientSession() as session, session.post(endpoint.url("slack", "sl"), data=body) as response:
        assert response.status == 401


def test_only_twilio_among_these_delivers_by_get() -> None:
    assert TwilioCodec.delivers_by_get
    assert not any(codec.delivers_by_get for codec in (TeamsCodec, SlackCodec, WhatsAppCodec, Brittle))


# ------------------------------------------------------------------------------ Google Chat formats


async def _post_google_chat(endpoint: Endpoint, fixture: str, claims: dict[str, Any], key: rsa.RSAPrivateKey
                            ) -> tuple[int, Any]:
    now = int(time.time())
    headers = {"Authorization": f"Bearer {_rs256(key, claims | {'iat': now, 'exp': now + 600})}"}
    body = (FIXTURES / "google_chat" / fixture).read_bytes()
    async with aiohttp.ClientSession() as session, session.post(
        endpoint.url("google_chat", "gc"), data=body, headers=headers
    ) as response:
        return response.status, await response.json()


async def test_a_body_of_no_google_chat_format_is_answered_with_what_it_is_not(  # type: ignore[no-untyped-def]
    endpoint: Endpoint, nats_client, bot_key: rsa.RSAPrivateKey
) -> None:
    chat = {"iss": "chat@system.gserviceaccount.com", "aud": PROJECT_NUMBER}
    status, answer = await _post_google_chat(endpoint, "pubsub_pull_response.json", chat, bot_key)
    assert status == 400
    assert answer == {"error": "not a Google Chat event or Pub/Sub push envelope", "path": "$"}
    assert await _raw_records(nats_client, endpoint) == []


async def test_a_signed_pubsub_push_is_recorded(  # type: ignore[no-untyped-def]
    endpoint: Endpoint, nats_client, bot_key: rsa.RSAPrivateKey
) -> None:
    push = {"iss": "https://accounts.google.com", "aud": PUSH_AUDIENCE, "email": PUSH_ACCOUNT, "email_verified": True}
    status, _ = await _post_google_chat(endpoint, "pubsub_push_message.json", push, bot_key)
    assert status == 200
    impostor = push | {"email": "someone@other-project.iam.gserviceaccount.com"}
    status, answer = await _post_google_chat(endpoint, "pubsub_push_message.json", impostor, bot_key)
    assert status == 401 and "service account" in answer["error"]
    assert len(await _raw_records(nats_client, endpoint)) == 1


# ------------------------------------------------------------------------------ through the whole hub


async def test_a_twilio_get_delivery_reaches_the_processor(nats_server, nats_client) -> None:  # type: ignore[no-untyped-def]
    config = cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_server.url, subject_prefix=unique_prefix()),
        tenants=[cfg.Tenant(id="acme")],
        connections=[cfg.Connection(id="sms", tenant="acme", channel="twilio",
                                    secrets={"account_sid": "AC123", "auth_token": AUTH_TOKEN},
                                    options={"from": "+15558675310"})],
    )
    async with Hub(config) as hub:
        app = await Processor(nats_client, hub.subjects.prefix, tenant="acme").start()
        url = f"{hub.http_url}/webhooks/twilio/sms?{_twilio_query()}"
        status, text = await _signed_get(url, url)
        assert status == 200, text
        inbound, _ = await app.next()
    assert isinstance(inbound, c.Message)
    assert inbound.parts == [c.Text(text="Ahoy! Let's build something amazing.")]
    assert inbound.conversation.native_id == "+14017122661"
