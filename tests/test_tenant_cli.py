"""`babelhub tenant …` and `babelhub key …` as an operator runs them, against a running `babelhub run`
with its embedded nats-server: a tenant and keys made from the command line work over HTTP and NATS at
once, every change is audited as done by `cli`, and mistakes get a clear error and a non-zero exit."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import nats
import pytest

from babelhub.services.broker import free_port
from tests.hubkit import HubProcess, write_config


def babelhub(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BABELHUB_")}
    return subprocess.run([sys.executable, "-m", "babelhub", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60, check=False)


async def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(babelhub, cwd, *args)


async def get(url: str, key: str) -> tuple[int, object]:
    async with aiohttp.ClientSession() as http, http.get(url, headers={"Authorization": f"Bearer {key}"}) as answer:
        return answer.status, await answer.json()


async def connect_when_admitted(url: str, user: str, password: str) -> nats.NATS:
    """The hub admits a tenant made by another process once its watch has seen it: soon, not at once."""
    for _ in range(100):
        try:
            return await nats.connect(url, user=user, password=password, allow_reconnect=False,
                                      max_reconnect_attempts=0, connect_timeout=2)
        except nats.errors.Error:
            await asyncio.sleep(0.1)
    raise AssertionError(f"NATS user {user} was never admitted")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "hub.toml", f"""
[hub]
http = "127.0.0.1:{free_port()}"
nats_port = {free_port()}
data_dir = "{tmp_path / 'data'}"
[[tenants]]
id = "acme"
""")


async def test_tenants_and_keys_made_from_the_command_line_work_at_once(
        tmp_path: Path, config: Path, hub_processes: list[HubProcess]) -> None:
    hub = HubProcess(config, tmp_path)
    hub_processes.append(hub)
    hub.start()
    text = config.read_text()
    http_url = "http://" + text.split('http = "')[1].split('"')[0]
    await hub.wait_ready(http_url)
    conf = str(config)

    made = await cli(tmp_path, "tenant", "create", "globex", "--requests-per-second", "5", "--config", conf)
    assert made.returncode == 0, made.stderr
    printed = dict(line.split(None, 1) for line in made.stdout.splitlines() if line.startswith("  "))
    assert printed["user"] == "tenant-globex"
    processor = await connect_when_admitted(printed["url"], printed["user"], printed["password"])
    await processor.close()
    again = await cli(tmp_path, "credentials", "globex", "--config", conf)
    assert again.returncode == 0 and f"password      {printed['password']}" in again.stdout, again.stderr

    key = await cli(tmp_path, "key", "create", "globex", "--scopes", "admin,send", "--name", "ops", "--config", conf)
    assert key.returncode == 0, key.stderr
    secret = key.stdout.splitlines()[-1]
    status, keys = await get(f"{http_url}/v1/keys", secret)
    assert status == 200 and isinstance(keys, dict)
    (record,) = keys["data"]
    assert record["scopes"] == ["admin", "send"] and record["name"] == "ops"
    assert secret.startswith(f"bh_{record['id']}_")
    status, audit = await get(f"{http_url}/v1/audit", secret)
    assert status == 200 and isinstance(audit, dict)
    assert [(e["actor"], e["action"], e["target"]) for e in audit["data"]] == [("cli", "key.create", record["id"])]

    listed = await cli(tmp_path, "key", "list", "globex", "--config", conf)
    assert record["id"] in listed.stdout and "active" in listed.stdout and secret not in listed.stdout
    tenants = await cli(tmp_path, "tenant", "list", "--config", conf)
    assert tenants.stdout.splitlines()[0] == "acme  config file"
    assert tenants.stdout.splitlines()[1].startswith("globex  made ") and "requests_per_second=5.0" in tenants.stdout

    revoked = await cli(tmp_path, "key", "revoke", "globex", record["id"], "--config", conf)
    assert revoked.returncode == 0, revoked.stderr
    assert (await get(f"{http_url}/v1/keys", secret))[0] == 401

    for args, says in [(("tenant", "create", "a.b"), "$.id"), (("tenant", "create", "acme"), "config file"),
                       (("key", "create", "globex", "--scopes", "root"), "$.scopes[0]"),
                       (("key", "create", "nobody", "--scopes", "read"), "no tenant 'nobody'"),
                       (("key", "revoke", "acme", record["id"]), "no key"),
                       (("tenant", "delete", "acme"), "config file")]:
        refused = await cli(tmp_path, *args, "--config", conf)
        assert refused.returncode == 1 and says in refused.stderr, (args, refused.stderr)

    deleted = await cli(tmp_path, "tenant", "delete", "globex", "--config", conf)
    assert deleted.returncode == 0 and "retention" in deleted.stdout, deleted.stderr
    assert "globex" not in (await cli(tmp_path, "tenant", "list", "--config", conf)).stdout


async def test_without_a_running_hub_the_command_says_so(tmp_path: Path, config: Path) -> None:
    refused = await cli(tmp_path, "tenant", "list", "--config", str(config))
    assert refused.returncode == 1 and "is `babelhub run` running?" in refused.stderr, refused.stderr
