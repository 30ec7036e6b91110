"""docs/canonical.md cannot go stale: every JSON example in it is a valid canonical envelope (or part)
that the hub writes back exactly as documented, every part type and envelope kind has an example,
every field and enumerated value is named, and the Python examples run."""

from __future__ import annotations

import doctest
import json
import re
from pathlib import Path
from typing import Any, get_args

import msgspec
import pytest

from babelhub import canonical as c

DOC = Path(__file__).resolve().parents[1] / "docs" / "canonical.md"
README = Path(__file__).resolve().parents[1] / "README.md"
_FENCED = re.compile(r"^```(?P<lang>\w*)\n(?P<body>.*?)^```$", re.DOTALL | re.MULTILINE)

#: The header a part-only example is wrapped in, so that it can be read as a whole envelope.
_WRAPPER: dict[str, Any] = {
    "kind": "message",
    "id": "docsexample",
    "v": 1,
    "tenant": "docs",
    "conversation": {"id": "docsconversation", "type": "direct"},
    "direction": "inbound",
    "ts": "2025-01-01T00:00:00Z",
}


def _blocks(lang: str, doc: Path = DOC) -> list[tuple[int, str]]:
    """(line number, body) of each fenced block in the given language."""
    text = doc.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, match.start()) + 1, match.group("body"))
        for match in _FENCED.finditer(text)
        if match.group("lang") == lang
    ]


def _json_examples(doc: Path = DOC) -> list[Any]:
    return [pytest.param(json.loads(body), id=f"{doc.name}-line-{line}") for line, body in _blocks("json", doc)]


def _all_json_examples() -> list[Any]:
    """The README's examples are held to the same standard as the format reference's."""
    return [*_json_examples(DOC), *_json_examples(README)]


def _as_envelope(example: dict[str, Any]) -> dict[str, Any]:
    if "kind" in example:
        return example
    if "type" in example:
        return {**_WRAPPER, "parts": [example]}
    raise AssertionError(f"a ```json example must be an envelope (with `kind`) or a part (with `type`): {example}")


def _default(field: msgspec.structs.FieldInfo) -> Any:
    """A field's default as it would appear in JSON, if `encode` leaves it out at that value; NODEFAULT
    for required fields and for the header fields that are always written (defaults from a factory
    other than an empty list or dict: msgspec's `omit_defaults` keeps those)."""
    if field.default is not msgspec.NODEFAULT:
        return msgspec.to_builtins(field.default)
    if field.default_factory in (list, dict):
        return msgspec.to_builtins(field.default_factory())
    return msgspec.NODEFAULT


def _fields(value: msgspec.Struct) -> dict[str, msgspec.structs.FieldInfo]:
    return {field.encode_name: field for field in msgspec.structs.fields(value)}


def unknown_fields(document: Any, value: Any, path: str = "$") -> list[str]:
    """Paths of keys in the example that are no field of the Struct they were read into. Decoding
    ignores unknown fields (on purpose, for evolution), so a misspelt field would otherwise pass."""
    if isinstance(value, msgspec.Struct) and isinstance(document, dict):
        fields, tag = _fields(value), value.__struct_config__.tag_field
        problems: list[str] = []
        for key, item in document.items():
            if key == tag:
                continue
            if key not in fields:
                problems.append(f"{path}.{key}")
            else:
                problems += unknown_fields(item, getattr(value, fields[key].name), f"{path}.{key}")
        return problems
    if isinstance(value, list) and isinstance(document, list):
        return [
            problem
            for index, (item, element) in enumerate(zip(document, value, strict=True))
            for problem in unknown_fields(item, element, f"{path}[{index}]")
        ]
    return []


def without_defaults(document: Any, value: Any) -> Any:
    """The example with the keys that merely spell out a default removed: what `encode` writes."""
    if isinstance(value, msgspec.Struct) and isinstance(document, dict):
        fields, kept = _fields(value), {}
        for key, item in document.items():
            field = fields.get(key)
            if field is None:  # the tag
                kept[key] = item
            elif item != _default(field):
                kept[key] = without_defaults(item, getattr(value, field.name))
        return kept
    if isinstance(value, list) and isinstance(document, list):
        return [without_defaults(item, element) for item, element in zip(document, value, strict=True)]
    return document


# ------------------------------------------------------------------------------------------ examples


@pytest.mark.parametrize("example", _all_json_examples())
def test_example_reads_and_writes_back_unchanged(example: dict[str, Any]) -> None:
    document = _as_envelope(example)
    envelope = c.decode(json.dumps(document))
    assert unknown_fields(document, envelope) == []
    assert json.loads(c.encode(envelope)) == without_defaults(document, envelope)


@pytest.mark.parametrize("doc", [DOC, README], ids=lambda doc: doc.name)
def test_every_part_type_and_every_kind_has_an_example(doc: Path) -> None:
    examples = [param.values[0] for param in _json_examples(doc)]
    part_examples = {example["type"] for example in examples if "kind" not in example}
    kinds = {example["kind"] for example in examples if "kind" in example}
    all_part_types = {part.__struct_config__.tag for part in get_args(c.Part)}
    assert part_examples == all_part_types
    assert kinds == {"message", "status", "activity"}


@pytest.mark.parametrize("example", _all_json_examples())
def test_inbound_examples_carry_the_documented_deterministic_ids(example: dict[str, Any]) -> None:
    if "kind" not in example or example.get("direction", "inbound") != "inbound":
        return
    envelope = c.decode(json.dumps(example))
    conversation, tenant = envelope.conversation, envelope.tenant
    connection = conversation.connection
    assert connection, "inbound examples show the full conversation"
    assert conversation.id == c.conversation_id(tenant, connection, conversation.native_id)
    if envelope.sender is not None:
        assert envelope.sender.id == c.sender_id(tenant, connection, envelope.sender.native_id)
    if isinstance(envelope, c.Message):
        assert envelope.native is not None
        assert envelope.id == c.message_id(tenant, connection, envelope.native.id)
    if isinstance(envelope, c.Status):
        assert envelope.id == c.stable_id("status", tenant, connection, envelope.native_id, envelope.state)


# --------------------------------------------------------------------------------- named in the text


def _named_in_doc() -> set[str]:
    """Every `code span` in the document, without the quotes of a `"json string"`."""
    return {span.strip('"') for span in re.findall(r"`([^`\n]+)`", DOC.read_text(encoding="utf-8"))}


@pytest.mark.parametrize(
    "struct", [c.Message, c.Status, c.Activity, c.Conversation, c.Sender, c.Native, c.Target, c.Error]
)
def test_every_header_and_envelope_field_is_documented(struct: type[msgspec.Struct]) -> None:
    named = _named_in_doc()
    missing = [field.encode_name for field in msgspec.structs.fields(struct) if field.encode_name not in named]
    assert missing == []


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(alias, id=name)
        for name, alias in [
            ("State", c.State),
            ("ActivityType", c.ActivityType),
            ("TextFormat", c.TextFormat),
            ("MediaKind", c.MediaKind),
            ("ButtonAction", c.ButtonAction),
            ("Role", c.Role),
            ("ConversationType", c.ConversationType),
            ("Direction", c.Direction),
        ]
    ],
)
def test_every_enumerated_value_is_documented(values: Any) -> None:
    missing = [value for value in get_args(values) if value not in _named_in_doc()]
    assert missing == []


@pytest.mark.parametrize(("line", "body"), _blocks("python"))
def test_python_examples_run_as_shown(line: int, body: str) -> None:
    test = doctest.DocTestParser().get_doctest(body, {}, f"canonical.md:{line}", str(DOC), line)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


# ------------------------------------------------------------------------------- the checker itself


def test_the_checks_catch_a_misspelt_field_and_a_value_that_does_not_survive() -> None:
    misspelt = _as_envelope({"type": "media", "media": "image", "url": "https://x.example/a.jpg", "captoin": "hi"})
    assert unknown_fields(misspelt, c.decode(json.dumps(misspelt))) == ["$.parts[0].captoin"]

    # A card's media written without its tag reads fine, but the hub writes it back with "type".
    untagged = _as_envelope({"type": "card", "title": "T", "media": {"media": "image", "url": "https://x.example"}})
    envelope = c.decode(json.dumps(untagged))
    assert json.loads(c.encode(envelope)) != without_defaults(untagged, envelope)

    # Spelt-out defaults are fine; they are simply not written.
    explicit = {**_as_envelope({"type": "text", "text": "hi", "format": "plain", "mentions": []}), "meta": {}}
    envelope = c.decode(json.dumps(explicit))
    assert json.loads(c.encode(envelope)) == without_defaults(explicit, envelope)
    assert without_defaults(explicit, envelope)["parts"] == [{"type": "text", "text": "hi"}]

    # The header is always written: an example that leaves out `v` or `direction` is not what the hub writes.
    for field in ("v", "direction"):
        short = {key: value for key, value in _WRAPPER.items() if key != field}
        envelope = c.decode(json.dumps(short))
        assert json.loads(c.encode(envelope)) != without_defaults(short, envelope)
