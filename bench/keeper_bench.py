"""Benchmark of the records keeper (what the history API serves), with its baseline measured in the same run.

The keeper keeps every message three ways: in its conversation's history, in the conversation index
and, for an inbound message, in its sender's contact; the index record and the contact are each a read
followed by a revision-checked write. Each phase keeps the same inbound messages (`--messages`, spread
over `--conversations` conversations of one person each) into buckets of its own on one nats-server:

    baseline    a keeper that remembers nothing (`remembered=0`): every index and contact write reads first
    remembered  the keeper as the hub runs it: the record it wrote last stands for reading it again

The phases alternate (`--rounds` of each) and each prints messages kept a second, NATS messages sent per
message kept, and CPU per message of this process (the keeper) and of nats-server, with the ratio of
`remembered` to the baseline of the same round.

    python bench/keeper_bench.py [--messages 3000] [--conversations 96] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import nats
import uvloop
from e2e_bench import CpuMeter
from nats.aio.client import Client as NATS

from babelhub import canonical as c
from babelhub.services.broker import EmbeddedServer, Subjects
from babelhub.services.contacts import Contacts
from babelhub.services.conversationindex import ConversationIndex
from babelhub.services.deadletters import DeadLetters
from babelhub.services.historystore import HistoryStore
from babelhub.services.keeper import RecordsKeeper
from babelhub.services.kvscan import open_bucket
from babelhub.services.publisher import Publisher
from babelhub.services.telemetry import Metrics

TENANT = "bench"
CONCURRENCY = 8
"""Messages kept at once, each of another conversation (the keeper's consumer is shared by the hubs)."""


class Phase(NamedTuple):
    per_second: float
    sent_per_message: float
    keeper_ms: float
    nats_ms: float


def messages(count: int, conversations: int) -> list[c.Message]:
    at = datetime.now(UTC)
    # Message n (from 1) is of conversation n % conversations: with `conversations` a multiple of
    # CONCURRENCY, all of a conversation's messages fall in the lane n % CONCURRENCY.
    return [c.Message(id=c.new_id(), tenant=TENANT, ts=at, direction="inbound",
                      conversation=c.Conversation(id=f"conv{n % conversations}", connection="tg",
                                                  channel="telegram"),
                      sender=c.Sender(id=c.sender_id(TENANT, "tg", str(n % conversations)),
                                      native_id=str(n % conversations), name="Ada"),
                      parts=[c.Text(text=f"message {n}")])
            for n in range(1, count + 1)]


async def keeper(nc: NATS, prefix: str, remembered: int) -> RecordsKeeper:
    js, subjects = nc.jetstream(), Subjects(prefix=prefix)
    publisher = Publisher(nc, js)
    store = await HistoryStore.open(nc, js, publisher, subjects, dedup_window=120.0, replicas=1)
    index = ConversationIndex(await open_bucket(js, subjects.bucket("conversation_index"), 1), publisher, remembered)
    contacts = Contacts(await open_bucket(js, subjects.bucket("contacts"), 1), publisher, remembered)
    return RecordsKeeper(store, index, contacts, DeadLetters(publisher, subjects, Metrics()))


async def phase(nc: NATS, server_pid: int, prefix: str, remembered: int, batch: list[c.Message]) -> Phase:
    kept_by = await keeper(nc, prefix, remembered)
    # Each conversation in one lane, its messages in their order, each with its place in the batch as the
    # messages stream's sequence.
    lanes = [[(seq, message) for seq, message in enumerate(batch, start=1) if seq % CONCURRENCY == lane]
             for lane in range(CONCURRENCY)]

    async def keep(lane: list[tuple[int, c.Message]]) -> None:
        for seq, message in lane:
            await kept_by.keep(message, seq, message.ts)

    meter = CpuMeter({"nats": server_pid})
    sent_before, cpu_before = nc.stats["out_msgs"], time.process_time()
    meter.start()
    started = time.perf_counter()
    await asyncio.gather(*(keep(lane) for lane in lanes))
    elapsed = time.perf_counter() - started
    used, _ = meter.stop()
    count = len(batch)
    return Phase(count / elapsed, (nc.stats["out_msgs"] - sent_before) / count,
                 (time.process_time() - cpu_before) / count * 1000, used["nats"] / count * 1000)


def show(name: str, result: Phase, baseline: Phase | None) -> None:
    line = (f"    {name:<11} {result.per_second:7.0f} msg/s, {result.sent_per_message:4.1f} NATS messages sent per "
            f"message, CPU keeper {result.keeper_ms:.2f} ms, nats-server {result.nats_ms:.2f} ms")
    if baseline is not None:
        line += (f"; to the baseline: msg/s {result.per_second / baseline.per_second:.2f}, keeper CPU "
                 f"{result.keeper_ms / baseline.keeper_ms:.2f}, "
                 f"nats-server CPU {result.nats_ms / baseline.nats_ms:.2f}")
    print(line, flush=True)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as data:
        server = EmbeddedServer(Path(data), port=0)
        await server.start()
        try:
            assert server.process is not None
            nc = await nats.connect(server.url)
            print(f"records keeper: {args.messages} inbound messages over {args.conversations} conversations, "
                  f"{CONCURRENCY} at a time, one nats-server on 127.0.0.1", flush=True)
            for round_ in range(1, args.rounds + 1):
                print(f"  round {round_}", flush=True)
                baseline = await phase(nc, server.process.pid, f"kb{round_}a", 0, messages(args.messages,
                                                                                         args.conversations))
                show("baseline", baseline, None)
                remembered = await phase(nc, server.process.pid, f"kb{round_}b", 4096,
                                         messages(args.messages, args.conversations))
                show("remembered", remembered, baseline)
            await nc.close()
        finally:
            await server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--conversations", type=int, default=96, help="a multiple of 8")
    parser.add_argument("--rounds", type=int, default=2)
    arguments = parser.parse_args()
    if arguments.conversations <= 0 or arguments.conversations % CONCURRENCY:
        parser.error(f"--conversations must be a multiple of {CONCURRENCY}")
    uvloop.run(main(arguments))
