"""A real redis-server for tests (Debian's `redis-server`, which `make test` installs when missing), on a
free port of 127.0.0.1: per test module through the `redis_server` fixture (conftest.py), or per test
with `started_redis`; killed and started again on the same port on demand."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import redis.asyncio
import redis.exceptions

from babelhub.services.broker import free_port

__all__ = ["RedisServer", "started_redis"]

_START_TRIES = 5
_READY_SECONDS = 15.0


class RedisServer:
    """One `redis-server` process in `directory`. `password`: it requires one (`requirepass`). `durable`:
    an append-only file fsynced before each answer, so that a killed server started again (`restart`) has
    every write it acknowledged; otherwise nothing is kept."""

    def __init__(self, directory: Path, *, password: str = "", durable: bool = False) -> None:
        self.directory = directory
        self.password = password
        self.durable = durable
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        credentials = f":{self.password}@" if self.password else ""
        return f"redis://{credentials}127.0.0.1:{self.port}/0"

    def client(self) -> redis.asyncio.Redis:
        return redis.asyncio.from_url(self.url)

    async def start(self) -> RedisServer:
        """Start on a free port (another process may take it between the pick and the bind: then on
        another), or on the port it had, after `kill`."""
        if self.port:
            self._launch()
            if await self._ready():
                return self
            raise RuntimeError(f"redis-server did not start again on port {self.port}: {self._log()}")
        for _ in range(_START_TRIES):
            self.port = free_port()
            self._launch()
            if await self._ready():
                return self
            self.kill()
        raise RuntimeError(f"redis-server did not start: {self._log()}")

    def _launch(self) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed: `make test` installs it (apt-get install redis-server)")
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        command = [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--daemonize", "no",
                   "--dir", str(self.directory), *persistence]
        command += ["--requirepass", self.password] if self.password else []
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    async def _ready(self) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _READY_SECONDS
        client = self.client()
        try:
            while loop.time() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    return False
                try:
                    if await client.ping():
                        return True
                except (redis.exceptions.ConnectionError, OSError):
                    await asyncio.sleep(0.05)
            return False
        finally:
            await client.aclose()

    def _log(self) -> str:
        return (self.directory / "redis.log").read_text(errors="replace")[-2000:]

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is flushed beyond what was already written."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    async def restart(self) -> None:
        """A new server on the same port (and directory)."""
        self.kill()
        await self.start()


async def started_redis(tmp_path: Path, *, password: str = "", durable: bool = False) -> RedisServer:
    """A running `redis-server` under `tmp_path`; the caller kills it (`kill`) when done."""
    return await RedisServer(tmp_path / "redis", password=password, durable=durable).start()
