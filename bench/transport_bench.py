"""Processor transports compared at one fixed offered load, with the bare NATS path as the same run's baseline.

Each transport serves a tenant of its own in one hub process, with its own Telegram connection to the
same fake Bot API, and its app is the runnable example of `examples/` (the NATS baseline's is
`bench/processor.py`, an app subscribed to `<prefix>.<tenant>.in.>`):

    nats      webhook → hub → NATS subjects → app publishes the answer                  (the baseline)
    request   webhook → hub → NATS request → the app's reply → hub
    http      webhook → hub → signed HTTP POST → the app's sync reply → hub
    websocket webhook → hub → /ws/processor frame → the app's ack and `send` frame → hub
    redis     webhook → hub → XADD → the app's XREADGROUP … XADD → hub's XREADGROUP

and then → the fake Telegram API, which notes when each answer arrived. Every path gets the same open-loop
load (`--rate` webhooks a second for `--seconds`, over 200 chats); the bench prints, per path, the
delivered rate, p50/p99 from the webhook to the channel API call, and both as ratios to the NATS path.
Paths run one after the other on the same machine, all processes on 127.0.0.1; the redis path is left
out when `redis-server` is not installed.

    python bench/transport_bench.py [--rate 200] [--seconds 5] [--paths nats,request,http,websocket,redis]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import aiohttp
import uvloop
from e2e_bench import SECRET, TOKEN, offered_load, percentile, process, wait_http

from babelhub.services.broker import EmbeddedServer, free_port

PREFIX = "tbench"
API_KEY = "transport-bench-key"
SIGNING_SECRET = "transport-bench-signing-secret"
PATHS = ("nats", "request", "http", "websocket", "redis")


class Transport(NamedTuple):
    """One transport's tenant, connection and processor in the hub's config, and its app's command."""

    name: str
    processor: str
    app: list[str]


def config_of(paths: list[Transport], nats_url: str, hub_port: int, fake_port: int, http_port: int,
              redis_url: str) -> str:
    """The hub's config: per path a tenant `t-<path>`, a connection `tg-<path>` and a processor."""
    transports = {
        "nats": "",
        "request": 'options = { mode = "request" }',
        "http": (f'secrets = {{ signing_secret = "{SIGNING_SECRET}" }}\n'
                 f'options = {{ url = "http://127.0.0.1:{http_port}/babelhub" }}'),
        "websocket": "",
        "redis": f'secrets = {{ url = "{redis_url}" }}',
    }
    kinds = {"nats": "nats", "request": "nats", "http": "http", "websocket": "websocket", "redis": "redis"}
    text = f"""
[hub]
http = "127.0.0.1:{hub_port}"
nats = "{nats_url}"
subject_prefix = "{PREFIX}"
log_level = "warning"
"""
    for path in paths:
        text += f"""
[[tenants]]
id = "t-{path.name}"
api_keys = ["{API_KEY}-{path.name}"]
[[connections]]
id = "tg-{path.name}"
tenant = "t-{path.name}"
channel = "telegram"
api_base = "http://127.0.0.1:{fake_port}"
secrets = {{ bot_token = "{TOKEN}", secret_token = "{SECRET}" }}
max_rate = 0
[[processors]]
id = "{path.processor}"
tenant = "t-{path.name}"
transport = "{kinds[path.name]}"
{transports[path.name]}
"""
    return text


def apps(nats_url: str, hub_port: int, http_port: int, redis_url: str) -> dict[str, Transport]:
    return {
        "nats": Transport("nats", "app-nats", ["bench/processor.py", "--nats", nats_url, "--prefix", PREFIX,
                                           "--tenant", "t-nats"]),
        "request": Transport("request", "app-request", [
            "examples/nats_request_processor.py", "--nats", nats_url, "--prefix", PREFIX, "--tenant", "t-request",
            "--processor", "app-request"]),
        "http": Transport("http", "app-http", ["examples/http_processor.py", "--port", str(http_port)]),
        "websocket": Transport("websocket", "app-ws", [
            "examples/ws_processor.py", "--url", f"ws://127.0.0.1:{hub_port}", "--key", f"{API_KEY}-websocket",
            "--processor", "app-ws"]),
        "redis": Transport("redis", "app-redis", ["examples/redis_processor.py", "--url", redis_url,
                                              "--tenant", "t-redis"]),
    }


class Result(NamedTuple):
    delivered: int
    offered: int
    rate: float
    p50: float
    p99: float


async def measure(hub_port: int, fake: str, name: str, rate: float, seconds: float, first: int) -> Result:
    """Offer the load on `name`'s connection and wait for its answers at the fake API."""
    url = f"http://127.0.0.1:{hub_port}/webhooks/telegram/tg-{name}"
    sent = await offered_load(url, rate, seconds, first)
    latencies, delivered_rate = await answers(fake, sent, timeout=max(30.0, seconds * 6))
    return Result(len(latencies), len(sent), delivered_rate, percentile(latencies, 0.5), percentile(latencies, 0.99))


async def answers(fake: str, sent: dict[str, float], timeout: float) -> tuple[list[float], float]:
    """Latencies (ms) of the answers that reached the fake API, and the delivered rate; the fake API's
    record is reset afterwards."""
    deadline = time.time() + timeout
    arrivals: dict[str, float] = {}
    async with aiohttp.ClientSession() as session:
        while time.time() < deadline:
            async with session.get(fake + "/stats") as response:
                seen = json.loads(await response.text())
            # An example app answers "echo: <text>" or "You said: <text>": the load's own text is the end.
            arrivals = {text.rpartition(": ")[2]: at for text, at in seen if text.rpartition(": ")[2] in sent}
            if len(arrivals) >= len(sent):
                break
            await asyncio.sleep(0.25)
        async with session.post(fake + "/reset") as response:
            await response.read()
    latencies = sorted((arrivals[text] - sent[text]) * 1000 for text in arrivals)
    span = (max(arrivals.values()) - min(sent.values())) if arrivals else 1.0
    return latencies, len(arrivals) / span


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    """A throwaway redis-server on a free port, or "" when none is installed."""
    executable = shutil.which("redis-server")
    if executable is None:
        yield ""
        return
    port = free_port()
    child = subprocess.Popen([executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(directory)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        child.kill()
        child.wait()


async def warm_up(hub_port: int, fake: str, name: str) -> None:
    """Until the path answers (its app connected and subscribed), so the measured load meets it ready."""
    for attempt in range(60):
        _, rate = await answers(fake, await offered_load(
            f"http://127.0.0.1:{hub_port}/webhooks/telegram/tg-{name}", 20, 0.5, 10_000_000 + attempt * 100), 2.0)
        if rate:
            return
    raise RuntimeError(f"the {name} path never answered")


async def run(options: argparse.Namespace) -> None:
    chosen = [name for name in options.paths.split(",") if name]
    if chosen[0] != "nats":
        chosen.insert(0, "nats")  # the baseline, always first
    with tempfile.TemporaryDirectory() as tmp, redis_server(Path(tmp)) as redis_url:
        if not redis_url and "redis" in chosen:
            print("redis-server is not installed: the redis path is left out")
            chosen.remove("redis")
        server = EmbeddedServer(Path(tmp) / "nats", port=0)
        await server.start()
        try:
            await compare(chosen, server.url, Path(tmp), redis_url, options)
        finally:
            await server.stop()


async def compare(chosen: list[str], nats_url: str, tmp: Path, redis_url: str, options: argparse.Namespace) -> None:
    hub_port, fake_port, http_port = free_port(), free_port(), free_port()
    known = apps(nats_url, hub_port, http_port, redis_url)
    paths = [known[name] for name in chosen]
    config = tmp / "hub.toml"
    config.write_text(config_of(paths, nats_url, hub_port, fake_port, http_port, redis_url))
    fake = f"http://127.0.0.1:{fake_port}"
    with contextlib.ExitStack() as stack:
        stack.enter_context(process("bench/fake_telegram.py", "--port", str(fake_port)))
        stack.enter_context(process("-m", "babelhub", "run", "--config", str(config)))
        await wait_http(f"http://127.0.0.1:{hub_port}/readyz")
        os.environ["APP_SIGNING_SECRET"] = SIGNING_SECRET  # for examples/http_processor.py, started next
        for path in paths:
            stack.enter_context(process(*path.app, ready=path.name == "nats"))
        print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; every process on 127.0.0.1; "
              f"offered {options.rate:g} webhooks/s for {options.seconds:g} s per path, 200 chats")
        print(f"{'path':<10} {'delivered':>11} {'msg/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'msg/s vs nats':>14} {'p99 vs nats':>12}")
        baseline: Result | None = None
        first = 1
        for path in paths:
            await warm_up(hub_port, fake, path.name)
            result = await measure(hub_port, fake, path.name, options.rate, options.seconds, first)
            first += result.offered
            baseline = baseline or result
            print(f"{path.name:<10} {result.delivered:>5}/{result.offered:<5} {result.rate:>8.0f} "
                  f"{result.p50:>8.1f} {result.p99:>8.1f} {result.rate / baseline.rate:>14.2f} "
                  f"{result.p99 / baseline.p99:>12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200.0, help="webhooks a second offered to each path")
    parser.add_argument("--seconds", type=float, default=5.0, help="how long each path is offered the load")
    parser.add_argument("--paths", default=",".join(PATHS), help="which paths, comma-separated (nats always runs)")
    uvloop.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
