"""The codec fuzzer (`bench/fuzz_codecs.py`) as a smoke test: a few hundred structure-aware mutants of
every codec's fixtures raise nothing but DecodeError and decode into envelopes canonical JSON carries.
The full run (10^6 mutants or a time budget per codec) is `make bench`."""

from __future__ import annotations

from typing import Any

import pytest

from babelhub.codecs import available
from babelhub.codecs.base import DecodeContext, HttpRequest
from babelhub.codecs.twilio import TwilioCodec
from bench.fuzz_codecs import Report, fuzz, seeds

MUTANTS = 300
BUDGET = 120.0
"""Seconds a codec may take at most: a safety cap for a very slow machine, not a timing assertion."""


def _findings(report: Report) -> str:
    crashes = [f"{site}: {sample.describe()}" for site, sample in report.crashes.items()]
    invalid = [f"{reason}: {sample.describe()}" for reason, sample in report.invalid.items()]
    return "\n".join(crashes + invalid)


@pytest.mark.parametrize("channel", available())
def test_a_few_hundred_mutants_find_no_crash_and_no_invalid_envelope(channel: str) -> None:
    assert seeds(channel), f"tests/fixtures/{channel}/ holds no seed for the fuzzer"
    report = fuzz(channel, mutants=MUTANTS, budget=BUDGET, seed=20261202)
    assert report.mutants == MUTANTS
    assert report.clean, _findings(report)


class _CrashingTwilio(TwilioCodec):
    """A codec with the kind of bug the fuzzer exists for: a KeyError on a status without `To`."""

    def decode(self, request: HttpRequest, ctx: DecodeContext) -> list[Any]:
        envelopes = super().decode(request, ctx)
        fields = dict(pair.split("=", 1) for pair in request.body.decode().split("&") if "=" in pair)
        if "MessageStatus" in fields and "To" not in fields:
            raise KeyError("To")
        return envelopes


def test_the_fuzzer_reports_a_crash_site_with_a_minimized_example() -> None:
    report = fuzz("twilio", mutants=3000, budget=BUDGET, seed=1, codec=_CrashingTwilio())
    (site,) = report.crashes
    assert site.startswith("decode: KeyError at tests/test_fuzz_codecs.py:")
    example = report.crashes[site]
    assert example.pairs is not None
    names = {name for name, _ in example.pairs}
    assert "MessageStatus" in names and "To" not in names
    assert len(names) <= 3  # minimized: MessageSid, MessageStatus and at most one field more
    with pytest.raises(KeyError):
        _CrashingTwilio().decode(example.request("twilio"), DecodeContext(tenant="t", connection="c"))
