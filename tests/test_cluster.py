"""The hub on a real 3-node NATS cluster: `hub.replicas`, a server list, and a node lost under load."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import nats
import pytest
import yaml
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, KeyValueConfig
from nats.js.errors import KeyWrongLastSequenceError, NoStreamResponseError
from nats.js.kv import KeyValue

from babelhub import canonical as c
from babelhub.errors import ConfigError
from babelhub.hub.app import Hub
from babelhub.hub.cli import _without_userinfo, build_parser
from babelhub.hub.link import servers
from babelhub.services import broker
from babelhub.services import config as cfg
from babelhub.services.broker import (
    EmbeddedServer,
    PortInUse,
    Subjects,
    bucket_stream,
    free_port,
    raise_replicas,
)
from babelhub.services.localcluster import LocalCluster
from babelhub.services.ownership import lease_bucket
from babelhub.services.publisher import Publisher
from tests.fakeapi import FakeApi
from tests.hubkit import (
    BOT_TOKEN,
    SECRET,
    TENANT,
    HubProcess,
    StartHub,
    dead_letters,
    eventually,
    stream_messages,
    telegram_config,
    telegram_responder,
    telegram_update,
    unique_prefix,
    webchat_config,
    with_hub,
    write_config,
)

ROOT = Path(__file__).resolve().parents[1]
HEADERS = {"X-Telegram-Bot-Api-Secret-Token": SECRET}
ROLES = ("raw", "messages", "statuses", "dead_letters")
BUCKETS = tuple(broker.BUCKETS)


@contextlib.asynccontextmanager
async def connected(urls: list[str]) -> AsyncIterator[NATS]:
    nc = await nats.connect(servers=urls, max_reconnect_attempts=-1)
    try:
        yield nc
    finally:
        await nc.drain()


async def replica_counts(nc: NATS, subjects: Subjects) -> dict[str, int]:
    """How many copies JetStream keeps of each stream and bucket of the hub (peers that hold them)."""
    js = nc.jetstream()
    names = [subjects.stream_name(role) for role in ROLES] + [bucket_stream(subjects.bucket(b)) for b in BUCKETS]
    counts: dict[str, int] = {}
    for name in names:
        info = await js.stream_info(name)
        assert info.config.num_replicas is not None
        counts[name] = info.config.num_replicas
    return counts


async def on_every_node(nc: NATS, stream: str, nodes: int, timeout: float = 15.0) -> None:
    """Until `stream` has a leader and `nodes - 1` current followers (peers report in after a change)."""
    js = nc.jetstream()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            cluster = (await js.stream_info(stream)).cluster
        except (nats.errors.Error, TimeoutError):  # the cluster is electing a leader: ask again
            cluster = None
        followers = (cluster.replicas or []) if cluster is not None else []
        if cluster is not None and cluster.leader and len(followers) == nodes - 1 and all(
                peer.current for peer in followers):
            return
        assert loop.time() < deadline, f"{stream} is not on {nodes} nodes: {cluster}"
        await asyncio.sleep(0.1)


async def consumers_on_every_node(nc: NATS, streams: list[str], nodes: int, timeout: float = 15.0) -> None:
    """Until every durable consumer of `streams` (there is at least one) has `nodes - 1` followers."""
    js = nc.jetstream()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        consumers = [info for stream in streams for info in await js.consumers_info(stream)]
        placed = [len(info.cluster.replicas or []) == nodes - 1 if info.cluster else False for info in consumers]
        if consumers and all(placed):
            return
        assert loop.time() < deadline, f"consumers not on {nodes} nodes: {[i.cluster for i in consumers]}"
        await asyncio.sleep(0.1)


# ------------------------------------------------------------------------ settings and the server list


@pytest.mark.parametrize("replicas", [0, 6, -1])
def test_replicas_outside_1_to_5_are_refused_naming_the_key(replicas: int) -> None:
    with pytest.raises(ConfigError, match=rf"hub.replicas: {replicas} must be 1 to 5"):
        cfg.load(None, env={"BABELHUB_REPLICAS": str(replicas)})


def test_replicas_come_from_the_environment() -> None:
    assert cfg.load(None, env={"BABELHUB_REPLICAS": "3"}).hub.replicas == 3
    assert cfg.load(None, env={}).hub.replicas == 1


def test_a_comma_separated_nats_setting_is_a_list_of_servers_shown_without_passwords() -> None:
    setting = "nats://hub:pw1@a:4222, nats://hub:pw2@b:4222,nats://c:4222,"
    assert servers(setting) == ["nats://hub:pw1@a:4222", "nats://hub:pw2@b:4222", "nats://c:4222"]
    assert servers("nats://127.0.0.1:4222") == ["nats://127.0.0.1:4222"]
    assert _without_userinfo(setting.rstrip(",")) == "nats://a:4222,nats://b:4222,nats://c:4222"


# ------------------------------------------------------------------------------------ replicas


async def test_replicas_beyond_a_single_server_are_refused_at_start(
        nats_server: EmbeddedServer, fake_api: FakeApi) -> None:
    config = with_hub(telegram_config(nats_server.url, fake_api.base_url), replicas=3)
    with pytest.raises(ConfigError, match=r"hub.replicas = 3: .*non-clustered mode.*at least 3 JetStream servers"):
        async with Hub(config):
            pass


async def test_replicas_beyond_the_cluster_are_refused_at_start(
        nats_cluster: LocalCluster, fake_api: FakeApi) -> None:
    config = with_hub(telegram_config(nats_cluster.servers, fake_api.base_url), replicas=5)
    with pytest.raises(ConfigError, match=r"hub.replicas = 5: .*no suitable peers.*at least 5 JetStream servers"):
        async with Hub(config):
            pass


async def test_every_stream_and_bucket_gets_the_replicas_and_fewer_are_raised(
        nats_cluster: LocalCluster, fake_api: FakeApi, start_hub: StartHub) -> None:
    config = telegram_config(nats_cluster.servers, fake_api.base_url)
    subjects = Subjects(config.hub.subject_prefix)
    async with connected(nats_cluster.urls) as nc:
        async with Hub(config):  # replicas = 1: what a deployment that grew into a cluster has
            pass
        assert set((await replica_counts(nc, subjects)).values()) == {1}

        hub = await start_hub(with_hub(config, replicas=3))
        counts = await replica_counts(nc, subjects)
        assert counts == dict.fromkeys(counts, 3) and len(counts) == len(ROLES) + len(BUCKETS)
        # JetStream really placed them: one copy on each node, all caught up; and the hub's durable
        # consumers (their positions and pending acks), made when the streams had one copy, follow.
        await on_every_node(nc, subjects.stream_name("raw"), 3)
        await consumers_on_every_node(nc, [subjects.stream_name(role) for role in ("raw", "messages")], 3)
        assert hub.nc.is_connected

        # Fewer are never forced on what has more.
        await hub.stop()
        async with Hub(config):
            pass
        assert set((await replica_counts(nc, subjects)).values()) == {3}


async def put_once_reachable(kv: KeyValue, key: str, value: bytes) -> None:
    """A bucket just made on a cluster answers once its stream's interest has reached the node this
    client is connected to (a busy machine takes a moment)."""
    for _ in range(50):
        try:
            await kv.put(key, value)
            return
        except NoStreamResponseError:
            await asyncio.sleep(0.1)
    await kv.put(key, value)


async def test_a_lease_bucket_made_with_one_replica_is_raised(nats_cluster: LocalCluster) -> None:
    subjects = Subjects(unique_prefix())
    async with connected(nats_cluster.urls) as nc:
        js = nc.jetstream()
        await lease_bucket(js, subjects, ttl=10.0, replicas=1)
        name = bucket_stream(subjects.bucket("leases"))
        await lease_bucket(js, subjects, ttl=10.0, replicas=3)  # as a hub started with hub.replicas = 3 asks
        assert (await js.stream_info(name)).config.num_replicas == 3
        await raise_replicas(js, name, 1)  # never lowered
        assert (await js.stream_info(name)).config.num_replicas == 3
        other = await js.create_key_value(KeyValueConfig(bucket=f"{subjects.prefix}_other"))
        await put_once_reachable(other, "k", b"v")
        await raise_replicas(js, bucket_stream(f"{subjects.prefix}_other"), 3)
        assert (await other.get("k")).value == b"v"


async def test_the_session_key_buckets_are_kept_on_as_many_nodes_as_the_hubs_streams(
        nats_cluster: LocalCluster, start_hub: StartHub) -> None:
    """The web chat's and the client sessions' signing keys are made at start by the first hub (a bucket
    just made on a cluster, written at once): with `hub.replicas` copies, so that losing a node loses no
    session."""
    hub = await start_hub(with_hub(webchat_config(nats_cluster.servers), replicas=3))
    js = hub.nc.jetstream()
    for role in ("webchat", "clients"):
        info = await js.stream_info(bucket_stream(hub.subjects.bucket(role)))
        assert info.config.num_replicas == 3 and info.state.messages == 1


async def test_babelhub_run_takes_a_cluster_as_a_comma_separated_list(
        nats_cluster: LocalCluster, fake_api: FakeApi, tmp_path: Path, hub_processes: list[HubProcess]) -> None:
    port, prefix = free_port(), unique_prefix()
    config = write_config(tmp_path / "hub.toml", f"""
[hub]
http = "127.0.0.1:{port}"
subject_prefix = "{prefix}"
replicas = 3
[[tenants]]
id = "{TENANT}"
[[connections]]
id = "tg"
tenant = "{TENANT}"
channel = "telegram"
api_base = "{fake_api.base_url}"
secrets = {{ bot_token = "{BOT_TOKEN}", secret_token = "{SECRET}" }}
""")
    hub = HubProcess(config, tmp_path, nats=nats_cluster.servers)
    hub_processes.append(hub)
    hub.start()
    await hub.wait_ready(f"http://127.0.0.1:{port}")
    assert f"nats        {nats_cluster.servers}   (external)" in hub.output()
    async with connected(nats_cluster.urls) as nc:
        assert set((await replica_counts(nc, Subjects(prefix))).values()) == {3}


# ------------------------------------------------------------------------- a node lost under load

CHATS = 20
PER_CHAT = 15
MAX_PER_CHAT = 60


class ClusterApp:
    """A processing app as the README advises for at-least-once: a durable JetStream consumer on the
    inbound messages (replicated like its stream, so it survives a node), taken one at a time in stream
    order, deduplicated on the envelope id; each reply is published through JetStream with a
    `Nats-Msg-Id` (retried until stored) before the inbound message is acknowledged."""

    def __init__(self, nc: NATS, prefix: str) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=2.0)
        self.prefix = prefix
        self.deliveries: collections.Counter[str] = collections.Counter()
        """Envelope id → times the app was handed it."""
        self.texts: list[str] = []
        self.replies: dict[str, str] = {}
        """Reply id → the text it answers."""
        self._task: asyncio.Task[None] | None = None
        self._subscription: JetStreamContext.PullSubscription | None = None

    async def start(self) -> None:
        self._subscription = await self.js.pull_subscribe(
            f"{self.prefix}.{TENANT}.in.>", durable="app", stream=f"{self.prefix.upper()}_MESSAGES",
            config=ConsumerConfig(max_ack_pending=1, ack_wait=2.0))
        self._task = asyncio.create_task(self._run(self._subscription))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._subscription is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._subscription.unsubscribe()

    async def _run(self, subscription: JetStreamContext.PullSubscription) -> None:
        while True:
            try:
                batch = await subscription.fetch(1, timeout=1.0)
            except (nats.errors.Error, TimeoutError):
                continue  # nothing yet, or the cluster is electing a leader: ask again
            for msg in batch:
                await self._answer(msg)
                with contextlib.suppress(nats.errors.Error, TimeoutError):
                    await msg.ack()  # a lost ack is a redelivery, absorbed by the id check

    async def _answer(self, msg: Msg) -> None:
        inbound = c.decode(msg.data)
        if not isinstance(inbound, c.Message) or inbound.direction != "inbound":
            return
        self.deliveries[inbound.id] += 1
        if self.deliveries[inbound.id] > 1:
            return
        text = next(part.text for part in inbound.parts if isinstance(part, c.Text))
        self.texts.append(text)
        self.replies[f"re-{inbound.id}"] = text
        reply = c.Message(id=f"re-{inbound.id}", tenant=TENANT, conversation=c.Conversation(id=inbound.conversation.id),
                          ts=c.now(), direction="outbound", reply_to=inbound.id, parts=[c.Text(text=f"re:{text}")])
        for _ in range(120):
            try:
                await self.js.publish(f"{self.prefix}.{TENANT}.out.{inbound.conversation.id}", c.encode(reply),
                                      headers={"Nats-Msg-Id": reply.id})
                return
            except (nats.errors.Error, TimeoutError):
                await asyncio.sleep(0.25)
        raise AssertionError(f"the reply to {text} could not be stored")


async def post_until_accepted(session: aiohttp.ClientSession, url: str, update: dict[str, object]) -> int:
    """Post like a channel does: a refusal (503 while the hub has no NATS) is retried. Returns the tries."""
    for attempt in range(1, 200):
        try:
            async with session.post(url, json=update, headers=HEADERS) as response:
                if response.status == 200:
                    return attempt
                assert response.status == 503, await response.text()
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"update {update['update_id']} was never accepted")


async def what_is_missing(app: ClusterApp, nc: NATS, hub: Hub, expected: set[str], replied: set[str]) -> str:
    """Where the messages whose replies never reached the channel API got stuck: said by a failing test."""
    prefix, stream = hub.subjects.prefix, hub.subjects.stream_name("messages")
    missing = sorted(text for text in expected if f"re:{text}" not in replied)
    outbound = [c.decode(data) for data in await stream_messages(nc, f"{prefix}.{TENANT}.out.>", stream)]
    stored_replies = {part.text for env in outbound if isinstance(env, c.Message)
                      for part in env.parts if isinstance(part, c.Text)}
    letters = await stream_messages(nc, f"{prefix}.{TENANT}.dlq.>", hub.subjects.stream_name("dead_letters"))
    return (f"{len(missing)} replies missing: {missing[:10]}; handed to the app: "
            f"{[text for text in missing if text in app.texts][:10]}; their replies stored: "
            f"{[text for text in missing if f're:{text}' in stored_replies][:10]}; dead letters: {len(letters)} "
            f"{collections.Counter((d['stage'], d['error'][:120]) for d in dead_letters(letters)).most_common(5)}")


async def test_traffic_keeps_flowing_while_the_hubs_nats_node_is_stopped_and_restarted(
        nats_cluster: LocalCluster, fake_api: FakeApi, start_hub: StartHub) -> None:
    fake_api.responder = telegram_responder
    config = with_hub(telegram_config(nats_cluster.servers, fake_api.base_url), replicas=3, ack_wait_seconds=3.0)
    hub = await start_hub(config)
    assert hub.nc.connected_url is not None
    node = next(i for i, n in enumerate(nats_cluster.nodes) if n.port == hub.nc.connected_url.port)
    progress = collections.Counter[str]()

    async with connected(nats_cluster.urls) as app_nc, aiohttp.ClientSession() as session, \
            contextlib.AsyncExitStack() as stack:
        app = ClusterApp(app_nc, hub.subjects.prefix)
        await app.start()
        stack.push_async_callback(app.stop)
        url = hub.http_url + "/webhooks/telegram/tg"

        async def chat(chat_id: int) -> None:
            """One chat's messages in order, as its channel sends them: at least PER_CHAT, and on until
            both nodes were back (bounded), so that traffic spans every outage."""
            for n in range(MAX_PER_CHAT):
                if n >= PER_CHAT and outages_over.is_set():
                    return
                update = telegram_update(chat_id * 1000 + n, chat_id, f"c{chat_id}m{n}")
                tries = await post_until_accepted(session, url, update)  # (not `+= await`: tasks interleave)
                progress["tries"] += tries
                progress["accepted"] += 1
                sent[chat_id].append(f"c{chat_id}m{n}")
                await asyncio.sleep(0.2)

        async def while_down(index: int) -> None:
            """Stop node `index`, see webhooks accepted without it, start it again and let it catch up."""
            await nats_cluster.stop_node(index)
            before = progress["accepted"]
            await asyncio.sleep(2.0)  # down for a while, under load
            await eventually(lambda: progress["accepted"] >= before + CHATS, timeout=30)
            assert hub.nc.connected_url is not None and hub.nc.connected_url.port != nats_cluster.nodes[index].port
            await nats_cluster.start_node(index)
            await on_every_node(app_nc, raw_stream, 3, timeout=30)

        async def lose_nodes() -> None:
            await eventually(lambda: progress["accepted"] >= CHATS * 2, timeout=30)
            await while_down(node)  # the node the hub is connected to
            info = await app_nc.jetstream().stream_info(raw_stream)
            assert info.cluster is not None and info.cluster.leader is not None
            await while_down(int(info.cluster.leader.removeprefix("n")) - 1)  # the one leading the raw records
            outages_over.set()

        raw_stream = hub.subjects.stream_name("raw")
        outages_over = asyncio.Event()
        sent: dict[int, list[str]] = collections.defaultdict(list)
        await asyncio.gather(lose_nodes(), *(chat(chat_id) for chat_id in range(1, CHATS + 1)))

        expected = {text for texts in sent.values() for text in texts}
        total = len(expected)

        def replies() -> list[tuple[int, str]]:
            return [(body["chat_id"], body["text"]) for body in
                    (r.json() for r in fake_api.requests if r.path.endswith("/sendMessage"))]

        try:
            await eventually(lambda: len(replies()) >= total, timeout=60)
        except AssertionError:
            raise AssertionError(await what_is_missing(app, app_nc, hub, expected, {t for _, t in replies()})) from None
        await asyncio.sleep(1.0)  # anything sent twice would arrive by now
        sends = replies()
        assert sorted(text for _, text in sends) == sorted(f"re:{text}" for text in expected)  # each once
        for chat_id in range(1, CHATS + 1):  # and in each chat's order
            assert [text for to, text in sends if to == chat_id] == [f"re:{text}" for text in sent[chat_id]]
        assert sorted(app.texts) == sorted(expected)
        stored = await stream_messages(app_nc, f"{hub.subjects.prefix}.{TENANT}.in.>",
                                       hub.subjects.stream_name("messages"))
        assert len(stored) == total and len({c.decode(data).id for data in stored}) == total
        print(f"accepted {total} after {progress['tries']} tries; the app was handed "
              f"{sum(app.deliveries.values())} inbound envelopes for {len(app.deliveries)} ids")


# ---------------------------------------------------------------------- a picked port taken meanwhile


@contextlib.contextmanager
def held(port: int) -> Iterator[None]:
    """Another process listening on `port`, as one that took a free port between its pick and the bind."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield


async def test_a_server_whose_picked_port_was_taken_picks_another_and_a_given_one_is_a_clear_error(
        tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "picked", port=0)
    taken = server.port
    with held(taken):
        await server.start()
        try:
            assert server.port != taken
            nc = await nats.connect(server.url)
            await nc.close()
        finally:
            await server.stop()

        given = EmbeddedServer(tmp_path / "given", port=taken)
        with pytest.raises(PortInUse, match=rf"port {taken} is in use; see .*nats-server.log") as refused:
            await given.start()
        assert refused.value.port == taken and given.port == taken


async def test_a_cluster_forms_when_a_nodes_route_port_was_taken(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "cluster")
    taken = cluster.nodes[1].route_port
    try:
        with held(taken):
            await cluster.start()
            assert cluster.nodes[1].route_port != taken
            await cluster.stop_node(0)  # a restart routes to the port the node listens on now
            await cluster.start_node(0)
            assert f"nats://127.0.0.1:{cluster.nodes[1].route_port}" in cluster.nodes[0].routes
            await cluster.wait_until_usable()
    finally:
        await cluster.stop()


# ------------------------------------------------------------------------------------ make cluster


def descendants(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    children = [int(child) for child in path.read_text().split()] if path.exists() else []
    return children + [grandchild for child in children for grandchild in descendants(child)]


def start_script(log: Path, *args: str) -> subprocess.Popen[bytes]:
    """`python scripts/cluster.py ARGS` as `make cluster` runs it, from the repository, its output to `log`."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("BABELHUB_")}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "cluster.py"), *args], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, env=env)


async def test_make_cluster_starts_3_nodes_and_3_hubs_with_3_replicas_and_ctrl_c_stops_them_all(
        tmp_path: Path) -> None:
    http_ports = [free_port() for _ in range(3)]
    log = tmp_path / "cluster.out"
    script = start_script(log, "--nats-ports", "0,0,0", "--http-ports", ",".join(map(str, http_ports)),
                          "--data-dir", str(tmp_path / "cluster"))
    try:
        await eventually(lambda: "Ctrl-C stops everything." in log.read_text() or script.poll() is not None,
                         timeout=90, interval=0.2)
        banner = log.read_text()
        assert script.poll() is None, banner
        assert "share subject prefix bh" in banner
        children = descendants(script.pid)
        commands = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children]
        assert sum(b"nats-server" in command for command in commands) == 3
        assert sum(b"babelhub\x00run" in command for command in commands) == 3
        servers = banner.split("--nats ", 1)[1].split()[0].split(",")
        assert len(servers) == 3 and all(f"{url}" in banner for url in servers)
        async with aiohttp.ClientSession() as session:
            for port in http_ports:
                assert f"http://127.0.0.1:{port}/" in banner
                async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                    assert response.status == 200
        async with connected(servers) as nc:
            assert set((await replica_counts(nc, Subjects("bh"))).values()) == {3}
        held = [int(line.split(" partitions")[0].rsplit(" ", 1)[1]) for line in banner.splitlines()
                if line.startswith("  hub ")]
        assert sum(held) == 16 and max(held) - min(held) <= 1  # split evenly between the three

        script.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(script.wait, 60) == 0, log.read_text()
        for pid in children:
            assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    finally:
        if script.poll() is None:
            script.kill()
            script.wait()


# ------------------------------------------------------------------------------------ docker compose


def flag(command: list[str], name: str) -> str:
    """The value after `name` in a command line."""
    return command[command.index(name) + 1]


def test_the_docker_compose_file_is_a_3_node_jetstream_cluster_and_hubs_with_3_replicas() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text(encoding="utf-8"))
    services = compose["services"]
    nodes = {name: service for name, service in services.items() if service.get("image", "").startswith("nats:")}
    hubs = {name: service for name, service in services.items() if "build" in service}
    assert set(nodes) == {"n1", "n2", "n3"} and set(hubs) == {"hub1", "hub2", "hub3"}

    for name, node in nodes.items():
        command = node["command"]
        assert "--js" in command and flag(command, "--server_name") == name
        assert flag(command, "--cluster_name") == "babelhub" and flag(command, "--cluster") == "nats://0.0.0.0:6222"
        assert sorted(flag(command, "--routes").split(",")) == [f"nats://{other}:6222" for other in sorted(nodes)
                                                               if other != name]
        volume, mount = node["volumes"][0].split(":")
        assert mount == flag(command, "--sd") and volume in compose["volumes"]
    assert len({node["volumes"][0] for node in nodes.values()}) == 3

    for hub in hubs.values():
        args = build_parser().parse_args(hub["command"])
        assert servers(args.nats) == [f"nats://{name}:4222" for name in sorted(nodes)]
        assert (ROOT / args.config.relative_to("/app")).exists()  # the image has the repository's configs/
        assert cfg.load(None, env=hub["environment"]).hub.replicas == 3
        assert set(hub["depends_on"]) == set(nodes)
        context = (ROOT / "deploy" / hub["build"]["context"]).resolve()  # relative to the compose file
        assert context == ROOT and (context / hub["build"]["dockerfile"]) == ROOT / "deploy" / "Dockerfile"
    assert len({hub["ports"][0].split(":")[0] for hub in hubs.values()}) == 3

    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text(encoding="utf-8")
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            assert all((ROOT / source).exists() for source in line.split()[1:-1]), line
    assert "pip install --no-cache-dir ." in dockerfile and "ENV BABELHUB_HTTP=0.0.0.0:8080" in dockerfile


# ------------------------------------------------------------------------ KV writes left unanswered


class AnswerLost:
    """A real connection whose next `lose` requests reach the server but whose answers never come back, as
    when a bucket's leader stops between committing a write and answering it."""

    def __init__(self, nc: NATS, lose: int) -> None:
        self.nc = nc
        self.lose = lose

    def __getattr__(self, name: str) -> Any:
        return getattr(self.nc, name)

    async def request(self, *args: Any, **kwargs: Any) -> Msg:
        answer = await self.nc.request(*args, **kwargs)
        if self.lose:
            self.lose -= 1
            raise nats.errors.TimeoutError
        return answer

    @classmethod
    def publisher(cls, nc: NATS, lose: int) -> Publisher:
        return Publisher(cast(NATS, cls(nc, lose)), nc.jetstream())


async def test_a_kv_write_whose_answer_was_lost_is_recognised_as_the_hubs_own(nats_client: NATS) -> None:
    js = nats_client.jetstream()
    kv = await js.create_key_value(KeyValueConfig(bucket=f"{unique_prefix()}_lost"))
    publisher = Publisher(nats_client, js)
    first = await publisher.store(kv, "k", b"v1", None)

    lossy = AnswerLost.publisher(nats_client, lose=1)
    second = await lossy.store(kv, "k", b"v2", first)  # landed, unanswered, tried again
    entry = await kv.get("k")
    assert entry.value == b"v2" and second == entry.revision and second > first
    assert await publisher.store(kv, "k", b"v3", second) > second  # the caller goes on with the right revision

    # A conflict stays a conflict: another writer's value, or a first try that was answered.
    revision = (await kv.get("k")).revision
    assert revision is not None
    await kv.update("k", b"theirs", last=revision)
    with pytest.raises(KeyWrongLastSequenceError):
        await AnswerLost.publisher(nats_client, lose=1).store(kv, "k", b"mine", revision)
    with pytest.raises(KeyWrongLastSequenceError):
        await publisher.store(kv, "k", b"theirs", revision)


async def test_a_kv_write_while_the_buckets_leader_is_frozen_lands_once_a_new_leader_is_elected(
        nats_cluster: LocalCluster) -> None:
    bucket = f"{unique_prefix()}_frozen"
    async with connected(nats_cluster.urls) as setup:
        kv = await setup.jetstream().create_key_value(KeyValueConfig(bucket=bucket, replicas=3))
        first = await kv.put("k", b"v1")
        await on_every_node(setup, bucket_stream(bucket), 3)
        leader = (await setup.jetstream().stream_info(bucket_stream(bucket))).cluster
        assert leader is not None and leader.leader is not None
    frozen = nats_cluster.nodes[int(leader.leader.removeprefix("n")) - 1]
    others = [node.url for node in nats_cluster.nodes if node is not frozen]
    assert frozen.process is not None
    async with connected(others) as nc:
        js = nc.jetstream(timeout=2.0)
        kv = await js.key_value(bucket)
        frozen.process.send_signal(signal.SIGSTOP)  # it neither answers nor steps down: the others elect
        try:
            revision = await Publisher(nc, js).store(kv, "k", b"v2", first)
        finally:
            frozen.process.send_signal(signal.SIGCONT)
        await on_every_node(nc, bucket_stream(bucket), 3, timeout=30)
        entry = await kv.get("k")
        assert entry.value == b"v2" and entry.revision == revision
