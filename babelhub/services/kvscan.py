"""KV buckets read in one pass (the keys there are, or their values), and the history API's buckets made
on first use.

A pass is an ephemeral consumer deleted once it has delivered what the bucket holds. nats-py's own
`KeyValue.keys()` leaves its consumer on the server for five minutes after it stops, and a stream takes
at most 1,000 consumers (nats-server 2.15): a hub listing a bucket every second, or a busy list endpoint,
would fill it and have every later pass refused; and its end-of-values marker may come before values
already delivered (an empty answer for a bucket that is not empty)."""

from __future__ import annotations

import contextlib
from typing import Final

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, KeyValueConfig
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

from babelhub.services.broker import bucket_stream, raise_replicas

__all__ = ["SCAN_INACTIVE_SECONDS", "current_values", "keys", "open_bucket"]

_SCAN_TIMEOUT: Final = 10.0
_BATCH: Final = 256
SCAN_INACTIVE_SECONDS: Final = 5.0
"""How long the server keeps a pass's consumer that nobody reads (the pass deletes it when it ends)."""


async def open_bucket(js: JetStreamContext, bucket: str, replicas: int) -> KeyValue:
    """The bucket, made with `replicas` copies and one revision per key when it does not exist (one that
    does is given at least `replicas` copies, as the hub's own buckets are)."""
    try:
        kv = await js.key_value(bucket)
    except (NotFoundError, BadRequestError):
        return await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, replicas=replicas))
    await raise_replicas(js, bucket_stream(bucket), replicas)
    return kv


async def current_values(kv: KeyValue, pattern: str = ">") -> list[KeyValue.Entry]:
    """Every key matching `pattern` that holds a value now, with its value."""
    return [entry for entry in await _scan(kv, pattern, meta_only=False) if entry.value]


async def keys(kv: KeyValue, pattern: str = ">") -> list[str]:
    """Every key matching `pattern` that holds a value now (what `KeyValue.keys()` answers, without its
    consumer left behind, and [] rather than `NoKeysError` for none)."""
    return [entry.key for entry in await _scan(kv, pattern, meta_only=True)]


async def _scan(kv: KeyValue, pattern: str, *, meta_only: bool) -> list[KeyValue.Entry]:
    """The last entry of every key matching `pattern`, deletions left out. An ephemeral pull consumer
    tells at its creation how many there are to read, so the end of the pass is known, and it is deleted
    once read."""
    js, stream, prefix = kv._js, kv._stream, kv._pre  # nats-py keeps the bucket's stream and key prefix here
    config = ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, ack_policy=AckPolicy.NONE,
                            headers_only=meta_only, mem_storage=True, inactive_threshold=SCAN_INACTIVE_SECONDS)
    # Made first and bound to: its answer says how many entries there are (no extra round trip to ask).
    info = await js.add_consumer(stream, config, filter_subject=prefix + pattern)
    subscription = await js.pull_subscribe_bind(consumer=info.name, stream=stream)
    entries: list[KeyValue.Entry] = []
    try:
        pending = info.num_pending or 0
        while pending > 0:
            for msg in await subscription.fetch(min(pending, _BATCH), timeout=_SCAN_TIMEOUT):
                pending = msg.metadata.num_pending
                if not _deleted(msg):
                    entries.append(KeyValue.Entry(bucket=kv._name, key=msg.subject[len(prefix):], value=msg.data,
                                                  revision=msg.metadata.sequence.stream, delta=pending,
                                                  created=None, operation=None))
    finally:
        await subscription.unsubscribe()
        with contextlib.suppress(nats.errors.Error):  # NATS unreachable: the server's fallback removes it
            await js.delete_consumer(stream, info.name)
    return entries


def _deleted(msg: Msg) -> bool:
    """A delete or purge marker: written by a client (`KV-Operation`) or by the server when a key's TTL or
    the bucket's age ran out (`Nats-Marker-Reason`, nats-server 2.11+)."""
    headers = msg.headers or {}
    return headers.get("KV-Operation") in ("DEL", "PURGE") or "Nats-Marker-Reason" in headers
