"""A NATS cluster of nats-server processes on this machine: for trying several hubs (`make cluster`) and
for the cluster tests. Production clusters are deployed as nats-server documents (see docker-compose.yml).

Each node is an `EmbeddedServer` with its own client port, route port, server name and JetStream store;
every node lists the others' routes, so the cluster forms whichever node starts first. JetStream is
usable once its meta group has a leader and every node is a peer: `start` waits until a stream with one
replica per node can be created.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import nats
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import APIError

from babelhub.services.broker import EmbeddedServer

__all__ = ["LocalCluster"]


class LocalCluster:
    """`size` clustered nats-server processes with JetStream, listening on 127.0.0.1."""

    def __init__(self, data_dir: str | Path, size: int = 3, client_ports: list[int] | None = None,
                 name: str = "babelhub") -> None:
        """`client_ports`: one per node (0 or none: free ports); data of node `i` goes to `data_dir/n<i>`."""
        ports = client_ports or [0] * size
        if len(ports) != size:
            raise ValueError(f"{size} nodes need {size} client ports, not {len(ports)}")
        self.nodes = [
            EmbeddedServer(Path(data_dir) / f"n{index + 1}", port, server_name=f"n{index + 1}", cluster_name=name)
            for index, port in enumerate(ports)
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def servers(self) -> str:
        """The client URLs as `hub.nats` (or `babelhub run --nats`) takes them: comma-separated."""
        return ",".join(self.urls)

    async def start(self, ready_timeout: float = 30.0) -> None:
        self._point_routes()
        await asyncio.gather(*(node.start() for node in self.nodes))
        await self.wait_until_usable(ready_timeout)

    def _point_routes(self) -> None:
        """Every node routes to the others' current route ports (a node whose picked port was taken
        picks another at start; one route from either side is enough for the pair to connect)."""
        for node in self.nodes:
            node.routes = [f"nats://127.0.0.1:{peer.route_port}" for peer in self.nodes if peer is not node]

    async def stop(self) -> None:
        await asyncio.gather(*(node.stop() for node in self.nodes))

    async def stop_node(self, index: int) -> None:
        await self.nodes[index].stop()

    async def start_node(self, index: int) -> None:
        """Start a stopped node again, with its ports and store: it rejoins and catches up."""
        self._point_routes()
        await self.nodes[index].start()

    async def wait_until_usable(self, timeout: float = 30.0) -> None:
        """Until a stream with one replica per node can be created (then deleted): the JetStream meta
        group has a leader and knows every node."""
        nc = await nats.connect(servers=self.urls, max_reconnect_attempts=-1)
        try:
            js = nc.jetstream(timeout=2.0)
            probe = StreamConfig(name="CLUSTER_PROBE", subjects=["_cluster_probe.>"], storage=StorageType.MEMORY,
                                 num_replicas=len(self.nodes))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                try:
                    await js.add_stream(probe)
                    await js.delete_stream(probe.name or "")
                    return
                except (APIError, TimeoutError, nats.errors.Error) as exc:
                    if loop.time() > deadline:
                        raise TimeoutError(f"the NATS cluster was not usable within {timeout}s: {exc!r}") from exc
                await asyncio.sleep(0.25)
        finally:
            with contextlib.suppress(Exception):
                await nc.close()
