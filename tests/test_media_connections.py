"""Media connections in the config and the hub: a connection whose `channel` names a telephony media
stream is valid with its provider's secrets, comes in through the `media` source, and refuses the
messages a processor sends to its conversation with a clear error."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from nats.aio.client import Client as NATS

from babelhub import canonical as c
from babelhub.codecs.base import EncodeContext
from babelhub.errors import ConfigError, EncodeError
from babelhub.media.channel import load_provider, providers
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from tests.hubkit import Processor, StartHub, unique_prefix

MEDIA = '[[tenants]]\nid = "a"\n[[connections]]\nid = "calls"\ntenant = "a"\nchannel = "twilio_media"\n'


def load(tmp_path: Path, text: str) -> cfg.Config:
    path = tmp_path / "babelhub.toml"
    path.write_text(text, "utf-8")
    return cfg.load(path, env={})


def test_a_media_connection_is_valid_with_its_providers_secrets(tmp_path: Path) -> None:
    config = load(tmp_path, MEDIA + '[connections.secrets]\nauth_token = "t"\n')
    assert config.connections[0].channel == "twilio_media"
    assert cfg.channel_codec("twilio_media").inbound == "media"


@pytest.mark.parametrize(("secrets", "message"), [
    ("", "$.connections[0].secrets.auth_token: missing; twilio_media needs it"),
    ('[connections.secrets]\nauth_token = "t"\napi_key = "k"\n',
     "$.connections[0].secrets.api_key: twilio_media takes no such secret (known: auth_token)"),
])
def test_a_media_connection_without_its_providers_secrets_is_refused(tmp_path: Path, secrets: str,
                                                                     message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, MEDIA + secrets)
    assert message in str(refused.value)


async def test_the_media_source_takes_only_media_connections(nats_server: EmbeddedServer,
                                                              start_hub: StartHub) -> None:
    config = cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_server.url, subject_prefix=unique_prefix()),
        tenants=[cfg.Tenant(id="a")], connections=[cfg.Connection(id="chat", tenant="a", channel="webchat",
                                                                  mode="media")])
    with pytest.raises(ConfigError) as refused:
        await start_hub(config)
    assert "$.connections[0].mode: webchat is no telephony media stream; installed: " in str(refused.value)


async def test_a_message_sent_to_a_media_conversation_fails_with_the_reason(
        nats_server: EmbeddedServer, nats_client: NATS, start_hub: StartHub) -> None:
    config = cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_server.url, subject_prefix=unique_prefix()),
        tenants=[cfg.Tenant(id="a")],
        connections=[cfg.Connection(id="calls", tenant="a", channel="twilio_media", secrets={"auth_token": "t"})])
    hub = await start_hub(config)
    async with aiohttp.ClientSession() as session, session.get(f"{hub.http_url}/readyz") as ready:
        assert ready.status == 200
    assert hub.addresses() == {"calls": f"WebSocket {hub.http_url.replace('http', 'ws', 1)}/media/calls"}
    app = await Processor(nats_client, hub.subjects.prefix, "a").start()
    conversation = c.conversation_id("a", "calls", "CA123")
    await app.send(c.Message(id=c.new_id(), tenant="a", direction="outbound", ts=c.now(), parts=[c.Text(text="hi")],
                             conversation=c.Conversation(id=conversation, connection="calls", native_id="CA123")))
    status = await asyncio.wait_for(app.next_status(), 15)
    assert status.state == "failed" and status.error is not None
    assert "carries a call's audio, not messages" in status.error.message


@pytest.mark.parametrize("channel", providers())
def test_every_installed_provider_stands_in_for_a_codec_with_its_own_secrets(channel: str) -> None:
    stand_in = cfg.channel_codec(channel)
    provider = load_provider(channel)
    assert stand_in.channel == provider.channel == channel
    assert stand_in.secret_settings is provider.secret_settings
    assert stand_in.option_settings is provider.option_settings
    assert stand_in.inbound == "media"
    with pytest.raises(EncodeError, match="carries a call's audio, not messages"):
        stand_in.encode(c.Message(id="m", tenant="a", conversation=c.Conversation(id="x"), ts=c.now()),
                        EncodeContext(tenant="a", connection="calls", to="x"))


def test_a_media_connection_takes_its_providers_options_and_no_others(tmp_path: Path) -> None:
    genesys = ('[[tenants]]\nid = "a"\n[[connections]]\nid = "hook"\ntenant = "a"\nchannel = "genesys_media"\n'
               '[connections.secrets]\napi_key = "k"\n[connections.options]\n')
    config = load(tmp_path, genesys + 'supported_languages = ["en-US"]\npublic_url = "wss://hub.example/media/hook"\n')
    assert config.connections[0].options["supported_languages"] == ["en-US"]
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, genesys + 'languages = ["en-US"]\n')
    assert "$.connections[0].options.languages: genesys_media takes no such option" in str(refused.value)
