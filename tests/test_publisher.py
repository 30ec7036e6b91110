"""The publisher's JetStream publish answers as nats-py's does: the ack, a duplicate, and its errors."""

from __future__ import annotations

import pytest
from nats.aio.client import Client as NATS
from nats.js.api import Header, StreamConfig
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
