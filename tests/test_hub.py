"""The hub end to end on real parts: a real nats-server, the hub's real HTTP server, a processing app
on NATS, and a local fake of the Telegram Bot API."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import msgspec
import pytest

from babelhub import canonical as c
from babelhub.errors import ConfigError
from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from babelhub.services.ownership import Ownership
from tests.fakeapi import FakeApi, Reply
from tests.hubkit import (
    BOT_TOKEN,
    SECRET,
    TENANT,
    Processor,
    StartHub,
    consumer_totals,
    dead_letters,
    eventually,
    stream_messages,
    telegram_config,
    telegram_responder,
    telegram_update,
    with_hub,
)

HEADERS = {"X-Telegram-Bot-Api-Secret-Token": SECRET}

ROOT = Path(__file__).resolve().parents[1]




@pytest.fixture
async def telegram_api(fake_api: FakeApi) -> FakeApi:
    fake_api.responder = telegram_responder
    return fake_api


async def post(hub: Hub, body: object, headers: dict[str, str] | None = None, path: str = "/webhooks/telegram/tg",
               raw: bytes | None = None) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as session, session.post(
        hub.http_url + path, data=raw if raw is not None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(HEADERS if headers is None else headers)},
    ) as response:
        text = await response.text()
        return response.status, (json.loads(text) if text.startswith("{") else {})


async def test_webhook_to_processor_to_channel_api(nats_server: EmbeddedServer, nats_client, telegram_api: FakeApi,
                                                   start_hub: StartHub) -> None:
    hub = await start_hub(telegram_config(nats_server.url, telegram_api.base_url))
    app = await Processor(nats_client, hub.subjects.prefix).start()

    status, _ = await post(hub, telegram_update(1, 42, "hello hub"))
    assert status == 200
    inbound, _ = await app.next()
    assert isinstance(inbound, c.Message)
    assert inbound.parts == [c.Text(text="hello hub")]
    assert inbound.conversation.channel == "telegram" and inbound.conversation.native_id == "42"
    assert inbound.id == c.message_id(TENANT, "tg", "42:1")

    reply = await app.reply(inbound, c.Text(text="hi Ada"))
    await eventually(lambda: len(telegram_api.requests) == 1)
    sent = telegram_api.requests[0]
    assert sent.method == "POST" and sent.path == f"/bot{BOT_TOKEN}/sendMessage"
    body = sent.json()
    assert body["chat_id"] in (42, "42") and body["text"] == "hi Ada"
    assert body["reply_parameters"]["message_id"] == 1

    status_envelope = await app.next_status()
    assert status_envelope.message_id == reply.id and status_envelope.state == "sent"
    assert status_envelope.native_id.startswith("42:")


async def test_the_same_update_posted_twice_is_processed_once(nats_server: EmbeddedServer, nats_client,
                                                              telegram_api: FakeApi, start_hub: StartHub) -> None:
    hub = await start_hub(telegram_config(nats_server.url, telegram_api.base_url))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    update = telegram_update(7, 42, "only once")
    assert (await post(hub, update))[0] == 200
    assert (await post(hub, update))[0] == 200  # Telegram retrying after a lost answer
    await app.next()
    await asyncio.sleep(0.5)
    assert app.inbound.empty()
    stored = await stream_messages(nats_client, f"{hub.subjects.prefix}.{TENANT}.in.>",
                                   hub.subjects.stream_name("messages"))
    assert len(stored) == 1


async def test_order_is_kept_per_conversation_under_interleaving(nats_server: EmbeddedServer, nats_client,
                                                                 telegram_api: FakeApi, start_hub: StartHub) -> None:
    hub = await start_hub(telegram_config(nats_server.url, telegram_api.base_url))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    conversations, per_conversation = 100, 20
    async with aiohttp.ClientSession() as session:
        semaphore = asyncio.Semaphore(32)

        async def send(update: dict[str, object]) -> None:
            async with semaphore, session.post(hub.http_url + "/webhooks/telegram/tg", json=update,
                                               headers=HEADERS) as response:
                assert response.status == 200

        # Messages of one chat are posted in order (as Telegram does); chats are interleaved.
        for n in range(per_conversation):
            await asyncio.gather(*(send(telegram_update(n * conversations + chat + 1, 1000 + chat, f"{n}",
                                                        message_id=n + 1)) for chat in range(conversations)))
    seen: dict[str, list[int]] = {}
    for count in range(conversations * per_conversation):
        try:
            envelope, _ = await app.next()
        except TimeoutError:
            raise AssertionError(f"only {count} arrived; {hub.metrics.render().decode()}") from None
        assert isinstance(envelope, c.Message)
        text = envelope.parts[0]
        assert isinstance(text, c.Text)
        seen.setdefault(envelope.conversation.native_id, []).append(int(text.text))
    assert len(seen) == conversations
    assert all(order == list(range(per_conversation)) for order in seen.values())


async def test_bad_input_gets_the_documented_codes_and_disturbs_nothing(nats_server: EmbeddedServer, nats_client,
                                                                        telegram_api: FakeApi,
                                                                        start_hub: StartHub) -> None:
    hub = await start_hub(telegram_config(nats_server.url, telegram_api.base_url))
    app = await Processor(nats_client, hub.subjects.prefix).start()

    assert (await post(hub, telegram_update(1, 5, "x"), headers={}))[0] == 401
    assert (await post(hub, telegram_update(1, 5, "x"), headers={"X-Telegram-Bot-Api-Secret-Token": "nope"}))[0] == 401
    status, body = await post(hub, None, raw=b'{"update_id": 3, "message": {')
    assert status == 400 and "JSON" in str(body["error"]) and body["path"] == "$"
    status, body = await post(hub, telegram_update(4, 5, "x"), path="/webhooks/telegram/nope")
    assert status == 404 and "nope" in str(body["error"])
    assert (await post(hub, telegram_update(4, 5, "x"), path="/webhooks/slack/tg"))[0] == 404
    status, _ = await post(hub, None, raw=b'{"update_id": 9, "pad": "' + b"x" * 2_000_000 + b'"}')
    assert status == 413
    # A body that parses but is no Update: accepted (it is the channel's), then parked by the decoder.
    assert (await post(hub, {"update_id": 10, "message": {"message_id": "not-a-number"}}))[0] == 200

    assert (await post(hub, telegram_update(11, 5, "still fine")))[0] == 200
    envelope, _ = await app.next()
    assert isinstance(envelope, c.Message) and envelope.parts == [c.Text(text="still fine")]

    dlq_subject = f"{hub.subjects.prefix}.*.dlq.>"
    letters: list[dict[str, object]] = []

    async def read_letters() -> bool:
        letters[:] = dead_letters(await stream_messages(nats_client, dlq_subject, hub.subjects.stream_name(
            "dead_letters")))
        return len(letters) >= 2

    for _ in range(100):
        if await read_letters():
            break
        await asyncio.sleep(0.05)
    stages = sorted(str(letter["stage"]) for letter in letters)
    assert stages == ["decode", "ingest"]
    decode_letter = next(letter for letter in letters if letter["stage"] == "decode")
    assert str(decode_letter["path"]).startswith("$.message")


async def test_a_trace_runs_from_the_webhook_to_the_channel_api(nats_server: EmbeddedServer, nats_client,
                                                                telegram_api: FakeApi, start_hub: StartHub) -> None:
    hub = await start_hub(telegram_config(nats_server.url, telegram_api.base_url))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    await post(hub, telegram_update(1, 42, "trace me"),
               headers={**HEADERS, "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    inbound, headers = await app.next()
    assert trace_id in headers.get("traceparent", "")
    await app.reply(inbound, c.Text(text="traced"), headers={"traceparent": headers["traceparent"]})
    await eventually(lambda: len(telegram_api.requests) == 1)
    assert trace_id in telegram_api.requests[0].headers.get("traceparent", "")


async def test_channel_errors_become_failed_statuses_after_retries(nats_server: EmbeddedServer, nats_client,
                                                                   telegram_api: FakeApi,
                                                                   start_hub: StartHub) -> None:
    hub = await start_hub(telegram_config(nats_server.url, telegram_api.base_url))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    await post(hub, telegram_update(1, 42, "hi"))
    inbound, _ = await app.next()
    telegram_api.queue(
        Reply(status=429, body={"ok": False, "error_code": 429, "description": "Too Many Requests: retry after 0",
                                "parameters": {"retry_after": 0}}),
        Reply(status=502, body={"ok": False, "error_code": 502, "description": "Bad Gateway"}),
    )
    first = await app.reply(inbound, c.Text(text="after retries"))
    try:
        assert (await app.next_status()).state == "sent"
    except TimeoutError:
        raise AssertionError(f"{telegram_api.requests} {hub.metrics.render().decode()}") from None
    assert len(telegram_api.requests) == 3
    telegram_api.queue(Reply(status=403, body={"ok": False, "error_code": 403,
                                               "description": "Forbidden: bot was blocked by the user"}))
    second = await app.reply(inbound, c.Text(text="blocked"))
    failed = await app.next_status()
    assert failed.message_id == second.id and failed.state == "failed"
    assert failed.error is not None and not failed.error.retryable
    assert first.id != second.id
    metrics = hub.metrics.render().decode()
    assert 'babelhub_send_retries_total{channel="telegram"} 2.0' in metrics


async def test_a_connection_is_paced_and_a_retry_after_holds_all_its_conversations(
        nats_server: EmbeddedServer, nats_client, telegram_api: FakeApi, start_hub: StartHub) -> None:
    config = telegram_config(nats_server.url, telegram_api.base_url)
    config = msgspec.structs.replace(config, connections=[msgspec.structs.replace(config.connections[0], max_rate=2)])
    hub = await start_hub(config)
    app = await Processor(nats_client, hub.subjects.prefix).start()
    chats = [42, 43, 44, 45, 46]
    for update_id, chat in enumerate(chats, start=1):
        await post(hub, telegram_update(update_id, chat, "hi"))
    inbound = {}
    for _ in chats:
        envelope, _ = await app.next()
        inbound[envelope.conversation.native_id] = envelope

    def paced() -> float:
        return hub.metrics.registry.get_sample_value("babelhub_send_paced_seconds_total", {"connection": "tg"}) or 0

    # Chat 42's reply is throttled: chat 43's reply waits the pause out as well, though the connection's
    # burst of two would have let it straight through; then both go.
    telegram_api.queue(Reply(status=429, body={"ok": False, "error_code": 429, "parameters": {"retry_after": 1},
                                               "description": "Too Many Requests: retry after 1"}))
    await app.reply(inbound["42"], c.Text(text="to 42"))
    await eventually(lambda: len(telegram_api.requests) == 1)
    await app.reply(inbound["43"], c.Text(text="to 43"))
    assert sorted([(await app.next_status()).state, (await app.next_status()).state]) == ["sent", "sent"]
    assert [request.json()["chat_id"] for request in telegram_api.requests[1:]] in ([42, 43], [43, 42])
    held_by_the_pause = paced()
    assert held_by_the_pause > 0

    # Five replies at once on a connection paced to 2 calls/s: past the burst, the pacer holds them.
    await asyncio.sleep(1.1)  # the burst refills
    await asyncio.gather(*(app.reply(inbound[str(chat)], c.Text(text=f"again {chat}")) for chat in chats))
    for _ in chats:
        assert (await app.next_status()).state == "sent"
    assert paced() > held_by_the_pause
    assert len(telegram_api.requests) == 8


async def test_a_send_held_longer_than_ack_wait_is_not_redelivered(nats_server: EmbeddedServer, nats_client,
                                                                    telegram_api: FakeApi,
                                                                    start_hub: StartHub) -> None:
    config = telegram_config(nats_server.url, telegram_api.base_url)
    config = with_hub(config, ack_wait_seconds=2.0)
    hub = await start_hub(config)
    app = await Processor(nats_client, hub.subjects.prefix).start()
    await post(hub, telegram_update(1, 42, "hi"))
    inbound, _ = await app.next()
    telegram_api.queue(Reply(status=429, body={"ok": False, "error_code": 429, "parameters": {"retry_after": 5},
                                               "description": "Too Many Requests: retry after 5"}))
    await app.reply(inbound, c.Text(text="after a long wait"))
    assert (await app.next_status()).state == "sent"  # two and a half ack_waits later
    js = nats_client.jetstream()
    for _ in range(100):  # acknowledged once the outcome was checkpointed
        pending, redelivered = await consumer_totals(js, hub.subjects.stream_name("messages"), "conversations")
        if pending == 0:
            break
        await asyncio.sleep(0.05)
    assert pending == 0 and redelivered == 0
    assert len(hub.inflight) == 0


async def test_long_polling_mode_reads_get_updates(nats_server: EmbeddedServer, nats_client, telegram_api: FakeApi,
                                                   start_hub: StartHub) -> None:
    updates = [telegram_update(500, 42, "polled one"), telegram_update(501, 43, "polled two")]

    def responder(request):  # type: ignore[no-untyped-def]
        if request.path.endswith("/getUpdates"):
            offset = request.json().get("offset", 0)
            return Reply(body={"ok": True, "result": [u for u in updates if u["update_id"] >= offset]})
        return telegram_responder(request)

    telegram_api.responder = responder
    hub = await start_hub(telegram_config(nats_server.url, telegram_api.base_url, mode="polling"))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    texts = set()
    for _ in range(2):
        envelope, _ = await app.next()
        assert isinstance(envelope, c.Message) and isinstance(envelope.parts[0], c.Text)
        texts.add(envelope.parts[0].text)
    assert texts == {"polled one", "polled two"}
    polls = [r for r in telegram_api.requests if r.path == f"/bot{BOT_TOKEN}/getUpdates"]
    await eventually(lambda: any(r.json().get("offset") == 502 for r in telegram_api.requests
                                 if r.path.endswith("/getUpdates")))
    assert polls[0].json().get("offset") in (None, 0)
    await asyncio.sleep(0.3)
    assert app.inbound.empty()  # the next polls returned nothing new, and nothing was duplicated


async def test_health_readiness_and_metrics(nats_server: EmbeddedServer, telegram_api: FakeApi,
                                            start_hub: StartHub) -> None:
    hub = await start_hub(telegram_config(nats_server.url, telegram_api.base_url))
    await post(hub, telegram_update(1, 42, "count me"))
    async with aiohttp.ClientSession() as session:
        for path in ("/healthz", "/readyz"):
            async with session.get(hub.http_url + path) as response:
                assert response.status == 200
        await eventually(lambda: 'babelhub_messages_in_total{channel="telegram"} 1.0' in hub.metrics.render().decode())
        async with session.get(hub.http_url + "/metrics") as response:
            text = await response.text()
    assert 'babelhub_webhooks_total{channel="telegram",code="200"} 1.0' in text
    assert 'babelhub_active_actors{actors="conversation"}' in text
    assert "babelhub_mailbox_depth" in text


async def test_references_to_our_messages_use_the_apps_ids(nats_server: EmbeddedServer, nats_client,
                                                            telegram_api: FakeApi, start_hub: StartHub) -> None:
    hub = await start_hub(telegram_config(nats_server.url, telegram_api.base_url))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    await post(hub, telegram_update(1, 42, "hi"))
    inbound, _ = await app.next()
    ours = await app.reply(inbound, c.Text(text="How can I help?"))
    sent = await app.next_status()
    native_message = sent.native_id.split(":")[1]

    # The person answers our message with Telegram's "reply" feature.
    update = telegram_update(2, 42, "with my order")
    update["message"]["reply_to_message"] = {"message_id": int(native_message), "date": 1_767_225_600,
                                             "chat": {"id": 42, "type": "private"}, "text": "How can I help?",
                                             "from": {"id": 1, "is_bot": True, "first_name": "Bot"}}
    await post(hub, update)
    answer, _ = await app.next()
    assert isinstance(answer, c.Message) and answer.reply_to == ours.id

    # A reply to an id this chat never saw goes out as a plain message, and says so.
    await app.reply(answer, c.Text(text="plain"), reply_to="no-such-message")
    assert (await app.next_status()).state == "sent"
    body = telegram_api.requests[-1].json()
    assert body["text"] == "plain" and "reply_parameters" not in body


async def test_polling_a_channel_that_cannot_be_polled_is_refused_at_start(nats_server: EmbeddedServer) -> None:
    config = telegram_config(nats_server.url, "http://127.0.0.1:9")
    slack = cfg.Connection(id="sl", tenant=TENANT, channel="slack", mode="polling")
    bad = msgspec.structs.replace(config, connections=[*config.connections, slack])
    with pytest.raises(ConfigError, match=r"\$\.connections\[1\]\.mode: channel slack cannot be polled"):
        async with Hub(bad):
            pass


async def test_a_background_task_that_swallows_its_cancellation_does_not_hold_the_stop(
        nats_server: EmbeddedServer, telegram_api: FakeApi) -> None:
    """nats-py swallows a cancellation that lands in its flush; a supervised loop that went on after it
    is cancelled again, so the hub still stops."""
    hub = Hub(telegram_config(nats_server.url, telegram_api.base_url))
    await hub.__aenter__()
    swallowed = asyncio.Event()

    async def stubborn(health: object) -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed.is_set():
                    raise
                swallowed.set()  # as nats-py's flush does: carry on as if nothing happened

    hub.spawn("stubborn", stubborn)
    await asyncio.sleep(0)
    await asyncio.wait_for(hub.stop(), 30)
    assert swallowed.is_set()


async def test_ownership_rounds_that_outlive_their_cancellation_end_before_the_leases_are_given_back(
        nats_server: EmbeddedServer, telegram_api: FakeApi, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancellation lost as a round's NATS call finishes (Python 3.11's `wait_for`) must not leave the
    rounds going while the leases are handed over, nor hold the stop for the lease's minute."""
    swallowed = asyncio.Event()
    rounds_running_at_release: list[bool] = []
    first_round, release = Ownership.round, Ownership.release

    async def round_waiting_on_nats(self: Ownership) -> None:
        if swallowed.is_set() or asyncio.current_task().get_name() != "ownership":  # type: ignore[union-attr]
            return await first_round(self)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()  # the call returned normally: the round goes on, then the loop sleeps
        return await first_round(self)

    async def recording_release(self: Ownership) -> None:
        rounds_running_at_release.append(any(task.get_name() == "ownership" for task in asyncio.all_tasks()))
        await release(self)

    monkeypatch.setattr(Ownership, "round", round_waiting_on_nats)
    monkeypatch.setattr(Ownership, "release", recording_release)
    config = telegram_config(nats_server.url, telegram_api.base_url)
    hub = Hub(with_hub(config, lease_seconds=60.0))
    await hub.__aenter__()
    await asyncio.sleep(0.1)  # the rounds task is in its (stalled) round
    await asyncio.wait_for(hub.stop(), 30)
    assert swallowed.is_set() and rounds_running_at_release == [False]


async def test_the_example_nats_processor_answers_through_the_hub(
        nats_server: EmbeddedServer, telegram_api: FakeApi, start_hub: StartHub, tmp_path: Path) -> None:
    hub = await start_hub(telegram_config(nats_server.url, telegram_api.base_url))
    log = tmp_path / "example.log"
    example = run_example("nats_processor.py", log, "--nats", nats_server.url, "--prefix", hub.subjects.prefix,
                          "--tenant", TENANT)
    try:
        await eventually(lambda: b"answering" in log.read_bytes(), timeout=30)
        url = hub.http_url + "/webhooks/telegram/tg"
        async with aiohttp.ClientSession() as session, session.post(
                url, json=telegram_update(1, 42, "ping"), headers=HEADERS) as response:
            assert response.status == 200
        await eventually(lambda: [r.json()["text"] for r in telegram_api.requests
                                  if r.path.endswith("/sendMessage")] == ["echo: ping"], timeout=30)
        assert example.poll() is None, log.read_text()
    finally:
        example.kill()
        example.wait()


def run_example(name: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """`python examples/<name> ARGS` as a user runs it, its output to `log`."""
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, str(ROOT / "examples" / name), *args], stdout=out,
                                stderr=subprocess.STDOUT)
