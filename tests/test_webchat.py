"""The built-in web chat over a real WebSocket, answered by the built-in echo processor over NATS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from babelhub import canonical as c
from babelhub.hub.app import Hub
from babelhub.hub.broker import EmbeddedServer
from tests.hubkit import dead_letters, stream_messages, webchat_config


@pytest.fixture
async def hub(nats_server: EmbeddedServer) -> AsyncIterator[Hub]:
    async with Hub(webchat_config(nats_server.url)) as running:
        yield running


async def receive_message(socket: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    """The next canonical message the hub pushes to the browser."""
    while True:
        frame = await asyncio.wait_for(socket.receive_json(), 15)
        if frame.get("kind") == "message":
            return frame


async def test_page_is_served(hub: Hub) -> None:
    async with aiohttp.ClientSession() as session, session.get(hub.http_url + "/") as response:
        assert response.status == 200 and response.content_type == "text/html"
        page = await response.text()
    assert "/ws/${connection}" in page and "babelhub web chat" in page


async def test_chat_echoes_and_buttons_come_back_as_actions(hub: Hub) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(hub.http_url + "/ws/webchat") as socket:
        hello = await socket.receive_json()
        assert hello["type"] == "session" and hello["session"]

        await socket.send_json({"id": "1", "text": "hello there"})
        reply = await receive_message(socket)
        assert reply["parts"] == [{"type": "text", "text": "echo: hello there"}]
        assert reply["direction"] == "outbound" and reply["reply_to"]

        await socket.send_json({"id": "2", "text": "menu"})
        menu = await receive_message(socket)
        (buttons,) = menu["parts"]
        assert buttons["type"] == "buttons" and len(buttons["buttons"]) == 3
        chosen = buttons["buttons"][0]

        await socket.send_json({"id": "3", "action": {"id": chosen["id"], "title": chosen["title"],
                                                      "source": menu["id"]}})
        answer = await receive_message(socket)
        assert answer["parts"] == [{"type": "text", "text": f"You chose: {chosen['title']}"}]


async def test_a_session_resumes_with_its_id(hub: Hub) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(hub.http_url + "/ws/webchat?session=visitor-7") as socket:
            assert (await socket.receive_json())["session"] == "visitor-7"
            await socket.send_json({"id": "a", "text": "first"})
            first = await receive_message(socket)
        async with session.ws_connect(hub.http_url + "/ws/webchat?session=visitor-7") as socket:
            await socket.receive_json()
            await socket.send_json({"id": "b", "text": "second"})
            second = await receive_message(socket)
    assert first["conversation"]["id"] == second["conversation"]["id"]


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("not json", "body is not valid JSON"),
        ('{"id": "x"}', "either `text` or `action`"),
        ('{"id": 5, "text": "hi"}', "Expected `str`, got `int` (at $.id)"),
        ('{"id": "x", "text": "hi", "colour": "red"}', "unknown field `colour`"),
    ],
)
async def test_a_bad_frame_closes_with_1007_and_a_reason_and_is_kept(hub: Hub, nats_client, frame: str,
                                                                     reason: str) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(hub.http_url + "/ws/webchat") as socket:
        await socket.receive_json()
        await socket.send_str(frame)
        closing = await asyncio.wait_for(socket.receive(), 15)
        assert closing.type == WSMsgType.CLOSE
        assert closing.data == 1007 and reason in closing.extra
    letters = await stream_messages(nats_client, f"{hub.subjects.prefix}.demo.dlq.>",
                                    hub.subjects.stream_name("dead_letters"))
    (letter,) = dead_letters(letters)
    assert letter["stage"] == "ingest" and letter["connection"] == "webchat"
    assert letter["body"] == frame.encode()
    # The chat itself is not disturbed.
    async with aiohttp.ClientSession() as session, session.ws_connect(hub.http_url + "/ws/webchat") as socket:
        await socket.receive_json()
        await socket.send_json({"id": "ok", "text": "still here"})
        assert (await receive_message(socket))["parts"][0]["text"] == "echo: still here"


async def test_unknown_socket_names_are_refused(hub: Hub) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(hub.http_url + "/ws/nope") as response:
            assert response.status == 404
        async with session.get(hub.http_url + "/ws/webchat?session=a.b") as response:
            assert response.status == 400


async def test_shutdown_closes_sockets_with_1001(nats_server: EmbeddedServer) -> None:
    hub = Hub(webchat_config(nats_server.url, echo=False))
    await hub.start()
    async with aiohttp.ClientSession() as session, session.ws_connect(hub.http_url + "/ws/webchat") as socket:
        await socket.receive_json()
        stopping = asyncio.create_task(hub.stop(), name="hub-stop")
        closing = await asyncio.wait_for(socket.receive(), 15)
        await stopping
    assert closing.type == WSMsgType.CLOSE and closing.data == 1001


async def test_a_message_for_a_visitor_who_left_is_reported_failed(hub: Hub, nats_client) -> None:
    from tests.hubkit import Processor

    app = await Processor(nats_client, hub.subjects.prefix, tenant="demo").start()
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(hub.http_url + "/ws/webchat?session=gone-soon") as socket:
            await socket.receive_json()
            await socket.send_json({"id": "1", "text": "hello"})
            await receive_message(socket)
            inbound, _ = await app.next()
        # The visitor closed the tab; the app answers anyway.
        await app.reply(inbound, c.Text(text="are you there?"))
        status = await app.next_status()
        while status.state == "sent":  # the echo processor's own reply may be reported first
            status = await app.next_status()
    assert status.state == "failed" and status.error is not None and status.error.code == "session_offline"
