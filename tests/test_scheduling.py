"""Scheduled sends and quiet hours on a real nats-server, hub and a local fake Bot API: a message with a
`send_at` ahead, or one that would go out in its connection's quiet hours, is held durably (status
`queued`), survives a hub restart, is cancelled by a `delete` part or `Scheduler.cancel`, and is sent
through the normal path once due. Time is the hub's clock (`HubContext.clock`), moved by the test; the
scheduler looks for due messages every second of real time."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import msgspec
import pytest
from nats.aio.client import Client as NATS

from babelhub import canonical as c
from babelhub.actors.conversation import TIME_ZONE_META, URGENT_META, quiet_until
from babelhub.errors import ConfigError, DecodeError
from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from babelhub.services.scheduling import Held, Scheduler, held_key
from tests.fakeapi import FakeApi
from tests.hubkit import TENANT, Processor, StartHub, eventually, telegram_config, telegram_responder

CHAT = "4242"
PARIS = ZoneInfo("Europe/Paris")


def message(text: str, chat: str = CHAT, **fields: Any) -> bytes:
    return json.dumps({"conversation": {"connection": "tg", "native_id": chat},
                       "parts": [{"type": "text", "text": text}], **fields}).encode()


def texts(api: FakeApi) -> list[str]:
    return [call.json()["text"] for call in api.requests if call.path.endswith("/sendMessage")]


def scheduler_of(hub: Hub) -> Scheduler:
    assert hub.ctx.scheduler is not None
    return hub.ctx.scheduler


def at(hub: Hub, moment: float) -> None:
    hub.ctx.clock = lambda: moment


def iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat()


async def states(app: Processor, message_id: str, count: int) -> list[c.Status]:
    found: list[c.Status] = []
    while len(found) < count:
        status = await app.next_status()
        if status.message_id == message_id:
            found.append(status)
    return found


def with_quiet_hours(config: cfg.Config, **quiet: str) -> cfg.Config:
    connection = msgspec.structs.replace(config.connections[0], options={"quiet_hours": quiet})
    return msgspec.structs.replace(config, connections=[connection])


@pytest.fixture
def config(nats_server: EmbeddedServer, fake_api: FakeApi) -> cfg.Config:
    fake_api.responder = telegram_responder
    return telegram_config(nats_server.url, fake_api.base_url)


# --------------------------------------------------------------------------------------- send_at


async def test_a_message_with_send_at_is_queued_then_sent_when_due(
        config: cfg.Config, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    hub = await start_hub(config)
    app = await Processor(nats_client, hub.subjects.prefix).start()
    now = time.time()
    at(hub, now)
    accepted = await hub.outbox.submit(TENANT, message("later", send_at=iso(now + 3600)))
    [queued] = await states(app, accepted.id, 1)
    assert queued.state == "queued"
    now_text = await hub.outbox.submit(TENANT, message("now"))  # a held message holds nothing back
    await states(app, now_text.id, 1)
    assert texts(fake_api) == ["now"]
    at(hub, now + 3601)
    [sent] = await states(app, accepted.id, 1)
    assert (sent.state, sent.message_id) == ("sent", accepted.id)
    assert texts(fake_api) == ["now", "later"]


async def test_a_held_message_survives_a_hub_restart(
        config: cfg.Config, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    first = await start_hub(config)
    app = await Processor(nats_client, first.subjects.prefix).start()
    now = time.time()
    at(first, now)
    accepted = await first.outbox.submit(TENANT, message("after the restart", send_at=iso(now + 600)))
    assert [s.state for s in await states(app, accepted.id, 1)] == ["queued"]
    await first.stop()

    second = await start_hub(config)
    at(second, now + 601)
    [sent] = await states(app, accepted.id, 1)
    assert sent.state == "sent"
    await eventually(lambda: texts(fake_api) == ["after the restart"])


async def test_a_delete_part_naming_a_held_message_cancels_it(
        config: cfg.Config, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    hub = await start_hub(config)
    app = await Processor(nats_client, hub.subjects.prefix).start()
    now = time.time()
    at(hub, now)
    held = await hub.outbox.submit(TENANT, message("never", send_at=iso(now + 60)))
    await states(app, held.id, 1)
    await hub.outbox.submit(TENANT, json.dumps({
        "conversation": {"connection": "tg", "native_id": CHAT},
        "parts": [{"type": "delete", "target": held.id}]}).encode())
    [cancelled] = await states(app, held.id, 1)
    assert cancelled.state == "deleted" and cancelled.error is not None and cancelled.error.code == "cancelled"
    at(hub, now + 120)
    after = await hub.outbox.submit(TENANT, message("after"))
    await states(app, after.id, 1)
    assert await scheduler_of(hub).release_due() == 0
    assert texts(fake_api) == ["after"]


async def test_cancel_by_id_is_per_tenant_and_only_for_held_messages(
        config: cfg.Config, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    hub = await start_hub(config)
    scheduler = scheduler_of(hub)
    app = await Processor(nats_client, hub.subjects.prefix).start()
    now = time.time()
    at(hub, now)
    held = await hub.outbox.submit(TENANT, message("held", send_at=iso(now + 60)))
    await states(app, held.id, 1)
    assert not await scheduler.cancel("other", held.id)  # another tenant cannot reach it
    assert not await scheduler.cancel(TENANT, "no-such-message")
    assert await scheduler.cancel(TENANT, held.id)
    assert not await scheduler.cancel(TENANT, held.id)  # once
    [cancelled] = await states(app, held.id, 1)
    assert cancelled.state == "deleted"
    at(hub, now + 120)
    assert await scheduler.release_due() == 0
    assert texts(fake_api) == []


# ---------------------------------------------------------------------------------- quiet hours


def paris(year: int, month: int, day: int, hour: int, minute: int = 0) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=PARIS).timestamp()


async def test_quiet_hours_hold_non_urgent_messages_until_they_end(
        config: cfg.Config, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    hub = await start_hub(with_quiet_hours(config, start="21:00", end="08:00", time_zone="Europe/Paris"))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    at(hub, paris(2026, 1, 15, 22, 30))
    quiet = await hub.outbox.submit(TENANT, message("good morning"))
    assert [s.state for s in await states(app, quiet.id, 1)] == ["queued"]
    urgent = await hub.outbox.submit(TENANT, message("your code is 123456", meta={URGENT_META: True}))
    assert [s.state for s in await states(app, urgent.id, 1)] == ["sent"]
    elsewhere = await hub.outbox.submit(TENANT, message("afternoon in New York", chat="777",
                                                        meta={TIME_ZONE_META: "America/New_York"}))
    assert [s.state for s in await states(app, elsewhere.id, 1)] == ["sent"]  # 16:30 there
    in_new_york = await hub.outbox.submit(TENANT, message("still afternoon there", chat="777"))
    assert [s.state for s in await states(app, in_new_york.id, 1)] == ["sent"]  # the zone is remembered
    assert texts(fake_api) == ["your code is 123456", "afternoon in New York", "still afternoon there"]

    at(hub, paris(2026, 1, 16, 7, 59))
    assert await scheduler_of(hub).release_due() == 0
    at(hub, paris(2026, 1, 16, 8, 0))
    [sent] = await states(app, quiet.id, 1)
    assert sent.state == "sent"
    assert texts(fake_api)[-1] == "good morning"


@pytest.mark.parametrize(("start", "end", "local", "until"), [
    ("21:00", "08:00", (2026, 1, 15, 22, 30), (2026, 1, 16, 8, 0)),  # over midnight, evening side
    ("21:00", "08:00", (2026, 1, 16, 3, 0), (2026, 1, 16, 8, 0)),  # over midnight, morning side
    ("21:00", "08:00", (2026, 1, 16, 8, 0), None),  # the end is open again
    ("21:00", "08:00", (2026, 1, 16, 12, 0), None),
    ("12:00", "14:00", (2026, 1, 16, 13, 0), (2026, 1, 16, 14, 0)),  # within one day
    ("12:00", "14:00", (2026, 1, 16, 11, 59), None),
    ("22:00", "07:00", (2026, 3, 28, 23, 0), (2026, 3, 29, 7, 0)),  # the night clocks go forward
    ("09:00", "09:00", (2026, 1, 16, 9, 0), None),  # empty
])
def test_quiet_hours_end_at_the_next_local_end(start: str, end: str, local: tuple[int, ...],
                                               until: tuple[int, ...] | None) -> None:
    now = datetime(*local, tzinfo=PARIS).timestamp()  # type: ignore[misc]
    expected = datetime(*until, tzinfo=PARIS).timestamp() if until else 0.0  # type: ignore[misc]
    assert quiet_until(start, end, PARIS, now) == expected


@pytest.mark.parametrize(("quiet", "error"), [
    ('{ start = "25:00", end = "08:00" }', r"options\.quiet_hours\.start"),
    ('{ start = "21:00" }', r"options\.quiet_hours"),
    ('{ start = "21:00", end = "08:00", time_zone = "Mars/Olympus" }', r"unknown time zone 'Mars/Olympus'"),
])
def test_quiet_hours_that_do_not_read_are_refused_when_the_config_is_read(
        tmp_path: Path, quiet: str, error: str) -> None:
    path = tmp_path / "hub.toml"
    path.write_text(f'''
[[tenants]]
id = "acme"
[[connections]]
id = "tg"
tenant = "acme"
channel = "telegram"
secrets = {{ bot_token = "1:x", secret_token = "s" }}
options = {{ quiet_hours = {quiet} }}
''')
    with pytest.raises(ConfigError, match=error):
        cfg.load(path, env={})


def test_send_at_is_in_the_published_schema() -> None:
    message_schema = c.schema()["$defs"]["Message"]["properties"]
    assert "send_at" in message_schema
    held = c.decode(json.dumps({"kind": "message", "id": "m", "tenant": TENANT, "ts": iso(time.time()),
                                "conversation": {"id": "x"}, "send_at": "2026-01-16T08:00:00+01:00"}).encode())
    assert isinstance(held, c.Message) and held.send_at == datetime(2026, 1, 16, 7, tzinfo=UTC)
    with pytest.raises(DecodeError, match=r"\$\.send_at"):
        c.decode(json.dumps({"kind": "message", "id": "m", "tenant": TENANT, "ts": iso(time.time()),
                             "conversation": {"id": "x"}, "send_at": "tomorrow"}).encode())


async def test_delete_over_rest_cancels_a_held_message_and_only_that(
        config: cfg.Config, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    hub = await start_hub(config)
    app = await Processor(nats_client, hub.subjects.prefix).start()
    now = time.time()
    at(hub, now)
    auth = {"Authorization": "Bearer k"}  # telegram_config's tenant key
    async with aiohttp.ClientSession() as http:
        async def call(method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
            async with http.request(method, f"{hub.http_url}{path}", **kwargs) as response:
                return response.status, await response.json()

        status, accepted = await call("POST", "/v1/messages", data=message("held", send_at=iso(now + 60)),
                                      headers={**auth, "Content-Type": "application/json"})
        assert status == 202
        held_id = accepted["id"]
        await states(app, held_id, 1)  # queued
        code, answer = await call("DELETE", f"/v1/messages/{held_id}")
        assert (code, answer["error"]["code"]) == (401, "unauthenticated")
        assert await call("DELETE", f"/v1/messages/{held_id}", headers=auth) == (200, {"id": held_id,
                                                                                       "state": "deleted"})
        [cancelled] = await states(app, held_id, 1)
        assert cancelled.state == "deleted"
        code, answer = await call("DELETE", f"/v1/messages/{held_id}", headers=auth)
        assert (code, answer["error"]["code"]) == (409, "not_held")
        sent = await hub.outbox.submit(TENANT, message("now"))
        await states(app, sent.id, 1)
        code, answer = await call("DELETE", f"/v1/messages/{sent.id}", headers=auth)
        assert (code, answer["error"]["code"], answer["error"]["path"]) == (409, "not_held", "id")
        code, answer = await call("DELETE", f"/v1/messages/{'a' * 24}", headers=auth)
        assert (code, answer["error"]["code"]) == (404, "not_found")
    at(hub, now + 120)
    assert await scheduler_of(hub).release_due() == 0
    assert texts(fake_api) == ["now"]


async def test_a_release_cut_short_is_finished_later_and_no_longer_cancellable(
        config: cfg.Config, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    """The process marked the message as being released and died before publishing it: the next round
    publishes it (once), and a cancel that comes meanwhile is refused."""
    hub = await start_hub(config)
    scheduler = scheduler_of(hub)
    app = await Processor(nats_client, hub.subjects.prefix).start()
    now = time.time()
    at(hub, now)
    accepted = await hub.outbox.submit(TENANT, message("released once", send_at=iso(now + 60)))
    await states(app, accepted.id, 1)
    kv = await hub.nc.jetstream().key_value(hub.subjects.bucket("scheduled"))
    key = held_key(TENANT, accepted.id)
    entry = await kv.get(key)
    held = msgspec.msgpack.decode(entry.value or b"", type=Held)
    await kv.update(key, msgspec.msgpack.encode(msgspec.structs.replace(held, releasing=True)), last=entry.revision)
    assert not await scheduler.cancel(TENANT, accepted.id)
    at(hub, now + 61)
    [sent] = await states(app, accepted.id, 1)
    assert sent.state == "sent"
    assert await scheduler.release_due() == 0
    assert texts(fake_api) == ["released once"]
