"""What every REST endpoint of the hub shares: how it is declared, authenticated, limited, answered.

An API plug-in (`babelhub.plugins.RestApi`) lists its `Endpoint`s; the hub serves each with
`Authorization: Bearer <key>` checked (`babelhub.services.apikeys`), the scope it needs, the caller's rate
limits (`RateLimits`), and every refusal in one shape, `{"error": {"code", "message", "path"}}`. The same
declarations make the OpenAPI document at `/openapi.json` (`openapi`), so it cannot drift from the routes.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

import msgspec
from aiohttp import web

from babelhub.services.apikeys import Caller
from babelhub.services.outbox import Refusal

__all__ = ["ERRORS", "Endpoint", "Param", "Rate", "RateLimits", "Refused", "decode", "openapi", "read_body"]

Need = Literal["admin", "send", "read", "operator"]
Handler = Callable[[web.Request, Caller], Awaitable[web.StreamResponse]]
T = TypeVar("T")


@dataclass(frozen=True)
class Param:
    """A query or path parameter, for the OpenAPI document."""

    name: str
    description: str
    where: Literal["query", "path", "header"] = "query"
    type: Literal["string", "integer", "boolean"] = "string"
    required: bool = False


@dataclass(frozen=True)
class Endpoint:
    """One method on one path: what it needs of the caller, what it takes and answers."""

    method: str
    path: str
    """aiohttp's form: `/v1/keys/{id}`; each `{name}` is a path parameter."""
    handler: Handler
    need: Need
    summary: str
    body: type[Any] | None = None
    """The Struct a request body decodes to (400 naming the path of what is wrong)."""
    answer: type[Any] | None = None
    """What a successful answer holds (a Struct, or `list[Struct]`)."""
    status: int = 200
    params: tuple[Param, ...] = ()
    errors: tuple[int, ...] = ()
    """Statuses it may answer beside those every endpoint may (`ERRORS`): 409, 413, 501, 502…"""


ERRORS: Final = {400: "invalid", 401: "no or unknown key", 403: "the key lacks the scope this needs",
                 404: "no such thing for this tenant", 405: "method not allowed (Allow)",
                 429: "rate limited (Retry-After)", 503: "NATS unreachable for now (Retry-After)"}
"""What every endpoint may answer, in the one error shape."""
_MORE_ERRORS: Final = {409: "conflict: it exists, or changed since it was read", 413: "body too large",
                       501: "the channel cannot do this", 502: "the channel failed or answered unreadably"}


class Refused(Refusal):
    """A refusal answered with headers of its own (`WWW-Authenticate`, `Retry-After`, `Allow`)."""

    def __init__(self, status: int, code: str, message: str, path: str = "",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status, code, message, path)
        self.headers = headers or {}


# ------------------------------------------------------------------------------------ request bodies

async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, refused with 413 beyond `limit` bytes (`hub.max_body_bytes`) before it is all read."""
    too_large = Refusal(413, "too_large", f"the body is larger than the hub's limit of {limit} bytes "
                                          "(hub.max_body_bytes)")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    if len(body) > limit:
        raise too_large
    return body


def decode(body: bytes, struct: type[T]) -> T:
    """`body` (JSON) as `struct`; a 400 naming the JSON path of what is wrong."""
    try:
        decoded: T = msgspec.json.decode(body, type=struct)
    except msgspec.ValidationError as exc:
        reason, _, where = str(exc).partition(" - at `")
        if where.startswith("key` in `"):  # msgspec names the object whose key is wrong
            reason, where = f"{reason} (a key)", where.removeprefix("key` in `")
        raise Refusal(400, "invalid", reason, where.rstrip("`") or "$") from None
    except msgspec.DecodeError as exc:
        raise Refusal(400, "invalid", f"the body is not JSON: {exc}", "$") from None
    return decoded


# ------------------------------------------------------------------------------------ rate limits

@dataclass(frozen=True)
class Rate:
    """`per_second` requests on average, `burst` at once; `per_second` 0: no limit."""

    per_second: float
    burst: int


@dataclass
class _Bucket:
    tokens: float
    at: float


MAX_BUCKETS: Final = 10_000
"""Callers tracked at once per process; the least recently seen is forgotten first (it starts full again)."""


@dataclass
class RateLimits:
    """Token buckets per tenant and per key, in this process (each hub process limits what it serves).
    `tenant_rate` says a tenant's rate; a key's own is on its `Caller`. A request over either is answered
    429 with `Retry-After`, the seconds until it would be admitted."""

    tenant_rate: Callable[[str], Awaitable[Rate]]
    clock: Callable[[], float] = time.monotonic
    _buckets: OrderedDict[str, _Bucket] = field(default_factory=OrderedDict)

    async def admit(self, caller: Caller) -> None:
        if caller.operator:
            return
        limits = [(f"tenant:{caller.tenant}", await self.tenant_rate(caller.tenant)),
                  (f"key:{caller.key_id}", Rate(caller.requests_per_second, max(1, caller.burst)))]
        now = self.clock()
        buckets = [(self._bucket(name, rate, now), rate) for name, rate in limits if rate.per_second > 0]
        wait = max((_wait(bucket, rate) for bucket, rate in buckets), default=0.0)
        if wait > 0:
            seconds = str(math.ceil(wait))
            raise Refused(429, "rate_limited", f"too many requests; retry in {seconds} s", "",
                          {"Retry-After": seconds})
        for bucket, _ in buckets:
            bucket.tokens -= 1

    def _bucket(self, name: str, rate: Rate, now: float) -> _Bucket:
        bucket = self._buckets.pop(name, None) or _Bucket(tokens=float(rate.burst), at=now)
        bucket.tokens = min(float(rate.burst), bucket.tokens + (now - bucket.at) * rate.per_second)
        bucket.at = now
        self._buckets[name] = bucket
        while len(self._buckets) > MAX_BUCKETS:
            self._buckets.popitem(last=False)
        return bucket


def _wait(bucket: _Bucket, rate: Rate) -> float:
    return 0.0 if bucket.tokens >= 1 else (1 - bucket.tokens) / rate.per_second


# ------------------------------------------------------------------------------------ OpenAPI

_ERROR_SCHEMA: Final = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message", "path"], "properties": {
        "code": {"type": "string"}, "message": {"type": "string"},
        "path": {"type": "string", "description": "JSON path in the body, or the parameter's name"}}}}}


def openapi(endpoints: Iterable[Endpoint], version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `endpoints`."""
    endpoints = list(endpoints)
    types = [t for e in endpoints for t in (e.body, e.answer) if t is not None]
    schemas, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    refs = dict(zip(types, schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = _operation(endpoint, refs)
    components["Error"] = _ERROR_SCHEMA
    return {"openapi": "3.1.0", "info": {"title": "babelhub", "version": version}, "paths": paths,
            "components": {"schemas": components,
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearer": []}]}


def _body_errors(endpoint: Endpoint) -> tuple[int, ...]:
    return (413,) if endpoint.body is not None else ()


def _operation(endpoint: Endpoint, refs: dict[Any, Any]) -> dict[str, Any]:
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    answer: dict[str, Any] = {"description": "OK"}
    if endpoint.answer is not None:
        answer["content"] = {"application/json": {"schema": refs[endpoint.answer]}}
    operation: dict[str, Any] = {
        "summary": endpoint.summary,
        "description": f"Needs a key with scope `{endpoint.need}`." if endpoint.need != "operator"
        else "Needs the operator key (`hub.operator_key`).",
        "responses": {str(endpoint.status): answer,
                      **{str(status): {"description": (ERRORS | _MORE_ERRORS).get(status, "refused"), **error}
                         for status in sorted({*ERRORS, *endpoint.errors, *_body_errors(endpoint)})}},
    }
    declared = {p.name for p in endpoint.params}
    in_path = [Param(name, f"the {name} of the path", "path") for name in re.findall(r"{(\w+)}", endpoint.path)
               if name not in declared]
    params = [{"name": p.name, "in": p.where, "required": p.required or p.where == "path",
               "description": p.description, "schema": {"type": p.type}} for p in (*in_path, *endpoint.params)]
    if params:
        operation["parameters"] = params
    if endpoint.body is not None:
        operation["requestBody"] = {"required": True,
                                    "content": {"application/json": {"schema": refs[endpoint.body]}}}
    return operation
