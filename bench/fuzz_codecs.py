"""Structure-aware mutation fuzzer for the channel codecs' decode path.

Every fixture under `tests/fixtures/<channel>/` is a seed for the codec of that name: JSON bodies are
mutated as JSON trees, form fixtures (`{"_content_type": "application/x-www-form-urlencoded", "_raw":
...}`) as lists of fields. A mutant is one to three of: a key dropped, a value's type swapped, NaN,
infinities and huge numbers, lone surrogates, deep nesting, a value spliced in from another seed, a
garbled form field, a truncated body, a wrong content type. Each mutant goes through what ingest and
the connection actor call on a raw record: `dedup_key`, then `decode`.

The contract checked: both raise nothing but `DecodeError`, and every envelope `decode` returns is
accepted by `canonical.encode` and survives `canonical.decode(canonical.encode(envelope))` unchanged.
Per codec it prints the mutants run, the crash sites (exception type and the innermost babelhub
file:line, deduplicated, with one minimized example each), the invalid envelopes, and how many inputs
took more than 50 ms of CPU time (a figure, never a failure; CPU time, so that other processes on the
machine do not count), and of those how many are larger than the hub's default body limit (512 KiB for
a webhook, 64 KiB for a web chat frame): the hub answers those 413 or closes the socket before any
codec reads them.

    python bench/fuzz_codecs.py [--codec NAME ...] [--budget SECONDS] [--mutants N] [--seed N]

Exit status 1 when any codec has a crash site or an invalid envelope.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import random
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeAlias
from urllib.parse import parse_qsl, urlencode

from babelhub import canonical
from babelhub.codecs import available, load, native
from babelhub.codecs.base import SESSION_HEADER, Codec, DecodeContext, HttpRequest
from babelhub.errors import DecodeError
from babelhub.services.config import HubSettings

ROOT: Final = Path(__file__).resolve().parents[1]
FIXTURES: Final = ROOT / "tests" / "fixtures"
FORM: Final = "application/x-www-form-urlencoded"
JSON: Final = "application/json"
CONTEXT: Final = DecodeContext(tenant="fuzz", connection="fuzz-main", seq=1)
RECEIVED_AT: Final = 1_700_000_000.0
SLOW_MS: Final = 50.0
MINIMIZE_TRIES: Final = 2_000
"""Decode calls spent shrinking one crash example."""

#: Headers a codec needs to read a delivery at all (the web chat records each frame with its session).
BASE_HEADERS: Final[dict[str, dict[str, str]]] = {"webchat": {SESSION_HEADER: "s-fuzz"}}

Pairs: TypeAlias = list[tuple[str, str]]



@dataclass(frozen=True)
class Verbatim:
    """JSON text written into the body as it is, where Python's JSON writer cannot produce it: nesting
    deeper than its recursion allows, a number with more digits than `int` converts to text."""

    text: str


_VERBATIM: Final[list[str]] = []
_PLACEHOLDER: Final = re.compile(r'"\\u0000verbatim:(\d+)\\u0000"')


def _placeholder(value: object) -> str:
    if isinstance(value, Verbatim):
        _VERBATIM.append(value.text)
        return f"\x00verbatim:{len(_VERBATIM) - 1}\x00"
    raise TypeError(f"{type(value).__name__} is not JSON")


def _json_text(tree: Any) -> str:
    """`tree` as JSON text: NaN and Infinity literals and lone surrogates (as escapes) included."""
    _VERBATIM.clear()
    text = json.dumps(tree, allow_nan=True, default=_placeholder)
    return _PLACEHOLDER.sub(lambda found: _VERBATIM[int(found[1])], text)

# ------------------------------------------------------------------------------------------ inputs


@dataclass
class Sample:
    """One input: a JSON tree (`tree`) or form fields (`pairs`), or raw bytes once it was truncated or
    garbled past structure."""

    content_type: str
    tree: Any = None
    pairs: Pairs | None = None
    raw: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"

    def body(self) -> bytes:
        if self.raw is not None:
            return self.raw
        if self.pairs is not None:
            return urlencode(self.pairs, errors="surrogatepass").encode("ascii")
        # allow_nan: NaN/Infinity literals are a mutation; ensure_ascii keeps lone surrogates as escapes
        return _json_text(self.tree).encode()

    def request(self, channel: str) -> HttpRequest:
        headers = {**BASE_HEADERS.get(channel, {}), "content-type": self.content_type, **self.headers}
        return HttpRequest(
            method=self.method,
            path=f"/webhooks/{channel}/{CONTEXT.connection}",
            headers=headers,
            body=b"" if self.method == "GET" and self.raw is None else self.body(),
            query=self._query(),
            url=f"https://hub.example.com/webhooks/{channel}/{CONTEXT.connection}",
            received_at=RECEIVED_AT,
        )

    def _query(self) -> dict[str, str]:
        """A GET's fields, as mutated: a codec takes any `str`, lone surrogates included (aiohttp would
        have replaced invalid UTF-8, but records can come from elsewhere)."""
        if self.method != "GET" or self.pairs is None:
            return {}
        return dict(self.pairs)

    def copy(self) -> Sample:
        return Sample(
            content_type=self.content_type,
            tree=copy.deepcopy(self.tree),
            pairs=list(self.pairs) if self.pairs is not None else None,
            raw=self.raw,
            headers=dict(self.headers),
            method=self.method,
        )

    def describe(self) -> str:
        text = self.body().decode("utf-8", "backslashreplace")
        extra = f" {self.method}" if self.method != "POST" else ""
        return f"[{self.content_type}{extra}] {text if len(text) <= 600 else text[:600] + '…'}"


def seeds(channel: str) -> list[Sample]:
    """Every fixture of `channel` as a sample."""
    folder = FIXTURES / channel
    samples = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        document = json.loads(path.read_text())
        if isinstance(document, dict) and document.get("_content_type") == FORM and "_raw" in document:
            samples.append(Sample(content_type=FORM, pairs=parse_qsl(str(document["_raw"]), keep_blank_values=True)))
        else:
            samples.append(Sample(content_type=JSON, tree=document))
    return samples


# --------------------------------------------------------------------------------------- mutations

_HUGE: Final[list[Any]] = [
    math.nan, math.inf, -math.inf, 10**400, -(10**400), 2**64, -(2**63) - 1, 2**63 - 1, 2**62, 1e308, -1e308, -1, 0,
    2**53 + 1, 1e-320, Verbatim("9" * 5000), Verbatim("-1e99999"), Verbatim("1" + "0" * 400 + ".5"),
]
_STRINGS: Final = [
    "", " ", "\ud800", "a\udfffb", "\x00", "nan", "NaN", "inf", "-1", "1e999", "99999999999999999999999",
    "💬" * 3, "\u202e", "x" * 5000, "true", "null", "{}", "[]", "2019-02-30T25:61:00Z", "not json", "0x10",
]


def _paths(tree: Any, limit: int = 400) -> list[tuple[Any, Any]]:
    """(container, key) for every value inside `tree`, breadth first, at most `limit`."""
    found: list[tuple[Any, Any]] = []
    queue: list[Any] = [tree]
    while queue and len(found) < limit:
        node = queue.pop(0)
        children: Iterator[tuple[Any, Any]]
        if isinstance(node, dict):
            children = iter(list(node.items()))
        elif isinstance(node, list):
            children = iter(list(enumerate(node)))
        else:
            continue
        for key, value in children:
            found.append((node, key))
            queue.append(value)
    return found


def _values(tree: Any) -> list[Any]:
    return [container[key] for container, key in _paths(tree)]


def _swapped(value: Any, rng: random.Random) -> Any:
    """A value of another JSON type, often built from `value` so that it stays plausible."""
    choices: list[Callable[[], Any]] = [
        lambda: str(value) if not isinstance(value, str) else rng.choice([0, 1.5, True]),
        lambda: [value],
        lambda: {"value": value},
        lambda: None,
        lambda: rng.choice([True, False]),
        lambda: rng.choice(_HUGE),
        lambda: rng.choice(_STRINGS),
        lambda: {},
        lambda: [],
        lambda: len(value) if isinstance(value, str | list | dict) else rng.randint(-5, 5),
    ]
    return rng.choice(choices)()


def _nested(value: Any, rng: random.Random) -> Any:
    """`value` nested a little (kept in the tree) or too deep for any recursive reader (written out
    verbatim as that many brackets)."""
    depth = rng.choice([20, 100, 5_000, 100_000])
    if depth > 100:
        return Verbatim("[" * depth + "0" + "]" * depth)
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"a": value}
    return value


def _mutate_tree(sample: Sample, rng: random.Random, donors: list[Any]) -> None:
    slots = _paths(sample.tree)
    if not slots:
        sample.tree = _swapped(sample.tree, rng)
        return
    container, key = rng.choice(slots)
    value = container[key]
    operation = rng.randrange(9)
    if operation == 0 and isinstance(container, dict):
        del container[key]
    elif operation == 0 and isinstance(container, list):
        container.pop(key)
    elif operation in (1, 2):
        container[key] = _swapped(value, rng)
    elif operation == 3:
        container[key] = rng.choice(_HUGE)
    elif operation == 4:
        container[key] = rng.choice(_STRINGS) if rng.random() < 0.7 else (str(value) + "\ud83d")
    elif operation == 5:
        container[key] = _nested(value, rng)
    elif operation == 6 and donors:
        container[key] = copy.deepcopy(rng.choice(donors))
    elif operation == 7 and isinstance(container, dict):
        container[rng.choice([*_STRINGS[:6], "type", "id", "kind", "text"])] = _swapped(value, rng)
    elif operation == 7 and isinstance(container, list):
        container.extend([value] * rng.choice([2, 50]))
    else:
        container[key] = _swapped(value, rng)


def _form_value(rng: random.Random) -> str:
    value = rng.choice(_HUGE + _STRINGS)
    return value.text if isinstance(value, Verbatim) else str(value)


def _mutate_form(sample: Sample, rng: random.Random) -> None:
    pairs = sample.pairs if sample.pairs is not None else []
    operation = rng.randrange(6)
    index = rng.randrange(len(pairs)) if pairs else 0
    if operation == 0 and pairs:
        pairs.pop(index)
    elif operation == 1 and pairs:
        name, _ = pairs[index]
        pairs[index] = (name, _form_value(rng))
    elif operation == 2 and pairs:
        pairs.append(pairs[index])  # a field given twice
    elif operation == 3:
        name = rng.choice(["NumMedia", "Latitude", "Longitude", "MediaUrl0", "MediaContentType0", "MessageStatus",
                           "ErrorCode", "MessageSid", "ButtonPayload", "ListId", "payload", "text", "user_id"])
        pairs.append((name, _form_value(rng)))
    elif operation == 4:
        sample.raw = sample.body() + rng.choice([b"&", b"=", b"%", b"%zz", b"&=x", b"%ff%fe", b"%ed%a0%80", b"&&a"])
    else:
        sample.method = "GET"  # the same fields in the query string
    sample.pairs = pairs


def _mutate_raw(sample: Sample, rng: random.Random) -> None:
    body = sample.body()
    operation = rng.randrange(4)
    if operation == 0 and body:
        sample.raw = body[: rng.randrange(len(body))]  # truncated
    elif operation == 1 and body:
        at = rng.randrange(len(body))
        sample.raw = body[:at] + bytes([rng.randrange(256)]) + body[at + 1 :]
    elif operation == 2:
        # the other kind of body: a form as JSON, JSON as a form
        sample.content_type = JSON if sample.content_type == FORM else FORM
        if rng.random() < 0.5 and sample.tree is not None and isinstance(sample.tree, dict):
            fields = {key: _json_text(value) for key, value in sample.tree.items()}
            sample.raw = urlencode(fields, errors="surrogatepass").encode()
    else:
        sample.headers["content-type"] = rng.choice(["", "text/plain", "multipart/form-data", JSON, FORM])


def mutate(seed: Sample, rng: random.Random, donors: list[Any]) -> Sample:
    """One mutant of `seed`: one to three structural changes, sometimes followed by a byte-level one."""
    sample = seed.copy()
    for _ in range(rng.choice([1, 1, 2, 3])):
        if sample.raw is not None:
            break
        if sample.pairs is not None:
            _mutate_form(sample, rng)
        else:
            _mutate_tree(sample, rng, donors)
    if rng.random() < 0.12:
        _mutate_raw(sample, rng)
    return sample


# --------------------------------------------------------------------------------------- checking


@dataclass
class Finding:
    """What one input did: nothing wrong, a crash at `site`, or an invalid envelope."""

    site: str = ""
    invalid: str = ""
    seconds: float = 0.0
    decoded: bool = False
    """Whether `decode` returned envelopes (rather than refusing the input with a DecodeError)."""


def _crash_site(exc: BaseException) -> str:
    """The exception type and the innermost frame inside babelhub (else the innermost frame), below the
    frame that calls the codec (`native.without_collector`)."""
    stack = traceback.extract_tb(exc.__traceback__)
    calls = [index for index, frame in enumerate(stack) if frame.name == native.without_collector.__name__]
    frames = list(stack)[calls[-1] + 1:] if calls else list(stack)
    ours = [frame for frame in frames if "/babelhub/" in frame.filename] or frames
    where = f"{Path(ours[-1].filename).relative_to(ROOT)}:{ours[-1].lineno}" if ours else "?"
    if ours and not Path(ours[-1].filename).is_relative_to(ROOT):
        where = f"{ours[-1].filename}:{ours[-1].lineno}"
    return f"{type(exc).__name__} at {where}"


def _invalid(envelope: Any) -> str:
    """Why `envelope` cannot travel as canonical JSON, or ""."""
    if not isinstance(envelope, canonical.Message | canonical.Status | canonical.Activity):
        return f"not an envelope: {type(envelope).__name__}"
    try:
        encoded = canonical.encode(envelope)
    except Exception as exc:  # any refusal of the encoder is the finding
        return f"canonical.encode refuses it: {type(exc).__name__}: {exc}"
    try:
        decoded = canonical.decode(encoded)
    except DecodeError as exc:
        return f"canonical.decode refuses its JSON: {exc}"
    if decoded != envelope:
        return "changes on the way through canonical JSON (NaN, bytes or tuples in an open field?)"
    return ""


def check(codec: Codec, sample: Sample) -> Finding:
    request = sample.request(codec.channel)
    started = time.process_time()
    try:
        native.without_collector(partial(codec.dedup_key, request))  # as the hub calls codecs
    except DecodeError:
        pass
    except Exception as exc:  # every other exception is a crash site
        return Finding(site="dedup_key: " + _crash_site(exc), seconds=time.process_time() - started)
    try:
        envelopes = native.without_collector(partial(codec.decode, request, CONTEXT))
    except DecodeError:
        return Finding(seconds=time.process_time() - started)
    except Exception as exc:
        return Finding(site="decode: " + _crash_site(exc), seconds=time.process_time() - started)
    elapsed = time.process_time() - started
    for envelope in envelopes:
        reason = _invalid(envelope)
        if reason:
            return Finding(invalid=reason, seconds=elapsed, decoded=True)
    return Finding(seconds=elapsed, decoded=True)


def _same_failure(codec: Codec, sample: Sample, finding: Finding) -> bool:
    again = check(codec, sample)
    return (again.site, again.invalid) == (finding.site, finding.invalid)


def minimize(codec: Codec, sample: Sample, finding: Finding, budget: int = MINIMIZE_TRIES) -> Sample:
    """A smaller input with the same failure: greedily drop keys, list items and fields, and flatten
    subtrees, while the failure stays the same."""
    best = sample.copy()
    tries = 0
    improved = True
    while improved and tries < budget:
        improved = False
        for candidate in _shrinks(best):
            tries += 1
            if tries >= budget:
                break
            if _same_failure(codec, candidate, finding):
                best, improved = candidate, True
                break
    return best


def _shrinks(sample: Sample) -> Iterator[Sample]:
    if sample.raw is not None:
        return
    if sample.pairs is not None:
        for index in range(len(sample.pairs)):
            smaller = sample.copy()
            assert smaller.pairs is not None
            smaller.pairs.pop(index)
            yield smaller
        return
    for index in range(len(_paths(sample.tree))):
        for replace in (False, True):
            smaller = sample.copy()
            container, key = _paths(smaller.tree)[index]
            value = container[key]
            if not replace:
                if isinstance(container, dict):
                    del container[key]
                else:
                    container.pop(key)
            elif isinstance(value, dict | list) and value:
                container[key] = type(value)()
            else:
                continue
            yield smaller


# ------------------------------------------------------------------------------------------ running


def hub_limit(channel: str) -> int:
    """The largest body the hub hands `channel`'s codec with its default settings."""
    settings = HubSettings()
    return settings.max_frame_bytes if channel == "webchat" else settings.max_body_bytes


@dataclass
class Report:
    channel: str
    mutants: int = 0
    decoded: int = 0
    seconds: float = 0.0
    crashes: dict[str, Sample] = field(default_factory=dict)
    crash_counts: dict[str, int] = field(default_factory=dict)
    invalid: dict[str, Sample] = field(default_factory=dict)
    invalid_counts: dict[str, int] = field(default_factory=dict)
    slow: int = 0
    slow_over_limit: int = 0
    """Slow inputs larger than `hub_limit`: the hub never decodes them."""
    slowest_ms: float = 0.0
    slowest: Sample | None = None
    slowest_within_ms: float = 0.0
    """The slowest input no larger than `hub_limit`: one the hub does read."""
    slowest_within: Sample | None = None

    @property
    def clean(self) -> bool:
        return not self.crashes and not self.invalid


def fuzz(channel: str, *, mutants: int, budget: float, seed: int, minimize_examples: bool = True,
         slow_ms: float = SLOW_MS, codec: Codec | None = None) -> Report:
    """Run up to `mutants` mutants of `channel`'s fixtures through its codec (or `codec`, fed the same
    seeds) within `budget` seconds."""
    codec = codec or load(channel)
    samples = seeds(channel)
    if not samples:
        raise SystemExit(f"no fixtures for {channel} under {FIXTURES / channel}")
    donors = [value for sample in samples if sample.tree is not None for value in _values(sample.tree)[:200]]
    rng = random.Random(f"{seed}:{channel}")
    report = Report(channel)
    limit = hub_limit(channel)
    findings: dict[str, Finding] = {}
    started = time.perf_counter()
    # the unmutated seeds first: a fixture that already fails is the plainest example there is
    candidates = iter(samples)
    while report.mutants < mutants and time.perf_counter() - started < budget:
        sample = next(candidates, None) or mutate(rng.choice(samples), rng, donors)
        finding = check(codec, sample)
        report.mutants += 1
        report.decoded += finding.decoded
        if finding.seconds * 1000 > slow_ms:
            report.slow += 1
            report.slow_over_limit += len(sample.body()) > limit
        if finding.seconds * 1000 > report.slowest_ms:
            report.slowest_ms, report.slowest = finding.seconds * 1000, sample
        if finding.seconds * 1000 > report.slowest_within_ms and len(sample.body()) <= limit:
            report.slowest_within_ms, report.slowest_within = finding.seconds * 1000, sample
        _record(report, findings, finding, sample)
    report.seconds = time.perf_counter() - started
    if minimize_examples:
        for key, sample in report.crashes.items():
            report.crashes[key] = minimize(codec, sample, findings[key])
        for key, sample in report.invalid.items():
            report.invalid[key] = minimize(codec, sample, findings[key])
    return report


def _record(report: Report, findings: dict[str, Finding], finding: Finding, sample: Sample) -> None:
    """Keep the shortest example per crash site and per invalid-envelope reason."""
    if finding.site:
        key, examples, counts = finding.site, report.crashes, report.crash_counts
    elif finding.invalid:
        key, examples, counts = _site_of_invalid(finding.invalid), report.invalid, report.invalid_counts
    else:
        return
    counts[key] = counts.get(key, 0) + 1
    if key not in examples or len(sample.body()) < len(examples[key].body()):
        examples[key], findings[key] = sample, finding


def _site_of_invalid(reason: str) -> str:
    """Invalid envelopes are grouped by the reason without the offending value."""
    return reason.split(" in position")[0][:160]


def print_report(report: Report) -> None:
    rate = report.mutants / report.seconds if report.seconds else 0.0
    print(
        f"{report.channel}: {report.mutants:,} mutants in {report.seconds:.1f} s ({rate:,.0f}/s), "
        f"{report.decoded / max(report.mutants, 1):.0%} decoded; "
        f"crash sites {len(report.crashes)}, invalid envelopes {sum(report.invalid_counts.values())}, "
        f"slow (>{SLOW_MS:g} ms) {report.slow} ({report.slow_over_limit} over the hub's "
        f"{hub_limit(report.channel) // 1024} KiB limit), slowest {report.slowest_ms:.1f} ms"
    )
    if report.slowest is not None and report.slow:
        print(f"  slowest input ({len(report.slowest.body()):,} bytes): {report.slowest.describe()[:300]}")
    if report.slowest_within is not None and report.slow > report.slow_over_limit:
        print(f"  slowest within the limit ({len(report.slowest_within.body()):,} bytes, "
              f"{report.slowest_within_ms:.1f} ms): {report.slowest_within.describe()[:300]}")
    for site, sample in report.crashes.items():
        print(f"  CRASH {site} ({report.crash_counts[site]} inputs)\n    minimized: {sample.describe()}")
    for reason, sample in report.invalid.items():
        print(f"  INVALID {reason} ({report.invalid_counts[reason]} inputs)\n    minimized: {sample.describe()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codec", action="append", help="a channel name (repeatable); default: every codec")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per codec (default 60)")
    parser.add_argument("--mutants", type=int, default=1_000_000, help="mutants per codec at most (default 10^6)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed replays the same mutants")
    arguments = parser.parse_args(argv)
    channels = arguments.codec or available()
    codecs = {channel: load(channel) for channel in channels}
    # What is loaded now lives as long as the run. Frozen, it is left out of the collector's full
    # passes, which otherwise walk the whole import-time heap (25-50 ms on these machines) inside
    # whichever mutant happens to allocate at that moment, and count as that input's time.
    gc.freeze()
    clean = True
    for channel in channels:
        report = fuzz(channel, mutants=arguments.mutants, budget=arguments.budget, seed=arguments.seed,
                      codec=codecs[channel])
        print_report(report)
        sys.stdout.flush()
        clean = clean and report.clean
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
