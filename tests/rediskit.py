"""A real redis-server for tests (Debian's `redis-server`, which `make test` installs when missing): one
per test module through the `redis_server` fixture (conftest.py), on a free port of 127.0.0.1, with
nothing saved to disk."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from pathlib import Path

import redis.asyncio
import redis.exceptions

__all__ = ["RedisServer"]

_START_TRIES = 5
_READY_SECONDS = 10.0


class RedisServer:
    """`redis-server --port <p> --bind 127.0.0.1 --save "" --appendonly no --daemonize no`, in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.asyncio.Redis:
        return redis.asyncio.from_url(self.url)

    async def start(self) -> None:
        """Start on a free port; another process may take the port between the pick and the bind, so a
        server that exits at once is started again on another."""
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed: `make test` installs it (apt-get install redis-server)")
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(_START_TRIES):
            self._launch(executable, _free_port())
            if await self._ready():
                return
            self.stop()
        raise RuntimeError(f"redis-server did not start: {(self.directory / 'redis.log').read_text(errors='replace')}")

    def _launch(self, executable: str, port: int) -> None:
        self.port = port
        with (self.directory / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--daemonize", "no", "--dir", str(self.directory)],
                stdout=log, stderr=subprocess.STDOUT)

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

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
