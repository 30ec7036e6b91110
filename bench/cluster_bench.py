"""Scale bench: 1, 2 and 3 hub processes on one subject prefix against a 3-node NATS cluster on this machine.

A 3-node NATS cluster (`LocalCluster`, free ports, JetStream) is started once. For each number of hubs N,
N `babelhub run` processes are started on a fresh subject prefix with `hub.replicas = 3`, with one
processor app (bench/processor.py: it answers every inbound message with its text) and the fake Telegram
Bot API (bench/fake_telegram.py). Webhooks are posted round-robin to every hub's endpoint, from `--chats`
chats spread over `--connections` Telegram bots (a connection's raw records are decoded by the owner of
its partition, so decoding is spread over the hubs too). Per N it prints:

- throughput: answers that reached the fake API per second, with `--in-flight` messages in flight end to
  end (closed loop: a new webhook whenever an answer arrives), measured for `--seconds` after a ramp;
- latency: webhook accepted (answered 200) → the answer's sendMessage at the fake API, p50 and p99, at an
  open-loop load of half that throughput;
- CPU per delivered message of the hubs (summed), of the 3 nats-servers (summed), of the app, of the fake
  API and of this process (the load generator), from /proc/<pid>/stat, during the throughput phase; and
  the cores the hubs and the nats-servers use with no traffic at all (lease rounds, heartbeats).

Then the failover: with the 3 hubs under a steady open-loop load, one hub is killed with SIGKILL. Its
partitions are read from its `/readyz` just before; the bench prints the time from the kill to the first
answer delivered for a conversation in one of those partitions, to the survivors holding every partition,
and to every moved partition delivering again, then whether every message accepted meanwhile was answered.

The 1-hub run is the same-run baseline of the 2- and 3-hub figures. Every process is on 127.0.0.1 and every
phase is bounded in time; everything started is stopped at the end, also on Ctrl-C.

    python bench/cluster_bench.py [--hubs 1,2,3] [--seconds 10] [--in-flight 240] [--chats 300]
                                  [--connections 6] [--failover-seconds 20] [--no-failover] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
import uvloop
from e2e_bench import CpuMeter, percentile, process

from babelhub.canonical import conversation_id
from babelhub.services.broker import die_with_parent, free_port
from babelhub.services.config import HubSettings
from babelhub.services.localcluster import LocalCluster
from babelhub.services.ownership import partition_of

ROOT = Path(__file__).resolve().parents[1]
TENANT = "bench"
SECRET = "bench-secret"
REPLICAS = 3
FIRST_CHAT = 10_000
POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Traffic:
    """Which chat and connection a message belongs to: chat `n % chats`, connection `chat % connections`."""

    chats: int
    connections: int

    def chat_of(self, n: int) -> int:
        return n % self.chats

    def connection(self, chat: int) -> str:
        return f"tg{chat % self.connections + 1}"

    def conversation(self, chat: int) -> str:
        return conversation_id(TENANT, self.connection(chat), str(FIRST_CHAT + chat))

    def update(self, n: int) -> bytes:
        """Telegram's Update for message `n` (update ids are unique per bot: `n` is unique in the run)."""
        chat = FIRST_CHAT + self.chat_of(n)
        return json.dumps({
            "update_id": n,
            "message": {"message_id": n, "date": int(time.time()), "text": f"cb {n}",
                        "from": {"id": chat, "is_bot": False, "first_name": "Load"},
                        "chat": {"id": chat, "type": "private", "first_name": "Load"}},
        }).encode()


def hub_config(path: Path, prefix: str, fake_port: int, connections: int, options: Options) -> Path:
    """The hubs' TOML: one tenant, `connections` Telegram bots answered by the fake API, replicas = 3."""
    settings = [f'subject_prefix = "{prefix}"', f"replicas = {REPLICAS}", 'log_level = "warning"']
    if "partitions" in HubSettings.__struct_fields__:  # a build with partition ownership
        settings += [f"partitions = {options.partitions}", f"lease_seconds = {options.lease_seconds}"]
    bots = [f"""
[[connections]]
id = "tg{k}"
tenant = "{TENANT}"
channel = "telegram"
api_base = "http://127.0.0.1:{fake_port}"
secrets = {{ bot_token = "{100_000 + k}:BENCH", secret_token = "{SECRET}" }}
max_rate = 0  # the fake API has no limit: measure the hubs, not Telegram's pace
""" for k in range(1, connections + 1)]
    path.write_text("[hub]\n" + "\n".join(settings) + f'\n\n[[tenants]]\nid = "{TENANT}"\n' + "".join(bots))
    return path


class HubProcess:
    """One `babelhub run` process on a free HTTP port, its output in a log file."""

    def __init__(self, index: int, config: Path, servers: str, work_dir: Path) -> None:
        self.name = f"hub{index}"
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = work_dir / f"{self.name}.log"
        self.command = [sys.executable, "-m", "babelhub", "run", "--config", str(config), "--nats", servers,
                        "--http", self.url.removeprefix("http://"), "--data-dir", str(work_dir / self.name)]
        self.child: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.child = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                          preexec_fn=die_with_parent)

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.child is None or self.child.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.tail()}")
            if await self.readiness(session) is not None:
                return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"{self.name} was not ready within {timeout:.0f}s:\n{self.tail()}")

    async def readiness(self, session: aiohttp.ClientSession) -> dict[str, Any] | None:
        """`/readyz`'s JSON while it answers 200, else None."""
        status, answer = await self.readyz(session)
        return answer if status == 200 else None

    async def readyz(self, session: aiohttp.ClientSession) -> tuple[int, dict[str, Any]]:
        """`/readyz`'s status and JSON (0 and {} when it does not answer)."""
        try:
            async with session.get(self.url + "/readyz", timeout=aiohttp.ClientTimeout(total=2)) as response:
                answer: dict[str, Any] = await response.json(content_type=None)
                return response.status, answer
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return 0, {}

    def kill(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGKILL)
            self.child.wait()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (a graceful stop hands its partitions over), SIGKILL if it takes longer than `timeout`."""
        if self.child is None or self.child.poll() is not None:
            return
        self.child.terminate()
        try:
            self.child.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Arrivals:
    """Answers that reached the fake API (their texts name the message), polled from its `/stats`."""

    def __init__(self, session: aiohttp.ClientSession, fake_url: str) -> None:
        self.session = session
        self.fake_url = fake_url
        self.first: dict[int, float] = {}
        self.copies: Counter[int] = Counter()
        self.cursor = 0

    async def follow(self) -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError):  # a poll that fails is made again
                await self.poll()
            await asyncio.sleep(POLL_SECONDS)

    async def poll(self) -> None:
        async with self.session.get(f"{self.fake_url}/stats", params={"since": str(self.cursor)}) as response:
            arrived: list[tuple[str, float]] = json.loads(await response.text())
        self.cursor += len(arrived)
        for text, at in arrived:
            kind, _, number = text.partition(" ")
            if kind == "cb" and number.isdigit():
                n = int(number)
                self.first.setdefault(n, at)
                self.copies[n] += 1

    def between(self, start: float, end: float) -> int:
        return sum(1 for at in self.first.values() if start <= at < end)

    async def wait_for(self, numbers: list[int], timeout: float) -> list[int]:
        """Wait until every message of `numbers` was answered (or `timeout`); those still missing."""
        deadline = time.monotonic() + timeout
        missing = [n for n in numbers if n not in self.first]
        while missing and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            missing = [n for n in missing if n not in self.first]
        return missing


class Load:
    """Posts Telegram webhooks round-robin to the live hubs; a hub that refuses or is gone is skipped for
    the next one, as a channel retries. Notes when each message was accepted."""

    def __init__(self, session: aiohttp.ClientSession, traffic: Traffic, hubs: list[HubProcess], first: int) -> None:
        self.session = session
        self.traffic = traffic
        self.live = [hub.url for hub in hubs]
        self.accepted: dict[int, float] = {}
        self.refused = 0
        self.next = first
        self.turn = 0
        self.tasks: set[asyncio.Task[None]] = set()

    def drop(self, url: str) -> None:
        self.live.remove(url)

    def send(self) -> int:
        """Post the next message in the background; its number."""
        n, self.next = self.next, self.next + 1
        task = asyncio.create_task(self._post(n))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return n

    async def settle(self) -> None:
        """Wait for the posts still under way."""
        if self.tasks:
            await asyncio.gather(*list(self.tasks))

    async def _post(self, n: int, give_up_after: float = 10.0) -> None:
        body = self.traffic.update(n)
        path = f"/webhooks/telegram/{self.traffic.connection(self.traffic.chat_of(n))}"
        headers = {"Content-Type": "application/json", "X-Telegram-Bot-Api-Secret-Token": SECRET}
        deadline = time.monotonic() + give_up_after
        while time.monotonic() < deadline:
            self.turn += 1
            url = self.live[self.turn % len(self.live)]
            try:
                async with self.session.post(url + path, data=body, headers=headers) as response:
                    await response.read()
                    if response.status == 200:
                        self.accepted[n] = time.time()
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        self.refused += 1


async def closed_loop(load: Load, arrivals: Arrivals, pending: set[int], in_flight: int, seconds: float) -> None:
    """Keep `in_flight` messages sent and not yet answered, for `seconds`; `pending` carries over calls."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pending.difference_update([n for n in pending if n in arrivals.first])
        for _ in range(in_flight - len(pending)):
            pending.add(load.send())
        await asyncio.sleep(0.02)


async def open_loop(load: Load, rate: float, seconds: float) -> list[int]:
    """Send at a fixed rate for `seconds`, whatever the answers do; the messages sent."""
    sent: list[int] = []
    started = time.monotonic()
    for i in range(int(rate * seconds)):
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        sent.append(load.send())
    await load.settle()
    return sent


@dataclass
class Run:
    """The figures of one number of hubs."""

    hubs: int
    throughput: float = float("nan")
    latency_rate: float = float("nan")
    p50: float = float("nan")
    p99: float = float("nan")
    cpu_ms: dict[str, float] = field(default_factory=dict)  # per delivered message, by role
    idle_cores: dict[str, float] = field(default_factory=dict)  # with no traffic, by role
    machine_busy: float = float("nan")
    unanswered: int = 0
    refused: int = 0
    failure: str = ""

    @property
    def whole_path_ms(self) -> float:
        return sum(self.cpu_ms.values())


@dataclass
class Bench:
    """What every run shares: the cluster, the fake API, the options."""

    options: Options
    cluster: LocalCluster
    fake_url: str
    fake_pid: int
    work_dir: Path
    session: aiohttp.ClientSession
    arrivals: Arrivals
    traffic: Traffic
    next_message: int = 1

    def meter(self, hubs: list[HubProcess], app_pid: int) -> CpuMeter:
        pids = {f"hub {hub.name}": hub.pid for hub in hubs}
        pids |= {f"nats {node.server_name}": node_pid(node.process) for node in self.cluster.nodes}
        return CpuMeter(pids | {"app": app_pid, "fake API": self.fake_pid, "load generator": os.getpid()})


def node_pid(child: asyncio.subprocess.Process | None) -> int:
    assert child is not None, "the NATS node is not running"
    return child.pid


@contextlib.contextmanager
def hubs_stopped_after(hubs: list[HubProcess]) -> Iterator[None]:
    try:
        yield
    finally:
        for hub in hubs:
            hub.stop()


def new_hubs(bench: Bench, count: int, prefix: str) -> list[HubProcess]:
    """`count` hubs (not started yet) on `prefix`, with a config and a directory of their own."""
    run_dir = bench.work_dir / prefix
    run_dir.mkdir()
    fake_port = int(bench.fake_url.rsplit(":", 1)[1])
    config = hub_config(run_dir / "hub.toml", prefix, fake_port, bench.traffic.connections, bench.options)
    return [HubProcess(i + 1, config, bench.cluster.servers, run_dir) for i in range(count)]


async def wait_spread(bench: Bench, hubs: list[HubProcess], timeout: float = 45.0) -> str:
    """Wait until every partition has one owner and every hub holds some; a line saying how they are held."""
    partitions = bench.options.partitions
    started = time.monotonic()
    held: list[set[int]] = []
    while time.monotonic() - started < timeout:
        answers = [await hub.readiness(bench.session) for hub in hubs]
        if any(answer is not None and "partitions" not in answer for answer in answers):
            return "partitions: this build's /readyz names none (no partition ownership)"
        held = [set(answer["partitions"]) if answer else set() for answer in answers]
        if all(held) and sum(map(len, held)) == partitions and len(set().union(*held)) == partitions:
            break
        await asyncio.sleep(0.5)
    else:
        states = [f"{hub.name}: {await hub.readyz(bench.session)}" for hub in hubs]
        raise RuntimeError(f"the partitions were not spread over the hubs within {timeout:.0f}s (held: "
                           + ", ".join(str(len(h)) for h in held) + f" of {partitions}); /readyz said:\n"
                           + "\n".join(states))
    return f"partitions spread after {time.monotonic() - started:.1f}s: " + "; ".join(
        spread_line(bench.traffic, hub.name, owned, partitions) for hub, owned in zip(hubs, held, strict=True))


def spread_line(traffic: Traffic, name: str, owned: set[int], partitions: int) -> str:
    chats = sum(partition_of(TENANT, traffic.conversation(c), partitions) in owned for c in range(traffic.chats))
    bots = sum(partition_of(TENANT, f"tg{k}", partitions) in owned for k in range(1, traffic.connections + 1))
    return f"{name} {len(owned)} partitions ({chats} chats, {bots} bots' raw records)"


async def measure(bench: Bench, count: int) -> tuple[Run, list[HubProcess], ExitStack]:
    """One run with `count` hubs; returns the hubs and what stops them and their app, still running."""
    prefix = f"cb{count}"
    run = Run(hubs=count)
    stack = ExitStack()
    hubs = new_hubs(bench, count, prefix)
    stack.enter_context(hubs_stopped_after(hubs))
    try:
        for hub in hubs:  # one after the other: the first makes the streams and buckets
            hub.start()
            await hub.wait_ready(bench.session)
        app = stack.enter_context(process("bench/processor.py", "--nats", bench.cluster.urls[0], "--prefix", prefix,
                                          "--tenant", TENANT))
        print(f"  {await wait_spread(bench, hubs)}", flush=True)
        load = Load(bench.session, bench.traffic, hubs, bench.next_message)
        await warm_up(bench, load)
        await idle_phase(bench, run, bench.meter(hubs, app.pid))
        await throughput_phase(bench, load, run, bench.meter(hubs, app.pid))
        await latency_phase(bench, load, run)
        bench.next_message = load.next
    except BaseException:
        stack.close()
        raise
    return run, hubs, stack


async def warm_up(bench: Bench, load: Load) -> None:
    """One message per chat, all answered: every conversation actor is active before anything is measured."""
    warm = [load.send() for _ in range(bench.traffic.chats)]
    await load.settle()
    missing = await bench.arrivals.wait_for(warm, timeout=90)
    if missing:
        raise RuntimeError(f"warm-up: {len(missing)} of {len(warm)} messages were not answered within 90s")


def by_role(used: dict[str, float]) -> dict[str, float]:
    """CPU seconds of each process summed by role: every hub together, every nats-server together."""
    roles = dict.fromkeys(("hubs", "nats-servers", "app", "fake API", "load generator"), 0.0)
    for name, seconds in used.items():
        roles[{"hub": "hubs", "nats": "nats-servers"}.get(name.split()[0], name)] += seconds
    return roles


async def idle_phase(bench: Bench, run: Run, meter: CpuMeter) -> None:
    """CPU the processes use with no traffic (lease rounds, consumers' and servers' heartbeats), in cores."""
    await asyncio.sleep(1.0)
    meter.start()
    await asyncio.sleep(bench.options.idle_seconds)
    used, _ = meter.stop()
    run.idle_cores = {role: seconds / bench.options.idle_seconds for role, seconds in by_role(used).items()}


async def throughput_phase(bench: Bench, load: Load, run: Run, meter: CpuMeter) -> None:
    options = bench.options
    pending: set[int] = set()
    await closed_loop(load, bench.arrivals, pending, options.in_flight, options.ramp)
    meter.start()
    start = time.time()
    await closed_loop(load, bench.arrivals, pending, options.in_flight, options.seconds)
    end = time.time()
    used, run.machine_busy = meter.stop()
    await bench.arrivals.poll()
    delivered = bench.arrivals.between(start, end)
    run.throughput = delivered / (end - start)
    if not delivered:
        raise RuntimeError("no answer reached the fake API during the throughput phase")
    run.cpu_ms = {role: seconds * 1000 / delivered for role, seconds in by_role(used).items()}
    await load.settle()
    await bench.arrivals.wait_for(sorted(pending), timeout=60)


async def latency_phase(bench: Bench, load: Load, run: Run) -> None:
    run.latency_rate = max(5.0, run.throughput / 2)
    sent = await open_loop(load, run.latency_rate, bench.options.seconds)
    missing = await bench.arrivals.wait_for(sent, timeout=60)
    run.unanswered = sum(1 for n in missing if n in load.accepted)
    run.refused = load.refused
    latencies = sorted((bench.arrivals.first[n] - load.accepted[n]) * 1000
                       for n in sent if n in bench.arrivals.first and n in load.accepted)
    run.p50, run.p99 = percentile(latencies, 0.50), percentile(latencies, 0.99)


def print_run(run: Run) -> None:
    if run.failure:
        print(f"  {run.hubs} hub(s): not measured: {run.failure}", flush=True)
        return
    cpu = ", ".join(f"{role} {ms:.2f}" for role, ms in run.cpu_ms.items())
    print(f"  throughput {run.throughput:.0f} msg/s; at {run.latency_rate:.0f} msg/s p50 {run.p50:.1f} ms, "
          f"p99 {run.p99:.1f} ms; accepted and unanswered {run.unanswered}, refused by every hub {run.refused}",
          flush=True)
    print(f"  CPU ms per delivered message: {cpu} (machine {run.machine_busy:.0%} busy)", flush=True)
    print(f"  idle (after the warm-up, no traffic): hubs {run.idle_cores['hubs']:.2f} cores, nats-servers "
          f"{run.idle_cores['nats-servers']:.2f} cores", flush=True)


# ------------------------------------------------------------------------------------------- failover


@dataclass
class Failover:
    """The figures of one SIGKILL, in seconds after the kill (None: did not happen within the phase)."""

    victim: str = ""
    moved_partitions: int = 0
    moved_chats: int = 0
    moved_bots: int = 0
    covered: float | None = None
    first_moved: float | None = None
    all_moved: float | None = None
    moved_bots_first: float | None = None
    partitions_silent: int = 0
    accepted: int = 0
    refused: int = 0
    unanswered: int = 0
    answered_twice: int = 0
    others_p99: float = float("nan")
    note: str = ""


async def failover(bench: Bench, hubs: list[HubProcess], rate: float) -> Failover:
    """Kill one of `hubs` under a steady load at `rate`; how long its partitions went unserved."""
    options, traffic, arrivals = bench.options, bench.traffic, bench.arrivals
    victim, survivors = hubs[-1], hubs[:-1]
    result = Failover(victim=victim.name)
    load = Load(bench.session, traffic, hubs, bench.next_message)
    sender = asyncio.create_task(open_loop(load, rate, options.before_kill + options.failover_seconds))
    await asyncio.sleep(options.before_kill)
    answer = await victim.readiness(bench.session)
    if answer is None or "partitions" not in answer:
        result.note = "the hub's /readyz names no partitions (no partition ownership in this build)"
        await sender
        return result
    owned = set(answer["partitions"])
    moved_chats = {c for c in range(traffic.chats)
                   if partition_of(TENANT, traffic.conversation(c), options.partitions) in owned}
    moved_bots = {f"tg{k}" for k in range(1, traffic.connections + 1)
                  if partition_of(TENANT, f"tg{k}", options.partitions) in owned}
    killed_at = time.time()
    victim.kill()
    load.drop(victim.url)
    coverage = asyncio.create_task(time_to_cover(bench, survivors, killed_at))
    sent = await sender
    result.covered = await coverage
    bench.next_message = load.next
    missing = await arrivals.wait_for(sent, timeout=60)
    result.moved_partitions, result.moved_chats, result.moved_bots = len(owned), len(moved_chats), len(moved_bots)
    after_kill(result, arrivals, load, sent, killed_at, moved_chats, moved_bots, options.partitions)
    result.accepted, result.refused = len(load.accepted), load.refused
    result.unanswered = sum(1 for n in missing if n in load.accepted)
    result.answered_twice = sum(1 for n in sent if arrivals.copies[n] > 1)
    return result


async def time_to_cover(bench: Bench, survivors: list[HubProcess], killed_at: float,
                        timeout: float = 60.0) -> float | None:
    """Seconds from the kill until the survivors hold every partition between them."""
    while time.time() - killed_at < timeout:
        answers = [(await hub.readyz(bench.session))[1] for hub in survivors]  # also while 503: what it holds
        held: set[int] = set().union(*(answer.get("partitions", []) for answer in answers))
        if len(held) == bench.options.partitions:
            return time.time() - killed_at
        await asyncio.sleep(0.1)
    return None


def after_kill(result: Failover, arrivals: Arrivals, load: Load, sent: list[int], killed_at: float,
               moved_chats: set[int], moved_bots: set[str], partitions: int) -> None:
    """When the moved conversations and bots delivered again, and how the others fared meanwhile."""
    traffic = load.traffic
    # An answer seen this long after the kill cannot come from the killed hub (SIGKILL is immediate).
    after = killed_at + 0.1
    first_by_partition: dict[int, float] = {}
    bot_firsts: list[float] = []
    others: list[float] = []
    for n in sent:
        at = arrivals.first.get(n)
        if at is None or at < after:
            continue
        chat = traffic.chat_of(n)
        if chat in moved_chats:
            partition = partition_of(TENANT, traffic.conversation(chat), partitions)
            first_by_partition[partition] = min(at, first_by_partition.get(partition, at))
        elif traffic.connection(chat) in moved_bots:
            if load.accepted.get(n, 0.0) >= killed_at:  # recorded after the kill: decoded by the new owner
                bot_firsts.append(at)
        elif n in load.accepted and load.accepted[n] >= killed_at:
            others.append((at - load.accepted[n]) * 1000)
    # The moved partitions that had work for the new owner: a message not answered before the kill.
    partitions_with_traffic = {partition_of(TENANT, traffic.conversation(traffic.chat_of(n)), partitions)
                               for n in sent if traffic.chat_of(n) in moved_chats
                               and arrivals.first.get(n, after) >= after}
    result.partitions_silent = len(partitions_with_traffic - set(first_by_partition))
    if first_by_partition:
        result.first_moved = min(first_by_partition.values()) - killed_at
        result.all_moved = max(first_by_partition.values()) - killed_at
    if bot_firsts:
        result.moved_bots_first = min(bot_firsts) - killed_at
    result.others_p99 = percentile(sorted(others), 0.99)


def seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def print_failover(result: Failover, options: Options) -> None:
    if result.note:
        print(f"  failover: not measured: {result.note}", flush=True)
        return
    print(f"  killed {result.victim} (SIGKILL), which held {result.moved_partitions} of {options.partitions} "
          f"partitions ({result.moved_chats} chats' conversations, {result.moved_bots} bots' raw records); "
          f"lease_seconds {options.lease_seconds}", flush=True)
    print(f"  kill → survivors hold every partition: {seconds(result.covered)}", flush=True)
    print(f"  kill → first answer delivered for a conversation of a moved partition: {seconds(result.first_moved)}",
          flush=True)
    print(f"  kill → every moved partition with traffic delivering again: {seconds(result.all_moved)}"
          + (f" ({result.partitions_silent} never did)" if result.partitions_silent else ""), flush=True)
    if result.moved_bots:
        print(f"  kill → first answer to a webhook accepted after the kill for a bot whose raw records moved "
              f"(another chat's conversation): "
              f"{seconds(result.moved_bots_first)}", flush=True)
    print(f"  meanwhile the other conversations: p99 {result.others_p99:.0f} ms (accepted after the kill → answered)",
          flush=True)
    print(f"  accepted during the phase {result.accepted}, unanswered {result.unanswered}, refused by every hub "
          f"{result.refused}, answered twice "
          f"{result.answered_twice} (this app answers every envelope it is handed; it does not deduplicate)",
          flush=True)


# ------------------------------------------------------------------------------------------- summary


def print_summary(runs: list[Run], result: Failover | None, background: float) -> None:
    measured = [run for run in runs if not run.failure]
    if not measured:
        return
    base = next((run for run in measured if run.hubs == 1), measured[0])
    print(f"\nsummary ({os.cpu_count()} cores; machine {background:.0%} busy before the bench started)")
    columns = ["hubs", "msg/s", "vs 1 hub", "p50 ms", "p99 ms", "at msg/s", "CPU ms/msg: hubs", "nats",
               "app", "fake API", "load gen", "all", "machine busy", "idle cores: hubs", "nats"]
    print("  " + "  ".join(columns))
    for run in measured:
        cpu = run.cpu_ms
        cells = [run.hubs, f"{run.throughput:.0f}", f"{ratio(run.throughput, base.throughput):.2f}",
                 f"{run.p50:.1f}", f"{run.p99:.1f}", f"{run.latency_rate:.0f}", f"{cpu['hubs']:.2f}",
                 f"{cpu['nats-servers']:.2f}", f"{cpu['app']:.2f}", f"{cpu['fake API']:.2f}",
                 f"{cpu['load generator']:.2f}", f"{run.whole_path_ms:.2f}", f"{run.machine_busy:.0%}",
                 f"{run.idle_cores['hubs']:.2f}", f"{run.idle_cores['nats-servers']:.2f}"]
        print("  " + "  ".join(f"{cell:>{len(name)}}" for cell, name in zip(cells, columns, strict=True)))
    if result is not None and not result.note:
        print(f"  failover after SIGKILL of 1 of 3 hubs: first moved conversation answered after "
              f"{seconds(result.first_moved)}, every moved partition after {seconds(result.all_moved)}; "
              f"unanswered {result.unanswered}")
    print_model(base, measured)


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when nothing was measured (a run that delivered nothing)."""
    return numerator / denominator if denominator else float("nan")


def print_model(base: Run, measured: list[Run]) -> None:
    hub_ms = base.cpu_ms["hubs"]
    cores = os.cpu_count() or 1
    print("model")
    per_cores = ", ".join(f"{c} core{'s' * (c > 1)}: {ratio(c * 1000, hub_ms):.0f}" for c in (1, 2, 4, 8))
    print(f"  the hubs spent {hub_ms:.2f} ms of CPU per delivered message, all together ({base.hubs}-hub run): "
          f"hubs given C cores of their own deliver about C * {ratio(1000, hub_ms):.0f} msg/s ({per_cores}), "
          "while the NATS cluster, the app and the channel keep up (each needs its own share of cores, at the "
          "rates below).")
    for run in measured:
        cpu = run.cpu_ms
        print(f"  {run.hubs} hub(s) on this {cores}-core machine: per delivered message the hubs spent "
              f"{cpu['hubs']:.2f} ms, the 3 nats-servers {cpu['nats-servers']:.2f}, the app {cpu['app']:.2f}, the "
              f"fake API {cpu['fake API']:.2f}, this load generator {cpu['load generator']:.2f}: "
              f"{run.whole_path_ms:.2f} ms in all, so {cores} shared cores cap near "
              f"{ratio(cores * 1000, run.whole_path_ms):.0f} msg/s; "
              f"measured {run.throughput:.0f} (machine {run.machine_busy:.0%} busy). With no traffic the "
              f"nats-servers already use {run.idle_cores['nats-servers']:.2f} cores and the hubs "
              f"{run.idle_cores['hubs']:.2f}.")


# ------------------------------------------------------------------------------------------- main


class Options(argparse.Namespace):
    hubs: str
    seconds: float
    idle_seconds: float
    ramp: float
    in_flight: int
    chats: int
    connections: int
    partitions: int
    lease_seconds: float
    failover: bool
    failover_seconds: float
    before_kill: float
    failover_load: float
    quick: bool


async def machine_busy(sample: float = 1.0) -> float:
    """How busy the machine's cores are (all processes), over `sample` seconds."""
    meter = CpuMeter({})
    meter.start()
    await asyncio.sleep(sample)
    return meter.stop()[1]


async def run_all(options: Options) -> None:
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)  # stop everything, as Ctrl-C
    background = await machine_busy()
    counts = [int(n) for n in options.hubs.split(",")]
    traffic = Traffic(options.chats, options.connections)
    print(f"cluster bench: {os.cpu_count()} cores, Python {sys.version.split()[0]}, machine {background:.0%} busy "
          f"before start; 3 nats-servers (replicas {REPLICAS}), {traffic.chats} chats over {traffic.connections} "
          f"bots, {options.in_flight} in flight, {options.seconds:.0f} s per phase; all on 127.0.0.1", flush=True)
    with tempfile.TemporaryDirectory(prefix="cluster-bench-") as tmp:
        cluster = LocalCluster(Path(tmp) / "nats", size=3)
        fake_port = free_port()
        try:
            await cluster.start()
            with process("bench/fake_telegram.py", "--port", str(fake_port)) as fake:
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=128)) as session:
                    fake_url = f"http://127.0.0.1:{fake_port}"
                    arrivals = Arrivals(session, fake_url)
                    follower = asyncio.create_task(arrivals.follow())
                    bench = Bench(options, cluster, fake_url, fake.pid, Path(tmp), session, arrivals, traffic)
                    try:
                        runs, result = await every_run(bench, counts)
                    finally:
                        follower.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await follower
            print_summary(runs, result, background)
        finally:
            await cluster.stop()


async def forget_run(servers: list[str], prefix: str) -> None:
    """Delete the streams and buckets of a finished run: an R3 stream or consumer left in the cluster costs
    the servers CPU even when idle, and would weigh on the next run's figures."""
    nc = await nats.connect(servers=servers)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            name = info.config.name or ""
            if name.startswith((f"{prefix.upper()}_", f"KV_{prefix}_")):
                await js.delete_stream(name)
    finally:
        await nc.close()


async def every_run(bench: Bench, counts: list[int]) -> tuple[list[Run], Failover | None]:
    runs: list[Run] = []
    result = None
    for count in counts:
        print(f"{count} hub(s) on one subject prefix", flush=True)
        try:
            run, hubs, stack = await measure(bench, count)
        except (RuntimeError, TimeoutError) as exc:
            runs.append(Run(hubs=count, failure=str(exc)))
            print_run(runs[-1])
            await forget_run(bench.cluster.urls, f"cb{count}")
            continue
        try:
            with stack:
                runs.append(run)
                print_run(run)
                if bench.options.failover and count == max(counts) and count >= 2:
                    rate = bench.options.failover_load * run.throughput
                    print(f"failover: {count} hubs under {rate:.0f} msg/s", flush=True)
                    result = await failover(bench, hubs, max(rate, 5.0))
                    print_failover(result, bench.options)
        finally:
            await forget_run(bench.cluster.urls, f"cb{count}")
    return runs, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hubs", default="1,2,3", help="the numbers of hub processes to run, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each measured phase")
    parser.add_argument("--ramp", type=float, default=2.0, help="closed-loop seconds before throughput is measured")
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="CPU measured with no traffic")
    parser.add_argument("--in-flight", type=int, default=240, help="messages in flight in the throughput phase")
    parser.add_argument("--chats", type=int, default=300)
    parser.add_argument("--connections", type=int, default=6, help="Telegram bots the chats are spread over")
    parser.add_argument("--partitions", type=int, default=16, help="hub.partitions")
    parser.add_argument("--lease-seconds", type=float, default=6.0, help="hub.lease_seconds")
    parser.add_argument("--no-failover", dest="failover", action="store_false", help="skip the kill -9 part")
    parser.add_argument("--failover-seconds", type=float, default=20.0, help="load after the kill")
    parser.add_argument("--before-kill", type=float, default=3.0, help="load before the kill")
    parser.add_argument("--failover-load", type=float, default=0.3,
                        help="the failover load, as a fraction of the largest run's throughput")
    parser.add_argument("--quick", action="store_true", help="short phases and fewer chats: a smoke run")
    options = parser.parse_args(namespace=Options())
    if options.quick:
        options.seconds, options.ramp, options.chats = 4.0, 1.0, 120
        options.in_flight, options.failover_seconds = 120, 15.0
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(run_all(options))


if __name__ == "__main__":
    main()
