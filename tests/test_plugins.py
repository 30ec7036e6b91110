"""The extension points (babelhub/plugins.py): a processor transport or an inbound source from another
package plugs in by its entry-point name alone, and a name nothing is registered under fails the start
with the path of the setting."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from babelhub.errors import ConfigError
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from tests.hubkit import StartHub, WebVisitor, unique_prefix, write_config

OUTSIDE_MODULE = '''
"""A processor transport shipped by another package: it keeps what its tenant's customers wrote and
shows it on a route of its own."""

from aiohttp import web

from babelhub import canonical as c
from babelhub.plugins import ProcessorTransport

EVENTS = []


class Recorder(ProcessorTransport):
    name = "recorder"

    def __init__(self, processor, services):
        super().__init__(processor, services)
        self.texts = []

    def routes(self):
        return [web.get(f"/recorder/{self.processor.id}", self._show)]

    async def start(self):
        EVENTS.append("start")
        prefix = self.services.ctx.subjects.prefix
        await self.services.consume("messages", f"{prefix}.{self.processor.tenant}.in.>",
                                    f"processor-{self.processor.id}", self._on_inbound)

    async def stop(self):
        EVENTS.append("stop")

    async def _on_inbound(self, msg):
        envelope = c.decode(msg.data)
        self.texts += [part.text for part in envelope.parts if isinstance(part, c.Text)]
        await msg.ack()

    async def _show(self, request):
        return web.json_response(self.texts)
'''


@pytest.fixture
def outside_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed distribution of its own (a module and its dist-info on sys.path), registering the
    `recorder` transport: what `pip install` of a third-party package leaves behind."""
    (tmp_path / "outside_transport.py").write_text(OUTSIDE_MODULE)
    dist_info = tmp_path / "outside_transport-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: outside-transport\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[babelhub.transports]\nrecorder = outside_transport:Recorder\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


async def test_a_transport_from_another_package_plugs_in_by_name(
        outside_package: Path, nats_server: EmbeddedServer, start_hub: StartHub) -> None:
    import outside_transport  # type: ignore[import-not-found]

    config = cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_server.url, subject_prefix=unique_prefix()),
        tenants=[cfg.Tenant(id="demo")],
        connections=[cfg.Connection(id="webchat", tenant="demo", channel="webchat")],
        processors=[cfg.Processor(id="rec", tenant="demo", transport="recorder")],
    )
    hub = await start_hub(config)
    assert outside_transport.EVENTS == ["start"]
    async with aiohttp.ClientSession() as session:
        await (await WebVisitor.open(session, hub.http_url)).say("hello, plug-in")

        for _ in range(300):
            async with session.get(hub.http_url + "/recorder/rec") as response:  # the plug-in's own route
                recorded = await response.json()
            if recorded:
                break
            await asyncio.sleep(0.05)
        assert recorded == ["hello, plug-in"]
    await hub.stop()
    assert outside_transport.EVENTS == ["start", "stop"]


@pytest.mark.parametrize(("entry", "refusal"), [
    ('[[processors]]\nid = "p"\ntenant = "demo"\ntransport = "htp"',
     "$.processors[0].transport: no processor transport 'htp'; "
     "installed: audio_loopback, echo, http, nats, redis, websocket"),
    ('[[connections]]\nid = "c"\ntenant = "demo"\nchannel = "webchat"\nmode = "smoke-signals"',
     "$.connections[0].mode: no inbound source 'smoke-signals'; "
     "installed: discord_gateway, inject, media, polling, redis, slack_socket, webhook, websocket"),
])
def test_a_name_nothing_is_registered_under_fails_the_start_with_its_path(
        tmp_path: Path, entry: str, refusal: str) -> None:
    config = write_config(tmp_path / "hub.toml", f'[[tenants]]\nid = "demo"\n\n{entry}\n')
    with pytest.raises(ConfigError) as refused:
        cfg.load(config)
    assert str(refused.value) == refusal
