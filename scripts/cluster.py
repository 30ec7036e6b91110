"""`make cluster`: a 3-node NATS cluster and 3 hubs on this machine, to try several hubs before deploying.

Starts three clustered nats-server processes (JetStream, client ports 4222/4223/4224, data under
.babelhub/cluster/), then three `babelhub run` processes (HTTP 8081/8082/8083) given the three servers as
`--nats` and `BABELHUB_REPLICAS=3`, so every stream and bucket has a copy on each node. Prints where
everything listens and stops it all on Ctrl-C (or SIGTERM): the hubs first, then the servers. Each hub
has a subject prefix of its own (bh1, bh2, bh3) unless `--shared-prefix` is given: see NOT_YET_SAFE.

    python scripts/cluster.py [--config configs/default.toml] [--nats-ports 4222,4223,4224]
                              [--http-ports 8081,8082,8083] [--data-dir .babelhub/cluster] [--shared-prefix]

A port of 0 means any free one. Hub logs go to <data-dir>/hub<i>.log, servers' to <data-dir>/n<i>/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import urllib.request
from pathlib import Path

from babelhub.services.broker import die_with_parent, free_port
from babelhub.services.localcluster import LocalCluster

NOT_YET_SAFE = ("Several hubs on one NATS deployment are NOT yet safe: partition ownership is not wired in yet, "
                "so two hubs would consume the same durable consumers (a second hub on one subject prefix fails "
                "to start). Until it is, each hub gets a subject prefix of its own (bh1, bh2, …): separate "
                "deployments sharing one NATS cluster. --shared-prefix puts them all on `bh`.")
REPLICAS = 3


def ports(text: str) -> list[int]:
    chosen = [int(port) for port in text.split(",")]
    return [port or free_port() for port in chosen]


class HubChild:
    """One `babelhub run` process of the cluster, its output in a log file."""

    def __init__(self, index: int, config: Path, servers: str, http_port: int, data_dir: Path, prefix: str) -> None:
        self.name = f"hub{index}"
        self.prefix = prefix
        self.url = f"http://127.0.0.1:{http_port}"
        self.log = data_dir / f"{self.name}.log"
        self.command = [sys.executable, "-m", "babelhub", "run", "--config", str(config), "--nats", servers,
                        "--http", f"127.0.0.1:{http_port}", "--data-dir", str(data_dir / self.name)]
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {**os.environ, "BABELHUB_REPLICAS": str(REPLICAS), "BABELHUB_SUBJECT_PREFIX": self.prefix}
        with self.log.open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                *self.command, stdout=out, stderr=asyncio.subprocess.STDOUT, env=env, preexec_fn=die_with_parent)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.process is None or self.process.returncode is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log}")
            if await asyncio.to_thread(self._ready):
                return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"{self.name} was not ready within {timeout}s; see {self.log}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

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
    prefixes = ["bh" if args.shared_prefix else f"bh{i + 1}" for i in range(len(http_ports))]
    hubs = [HubChild(i + 1, config, cluster.servers, port, data_dir, prefixes[i]) for i, port in enumerate(http_ports)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await cluster.start()
        for hub in hubs:  # one after the other: the first makes the streams, the others find them
            await hub.start()
            await hub.wait_ready()
        print(banner(cluster, hubs, data_dir), flush=True)
        await stop.wait()
        print("cluster: stopping the hubs, then the NATS servers…", flush=True)
    finally:
        await asyncio.gather(*(hub.stop() for hub in hubs))
        await cluster.stop()
    return 0


def banner(cluster: LocalCluster, hubs: list[HubChild], data_dir: Path) -> str:
    lines = [f"babelhub cluster is running ({len(cluster.nodes)} NATS nodes, {len(hubs)} hubs, "
             f"replicas = {REPLICAS})"]
    lines += [f"  nats  {node.server_name}  {node.url}   data {node.data_dir}" for node in cluster.nodes]
    lines += [f"  hub   {hub.name}  {hub.url}/   subjects {hub.prefix}.>   log {hub.log}" for hub in hubs]
    lines += [f"  hubs connect with --nats {cluster.servers}", f"  data under {data_dir}",
              f"WARNING: {NOT_YET_SAFE}", "Ctrl-C stops everything."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--config", type=Path, default=Path("configs/default.toml"), help="the hubs' TOML config")
    parser.add_argument("--nats-ports", default="4222,4223,4224", help="client ports of the NATS nodes (0: free)")
    parser.add_argument("--http-ports", default="8081,8082,8083", help="HTTP ports of the hubs, one per hub (0: free)")
    parser.add_argument("--shared-prefix", action="store_true",
                        help="all hubs on subject prefix `bh` (one deployment; needs partition ownership)")
    parser.add_argument("--data-dir", default=".babelhub/cluster", help="where servers and hubs keep data and logs")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
