"""Metrics (Prometheus text at /metrics) and trace propagation (W3C `traceparent` in NATS and HTTP headers).

One trace runs from the webhook to the channel API call: the ingest span's context rides the raw
record's NATS headers, the actors carry it with each message, and the outbound HTTP call sends it on.

Logs never carry a configured secret: `mask_logs` masks secret values in every log record, whichever
library made it (a Telegram bot token in a URL, an aiohttp exception's repr, a traceback).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from babelhub.redaction import SecretMask

__all__ = ["Metrics", "carrier", "mask_logs", "setup_tracing", "span"]

tracer = trace.get_tracer("babelhub")

_log_masks: list[SecretMask] = []
_unmasked_factory = logging.getLogRecordFactory()
_traceback_formatter = logging.Formatter()


def mask_logs(mask: SecretMask) -> Callable[[], None]:
    """Mask `mask`'s secret values in every log record made from now on (message, traceback, stack),
    until the returned function is called. A record factory rather than a handler filter, so that it
    holds for every logger and every handler, including ones set up after the hub started."""
    global _unmasked_factory
    if logging.getLogRecordFactory() is not _masked_record:
        _unmasked_factory = logging.getLogRecordFactory()
        logging.setLogRecordFactory(_masked_record)
    _log_masks.append(mask)

    def unmask() -> None:
        with contextlib.suppress(ValueError):
            _log_masks.remove(mask)

    return unmask


def _masked_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _unmasked_factory(*args, **kwargs)
    for mask in list(_log_masks):
        _mask_record(record, mask)
    return record


def _mask_record(record: logging.LogRecord, mask: SecretMask) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: logging reports it when the record is emitted
        return
    if mask.found_in(message):
        record.msg, record.args = mask.text(message), None
    if record.exc_info and record.exc_info[1] is not None:
        text = record.exc_text or _traceback_formatter.formatException(record.exc_info)
        if mask.found_in(text):
            record.exc_text = mask.text(text)  # formatters print exc_text when it is set
    if record.stack_info and mask.found_in(record.stack_info):
        record.stack_info = mask.text(record.stack_info)


def setup_tracing(mode: str) -> None:
    """`propagate` (default): no spans are recorded, but the W3C trace context still travels from the
    webhook through NATS to the channel API, so an application's own tracer continues the trace at no
    cost here. `console`: record spans and print them (for a look at a trace without a collector).
    An application embedding the hub may install its own tracer provider instead."""
    if mode == "console" and not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        trace.set_tracer_provider(provider)
    global _spans_checked_at
    _spans_checked_at = float("-inf")  # ask again at the next span


_SPANS_RECHECK_SECONDS = 1.0
_spans_recorded = False
_spans_checked_at = float("-inf")


def _records_spans() -> bool:
    """Whether a span-recording (SDK) tracer provider is installed. Asking OpenTelemetry reads the
    environment each time, which costs more than the rest of a skipped span; so the answer is kept: a
    provider, once set, stays (OpenTelemetry refuses to replace it), and its absence is asked again
    at most once a second (an application may install one after the hub started)."""
    global _spans_recorded, _spans_checked_at
    if _spans_recorded:
        return True
    now = time.monotonic()
    if now - _spans_checked_at >= _SPANS_RECHECK_SECONDS:
        _spans_checked_at = now
        _spans_recorded = isinstance(trace.get_tracer_provider(), TracerProvider)
    return _spans_recorded


def carrier() -> dict[str, str]:
    """The current trace context as headers (`traceparent`, `tracestate`)."""
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers


_NO_SPAN: AbstractContextManager[object] = nullcontext()


def span(name: str, parent: Mapping[str, str] | None = None,
         **attributes: str | int) -> AbstractContextManager[object]:
    """A span continuing the trace found in `parent` headers (else the current one).

    Without a recording tracer a span only carries a trace context on: with no `traceparent` in
    `parent` (or no `parent`) the context stays what it is, so the tracer's work is skipped on this hot
    path."""
    if not _records_spans() and (parent is None or "traceparent" not in parent):
        return _NO_SPAN
    ctx = propagate.extract(dict(parent)) if parent else context.get_current()
    return tracer.start_as_current_span(name, context=ctx, attributes=attributes)


class Metrics:
    """The hub's Prometheus metrics, in a registry of its own (several hubs can share a process in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.webhooks = Counter("babelhub_webhooks", "Webhook requests by answer", ["channel", "code"], registry=r)
        self.messages_in = Counter("babelhub_messages_in", "Inbound envelopes decoded", ["channel"], registry=r)
        self.messages_out = Counter("babelhub_messages_out", "Outbound API calls that succeeded", ["channel"],
                                    registry=r)
        self.decode_failures = Counter("babelhub_decode_failures", "Raw records that did not decode", ["channel"],
                                       registry=r)
        self.send_failures = Counter("babelhub_send_failures", "Outbound API calls that failed for good",
                                     ["channel"], registry=r)
        self.retries = Counter("babelhub_send_retries", "Outbound API calls retried", ["channel"], registry=r)
        self.paced = Counter("babelhub_send_paced_seconds", "Time outbound calls waited for the connection's "
                             "rate, a channel's Retry-After or its open circuit", ["connection"], registry=r)
        self.circuit_open = Gauge("babelhub_circuit_open", "1 while a connection's circuit is open: its channel "
                                  "is failing and only probes are sent", ["connection"], registry=r)
        self.dead_letters = Counter("babelhub_dead_letters", "Records parked in the dead-letter stream", ["stage"],
                                    registry=r)
        self.audio_relayed = Counter("babelhub_audio_frames_relayed", "Audio frames relayed between telephony "
                                     "calls and NATS, by direction (up: from the caller, down: to the caller)",
                                     ["direction"], registry=r)
        self.audio_dropped = Counter("babelhub_audio_frames_dropped", "Audio frames dropped, by direction: up "
                                     "when NATS could not take the caller's audio, down when a call's outbound "
                                     "queue was full (the oldest goes) or a frame named another stream",
                                     ["direction"], registry=r)
        self.mailbox_depth = Gauge("babelhub_mailbox_depth", "Messages waiting in actor mailboxes", ["actors"],
                                   registry=r)
        self.active_actors = Gauge("babelhub_active_actors", "Active actors", ["actors"], registry=r)

    def watch_actors(self, name: str, active: Callable[[], int], depth: Callable[[], int]) -> None:
        self.active_actors.labels(name).set_function(active)
        self.mailbox_depth.labels(name).set_function(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
