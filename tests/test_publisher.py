"""The publisher's JetStream publish answers as nats-py's does: the ack, a duplicate, and its errors."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client as NATS
from nats.js.api import Header, KeyValueConfig, StreamConfig
from nats.js.errors import APIError, BadRequestError, NoStreamResponseError

from babelhub.services.publisher import Publisher


async def test_a_publish_returns_the_streams_ack_and_raises_what_nats_py_raises(nats_client: NATS) -> None:
    js = nats_client.jetstream()
    await js.add_stream(StreamConfig(name="PUBLISHER", subjects=["publisher.>"], duplicate_window=60))
    publisher = Publisher(nats_client, js)
    try:
        first = await publisher.publish("publisher.a", b"one", dedup=("a",))
        again = await publisher.publish("publisher.a", b"one", dedup=("a",))
        other = await publisher.publish("publisher.b", b"two")
        assert (first.stream, first.seq, bool(first.duplicate)) == ("PUBLISHER", 1, False)
        assert (again.seq, again.duplicate) == (1, True)
        assert (other.seq, bool(other.duplicate)) == (2, False)

        with pytest.raises(NoStreamResponseError):
            await publisher.publish("nostream.a", b"x")
        with pytest.raises(BadRequestError) as refused:  # a stream answering with an error
            await publisher.publish("publisher.c", b"x", headers={Header.EXPECTED_STREAM.value: "ANOTHER"})
        assert isinstance(refused.value, APIError) and refused.value.err_code == 10060
    finally:
        await js.delete_stream("PUBLISHER")


async def test_an_expiring_write_is_answered_with_its_ack_or_the_servers_refusal(nats_client: NATS) -> None:
    js = nats_client.jetstream()
    allowing = await js.create_key_value(KeyValueConfig(bucket="publisher_ttl", history=1))
    config = (await js.stream_info("KV_publisher_ttl")).config
    config.allow_msg_ttl = True
    await js.update_stream(config)
    await js.create_key_value(KeyValueConfig(bucket="publisher_small", history=1, max_value_size=4))
    publisher = Publisher(nats_client, js)
    try:
        acks = [await publisher.put_expiring("publisher_ttl", f"k{n}", b"v", ttl=60) for n in range(3)]
        refused = await publisher.put_expiring("publisher_small", "k", b"too long", ttl=60)
        answered = await asyncio.wait_for(asyncio.gather(*acks), timeout=5)
        assert [ack.seq for ack in answered] == [1, 2, 3] and (await allowing.get("k2")).value == b"v"
        with pytest.raises(APIError):  # nats-py's publish_async would never answer this one
            await asyncio.wait_for(refused, timeout=5)
        assert not publisher._awaited
    finally:
        await js.delete_key_value("publisher_ttl")
        await js.delete_key_value("publisher_small")
