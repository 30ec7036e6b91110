"""`babelhub run` as a user runs it: a real process, killed and restarted, with and without the embedded
nats-server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import aiohttp

from babelhub import canonical as c
from babelhub.services.broker import EmbeddedServer, free_port
from tests.hubkit import (
    BOT_TOKEN,
    SECRET,
    TENANT,
    HubProcess,
    stream_messages,
    telegram_update,
    unique_prefix,
    write_config,
)

HEADERS = {"X-Telegram-Bot-Api-Secret-Token": SECRET}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


async def test_sigkill_right_after_200_loses_and_duplicates_nothing(
    nats_server: EmbeddedServer, nats_client, fake_api, tmp_path: Path, hub_processes: list[HubProcess]
) -> None:
    port, prefix = free_port(), unique_prefix()
    config = write_config(tmp_path / "hub.toml", f"""
[hub]
http = "127.0.0.1:{port}"
nats = "{nats_server.url}"
subject_prefix = "{prefix}"
ack_wait_seconds = 2.0
[[tenants]]
id = "{TENANT}"
[[connections]]
id = "tg"
tenant = "{TENANT}"
channel = "telegram"
api_base = "{fake_api.base_url}"
secrets = {{ bot_token = "{BOT_TOKEN}", secret_token = "{SECRET}" }}
""")
    url = f"http://127.0.0.1:{port}"
    first = HubProcess(config, tmp_path)
    hub_processes.append(first)
    first.start()
    await first.wait_ready(url)

    burst = 40
    async with aiohttp.ClientSession() as session:
        for n in range(1, burst + 1):
            async with session.post(f"{url}/webhooks/telegram/tg", json=telegram_update(n, 42, f"m{n}"),
                                    headers=HEADERS) as response:
                assert response.status == 200
    assert first.process is not None
    first.process.send_signal(signal.SIGKILL)  # right after the last 200, work still in flight
    first.process.wait()

    second = HubProcess(config, tmp_path)
    hub_processes.append(second)
    second.start()
    await second.wait_ready(url)
    # The channel retries what it thinks may have been lost: absorbed as well.
    async with aiohttp.ClientSession() as session, session.post(
        f"{url}/webhooks/telegram/tg", json=telegram_update(burst, 42, f"m{burst}"), headers=HEADERS
    ) as response:
        assert response.status == 200

    subject, stream = f"{prefix}.{TENANT}.in.>", f"{prefix.upper()}_MESSAGES"
    stored: list[bytes] = []
    for _ in range(300):  # in-flight records come back after ack_wait_seconds
        stored = await stream_messages(nats_client, subject, stream)
        if len(stored) >= burst:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    stored = await stream_messages(nats_client, subject, stream)
    texts = [json.loads(data)["parts"][0]["text"] for data in stored]
    assert sorted(texts, key=lambda t: int(t[1:])) == [f"m{n}" for n in range(1, burst + 1)]
    assert texts == [f"m{n}" for n in range(1, burst + 1)]  # and in order
    ids = [c.decode(data).id for data in stored]
    assert len(set(ids)) == burst


async def test_embedded_nats_starts_and_stops_with_the_hub(tmp_path: Path, hub_processes: list[HubProcess]) -> None:
    port = free_port()
    config = write_config(tmp_path / "hub.toml", f"""
[hub]
http = "127.0.0.1:{port}"
nats_port = {free_port()}
data_dir = "{tmp_path / 'data'}"
[[tenants]]
id = "demo"
[[connections]]
id = "webchat"
tenant = "demo"
channel = "webchat"
[[processors]]
id = "echo"
tenant = "demo"
transport = "echo"
""")
    url = f"http://127.0.0.1:{port}"
    hub = HubProcess(config, tmp_path)
    hub_processes.append(hub)
    hub.start()
    await hub.wait_ready(url)
    children = hub.children()
    assert len(children) == 1 and "nats-server" in Path(f"/proc/{children[0]}/cmdline").read_text()
    assert (tmp_path / "data" / "jetstream").is_dir()

    assert hub.process is not None
    hub.process.send_signal(signal.SIGTERM)
    await asyncio.to_thread(hub.process.wait, 30)
    text = hub.output()
    assert hub.process.returncode == 0, text
    assert "babelhub is running" in text and f"{url}/" in text and "shutting down" in text
    assert not pid_alive(children[0])

    # A kill -9 of the hub takes its embedded server with it: nothing is left behind.
    again = HubProcess(config, tmp_path)
    hub_processes.append(again)
    again.start()
    await again.wait_ready(url)
    (server,) = again.children()
    assert again.process is not None
    again.process.kill()
    again.process.wait()
    for _ in range(100):
        if not pid_alive(server):
            break
        await asyncio.sleep(0.05)
    assert not pid_alive(server)
