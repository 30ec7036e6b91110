"""The client sessions' live feeds and catch-ups (babelhub/sessions/feed.py) on a real nats-server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest

from babelhub.services.broker import EmbeddedServer, free_port
from babelhub.sessions.feed import Follower, LiveFeed, catch_up

STREAM = "FEED"


def key_of(subject: str) -> tuple[str, str] | None:
    _, tenant, _, conversation = subject.split(".")
    return tenant, conversation


async def test_a_feed_recreated_after_the_server_restarts_goes_on_where_it_stopped(tmp_path: Path) -> None:
    """The feed's consumer lives in the server's memory: a restart loses it and nats-py recreates it from
    the last sequence it delivered. Before the first envelope that would be the stream's start: the
    followers would be handed everything the stream ever held."""
    server = EmbeddedServer(tmp_path / "nats", port=free_port())
    await server.start()
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js = nc.jetstream()
        await js.add_stream(name=STREAM, subjects=["feed.*.in.*"])
        for n in range(5):  # history, before anyone follows
            await js.publish("feed.acme.in.c1", f"old {n}".encode())
        feed = LiveFeed(js, STREAM, ["feed.*.in.*"], key_of)
        heard: list[bytes] = []
        follower = Follower(0, lambda _, data: heard.append(data))
        await feed.follow(("acme", "c1"), follower)
        follower.caught_up([])

        await server.stop()
        await server.start()
        for _ in range(300):
            try:
                await js.publish("feed.acme.in.c1", b"after the restart", timeout=1)
                break
            except (nats.errors.Error, TimeoutError):
                await asyncio.sleep(0.1)
        for _ in range(300):  # the feed notices the lost consumer after two missed heartbeats
            if heard:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # room for a replay to show
        assert heard == [b"after the restart"]
        await feed.stop()
    finally:
        await nc.close()
        await server.stop()


async def test_a_catch_up_reads_what_followed_a_sequence_for_its_subjects_only(nats_server: EmbeddedServer) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        await js.add_stream(name=STREAM, subjects=["feed.*.in.*"])
        for n in range(10):
            await js.publish(f"feed.acme.in.c{n % 2}", str(n).encode())
        room = asyncio.Semaphore(1)
        assert await catch_up(js, STREAM, ["feed.acme.in.c1"], 4, room) == [
            (6, b"5"), (8, b"7"), (10, b"9")]
        assert await catch_up(js, STREAM, ["feed.acme.in.c0", "feed.acme.in.c1"], 8, room) == [(9, b"8"), (10, b"9")]
        assert await catch_up(js, STREAM, ["feed.acme.in.c1"], 10, room) == []
        info = await js.stream_info(STREAM)
        assert info.state.consumer_count == 0 or await _consumers_gone(js)
    finally:
        await js.delete_stream(STREAM)
        await nc.close()


async def _consumers_gone(js: nats.js.JetStreamContext) -> bool:
    for _ in range(200):
        if (await js.stream_info(STREAM)).state.consumer_count == 0:
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.mark.parametrize(("missed", "held", "last", "delivered"), [
    ([(3, b"c"), (4, b"d")], [(4, b"d"), (5, b"e")], 2, [3, 4, 5]),  # overlap: each once
    ([], [(1, b"a"), (2, b"b"), (3, b"c")], 2, [3]),  # no cursor: only what came after the start
])
def test_a_follower_joins_catch_up_and_live_in_order_each_once(missed: list[tuple[int, bytes]],
                                                              held: list[tuple[int, bytes]], last: int,
                                                              delivered: list[int]) -> None:
    out: list[int] = []
    follower = Follower(last, lambda sequence, _: out.append(sequence))
    for sequence, data in held:
        follower.live(sequence, data)
    assert out == []  # held back while catching up
    follower.caught_up(missed)
    follower.live(delivered[-1], b"again")
    follower.live(delivered[-1] + 1, b"next")
    assert out == [*delivered, delivered[-1] + 1]
