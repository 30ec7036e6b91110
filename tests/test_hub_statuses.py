"""Statuses name the app's message: for every channel that reports delivery or read receipts, a processor
sends a message through the hub, the channel's (fake) API answers with the native id it gave the message,
the channel's signed status webhook names that native id, and the status the processor receives carries
the canonical id the app gave the message.

Each case is a real-shaped status fixture of `tests/fixtures/<channel>/` and the channel's documented send
response; only the native message id is replaced, by the one the fake API returned for this test's send.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import aiohttp
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from babelhub import canonical as c
from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from tests.fakeapi import FakeApi, Recorded, Reply
from tests.hubkit import TENANT, Processor, unique_prefix

FIXTURES = Path(__file__).parent / "fixtures"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_serial = itertools.count(1)

Json = dict[str, Any]


def fixture(channel: str, name: str) -> Json:
    loaded: Json = json.loads((FIXTURES / channel / name).read_bytes())
    return loaded


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# ------------------------------------------------------------------------------------ signing


def meta_signed(secret: str) -> Callable[[str, bytes], dict[str, str]]:
    """Meta's `X-Hub-Signature-256`: HMAC-SHA256 of the body with the app secret."""
    return lambda _, body: {"Content-Type": "application/json", "X-Hub-Signature-256":
                            "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()}


def twilio_signed(url: str, body: bytes) -> dict[str, str]:
    """`X-Twilio-Signature`: HMAC-SHA1 of the URL followed by the sorted form fields, with the auth token."""
    signed = url + "".join(k + v for k, v in sorted(parse_qsl(body.decode(), keep_blank_values=True)))
    digest = hmac.new(b"twilio-token", signed.encode(), hashlib.sha1).digest()
    return {"Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": base64.b64encode(digest).decode()}


def evolution_signed(_: str, __: bytes) -> dict[str, str]:
    """Evolution does not sign; its `apikey` webhook header must equal the instance's key."""
    return {"Content-Type": "application/json", "apikey": "evo-key"}


def teams_jwks() -> str:
    numbers = RSA_KEY.public_key().public_numbers()
    n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
    return json.dumps({"keys": [{"kty": "RSA", "use": "sig", "kid": "bf-key", "n": b64url(n),
                                 "e": b64url(numbers.e.to_bytes(3, "big"))}]})


def teams_signed(service_url: str) -> Callable[[str, bytes], dict[str, str]]:
    """The Bot Framework's bearer JWT (RS256), naming the activity's serviceUrl."""

    def headers(_: str, __: bytes) -> dict[str, str]:
        now = int(time.time())
        claims = {"iss": "https://api.botframework.com", "aud": "teams-app", "nbf": now - 10, "exp": now + 600,
                  "serviceurl": service_url}
        header = b64url(json.dumps({"alg": "RS256", "kid": "bf-key", "typ": "JWT"}).encode())
        payload = b64url(json.dumps(claims).encode())
        signature = RSA_KEY.sign(f"{header}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256())
        return {"Content-Type": "application/json", "Authorization": f"Bearer {header}.{payload}.{b64url(signature)}"}

    return headers


# -------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One channel's status webhook, and what the hub needs to send a message the webhook can name."""

    channel: str
    secrets: dict[str, str]
    options: dict[str, str]
    chat: str
    """The native chat id the app sends to; the status webhook's chat."""
    new_native_id: Callable[[int], str]
    """A fresh native message id of the channel's own shape."""
    send_response: Callable[[str, str], Reply]
    """The channel's documented success answer to a send, given the fake API's base URL and the native id."""
    webhooks: Callable[[str, str], list[tuple[bytes, c.State]]]
    """The status webhook bodies naming the native id (given the fake API's base URL) and the state each reports."""
    signed: Callable[[str], Callable[[str, bytes], dict[str, str]]]
    """The headers that sign a webhook body (given the fake API's base URL, then the webhook URL and body)."""


def whatsapp_statuses(_: str, native_id: str) -> list[tuple[bytes, c.State]]:
    bodies = []
    for name, state in (("status_delivered.json", "delivered"), ("status_read.json", "read")):
        body = fixture("whatsapp", name)
        body["entry"][0]["changes"][0]["value"]["statuses"][0]["id"] = native_id
        bodies.append((json.dumps(body).encode(), state))
    return bodies


def whatsapp_sent(_: str, native_id: str) -> Reply:
    body = fixture("whatsapp", "response_sent.json")
    body["messages"][0]["id"] = native_id
    return Reply(body=body)


def meta_send_sent(chat: str) -> Callable[[str, str], Reply]:
    def reply(_: str, native_id: str) -> Reply:
        return Reply(body={**fixture("messenger", "response_send_ok.json"), "recipient_id": chat,
                           "message_id": native_id})

    return reply


def messenger_delivery(_: str, native_id: str) -> list[tuple[bytes, c.State]]:
    body = fixture("messenger", "delivery.json")
    body["entry"][0]["messaging"][0]["delivery"]["mids"] = [native_id]
    return [(json.dumps(body).encode(), "delivered")]


def instagram_seen(_: str, native_id: str) -> list[tuple[bytes, c.State]]:
    body = fixture("instagram", "seen.json")
    body["entry"][0]["messaging"][0]["read"]["mid"] = native_id
    return [(json.dumps(body).encode(), "read")]


def twilio_sent(_: str, native_id: str) -> Reply:
    return Reply(status=201, body={**fixture("twilio", "response_created.json"), "sid": native_id})


def twilio_statuses(*names: tuple[str, c.State]) -> Callable[[str, str], list[tuple[bytes, c.State]]]:
    def bodies(_: str, native_id: str) -> list[tuple[bytes, c.State]]:
        found = []
        for name, state in names:
            form = dict(parse_qsl(fixture("twilio", name)["_raw"], keep_blank_values=True))
            form.update(MessageSid=native_id, SmsSid=native_id)
            found.append((urlencode(form).encode(), state))
        return found

    return bodies


def evolution_sent(_: str, native_id: str) -> Reply:
    body = fixture("evolution", "response_send_text.json")
    body["key"]["id"] = native_id
    return Reply(status=201, body=body)


def evolution_updates(_: str, native_id: str) -> list[tuple[bytes, c.State]]:
    bodies = []
    for name, state in (("update_delivery_ack.json", "delivered"), ("update_read.json", "read")):
        body = fixture("evolution", name)
        body["data"]["keyId"] = native_id
        bodies.append((json.dumps(body).encode(), state))
    return bodies


def teams_sent(_: str, native_id: str) -> Reply:
    return Reply(status=201, body={**fixture("teams", "response_resource.json"), "id": native_id})


def teams_read_receipt(base: str, native_id: str) -> list[tuple[bytes, c.State]]:
    body = fixture("teams", "read_receipt.json")
    body["serviceUrl"] = f"{base}/teams/"
    body["value"]["lastReadMessageId"] = native_id
    return [(json.dumps(body).encode(), "read")]


CASES = [
    Case("whatsapp", {"access_token": "wa-token", "app_secret": "wa-app"}, {"phone_number_id": "1122334455667"},
         "972987654321", lambda n: f"wamid.HBgLOTcyOTg3NjU0MzIxFQIAERgS{n:016X}", whatsapp_sent, whatsapp_statuses,
         lambda _: meta_signed("wa-app")),
    Case("messenger", {"page_access_token": "pg-token", "app_secret": "fb-app"}, {}, "7712941528806923",
         lambda n: f"mid.1458668856218:{n:018x}", meta_send_sent("7712941528806923"), messenger_delivery,
         lambda _: meta_signed("fb-app")),
    Case("instagram", {"access_token": "ig-token", "app_secret": "ig-app"}, {}, "1284918273645012",
         lambda n: b64url(f"ig_message_item:1:{n}".encode()), meta_send_sent("1284918273645012"), instagram_seen,
         lambda _: meta_signed("ig-app")),
    Case("twilio", {"account_sid": "AC123", "auth_token": "twilio-token"}, {"from": "+15017250604"},
         "+15558675310", lambda n: f"SM{n:032x}", twilio_sent,
         twilio_statuses(("status_sms_delivered.json", "delivered")), lambda _: twilio_signed),
    Case("twilio", {"account_sid": "AC123", "auth_token": "twilio-token"}, {"from": "whatsapp:+14155238886"},
         "whatsapp:+919900000000", lambda n: f"SM{n:032x}", twilio_sent,
         twilio_statuses(("status_whatsapp_sent.json", "sent"), ("status_whatsapp_read.json", "read")),
         lambda _: twilio_signed),
    Case("evolution", {"apikey": "evo-key"}, {"instance": "loja-centro"}, "553198296801@s.whatsapp.net",
         lambda n: f"BAE5{n:012X}", evolution_sent, evolution_updates, lambda _: evolution_signed),
    Case("teams", {"app_id": "teams-app", "signing_keys": teams_jwks(), "bot_token": "bf-token"}, {},
         fixture("teams", "read_receipt.json")["conversation"]["id"], lambda n: str(1_692_206_589_131 + n),
         teams_sent, teams_read_receipt, lambda base: teams_signed(f"{base}/teams/")),
]


@pytest.fixture(params=CASES, ids=["whatsapp", "messenger", "instagram", "twilio-sms", "twilio-whatsapp", "evolution",
                                   "teams"])
def case(request: pytest.FixtureRequest) -> Case:
    chosen: Case = request.param
    return chosen


@pytest.fixture
async def hub(case: Case, nats_server: EmbeddedServer, fake_api: FakeApi) -> AsyncIterator[Hub]:
    connection = cfg.Connection(id=case.channel, tenant=TENANT, channel=case.channel,
                                api_base=f"{fake_api.base_url}/{case.channel}", secrets=case.secrets,
                                options=case.options)
    config = cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_server.url, subject_prefix=unique_prefix()),
        tenants=[cfg.Tenant(id=TENANT)],
        connections=[connection],
    )
    async with Hub(config) as running:
        yield running


async def test_a_status_names_the_canonical_id_the_app_gave_the_message(
    case: Case, hub: Hub, fake_api: FakeApi, nats_client
) -> None:
    native_id = case.new_native_id(next(_serial))
    sends: list[Recorded] = []

    def answer(request: Recorded) -> Reply:
        sends.append(request)
        return case.send_response(fake_api.base_url, native_id)

    fake_api.responder = answer
    app = await Processor(nats_client, hub.subjects.prefix).start()
    conversation = c.Conversation(id=c.conversation_id(TENANT, case.channel, case.chat), channel=case.channel,
                                  connection=case.channel, native_id=case.chat)
    message = c.Message(id=c.new_id(), tenant=TENANT, conversation=conversation, ts=c.now(), direction="outbound",
                        parts=[c.Text(text="Your order has shipped")])
    await app.send(message)

    sent = await app.next_status()
    assert (sent.state, sent.message_id, sent.native_id) == ("sent", message.id, native_id), sent.error
    assert len(sends) == 1

    url = f"{hub.http_url}/webhooks/{case.channel}/{case.channel}"
    sign = case.signed(fake_api.base_url)
    async with aiohttp.ClientSession() as session:
        for body, state in case.webhooks(fake_api.base_url, native_id):
            async with session.post(url, data=body, headers=sign(url, body)) as response:
                assert response.status in (200, 201, 202), await response.text()
            status = await app.next_status()
            assert (status.state, status.native_id) == (state, native_id)
            assert status.message_id == message.id
            assert status.conversation.id == conversation.id


@pytest.mark.parametrize("case", [CASES[0]], ids=["whatsapp"], indirect=True)
async def test_a_receipt_kept_as_a_message_does_not_take_the_sent_message_s_id(
    case: Case, hub: Hub, fake_api: FakeApi, nats_client
) -> None:
    """A status in a state the codec does not know is kept as an `unsupported` message carrying the sent
    message's native id; the statuses after it still name the app's message."""
    native_id = case.new_native_id(next(_serial))
    fake_api.responder = lambda _: case.send_response(fake_api.base_url, native_id)
    app = await Processor(nats_client, hub.subjects.prefix).start()
    conversation = c.Conversation(id=c.conversation_id(TENANT, case.channel, case.chat), channel=case.channel,
                                  connection=case.channel, native_id=case.chat)
    message = c.Message(id=c.new_id(), tenant=TENANT, conversation=conversation, ts=c.now(), direction="outbound",
                        parts=[c.Text(text="Your order has shipped")])
    await app.send(message)
    assert (await app.next_status()).state == "sent"

    (delivered, _), _ = case.webhooks(fake_api.base_url, native_id)
    unknown = json.loads(delivered)
    unknown["entry"][0]["changes"][0]["value"]["statuses"][0]["status"] = "state_from_the_future"
    url = f"{hub.http_url}/webhooks/{case.channel}/{case.channel}"
    sign = case.signed(fake_api.base_url)
    async with aiohttp.ClientSession() as session:
        for body in (json.dumps(unknown).encode(), delivered):
            async with session.post(url, data=body, headers=sign(url, body)) as response:
                assert response.status == 200, await response.text()
    kept, _ = await app.next()
    assert isinstance(kept, c.Message) and isinstance(kept.parts[0], c.Unsupported)
    status = await app.next_status()
    assert (status.state, status.message_id) == ("delivered", message.id)
