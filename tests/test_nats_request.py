"""The `nats` processor transport in request mode: each routed inbound envelope is a NATS request to the
app (the example processor, run for real), whose reply goes through the outbox; on a real nats-server,
also the embedded one with the tenants' own users."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from babelhub import canonical as c
from babelhub.errors import ConfigError
from babelhub.hub.app import Hub
from babelhub.processors import lanes
from babelhub.processors.nats import DELIVERY_HEADER, request_subject
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from babelhub.services.credentials import load_key, tenant_user
from tests.fakeapi import FakeApi
from tests.hubkit import TENANT, StartHub, eventually, telegram_config, telegram_responder
from tests.test_http_transport import example, letters, post, sent_texts, update, wait_letters

nats_example = example("nats_request_processor")


def request_config(nats_url: str, api_base: str, **options: Any) -> cfg.Config:
    config = telegram_config(nats_url, api_base)
    return msgspec.structs.replace(config, processors=[cfg.Processor(
        id="app", tenant=TENANT, transport="nats", options={"mode": "request", **options})])


def recorder(into: list[Msg]) -> Callable[[Msg], Awaitable[None]]:
    async def record(msg: Msg) -> None:
        into.append(msg)

    return record


@contextlib.asynccontextmanager
async def serving(nc: NATS, subject: str) -> AsyncIterator[asyncio.Task[None]]:
    """The example processor answering requests on `subject` until the block ends."""
    task = asyncio.create_task(nats_example.serve(nc, subject))
    try:
        await asyncio.sleep(0)
        await nc.flush()
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_each_inbound_is_a_request_and_the_reply_is_sent_once(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    fake_api.responder = telegram_responder
    hub = await start_hub(request_config(nats_server.url, fake_api.base_url))
    subject = request_subject(hub.subjects.prefix, TENANT, "app")
    seen: list[Msg] = []
    watcher = await nats_client.subscribe(subject, cb=recorder(seen))
    async with serving(nats_client, subject):
        await post(hub, update(55, "hello"), update(66, "hi there"))
        await eventually(lambda: len(sent_texts(fake_api)) == 2)
    await watcher.unsubscribe()
    assert sorted(sent_texts(fake_api)) == ["You said: hello", "You said: hi there"]
    for msg in seen:
        assert msg.headers is not None
        assert msg.headers[DELIVERY_HEADER] == lanes.delivery_id("app", c.decode(msg.data).id)
    assert await letters(nats_client, hub) == []


async def test_with_no_app_listening_requests_are_retried_until_one_answers(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lanes, "RETRY_BASE", 0.02)
    monkeypatch.setattr(lanes, "RETRY_MAX", 0.3)
    fake_api.responder = telegram_responder
    hub = await start_hub(request_config(nats_server.url, fake_api.base_url))
    await post(hub, update(55, "one"), update(55, "two"), update(55, "three"))
    await asyncio.sleep(0.5)  # no responders meanwhile
    assert sent_texts(fake_api) == []
    async with serving(nats_client, request_subject(hub.subjects.prefix, TENANT, "app")):
        await eventually(lambda: len(sent_texts(fake_api)) == 3)
    assert sent_texts(fake_api) == ["You said: one", "You said: two", "You said: three"]


async def test_an_unreadable_reply_and_the_deadline_are_dead_letters(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lanes, "RETRY_BASE", 0.02)
    monkeypatch.setattr(lanes, "RETRY_MAX", 0.3)
    hub = await start_hub(request_config(nats_server.url, fake_api.base_url, deadline_seconds=1.0,
                                         timeout_seconds=0.2))
    subject = request_subject(hub.subjects.prefix, TENANT, "app")

    async def answer(msg: Msg) -> None:
        if b"garbage" in msg.data:
            await msg.respond(b"{oops")
        # anything else: no answer (a timeout each time)

    subscription = await nats_client.subscribe(subject, cb=answer)
    await post(hub, update(55, "garbage"), update(66, "silence"))
    found = await wait_letters(nats_client, hub, 2)
    await subscription.unsubscribe()
    by_error = sorted(found, key=lambda letter: str(letter["error"]))
    assert "not delivered within 1 s" in by_error[0]["error"] and "no reply within 0.2 s" in by_error[0]["error"]
    assert "unreadable answer" in by_error[1]["error"] and by_error[1]["path"] == "$"
    assert all(letter["stage"] == "processor" for letter in found) and sent_texts(fake_api) == []


@pytest.mark.parametrize("subject", ["elsewhere.requests", "{prefix}.other.requests.app", "{prefix}.acme.requests.>",
                                     "{prefix}.acme.requests."])
async def test_a_request_subject_outside_the_tenants_requests_is_refused_at_start(
        nats_server: EmbeddedServer, fake_api: FakeApi, subject: str) -> None:
    config = request_config(nats_server.url, fake_api.base_url)
    options = {"mode": "request", "subject": subject.format(prefix=config.hub.subject_prefix)}
    processor = msgspec.structs.replace(config.processors[0], options=options)
    config = msgspec.structs.replace(config, processors=[processor])
    with pytest.raises(ConfigError, match=r"\$\.processors\[0\]\.options\.subject"):
        async with Hub(config):
            pass


async def test_publish_mode_sends_no_requests(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    config = request_config(nats_server.url, fake_api.base_url)
    config = msgspec.structs.replace(config, processors=[msgspec.structs.replace(config.processors[0], options={})])
    hub = await start_hub(config)
    requests: list[Msg] = []
    inbound: list[Msg] = []
    await nats_client.subscribe(request_subject(hub.subjects.prefix, TENANT, "app"), cb=recorder(requests))
    await nats_client.subscribe(f"{hub.subjects.prefix}.{TENANT}.in.>", cb=recorder(inbound))
    await post(hub, update(55, "published"))
    await eventually(lambda: inbound)
    await nats_client.flush()
    assert requests == []


async def test_a_tenants_own_user_takes_its_requests_and_answers_them_on_the_embedded_server(
        tmp_path: Path, fake_api: FakeApi) -> None:
    fake_api.responder = telegram_responder
    config = request_config("", fake_api.base_url)
    config = msgspec.structs.replace(
        config, hub=msgspec.structs.replace(config.hub, nats="", nats_port=0, data_dir=str(tmp_path / "data")),
        tenants=[*config.tenants, cfg.Tenant(id="other")])
    async with Hub(config) as hub:
        key = load_key(tmp_path / "data")
        acme, intruder = tenant_user(key, hub.subjects, TENANT), tenant_user(key, hub.subjects, "other")
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        app = await nats.connect(hub.nats_url, user=acme.user, password=acme.password,
                                 inbox_prefix=acme.inbox_prefix, error_cb=on_error)
        snoop = await nats.connect(hub.nats_url, user=intruder.user, password=intruder.password,
                                   inbox_prefix=intruder.inbox_prefix, error_cb=on_error)
        try:
            await snoop.subscribe(request_subject(hub.subjects.prefix, TENANT, "app"))
            await snoop.flush()
            async with serving(app, request_subject(hub.subjects.prefix, TENANT, "app")):
                await post(hub, update(55, "from acme"))
                await eventually(lambda: sent_texts(fake_api) == ["You said: from acme"])
            await eventually(lambda: len(errors) == 1)
        finally:
            await app.close()
            await snoop.close()
        assert "permissions violation" in errors[0].lower() and f"{TENANT}.requests" in errors[0]


def test_the_asyncapi_document_names_the_request_subject() -> None:
    document = (Path(__file__).resolve().parents[1] / "docs" / "asyncapi.yaml").read_text(encoding="utf-8")
    assert f"address: '{request_subject('<prefix>', '<tenant>', '<processor>')}'" in document
    assert f"`{request_subject('<prefix>', '<tenant>', '>')}`" in document
