"""A real `redis-server` for tests: on a free port of 127.0.0.1, killed and started again on demand."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from pathlib import Path

import redis.asyncio as aioredis


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RedisServer:
    """One `redis-server` process. `durable`: an append-only file fsynced before each answer, so that a
    killed server started again (`restart`) has every write it acknowledged; else nothing is kept."""

    def __init__(self, directory: Path, *, password: str = "", durable: bool = False) -> None:
        self.directory = directory
        self.port = free_port()
        self.password = password
        self.durable = durable
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        credentials = f":{self.password}@" if self.password else ""
        return f"redis://{credentials}127.0.0.1:{self.port}/0"

    def client(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.url)

    async def start(self) -> RedisServer:
        self._spawn()
        await self._wait_ready()
        return self

    def _spawn(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--daemonize", "no",
                   "--dir", str(self.directory), *persistence]
        command += ["--requirepass", self.password] if self.password else []
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    async def _wait_ready(self, timeout: float = 15.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        client = self.client()
        try:
            while True:
                assert self.process is not None and self.process.poll() is None, "redis-server exited"
                try:
                    if await client.ping():
                        return
                except Exception:
                    if loop.time() > deadline:
                        raise
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is flushed beyond what was already written."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    async def restart(self) -> None:
        """A new server on the same port (and directory)."""
        self.kill()
        await self.start()


async def started_redis(tmp_path: Path, *, password: str = "", durable: bool = False) -> RedisServer:
    """A running `redis-server` under `tmp_path`; the caller kills it (`kill`) when done."""
    return await RedisServer(tmp_path / "redis", password=password, durable=durable).start()
