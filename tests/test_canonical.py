"""The canonical envelope: JSON round trips, deterministic ids, errors that name the path, the schema."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest
from hypothesis import given

from babelhub import canonical as c
from babelhub.errors import DecodeError
from tests.strategies import envelopes


@given(envelopes)
def test_every_envelope_round_trips_through_json(envelope: c.Envelope) -> None:
    assert c.decode(c.encode(envelope)) == envelope


@given(envelopes)
def test_every_encoded_envelope_validates_against_the_published_schema(envelope: c.Envelope) -> None:
    jsonschema.Draft202012Validator(c.schema()).validate(json.loads(c.encode(envelope)))


def test_defaults_are_left_out_and_unknown_fields_are_ignored() -> None:
    message = c.Message(id="m1", tenant="t", conversation=c.Conversation(id="c1"), ts=c.now(),
                        parts=[c.Text(text="hi")])
    data = json.loads(c.encode(message))
    assert data["kind"] == "message"
    assert "reply_to" not in data and "meta" not in data and "targets" not in data
    assert data["parts"] == [{"type": "text", "text": "hi"}]
    # A newer writer added fields this reader does not know: they are ignored, not an error.
    data["future_field"] = {"anything": 1}
    data["parts"][0]["future_part_field"] = True
    assert c.decode(json.dumps(data)) == message


@pytest.mark.parametrize(
    ("document", "path"),
    [
        ('{"kind":"message","id":"m","tenant":"t","conversation":{"id":"c"},"ts":"2026-01-01T00:00:00Z",'
         '"parts":[{"type":"text","text":"ok"},{"type":"media","media":"hologram"}]}', "$.parts[1].media"),
        ('{"kind":"message","id":"m","tenant":"t","conversation":{"id":"c"},"ts":"2026-01-01T00:00:00Z",'
         '"parts":[{"type":"text","text":5}]}', "$.parts[0].text"),
        ('{"kind":"message","id":"m","tenant":"t","conversation":{"id":7},"ts":"2026-01-01T00:00:00Z"}',
         "$.conversation.id"),
        ('{"kind":"message","id":"m","tenant":"t","conversation":{"id":"c"},"ts":"2026-01-01T00:00:00"}', "$.ts"),
        ('{"kind":"status","id":"m","tenant":"t","conversation":{"id":"c"},"ts":"2026-01-01T00:00:00Z",'
         '"state":"teleported"}', "$.state"),
        ('{"kind":"postcard","id":"m"}', "$.kind"),
        ('{"kind":"message","tenant":"t","conversation":{"id":"c"},"ts":"2026-01-01T00:00:00Z"}', "$"),
        ('{"kind":"message","id":"m","tenant":"t","conversation":{"id":"c"},"ts":"2026-01-01T00:00:00Z",'
         '"parts":[{"type":"buttons","buttons":[{"id":"a","title":"A","action":"teleport"}]}]}',
         "$.parts[0].buttons[0].action"),
    ],
)
def test_wrong_types_give_a_decode_error_naming_the_path(document: str, path: str) -> None:
    with pytest.raises(DecodeError) as caught:
        c.decode(document)
    assert caught.value.path == path
    assert path in str(caught.value)


@pytest.mark.parametrize("document", [b"", b"{", b'{"kind": "message",}', b"\xff\xfe", b"{\"kind\": \"mess"])
def test_malformed_json_gives_a_decode_error(document: bytes) -> None:
    with pytest.raises(DecodeError, match="malformed JSON"):
        c.decode(document)


def test_inbound_ids_are_deterministic_and_subject_safe() -> None:
    first = c.message_id("acme", "tg-main", "12345:678")
    assert first == c.message_id("acme", "tg-main", "12345:678")
    assert first != c.message_id("acme", "tg-other", "12345:678")
    assert first != c.message_id("globex", "tg-main", "12345:678")
    assert c.conversation_id("acme", "tg-main", "42") != c.message_id("acme", "tg-main", "42")
    # Length-prefixed: shifting a character between components changes the id.
    assert c.stable_id("ab", "c") != c.stable_id("a", "bc")
    for value in (first, c.conversation_id("acme", "tg", "a.b *>"), c.new_id()):
        assert value.isalnum() and value.islower() and len(value) == 24


def test_new_ids_are_unique() -> None:
    generated = [c.new_id() for _ in range(2000)]
    assert len(set(generated)) == len(generated)


def test_new_ids_sort_by_creation_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every step of the millisecond counter, across the character boundaries where plain RFC 4648
    # base32 ("z" < "2" is false in ASCII) would break the order.
    start = 1_763_800_000_000
    clock = iter(range(start, start + 4096))
    monkeypatch.setattr(c.time, "time_ns", lambda: next(clock) * 1_000_000)
    generated = [c.new_id() for _ in range(4096)]
    assert generated == sorted(generated)


def test_schema_command_prints_a_valid_draft_2020_12_schema() -> None:
    result = subprocess.run([sys.executable, "-m", "babelhub", "schema"], capture_output=True, check=True)
    schema = json.loads(result.stdout)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    kinds = {ref["$ref"].rsplit("/", 1)[-1] for ref in schema["anyOf"]}
    assert kinds == {"Message", "Status", "Activity"}
