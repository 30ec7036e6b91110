"""What the hub holds unacknowledged is kept alive only once it has been held a while (`InFlight`)."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from babelhub.services.inflight import InFlight


async def test_only_messages_held_for_an_interval_are_told_in_progress(nats_client: NATS) -> None:
    js = nats_client.jetstream()
    await js.add_stream(StreamConfig(name="INFLIGHT", subjects=["inflight.>"]))
    for n in range(3):
        await js.publish(f"inflight.{n}", b"x")
    subscription = await js.pull_subscribe("inflight.>", durable="inflight")
    first, second, third = await subscription.fetch(3, timeout=5)
    signs: list[Msg] = []

    async def note(msg: Msg) -> None:
        signs.append(msg)

    watcher = await nats_client.subscribe("$JS.ACK.INFLIGHT.>", cb=note)
    now = [100.0]
    inflight = InFlight(ack_wait=30.0, clock=lambda: now[0])  # interval: 10 s
    held = [inflight.hold(first), inflight.hold(second)]
    now[0] = 105.0
    inflight.hold(third)
    await inflight.extend_due()  # nothing has been held 10 s yet
    now[0] = 111.0
    await held[1].ack()
    await inflight.extend_due()  # the first only: the second is settled, the third held 6 s
    await nats_client.flush()
    await asyncio.sleep(0.2)
    assert [(msg.subject, msg.data) for msg in signs if msg.data == b"+WPI"] == [(first.reply, b"+WPI")]
    now[0] = 116.0
    await inflight.extend_due()  # the third now; the first was extended 5 s ago
    await nats_client.flush()
    await asyncio.sleep(0.2)
    assert [msg.subject for msg in signs if msg.data == b"+WPI"] == [first.reply, third.reply]
    await watcher.unsubscribe()
    await js.delete_stream("INFLIGHT")
