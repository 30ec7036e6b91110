from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import nats
import pytest
from nats.aio.client import Client as NATS

from babelhub.hub.app import Hub
from babelhub.services.broker import EmbeddedServer
from babelhub.services.config import Config
from babelhub.services.localcluster import LocalCluster
from tests.fakeapi import FakeApi
from tests.hubkit import HubProcess, StartHub
from tests.rediskit import RedisServer


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client for the test's calls to the hub."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def fake_api() -> AsyncIterator[FakeApi]:
    """A fresh local fake channel API per test; set `.responder` / `.queue(...)` to script it."""
    api = FakeApi()
    await api.start()
    yield api
    await api.stop()


@pytest.fixture(scope="session")
async def nats_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedServer]:
    """One real nats-server (JetStream) per test session, on a free port; tests isolate themselves
    with their own subject prefix."""
    server = EmbeddedServer(tmp_path_factory.mktemp("nats"), port=0)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def redis_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RedisServer]:
    """One real redis-server per test module, on a free port of 127.0.0.1 (`.url`, `.client()`); tests
    isolate themselves with their own stream and group names."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    await server.start()
    yield server
    server.stop()


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    """Three clustered nats-server processes (JetStream, free ports, stores under tmp_path), usable once
    JetStream can place a stream on all three; `stop_node(i)` / `start_node(i)` take one down and back."""
    cluster = LocalCluster(tmp_path / "cluster")
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()


@pytest.fixture
async def nats_client(nats_server: EmbeddedServer) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_server.url)
    yield client
    await client.drain()


@pytest.fixture
async def start_hub() -> AsyncIterator[StartHub]:
    """Start in-process hubs (`await start_hub(config)`); each is stopped at the end of the test, within a
    bound, so a hub that cannot stop fails the test instead of hanging the run."""
    hubs: list[Hub] = []

    async def start(config: Config) -> Hub:
        hub = Hub(config)
        await hub.__aenter__()
        hubs.append(hub)
        return hub

    yield start
    for hub in reversed(hubs):
        await asyncio.wait_for(hub.stop(), 60)


@pytest.fixture
def hub_processes() -> Iterator[list[HubProcess]]:
    """`babelhub run` processes a test starts (append them); each is killed at the end of the test."""
    processes: list[HubProcess] = []
    yield processes
    for process in processes:
        process.stop()
