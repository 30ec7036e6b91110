"""Partitions in the message flow: the streams store each conversation's (and connection's) messages
under the partition `ownership.partition_of` computes, several hub processes on one subject prefix
share the partitions and the traffic, a graceful stop hands them over, and a deployment made by a hub
without partitions is upgraded only when nothing is left half-done."""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Callable

import aiohttp
import msgspec
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy, StreamConfig

from babelhub import canonical as c
from babelhub.actors.admission import Admission, Letter
from babelhub.actors.runtime import Actor, ActorSystem
from babelhub.errors import ConfigError
from babelhub.hub.app import Hub
from babelhub.services import config as cfg
from babelhub.services.broker import EmbeddedServer, Subjects, provision
from babelhub.services.ownership import partition_of
from tests.fakeapi import FakeApi
from tests.hubkit import (
    SECRET,
    TENANT,
    Processor,
    StartHub,
    eventually,
    telegram_config,
    telegram_responder,
    telegram_update,
    unique_prefix,
    with_hub,
)

HEADERS = {"X-Telegram-Bot-Api-Secret-Token": SECRET, "Content-Type": "application/json"}


@pytest.mark.parametrize(("variable", "value", "error"), [
    ("BABELHUB_PARTITIONS", "0", r"hub\.partitions: 0 must be 1 to 1024"),
    ("BABELHUB_PARTITIONS", "5000", r"hub\.partitions: 5000 must be 1 to 1024"),
    ("BABELHUB_LEASE_SECONDS", "0.2", r"hub\.lease_seconds: 0\.2 must be 1 to 300"),
    ("BABELHUB_LEASE_SECONDS", "nan", r"hub\.lease_seconds: nan must be 1 to 300"),
])
def test_partitions_and_leases_outside_their_range_are_refused_naming_the_key(variable: str, value: str,
                                                                              error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        cfg.load(None, env={variable: value})


async def test_the_streams_store_each_message_under_the_partition_the_hub_computes(nats_client: NATS) -> None:
    subjects = Subjects(unique_prefix(), partitions=16)
    js = nats_client.jetstream()
    await provision(js, subjects, dedup_window=60.0)
    for n in range(40):
        conversation = c.conversation_id(TENANT, "tg", str(n))
        expected = partition_of(TENANT, conversation, 16)
        for subject in (subjects.inbound(TENANT, conversation), subjects.outbound(TENANT, conversation),
                        subjects.decoded(TENANT, conversation)):
            ack = await js.publish(subject, b"{}")
            stored = await js.get_msg(subjects.stream_name("messages"), seq=ack.seq)
            assert stored.subject == subjects.stored(subject, expected)
        raw = subjects.raw(TENANT, "telegram", f"bot{n}")
        ack = await js.publish(raw, b"")
        stored = await js.get_msg(subjects.stream_name("raw"), seq=ack.seq)
        assert stored.subject == subjects.stored(raw, partition_of(TENANT, f"bot{n}", 16))


async def test_a_processor_cannot_pick_a_partition(nats_client: NATS) -> None:
    """Only `<prefix>.<tenant>.out.<conversation>` is stored from outside; a subject naming a partition
    is taken by no stream, so its publisher is told at once (and no owner ever sees it)."""
    subjects = Subjects(unique_prefix(), partitions=8)
    js = nats_client.jetstream()
    await provision(js, subjects, dedup_window=60.0)
    conversation = c.conversation_id(TENANT, "tg", "1")
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await js.publish(f"{subjects.prefix}.{TENANT}.out.3.{conversation}", b"{}")


async def test_a_hub_counting_other_partitions_than_the_streams_is_refused(nats_client: NATS) -> None:
    prefix = unique_prefix()
    js = nats_client.jetstream()
    await provision(js, Subjects(prefix, partitions=64), dedup_window=60.0)
    with pytest.raises(ConfigError, match=r"hub\.partitions: stream .*_RAW stores subjects as"):
        await provision(js, Subjects(prefix, partitions=32), dedup_window=60.0)


async def test_streams_made_before_partitions_are_upgraded_once_their_consumers_have_nothing_left(
        nats_client: NATS) -> None:
    subjects = Subjects(unique_prefix(), partitions=8)
    js, p = nats_client.jetstream(), subjects.prefix
    await js.add_stream(StreamConfig(name=subjects.stream_name("raw"), subjects=[f"{p}.*.raw.>"]))
    await js.add_stream(StreamConfig(name=subjects.stream_name("messages"), subjects=[f"{p}.*.in.>", f"{p}.*.out.>"]))
    for stream, durable, subject in (("raw", "decoder", f"{p}.*.raw.>"), ("messages", "sender", f"{p}.*.out.>")):
        await js.add_consumer(subjects.stream_name(stream),
                              ConsumerConfig(durable_name=durable, filter_subject=subject))
    await js.publish(subjects.outbound(TENANT, c.conversation_id(TENANT, "tg", "1")), b"{}")

    with pytest.raises(ConfigError, match=r"consumer sender of stream .* still has 1 messages to process"):
        await provision(js, subjects, dedup_window=60.0)
    assert (await js.stream_info(subjects.stream_name("messages"))).config.subject_transform is None  # untouched

    await js.delete_consumer(subjects.stream_name("messages"), "sender")  # as if the old hub had finished
    await js.add_consumer(subjects.stream_name("messages"), ConsumerConfig(
        durable_name="sender", filter_subject=f"{p}.*.out.>", deliver_policy=DeliverPolicy.NEW))
    await provision(js, subjects, dedup_window=60.0)  # nothing pending: upgraded
    names = {info.name for role in ("raw", "messages") for info in await js.consumers_info(subjects.stream_name(role))}
    assert names.isdisjoint({"decoder", "sender"})
    info = await js.stream_info(subjects.stream_name("messages"))
    assert info.config.subject_transform is not None and "partition(8,1,3)" in info.config.subject_transform.dest


# ------------------------------------------------------------------------------- several hubs


async def readiness(hub: Hub) -> dict[str, object]:
    async with aiohttp.ClientSession() as session, session.get(hub.http_url + "/readyz") as response:
        answer: dict[str, object] = await response.json()
        return answer


def held(hub: Hub) -> set[int]:
    return set(hub._started().ownership.working)


async def test_two_hubs_on_one_prefix_share_the_partitions_and_each_message_is_handled_once(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    fake_api.responder = telegram_responder
    config = with_hub(telegram_config(nats_server.url, fake_api.base_url), partitions=8, lease_seconds=4.0)
    first = await start_hub(config)
    second = await start_hub(config)
    await eventually(lambda: len(held(first)) == len(held(second)) == 4 and not held(first) & held(second),
                     timeout=20)
    assert (await readiness(second))["partitions"] == sorted(held(second))
    assert (await readiness(first))["member"] != (await readiness(second))["member"]

    app = await Processor(nats_client, config.hub.subject_prefix).start()
    texts: dict[int, list[str]] = collections.defaultdict(list)
    async with aiohttp.ClientSession() as session:
        async def chat(chat_id: int) -> None:
            for n in range(3):  # in order, alternating hubs as a load balancer would
                hub = (first, second)[(chat_id + n) % 2]
                text = f"c{chat_id}m{n}"
                async with session.post(f"{hub.http_url}/webhooks/telegram/tg", headers=HEADERS,
                                        data=json.dumps(telegram_update(chat_id * 10 + n, chat_id, text))) as response:
                    assert response.status == 200
                texts[chat_id].append(text)

        await asyncio.gather(*(chat(chat_id) for chat_id in range(1, 25)))

    handed: list[c.Envelope] = []
    for _ in range(72):
        inbound, _ = await app.next()
        handed.append(inbound)
        await app.reply(inbound, c.Text(text="re:" + next(p.text for p in inbound.parts if isinstance(p, c.Text))))

    def sends() -> list[tuple[int, str]]:
        return [(r.json()["chat_id"], r.json()["text"]) for r in fake_api.requests if r.path.endswith("/sendMessage")]

    await eventually(lambda: len(sends()) >= 72, timeout=30)
    await asyncio.sleep(0.5)  # a double would arrive by now
    assert len(sends()) == 72 and len({e.id for e in handed}) == 72
    for chat_id, sent in texts.items():  # each chat's messages reached the app, and were answered, in order
        assert [text for to, text in sends() if to == chat_id] == [f"re:{text}" for text in sent]
        conversation = c.conversation_id(TENANT, "tg", str(chat_id))
        assert [next(p.text for p in e.parts if isinstance(p, c.Text)) for e in handed
                if e.conversation.id == conversation] == sent
    # Each conversation's actor ran in the process holding its partition, and only there.
    for hub in (first, second):
        for key in list(hub.conversations._cells):
            tenant, _, conversation = key.partition(".")
            assert partition_of(tenant, conversation, 8) in held(hub)


async def test_a_processor_transport_is_fed_by_the_process_holding_each_conversation_in_its_order(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    """A transport's inbound feed (`follow_inbound`) is partitioned like the actors: the echo processor of
    each hub answers only its own partitions' conversations, each message once, each chat in order."""
    fake_api.responder = telegram_responder
    config = with_hub(telegram_config(nats_server.url, fake_api.base_url), partitions=4, lease_seconds=4.0)
    config = msgspec.structs.replace(config, processors=[cfg.Processor(id="echo", tenant=TENANT, transport="echo")])
    first = await start_hub(config)
    second = await start_hub(config)
    await eventually(lambda: len(held(first)) == len(held(second)) == 2, timeout=20)
    texts: dict[int, list[str]] = collections.defaultdict(list)
    async with aiohttp.ClientSession() as session:
        async def chat(chat_id: int) -> None:
            for n in range(4):
                hub = (first, second)[(chat_id + n) % 2]
                text = f"c{chat_id}m{n}"
                async with session.post(f"{hub.http_url}/webhooks/telegram/tg", headers=HEADERS,
                                        data=json.dumps(telegram_update(chat_id * 10 + n, chat_id, text))) as response:
                    assert response.status == 200
                texts[chat_id].append(text)

        await asyncio.gather(*(chat(chat_id) for chat_id in range(1, 13)))

    def sends() -> list[tuple[int, str]]:
        return [(r.json()["chat_id"], r.json()["text"]) for r in fake_api.requests if r.path.endswith("/sendMessage")]

    await eventually(lambda: len(sends()) >= 48, timeout=30)
    await asyncio.sleep(0.5)  # a double would arrive by now
    assert len(sends()) == 48
    for chat_id, sent in texts.items():
        assert [text for to, text in sends() if to == chat_id] == [f"echo: {text}" for text in sent]
    names = {info.name for info in await nats_client.jetstream().consumers_info(first.subjects.stream_name("messages"))}
    assert {name for name in names if name.startswith("processor-echo")} == {f"processor-echo-{n}" for n in range(4)}


async def test_a_processor_that_shared_one_consumer_keeps_its_place_when_it_follows_partitions(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    """A deployment whose processor read one consumer of all partitions (`processor-<id>`): the partitions'
    consumers start where it stood, so what it had handled is not handed over again."""
    fake_api.responder = telegram_responder
    config = telegram_config(nats_server.url, fake_api.base_url)
    hub = await start_hub(config)
    async with aiohttp.ClientSession() as session:
        async def post(update_id: int, text: str) -> None:
            async with session.post(f"{hub.http_url}/webhooks/telegram/tg", headers=HEADERS,
                                    data=json.dumps(telegram_update(update_id, 7, text))) as response:
                assert response.status == 200

        await post(1, "handled before")
        js, stream = nats_client.jetstream(), hub.subjects.stream_name("messages")
        shared = await js.pull_subscribe(f"{hub.subjects.prefix}.{TENANT}.in.>", durable="processor-echo",
                                         stream=stream)
        for msg in await shared.fetch(1, timeout=10):
            await msg.ack()  # what the processor's earlier transport did with it
        await hub.stop()
        hub = await start_hub(msgspec.structs.replace(config, processors=[
            cfg.Processor(id="echo", tenant=TENANT, transport="echo")]))
        await post(2, "after the move")
    await eventually(lambda: any(r.path.endswith("/sendMessage") for r in fake_api.requests))
    await asyncio.sleep(0.5)  # a replayed one would be answered by now
    assert [r.json()["text"] for r in fake_api.requests if r.path.endswith("/sendMessage")] == ["echo: after the move"]
    names = {info.name for info in await js.consumers_info(stream)}
    assert "processor-echo" not in names and "processor-echo-0" in names


async def test_a_graceful_stop_hands_the_partitions_over_at_once(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    fake_api.responder = telegram_responder
    # Leases that take 30 s to run out: only a handover can move the partitions within the 20 s allowed.
    config = with_hub(telegram_config(nats_server.url, fake_api.base_url), partitions=8, lease_seconds=30.0)
    first = await start_hub(config)
    second = await start_hub(config)
    await eventually(lambda: len(held(first)) == len(held(second)) == 4, timeout=60)
    await first.stop()
    await eventually(lambda: len(held(second)) == 8, timeout=20)

    app = await Processor(nats_client, config.hub.subject_prefix).start()
    async with aiohttp.ClientSession() as session, session.post(
            f"{second.http_url}/webhooks/telegram/tg", headers=HEADERS,
            data=json.dumps(telegram_update(1, 42, "after the handover"))) as response:
        assert response.status == 200
    inbound, _ = await app.next()
    assert isinstance(inbound, c.Message) and inbound.conversation.native_id == "42"


# ------------------------------------------------------------------------------- actors of a partition


class Slow(Actor[str]):
    def __init__(self, key: str, applied: list[str], gate: asyncio.Event) -> None:
        super().__init__(key)
        self.applied = applied
        self.gate = gate

    async def receive(self, message: str) -> None:
        await self.gate.wait()
        self.applied.append(f"{self.key}:{message}")


async def test_stopping_one_partitions_actors_leaves_the_others_running() -> None:
    applied: list[str] = []
    released: list[str] = []
    gate = asyncio.Event()
    system: ActorSystem[str] = ActorSystem("t", lambda key: Slow(key, applied, gate))

    def note(key: str) -> Callable[[], asyncio.Future[None]]:
        async def released_() -> None:
            released.append(key)
        return released_  # type: ignore[return-value]

    for key in ("a1", "a2", "b1"):
        assert system.offer(key, "m", on_released=note(key))
    await system.stop_where(lambda key: key.startswith("a"), grace=0)  # lost: at once, nothing saved
    assert sorted(released) == ["a1", "a2"]
    gate.set()
    await eventually(lambda: applied == ["b1:m"])
    assert system.active == 1
    assert system.offer("a1", "again")  # the key activates afresh
    await eventually(lambda: "a1:again" in applied)
    await system.stop()


async def test_what_was_out_before_a_partition_is_taken_afresh_is_forgotten() -> None:
    """A message handed back while this process held the partition may be applied by another process
    since: once the partition's consumer starts afresh, later messages of its key must not wait for it."""
    admission = Admission(hold_seconds=60.0)
    actors: ActorSystem[str] = ActorSystem("t", lambda key: Slow(key, [], asyncio.Event()))
    admission.turned_away("acme.c1", 5)
    admission.turned_away("acme.c2", 5)
    assert not admission.offer(actors, 9, [Letter("acme.c1", "m")])
    admission.forget(lambda key: key == "acme.c1")
    assert admission.offer(actors, 9, [Letter("acme.c1", "m")])
    assert not admission.offer(actors, 9, [Letter("acme.c2", "m")])  # another partition's key is kept
    await actors.stop(grace=0)


async def test_a_process_whose_lease_ran_out_sends_nothing_for_the_partition(
        nats_server: EmbeddedServer, nats_client: NATS, fake_api: FakeApi, start_hub: StartHub) -> None:
    """A process stalled past its lease (its rounds stopped; the other processes may have taken the
    partition) refuses the channel call and hands the message back, instead of sending it."""
    fake_api.responder = telegram_responder
    config = with_hub(telegram_config(nats_server.url, fake_api.base_url), partitions=1, lease_seconds=60.0)
    hub = await start_hub(config)
    app = await Processor(nats_client, config.hub.subject_prefix).start()
    async with aiohttp.ClientSession() as session, session.post(
            f"{hub.http_url}/webhooks/telegram/tg", headers=HEADERS,
            data=json.dumps(telegram_update(1, 42, "hello"))) as response:
        assert response.status == 200
    inbound, _ = await app.next()

    ownership = hub._started().ownership
    rounds = next(task for task in asyncio.all_tasks() if task.get_name() == "ownership")
    rounds.cancel()  # no renewal, no fence task: as if the process were frozen
    await asyncio.gather(rounds, return_exceptions=True)
    ownership.leases[0].valid_until = 0.0  # its hold has run out, in its own view
    await app.reply(inbound, c.Text(text="must not go out from here"))
    await asyncio.sleep(2.0)
    assert not [r for r in fake_api.requests if r.path.endswith("/sendMessage")]
