"""KV buckets of the history API: made on first use, read key by key or all of a tenant's at once."""

from __future__ import annotations

from typing import Final

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

from babelhub.services.broker import bucket_stream, raise_replicas

__all__ = ["current_values", "open_bucket"]

_SCAN_TIMEOUT: Final = 10.0


async def open_bucket(js: JetStreamContext, bucket: str, replicas: int) -> KeyValue:
    """The bucket, made with `replicas` copies and one revision per key when it does not exist (one that
    does is given at least `replicas` copies, as the hub's own buckets are)."""
    try:
        kv = await js.key_value(bucket)
    except (NotFoundError, BadRequestError):
        return await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, replicas=replicas))
    await raise_replicas(js, bucket_stream(bucket), replicas)
    return kv


async def current_values(kv: KeyValue, pattern: str) -> list[KeyValue.Entry]:
    """Every key matching `pattern` that holds a value now, read in one pass (a watcher that stops after
    the values there are)."""
    watcher = await kv.watch(pattern, ignore_deletes=True)
    entries: list[KeyValue.Entry] = []
    try:
        while True:
            entry = await watcher.updates(timeout=_SCAN_TIMEOUT)  # type: ignore[no-untyped-call]  # a timeout: NATS is not answering
            if entry is None:  # the values there were have all come
                break
            if entry.value:
                entries.append(entry)
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    return entries
