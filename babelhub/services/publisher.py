"""The one way the hub writes to NATS: every publish, request and KV write is measured first.

nats-server closes a connection that sends a message larger than its `max_payload`, counting the
header block too, and nats-py then gives up on that connection for good. A publish that would do so
raises `PayloadTooLarge` here instead, before a byte is sent, and the connection stays up.

Headers the hub writes have a bounded length whatever a client sent: `Nats-Msg-Id` is a hash of its
dedup components, and a `tracestate` longer than the W3C limit is dropped (the `traceparent` is kept).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import Header, PubAck
from nats.js.errors import APIError, KeyWrongLastSequenceError, NoStreamResponseError, ServiceUnavailableError
from nats.js.kv import KeyValue

from babelhub.canonical import stable_id
from babelhub.errors import PayloadTooLarge
from babelhub.services.telemetry import carrier

__all__ = ["MAX_TRACESTATE", "Publisher", "header_block_size"]

MAX_TRACESTATE = 512
"""W3C Trace Context: a `tracestate` may be cut beyond 512 characters; the hub drops such a one."""

STORE_TRIES = 5
"""Tries of one KV write that goes unanswered (a cluster electing a bucket leader takes seconds)."""
STORE_RETRY_PAUSE = 0.5
STORE_RETRY_MAX_PAUSE = 2.0
# No answer: a timeout (the write may have landed), or nobody to take it yet, or JetStream's "temporarily
# unavailable" while it elects a leader (it did not).
_UNANSWERED = (nats.errors.TimeoutError, nats.errors.NoRespondersError, NoStreamResponseError,
               ServiceUnavailableError, nats.errors.ConnectionReconnectingError)

_HEADER_LINE = len(b"NATS/1.0\r\n")
_HEADERS_END = len(b"\r\n")
_TTL_HEADERS = {Header.MSG_TTL.value: str(2**63 - 1)}
"""An expiring KV write carries `Nats-TTL: <seconds>`, measured at its longest."""
# A KV create/update carries `Nats-Expected-Last-Subject-Sequence: <revision>`: measured at the
# largest revision (a uint64), so the check never depends on how far the bucket has come.
_KV_HEADERS = {Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(2**64 - 1)}

_WRONG_LAST_SEQUENCE = (10071, 10164)
"""JetStream's error codes for an expected last subject sequence that is not the key's revision."""
_NO_RESPONDERS = "503"
"""The status header of the answer to a publish no stream listens to."""
JETSTREAM_TIMEOUT = 5.0
"""Seconds a JetStream publish waits for the stream's answer (nats-py's own default)."""


class _StreamAnswer(msgspec.Struct):
    """JetStream's answer to a publish: the stored message's place, or an error."""

    stream: str = ""
    seq: int = 0
    domain: str | None = None
    duplicate: bool | None = None
    error: dict[str, Any] | None = None


_read_answer = msgspec.json.Decoder(_StreamAnswer).decode


def header_block_size(headers: Mapping[str, str] | None) -> int:
    """Bytes of the `NATS/1.0` header block nats-py writes for `headers` (none for None)."""
    if headers is None:
        return 0
    size = _HEADER_LINE + _HEADERS_END
    for name, value in headers.items():
        key = name.strip()
        if key:
            size += len(key.encode()) + len(b": ") + len(value.strip().encode()) + len(b"\r\n")
    return size


class Publisher:
    """JetStream publishes, core-NATS requests and KV writes, each checked against `max_payload`."""

    def __init__(self, nc: NATS, js: JetStreamContext) -> None:
        self._nc = nc
        self._js = js
        self._answer_prefix = ""
        self._subscribing = asyncio.Lock()
        self._tokens = itertools.count()
        self._awaited: dict[str, asyncio.Future[PubAck]] = {}
        """The futures of `_answered_later`'s publishes, by their reply token, until answered."""

    @property
    def connected(self) -> bool:
        return self._nc.is_connected

    @property
    def max_payload(self) -> int:
        """The connected server's limit on payload + headers, from its INFO (it may change on reconnect)."""
        return self._nc.max_payload

    def headers(self, dedup: Sequence[str] = ()) -> dict[str, str]:
        """The headers of a hub publish: the current trace context and, given `dedup` components,
        a fixed-length `Nats-Msg-Id` derived from them."""
        headers = carrier()
        if len(headers.get("tracestate", "")) > MAX_TRACESTATE:
            del headers["tracestate"]
        if dedup:
            headers["Nats-Msg-Id"] = stable_id(*dedup)
        return headers

    def room(self, headers: Mapping[str, str] | None) -> int:
        """The largest payload that can go out with `headers`."""
        return self.max_payload - header_block_size(headers or None)

    def check(self, subject: str, payload: bytes, headers: Mapping[str, str] | None) -> None:
        size = len(payload) + header_block_size(headers)
        if size > self.max_payload:
            raise PayloadTooLarge(subject, size, self.max_payload)

    async def publish(self, subject: str, payload: bytes, *, dedup: Sequence[str] = (),
                      headers: Mapping[str, str] | None = None) -> PubAck:
        """Publish to JetStream and wait for the stream's ack. `headers`, when given, replace the ones
        `headers(dedup)` would make: pass only what `headers()` made (e.g. to measure `room` first)."""
        sent = (dict(headers) if headers is not None else self.headers(dedup)) or None
        self.check(subject, payload, sent)
        return await self._to_stream(subject, payload, sent)

    async def _to_stream(self, subject: str, payload: bytes, headers: dict[str, str] | None) -> PubAck:
        """What `JetStreamContext.publish` does, at about half the cost: the answer comes to the
        publisher's own inbox (`_answered_later`) and is read by msgspec, where nats-py makes a random
        token per request and reads the answer with `json` into a dataclass built field by field. The hub
        publishes several times per message. Raises what nats-py raises."""
        answer = await self._answered_later(subject, payload, headers)
        try:
            async with asyncio.timeout(JETSTREAM_TIMEOUT):
                return await answer
        except TimeoutError:
            raise nats.errors.TimeoutError from None

    async def request(self, subject: str, payload: bytes, timeout: float) -> Msg:
        """A core-NATS request carrying the trace context."""
        headers = self.headers() or None
        self.check(subject, payload, headers)
        return await self._nc.request(subject, payload, timeout=timeout, headers=headers)

    async def store(self, kv: KeyValue, key: str, value: bytes, last: int | None) -> int:
        """Write `key` in `kv`: create it when `last` is None, else update it if its revision is
        still `last`. Returns the new revision; raises nats' KeyWrongLastSequenceError on a conflict.

        On a NATS cluster a write can go unanswered while the bucket's leader changes (a node stopped):
        it is tried again, a few times. An unanswered write may still have landed, so a conflict after
        one is checked: the key holding exactly `value` is this write, and its revision is returned (a
        caller would otherwise take its own write for another owner's)."""
        self.check(f"KV {key}", value, _KV_HEADERS)
        in_doubt, attempt = False, 1
        while True:
            try:
                return await (kv.create(key, value) if last is None else self._update(kv, key, value, last))
            except KeyWrongLastSequenceError:
                if not in_doubt:
                    raise
                entry = await kv.get(key)
                if entry.value != value or entry.revision is None:
                    raise
                return entry.revision
            except _UNANSWERED as exc:
                in_doubt = in_doubt or isinstance(exc, nats.errors.TimeoutError)
                if attempt == STORE_TRIES:
                    raise
                await asyncio.sleep(min(STORE_RETRY_MAX_PAUSE, STORE_RETRY_PAUSE * 2 ** (attempt - 1)))
                attempt += 1

    async def _update(self, kv: KeyValue, key: str, value: bytes, last: int) -> int:
        """What `KeyValue.update` does, through `_to_stream`: a conversation writes its snapshot and its
        send ledger this way, and nats-py's own publish costs twice as much."""
        # nats-py keeps the subject prefix of the bucket's keys (with a JetStream domain's, if any) there.
        subject = kv._pre + key
        try:
            ack = await self._to_stream(subject, value, {Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(last)})
        except APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                raise KeyWrongLastSequenceError(description=exc.description) from exc
            raise
        return ack.seq

    async def put_expiring(self, bucket: str, key: str, value: bytes, *, ttl: float) -> asyncio.Future[PubAck]:
        """Start writing `key` of KV `bucket`, for the server to remove `ttl` seconds later (a per-message
        TTL: nats-server 2.11 or later, on a bucket that allows it). Returns the future of the server's ack
        at once, so that many writes go out together; it fails with nats-py's exception when the server
        refuses the write, and is never answered when the answer is lost: wait for it with a timeout."""
        subject = f"$KV.{bucket}.{key}"
        self.check(subject, value, _TTL_HEADERS)
        return await self._answered_later(subject, value, {Header.MSG_TTL.value: str(int(ttl))})

    async def _answered_later(self, subject: str, payload: bytes,
                              headers: dict[str, str] | None) -> asyncio.Future[PubAck]:
        """Publish to JetStream now; the future of its ack. nats-py's `publish_async` does the same at
        about twice the cost (a semaphore taken with a timeout, the answer read with `json` into a
        dataclass), and never completes the future of a write the server refused."""
        prefix = self._answer_prefix or await self._subscribe_to_answers()
        token = str(next(self._tokens))
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self._awaited[token] = future
        future.add_done_callback(lambda _: self._awaited.pop(token, None))  # answered, given up or cancelled
        await self._nc.publish(subject, payload, reply=prefix + token, headers=headers)
        return future

    async def _subscribe_to_answers(self) -> str:
        """The inbox the stream's answers to `_answered_later` come to, subscribed on first use (nats-py
        subscribes it again after a reconnection)."""
        async with self._subscribing:
            if not self._answer_prefix:
                prefix = self._nc.new_inbox() + "."
                await self._nc.subscribe(prefix + "*", cb=self._on_answer)
                self._answer_prefix = prefix
        return self._answer_prefix

    async def _on_answer(self, msg: Msg) -> None:
        future = self._awaited.pop(msg.subject[len(self._answer_prefix):], None)
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get(Header.STATUS.value) == _NO_RESPONDERS:
            future.set_exception(NoStreamResponseError())
            return
        try:
            answer = _read_answer(msg.data)
            if answer.error is not None:
                _raise_api_error(answer.error)
        except (msgspec.DecodeError, APIError) as exc:
            future.set_exception(exc)
            return
        future.set_result(PubAck(stream=answer.stream, seq=answer.seq, domain=answer.domain,
                                 duplicate=answer.duplicate))


def _raise_api_error(error: dict[str, Any]) -> NoReturn:
    """The nats-py exception for a JetStream API error answer (`APIError.from_error` raises it)."""
    APIError.from_error(error)
    raise APIError(**error)  # from_error always raises; this keeps the type checker informed
