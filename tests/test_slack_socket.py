"""Slack Socket Mode (`mode = "slack_socket"`) against a local fake of Slack: `apps.connections.open` and
the WebSocket it hands out, speaking the frames Slack's Socket Mode guide documents (fixtures in
`tests/fixtures/slack_socket/`), with a real hub on a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import WSMsgType, web

from babelhub import canonical as c
from babelhub.errors import ConfigError
from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer, free_port, partition_of
from tests.hubkit import (
    TENANT,
    Processor,
    StartHub,
    dead_letters,
    eventually,
    stream_messages,
    unique_prefix,
)

FIXTURES = Path(__file__).parent / "fixtures" / "slack_socket"
APP_TOKEN = "xapp-1-A111-0000-app-level-secret"
BOT_TOKEN = "xoxb-0000-bot-secret"
TICKET = "ticket-0f9e8d7c-one-time"


def fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return loaded


def envelope(name: str, envelope_id: str = "", **payload_changes: Any) -> dict[str, Any]:
    """A fixture envelope, under another `envelope_id` and with its payload's fields changed if asked."""
    frame = fixture(name)
    if envelope_id:
        frame["envelope_id"] = envelope_id
    frame["payload"].update(payload_changes)
    return frame


class FakeSlack:
    """Slack's side of Socket Mode on 127.0.0.1: `POST /api/apps.connections.open` (scripted answers
    first, then a socket URL with a one-time ticket) and `GET /link/` (the socket: `hello` first, then
    whatever the test sends; acks are recorded and what was not acknowledged can be sent again)."""

    def __init__(self) -> None:
        self.opens: list[dict[str, str]] = []
        """The headers of each apps.connections.open call."""
        self.open_replies: deque[tuple[int, dict[str, Any], dict[str, str]]] = deque()
        self.sockets: list[web.WebSocketResponse] = []
        self.timeline: list[str] = []
        """"open <n>", "hello <n>", "closed <n>" (by the hub), in the order they happened."""
        self.acks: list[str] = []
        self.unacked: dict[str, dict[str, Any]] = {}
        self.hold_hello = asyncio.Event()
        self.hold_hello.set()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    @property
    def api_base(self) -> str:
        return f"{self.base_url}/api"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/api/apps.connections.open", self._open)
        app.router.add_get("/link/", self._socket)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        for socket in self.sockets:
            await socket.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _open(self, request: web.Request) -> web.Response:
        self.opens.append({name.lower(): value for name, value in request.headers.items()})
        if self.open_replies:
            status, body, headers = self.open_replies.popleft()
            return web.json_response(body, status=status, headers=headers)
        if request.headers.get("Authorization") != f"Bearer {APP_TOKEN}":
            return web.json_response({"ok": False, "error": "invalid_auth"})
        url = self.base_url.replace("http://", "ws://") + f"/link/?ticket={TICKET}-{len(self.opens)}&app_id=A111"
        return web.json_response({**fixture("apps_connections_open_ok.json"), "url": url})

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self.sockets.append(socket)
        number = len(self.sockets)
        self.timeline.append(f"open {number}")
        await self.hold_hello.wait()
        await socket.send_json(fixture("hello.json"))
        self.timeline.append(f"hello {number}")
        async for frame in socket:
            if frame.type == WSMsgType.TEXT:
                envelope_id = json.loads(frame.data)["envelope_id"]
                self.acks.append(envelope_id)
                self.unacked.pop(envelope_id, None)
        self.timeline.append(f"closed {number}")
        return socket

    def live(self, number: int = 0) -> web.WebSocketResponse:
        """Socket `number` (1-based), or the newest one that said hello."""
        if number:
            return self.sockets[number - 1]
        closed = {event.split()[1] for event in self.timeline if event.startswith("closed")}
        said_hello = [int(n) for kind, n in map(str.split, self.timeline) if kind == "hello" and n not in closed]
        return self.sockets[said_hello[-1] - 1]

    async def send(self, frame: dict[str, Any] | str, number: int = 0) -> None:
        if isinstance(frame, dict) and "envelope_id" in frame:
            self.unacked[frame["envelope_id"]] = frame
        socket = self.live(number)
        await (socket.send_json(frame) if isinstance(frame, dict) else socket.send_str(frame))

    async def redeliver(self) -> None:
        """Send every envelope not acknowledged yet again on the newest open socket, as Slack retries them."""
        if not any(kind == "hello" and f"closed {n}" not in self.timeline for kind, n in map(str.split, self.timeline)):
            return  # no socket to send on: the hub has none open now
        for frame in list(self.unacked.values()):
            retry = {**frame, "retry_attempt": frame.get("retry_attempt", 0) + 1, "retry_reason": "timeout"}
            with contextlib.suppress(ConnectionError):  # the hub closed that socket meanwhile: next time
                await self.send(retry)

    async def delivered(self, *frames: dict[str, Any], number: int = 0) -> None:
        """Send `frames` and wait until each is acknowledged."""
        for frame in frames:
            await self.send(frame, number)
        await eventually(lambda: all(frame["envelope_id"] in self.acks for frame in frames))


@pytest.fixture
async def slack() -> Any:
    fake = FakeSlack()
    await fake.start()
    yield fake
    await fake.stop()


def slack_config(nats_url: str, fake: FakeSlack, **hub: Any) -> cfg.Config:
    return cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_url, subject_prefix=unique_prefix(), **hub),
        tenants=[cfg.Tenant(id=TENANT)],
        connections=[cfg.Connection(id="sl", tenant=TENANT, channel="slack", mode="slack_socket",
                                    api_base=fake.api_base,
                                    secrets={"bot_token": BOT_TOKEN, "app_token": APP_TOKEN})])


async def connected(fake: FakeSlack, sockets: int = 1) -> None:
    await eventually(lambda: sum(event.startswith("hello") for event in fake.timeline) >= sockets)


def text_of(envelope: c.Envelope) -> str:
    assert isinstance(envelope, c.Message), envelope
    return next(part.text for part in envelope.parts if isinstance(part, c.Text))


async def stored_once(hub: Hub, subject: str, stream: str) -> bytes:
    """The one message `stream` holds under `subject`, once it holds one (bounded wait)."""
    for _ in range(300):
        if stored := await stream_messages(hub.nc, subject, stream):
            assert len(stored) == 1
            return stored[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"nothing stored under {subject}")


async def raw_records(hub: Hub) -> list[bytes]:
    return await stream_messages(hub.nc, f"{hub.subjects.prefix}.{TENANT}.raw.>", hub.subjects.stream_name("raw"))


async def test_each_kind_of_envelope_reaches_the_app_and_is_acknowledged(
        nats_server: EmbeddedServer, nats_client: Any, slack: FakeSlack, start_hub: StartHub,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    hub = await start_hub(slack_config(nats_server.url, slack))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    await connected(slack)
    assert slack.opens[0]["authorization"] == f"Bearer {APP_TOKEN}"

    await slack.delivered(fixture("events_api_app_mention.json"))
    mention, _ = await app.next()
    assert isinstance(mention, c.Message) and mention.sender is not None
    assert text_of(mention).endswith("Hi there!") and mention.sender.native_id == "W222"
    assert mention.conversation.native_id == "C111"

    await slack.delivered(fixture("interactive_block_actions.json"))
    clicked, _ = await app.next()
    assert isinstance(clicked, c.Message)
    assert [part.id for part in clicked.parts if isinstance(part, c.Action)] == ["a"]

    await slack.delivered(fixture("slash_commands.json"))
    command, _ = await app.next()
    assert "/hello-world" in text_of(command)

    # What was stored is the payload as its webhook carries it, without the app's credentials; the
    # socket's URL (a one-time ticket) and the token appear in no record and no log line.
    records = await raw_records(hub)
    assert len(records) == 3
    for record in records:
        assert APP_TOKEN.encode() not in record and BOT_TOKEN.encode() not in record and TICKET.encode() not in record
    assert APP_TOKEN not in caplog.text and TICKET not in caplog.text
    assert slack.acks == [fixture(name)["envelope_id"] for name in (
        "events_api_app_mention.json", "interactive_block_actions.json", "slash_commands.json")]


async def test_an_envelope_is_not_acknowledged_while_nats_cannot_store_it(
        tmp_path: Path, slack: FakeSlack, caplog: pytest.LogCaptureFixture) -> None:
    server = EmbeddedServer(tmp_path / "nats", port=free_port())
    await server.start()
    try:
        async with Hub(slack_config(server.url, slack, lease_seconds=2.0)) as hub:
            await connected(slack)
            await server.stop()
            await eventually(lambda: not hub.nc.is_connected)
            await slack.send(envelope("events_api_message_im.json", "env-while-down", event_id="EvDOWN"))
            await eventually(lambda: "left unacknowledged" in caplog.text)
            assert slack.acks == []

            await server.start()
            await eventually(lambda: hub.nc.is_connected)
            # Slack sends what was not acknowledged again, until it is (bounded here).
            for _ in range(60):
                await slack.redeliver()
                if "env-while-down" in slack.acks:
                    break
                await asyncio.sleep(0.5)
            assert "env-while-down" in slack.acks
            records = await raw_records(hub)
            assert [json.loads(msgspec.msgpack.decode(record)["body"])["event_id"] for record in records] == ["EvDOWN"]
            subject, stream = f"{hub.subjects.prefix}.{TENANT}.in.>", hub.subjects.stream_name("messages")
            inbound = await stored_once(hub, subject, stream)
            assert text_of(c.decode(inbound)) == "When Slack was released?"
    finally:
        await server.stop()


@pytest.mark.parametrize("reason", ["refresh_requested", "warning"])
async def test_a_disconnect_notice_opens_the_next_socket_before_the_old_one_closes(
        nats_server: EmbeddedServer, nats_client: Any, slack: FakeSlack, start_hub: StartHub, reason: str) -> None:
    hub = await start_hub(slack_config(nats_server.url, slack))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    await connected(slack)
    await slack.delivered(envelope("events_api_message_im.json", "e-before", event_id="Ev1", event={
        **fixture("events_api_message_im.json")["payload"]["event"], "text": "before", "ts": "1.000001"}))

    slack.hold_hello.clear()  # the next socket opens, but says hello only when the test lets it
    await slack.send(fixture(f"disconnect_{reason}.json"))
    await eventually(lambda: "open 2" in slack.timeline)
    # The old socket is still read while its replacement is not ready.
    await slack.delivered(envelope("events_api_message_im.json", "e-between", event_id="Ev2", event={
        **fixture("events_api_message_im.json")["payload"]["event"], "text": "between", "ts": "1.000002"}), number=1)
    assert "closed 1" not in slack.timeline
    slack.hold_hello.set()
    await eventually(lambda: "closed 1" in slack.timeline)
    assert slack.timeline.index("hello 2") < slack.timeline.index("closed 1")
    await slack.delivered(envelope("events_api_message_im.json", "e-after", event_id="Ev3", event={
        **fixture("events_api_message_im.json")["payload"]["event"], "text": "after", "ts": "1.000003"}), number=2)

    texts = [text_of((await app.next())[0]) for _ in range(3)]
    assert texts == ["before", "between", "after"]
    await asyncio.sleep(0.3)
    assert app.inbound.empty()
    assert len(slack.opens) == 2


async def test_a_redelivered_envelope_becomes_one_message(nats_server: EmbeddedServer, nats_client: Any,
                                                          slack: FakeSlack, start_hub: StartHub) -> None:
    hub = await start_hub(slack_config(nats_server.url, slack))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    await connected(slack)
    await slack.delivered(fixture("events_api_app_mention.json"))
    # Slack did not see the ack in time and sends the envelope again (`retry_attempt` 1).
    slack.acks.clear()
    await slack.delivered(fixture("events_api_app_mention_retry.json"))
    await slack.delivered(envelope("events_api_message_im.json", event_id="EvIM"))  # the fixtures share Ev111
    first, _ = await app.next()
    second, _ = await app.next()
    assert text_of(first).endswith("Hi there!") and text_of(second) == "When Slack was released?"
    await asyncio.sleep(0.3)
    assert app.inbound.empty()
    records = [msgspec.msgpack.decode(record) for record in await raw_records(hub)]
    assert len(records) == 2  # the retry was absorbed by the record's dedup key (the event_id)


async def test_a_refused_app_token_is_not_retried(nats_server: EmbeddedServer, slack: FakeSlack,
                                                  start_hub: StartHub, caplog: pytest.LogCaptureFixture) -> None:
    slack.open_replies.append((200, fixture("apps_connections_open_invalid_auth.json"), {}))
    hub = await start_hub(slack_config(nats_server.url, slack))
    await eventually(lambda: "refused the app token" in caplog.text)
    health = hub.task_health["slack_socket:sl"]
    assert health.failing and "invalid_auth" in health.state
    await asyncio.sleep(2.0)  # a retrying link would have asked again by now (its first pause is under 1 s)
    assert len(slack.opens) == 1 and not slack.sockets
    assert APP_TOKEN not in caplog.text


async def test_a_rate_limited_or_failing_open_is_retried(nats_server: EmbeddedServer, nats_client: Any,
                                                         slack: FakeSlack, start_hub: StartHub) -> None:
    slack.open_replies.extend([
        (429, fixture("apps_connections_open_ratelimited.json"), {"Retry-After": "0"}),
        (500, {"ok": False, "error": "internal_error"}, {}),
    ])
    hub = await start_hub(slack_config(nats_server.url, slack))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    await connected(slack)
    assert len(slack.opens) == 3
    await slack.delivered(fixture("events_api_message_im.json"))
    assert text_of((await app.next())[0]) == "When Slack was released?"


async def test_bad_frames_are_kept_and_break_nothing(nats_server: EmbeddedServer, nats_client: Any,
                                                     slack: FakeSlack, start_hub: StartHub) -> None:
    hub = await start_hub(slack_config(nats_server.url, slack, max_body_bytes=8192))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    await connected(slack)
    await slack.send("{not json")
    await slack.send("[1, 2, 3]")
    await slack.delivered({"envelope_id": "no-object", "type": "events_api", "payload": "a string"},
                          {"envelope_id": "brand-new", "type": "future_kind", "payload": {}},
                          {"envelope_id": "broken-body", "type": "interactive", "payload": {"type": 7}})
    # A frame over the hub's limit ends that socket; the hub opens the next one.
    huge = envelope("events_api_message_im.json", "huge", padding="x" * 9000)
    await slack.send(huge)
    await connected(slack, sockets=2)
    assert "huge" not in slack.acks
    del slack.unacked["huge"]
    await slack.delivered(fixture("events_api_message_im.json"))
    assert text_of((await app.next())[0]) == "When Slack was released?"

    letters = dead_letters(await stream_messages(
        nats_client, f"{hub.subjects.prefix}.{TENANT}.dlq.>", hub.subjects.stream_name("dead_letters")))
    errors = [letter["error"] for letter in letters]
    assert any("no JSON object" in error for error in errors)
    assert any("payload as a JSON object" in error for error in errors)
    assert any("unknown type 'future_kind'" in error for error in errors)
    assert any("hub.max_body_bytes" in error for error in errors)
    assert len(letters) >= 6
    assert not hub.task_health["slack_socket:sl"].failing


@pytest.mark.parametrize(("connection", "problem"), [
    (cfg.Connection(id="sl", tenant=TENANT, channel="slack", mode="slack_socket",
                    secrets={"bot_token": BOT_TOKEN, "signing_secret": "s"}), "needs secrets.app_token"),
    (cfg.Connection(id="tg", tenant=TENANT, channel="telegram", mode="slack_socket",
                    secrets={"bot_token": "1:x"}), "channel telegram has no Slack Socket Mode"),
])
async def test_a_connection_that_cannot_use_socket_mode_is_refused_at_start(
        nats_server: EmbeddedServer, connection: cfg.Connection, problem: str) -> None:
    config = cfg.Config(hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_server.url, subject_prefix=unique_prefix()),
                        tenants=[cfg.Tenant(id=TENANT)], connections=[connection])
    with pytest.raises(ConfigError, match=r"\$\.connections\[0\]\.mode: .*" + problem):
        async with Hub(config):
            pass


async def test_one_hub_at_a_time_holds_the_socket(nats_server: EmbeddedServer, nats_client: Any, slack: FakeSlack,
                                                  start_hub: StartHub) -> None:
    config = slack_config(nats_server.url, slack, partitions=8, lease_seconds=4.0)
    first = await start_hub(config)
    second = await start_hub(config)
    partition = partition_of(TENANT, "sl", 8)
    await eventually(lambda: len(held(first)) == len(held(second)) == 4, timeout=60)
    owner = first if partition in held(first) else second
    other = second if owner is first else first
    await connected(slack)
    await asyncio.sleep(0.5)  # a second holder would have opened its socket by now
    assert len(slack.sockets) == 1 and len(slack.opens) == 1

    await owner.stop()
    await eventually(lambda: partition in held(other), timeout=20)
    await connected(slack, sockets=2)
    assert slack.timeline.index("closed 1") < slack.timeline.index("open 2")
    app = await Processor(nats_client, config.hub.subject_prefix).start()
    await slack.delivered(fixture("events_api_message_im.json"))
    assert text_of((await app.next())[0]) == "When Slack was released?"


def held(hub: Hub) -> set[int]:
    return set(hub._started().ownership.working)


async def test_link_disabled_closes_the_socket_and_asks_for_a_new_one(
        nats_server: EmbeddedServer, nats_client: Any, slack: FakeSlack, start_hub: StartHub) -> None:
    hub = await start_hub(slack_config(nats_server.url, slack))
    app = await Processor(nats_client, hub.subjects.prefix).start()
    await connected(slack)
    # Socket Mode turned off: the next open fails until it is turned on again.
    slack.open_replies.append((200, {"ok": False, "error": "internal_error"}, {}))
    await slack.send(fixture("disconnect_link_disabled.json"))
    await eventually(lambda: "closed 1" in slack.timeline)
    await connected(slack, sockets=2)
    assert len(slack.opens) == 3 and slack.timeline.index("closed 1") < slack.timeline.index("open 2")
    await slack.delivered(fixture("events_api_message_im.json"))
    assert text_of((await app.next())[0]) == "When Slack was released?"
