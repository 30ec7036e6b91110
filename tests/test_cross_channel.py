"""Every channel, end to end through one hub: one signed inbound message from each channel goes through
its webhook (web chat: its WebSocket), a processor on NATS answers each with text + an image + three
buttons aimed at every *other* channel, and every target's (fake) API receives a request it accepts.

The fake APIs answer with each channel's recorded success body, so a `sent` status means the channel's
own codec understood the answer; the request checks below look at what each channel must receive.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote_plus

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from babelhub import canonical as c
from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from tests.fakeapi import FakeApi, Recorded, Reply
from tests.hubkit import TENANT, Processor, WebVisitor, unique_prefix

FIXTURES = Path(__file__).parent / "fixtures"
TEXT = "Your order has shipped"
IMAGE = "https://cdn.example.com/parcel.jpg"
TITLES = ["Track parcel", "Change address", "Talk to us"]
FOREIGN_FILE_ID = "AgACAgQAAxkBAAIC-issued-by-one-channel"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
DISCORD_KEY = Ed25519PrivateKey.generate()


def fixture(channel: str, name: str) -> bytes:
    return (FIXTURES / channel / name).read_bytes()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rs256(claims: dict[str, Any], kid: str) -> str:
    header = b64url(json.dumps({"alg": "RS256", "kid": kid, "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims).encode())
    signature = RSA_KEY.sign(f"{header}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{payload}.{b64url(signature)}"


def jwks(kid: str) -> str:
    numbers = RSA_KEY.public_key().public_numbers()
    n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
    return json.dumps({"keys": [{"kty": "RSA", "use": "sig", "kid": kid, "n": b64url(n),
                                 "e": b64url(numbers.e.to_bytes(3, "big"))}]})


def certificate() -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chat@system.gserviceaccount.com")])
    now = datetime.now(UTC)
    built = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(RSA_KEY.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
             .not_valid_after(now + timedelta(days=1)).sign(RSA_KEY, hashes.SHA256()))
    return built.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class Channel:
    """One connection of the test: how to deliver its inbound message, and what its API answers."""

    connection: cfg.Connection
    body: Callable[[str], bytes]
    """The inbound webhook body, given the fake API's base URL (Teams names its serviceUrl in it)."""
    headers: Callable[[str, bytes], dict[str, str]]
    """The headers that sign it, given the webhook URL and the body."""
    success: Reply
    requests: list[Recorded] = field(default_factory=list)


def meta_signature(secret: str) -> Callable[[str, bytes], dict[str, str]]:
    return lambda _, body: {"Content-Type": "application/json", "X-Hub-Signature-256":
                            "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()}


def slack_signature(_: str, body: bytes) -> dict[str, str]:
    stamp = str(int(time.time()))
    digest = hmac.new(b"slack-signing", f"v0:{stamp}:".encode() + body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": f"v0={digest}"}


def discord_signature(_: str, body: bytes) -> dict[str, str]:
    stamp = str(int(time.time()))
    return {"Content-Type": "application/json", "X-Signature-Timestamp": stamp,
            "X-Signature-Ed25519": DISCORD_KEY.sign(stamp.encode() + body).hex()}


def twilio_signature(url: str, body: bytes) -> dict[str, str]:
    signed = url + "".join(k + v for k, v in sorted(parse_qsl(body.decode(), keep_blank_values=True)))
    digest = hmac.new(b"twilio-token", signed.encode(), hashlib.sha1).digest()
    return {"Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": base64.b64encode(digest).decode()}


def bearer(token: Callable[[], str]) -> Callable[[str, bytes], dict[str, str]]:
    return lambda _, __: {"Content-Type": "application/json", "Authorization": f"Bearer {token()}"}


def teams_body(base: str) -> bytes:
    activity = json.loads(fixture("teams", "message_personal_rich_text.json"))
    activity["serviceUrl"] = f"{base}/teams/"
    return json.dumps(activity).encode()


def teams_token(base: str) -> str:
    now = int(time.time())
    return rs256({"iss": "https://api.botframework.com", "aud": "teams-app", "nbf": now - 10, "exp": now + 600,
                  "serviceurl": f"{base}/teams/"}, "bf-key")


def google_token() -> str:
    now = int(time.time())
    return rs256({"iss": "chat@system.gserviceaccount.com", "aud": "1234567890", "iat": now, "exp": now + 600},
                 "cert-1")


def success(channel: str, name: str, status: int = 200) -> Reply:
    return Reply(status=status, body=json.loads(fixture(channel, name)))


def channels(base: str) -> dict[str, Channel]:
    def connection(id: str, channel: str, secrets: dict[str, str], **options: Any) -> cfg.Connection:
        return cfg.Connection(id=id, tenant=TENANT, channel=channel, api_base=f"{base}/{id}", secrets=secrets,
                              options=options)

    public_key = DISCORD_KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    twilio_raw = json.loads(fixture("twilio", "sms_text.json"))["_raw"].encode()
    return {
        "telegram": Channel(
            connection("telegram", "telegram", {"bot_token": "1:T", "secret_token": "tg-secret"}),
            lambda _: json.dumps({"update_id": 1, "message": {
                "message_id": 5, "date": 1_767_225_600, "text": "hi", "from": {"id": 42, "is_bot": False,
                "first_name": "Ada"}, "chat": {"id": 42, "type": "private", "first_name": "Ada"}}}).encode(),
            lambda _, __: {"Content-Type": "application/json", "X-Telegram-Bot-Api-Secret-Token": "tg-secret"},
            success("telegram", "response_send_message.json")),
        "whatsapp": Channel(
            connection("whatsapp", "whatsapp", {"access_token": "wa-token", "app_secret": "wa-app"},
                       phone_number_id="106540352242922"),
            lambda _: fixture("whatsapp", "text.json"), meta_signature("wa-app"),
            success("whatsapp", "response_success.json")),
        "messenger": Channel(
            connection("messenger", "messenger", {"page_access_token": "pg-token", "app_secret": "fb-app"}),
            lambda _: fixture("messenger", "message_reply_to.json"), meta_signature("fb-app"),
            success("messenger", "response_send_ok.json")),
        "instagram": Channel(
            connection("instagram", "instagram", {"access_token": "ig-token", "app_secret": "ig-app"}),
            lambda _: fixture("instagram", "reply_to_message.json"), meta_signature("ig-app"),
            success("messenger", "response_send_ok.json")),
        "slack": Channel(
            connection("slack", "slack", {"bot_token": "xoxb-1", "signing_secret": "slack-signing"}),
            lambda _: fixture("slack", "event_message_im.json"), slack_signature,
            success("slack", "response_chat_postMessage_ok.json")),
        "teams": Channel(
            connection("teams", "teams", {"app_id": "teams-app", "signing_keys": jwks("bf-key"),
                                          "bot_token": "bf-token"}),
            teams_body, bearer(lambda: teams_token(base)), success("teams", "response_resource.json", 201)),
        "google_chat": Channel(
            connection("google_chat", "google_chat", {"audience": "1234567890", "access_token": "ya29",
                                                      "signing_keys": json.dumps({"cert-1": certificate()})}),
            lambda _: fixture("google_chat", "message_room_mention.json"), bearer(google_token),
            success("google_chat", "response_message_created.json")),
        "discord": Channel(
            connection("discord", "discord", {"public_key": public_key.hex(), "bot_token": "discord-bot"}),
            lambda _: fixture("discord", "interaction_slash_command.json"), discord_signature,
            success("discord", "message_object.json")),
        "twilio": Channel(
            connection("twilio", "twilio", {"account_sid": "AC123", "auth_token": "twilio-token"},
                       **{"from": "+15550001"}),
            lambda _: twilio_raw, twilio_signature, success("twilio", "response_created.json", 201)),
        "evolution": Channel(
            connection("evolution", "evolution", {"apikey": "evo-key"}, instance="shop"),
            lambda _: fixture("evolution", "upsert_text.json"),
            lambda _, __: {"Content-Type": "application/json", "apikey": "evo-key"},
            success("evolution", "response_send_text.json", 201)),
    }


@pytest.fixture
async def world(nats_server: EmbeddedServer, fake_api: FakeApi) -> AsyncIterator[tuple[Hub, dict[str, Channel]]]:
    every = channels(fake_api.base_url)

    def answer(request: Recorded) -> Reply:
        channel = every[request.path.split("/")[1]]
        channel.requests.append(request)
        return channel.success

    fake_api.responder = answer
    config = cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_server.url, subject_prefix=unique_prefix()),
        tenants=[cfg.Tenant(id=TENANT)],
        connections=[*(channel.connection for channel in every.values()),
                     cfg.Connection(id="webchat", tenant=TENANT, channel="webchat")],
    )
    async with Hub(config) as hub:
        yield hub, every


async def test_each_channel_answers_into_every_other_channel(world: tuple[Hub, dict[str, Channel]],
                                                            nats_client) -> None:
    hub, every = world
    app = await Processor(nats_client, hub.subjects.prefix).start()
    async with aiohttp.ClientSession() as session:
        for name, channel in every.items():
            url = f"{hub.http_url}/webhooks/{channel.connection.channel}/{channel.connection.id}"
            body = channel.body(hub.ctx.connections["teams"].settings.api_base.rsplit("/", 1)[0])
            async with session.post(url, data=body, headers=channel.headers(url, body)) as response:
                assert response.status in (200, 201, 202), f"{name}: {response.status} {await response.text()}"
        visitor = await WebVisitor.open(session, hub.http_url)
        await visitor.say("hi from the web", "w1")

        inbound: dict[str, c.Message] = {}
        while len(inbound) < len(every) + 1:
            envelope, _ = await app.next()
            if isinstance(envelope, c.Message) and envelope.direction == "inbound":
                inbound.setdefault(envelope.conversation.connection, envelope)
        assert set(inbound) == {*every, "webchat"}

        for source in inbound.values():
            targets = [c.Target(connection=other.conversation.connection, to=other.conversation.native_id)
                       for other in inbound.values() if other is not source]
            await app.reply(
                source,
                c.Text(text=TEXT),
                # A file id belongs to the channel that issued it: fan-out copies use the url instead.
                c.Media(media="image", url=IMAGE, file_id=FOREIGN_FILE_ID, caption="Your parcel"),
                c.Buttons(text="What next?", buttons=[c.Button(id=f"b{n}", title=t) for n, t in enumerate(TITLES)]),
                targets=targets,
            )
        expected = len(inbound) * (len(inbound) - 1)
        statuses = [await app.next_status() for _ in range(expected)]
        failed = [s for s in statuses if s.state != "sent"]
        assert not failed, [(s.conversation.connection, s.error) for s in failed]

        web_messages = [await visitor.reply() for _ in range(len(inbound) - 1)]
        await visitor.close()

    for name, channel in every.items():
        assert channel.requests, f"{name} received nothing"
        bodies = " ".join(_readable(request) for request in channel.requests)
        assert TEXT in bodies, f"{name} never got the text"
        assert IMAGE in bodies, f"{name} never got the image (nor a link to it)"
        assert all(title in bodies for title in TITLES), f"{name} lost a button"
        assert FOREIGN_FILE_ID not in bodies, f"{name} was sent another channel's file id"
    for frame in web_messages:
        assert [part["type"] for part in frame["parts"]] == ["text", "media", "buttons"]


def _readable(request: Recorded) -> str:
    """The request body as text a person would search: JSON unescaped, forms decoded."""
    if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return " ".join(f"{k}={v}" for k, v in parse_qsl(request.body.decode()))
    try:
        return json.dumps(json.loads(request.body), ensure_ascii=False)
    except ValueError:
        return request.body.decode(errors="replace")


async def test_numbered_choices_on_sms_come_back_as_actions(world: tuple[Hub, dict[str, Channel]],
                                                            nats_client) -> None:
    hub, every = world
    sms = every["twilio"]
    app = await Processor(nats_client, hub.subjects.prefix).start()
    url = f"{hub.http_url}/webhooks/twilio/twilio"

    async def text_in(body_text: str, sid: str) -> c.Message:
        form = dict(parse_qsl(sms.body("").decode(), keep_blank_values=True))
        form.update(Body=body_text, MessageSid=sid, SmsMessageSid=sid, SmsSid=sid)
        body = "&".join(f"{k}={v}" for k, v in ((k, quote_plus(v)) for k, v in form.items())).encode()
        async with aiohttp.ClientSession() as session, session.post(url, data=body,
                                                                   headers=sms.headers(url, body)) as response:
            assert response.status == 200, await response.text()
        envelope, _ = await app.next()
        assert isinstance(envelope, c.Message)
        return envelope

    first = await text_in("hi", "SM" + "1" * 32)
    menu_message = await app.reply(first, c.Buttons(text="What next?",
                                     buttons=[c.Button(id=f"b{n}", title=t) for n, t in enumerate(TITLES)]))
    assert (await app.next_status()).state == "sent"
    menu = dict(parse_qsl(sms.requests[-1].body.decode()))["Body"]
    assert menu == "What next?\n1. Track parcel\n2. Change address\n3. Talk to us"

    by_number = await text_in("2", "SM" + "2" * 32)
    assert by_number.parts == [c.Text(text="2"), c.Action(id="b1", title="Change address", source=menu_message.id)]
    by_title = await text_in("talk to us", "SM" + "3" * 32)
    assert isinstance(by_title.parts[-1], c.Action) and by_title.parts[-1].id == "b2"
    unrelated = await text_in("thanks!", "SM" + "4" * 32)
    assert [type(part) for part in unrelated.parts] == [c.Text]
