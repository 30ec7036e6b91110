"""Memory the hub holds for idle work: per active idle conversation actor, per idle web chat session.

(a) Conversation actors. A fresh process starts a real nats-server and an in-process `Hub` (uvloop and
    `gc.freeze()` after start, as `babelhub run` does). Telegram updates for N different chats are
    decoded by the connection's codec and told to the hub's own conversation `ActorSystem`, so N real
    `ConversationActor`s each load their (absent) snapshot, apply one inbound message (publish it for
    the processors, checkpoint to KV) and go idle. Printed: (RSS after - RSS before) / N, and, from a
    second fresh process with `tracemalloc` on (10,000 actors by default: tracing makes every allocation
    slower, and the figure is per actor), the Python heap per actor and the lines that allocate it.
    Target ≤ 4 KB per actor.
(b) Web chat sessions. `babelhub run` in its own process serves a web chat connection; this process
    opens N WebSockets to `/ws/<connection>` with aiohttp, offering compression as browsers do, reads
    each one's session greeting, subscribes to its conversation as the page does and lets them idle.
    Printed: (hub RSS with N sessions - hub RSS with none) / N, and the RSS once they are closed again.
    Target ≤ 30 KB per session (Centrifugo's figure).

Both baselines are taken in the same run, after a short warm-up. Nothing is asserted.

    python bench/memory_bench.py [--actors 50000] [--heap-actors 10000] [--sessions 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import aiohttp
import uvloop

from babelhub.actors.conversation import Inbound, actor_key
from babelhub.codecs.base import HttpRequest
from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer, free_port

ROOT = Path(__file__).resolve().parents[1]
TENANT = "bench"
ACTOR_TARGET_KB = 4.0
SESSION_TARGET_KB = 30.0
IN_FLIGHT = 256
"""Actors being activated at once (each takes a few NATS round trips)."""


def rss_kb(pid: int | None = None) -> int:
    """Resident set size of a process in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/<pid>/status")


def raise_file_limit() -> int:
    """Raise the soft limit of open files to the hard one (children inherit it); the new soft limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def verdict(value: float, target: float) -> str:
    return "met" if value <= target else "NOT met"


@asynccontextmanager
async def nats_server() -> AsyncIterator[EmbeddedServer]:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedServer(Path(tmp) / "nats", port=0)
        await server.start()
        try:
            yield server
        finally:
            await server.stop()


# ------------------------------------------------------------------------------- (a) actors


def telegram_update(n: int) -> bytes:
    """A private-chat text message from chat `n`, shaped as the Bot API documents `Update`."""
    chat = 1_000_000 + n
    return json.dumps({
        "update_id": n,
        "message": {"message_id": 1, "date": 1_767_225_600, "text": "hello",
                    "from": {"id": chat, "is_bot": False, "first_name": "Idle"},
                    "chat": {"id": chat, "type": "private", "first_name": "Idle"}},
    }).encode()


async def activate(hub: Hub, count: int) -> None:
    """Give `count` conversation actors one inbound message each; return once every one has applied it
    and checkpointed (its `on_applied` ran)."""
    connection = hub.ctx.connections["tg"]
    room = asyncio.Semaphore(IN_FLIGHT)
    done = asyncio.Event()
    applied = 0

    async def on_applied() -> None:
        nonlocal applied
        applied += 1
        room.release()
        if applied == count:
            done.set()

    for n in range(count):
        await room.acquire()
        request = HttpRequest(path="/webhooks/telegram/tg", headers={"content-type": "application/json"},
                              body=telegram_update(n), received_at=time.time())
        [envelope] = connection.decode(request, seq=n + 1)
        await hub.conversations.tell(actor_key(TENANT, envelope.conversation.id), Inbound(envelope),
                                     on_applied=on_applied)
    await asyncio.wait_for(done.wait(), timeout=600)


def actor_config(nats_url: str, count: int) -> cfg.Config:
    return cfg.Config(
        hub=cfg.HubSettings(http="127.0.0.1:0", nats=nats_url, subject_prefix="mem", log_level="warning",
                            max_active_actors=count + 1, idle_seconds=86_400.0),
        tenants=[cfg.Tenant(id=TENANT)],
        # Nothing is sent to the channel: the API base only has to be well formed.
        connections=[cfg.Connection(id="tg", tenant=TENANT, channel="telegram", api_base="http://127.0.0.1:9",
                                    secrets={"bot_token": "123456:MEMORY", "secret_token": "memory"})],
    )


async def measure_actors(count: int, trace: bool) -> None:
    async with nats_server() as server, Hub(actor_config(server.url, count)) as hub:
        gc.freeze()  # as `babelhub run` does once the hub is up
        await asyncio.sleep(1)
        gc.collect()
        before = rss_kb()
        if trace:
            tracemalloc.start()
        started = time.perf_counter()
        await activate(hub, count)
        took = time.perf_counter() - started
        await asyncio.sleep(2)  # every actor back in its idle wait
        gc.collect()
        active = hub.conversations.active
        if trace:
            report_heap(tracemalloc.take_snapshot(), active)
            tracemalloc.stop()
            return
        after = rss_kb()
        print(f"    {active:,} active idle conversation actors (activated in {took:.1f}s)")
        print(f"    hub RSS with 0 actors {before / 1024:8.1f} MiB, with {active:,}: {after / 1024:8.1f} MiB")
        per_actor = (after - before) / max(active, 1)
        print(f"    RSS per idle actor               {per_actor:8.2f} KiB   (target ≤ {ACTOR_TARGET_KB:g} KB: "
              f"{verdict(per_actor, ACTOR_TARGET_KB)})")


def report_heap(snapshot: tracemalloc.Snapshot, active: int) -> None:
    """Python heap per actor, and the lines that allocated it, from a snapshot taken while they idle. A
    dict or list that CPython reuses from its free lists is counted where it was first allocated, so a
    few lines name code that only made the first use of the memory."""
    snapshot = snapshot.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    stats = snapshot.statistics("lineno")
    total = sum(stat.size for stat in stats)
    per_actor = total / max(active, 1)
    print(f"    Python heap per idle actor (tracemalloc, {active:,} actors) {per_actor / 1024:6.2f} KiB in "
          f"{sum(stat.count for stat in stats) / max(active, 1):.1f} blocks; where it is allocated:")
    for stat in stats[:14]:
        frame = stat.traceback[0]
        where = f"{_short(frame.filename)}:{frame.lineno}"
        print(f"      {stat.size / active:8.0f} B {stat.count / active:5.1f} blocks  {where}")


def _short(filename: str) -> str:
    for marker in ("site-packages/", "babelhub/", "lib/python3"):
        if marker in filename:
            return filename[filename.index(marker):]
    return filename


# ------------------------------------------------------------------------------ (b) sessions


@contextmanager
def hub_process(config: Path) -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen([sys.executable, "-m", "babelhub", "run", "--config", str(config)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        yield child
    finally:
        child.kill()
        _, errors = child.communicate()
        if child.returncode not in (0, -9) or os.environ.get("BENCH_HUB_LOG"):
            print(errors.decode(errors="replace")[-2000:], file=sys.stderr)


async def wait_ready(url: str, child: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            if child.poll() is not None:
                raise RuntimeError(f"the hub exited with {child.returncode}")
            try:
                async with http.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


async def open_sessions(http: aiohttp.ClientSession, url: str, count: int) -> list[aiohttp.ClientWebSocketResponse]:
    """`count` web chat sockets, each past its session greeting and following its conversation, opened
    `IN_FLIGHT` at a time at most."""
    room = asyncio.Semaphore(IN_FLIGHT // 5)

    async def one() -> aiohttp.ClientWebSocketResponse:
        async with room:
            # Offered as browsers offer it (`permessage-deflate; client_max_window_bits`): a hub that took
            # it up would keep zlib state per socket.
            socket = await http.ws_connect(url, autoping=True, compress=15)
            greeting = await socket.receive_json(timeout=30)
            if greeting.get("type") != "session":
                raise RuntimeError(f"unexpected first frame {greeting!r}")
            # As the page does: follow its conversation (two ordered consumers on the NATS server).
            await socket.send_json({"type": "subscribe", "conversations": [greeting["conversation"]]})
            subscribed = await socket.receive_json(timeout=30)
            if subscribed.get("type") != "subscribed":
                raise RuntimeError(f"unexpected answer to subscribe {subscribed!r}")
            return socket

    return await asyncio.gather(*(one() for _ in range(count)))


async def settled_rss(pid: int, seconds: float = 3.0) -> int:
    await asyncio.sleep(seconds)
    return rss_kb(pid)


async def measure_sessions(count: int) -> None:
    async with nats_server() as server:
        with tempfile.TemporaryDirectory() as tmp:
            port = free_port()
            config = Path(tmp) / "hub.toml"
            config.write_text(f"""
[hub]
http = "127.0.0.1:{port}"
nats = "{server.url}"
subject_prefix = "mem"
log_level = "warning"
max_sockets_per_ip = {count + 100}  # every client of the bench comes from 127.0.0.1
[[tenants]]
id = "{TENANT}"
[[connections]]
id = "webchat"
tenant = "{TENANT}"
channel = "webchat"
""")
            with hub_process(config) as hub:
                await wait_ready(f"http://127.0.0.1:{port}/readyz", hub)
                url = f"ws://127.0.0.1:{port}/ws/webchat"
                connector = aiohttp.TCPConnector(limit=0)
                async with aiohttp.ClientSession(connector=connector) as http:
                    for socket in await open_sessions(http, url, 50):  # warm-up: first-use costs
                        await socket.close()
                    before = await settled_rss(hub.pid)
                    started = time.perf_counter()
                    sockets = await open_sessions(http, url, count)
                    took = time.perf_counter() - started
                    during = await settled_rss(hub.pid)
                    await asyncio.gather(*(socket.close() for socket in sockets))
                    after = await settled_rss(hub.pid)
    per_session = (during - before) / count
    print(f"    {count:,} idle web chat sessions (opened in {took:.1f}s)")
    print(f"    hub RSS with 0 sessions {before / 1024:8.1f} MiB, with {count:,}: {during / 1024:8.1f} MiB, "
          f"after closing them: {after / 1024:.1f} MiB")
    print(f"    RSS per idle session             {per_session:8.2f} KiB   (target ≤ {SESSION_TARGET_KB:g} KB: "
          f"{verdict(per_session, SESSION_TARGET_KB)})")


# ------------------------------------------------------------------------------------ driver


def fresh(*args: str) -> None:
    """Run one measurement in a process of its own, so nothing measured before weighs on it."""
    subprocess.run([sys.executable, __file__, *args], check=True, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--actors", type=int, default=50_000)
    parser.add_argument("--heap-actors", type=int, default=10_000, help="actors of the tracemalloc run")
    parser.add_argument("--sessions", type=int, default=2_000)
    parser.add_argument("--only", choices=["actors", "heap", "sessions"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    match args.only:
        case "actors" | "heap":
            uvloop.run(measure_actors(args.actors, trace=args.only == "heap"))
        case "sessions":
            limit = raise_file_limit()
            count = min(args.sessions, limit - 200)  # each process holds one socket a session, plus room
            uvloop.run(measure_sessions(count))
        case None:
            print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; RSS from /proc, KiB")
            print("(a) conversation actors, each having applied one inbound Telegram message, then idle")
            fresh("--only", "actors", "--actors", str(args.actors))
            fresh("--only", "heap", "--actors", str(args.heap_actors))
            print("(b) web chat sessions (WebSocket, session greeting read), then idle; clients in another process")
            fresh("--only", "sessions", "--sessions", str(args.sessions))


if __name__ == "__main__":
    main()
