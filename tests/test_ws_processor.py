"""The `websocket` processor transport: an app on `WebSocket /ws/processor` gets its inbound envelopes
with their sequence, acknowledges them, answers on the same socket, and resumes without loss — against a
real hub, a real nats-server, a fake Telegram API and a real aiohttp WebSocket client."""

from __future__ import annotations

import asyncio
import json
import socket as sockets
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from nats.aio.client import Client as NATS

from babelhub import canonical as c
from babelhub.hub.app import Hub
from babelhub.hub.cli import main as cli_main
from babelhub.processors.websocket import MAX_BAD_FRAMES, REPLACED, TOO_MANY_ERRORS, TOO_SLOW
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from babelhub.services.routing import HOPS_HEADER, ORIGIN_HEADER
from tests.fakeapi import FakeApi
from tests.hubkit import (
    SECRET,
    TENANT,
    StartHub,
    dead_letters,
    eventually,
    stream_messages,
    telegram_config,
    telegram_responder,
    telegram_update,
)

ROOT = Path(__file__).resolve().parent.parent
KEY = "k"
OTHER_KEY = "other-key"
FRAME_SECONDS = 15.0


def ws_config(nats_url: str, api_base: str, *, window: int = 256) -> cfg.Config:
    """Telegram connection `tg` of tenant acme with websocket processor `bot`; tenant `other` with its own
    websocket processor `rival` (so the first transport instance serves two processors)."""
    config = telegram_config(nats_url, api_base)
    return msgspec.structs.replace(
        config, tenants=[*config.tenants, cfg.Tenant(id="other", api_keys=[OTHER_KEY])],
        processors=[cfg.Processor(id="rival", tenant="other", transport="websocket"),
                    cfg.Processor(id="bot", tenant=TENANT, transport="websocket", options={"window": window})])


@pytest.fixture
async def hub(nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub) -> Hub:
    fake_api.responder = telegram_responder
    return await start_hub(ws_config(nats_server.url, fake_api.base_url))


async def connect(http: aiohttp.ClientSession, hub: Hub, *, key: str = KEY, processor: str | None = "bot",
                  after: int | None = None) -> aiohttp.ClientWebSocketResponse:
    params = {"processor": processor} if processor is not None else {}
    if after is not None:
        params["after"] = str(after)
    return await http.ws_connect(hub.http_url.replace("http://", "ws://") + "/ws/processor", params=params,
                                 headers={"Authorization": f"Bearer {key}"})


async def frame(socket: aiohttp.ClientWebSocketResponse, timeout: float = FRAME_SECONDS) -> dict[str, Any]:
    message = await socket.receive(timeout=timeout)
    assert message.type == aiohttp.WSMsgType.TEXT, (message.type, message.data, message.extra)
    decoded: dict[str, Any] = json.loads(message.data)
    return decoded


async def hello(socket: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    first = await frame(socket)
    assert first["type"] == "hello"
    return first


async def envelopes(socket: aiohttp.ClientWebSocketResponse, count: int) -> list[dict[str, Any]]:
    got = [await frame(socket) for _ in range(count)]
    assert [item["type"] for item in got] == ["envelope"] * count
    return got


async def post_update(hub: Hub, http: aiohttp.ClientSession, update_id: int, text: str, chat: int = 42) -> None:
    async with http.post(hub.http_url + "/webhooks/telegram/tg", json=telegram_update(update_id, chat, text),
                         headers={"X-Telegram-Bot-Api-Secret-Token": SECRET}) as response:
        assert response.status == 200


def texts(items: list[dict[str, Any]]) -> list[str]:
    return [item["envelope"]["parts"][0]["text"] for item in items]


def sends(api: FakeApi) -> list[dict[str, Any]]:
    return [call.json() for call in api.requests if call.path.endswith("/sendMessage")]


async def nothing_more(socket: aiohttp.ClientWebSocketResponse, seconds: float = 1.0) -> None:
    """No envelope frame comes within `seconds` (a check of absence, not of speed)."""
    with pytest.raises(asyncio.TimeoutError):
        await socket.receive(timeout=seconds)


async def test_an_envelope_comes_with_its_seq_and_the_answer_is_sent_once(
        hub: Hub, http: aiohttp.ClientSession, fake_api: FakeApi, nats_client: NATS) -> None:
    socket = await connect(http, hub)
    assert (await hello(socket)) == {"type": "hello", "processor": "bot", "resumed_from": 0, "window": 256}
    await post_update(hub, http, 1, "hello app")
    [delivered] = await envelopes(socket, 1)
    inbound = c.decode(json.dumps(delivered["envelope"]).encode())
    assert isinstance(inbound, c.Message) and inbound.parts == [c.Text(text="hello app")]
    assert delivered["seq"] >= 1

    answer = {"conversation": {"connection": "tg", "native_id": "42"}, "reply_to": inbound.id,
              "parts": [{"type": "text", "text": "hi Ada"}]}
    await socket.send_json({"type": "send", "ref": "a1", "envelope": answer, "idempotency_key": "answer-1"})
    accepted = await frame(socket)
    assert accepted == {"type": "accepted", "ref": "a1", "id": accepted["id"],
                        "conversation": inbound.conversation.id, "duplicate": False}
    await socket.send_json({"type": "send", "ref": "a2", "envelope": answer, "idempotency_key": "answer-1"})
    again = await frame(socket)
    assert (again["ref"], again["id"], again["duplicate"]) == ("a2", accepted["id"], True)
    await socket.send_json({"type": "ack", "seq": delivered["seq"]})

    await eventually(lambda: len(sends(fake_api)) == 1)
    assert sends(fake_api)[0]["text"] == "hi Ada"
    # The stored answer names its processor (never routed back to it) and counts one hop.
    js, subjects = hub.nc.jetstream(), hub.subjects
    stored = await js.get_last_msg(subjects.stream_name("messages"),
                                   f"{subjects.prefix}.{TENANT}.out.*.{inbound.conversation.id}")
    assert stored.headers is not None
    assert (stored.headers[ORIGIN_HEADER], stored.headers[HOPS_HEADER]) == ("bot", "1")
    await socket.close()
    await asyncio.sleep(0.5)  # a duplicate send would have reached the channel by now
    assert len(sends(fake_api)) == 1


async def test_what_was_not_acknowledged_comes_again_and_what_was_never_does(
        hub: Hub, http: aiohttp.ClientSession) -> None:
    socket = await connect(http, hub)
    await hello(socket)
    for update_id, text in enumerate(["one", "two", "three"], start=1):
        await post_update(hub, http, update_id, text)
    first = await envelopes(socket, 3)
    seqs = [item["seq"] for item in first]
    assert texts(first) == ["one", "two", "three"] and seqs == sorted(seqs)
    await socket.send_json({"type": "ack", "seq": seqs[0]})
    await socket.send_json({"type": "ping", "id": "p"})
    assert await frame(socket) == {"type": "pong", "id": "p"}  # the ack was read before the socket ends
    await socket.close()

    socket = await connect(http, hub, after=seqs[0])
    assert (await hello(socket))["resumed_from"] == seqs[0]
    again = await envelopes(socket, 2)
    assert texts(again) == ["two", "three"] and [item["seq"] for item in again] == seqs[1:]
    await socket.send_json({"type": "ack", "seq": seqs[2]})  # cumulative: "two" as well
    await socket.send_json({"type": "ping"})
    assert (await frame(socket))["type"] == "pong"
    await socket.close()

    await post_update(hub, http, 4, "four")
    socket = await connect(http, hub)  # no `after`: what JetStream holds acknowledged never comes again
    await hello(socket)
    assert texts(await envelopes(socket, 1)) == ["four"]
    await nothing_more(socket)


async def test_an_ack_lost_with_its_socket_is_recovered_from_after(hub: Hub, http: aiohttp.ClientSession) -> None:
    socket = await connect(http, hub)
    await hello(socket)
    await post_update(hub, http, 1, "one")
    await post_update(hub, http, 2, "two")
    delivered = await envelopes(socket, 2)
    await socket.close()  # the app handled "one" but its ack never reached the hub

    socket = await connect(http, hub, after=delivered[0]["seq"])
    await hello(socket)
    assert texts(await envelopes(socket, 1)) == ["two"]
    await socket.close()
    socket = await connect(http, hub)  # "one" was acknowledged to JetStream from `after`
    await hello(socket)
    assert texts(await envelopes(socket, 1)) == ["two"]
    await nothing_more(socket)


async def test_the_window_bounds_the_envelopes_out_unacknowledged(
        nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub, http: aiohttp.ClientSession) -> None:
    hub = await start_hub(ws_config(nats_server.url, fake_api.base_url, window=2))
    socket = await connect(http, hub)
    assert (await hello(socket))["window"] == 2
    for update_id in range(1, 5):
        await post_update(hub, http, update_id, f"m{update_id}")
    first = await envelopes(socket, 2)
    await nothing_more(socket)
    await socket.send_json({"type": "ack", "seq": first[0]["seq"]})
    assert texts(await envelopes(socket, 1)) == ["m3"]
    await nothing_more(socket)
    await socket.send_json({"type": "ack", "seq": first[1]["seq"]})
    assert texts(await envelopes(socket, 1)) == ["m4"]


async def test_an_unknown_key_is_refused_before_the_upgrade(hub: Hub, http: aiohttp.ClientSession) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await connect(http, hub, key="guessed")
    assert refused.value.status == 401
    async with http.get(hub.http_url + "/ws/processor", params={"processor": "bot"},
                        headers={"Authorization": "Bearer guessed"}) as response:
        body = await response.json()
    assert response.status == 401 and body["error"]["code"] == "unauthenticated"
    assert "guessed" not in json.dumps(body)


async def test_another_tenants_processor_is_answered_as_unknown(hub: Hub, http: aiohttp.ClientSession) -> None:
    answers = []
    for processor in ("rival", "nobody"):
        async with http.get(hub.http_url + "/ws/processor", params={"processor": processor},
                            headers={"Authorization": f"Bearer {KEY}"}) as response:
            answers.append((response.status, (await response.json())["error"]))
    assert [status for status, _ in answers] == [404, 404]
    assert [(error["code"], error["path"]) for _, error in answers] == [("not_found", "$.query.processor")] * 2
    assert answers[0][1]["message"] == "no websocket processor 'rival'"
    # The other tenant's key reaches its own processor (served by the same route), without naming it.
    socket = await connect(http, hub, key=OTHER_KEY, processor=None)
    assert (await hello(socket))["processor"] == "rival"


async def test_bad_after_is_refused_with_its_path(hub: Hub, http: aiohttp.ClientSession) -> None:
    async with http.get(hub.http_url + "/ws/processor", params={"processor": "bot", "after": "-1"},
                        headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status == 400
        assert (await response.json())["error"]["path"] == "$.query.after"


async def test_bad_frames_get_error_frames_with_paths_then_the_socket_is_closed(
        hub: Hub, http: aiohttp.ClientSession, nats_client: NATS) -> None:
    socket = await connect(http, hub)
    await hello(socket)
    refused_answer = {"conversation": {"connection": "tg", "native_id": "42"}, "parts": [{"type": "text"}]}
    await socket.send_json({"type": "send", "ref": "r", "envelope": refused_answer})
    refused = await frame(socket)  # a refused envelope: answered, kept, not counted as a broken frame
    assert (refused["type"], refused["ref"], refused["path"]) == ("error", "r", "$.envelope.parts[0]")
    other_tenants = {"conversation": {"connection": "nowhere", "native_id": "1"}, "parts": []}
    await socket.send_json({"type": "send", "ref": "n", "envelope": other_tenants})
    assert (await frame(socket))["path"] == "$.envelope.conversation.connection"
    bad = ["{not json", json.dumps({"type": "ack", "seq": 0}), json.dumps({"type": "ack", "seq": 10**9}),
           json.dumps({"type": "dance"}), json.dumps({"type": "ping", "id": "x" * 65})]
    paths = []
    for text in bad[:MAX_BAD_FRAMES - 1]:
        await socket.send_str(text)
        error = await frame(socket)
        assert error["type"] == "error"
        paths.append(error["path"])
    assert paths == ["$", "$.seq", "$.seq", "$.type"]
    await socket.send_str(bad[MAX_BAD_FRAMES - 1])
    closing = await socket.receive(timeout=FRAME_SECONDS)
    assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == TOO_MANY_ERRORS
    assert "too many bad frames" in closing.extra
    parked = dead_letters(await stream_messages(nats_client, f"{hub.subjects.prefix}.{TENANT}.dlq.processor",
                                                hub.subjects.stream_name("dead_letters")))
    assert len(parked) == 2 + MAX_BAD_FRAMES
    assert parked[0]["path"] == "$.envelope.parts[0]"


async def test_an_oversized_frame_closes_with_1009_and_its_reason(hub: Hub, http: aiohttp.ClientSession) -> None:
    socket = await connect(http, hub)
    await hello(socket)
    await socket.send_str(json.dumps({"type": "ping", "id": "x" * (hub.config.hub.max_frame_bytes + 1)}))
    closing = await socket.receive(timeout=FRAME_SECONDS)
    assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    assert "hub.max_frame_bytes" in closing.extra


async def test_a_binary_frame_closes_with_1003(hub: Hub, http: aiohttp.ClientSession) -> None:
    socket = await connect(http, hub)
    await hello(socket)
    await socket.send_bytes(b"\x00\x01")
    closing = await socket.receive(timeout=FRAME_SECONDS)
    assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == aiohttp.WSCloseCode.UNSUPPORTED_DATA


async def test_a_second_socket_replaces_the_first_which_hands_its_envelopes_over(
        hub: Hub, http: aiohttp.ClientSession) -> None:
    old = await connect(http, hub)
    await hello(old)
    await post_update(hub, http, 1, "one")
    assert texts(await envelopes(old, 1)) == ["one"]
    new = await connect(http, hub)
    closing = await old.receive(timeout=FRAME_SECONDS)
    assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == REPLACED
    await hello(new)
    assert texts(await envelopes(new, 1)) == ["one"]


async def test_the_example_app_answers_through_the_socket(hub: Hub, http: aiohttp.ClientSession,
                                                          fake_api: FakeApi) -> None:
    url = hub.http_url.replace("http://", "ws://")
    app = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "examples" / "ws_processor.py"), "--url", url, "--key", KEY, "--processor", "bot",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        await post_update(hub, http, 1, "hi there")
        await eventually(lambda: len(sends(fake_api)) == 1, timeout=30.0)
        assert sends(fake_api)[0]["text"] == "echo: hi there"
    finally:
        app.terminate()
        output, _ = await asyncio.wait_for(app.communicate(), timeout=10)
    assert b"Traceback" not in output, output.decode()


def test_babelhub_schema_prints_the_processor_frames(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["schema", "--processor-frames"]) == 0
    documents = json.loads(capsys.readouterr().out)
    assert sorted(documents) == ["app.ack", "app.ping", "app.send", "hub.accepted", "hub.envelope", "hub.error",
                                 "hub.hello", "hub.pong"]
    assert documents["app.ack"]["$defs"]["Ack"]["properties"]["seq"]["minimum"] == 1


async def test_envelopes_wait_in_jetstream_while_no_app_is_connected(hub: Hub, http: aiohttp.ClientSession) -> None:
    await post_update(hub, http, 1, "while away")
    await post_update(hub, http, 2, "still away")
    js, stream = hub.nc.jetstream(), hub.subjects.stream_name("messages")
    for _ in range(500):  # bounded: until both are decoded and stored as inbound envelopes
        info = await js.consumer_info(stream, "processor-bot")
        if info.num_pending == 2:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)  # were anything fetched, it would show by now
    info = await js.consumer_info(stream, "processor-bot")
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (2, 0, 0)  # nothing fetched
    socket = await connect(http, hub)
    await hello(socket)
    assert texts(await envelopes(socket, 2)) == ["while away", "still away"]


async def test_a_tenant_with_several_websocket_processors_names_one(
        nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub, http: aiohttp.ClientSession) -> None:
    config = ws_config(nats_server.url, fake_api.base_url)
    config = msgspec.structs.replace(config, processors=[
        *config.processors, cfg.Processor(id="bot-2", tenant=TENANT, transport="websocket")])
    hub = await start_hub(config)
    async with http.get(hub.http_url + "/ws/processor", headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status == 400
        assert (await response.json())["error"]["path"] == "$.query.processor"
    socket = await connect(http, hub, processor="bot-2")
    assert (await hello(socket))["processor"] == "bot-2"


async def test_a_processor_moved_from_echo_keeps_its_place(
        nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub, http: aiohttp.ClientSession) -> None:
    fake_api.responder = telegram_responder
    config = ws_config(nats_server.url, fake_api.base_url)
    echoed = msgspec.structs.replace(config, processors=[cfg.Processor(id="bot", tenant=TENANT, transport="echo")])
    first = await start_hub(echoed)
    await post_update(first, http, 1, "to echo")
    await eventually(lambda: len(sends(fake_api)) == 1)
    await first.stop()

    hub = await start_hub(config)  # the echo's push consumer becomes a pull consumer from where it stood
    await post_update(hub, http, 2, "to the app")
    socket = await connect(http, hub)
    await hello(socket)
    assert texts(await envelopes(socket, 1)) == ["to the app"]
    await nothing_more(socket)


async def test_an_app_that_does_not_read_is_closed_without_holding_up_another(
        nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub, http: aiohttp.ClientSession) -> None:
    hub = await start_hub(ws_config(nats_server.url, fake_api.base_url, window=1))
    slow = await connect(http, hub)
    transport = slow.get_extra_info("socket")
    assert transport is not None
    transport.setsockopt(sockets.SOL_SOCKET, sockets.SO_RCVBUF, 4096)  # the app's side fills up quickly
    ping = json.dumps({"type": "ping", "id": "x" * 64})
    other = await connect(http, hub, key=OTHER_KEY, processor="rival")  # another processor, same hub
    await hello(other)
    for _ in range(20_000):  # bounded: pongs the app never reads
        await slow.send_str(ping)
        if slow.closed:
            break
    await other.send_json({"type": "ping", "id": "other"})
    assert await frame(other) == {"type": "pong", "id": "other"}
    codes = []
    for _ in range(25_000):
        message = await slow.receive(timeout=FRAME_SECONDS)
        if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            codes.append(message.data)
            break
    assert codes == [TOO_SLOW]


async def test_an_after_naming_nothing_sent_here_skips_nothing(hub: Hub, http: aiohttp.ClientSession) -> None:
    socket = await connect(http, hub)
    await hello(socket)
    await post_update(hub, http, 1, "one")
    await post_update(hub, http, 2, "two")
    delivered = await envelopes(socket, 2)
    await socket.close()
    # A seq beyond anything this process sent (the app's last ack went to another process, say).
    socket = await connect(http, hub, after=delivered[1]["seq"] + 100)
    await hello(socket)
    assert texts(await envelopes(socket, 2)) == ["one", "two"]


async def test_of_sockets_racing_to_replace_one_the_newest_is_served(hub: Hub, http: aiohttp.ClientSession) -> None:
    first = await connect(http, hub)
    await hello(first)
    racing = await asyncio.gather(connect(http, hub), connect(http, hub))
    outcomes = []
    for socket in racing:
        message = await socket.receive(timeout=FRAME_SECONDS)
        outcomes.append(json.loads(message.data)["type"] if message.type == aiohttp.WSMsgType.TEXT
                        else message.data)
    assert sorted(map(str, outcomes)) == sorted([str(REPLACED), "hello"])
    closing = await first.receive(timeout=FRAME_SECONDS)
    assert closing.data == REPLACED


async def test_an_app_moving_to_another_hub_process_gets_what_it_left_unacknowledged(
        nats_server: EmbeddedServer, fake_api: FakeApi, start_hub: StartHub, http: aiohttp.ClientSession) -> None:
    config = ws_config(nats_server.url, fake_api.base_url)
    first, second = await start_hub(config), await start_hub(config)  # two processes' worth, one NATS
    socket = await connect(http, first)
    await hello(socket)
    await post_update(first, http, 1, "one")
    await post_update(first, http, 2, "two")
    delivered = await envelopes(socket, 2)
    await socket.send_json({"type": "ack", "seq": delivered[0]["seq"]})
    await socket.send_json({"type": "ping"})
    assert (await frame(socket))["type"] == "pong"
    await socket.close()

    socket = await connect(http, second, after=delivered[0]["seq"])
    await hello(socket)
    assert texts(await envelopes(socket, 1)) == ["two"]
    await nothing_more(socket)
