"""Passes over a KV bucket (`babelhub.services.kvscan`) on a real nats-server leave no consumer behind:
a stream takes at most 1,000, and nats-py's own `KeyValue.keys()` keeps each pass's for five minutes, so
a hub listing a bucket every second (or a busy list endpoint) would have every later pass refused."""

from __future__ import annotations

from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig

from babelhub.services import kvscan
from babelhub.services.broker import bucket_stream
from tests.hubkit import unique_prefix

PASSES = 1_100
"""More passes than a stream takes consumers."""


async def test_many_passes_leave_no_consumer_behind(nats_client: NATS) -> None:
    js = nats_client.jetstream()
    bucket = f"{unique_prefix()}_scanned"
    kv = await js.create_key_value(KeyValueConfig(bucket=bucket, history=1))
    try:
        assert await kvscan.keys(kv) == [] and await kvscan.current_values(kv) == []
        for tenant, name in (("a", "one"), ("a", "two"), ("b", "three")):
            await kv.put(f"{tenant}.{name}", name.encode())
        await kv.delete("a.two")
        for _ in range(PASSES):
            assert sorted(await kvscan.keys(kv)) == ["a.one", "b.three"]
        assert [entry.value for entry in await kvscan.current_values(kv, "a.*")] == [b"one"]
        assert (await js.stream_info(bucket_stream(bucket))).state.consumer_count == 0
    finally:
        await js.delete_key_value(bucket)
