"""The built-in web chat over a real WebSocket, answered by the built-in echo processor over NATS."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import WSMsgType

from babelhub import canonical as c
from babelhub.errors import ConfigError
from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer
from babelhub.sessions.limits import FrameBudgets
from babelhub.sessions.tokens import SessionSigner, well_formed
from tests.hubkit import Processor, VirtualClock, WebVisitor, dead_letters, stream_messages, webchat_config


@pytest.fixture
async def hub(nats_server: EmbeddedServer) -> AsyncIterator[Hub]:
    async with Hub(webchat_config(nats_server.url)) as running:
        yield running


async def test_page_is_served(hub: Hub) -> None:
    async with aiohttp.ClientSession() as session, session.get(hub.http_url + "/") as response:
        assert response.status == 200 and response.content_type == "text/html"
        page = await response.text()
    assert "/ws/${connection}" in page and "babelhub web chat" in page


async def test_chat_echoes_and_buttons_come_back_as_actions(hub: Hub) -> None:
    async with aiohttp.ClientSession() as session:
        visitor = await WebVisitor.open(session, hub.http_url)
        assert visitor.hello["session"] and visitor.hello["conversation"]
        assert visitor.subscribed["recovered"] is False  # a new visitor gives no cursor

        await visitor.say("hello there", "1")
        mine = (await visitor.frame("message"))["envelope"]
        assert mine["direction"] == "inbound" and mine["parts"] == [{"type": "text", "text": "hello there"}]
        reply = await visitor.reply()
        assert reply["parts"] == [{"type": "text", "text": "echo: hello there"}]
        assert reply["reply_to"] == mine["id"]
        assert (await visitor.frame("status"))["envelope"]["state"] == "sent"

        await visitor.say("menu", "2")
        menu = await visitor.reply()
        (buttons,) = menu["parts"]
        assert buttons["type"] == "buttons" and len(buttons["buttons"]) == 3
        chosen = buttons["buttons"][0]

        await visitor.post({"id": "3", "action": {"id": chosen["id"], "title": chosen["title"], "source": menu["id"]}})
        answer = await visitor.reply()
        assert answer["parts"] == [{"type": "text", "text": f"You chose: {chosen['title']}"}]


async def test_compression_offered_by_a_browser_is_declined(hub: Hub) -> None:
    """Browsers offer `permessage-deflate; client_max_window_bits`; taking it up would keep zlib state
    (over 100 KB) for every idle session. The chat still works uncompressed."""
    async with aiohttp.ClientSession() as session:
        visitor = await WebVisitor.open(session, hub.http_url, compress=15)
        assert visitor.socket.compress == 0  # the handshake's answer names no extension
        await visitor.say("plain frames")
        reply = await visitor.reply()
    assert reply["parts"] == [{"type": "text", "text": "echo: plain frames"}]


async def test_a_session_resumes_with_its_id_and_token(hub: Hub) -> None:
    async with aiohttp.ClientSession() as session:
        first_visit = await WebVisitor.open(session, hub.http_url)
        issued = first_visit.hello
        assert issued["resumed"] is False and issued["session"] and issued["token"]
        await first_visit.say("first", "a")
        first = await first_visit.reply()
        await first_visit.close()
        again = await WebVisitor.open(session, hub.http_url, resume=first_visit)
        await again.say("second", "b")
        second = await again.reply()
    assert again.hello == {**issued, "resumed": True}
    assert first["conversation"]["id"] == second["conversation"]["id"] == issued["conversation"]


async def test_what_was_sent_while_the_visitor_was_away_comes_once_when_it_resumes(hub: Hub, nats_client) -> None:
    """A visitor's connection drops; the app answers twice meanwhile. Reconnecting with its session and
    cursor, the visitor gets both answers, in order, and nothing it had already read."""
    app = await Processor(nats_client, hub.subjects.prefix, tenant="demo").start()
    async with aiohttp.ClientSession() as session:
        visitor = await WebVisitor.open(session, hub.http_url)
        await visitor.say("where is my parcel?")
        assert (await visitor.reply())["parts"][0]["text"] == "echo: where is my parcel?"
        await visitor.frame("status")
        inbound, _ = await app.next()
        await visitor.close()  # the train enters a tunnel

        for text in ("it left the depot", "it arrives today"):
            await app.reply(inbound, c.Text(text=text))
        states = [(await app.next_status()).state for _ in range(3)]  # the echo's reply, then these two
        assert states == ["sent", "sent", "sent"]  # stored for the visitor: nothing failed

        back = await WebVisitor.open(session, hub.http_url, resume=visitor)
        assert back.subscribed["recovered"] is True
        missed = [(await back.reply())["parts"][0]["text"] for _ in range(2)]
        assert missed == ["it left the depot", "it arrives today"]
        await back.say("thanks", "2")  # nothing else was pending: the next answer is to this
        assert (await back.reply())["parts"][0]["text"] == "echo: thanks"


@pytest.mark.parametrize("forged_token",
                         ["", "guess", "Zm9yZ2Vk-token_of_43_characters_xxxxxxxxxxx", "from-another-session"])
async def test_a_session_id_without_its_token_cannot_read_the_session(hub: Hub, nats_client,
                                                                      forged_token: str) -> None:
    """An attacker who learned a visitor's session id presents it with no token, a guessed one, or the
    token of a session of their own: the hub starts a new session for them and the visitor's messages
    never reach them."""
    app = await Processor(nats_client, hub.subjects.prefix, tenant="demo").start()
    async with aiohttp.ClientSession() as session:
        visitor = await WebVisitor.open(session, hub.http_url)
        await visitor.say("my order number is 1234")
        await visitor.reply()
        inbound, _ = await app.next()
        if forged_token == "from-another-session":
            own = await WebVisitor.open(session, hub.http_url, subscribe=False)
            forged_token = own.hello["token"]
        query = f"?session={visitor.hello['session']}" + (f"&token={forged_token}" if forged_token else "")
        attacker = await WebVisitor.open(session, hub.http_url, query=query)
        assert attacker.hello["session"] != visitor.hello["session"] and attacker.hello["resumed"] is False

        await app.reply(inbound, c.Text(text="your parcel leaves today"))
        assert (await visitor.reply())["parts"][0]["text"] == "your parcel leaves today"
        # The attacker's socket works, and all it ever gets is its own conversation.
        await attacker.say("anything for me?", "x")
        seen = await attacker.reply()
        assert seen["parts"][0]["text"] == "echo: anything for me?"
        assert seen["conversation"]["id"] != inbound.conversation.id
        # Subscribing to the visitor's conversation by its id is refused outright.
        await attacker.socket.send_json({"type": "subscribe", "conversations": [inbound.conversation.id]})
        closing = await close_of(attacker.socket)
        assert closing.data == 4003 and "may not read" in closing.extra


async def test_a_visitor_posts_but_never_sends_envelopes(hub: Hub) -> None:
    """A `send` frame would let a browser write as the business: a visitor's credential has no right to it."""
    async with aiohttp.ClientSession() as session:
        visitor = await WebVisitor.open(session, hub.http_url)
        envelope = {"kind": "message", "id": "m1", "tenant": "demo", "direction": "outbound",
                    "ts": "2026-12-01T10:00:00Z", "parts": [{"type": "text", "text": "refund approved"}],
                    "conversation": {"id": visitor.hello["conversation"], "channel": "webchat",
                                     "connection": "webchat", "native_id": visitor.hello["session"]}}
        await visitor.socket.send_json({"type": "send", "envelope": envelope})
        closing = await close_of(visitor.socket)
    assert closing.data == 4003 and "may not send" in closing.extra


async def test_a_visitor_is_shown_what_the_web_chat_can_show(hub: Hub, nats_client) -> None:
    """The stream holds the app's message as it was sent; the visitor gets it degraded to the web chat's
    capabilities, like a channel's API call would carry it (a location becomes text with a map link)."""
    app = await Processor(nats_client, hub.subjects.prefix, tenant="demo").start()
    async with aiohttp.ClientSession() as session:
        visitor = await WebVisitor.open(session, hub.http_url)
        await visitor.say("where are you?")
        await visitor.reply()
        inbound, _ = await app.next()
        await app.reply(inbound, c.Location(lat=48.8584, lon=2.2945, name="Eiffel Tower"))
        shown = await visitor.reply()
    assert [part["type"] for part in shown["parts"]] == ["text"]
    assert "Eiffel Tower" in shown["parts"][0]["text"]
    assert shown["meta"]["babelhub.degraded"][0]["from"] == "location"


@pytest.mark.parametrize(
    ("message", "reason", "path"),
    [
        ("not json", "Expected `object`", "$.message"),
        ({"id": "x"}, "either `text` or `action`", "$.message"),
        ({"id": 5, "text": "hi"}, "Expected `str`, got `int`", "$.message.id"),
        ({"id": "x", "text": "hi", "colour": "red"}, "unknown field `colour`", "$.message"),
        # Every field is bounded: an empty id would make every frame a duplicate of the first.
        ({"id": "", "text": "hi"}, "length >= 1", "$.message.id"),
        ({"id": "i" * 65, "text": "hi"}, "length <= 64", "$.message.id"),
        ({"id": "x", "text": "a" * 10_001}, "length <= 10000", "$.message.text"),
        ({"id": "x", "text": "hi", "name": "n" * 101}, "length <= 100", "$.message.name"),
        ({"id": "x", "action": {"id": "b" * 257}}, "length <= 256", "$.message.action.id"),
    ],
)
async def test_a_bad_post_is_answered_with_the_path_and_is_kept(hub: Hub, nats_client, message: Any, reason: str,
                                                                path: str) -> None:
    async with aiohttp.ClientSession() as session:
        visitor = await WebVisitor.open(session, hub.http_url)
        await visitor.post(message)
        error = await visitor.frame("error")
        assert reason in error["message"] and error["path"] == path
        # The socket is still open and the chat goes on.
        await visitor.say("still here", "ok")
        assert (await visitor.reply())["parts"][0]["text"] == "echo: still here"
    letters = await stream_messages(nats_client, f"{hub.subjects.prefix}.demo.dlq.>",
                                    hub.subjects.stream_name("dead_letters"))
    (letter,) = dead_letters(letters)
    assert letter["stage"] == "ingest" and letter["connection"] == "webchat"
    assert letter["body"] == json.dumps(message).encode()


async def test_a_visitor_that_keeps_posting_bad_frames_is_closed_with_4400(hub: Hub) -> None:
    async with aiohttp.ClientSession() as session:
        visitor = await WebVisitor.open(session, hub.http_url)
        for n in range(5):
            await visitor.post({"id": str(n)})
        closing = await close_of(visitor.socket)
    assert closing.data == 4400 and "too many bad frames" in closing.extra


async def test_unknown_socket_names_are_refused(hub: Hub) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(hub.http_url + "/ws/nope") as response:
            assert response.status == 404
        async with session.get(hub.http_url + "/ws/webchat?session=a.b") as response:
            assert response.status == 400


async def test_shutdown_closes_sockets_with_1001(nats_server: EmbeddedServer) -> None:
    hub = Hub(webchat_config(nats_server.url, echo=False))
    await hub.start()
    async with aiohttp.ClientSession() as session:
        visitor = await WebVisitor.open(session, hub.http_url)
        stopping = asyncio.create_task(hub.stop(), name="hub-stop")
        closing = await close_of(visitor.socket)
        await stopping
    assert closing.type == WSMsgType.CLOSE and closing.data == 1001


# ------------------------------------------------------------------------------ exposed to the internet


def limited_config(nats_url: str, *, options: dict[str, Any] | None = None, **hub_settings: Any) -> cfg.Config:
    """The web chat config with some of the hub's limits (and the connection's options) changed."""
    config = webchat_config(nats_url)
    (connection,) = config.connections
    return msgspec.structs.replace(
        config, hub=msgspec.structs.replace(config.hub, **hub_settings),
        connections=[msgspec.structs.replace(connection, options=options or {})])


async def close_of(socket: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage:
    """The close frame the hub ends the socket with (whatever it sent before is skipped)."""
    while True:
        frame = await asyncio.wait_for(socket.receive(), 15)
        if frame.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR):
            return frame


async def chat_once(hub: Hub, text: str) -> str:
    """A new visitor says something and returns the echo's text."""
    async with aiohttp.ClientSession() as session:
        visitor = await WebVisitor.open(session, hub.http_url)
        await visitor.say(text)
        text_back: str = (await visitor.reply())["parts"][0]["text"]
        await visitor.close()
        return text_back


@pytest.mark.parametrize(
    ("allowed", "origin", "opens"),
    [
        (None, None, True),  # not a browser: no Origin to check
        (None, "same", True),
        (None, "https://evil.example", False),
        (None, "null", False),
        (["https://shop.example"], "https://shop.example", True),
        (["https://shop.example:443/"], "https://shop.example", True),
        (["https://shop.example"], "http://shop.example", False),
        (["https://shop.example"], "https://evil.example", False),
        (["https://shop.example"], "same", True),
        (["*"], "https://anyone.example", True),
    ],
)
async def test_only_allowed_origins_open_the_chat(nats_server: EmbeddedServer, allowed: list[str] | None,
                                                  origin: str | None, opens: bool) -> None:
    options = {} if allowed is None else {"allowed_origins": allowed}
    async with Hub(limited_config(nats_server.url, options=options)) as hub, aiohttp.ClientSession() as session:
        headers = {} if origin is None else {"Origin": hub.http_url if origin == "same" else origin}
        if opens:
            async with session.ws_connect(hub.http_url + "/ws/webchat", headers=headers) as socket:
                assert (await socket.receive_json())["type"] == "session"
        else:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(hub.http_url + "/ws/webchat", headers=headers)
            assert refused.value.status == 403


@pytest.mark.parametrize("allowed", ["https://shop.example", ["shop.example"], ["https://shop.example/chat"], [5]])
async def test_a_malformed_origin_list_stops_the_start(nats_server: EmbeddedServer, allowed: Any) -> None:
    with pytest.raises(ConfigError, match="allowed_origins"):
        async with Hub(limited_config(nats_server.url, options={"allowed_origins": allowed})):
            pass


async def test_one_address_holds_a_bounded_number_of_sockets(nats_server: EmbeddedServer) -> None:
    async with Hub(limited_config(nats_server.url, max_sockets_per_ip=3)) as hub, aiohttp.ClientSession() as session:
        sockets = [await session.ws_connect(hub.http_url + "/ws/webchat") for _ in range(3)]
        for socket in sockets:
            await socket.receive_json()
        one_too_many = await session.ws_connect(hub.http_url + "/ws/webchat")
        closing = await close_of(one_too_many)
        assert closing.data == 1008 and "hub.max_sockets_per_ip" in closing.extra and "3" in closing.extra
        # A closed socket frees its place.
        await sockets.pop().close()
        assert await chat_once(hub, "room again") == "echo: room again"
        for socket in sockets:
            await socket.close()


async def test_a_session_sending_too_fast_is_closed_with_1008(nats_server: EmbeddedServer, nats_client) -> None:
    config = limited_config(nats_server.url, session_frame_rate=1.0, session_frame_burst=5)
    async with Hub(config) as hub, aiohttp.ClientSession() as session:
        async with session.ws_connect(hub.http_url + "/ws/webchat") as socket:
            await socket.receive_json()
            for n in range(50):
                if socket.closed:
                    break
                await socket.send_json({"type": "post", "message": {"id": str(n), "text": "spam"}})
            closing = await close_of(socket)
        assert closing.data == 1008 and "frame rate limit" in closing.extra
        assert "hub.session_frame_rate" in closing.extra
        recorded = await stream_messages(nats_client, f"{hub.subjects.prefix}.demo.raw.>",
                                         hub.subjects.stream_name("raw"))
        assert 5 <= len(recorded) < 50  # the frames over the budget were never recorded


@pytest.mark.parametrize("frame", ["x" * 800_000,
                                   json.dumps({"type": "post", "message": {"id": "big", "text": "a" * 800_000}})])
async def test_an_oversized_frame_closes_with_1009_and_the_hub_serves_everyone(
        nats_server: EmbeddedServer, nats_client, frame: str) -> None:
    """The attack from issue 7: one ~800 KB frame, no authentication needed, used to make a publish over
    the NATS server's max_payload and cut the hub off NATS for good."""
    async with Hub(webchat_config(nats_server.url)) as hub, aiohttp.ClientSession() as session:
        async with session.ws_connect(hub.http_url + "/ws/webchat") as attacker:
            await attacker.receive_json()
            await attacker.send_str(frame)
            closing = await close_of(attacker)
        assert closing.data == 1009 and "65536" in closing.extra and "hub.max_frame_bytes" in closing.extra

        assert await chat_once(hub, "still served") == "echo: still served"
        async with session.get(hub.http_url + "/readyz") as response:
            assert response.status == 200
        raw = await stream_messages(nats_client, f"{hub.subjects.prefix}.demo.raw.>", hub.subjects.stream_name("raw"))
        assert raw and all(len(record) < 65_536 for record in raw)  # the big frame was never recorded
        letters = await stream_messages(nats_client, f"{hub.subjects.prefix}.demo.dlq.>",
                                        hub.subjects.stream_name("dead_letters"))
        assert any(b"WebSocket frame refused" in letter and b"65536" in letter for letter in letters)


async def test_a_frame_limit_near_the_nats_max_payload_stops_the_start(nats_server: EmbeddedServer) -> None:
    with pytest.raises(ConfigError, match="max_frame_bytes"):
        async with Hub(limited_config(nats_server.url, max_frame_bytes=1024 * 1024)):
            pass


async def test_a_stalled_request_body_times_out_with_408(nats_server: EmbeddedServer) -> None:
    config = limited_config(nats_server.url, body_timeout_seconds=0.5)
    telegram = cfg.Connection(id="tg", tenant="demo", channel="telegram",
                              secrets={"bot_token": "1:x", "secret_token": "s"})
    config = msgspec.structs.replace(config, connections=[*config.connections, telegram])
    async with Hub(config) as hub, aiohttp.ClientSession() as session:
        chatting = await WebVisitor.open(session, hub.http_url)
        host, port = hub.http_url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"POST /webhooks/telegram/tg HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"id\": \"slow")  # ... and nothing more
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), 15)
            assert status_line.startswith(b"HTTP/1.1 408")
            rest = await asyncio.wait_for(reader.read(), 15)  # the hub closes the connection
            assert b"hub.body_timeout_seconds" in rest
        finally:
            writer.close()
        # A WebSocket has no body: it outlives the body deadline.
        await chatting.say("after the deadline")
        assert (await chatting.reply())["parts"][0]["text"] == "echo: after the deadline"


async def test_a_chatty_visitor_does_not_hold_up_other_visitors(nats_server: EmbeddedServer) -> None:
    """One visitor floods frames (reconnecting with its token each time it is cut off) while another
    chats: every one of the other visitor's messages is answered, and the flood hits its rate limit."""
    config = limited_config(nats_server.url, session_frame_rate=5.0, session_frame_burst=12)  # subscribe + 10 posts fit
    async with Hub(config) as hub, aiohttp.ClientSession() as session:
        quiet_done = asyncio.Event()
        cut_off: list[aiohttp.WSMessage] = []

        async def flood() -> None:
            query = ""
            for _ in range(100):  # bounded, however slow the machine
                if quiet_done.is_set():
                    return
                async with session.ws_connect(hub.http_url + "/ws/webchat" + query) as socket:
                    issued = await socket.receive_json()
                    query = f"?session={issued['session']}&token={issued['token']}"
                    with contextlib.suppress(ConnectionError):
                        for n in range(200):
                            if socket.closed:
                                break
                            await socket.send_json({"type": "post", "message": {
                                "id": f"{issued['session']}-{len(cut_off)}-{n}", "text": "spam"}})
                    cut_off.append(await close_of(socket))

        flooding = asyncio.create_task(flood(), name="flood")
        try:
            quiet = await WebVisitor.open(session, hub.http_url)
            for n in range(10):
                await quiet.say(f"question {n}", str(n))
                assert (await quiet.reply())["parts"][0]["text"] == f"echo: question {n}"
        finally:
            quiet_done.set()
            await asyncio.wait_for(flooding, 60)
        assert cut_off and all(frame.data == 1008 for frame in cut_off)


def test_a_frame_budget_refills_at_its_rate_and_is_kept_while_not_full() -> None:
    clock = VirtualClock()
    budgets = FrameBudgets(rate=2.0, burst=3, clock=clock)
    assert [budgets.take("a") for _ in range(4)] == [True, True, True, False]
    assert budgets.take("b")  # every session has a budget of its own
    clock.now += 0.5  # one frame's worth
    assert budgets.take("a") and not budgets.take("a")
    # A session that reconnects at once gets no fresh burst: its budget is kept until it has refilled.
    budgets.forget_refilled(keep=set())
    assert not budgets.take("a")
    clock.now += 1.5
    budgets.forget_refilled(keep=set())
    assert len(budgets) == 0  # full again: remembering it would change nothing


def test_a_resume_token_is_bound_to_its_session_connection_and_tenant() -> None:
    signer = SessionSigner(b"k" * 32, "demo", "webchat")
    session, token = signer.new_session()
    assert signer.valid(session, token) and well_formed(session) and well_formed(token)
    other, _ = signer.new_session()
    assert not signer.valid(other, token)
    assert not SessionSigner(b"k" * 32, "demo", "webchat2").valid(session, token)
    assert not SessionSigner(b"k" * 32, "acme", "webchat").valid(session, token)
    assert not SessionSigner(b"other key" * 4, "demo", "webchat").valid(session, token)
    assert not signer.valid(session, token[:-1]) and not signer.valid(session, "é" * 43)


_LIMITS = ["BODY_TIMEOUT_SECONDS", "MAX_FRAME_BYTES", "MAX_SOCKETS_PER_IP", "SESSION_FRAME_RATE",
           "SESSION_FRAME_BURST"]


@pytest.mark.parametrize(("setting", "value"), [(setting, value) for setting in _LIMITS for value in ("0", "-1")]
                         + [("BODY_TIMEOUT_SECONDS", "nan"), ("SESSION_FRAME_RATE", "inf")])
def test_a_limit_that_is_no_limit_is_refused(setting: str, value: str) -> None:
    with pytest.raises(ConfigError, match=setting.lower()):
        cfg.load(None, env={f"BABELHUB_{setting}": value})


async def test_a_web_chat_connection_takes_no_webhooks(nats_server: EmbeddedServer, nats_client) -> None:  # type: ignore[no-untyped-def]
    """Browsers reach a web chat only through its WebSocket (origin, limits, session tokens): a POST that
    names a session in its headers must not slip a message into someone's chat."""
    async with Hub(limited_config(nats_server.url)) as hub, aiohttp.ClientSession() as session:
        frame = {"id": "1", "text": "forged"}
        async with session.post(hub.http_url + "/webhooks/webchat/webchat", json=frame,
                                headers={"x-babelhub-session": "someone-else"}) as response:
            assert response.status == 404
        raw = await stream_messages(nats_client, f"{hub.subjects.prefix}.demo.raw.>", hub.subjects.stream_name("raw"))
        assert raw == []
