"""End-to-end benchmark of the hub, with its baselines measured in the same run.

(a) Durable ingest: webhooks/s the hub accepts (verified, recorded in JetStream, answered 200) against a
    bare aiohttp handler that only publishes the body to JetStream. Target ratio ≥ 0.8.
(b) The whole path: webhook → hub → processor app on NATS → hub → fake Telegram Bot API. Throughput at
    a high offered load, then p50/p99 latency at half that load. Targets: ≥ 2,000 msg/s, p99 ≤ 50 ms.
    Its floor, measured in the same run: the same path with no hub logic (bench/floor_server.py: webhook
    → JetStream publish → push consumer → core publish to the same processor app → its reply → HTTP
    POST to the fake API). Targets: hub throughput ≥ 0.6 of the floor's, hub CPU ≤ 0.5 ms per message.
(c) One conversation, 5,000 messages through the whole path: hub CPU and bytes written to JetStream per
    message for messages 1-500 against 4,501-5,000. Target: the later messages cost at most 1.2 times the
    first. Bytes of the streams are read from their state before and after; the conversations bucket
    keeps one revision per key, so what is written to it is counted on the wire instead (a core-NATS
    subscriber on its subjects sees every write).

Every part is a separate process on 127.0.0.1 (nats-server, the hub, the baseline server, the fake API,
the processor); this process only generates load. Requests are bounded in count and time.

    python bench/e2e_bench.py [--requests 4000] [--seconds 6] [--parts abc] [--messages 5000] [--profile FILE]

`--profile FILE` samples the hub with py-spy during (b)'s saturating phase and writes its collapsed
stacks (py-spy's `raw` format) to FILE; `bench/profile_summary.py FILE` sums them per module.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from babelhub.canonical import conversation_id
from babelhub.services.broker import EmbeddedServer, free_port
from babelhub.services.publisher import header_block_size

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "123456:BENCH"
SECRET = "bench-secret"
TENANT = "bench"
PREFIX = "bench"
FLOOR_PREFIX = "floor"
CHATS = 200


def update(n: int, text: str) -> bytes:
    chat = 10_000 + n % CHATS
    return json.dumps({
        "update_id": n,
        "message": {"message_id": n, "date": int(time.time()), "text": text,
                    "from": {"id": chat, "is_bot": False, "first_name": "Load"},
                    "chat": {"id": chat, "type": "private", "first_name": "Load"}},
    }).encode()


@contextmanager
def process(*args: str, ready: bool = True) -> Iterator[subprocess.Popen[bytes]]:
    """A child process, waited for until it prints "ready" (when asked), killed on the way out. Its output
    is read to the end by a thread (a pipe nobody reads would block a chatty child) and its last lines
    are shown if the bench fails."""
    child = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    assert child.stdout is not None
    lines: deque[bytes] = deque(maxlen=40)
    try:
        if ready:
            for line in child.stdout:
                lines.append(line)
                if b"ready" in line or b"babelhub is running" in line:
                    break
            else:
                raise RuntimeError(f"{args[0]} exited before it was ready: {b''.join(lines).decode(errors='replace')}")
        threading.Thread(target=lines.extend, args=(child.stdout,), daemon=True).start()
        yield child
    except BaseException:
        print(f"--- last output of {args[-1] if args[0] == '-m' else args[0]}:\n"
              + b"".join(lines).decode(errors="replace"), file=sys.stderr)
        raise
    finally:
        child.kill()
        child.wait()


async def wait_http(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            try:
                async with session.get(url) as response:
                    if response.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


async def flood(url: str, bodies: list[bytes], concurrency: int) -> float:
    """POST every body, `concurrency` at a time; the rate at which they were accepted (all must be 200)."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    headers = {"Content-Type": "application/json", "X-Telegram-Bot-Api-Secret-Token": SECRET}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{url} answered {response.status}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(bodies) / (time.perf_counter() - started)


async def offered_load(url: str, rate: float, seconds: float, first: int) -> dict[str, float]:
    """Send webhooks at a fixed rate (open loop) for `seconds`; the texts carry their send time."""
    headers = {"Content-Type": "application/json", "X-Telegram-Bot-Api-Secret-Token": SECRET}
    total = int(rate * seconds)
    sent: dict[str, float] = {}
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(n: int) -> None:
            text = f"load {n}"
            sent[text] = time.time()
            async with session.post(url, data=update(n, text), headers=headers) as response:
                await response.read()

        started = time.perf_counter()
        tasks = []
        for i in range(total):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(first + i), name=f"load-{i}"))
        await asyncio.gather(*tasks)
    return sent


async def collect(fake_url: str, sent: dict[str, float], timeout: float) -> tuple[list[float], float]:
    """Latencies (ms) of the texts that reached the fake API, and the delivered rate."""
    deadline = time.time() + timeout
    arrivals: dict[str, float] = {}
    async with aiohttp.ClientSession() as session:
        while time.time() < deadline:
            async with session.get(fake_url + "/stats") as response:
                arrivals = {text: at for text, at in json.loads(await response.text()) if text in sent}
            if len(arrivals) >= len(sent):
                break
            await asyncio.sleep(0.25)
        async with session.post(fake_url + "/reset") as response:
            await response.read()
    latencies = sorted((arrivals[text] - sent[text]) * 1000 for text in arrivals)
    span = (max(arrivals.values()) - min(sent.values())) if arrivals else 1.0
    return latencies, len(arrivals) / span


class CpuMeter:
    """CPU seconds used by some processes, and how busy the whole machine was, between start and stop
    (Linux /proc): shows what bounds the throughput on the machine the bench runs on."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.ticks = os.sysconf("SC_CLK_TCK")

    def _process_seconds(self, pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / self.ticks  # utime + stime, after the command name

    @staticmethod
    def _machine() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values) - idle, sum(values)

    def start(self) -> None:
        self.started = time.perf_counter()
        self.before = {name: self._process_seconds(pid) for name, pid in self.pids.items()}
        self.machine_before = self._machine()

    def stop(self) -> tuple[dict[str, float], float]:
        """Seconds of CPU per process, and the machine's busy fraction over all its cores."""
        used = {name: self._process_seconds(pid) - self.before[name] for name, pid in self.pids.items()}
        busy, total = (now - then for now, then in zip(self._machine(), self.machine_before, strict=True))
        return used, busy / total if total else float("nan")


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(fraction * len(values)))]


class Options(argparse.Namespace):
    requests: int
    seconds: float
    concurrency: int
    parts: str
    messages: int
    profile: str


async def run(options: Options) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        nats_server = EmbeddedServer(Path(tmp) / "nats", port=0)
        await nats_server.start()
        try:
            assert nats_server.process is not None
            await measure(nats_server.url, nats_server.process.pid, Path(tmp), options)
        finally:
            await nats_server.stop()


async def measure(nats_url: str, nats_pid: int, tmp: Path, options: Options) -> None:
    requests, seconds, concurrency = options.requests, options.seconds, options.concurrency
    fake_port, hub_port, base_port, floor_port = free_port(), free_port(), free_port(), free_port()
    config = tmp / "hub.toml"
    config.write_text(f"""
[hub]
http = "127.0.0.1:{hub_port}"
nats = "{nats_url}"
subject_prefix = "{PREFIX}"
log_level = "warning"
[[tenants]]
id = "{TENANT}"
[[connections]]
id = "tg"
tenant = "{TENANT}"
channel = "telegram"
api_base = "http://127.0.0.1:{fake_port}"
secrets = {{ bot_token = "{TOKEN}", secret_token = "{SECRET}" }}
max_rate = 0  # the fake API has no limit: measure the hub, not Telegram's pace of 30 calls/s
""")
    hub_url = f"http://127.0.0.1:{hub_port}/webhooks/telegram/tg"
    base_url = f"http://127.0.0.1:{base_port}/webhooks/telegram/tg"
    with (
        process("bench/fake_telegram.py", "--port", str(fake_port)) as fake_api,
        process("bench/baseline_server.py", "--nats", nats_url, "--port", str(base_port), "--subject",
                f"{PREFIX}.{TENANT}.raw.baseline.tg"),
        process("-m", "babelhub", "run", "--config", str(config)) as hub_process,
        process("bench/processor.py", "--nats", nats_url, "--prefix", PREFIX, "--tenant", TENANT) as app,
        process("bench/floor_server.py", "--nats", nats_url, "--port", str(floor_port), "--prefix", FLOOR_PREFIX,
                "--tenant", TENANT, "--api-base", f"http://127.0.0.1:{fake_port}", "--token", TOKEN) as floor,
        process("bench/processor.py", "--nats", nats_url, "--prefix", FLOOR_PREFIX, "--tenant", TENANT),
    ):
        meter = CpuMeter({"hub": hub_process.pid, "processor app": app.pid, "nats-server": nats_pid,
                          "fake channel API": fake_api.pid, "load generator": os.getpid()})
        await wait_http(f"http://127.0.0.1:{hub_port}/readyz")
        print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; every process on 127.0.0.1")
        fake = f"http://127.0.0.1:{fake_port}"
        if "c" in options.parts:  # first: the hub has seen nothing else yet
            await one_long_conversation(hub_url, fake, nats_url, hub_process.pid, options.messages)
        if "a" not in options.parts and "b" not in options.parts:
            return

        # (a) durable ingest vs a bare publish-to-JetStream handler, alternating, best of 3 each.
        warm = [update(n, "warm") for n in range(1, 301)]
        await flood(base_url, warm, concurrency)
        await flood(hub_url, warm, concurrency)
        await asyncio.sleep(2)
        next_id = 1000
        if "a" in options.parts:
            next_id = await durable_ingest(base_url, hub_url, requests, concurrency, next_id)
        await settle(fake, hub_process.pid)

        if "b" not in options.parts:
            return
        # (b) the whole path: saturate to find throughput, then latency at half of it.
        meter.start()
        with profiled(hub_process.pid, options.profile):
            sent = await offered_load(hub_url, 3000, seconds, next_id)
            next_id += len(sent)
            latencies, throughput = await collect(fake, sent, timeout=60)
        used, machine_busy = meter.stop()
        delivered = len(latencies)
        print("(b) webhook → hub → processor (NATS) → hub → channel API")
        print(f"    offered 3000 msg/s for {seconds:.0f}s: delivered {delivered}/{len(sent)}, "
              f"throughput {throughput:.0f} msg/s   (target ≥ 2,000: {'met' if throughput >= 2000 else 'NOT met'})")
        print("    CPU per delivered message: " + ", ".join(
            f"{name} {seconds_used * 1000 / max(delivered, 1):.2f} ms" for name, seconds_used in used.items()))
        hub_ms = used["hub"] * 1000 / max(delivered, 1)
        print(f"    → one hub process on one core caps near {1000 / hub_ms:.0f} msg/s; "
              f"the machine ({os.cpu_count()} cores) was {machine_busy:.0%} busy")
        floor_url = f"http://127.0.0.1:{floor_port}/webhooks/telegram/tg"
        await settle(fake, hub_process.pid)  # the floor shares the machine: not with the hub's backlog
        floor_rate, floor_ms = await floor_path(floor_url, fake, floor.pid, seconds, next_id)
        next_id += int(3000 * seconds)
        print(f"    floor (the same path with no hub logic, bench/floor_server.py): {floor_rate:.0f} msg/s, "
              f"{floor_ms:.2f} ms of CPU per message in its relay process")
        print(f"    → hub/floor throughput {throughput / floor_rate:.2f} (target ≥ 0.6: "
              f"{'met' if throughput / floor_rate >= 0.6 else 'NOT met'}); hub CPU {hub_ms:.2f} ms/msg "
              f"(target ≤ 0.5: {'met' if hub_ms <= 0.5 else 'NOT met'})")
        await settle(fake, hub_process.pid)
        half = max(50.0, throughput / 2)
        sent = await offered_load(hub_url, half, seconds, next_id)
        latencies, _ = await collect(fake, sent, timeout=60)
        p50, p99 = percentile(latencies, 0.50), percentile(latencies, 0.99)
        print(f"    at half load ({half:.0f} msg/s): p50 {p50:.1f} ms, p99 {p99:.1f} ms, mean "
              f"{statistics.fmean(latencies) if latencies else float('nan'):.1f} ms   "
              f"(target p99 ≤ 50 ms: {'met' if p99 <= 50 else 'NOT met'})")
        rtt = await nats_round_trip(nats_url)
        print(f"    baseline: bare NATS request/reply round trip p50 {rtt:.2f} ms")


async def durable_ingest(base_url: str, hub_url: str, requests: int, concurrency: int, next_id: int) -> int:
    """(a): the bare handler and the hub alternately, best of 3 each; the next free update id."""
    base_rates, hub_rates = [], []
    for _ in range(3):
        bodies = [update(n, f"ingest {n}") for n in range(next_id, next_id + requests)]
        next_id += requests
        base_rates.append(await flood(base_url, bodies, concurrency))
        hub_rates.append(await flood(hub_url, bodies, concurrency))
        await asyncio.sleep(2)  # let the hub drain what it accepted before the next round
    base, hub = max(base_rates), max(hub_rates)
    print("(a) durable webhook ingest")
    print(f"    bare aiohttp + JetStream publish  {base:8.0f} req/s")
    print(f"    babelhub webhook (verify, dedup)  {hub:8.0f} req/s")
    print(f"    ratio                             {hub / base:8.2f}   (target ≥ 0.80: "
          f"{'met' if hub / base >= 0.8 else 'NOT met'})")
    return next_id


async def settle(fake: str, hub_pid: int) -> None:
    """Wait until the hub has worked off what earlier parts gave it (its CPU use falls quiet, at most a
    minute), then clear the fake API's record: (b) must not measure (a)'s backlog."""
    meter = CpuMeter({"hub": hub_pid})
    for _ in range(60):
        meter.start()
        await asyncio.sleep(1)
        used, _ = meter.stop()
        if used["hub"] < 0.05:
            break
    async with aiohttp.ClientSession() as session, session.post(fake + "/reset") as response:
        await response.read()


@contextmanager
def profiled(pid: int, output: str) -> Iterator[None]:
    """Sample `pid` with py-spy (collapsed stacks to `output`) while the block runs; nothing without `output`."""
    if not output:
        yield
        return
    spy = Path(sys.executable).with_name("py-spy")
    sampler = subprocess.Popen([str(spy), "record", "--pid", str(pid), "--format", "raw", "--rate", "200",
                                "--nonblocking", "--output", output], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        sampler.send_signal(2)  # SIGINT: py-spy writes what it sampled and exits
        sampler.wait(timeout=30)


async def floor_path(floor_url: str, fake: str, floor_pid: int, seconds: float, first: int) -> tuple[float, float]:
    """Part (b)'s offered load through the floor: its throughput, and its relay's CPU per message."""
    async with aiohttp.ClientSession() as session, session.post(fake + "/reset") as response:
        await response.read()
    await asyncio.sleep(3)
    meter = CpuMeter({"floor": floor_pid})
    meter.start()
    sent = await offered_load(floor_url, 3000, seconds, first)
    latencies, throughput = await collect(fake, sent, timeout=60)
    used, _ = meter.stop()
    return throughput, used["floor"] * 1000 / max(len(latencies), 1)


LONG_CHAT = 77_777


class WireBytes:
    """Bytes published on some subjects, headers included, as a core-NATS subscriber receives them."""

    def __init__(self) -> None:
        self.bytes = 0

    async def count(self, msg: Any) -> None:
        self.bytes += len(msg.data) + header_block_size(msg.headers)


async def stored_bytes(js: Any) -> int:
    """Bytes the streams the hub writes messages to hold now (raw records, envelopes, statuses)."""
    return sum([(await js.stream_info(f"{PREFIX.upper()}_{role}")).state.bytes
                for role in ("RAW", "MESSAGES", "STATUSES")])


async def one_long_conversation(hub_url: str, fake: str, nats_url: str, hub_pid: int, messages: int) -> None:
    """(c) `messages` webhooks of one chat, all answered; the first and the last 500 are measured."""
    import nats

    window = min(500, messages // 2)
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        bucket = WireBytes()
        await nc.subscribe(f"$KV.{PREFIX}_conversations.>", cb=bucket.count)
        await deliver(hub_url, fake, 1, 200, chat=LONG_CHAT + 1)  # warm the hub up on another chat first
        first_window = await measured_window(hub_url, fake, js, nc, bucket, hub_pid, 1, window)
        if messages - window > window:
            await deliver(hub_url, fake, window + 1, messages - window)
        last_window = await measured_window(hub_url, fake, js, nc, bucket, hub_pid, messages - window + 1, messages)
        print(f"(c) one conversation, {messages} messages: webhook → hub → processor (NATS) → hub → channel API")
        print("    messages        hub CPU/msg   streams B/msg   conversations bucket B/msg")
        for first, cpu, streams, kv in (first_window, last_window):
            print(f"    {first:>5}-{first + window - 1:<5}     {cpu:8.2f} ms   {streams:10.0f}      {kv:10.0f}")
        cpu_ratio = last_window[1] / first_window[1]
        bytes_ratio = sum(last_window[2:]) / sum(first_window[2:])
        bucket_kv = await js.key_value(f"{PREFIX}_conversations")
        snapshot = await bucket_kv.get(f"{TENANT}.{conversation_id(TENANT, 'tg', str(LONG_CHAT))}")
        print(f"    (hub CPU: median of five runs of 100 messages each; the conversation's snapshot is now "
              f"{len(snapshot.value or b''):,} bytes)")
        print(f"    ratio last/first: hub CPU {cpu_ratio:.2f}, bytes written {bytes_ratio:.2f}   "
              f"(target ≤ 1.2: {'met' if max(cpu_ratio, bytes_ratio) <= 1.2 else 'NOT met'})")
    finally:
        await nc.drain()


async def measured_window(hub_url: str, fake: str, js: Any, nc: Any, bucket: WireBytes, hub_pid: int,
                          first: int, last: int) -> tuple[int, float, float, float]:
    """Messages `first`..`last` of the long chat, in runs of 100: the median hub CPU per message of the runs
    (the machine is shared: a run slowed by a neighbour does not move it), and the bytes per message
    written to the streams and to the conversations bucket."""
    meter = CpuMeter({"hub": hub_pid})
    streams_before, bucket_before = await stored_bytes(js), bucket.bytes
    cpu_per_message = []
    for start in range(first, last + 1, 100):
        end = min(start + 99, last)
        meter.start()
        await deliver(hub_url, fake, start, end)
        used, _ = meter.stop()
        cpu_per_message.append(used["hub"] * 1000 / (end - start + 1))
    await nc.flush()
    count = last - first + 1
    return (first, statistics.median(cpu_per_message), (await stored_bytes(js) - streams_before) / count,
            (bucket.bytes - bucket_before) / count)


async def deliver(hub_url: str, fake: str, first: int, last: int, concurrency: int = 8, chat: int = LONG_CHAT) -> None:
    """Post messages `first`..`last` of one chat and wait until every answer reached the channel API."""
    bodies = [long_chat_update(n, chat) for n in range(first, last + 1)]
    await flood(hub_url, bodies, concurrency)
    expected = {f"long {n}" for n in range(first, last + 1)}
    async with aiohttp.ClientSession() as session:
        for _ in range(1200):
            async with session.get(fake + "/stats") as response:
                arrived = {text for text, _ in json.loads(await response.text())}
            if expected <= arrived:
                break
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError(f"only {len(expected & arrived)} of {len(expected)} answers arrived")
        async with session.post(fake + "/reset") as response:
            await response.read()


def long_chat_update(n: int, chat: int) -> bytes:
    """A message of `chat` dated now, as a chat in full flow sends them."""
    return json.dumps({
        "update_id": chat * 100_000 + n,
        "message": {"message_id": n, "date": int(time.time()), "text": f"long {n}",
                    "from": {"id": chat, "is_bot": False, "first_name": "Long"},
                    "chat": {"id": chat, "type": "private", "first_name": "Long"}},
    }).encode()


async def nats_round_trip(nats_url: str) -> float:
    import nats

    nc = await nats.connect(nats_url)
    try:
        async def echo(msg: Any) -> None:
            await msg.respond(msg.data)

        await nc.subscribe("bench.rtt", cb=echo)
        samples = []
        for _ in range(500):
            started = time.perf_counter()
            await nc.request("bench.rtt", b"x", timeout=2)
            samples.append((time.perf_counter() - started) * 1000)
        return statistics.median(samples)
    finally:
        await nc.drain()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="webhooks per ingest round")
    parser.add_argument("--seconds", type=float, default=6.0, help="duration of each offered-load phase")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--parts", default="abc", help="which parts to run (a, b, c)")
    parser.add_argument("--messages", type=int, default=5000, help="messages of the one conversation of (c)")
    parser.add_argument("--profile", default="", help="write py-spy's collapsed stacks of the hub during (b) here")
    uvloop.run(run(parser.parse_args(namespace=Options())))


if __name__ == "__main__":
    main()
