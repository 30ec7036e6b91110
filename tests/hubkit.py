"""What the hub tests share: a config builder, a processing app on NATS, Telegram-shaped payloads."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
import msgspec
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from babelhub import canonical as c
from babelhub.plugins import Services
from babelhub.services import config as cfg
from babelhub.services.apikeys import ApiKeys
from babelhub.services.audit import Audit
from babelhub.services.broker import Subjects
from babelhub.services.connections import ConnectionService
from babelhub.services.context import HubContext
from babelhub.services.deadletters import DeadLetters
from babelhub.services.ingest import Ingest
from babelhub.services.outbox import Outbox
from babelhub.services.ownership import Ownership, lease_bucket
from babelhub.services.publisher import Publisher
from babelhub.services.rest import Rate, RateLimits
from babelhub.services.telemetry import Metrics
from babelhub.services.tenants import Tenants
from babelhub.sources.webhook import Webhooks
from tests.fakeapi import Recorded, Reply

if TYPE_CHECKING:
    from babelhub.hub.app import Hub

_prefixes = itertools.count()

StartHub = Callable[[cfg.Config], Awaitable["Hub"]]
"""The `start_hub` fixture (conftest.py): starts an in-process hub that the test's teardown stops."""

TENANT = "acme"
BOT_TOKEN = "123456:TEST-token"
SECRET = "s3cret-token"


def unique_prefix() -> str:
    """A subject prefix of its own per test, so tests share one nats-server without seeing each other."""
    return f"t{os.getpid()}x{next(_prefixes)}"


def with_hub(config: cfg.Config, **settings: Any) -> cfg.Config:
    """`config` with these `[hub]` settings changed."""
    return msgspec.structs.replace(config, hub=msgspec.structs.replace(config.hub, **settings))


def telegram_config(nats_url: str, api_base: str, *, mode: Literal["webhook", "polling"] = "webhook") -> cfg.Config:
    return cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_url, subject_prefix=unique_prefix()),
        tenants=[cfg.Tenant(id=TENANT, api_keys=["k"])],
        connections=[cfg.Connection(id="tg", tenant=TENANT, channel="telegram", mode=mode, api_base=api_base,
                                    secrets={"bot_token": BOT_TOKEN, "secret_token": SECRET})],
    )


def webchat_config(nats_url: str, *, echo: bool = True, mic: bool = False) -> cfg.Config:
    """The default config's shape: a web chat connection, answered by the echo processor; with `mic`,
    also the page's microphone (`client_media`) answered by the loopback audio service."""
    connections = [cfg.Connection(id="webchat", tenant="demo", channel="webchat")]
    processors = [cfg.Processor(id="echo", tenant="demo", transport="echo")] if echo else []
    if mic:
        connections.append(cfg.Connection(id="mic", tenant="demo", channel="client_media"))
        processors.append(cfg.Processor(id="loopback", tenant="demo", transport="audio_loopback"))
    return cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_url, subject_prefix=unique_prefix()),
        tenants=[cfg.Tenant(id="demo")], connections=connections, processors=processors)


class WebVisitor:
    """A browser on the built-in web chat, speaking the client-session protocol as the page does: it
    takes the `session` frame, subscribes to its conversation (from its cursor when it resumes), posts
    its messages and keeps the offsets of what it read."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse, hello: dict[str, Any]) -> None:
        self.socket = socket
        self.hello = hello
        self.subscribed: dict[str, Any] = {}
        self.cursor: dict[str, Any] | None = None

    @classmethod
    async def open(cls, http: aiohttp.ClientSession, hub_url: str, *, resume: WebVisitor | None = None,
                   query: str = "", subscribe: bool = True, **connect: Any) -> WebVisitor:
        """A new visitor, or `resume`'s session again (with its cursor)."""
        if resume is not None:
            query = f"?session={resume.hello['session']}&token={resume.hello['token']}"
        socket = await http.ws_connect(f"{hub_url}/ws/webchat{query}", **connect)
        hello = await socket.receive_json(timeout=15)
        assert hello["type"] == "session", hello
        visitor = cls(socket, hello)
        if subscribe:
            since = {hello["conversation"]: resume.cursor} if resume is not None and resume.cursor else {}
            visitor.subscribed = await visitor.subscribe(hello["conversation"], since)
        return visitor

    async def subscribe(self, conversation: str, since: dict[str, Any] | None = None) -> dict[str, Any]:
        await self.socket.send_json({"type": "subscribe", "conversations": [conversation], "since": since or {}})
        subscribed = await self.frame("subscribed")
        self.cursor = subscribed["since"]
        return subscribed

    async def say(self, text: str, frame_id: str = "1") -> None:
        await self.post({"id": frame_id, "text": text})

    async def post(self, message: Any) -> None:
        await self.socket.send_json({"type": "post", "message": message})

    async def frame(self, *types: str) -> dict[str, Any]:
        """The next frame of one of `types` (others are read and skipped; offsets are kept)."""
        while True:
            received = await asyncio.wait_for(self.socket.receive(), 15)
            assert received.type == aiohttp.WSMsgType.TEXT, f"the socket ended: {received.data} {received.extra}"
            frame: dict[str, Any] = json.loads(received.data)
            if "offset" in frame and self.cursor is not None:
                self.cursor["statuses" if frame["type"] == "status" else "messages"] = frame["offset"]
            if frame["type"] in types:
                return frame

    async def reply(self) -> dict[str, Any]:
        """The next message the hub sends the visitor (its own messages coming back are skipped)."""
        while True:
            envelope: dict[str, Any] = (await self.frame("message"))["envelope"]
            if envelope["direction"] == "outbound":
                return envelope

    async def close(self) -> None:
        await self.socket.close()


def telegram_update(update_id: int, chat_id: int, text: str, message_id: int | None = None) -> dict[str, Any]:
    """A private-chat text message, shaped as the Bot API documents `Update`."""
    return {
        "update_id": update_id,
        "message": {
            "message_id": message_id if message_id is not None else update_id,
            "from": {"id": chat_id, "is_bot": False, "first_name": "Ada", "username": "ada", "language_code": "en"},
            "chat": {"id": chat_id, "first_name": "Ada", "username": "ada", "type": "private"},
            "date": 1_767_225_600 + update_id,
            "text": text,
        },
    }


def telegram_responder(request: Recorded) -> Reply:
    """Answers like the Bot API: sendMessage & co. return the sent Message."""
    counter = getattr(telegram_responder, "_next", 1000)
    telegram_responder._next = counter + 1  # type: ignore[attr-defined]
    body = request.json() if request.body else {}
    return Reply(body={"ok": True, "result": {"message_id": counter, "date": 1_767_225_600,
                                              "chat": {"id": body.get("chat_id", 0), "type": "private"},
                                              "text": body.get("text", "")}})


class Processor:
    """A processing app as a user writes one: subscribes to `<prefix>.<tenant>.in.>` on NATS and answers
    on `<prefix>.<tenant>.out.<conversation>`."""

    def __init__(self, nc: NATS, prefix: str, tenant: str = TENANT) -> None:
        self.nc = nc
        self.prefix = prefix
        self.tenant = tenant
        self.inbound: asyncio.Queue[tuple[c.Envelope, dict[str, str]]] = asyncio.Queue()
        self.statuses: asyncio.Queue[c.Status] = asyncio.Queue()

    async def start(self) -> Processor:
        async def on_inbound(msg: Msg) -> None:
            await self.inbound.put((c.decode(msg.data), dict(msg.headers or {})))

        async def on_status(msg: Msg) -> None:
            envelope = c.decode(msg.data)
            assert isinstance(envelope, c.Status)
            await self.statuses.put(envelope)

        await self.nc.subscribe(f"{self.prefix}.{self.tenant}.in.>", cb=on_inbound)
        await self.nc.subscribe(f"{self.prefix}.{self.tenant}.status.>", cb=on_status)
        await self.nc.flush()
        return self

    async def next(self, timeout: float = 15.0) -> tuple[c.Envelope, dict[str, str]]:
        return await asyncio.wait_for(self.inbound.get(), timeout)

    async def next_status(self, timeout: float = 15.0) -> c.Status:
        return await asyncio.wait_for(self.statuses.get(), timeout)

    async def reply(self, inbound: c.Envelope, *parts: c.Part, headers: dict[str, str] | None = None,
                    **fields: Any) -> c.Message:
        fields = {"reply_to": inbound.id, **fields}
        message = c.Message(id=c.new_id(), tenant=inbound.tenant, conversation=c.Conversation(
            id=inbound.conversation.id), ts=c.now(), direction="outbound", parts=list(parts), **fields)
        await self.send(message, headers)
        return message

    async def send(self, message: c.Message, headers: dict[str, str] | None = None) -> None:
        subject = f"{self.prefix}.{message.tenant}.out.{message.conversation.id}"
        await self.nc.publish(subject, c.encode(message), headers=headers)
        await self.nc.flush()


async def eventually(predicate: Any, timeout: float = 15.0, interval: float = 0.02) -> None:
    """Wait until `predicate()` is true (polling, bounded): the hub works asynchronously."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        await asyncio.sleep(interval)


async def stream_messages(nc: NATS, subject: str, stream: str) -> list[bytes]:
    """Every message currently stored in `stream` under `subject` (an ordered, ephemeral read)."""
    js = nc.jetstream()
    info = await js.stream_info(stream)
    found: list[bytes] = []
    if info.state.messages == 0:
        return found
    subscription = await js.subscribe(subject, stream=stream, ordered_consumer=True)
    try:
        while True:
            try:
                msg = await subscription.next_msg(timeout=0.5)
            except Exception:
                break
            found.append(msg.data)
    finally:
        await subscription.unsubscribe()
    return found


async def consumer_totals(js: JetStreamContext, stream: str, kind: str) -> tuple[int, int]:
    """Messages handed out and not acknowledged, and messages redelivered, summed over the partition
    consumers `<kind>-<partition>` of `stream` (`raw` or `conversations`)."""
    infos = [info for info in await js.consumers_info(stream) if info.name.startswith(f"{kind}-")]
    return sum(info.num_ack_pending or 0 for info in infos), sum(info.num_redelivered or 0 for info in infos)


def json_of(recorded: Recorded) -> Any:
    return json.loads(recorded.body)


def dead_letters(raw: list[bytes]) -> list[dict[str, Any]]:
    """Dead letters as dicts (they are msgpack on the stream; `body` stays bytes)."""
    return [msgspec.msgpack.decode(item) for item in raw]


class VirtualClock:
    """Time of the test's own: it moves only when a pacer sleeps (or the test moves it)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.on_sleep: list[Callable[[], None]] = []  # run once each, at the next sleep

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        while self.on_sleep:
            self.on_sleep.pop(0)()
        self.now += seconds
        await asyncio.sleep(0)


def write_config(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


class HubProcess:
    """`babelhub run --config <config>` as a user runs it, in `cwd`; its output goes to a log file there
    (a pipe nobody reads would block a chatty hub)."""

    def __init__(self, config: Path, cwd: Path, log_name: str = "hub.log", nats: str = "") -> None:
        """`nats`: given as `--nats` (a server, or a cluster's comma-separated)."""
        self.config = config
        self.nats = nats
        self.cwd = cwd
        self.log = cwd / log_name
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BABELHUB_")}
        with self.log.open("ab") as out:
            command = [sys.executable, "-m", "babelhub", "run", "--config", str(self.config)]
            command += ["--nats", self.nats] if self.nats else []
            self.process = subprocess.Popen(command, cwd=self.cwd, env=env, stdout=out, stderr=subprocess.STDOUT)

    async def wait_ready(self, url: str, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with aiohttp.ClientSession() as session:
            while loop.time() < deadline:
                assert self.process is not None and self.process.poll() is None, self.output()
                try:
                    async with session.get(url + "/readyz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError("hub did not become ready: " + self.output())

    def output(self) -> str:
        """What the process printed so far (every process started from this object)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def children(self) -> list[int]:
        assert self.process is not None
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in path.read_text().split()] if path.exists() else []

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, as a supervisor stops it (the hub stops in order), and wait for it: its exit code.
        Blocks: call it in a thread from async code."""
        assert self.process is not None
        self.process.terminate()
        return self.process.wait(timeout)

    def stop(self) -> None:
        """SIGKILL, as a crash would: nothing is flushed or handed over."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


async def webhook_app(nats_client: NATS, subjects: Subjects, metrics: Metrics, http: aiohttp.ClientSession,
                      connections: dict[str, ConnectionService]) -> web.AppRunner:
    """The `webhook` inbound source alone on an aiohttp app (not listening yet), over real NATS: what the
    hub mounts, without the rest of the hub."""
    js = nats_client.jetstream()
    publisher = Publisher(nats_client, js)
    dead_letters = DeadLetters(publisher, subjects, metrics)
    ctx = HubContext(nats=nats_client, js=js, subjects=subjects, dead_letters=dead_letters, metrics=metrics,
                     snapshots=await js.key_value(subjects.bucket("conversations")), publisher=publisher,
                     connections=connections)

    def spawn(name: str, run: object) -> None:
        raise AssertionError(f"the webhook source starts no task ({name})")

    async def consume(*args: object) -> None:
        raise AssertionError("the webhook source consumes nothing")

    async def follow(*args: object, **kwargs: object) -> None:
        raise AssertionError("the webhook source follows nothing")

    ownership = Ownership(await lease_bucket(js, subjects, 6.0), "webhook-test", subjects.partitions, 6.0)
    idempotency = await js.key_value(subjects.bucket("idempotency"))
    async def no_limit(_: str) -> Rate:
        return Rate(0.0, 1)

    services = Services(config=cfg.Config(), ctx=ctx, http=http, ingest=Ingest(publisher, subjects, dead_letters),
                        spawn=spawn, consume=consume, follow=follow, ownership=ownership,
                        outbox=Outbox(ctx, idempotency), keys=ApiKeys(await js.key_value(subjects.bucket("keys")), []),
                        limits=RateLimits(no_limit), audit=Audit(publisher, js, subjects),
                        tenants=Tenants(await js.key_value(subjects.bucket("tenants")), []))
    app = web.Application()
    app.add_routes(Webhooks(list(connections.values()), services).routes())
    runner = web.AppRunner(app)
    await runner.setup()
    return runner
