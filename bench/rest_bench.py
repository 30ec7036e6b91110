"""Benchmark of the REST API of issue 12, with its baseline measured in the same run.

Every phase is a closed loop: `--clients` clients, each sending its next request when the last one was
answered, for `--seconds`, after a short warm-up. Phases:

    baseline            GET /v1/messages/{id} from a bare aiohttp handler doing one NATS KV get of the same
                        key on the same nats-server (bench/rest_baseline_server.py): the least it costs
    message, config key GET /v1/messages/{id} (a message's status history) with a key of the config file
    message, stored key the same with a key made at run time (`bh_<id>_<secret>`: one KV read to check it)
    conversation page   GET /v1/conversations/{id}/messages?limit=50, a conversation of ~`--history` messages
    conversation list   GET /v1/conversations?limit=50, a tenant with `--conversations` conversations
    default limit       GET /v1/messages/{id} by a second tenant left at the default rate limit
                        (`hub.requests_per_second`, 50/s, burst 100, spent in the warm-up): requests
                        admitted a second against those offered, and the share answered 429

The bench's tenant has `requests_per_second = 0` (no limit), so the limiter does not cap the other phases.
Its conversations are made first through the whole path (Telegram webhooks → hub → the processor app of
bench/processor.py, which answers each → hub → a fake Bot API), so half of a conversation's messages are
inbound and half outbound (with statuses). Every part is a separate process on 127.0.0.1 (nats-server, the
hub, the baseline server, the fake API, the app); this process only generates load. The bench prints
requests/s, p50/p99 and the CPU the serving process spent per request, each as a ratio to the baseline.

    python bench/rest_bench.py [--clients 16] [--seconds 4] [--history 500] [--conversations 200] [--profile FILE]

`--profile FILE` samples the hub with py-spy during the conversation page phase (collapsed stacks, as
`e2e_bench.py --profile` writes them; `bench/profile_summary.py FILE` sums them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import uvloop
from e2e_bench import SECRET, TOKEN, CpuMeter, flood, percentile, process, profiled, wait_http

from babelhub.canonical import conversation_id
from babelhub.services.broker import EmbeddedServer, free_port

PREFIX = "rbench"
TENANT = "rbench"
LIMITED = "rbench-limited"
CONFIG_KEY = "rest-bench-config-key"
LIMITED_KEY = "rest-bench-limited-key"
LONG_CHAT = 90_000
WARM_UP = 0.5


class Options(argparse.Namespace):
    clients: int
    seconds: float
    history: int
    conversations: int
    profile: str


class Phase(NamedTuple):
    """What one closed-loop phase measured."""

    answers: Counter[int]
    errors: dict[int, str]
    """The first answer's body of each status other than 200."""
    latencies: list[float]
    seconds: float
    cpu_ms: float

    @property
    def rate(self) -> float:
        return sum(self.answers.values()) / self.seconds

    def admitted_rate(self) -> float:
        return self.answers[200] / self.seconds


def config_text(nats_url: str, hub_port: int, fake_port: int) -> str:
    return f"""
[hub]
http = "127.0.0.1:{hub_port}"
nats = "{nats_url}"
subject_prefix = "{PREFIX}"
log_level = "warning"
[[tenants]]
id = "{TENANT}"
api_keys = ["{CONFIG_KEY}"]
requests_per_second = 0  # no limit: the bench measures the endpoints, not the limiter
[[tenants]]
id = "{LIMITED}"
api_keys = ["{LIMITED_KEY}"]
[[connections]]
id = "tg"
tenant = "{TENANT}"
channel = "telegram"
api_base = "http://127.0.0.1:{fake_port}"
secrets = {{ bot_token = "{TOKEN}", secret_token = "{SECRET}" }}
max_rate = 0
[[connections]]
id = "tg-limited"
tenant = "{LIMITED}"
channel = "telegram"
api_base = "http://127.0.0.1:{fake_port}"
secrets = {{ bot_token = "{TOKEN}", secret_token = "{SECRET}-limited" }}
max_rate = 0
"""


def webhook(n: int, chat: int) -> bytes:
    return json.dumps({
        "update_id": n,
        "message": {"message_id": n, "date": int(time.time()), "text": f"rest bench {n}",
                    "from": {"id": chat, "is_bot": False, "first_name": "Load"},
                    "chat": {"id": chat, "type": "private", "first_name": "Load"}},
    }).encode()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def closed_loop(url: str, headers: dict[str, str], clients: int, seconds: float, pid: int) -> Phase:
    """`clients` clients GET `url` back to back for `seconds` (after a warm-up): the answers by status, the
    latencies (ms) of those answered 200, and the CPU (ms) the process `pid` spent per request."""
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        answers: Counter[int] = Counter()
        errors: dict[int, str] = {}
        latencies: list[float] = []

        async def client(until: float, record: bool) -> None:
            while time.perf_counter() < until:
                started = time.perf_counter()
                async with session.get(url, headers=headers) as response:
                    body = await response.read()
                if record:
                    answers[response.status] += 1
                    if response.status == 200:
                        latencies.append((time.perf_counter() - started) * 1000)
                    else:
                        errors.setdefault(response.status, body[:300].decode(errors="replace"))

        await asyncio.gather(*(client(time.perf_counter() + WARM_UP, False) for _ in range(clients)))
        meter = CpuMeter({"server": pid})
        meter.start()
        started = time.perf_counter()
        await asyncio.gather(*(client(started + seconds, True) for _ in range(clients)))
        elapsed = time.perf_counter() - started
        used, _ = meter.stop()
    return Phase(answers, errors, sorted(latencies), elapsed, used["server"] * 1000 / max(1, sum(answers.values())))


async def get_json(session: aiohttp.ClientSession, url: str, key: str) -> Any:
    async with session.get(url, headers=bearer(key)) as response:
        if response.status != 200:
            raise RuntimeError(f"GET {url} answered {response.status}: {await response.text()}")
        return await response.json()


async def eventually(what: str, check: Any, timeout: float = 120) -> None:
    """Wait until the coroutine function `check` answers True (at most `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not reached in {timeout:.0f} s")
        await asyncio.sleep(0.5)


async def load_history(api: str, webhooks: str, options: Options) -> str:
    """The conversations through the whole path: `history / 2` messages of one chat and one of each other
    chat, each answered by the app; waits until the history API lists them. The long conversation's id."""
    half = options.history // 2
    long_chat = [webhook(n, LONG_CHAT) for n in range(1, half + 1)]
    others = [webhook(100_000 + n, LONG_CHAT + n) for n in range(1, options.conversations)]
    await flood(webhooks, long_chat + others, 8)
    long_id = conversation_id(TENANT, "tg", str(LONG_CHAT))
    async with aiohttp.ClientSession() as session:

        async def listed() -> bool:
            conversation = await get_json(session, f"{api}/v1/conversations/{long_id}", CONFIG_KEY)
            listing = await get_json(session, f"{api}/v1/conversations?limit=1", CONFIG_KEY)
            return bool(conversation["message_count"] >= 2 * half
                        and listing["metadata"]["total_count"] >= options.conversations)

        async def known() -> bool:
            async with session.get(f"{api}/v1/conversations/{long_id}", headers=bearer(CONFIG_KEY)) as response:
                return response.status == 200

        await eventually("the long conversation in the history", known)
        await eventually(f"{2 * half} messages and {options.conversations} conversations in the history", listed)
        page = await get_json(session, f"{api}/v1/conversations/{long_id}/messages?limit=50", CONFIG_KEY)
        if len(page["data"]) != 50:
            raise RuntimeError(f"a page of the long conversation holds {len(page['data'])} messages, not 50")
    return long_id


async def sent_message(api: str, connection: str, key: str) -> str:
    """A message sent through the API to the fake Bot API, once its history says it was sent: its id."""
    body = {"conversation": {"connection": connection, "native_id": str(LONG_CHAT)},
            "parts": [{"type": "text", "text": "rest bench status"}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{api}/v1/messages", json=body, headers=bearer(key)) as response:
            if response.status != 202:
                raise RuntimeError(f"POST /v1/messages answered {response.status}: {await response.text()}")
            message_id = str((await response.json())["id"])

        async def sent() -> bool:
            async with session.get(f"{api}/v1/messages/{message_id}", headers=bearer(key)) as answer:
                return answer.status == 200 and (await answer.json())["state"] in {"sent", "delivered", "read"}

        await eventually("the message's status `sent`", sent)
    return message_id


async def stored_key(api: str) -> str:
    """A `read` key made at run time with the config key (which has every scope)."""
    async with (aiohttp.ClientSession() as session,
                session.post(f"{api}/v1/keys", json={"scopes": ["read"], "name": "rest bench"},
                             headers=bearer(CONFIG_KEY)) as response):
        if response.status != 201:
            raise RuntimeError(f"POST /v1/keys answered {response.status}: {await response.text()}")
        return str((await response.json())["key"])


async def run(options: Options) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        nats_server = EmbeddedServer(Path(tmp) / "nats", port=0)
        await nats_server.start()
        try:
            await measure(nats_server.url, Path(tmp), options)
        finally:
            await nats_server.stop()


async def measure(nats_url: str, tmp: Path, options: Options) -> None:
    fake_port, hub_port, base_port = free_port(), free_port(), free_port()
    config = tmp / "hub.toml"
    config.write_text(config_text(nats_url, hub_port, fake_port))
    api, base = f"http://127.0.0.1:{hub_port}", f"http://127.0.0.1:{base_port}"
    with (
        process("bench/fake_telegram.py", "--port", str(fake_port)),
        process("-m", "babelhub", "run", "--config", str(config)) as hub,
        process("bench/processor.py", "--nats", nats_url, "--prefix", PREFIX, "--tenant", TENANT),
    ):
        await wait_http(f"{api}/readyz")
        long_id = await load_history(api, f"{api}/webhooks/telegram/tg", options)
        message_id = await sent_message(api, "tg", CONFIG_KEY)
        limited_message = await sent_message(api, "tg-limited", LIMITED_KEY)
        key = await stored_key(api)
        with process("bench/rest_baseline_server.py", "--nats", nats_url, "--port", str(base_port),
                     "--bucket", f"{PREFIX}_messages", "--tenant", TENANT) as baseline:
            clients, seconds = options.clients, options.seconds
            phases = {
                "baseline: aiohttp + one KV get": await closed_loop(
                    f"{base}/v1/messages/{message_id}", bearer(CONFIG_KEY), clients, seconds, baseline.pid),
                "GET /v1/messages/{id}, config key": await closed_loop(
                    f"{api}/v1/messages/{message_id}", bearer(CONFIG_KEY), clients, seconds, hub.pid),
                "GET /v1/messages/{id}, stored key": await closed_loop(
                    f"{api}/v1/messages/{message_id}", bearer(key), clients, seconds, hub.pid),
            }
            with profiled(hub.pid, options.profile):
                phases[f"GET …/{{id}}/messages?limit=50 ({options.history} msgs)"] = await closed_loop(
                    f"{api}/v1/conversations/{long_id}/messages?limit=50", bearer(key), clients, seconds, hub.pid)
            phases[f"GET /v1/conversations?limit=50 ({options.conversations})"] = await closed_loop(
                f"{api}/v1/conversations?limit=50", bearer(key), clients, seconds, hub.pid)
        limited = await closed_loop(f"{api}/v1/messages/{limited_message}", bearer(LIMITED_KEY), clients, seconds,
                                    hub.pid)
    report(phases, limited, options)


def report(phases: dict[str, Phase], limited: Phase, options: Options) -> None:
    """The table: per phase the requests answered 200 a second, the share answered otherwise, p50/p99 of
    those answered 200 and the serving process's CPU per request, with their ratios to the baseline."""
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; every process on 127.0.0.1; "
          f"{options.clients} clients, closed loop, {options.seconds:.0f} s per phase; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    baseline = next(iter(phases.values()))
    base_p50 = percentile(baseline.latencies, 0.5)
    print(f"{'phase':<46} {'req/s':>7} {'not 200':>7} {'p50 ms':>7} {'p99 ms':>7} {'CPU ms/req':>10}   "
          "ratio to baseline (req/s, p50, CPU)")
    for name, phase in phases.items():
        p50, p99 = percentile(phase.latencies, 0.5), percentile(phase.latencies, 0.99)
        failed = 1 - phase.answers[200] / max(1, sum(phase.answers.values()))
        print(f"{name:<46} {phase.admitted_rate():7.0f} {failed:7.1%} {p50:7.2f} {p99:7.2f} {phase.cpu_ms:10.2f}   "
              f"{phase.admitted_rate() / baseline.admitted_rate():5.2f}  {p50 / base_p50:5.2f}  "
              f"{phase.cpu_ms / baseline.cpu_ms:5.2f}")
    for name, phase in phases.items():
        for status, body in phase.errors.items():
            print(f"  {name}: {phase.answers[status]} answered {status}, the first: {body}")
    refused = limited.answers[429] / max(1, sum(limited.answers.values()))
    print(f"default limit (50/s, burst 100 spent in the warm-up), GET /v1/messages/{{id}}: offered "
          f"{limited.rate:.0f} req/s, admitted (200) {limited.admitted_rate():.1f} req/s, {refused:.1%} answered 429; "
          f"answers {dict(sorted(limited.answers.items()))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients of every phase")
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of every phase")
    parser.add_argument("--history", type=int, default=500, help="messages of the paged conversation")
    parser.add_argument("--conversations", type=int, default=200, help="conversations of the listed tenant")
    parser.add_argument("--profile", default="", help="py-spy stacks of the hub in the page phase, to this file")
    uvloop.run(run(parser.parse_args(namespace=Options())))


if __name__ == "__main__":
    main()
