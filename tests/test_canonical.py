"""The canonical envelope: JSON round trips, deterministic ids, errors that name the path, the schema."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import subprocess
import sys
from typing import Any, get_args

import jsonschema
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


@given(st.lists(st.text(max_size=40), max_size=5))
def test_stable_ids_are_rfc4648_base32_of_the_framed_hash(components: list[str]) -> None:
    # Stable ids name stored things (KV keys, dedup ids): a faster encoding must give the same ids.
    digest = hashlib.blake2b(digest_size=15)
    for component in components:
        encoded = component.encode()
        digest.update(len(encoded).to_bytes(4, "big") + encoded)
    assert c.stable_id(*components) == base64.b32encode(digest.digest()).decode().lower()


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


# ----------------------------------------------------------------------- the header is always written

HEADER = {"kind", "id", "v", "tenant", "conversation", "direction", "ts"}


@given(envelopes)
def test_the_header_fields_are_written_even_at_their_defaults(envelope: c.Envelope) -> None:
    # A reader in another language must not need to know that "inbound", 1 or "direct" are defaults.
    data = json.loads(c.encode(envelope))
    assert set(data) >= HEADER
    assert {"id", "type"} <= set(data["conversation"])
    if data["kind"] == "status":
        assert "state" in data


def test_defaults_of_the_header_are_written_and_other_defaults_left_out() -> None:
    status = c.Status(id="s1", tenant="t", conversation=c.Conversation(id="c1"), ts=c.now())
    data = json.loads(c.encode(status))
    assert data["v"] == 1 and data["direction"] == "inbound" and data["state"] == "accepted"
    assert data["conversation"] == {"id": "c1", "type": "direct"}
    assert "message_id" not in data and "error" not in data and "meta" not in data
    header = c.schema()["$defs"]["Status"]["properties"]
    assert (header["v"]["default"], header["direction"]["default"], header["state"]["default"]) == (1, "inbound",
                                                                                                 "accepted")


# ------------------------------------------------- the schema accepts exactly what the decoder accepts

VALIDATOR = jsonschema.Draft202012Validator(c.schema())
MINIMAL = {"kind": "message", "id": "m", "tenant": "t", "conversation": {"id": "c"}, "ts": "2026-01-01T00:00:00Z"}


def decoder_accepts(document: Any) -> bool:
    try:
        c.decode(json.dumps(document))
    except DecodeError:
        return False
    return True


def schema_accepts(document: Any) -> bool:
    return bool(VALIDATOR.is_valid(document))


def assert_agree(document: Any) -> None:
    decoded, validated = decoder_accepts(document), schema_accepts(document)
    assert decoded == validated, f"decoder {'accepts' if decoded else 'rejects'}, schema disagrees: {document}"


def spelt_out(value: Any) -> Any:
    """The JSON of a canonical value with every field written, defaults and tags included."""
    if isinstance(value, msgspec.Struct):
        config = value.__struct_config__
        tag = {config.tag_field: config.tag} if config.tag_field else {}
        return {**tag, **{field.encode_name: spelt_out(getattr(value, field.name))
                          for field in msgspec.structs.fields(value)}}
    if isinstance(value, list):
        return [spelt_out(item) for item in value]
    if isinstance(value, dict):
        return {key: spelt_out(item) for key, item in value.items()}
    return msgspec.to_builtins(value)


@given(envelopes)
def test_an_envelope_with_every_default_spelt_out_is_accepted_by_both(envelope: c.Envelope) -> None:
    document = spelt_out(envelope)
    assert c.decode(json.dumps(document)) == envelope
    assert schema_accepts(document)


def _field_names() -> list[str]:
    structs = [c.Message, c.Status, c.Activity, c.Conversation, c.Sender, c.Native, c.Target, c.Error, c.Mention,
               c.Button, c.ListRow, c.ListSection, c.FormField, c.ProductItem, *get_args(c.Part)]
    return sorted({field.encode_name for struct in structs for field in msgspec.structs.fields(struct)})


FIELD_NAMES = [*_field_names(), "type", "kind"]
TAGS = ["message", "status", "activity", *(part.__struct_config__.tag for part in get_args(c.Part))]
#: Values of every JSON type, and the strings and numbers at the edges of what the fields take.
HOSTILE: list[Any] = [
    None, True, False, 0, 1, -1, 1.0, -0.0, 2.5, 1e20, 2**64, -(2**63) - 1, 10**400, -(10**400), 1.7976931348623157e308,
    "", "x", "2026-01-01T00:00:00Z", "2026-01-01 00:00:00+0530", "2026-01-01T00:00:00", "2026-02-29T00:00:00Z",
    "2024-02-29t23:59:59.999999999z", "2026-01-01T00:00:00Z\n", "YWJj", "YWI=", "YWJ", "YW\nJj", "-_-_",
    "image", "reply", "direct", "inbound", "outbound", "read", "typing", "user", *TAGS,
    [], [None], [{}], [{"type": "text", "text": "x"}], {}, {"id": "x"}, {"id": "x", "title": "y"},
    {"media": "image"}, {"type": "media", "media": "image"}, {"type": "text", "text": "x"}, {"title": "t"},
    {"product_id": "p", "quantity": 2.0}, {"connection": "c", "to": "t"}, {"code": "c"}, {"seq": 3.0},
]


def members(document: Any) -> list[tuple[Any, Any]]:
    """(key, value) of an object's members or (index, item) of an array's items; none for a scalar."""
    if isinstance(document, dict):
        return list(document.items())
    return list(enumerate(document)) if isinstance(document, list) else []


def locations(document: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The path of every object member and array item in a JSON document."""
    found: list[tuple[Any, ...]] = []
    for key, item in members(document):
        found.append((*path, key))
        found.extend(locations(item, (*path, key)))
    return found


def container_paths(document: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The path of every object in a JSON document."""
    found = [path] if isinstance(document, dict) else []
    for key, item in members(document):
        found.extend(container_paths(item, (*path, key)))
    return found


def at(document: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        document = document[key]
    return document


def mutate(document: Any, data: st.DataObject) -> Any:
    """One structure-aware change: a member or item removed, a value replaced, a field added."""
    mutated = copy.deepcopy(document)
    operation = data.draw(st.sampled_from(["remove", "replace", "add"]))
    if operation == "add":
        where = at(mutated, data.draw(st.sampled_from(container_paths(mutated))))
        where[data.draw(st.sampled_from(FIELD_NAMES))] = copy.deepcopy(data.draw(st.sampled_from(HOSTILE)))
        return mutated
    path = data.draw(st.sampled_from(locations(mutated)))
    parent = at(mutated, path[:-1])
    if operation == "remove":
        del parent[path[-1]]
    else:
        parent[path[-1]] = copy.deepcopy(data.draw(st.sampled_from(HOSTILE)))
    return mutated


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(envelopes, st.data())
def test_schema_and_decoder_agree_on_mutated_envelopes(envelope: c.Envelope, data: st.DataObject) -> None:
    document = data.draw(st.sampled_from([json.loads(c.encode(envelope)), spelt_out(envelope)]))
    for _ in range(data.draw(st.integers(1, 3))):
        document = mutate(document, data)
    assert_agree(document)


def timestamps_of_every_shape() -> st.SearchStrategy[str]:
    """Timestamp-like strings around every edge of RFC 3339: the calendar, leap years, separators,
    fractions, offsets."""
    number = lambda digits, top: st.integers(0, top).map(lambda n: str(n).zfill(digits))  # noqa: E731
    return st.builds(
        "{}-{}-{}{}{}:{}:{}{}{}{}".format,
        st.sampled_from(["0000", "0001", "1900", "2000", "2024", "2100", "2400", "9999"]) | number(4, 9999),
        number(2, 13),
        number(2, 32) | st.sampled_from(["28", "29", "30", "31"]),
        st.sampled_from(["T", "t", " ", "_", ""]),
        number(2, 25),
        number(2, 61),
        number(2, 61),
        st.sampled_from(["", ".", ".0", ".123456", ".1234567890123", ",5"]),
        st.sampled_from(["Z", "z", "", "+00:00", "-00:00", "+05:30", "+0530", "+05", "-23:59", "+24:00", "+00:60",
                         "+05:30:00", "ZZ"]),
        st.sampled_from(["", "", "", "\n", " "]),
    )


@settings(max_examples=500)
@given(timestamps_of_every_shape() | st.text(max_size=30))
def test_schema_and_decoder_agree_on_timestamps(ts: str) -> None:
    assert_agree({**MINIMAL, "ts": ts})


@settings(max_examples=300)
@given(st.text(alphabet="AQYWJjz09+/=-_ \n", max_size=13))
def test_schema_and_decoder_agree_on_base64(data: str) -> None:
    assert_agree({**MINIMAL, "parts": [{"type": "media", "media": "image", "data": data}]})


def _message(*parts: dict[str, Any], **header: Any) -> dict[str, Any]:
    return {**MINIMAL, "parts": list(parts), **header}


@pytest.mark.parametrize(
    ("document", "accepted"),
    [
        pytest.param(_message({"type": "carousel", "cards": [{"title": "A"}]}), True, id="card-without-type"),
        pytest.param(_message({"type": "card", "media": {"media": "image", "url": "https://x.example/a.jpg"}}),
                     True, id="card-media-without-type"),
        pytest.param(_message({"type": "carousel", "cards": [{"media": {"media": "image", "size": 3.0}}]}), True,
                     id="untagged-media-in-untagged-card-with-integral-float"),
        pytest.param(_message({"type": "carousel", "cards": [{"type": "text", "title": "A"}]}), False,
                     id="card-with-another-type"),
        pytest.param(_message({"text": "no type"}), False, id="part-without-type"),
        pytest.param({key: value for key, value in MINIMAL.items() if key != "kind"}, False, id="no-kind"),
        pytest.param(MINIMAL, True, id="optional-header-fields-missing"),
        pytest.param({**MINIMAL, "v": 1, "direction": "inbound", "sender": None, "native": None, "reply_to": "",
                      "thread": "", "meta": {}, "parts": [], "targets": []}, True, id="defaults-spelt-out"),
        pytest.param({**MINIMAL, "kind": "status", "error": None}, True, id="status-without-state"),
        pytest.param({**MINIMAL, "native": {"seq": 7.0}, "v": 1e0}, True, id="integral-floats-as-ints"),
        pytest.param({**MINIMAL, "native": {"seq": 1e20}}, True, id="integer-written-with-exponent"),
        pytest.param({**MINIMAL, "native": {"seq": 7.5}}, False, id="fraction-for-an-int"),
        pytest.param(_message({"type": "location", "lat": 10**400, "lon": 0}), False, id="beyond-double-range"),
        pytest.param({**MINIMAL, "ts": "2100-02-29T00:00:00Z"}, False, id="no-leap-day-in-2100"),
        pytest.param({**MINIMAL, "ts": "2000-02-29 00:00:00.5+0100"}, True, id="leap-day-in-2000"),
        pytest.param({**MINIMAL, "ts": "2026-01-01T00:00:00Z\n"}, False, id="timestamp-with-trailing-newline"),
        pytest.param(_message({"type": "media", "media": "image", "data": "YWJ"}), False, id="base64-unpadded"),
    ],
)
def test_hand_made_edge_cases_read_the_same_by_schema_and_decoder(document: Any, accepted: bool) -> None:
    assert (decoder_accepts(document), schema_accepts(document)) == (accepted, accepted)


def test_integral_floats_are_read_as_the_ints_they_are() -> None:
    envelope = c.decode(json.dumps(_message({"type": "product", "items": [{"product_id": "p", "quantity": 2.0}]},
                                            native={"seq": 1e3})))
    assert isinstance(envelope, c.Message) and envelope.native is not None
    assert envelope.native.seq == 1000 and isinstance(envelope.native.seq, int)
    assert envelope.parts == [c.Product(items=[c.ProductItem(product_id="p", quantity=2)])]
    with pytest.raises(DecodeError) as caught:
        c.decode(json.dumps(_message({"type": "product", "items": [{"product_id": "p", "quantity": 2.5}]})))
    assert caught.value.path == "$.parts[0].items[0].quantity"


@pytest.mark.parametrize("rest", ['"meta": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}", '"meta": {"x": [1,}'])
def test_the_integral_float_path_still_answers_bad_json_with_a_decode_error(rest: str) -> None:
    # The second read sees the whole body; the first stopped at the float.
    document = '{"kind": "message", "id": "m", "tenant": "t", "conversation": {"id": "c"}, ' \
               '"ts": "2026-01-01T00:00:00Z", "native": {"seq": 1.0}, ' + rest + "}"
    with pytest.raises(DecodeError, match="malformed JSON"):
        c.decode(document)
