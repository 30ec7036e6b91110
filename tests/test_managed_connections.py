"""Connections made, rotated, disabled and deleted over `/v1/connections` while hubs run: served by every
hub process without a restart, their secrets sealed at rest and never shown (answers, logs, the KV
bucket, the streams, the nats-server's data directory)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import msgspec
import pytest

from babelhub import canonical as c
from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from babelhub.services.addresses import api_base_problem
from babelhub.services.broker import EmbeddedServer, free_port
from babelhub.services.managed import ConnectionStore, decode_record
from babelhub.services.outbox import Refusal
from babelhub.services.secretbox import SecretBox, key_id, new_key, read_key
from tests.fakeapi import FakeApi, Reply
from tests.hubkit import (
    HubProcess,
    Processor,
    StartHub,
    eventually,
    stream_messages,
    telegram_responder,
    telegram_update,
    unique_prefix,
    with_hub,
    write_config,
)

ACME, OTHER = "acme", "other"
KEYS = {ACME: "acme-admin-config-key", OTHER: "other-admin-config-key"}
TOKEN = "111111:first-bot-token-never-shown"
SECRET = "first-webhook-secret-never-shown"
NEW_TOKEN = "222222:rotated-bot-token-never-shown"
NEW_SECRET = "rotated-webhook-secret-never-shown"
PLAIN = (TOKEN, SECRET, NEW_TOKEN, NEW_SECRET)


def config(nats_url: str, prefix: str, master_key: str = "") -> cfg.Config:
    return cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_url, subject_prefix=prefix, master_key=master_key,
                            allow_private_api_base=True),  # the fake channel APIs listen on 127.0.0.1
        tenants=[cfg.Tenant(id=ACME, api_keys=[KEYS[ACME]]), cfg.Tenant(id=OTHER, api_keys=[KEYS[OTHER]])],
        connections=[cfg.Connection(id="chat", tenant=ACME, channel="webchat"),
                     cfg.Connection(id="their-chat", tenant=OTHER, channel="webchat")])


def telegram(api_base: str, connection_id: str = "tg-api", **fields: Any) -> dict[str, Any]:
    return {"id": connection_id, "channel": "telegram", "mode": "webhook", "api_base": api_base,
            "secrets": {"bot_token": TOKEN, "secret_token": SECRET}, **fields}


class Client:
    """An HTTP client of one hub that keeps every answer's text, to be searched for secrets."""

    def __init__(self, http: aiohttp.ClientSession, answers: list[str]) -> None:
        self.http = http
        self.answers = answers

    async def call(self, hub: Hub, method: str, path: str, key: str = KEYS[ACME], body: Any = None,
                   data: bytes | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key}"}
        async with self.http.request(method, hub.http_url + path, json=body if data is None else None, data=data,
                                     headers=headers) as response:
            text = await response.text()
            self.answers.append(text)
            return response.status, json.loads(text) if text else None

    async def webhook(self, hub: Hub, secret: str, update: dict[str, Any],
                      connection_id: str = "tg-api") -> int:
        async with self.http.post(f"{hub.http_url}/webhooks/telegram/{connection_id}", json=update,
                                  headers={"X-Telegram-Bot-Api-Secret-Token": secret}) as response:
            self.answers.append(await response.text())
            return response.status


@pytest.fixture
def answers() -> list[str]:
    return []


@pytest.fixture
async def client(answers: list[str]) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession() as http:
        yield Client(http, answers)


@pytest.fixture
async def telegram_api(fake_api: FakeApi) -> FakeApi:
    fake_api.responder = telegram_responder
    return fake_api


@pytest.fixture
async def hub(nats_server: EmbeddedServer, start_hub: StartHub) -> Hub:
    return await start_hub(config(nats_server.url, unique_prefix(), new_key()))


async def webhook_answers(client: Client, hub: Hub, secret: str, update: dict[str, Any], expected: int,
                          connection_id: str = "tg-api") -> None:
    """Post until the hub answers `expected` (a change reaches each hub process through its KV watch)."""
    for _ in range(300):
        if await client.webhook(hub, secret, update, connection_id) == expected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the webhook never answered {expected}")


def sends(api: FakeApi, token: str) -> list[Any]:
    return [request for request in api.requests if request.path == f"/bot{token}/sendMessage"]


async def test_a_connection_made_over_the_api_takes_webhooks_and_sends_without_a_restart(
        hub: Hub, client: Client, telegram_api: FakeApi, nats_client: Any) -> None:
    app = await Processor(nats_client, hub.subjects.prefix, ACME).start()
    status, made = await client.call(hub, "POST", "/v1/connections", body=telegram(telegram_api.base_url))
    assert status == 201, made
    assert made["secrets"] == {"bot_token": "********", "secret_token": "********"}
    assert made["managed"] is True and made["tenant"] == ACME and made["secrets_updated_at"]
    await webhook_answers(client, hub, SECRET, telegram_update(1, 42, "hello new connection"), 200)
    inbound, _ = await app.next()
    assert isinstance(inbound, c.Message) and inbound.conversation.connection == "tg-api"
    await app.reply(inbound, c.Text(text="hi from a connection made at run time"))
    await eventually(lambda: len(sends(telegram_api, TOKEN)) == 1)
    assert sends(telegram_api, TOKEN)[0].json()["text"] == "hi from a connection made at run time"
    assert await client.webhook(hub, "a-wrong-secret-value", telegram_update(2, 42, "forged")) == 401

    status, listed = await client.call(hub, "GET", "/v1/connections")
    assert status == 200
    assert {(item["id"], item["managed"]) for item in listed["data"]} == {("chat", False), ("tg-api", True)}
    status, one = await client.call(hub, "GET", "/v1/connections/tg-api")
    assert status == 200 and one["secrets"]["bot_token"] == "********"


async def test_a_rotated_secret_is_used_by_every_hub_process_at_once(
        nats_server: EmbeddedServer, start_hub: StartHub, client: Client, telegram_api: FakeApi,
        nats_client: Any) -> None:
    shared = config(nats_server.url, unique_prefix(), new_key())
    hub_a, hub_b = await start_hub(shared), await start_hub(shared)
    app = await Processor(nats_client, hub_a.subjects.prefix, ACME).start()
    status, _ = await client.call(hub_a, "POST", "/v1/connections", body=telegram(telegram_api.base_url))
    assert status == 201
    await webhook_answers(client, hub_b, SECRET, telegram_update(1, 42, "before"), 200)
    await app.next()

    status, rotated = await client.call(hub_a, "PUT", "/v1/connections/tg-api", body={
        "channel": "telegram", "mode": "webhook", "api_base": telegram_api.base_url,
        "secrets": {"secret_token": NEW_SECRET, "bot_token": NEW_TOKEN}})
    assert status == 200 and rotated["secrets_updated_at"] >= rotated["created_at"]
    # Hub B, which was not asked, verifies with the new secret and refuses the old one, without a restart.
    await webhook_answers(client, hub_b, NEW_SECRET, telegram_update(2, 43, "after"), 200)
    assert await client.webhook(hub_b, SECRET, telegram_update(3, 43, "old secret")) == 401
    assert await client.webhook(hub_a, SECRET, telegram_update(4, 43, "old secret")) == 401
    inbound, _ = await app.next()
    assert isinstance(inbound, c.Message) and inbound.parts == [c.Text(text="after")]
    before = len(telegram_api.requests)
    await app.reply(inbound, c.Text(text="sent with the new token"))
    await eventually(lambda: len(sends(telegram_api, NEW_TOKEN)) == 1)
    assert not sends(telegram_api, TOKEN)[before:]

    # A rotation of one secret alone keeps the other.
    status, _ = await client.call(hub_b, "PUT", "/v1/connections/tg-api", body={
        "channel": "telegram", "api_base": telegram_api.base_url, "secrets": {"secret_token": SECRET}})
    assert status == 200
    await webhook_answers(client, hub_a, SECRET, telegram_update(5, 44, "once more"), 200)
    inbound, _ = await app.next()
    await app.reply(inbound, c.Text(text="still the new token"))
    await eventually(lambda: len(sends(telegram_api, NEW_TOKEN)) == 2)


async def test_a_disabled_connection_takes_nothing_and_sends_nothing_then_is_deleted(
        hub: Hub, client: Client, telegram_api: FakeApi, nats_client: Any) -> None:
    app = await Processor(nats_client, hub.subjects.prefix, ACME).start()
    assert (await client.call(hub, "POST", "/v1/connections", body=telegram(telegram_api.base_url)))[0] == 201
    await webhook_answers(client, hub, SECRET, telegram_update(1, 42, "hello"), 200)
    inbound, _ = await app.next()

    body = {**telegram(telegram_api.base_url), "disabled": True}
    body.pop("secrets")
    status, disabled = await client.call(hub, "PUT", "/v1/connections/tg-api", body=body)
    assert status == 200 and disabled["disabled"] is True and set(disabled["secrets"]) == {"bot_token", "secret_token"}
    await webhook_answers(client, hub, SECRET, telegram_update(2, 42, "while disabled"), 404)
    reply = await app.reply(inbound, c.Text(text="not sent"))
    failed = await app.next_status()
    while failed.message_id != reply.id or failed.state != "failed":
        failed = await app.next_status()
    assert failed.error is not None and failed.error.code == "disabled" and "tg-api" in failed.error.message
    assert not sends(telegram_api, TOKEN)

    status, _ = await client.call(hub, "DELETE", "/v1/connections/tg-api")
    assert status == 200
    assert (await client.call(hub, "GET", "/v1/connections/tg-api"))[0] == 404
    assert (await client.call(hub, "DELETE", "/v1/connections/tg-api"))[0] == 404
    body["disabled"] = False
    assert (await client.call(hub, "PUT", "/v1/connections/tg-api", body=body))[0] == 404
    await webhook_answers(client, hub, SECRET, telegram_update(3, 42, "after delete"), 404)


async def test_a_polled_connection_follows_its_rotation_and_stops_when_deleted(
        hub: Hub, client: Client, telegram_api: FakeApi) -> None:
    def responder(request: Any) -> Reply:
        if request.path.endswith("/getUpdates"):
            return Reply(body={"ok": True, "result": []})
        return telegram_responder(request)

    telegram_api.responder = responder
    body = telegram(telegram_api.base_url, "tg-poll", mode="polling", options={"poll_timeout": 0})
    assert (await client.call(hub, "POST", "/v1/connections", body=body))[0] == 201

    def polls(token: str) -> int:
        return sum(request.path == f"/bot{token}/getUpdates" for request in telegram_api.requests)

    await eventually(lambda: polls(TOKEN) > 0)
    body["secrets"] = {"bot_token": NEW_TOKEN}
    assert (await client.call(hub, "PUT", "/v1/connections/tg-poll", body=body))[0] == 200
    await eventually(lambda: polls(NEW_TOKEN) > 0)
    settled = polls(TOKEN)
    assert (await client.call(hub, "DELETE", "/v1/connections/tg-poll"))[0] == 200
    await asyncio.sleep(0.5)
    stopped = len(telegram_api.requests)
    await asyncio.sleep(0.5)
    assert len(telegram_api.requests) == stopped and polls(TOKEN) == settled
    assert "poller:tg-poll" not in hub.task_health


async def test_another_tenants_connection_is_answered_as_one_that_does_not_exist(
        hub: Hub, client: Client, telegram_api: FakeApi) -> None:
    assert (await client.call(hub, "POST", "/v1/connections", body=telegram(telegram_api.base_url)))[0] == 201
    theirs = KEYS[OTHER]
    for method, path, body in (("GET", "/v1/connections/tg-api", None), ("DELETE", "/v1/connections/tg-api", None),
                               ("PUT", "/v1/connections/tg-api", telegram(telegram_api.base_url)),
                               ("GET", "/v1/connections/chat", None)):
        status, refused = await client.call(hub, method, path, theirs, body)
        absent_status, absent = await client.call(hub, method, path.replace("tg-api", "nowhere").replace(
            "chat", "nowhere"), theirs, body)
        assert (status, absent_status) == (404, 404), (method, path, refused)
        assert refused["error"]["code"] == absent["error"]["code"] == "not_found"
    status, listed = await client.call(hub, "GET", "/v1/connections", theirs)
    assert [item["id"] for item in listed["data"]] == ["their-chat"]
    # The config file wins: its connections are changed there, not over the API.
    status, refused = await client.call(hub, "PUT", "/v1/connections/chat", body={"channel": "webchat"})
    assert status == 409 and "config file" in refused["error"]["message"]
    status, refused = await client.call(hub, "POST", "/v1/connections", body=telegram(telegram_api.base_url, "chat"))
    assert status == 409 and refused["error"]["path"] == "$.id"
    # A key without the admin scope reads but changes nothing.
    _, reader = await hub.services.keys.create(ACME, ["read"])
    assert (await client.call(hub, "GET", "/v1/connections/tg-api", reader))[0] == 200
    assert (await client.call(hub, "DELETE", "/v1/connections/tg-api", reader))[0] == 403


@pytest.mark.parametrize(("body", "status", "path"), [
    ({"id": "x", "channel": "no_such_channel"}, 400, "$.channel"),
    ({"id": "x", "channel": "Tele gram"}, 400, "$.channel"),
    ({"id": "x", "channel": "telegram", "secrets": {"bot_token": 5}}, 400, "$.secrets.bot_token"),
    ({"id": "x", "channel": "telegram", "secrets": ["bot_token"]}, 400, "$.secrets"),
    ({"id": "x", "channel": "telegram", "secrets": {"bot_token": TOKEN, "sneaky": "y"}}, 400, "$.secrets.sneaky"),
    ({"id": "x", "channel": "telegram", "secrets": {}}, 400, "$.secrets.bot_token"),
    ({"id": "a.*", "channel": "telegram", "secrets": {"bot_token": TOKEN}}, 400, "$.id"),
    ({"id": ">", "channel": "telegram", "secrets": {"bot_token": TOKEN}}, 400, "$.id"),
    ({"id": "x" * 65, "channel": "telegram", "secrets": {"bot_token": TOKEN}}, 400, "$.id"),
    ({"channel": "telegram", "secrets": {"bot_token": TOKEN}}, 400, "$.id"),
    ({"id": "x", "channel": "telegram", "tenant": OTHER, "secrets": {"bot_token": TOKEN}}, 400, "$"),
    ({"id": "x", "channel": "webchat"}, 400, "$.mode"),
    ({"id": "x", "channel": "telegram", "mode": "websocket", "secrets": {"bot_token": TOKEN}}, 400, "$.mode"),
    ({"id": "x", "channel": "telegram", "mode": "nope", "secrets": {"bot_token": TOKEN}}, 400, "$.mode"),
    ({"id": "x", "channel": "slack", "mode": "polling", "secrets": {"bot_token": "xoxb-1", "signing_secret": "s"}},
     400, "$.mode"),
    ({"id": "x", "channel": "telegram", "api_base": "file:///etc/passwd", "secrets": {"bot_token": TOKEN}},
     400, "$.api_base"),
    ({"id": "x", "channel": "telegram", "secrets": {"bot_token": TOKEN}, "failover": {"to": "their-chat",
                                                                                      "after_seconds": 5}},
     400, "$.failover.to"),
])
async def test_hostile_bodies_are_refused_naming_the_path(hub: Hub, client: Client, body: Any, status: int,
                                                          path: str) -> None:
    got, refused = await client.call(hub, "POST", "/v1/connections", body=body)
    assert got == status, refused
    assert refused["error"]["path"] == path, refused
    assert (await client.call(hub, "GET", "/v1/connections/x"))[0] == 404


@pytest.mark.parametrize("api_base", [
    "http://127.0.0.1:4222", "http://localhost:8080", "http://169.254.169.254/latest/meta-data",
    "http://10.0.0.7", "http://[::1]:8080", "https://192.168.1.1", "http://0.0.0.0", "http://[fd00::1]",
    "http://2130706433",  # 127.0.0.1 written as one number
])
async def test_a_tenant_cannot_point_the_hub_at_private_addresses(
        nats_server: EmbeddedServer, start_hub: StartHub, client: Client, api_base: str) -> None:
    """Unless the operator allows it (`hub.allow_private_api_base`), as the other tests of this file do."""
    base = config(nats_server.url, unique_prefix(), new_key())
    hub = await start_hub(with_hub(base, allow_private_api_base=False))
    status, refused = await client.call(hub, "POST", "/v1/connections", body=telegram(api_base))
    assert (status, refused["error"]["path"]) == (400, "$.api_base"), refused
    assert (await client.call(hub, "GET", "/v1/connections/tg-api"))[0] == 404


async def test_odd_ids_in_the_path_and_oversized_bodies_are_refused(hub: Hub, client: Client) -> None:
    for odd in ("a.*", ">", "a%20b", "x" * 200):
        status, refused = await client.call(hub, "GET", f"/v1/connections/{odd}")
        assert status == 404 and refused["error"]["code"] == "not_found", odd
    big = json.dumps({"id": "x", "channel": "telegram", "options": {"pad": "y" * (600 * 1024)}}).encode()
    status, refused = await client.call(hub, "POST", "/v1/connections", data=big)
    assert status == 413 and refused["error"]["code"] == "too_large"
    status, refused = await client.call(hub, "POST", "/v1/connections", data=b"{not json")
    assert status == 400 and refused["error"]["path"] == "$"


async def test_without_a_master_key_secrets_are_refused_naming_the_setting(
        nats_server: EmbeddedServer, start_hub: StartHub, client: Client, telegram_api: FakeApi) -> None:
    hub = await start_hub(config(nats_server.url, unique_prefix()))
    status, refused = await client.call(hub, "POST", "/v1/connections", body=telegram(telegram_api.base_url))
    assert status == 409 and refused["error"]["code"] == "no_master_key"
    assert "hub.master_key" in refused["error"]["message"]


async def test_changes_are_audited_by_secret_name_only(hub: Hub, client: Client, telegram_api: FakeApi) -> None:
    assert (await client.call(hub, "POST", "/v1/connections", body=telegram(telegram_api.base_url)))[0] == 201
    body = telegram(telegram_api.base_url, secrets={"bot_token": NEW_TOKEN})
    assert (await client.call(hub, "PUT", "/v1/connections/tg-api", body=body))[0] == 200
    assert (await client.call(hub, "DELETE", "/v1/connections/tg-api"))[0] == 200
    events, _ = await hub.services.audit.read(ACME)
    assert [event.action for event in events] == ["connection.create", "connection.update", "connection.delete"]
    created, updated, _ = events
    assert created.actor == "config" and created.target == "tg-api"
    assert created.changes["secrets.bot_token"] == created.changes["secrets.secret_token"] == "(changed)"
    assert created.changes["channel"] == "telegram"
    assert updated.changes == {"secrets.bot_token": "(changed)"}


async def test_no_plain_secret_anywhere(hub: Hub, client: Client, answers: list[str], telegram_api: FakeApi,
                                        nats_client: Any, nats_server: EmbeddedServer,
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    app = await Processor(nats_client, hub.subjects.prefix, ACME).start()
    telegram_api.queue(Reply(status=401, body={"ok": False, "error_code": 401,
                                               "description": f"Unauthorized: {TOKEN}"}))
    assert (await client.call(hub, "POST", "/v1/connections", body=telegram(telegram_api.base_url)))[0] == 201
    await webhook_answers(client, hub, SECRET, telegram_update(1, 42, "hello"), 200)
    inbound, _ = await app.next()
    reply = await app.reply(inbound, c.Text(text="refused by the channel, which echoes the token"))
    failed = await app.next_status()
    while failed.message_id != reply.id:
        failed = await app.next_status()
    assert failed.state == "failed" and TOKEN not in str(failed.error)
    body = telegram(telegram_api.base_url, secrets={"bot_token": NEW_TOKEN, "secret_token": NEW_SECRET})
    assert (await client.call(hub, "PUT", "/v1/connections/tg-api", body=body))[0] == 200
    await webhook_answers(client, hub, NEW_SECRET, telegram_update(2, 42, "again"), 200)
    await client.call(hub, "GET", "/v1/connections")
    await client.call(hub, "GET", "/v1/connections/tg-api")
    await client.call(hub, "POST", "/v1/connections", body=telegram(telegram_api.base_url, "x", channel="nope"))
    # A log line that would carry a secret learnt at run time is masked.
    master_key = hub.config.hub.master_key
    logging.getLogger("babelhub.test").warning("a careless line with %s and %s", NEW_TOKEN, TOKEN)
    logging.getLogger("babelhub.test").warning("another with the master key %s", master_key)
    await asyncio.sleep(0.3)

    stored: list[bytes] = []
    for role in ("raw", "messages", "statuses", "dead_letters", "audit"):
        stored += await stream_messages(nats_client, f"{hub.subjects.prefix}.>", hub.subjects.stream_name(role))
    kv = await nats_client.jetstream().key_value(hub.subjects.bucket("connections"))
    stored.append((await kv.get("tg-api")).value or b"")
    on_disk = [path.read_bytes() for path in Path(nats_server.data_dir).rglob("*") if path.is_file()]
    assert stored and on_disk and answers and caplog.records
    logged = caplog.text + "".join(record.getMessage() for record in caplog.records)
    for secret in (*PLAIN, master_key):
        assert all(secret not in answer for answer in answers), secret
        assert secret not in logged, secret
        assert all(secret.encode() not in data for data in stored), secret
        assert all(secret.encode() not in data for data in on_disk), secret
    assert "a careless line with *** and ***" in caplog.text and "another with the master key ***" in caplog.text


def babelhub_command(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BABELHUB_")}
    return subprocess.run([sys.executable, "-m", "babelhub", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60, check=False)


async def test_the_master_key_is_rotated_by_the_command_line_without_stopping_the_hubs(
        nats_server: EmbeddedServer, start_hub: StartHub, client: Client, telegram_api: FakeApi,
        tmp_path: Path) -> None:
    old_file, new_file = tmp_path / "old.key", tmp_path / "new.key"
    made = await asyncio.to_thread(babelhub_command, "master-key", "new", str(old_file), cwd=tmp_path)
    assert made.returncode == 0 and stat.S_IMODE(old_file.stat().st_mode) == 0o600, made.stderr
    assert (await asyncio.to_thread(babelhub_command, "master-key", "new", str(old_file), cwd=tmp_path)).returncode == 2
    prefix = unique_prefix()
    base = config(nats_server.url, prefix)
    running = await start_hub(msgspec.structs.replace(base, hub=msgspec.structs.replace(
        base.hub, master_key_file=str(old_file))))
    assert (await client.call(running, "POST", "/v1/connections", body=telegram(telegram_api.base_url)))[0] == 201
    await webhook_answers(client, running, SECRET, telegram_update(1, 42, "before"), 200)

    assert (await asyncio.to_thread(babelhub_command, "master-key", "new", str(new_file), cwd=tmp_path)).returncode == 0
    config_file = tmp_path / "hub.toml"
    config_file.write_text(f'[hub]\nnats = "{nats_server.url}"\nsubject_prefix = "{prefix}"\n'
                           f'master_key_file = "{old_file}"\n')
    rotated = await asyncio.to_thread(babelhub_command, "master-key", "rotate", "--config", str(config_file),
                                      "--to", str(new_file), cwd=tmp_path)
    assert rotated.returncode == 0, rotated.stderr
    assert "1 connection(s)" in rotated.stdout and "hub.master_key_file" in rotated.stdout
    new_id = key_id(read_key(new_file.read_text(), "new"))
    kv = await running.nc.jetstream().key_value(running.subjects.bucket("connections"))
    record = decode_record((await kv.get("tg-api")).value or b"")
    assert all(value.startswith(f"v1.{new_id}.") for value in record.connection.secrets.values())
    events, _ = await running.services.audit.read(ACME)
    assert [(e.action, e.actor, e.changes) for e in events][-1] == (
        "connection.rekey", "cli", {"secrets.bot_token": "(changed)", "secrets.secret_token": "(changed)"})

    # The hub still on the old key serves on as before; one on the new key (the old one as previous) too.
    await webhook_answers(client, running, SECRET, telegram_update(2, 42, "after, old hub"), 200)
    switched = await start_hub(msgspec.structs.replace(base, hub=msgspec.structs.replace(
        base.hub, master_key_file=str(new_file), previous_master_key_file=str(old_file))))
    await webhook_answers(client, switched, SECRET, telegram_update(3, 42, "after, new hub"), 200)
    for key_file in (old_file, new_file):  # the keys' text is masked like any secret
        assert switched.ctx.mask.text(f"key {key_file.read_text().strip()}") == "key ***"
    assert await client.webhook(switched, "not-the-secret-at-all", telegram_update(4, 42, "forged")) == 401
    # Run again: nothing is left to re-seal.
    again = await asyncio.to_thread(babelhub_command, "master-key", "rotate", "--config", str(config_file),
                                    "--to", str(new_file), cwd=tmp_path)
    assert again.returncode == 0 and "0 connection(s)" in again.stdout


async def test_no_plain_secret_in_a_running_hubs_log_and_traces(
        nats_server: EmbeddedServer, hub_processes: list[HubProcess], client: Client, answers: list[str],
        telegram_api: FakeApi, tmp_path: Path) -> None:
    """`babelhub run` recording spans (`tracing = "console"` prints them with the log): a connection made,
    a signed webhook traced end to end, a rotation, a refused body; its output never holds a secret."""
    port, master_key = free_port(), new_key()
    config_file = write_config(tmp_path / "hub.toml", f"""
[hub]
http = "127.0.0.1:{port}"
nats = "{nats_server.url}"
subject_prefix = "{unique_prefix()}"
master_key = "{master_key}"
allow_private_api_base = true
tracing = "console"
log_level = "debug"

[[tenants]]
id = "{ACME}"
api_keys = ["{KEYS[ACME]}"]
""")
    process = HubProcess(config_file, tmp_path)
    hub_processes.append(process)
    process.start()
    url = f"http://127.0.0.1:{port}"
    await process.wait_ready(url)
    running = SimpleNamespace(http_url=url)
    assert (await client.call(running, "POST", "/v1/connections", body=telegram(telegram_api.base_url)))[0] == 201
    traced = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    for _ in range(300):
        async with client.http.post(f"{url}/webhooks/telegram/tg-api", json=telegram_update(1, 42, "hi"),
                                    headers={"X-Telegram-Bot-Api-Secret-Token": SECRET, **traced}) as response:
            if response.status == 200:
                break
        await asyncio.sleep(0.05)
    body = telegram(telegram_api.base_url, secrets={"bot_token": NEW_TOKEN, "secret_token": NEW_SECRET})
    assert (await client.call(running, "PUT", "/v1/connections/tg-api", body=body))[0] == 200
    await client.call(running, "POST", "/v1/connections", body={**body, "id": "bad", "options": {"nope": 1}})
    await eventually(lambda: '"name": "webhook"' in process.output())
    assert await asyncio.to_thread(process.terminate) == 0
    output = process.output()
    assert "tg-api" in output
    for secret in (*PLAIN, master_key):
        assert secret not in output, secret
        assert all(secret not in answer for answer in answers), secret


async def test_two_changes_read_at_one_revision_do_not_overwrite_each_other(hub: Hub, client: Client,
                                                                             telegram_api: FakeApi) -> None:
    assert (await client.call(hub, "POST", "/v1/connections", body=telegram(telegram_api.base_url)))[0] == 201
    store = ConnectionStore(await hub.nc.jetstream().key_value(hub.subjects.bucket("connections")),
                            SecretBox([read_key(hub.config.hub.master_key, "test")]))
    read = await store.get("tg-api")
    assert read is not None and store.open(read.record).secrets["bot_token"] == TOKEN
    body = telegram(telegram_api.base_url, secrets={"bot_token": NEW_TOKEN})
    assert (await client.call(hub, "PUT", "/v1/connections/tg-api", body=body))[0] == 200
    with pytest.raises(Refusal) as late:  # written meanwhile: the late writer is told, nothing is lost
        await store.replace(msgspec.structs.replace(read.record, disabled=True), read.revision)
    assert late.value.status == 409 and late.value.code == "conflict"
    with pytest.raises(Refusal) as taken:
        await store.create(read.record)
    assert taken.value.status == 409 and taken.value.path == "$.id"
    now = await store.get("tg-api")
    assert now is not None and store.open(now.record).secrets["bot_token"] == NEW_TOKEN and not now.record.disabled


async def test_a_public_address_is_allowed_and_a_url_without_a_host_is_not() -> None:
    assert await api_base_problem("https://149.154.167.220/bot", allow_private=False) == ""  # a public address
    assert await api_base_problem("http://127.0.0.1:9", allow_private=True) == ""
    for wrong in ("ftp://149.154.167.220", "https://", "149.154.167.220", "https://h:99999"):
        assert await api_base_problem(wrong, allow_private=False), wrong
