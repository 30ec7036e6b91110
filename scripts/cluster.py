"""`make cluster`: a 3-node NATS cluster and 3 hubs on this machine, to try several hubs before deploying.

Starts three clustered nats-server processes (JetStream, client ports 4222/4223/4224, data under
.babelhub/cluster/), then three `babelhub run` processes (HTTP 8081/8082/8083) given the three servers as
`--nats` and `BABELHUB_REPLICAS=3`, so every stream and bucket has a copy on each node. The hubs share
one subject prefix and split the conversations' partitions between them. Prints where everything listens
and which partitions each hub holds, and stops it all on Ctrl-C (or SIGTERM): the hubs first (each hands
its partitions over), then the servers.

    python scripts/cluster.py [--config configs/default.toml] [--nats-ports 4222,4223,4224]
                              [--http-ports 8081,8082,8083] [--data-dir .babelhub/cluster]

A port of 0 means any free one. Hub logs go to <data-dir>/hub<i>.log, servers' to <data-dir>/n<i>/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from babelhub.services.broker import die_with_parent, free_port
from babelhub.services.config import load
from babelhub.services.localcluster import LocalCluster

REPLICAS = 3


def ports(text: str) -> list[int]:
    chosen = [int(port) for port in text.split(",")]
    return [port or free_port() for port in chosen]


class HubChild:
    """One `babelhub run` process of the cluster, its output in a log file."""

    def __init__(self, index: int, config: Path, servers: str, http_port: int, data_dir: Path) -> None:
        self.name = f"hub{index}"
        self.url = f"http://127.0.0.1:{http_port}"
        self.log = data_dir / f"{self.name}.log"
        self.command = [sys.executable, "-m", "babelhub", "run", "--config", str(config), "--nats", servers,
                        "--http", f"127.0.0.1:{http_port}", "--data-dir", str(data_dir / self.name)]
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {**os.environ, "BABELHUB_REPLICAS": str(REPLICAS)}
        with self.log.open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                *self.command, stdout=out, stderr=asyncio.subprocess.STDOUT, env=env, preexec_fn=die_with_parent)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.process is None or self.process.returncode is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log}")
            if (await asyncio.to_thread(self.readiness)).get("ready"):
                return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"{self.name} was not ready within {timeout}s; see {self.log}")

    def readiness(self) -> dict[str, Any]:
        """The hub's `/readyz` answer (its member id and the partitions it holds); empty when it has none."""
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=2) as response:
                answer: dict[str, Any] = json.load(response)
                return answer
        except urllib.error.HTTPError as error:  # 503 while starting: still a JSON answer
            return dict(json.load(error))
        except (OSError, ValueError):
            return {}

    async def stop(self, timeout: float = 30.0) -> None:
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()


async def run(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    http_ports, nats_ports = ports(args.http_ports), ports(args.nats_ports)
    cluster = LocalCluster(data_dir, size=len(nats_ports), client_ports=nats_ports)
    config = args.config.resolve()
    hubs = [HubChild(i + 1, config, cluster.servers, port, data_dir) for i, port in enumerate(http_ports)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await cluster.start()
        for hub in hubs:  # one after the other: the first makes the streams, the others find them
            await hub.start()
            await hub.wait_ready()
        held = await spread(hubs, load(config).hub.partitions)
        print(banner(cluster, hubs, held, data_dir), flush=True)
        await stop.wait()
        print("cluster: stopping the hubs, then the NATS servers…", flush=True)
    finally:
        await asyncio.gather(*(hub.stop() for hub in hubs))
        await cluster.stop()
    return 0


async def spread(hubs: list[HubChild], partitions: int, timeout: float = 60.0) -> list[list[int]]:
    """The partitions each hub holds, once all `partitions` are split evenly between them (a hub that
    joins takes its share within a few lease rounds), or as they are after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        held = [list((await asyncio.to_thread(hub.readiness)).get("partitions", [])) for hub in hubs]
        counts = [len(mine) for mine in held]
        covered = {partition for mine in held for partition in mine}
        if (len(covered) == sum(counts) == partitions and max(counts) - min(counts) <= 1) or loop.time() > deadline:
            return held
        await asyncio.sleep(0.5)


def banner(cluster: LocalCluster, hubs: list[HubChild], held: list[list[int]], data_dir: Path) -> str:
    lines = [f"babelhub cluster is running ({len(cluster.nodes)} NATS nodes, {len(hubs)} hubs, "
             f"replicas = {REPLICAS})"]
    lines += [f"  nats  {node.server_name}  {node.url}   data {node.data_dir}" for node in cluster.nodes]
    lines += [f"  hub   {hub.name}  {hub.url}/   {len(partitions)} partitions   log {hub.log}"
              for hub, partitions in zip(hubs, held, strict=True)]
    lines += [f"  hubs connect with --nats {cluster.servers} and share subject prefix bh",
              f"  data under {data_dir}", "Ctrl-C stops everything."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--config", type=Path, default=Path("configs/default.toml"), help="the hubs' TOML config")
    parser.add_argument("--nats-ports", default="4222,4223,4224", help="client ports of the NATS nodes (0: free)")
    parser.add_argument("--http-ports", default="8081,8082,8083", help="HTTP ports of the hubs, one per hub (0: free)")
    parser.add_argument("--data-dir", default=".babelhub/cluster", help="where servers and hubs keep data and logs")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
