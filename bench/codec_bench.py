"""Encode+decode throughput of the canonical envelope, against a pydantic v2 model of the same shape.

One operation = read a realistic mixed message from JSON (~1.3 KB: full header, markdown text with a
mention, an image, three buttons) and write it back as JSON with defaults left out — what every hop of
the hub does to every envelope. Both sides are measured in the same run, so the ratio means something
on any machine; the absolute numbers do not.

    python bench/codec_bench.py [--seconds 5]

pydantic is only in the `bench` extra (`pip install -e '.[bench]'`); the hub itself never imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Final, Literal

import msgspec
import pydantic
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    SerializerFunctionWrapHandler,
    model_serializer,
)

from babelhub import canonical as c
from babelhub.canonical import (
    ActivityType,
    ButtonAction,
    ConversationType,
    Direction,
    MediaKind,
    Role,
    State,
    TextFormat,
)

TARGET_RATIO: Final = 5.0
ROUNDS: Final = 5
"""Timed rounds per contestant; the best one counts (the least disturbed by the rest of the machine)."""

# ------------------------------------------------------------------------------- the pydantic twin
#
# The same Structs as babelhub.canonical, field for field and default for default, with the same
# discriminated unions: envelopes on `kind`, parts on `type`. Two deliberate details:
# * the tags are required fields without a default, as in a msgspec tagged union — with a default,
#   `exclude_defaults=True` would drop the tag and the output could not be read back;
# * strict mode, because msgspec's JSON decoding is strict too (no "5" → 5 coercion), and bytes as
#   base64 in JSON, as msgspec writes them;
# * the header fields babelhub always writes (`v`, `direction`, a conversation's `type`, a status's
#   `state`) keep their defaults but are put back by a serializer (`_AlwaysWritten`), since
#   `exclude_defaults=True` drops every field at its default.


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True, ser_json_bytes="base64", val_json_bytes="base64")


class _AlwaysWritten(_Model):
    """A model whose `ALWAYS_WRITTEN` fields are written even at their defaults."""

    ALWAYS_WRITTEN: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _write_always_written(self, write: SerializerFunctionWrapHandler) -> dict[str, Any]:
        written: dict[str, Any] = write(self)
        for name in self.ALWAYS_WRITTEN:
            written.setdefault(name, getattr(self, name))
        return written


class ConversationModel(_AlwaysWritten):
    ALWAYS_WRITTEN: ClassVar[tuple[str, ...]] = ("type",)
    id: str
    channel: str = ""
    connection: str = ""
    native_id: str = ""
    type: ConversationType = "direct"


class SenderModel(_Model):
    id: str = ""
    native_id: str = ""
    name: str = ""
    role: Role = "user"
    handle: str = ""


class NativeModel(_Model):
    id: str = ""
    seq: int = 0
    thread: str = ""


class TargetModel(_Model):
    connection: str
    to: str


class ErrorModel(_Model):
    code: str
    message: str = ""
    retryable: bool = False
    native: Any = None


class MentionModel(_Model):
    id: str = ""
    native_id: str = ""
    name: str = ""
    offset: int = 0
    length: int = 0


class TextModel(_Model):
    type: Literal["text"]
    text: str
    format: TextFormat = "plain"
    mentions: list[MentionModel] = []


class MediaModel(_Model):
    type: Literal["media"]
    media: MediaKind
    url: str = ""
    file_id: str = ""
    data: bytes = b""
    mime: str = ""
    size: int = 0
    filename: str = ""
    caption: str = ""
    duration_ms: int = 0
    width: int = 0
    height: int = 0


class LocationModel(_Model):
    type: Literal["location"]
    lat: float
    lon: float
    name: str = ""
    address: str = ""
    url: str = ""


class ContactModel(_Model):
    type: Literal["contact"]
    name: str
    phones: list[str] = []
    emails: list[str] = []
    org: str = ""
    urls: list[str] = []


class ButtonModel(_Model):
    id: str
    title: str
    action: ButtonAction = "reply"
    value: str = ""


class ButtonsModel(_Model):
    type: Literal["buttons"]
    text: str = ""
    buttons: list[ButtonModel] = []


class ListRowModel(_Model):
    id: str
    title: str
    description: str = ""


class ListSectionModel(_Model):
    title: str = ""
    rows: list[ListRowModel] = []


class ListModel(_Model):
    type: Literal["list"]
    text: str = ""
    button: str = ""
    header: str = ""
    footer: str = ""
    sections: list[ListSectionModel] = []


class CardModel(_Model):
    type: Literal["card"]
    title: str = ""
    subtitle: str = ""
    media: MediaModel | None = None
    buttons: list[ButtonModel] = []


class CarouselModel(_Model):
    type: Literal["carousel"]
    cards: list[CardModel] = []


class TemplateModel(_Model):
    type: Literal["template"]
    name: str
    language: str = ""
    params: dict[str, str] = {}
    fallback_text: str = ""


class ReactionModel(_Model):
    type: Literal["reaction"]
    emoji: str
    target: str = ""
    removed: bool = False


class PollModel(_Model):
    type: Literal["poll"]
    question: str
    options: list[str] = []
    multiple: bool = False


class FormFieldModel(_Model):
    id: str
    label: str = ""
    kind: str = "text"
    required: bool = False
    options: list[str] = []
    value: Any = None


class FormModel(_Model):
    type: Literal["form"]
    id: str
    title: str = ""
    fields: list[FormFieldModel] = []


class ProductItemModel(_Model):
    product_id: str
    quantity: int = 1
    price: float | None = None
    currency: str = ""


class ProductModel(_Model):
    type: Literal["product"]
    catalog_id: str = ""
    product_ids: list[str] = []
    items: list[ProductItemModel] = []


class ActionModel(_Model):
    type: Literal["action"]
    id: str
    title: str = ""
    source: str = ""


class EditModel(_Model):
    type: Literal["edit"]
    target: str


class DeleteModel(_Model):
    type: Literal["delete"]
    target: str


class UnsupportedModel(_Model):
    type: Literal["unsupported"]
    reason: str = ""
    native: Any = None


PartModel = Annotated[
    TextModel
    | MediaModel
    | LocationModel
    | ContactModel
    | ButtonsModel
    | ListModel
    | CardModel
    | CarouselModel
    | TemplateModel
    | ReactionModel
    | PollModel
    | FormModel
    | ProductModel
    | ActionModel
    | EditModel
    | DeleteModel
    | UnsupportedModel,
    Field(discriminator="type"),
]


class _EnvelopeModel(_AlwaysWritten):
    ALWAYS_WRITTEN: ClassVar[tuple[str, ...]] = ("v", "direction")
    id: str
    tenant: str
    conversation: ConversationModel
    ts: AwareDatetime
    v: int = c.SCHEMA_VERSION
    direction: Direction = "inbound"
    sender: SenderModel | None = None
    native: NativeModel | None = None
    reply_to: str = ""
    thread: str = ""
    meta: dict[str, Any] = {}


class MessageModel(_EnvelopeModel):
    kind: Literal["message"]
    parts: list[PartModel] = []
    targets: list[TargetModel] = []


class StatusModel(_EnvelopeModel):
    ALWAYS_WRITTEN: ClassVar[tuple[str, ...]] = (*_EnvelopeModel.ALWAYS_WRITTEN, "state")
    kind: Literal["status"]
    message_id: str = ""
    native_id: str = ""
    state: State = "accepted"
    error: ErrorModel | None = None


class ActivityModel(_EnvelopeModel):
    kind: Literal["activity"]
    activity: ActivityType
    detail: dict[str, Any] = {}


class EnvelopeModel(RootModel[Annotated[MessageModel | StatusModel | ActivityModel, Field(discriminator="kind")]]):
    """The top-level union, so that pydantic, like `canonical.decode`, picks the kind from the JSON."""


# ------------------------------------------------------------------------------------- the message


GREETING: Final = (
    "Hi **Maria**, the *Trail Runner 2* in size 38 is back in stock. "
    "@Jonas set a pair aside for you until Friday 18:00."
)


def realistic_message() -> c.Message:
    """An outbound answer as a processing app writes it: every header field a real reply carries."""
    tenant, connection, customer = "acme", "wa-support", "16505551234"
    question = "wamid.HBgLMTY1MDU1NTEyMzQVAgASGBQzQUI1RjYxMzVEQjBFRjI1NzY5QQA="
    return c.Message(
        id="aaz3mbl4qvyqd5kyq7xrjr3o",
        tenant=tenant,
        conversation=c.Conversation(
            id=c.conversation_id(tenant, connection, customer),
            channel="whatsapp",
            connection=connection,
            native_id=customer,
        ),
        direction="outbound",
        ts=datetime(2026, 3, 14, 9, 26, 53, 120000, tzinfo=UTC),
        sender=c.Sender(id=c.sender_id(tenant, connection, "acme-bot"), name="Acme Support", role="bot"),
        reply_to=c.message_id(tenant, connection, question),
        meta={
            "babelhub.trace": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "whatsapp.biz_opaque_callback_data": "order=8812",
        },
        parts=[
            c.Text(
                text=GREETING,
                format="markdown",
                mentions=[c.Mention(id=c.sender_id(tenant, connection, "jonas"), name="Jonas",
                                    offset=GREETING.index("@Jonas"), length=len("@Jonas"))],
            ),
            c.Media(
                media="image",
                url="https://cdn.acme.example/p/trail-runner-2/ocean-blue-1600.jpg",
                mime="image/jpeg",
                size=284_113,
                filename="trail-runner-2-ocean-blue.jpg",
                caption="Trail Runner 2 — Ocean Blue, size 38",
                width=1600,
                height=1200,
            ),
            c.Buttons(
                text="Shall we keep this pair for you?",
                buttons=[
                    c.Button(id="reserve:8812:38", title="Reserve size 38", action="postback",
                             value="reserve:sku=TR2-OB-38"),
                    c.Button(id="sizes:8812", title="Other sizes"),
                    c.Button(id="product-page", title="Product page", action="url",
                             value="https://shop.acme.example/p/trail-runner-2?size=38"),
                ],
            ),
        ],
    )


# ------------------------------------------------------------------------------------ the contestants


def msgspec_round_trip(data: bytes) -> bytes:
    return c.encode(c.decode(data))


def pydantic_round_trip(data: bytes) -> str:
    return EnvelopeModel.model_validate_json(data).model_dump_json(exclude_defaults=True)


_REQUIRED: Final = "<required>"


def check_same_shape() -> None:
    """Every canonical Struct has a twin `<Name>Model` here with the same fields and defaults, so the
    comparison stays fair when the canonical format grows."""
    for name in c.__all__:
        struct = getattr(c, name)
        if not (isinstance(struct, type) and issubclass(struct, msgspec.Struct)):
            continue
        model: type[BaseModel] | None = globals().get(f"{name}Model")
        if model is None:
            sys.exit(f"the pydantic twin of canonical.{name} is missing: add {name}Model")
        tag_field = struct.__struct_config__.tag_field
        expected = {field.name: _struct_default(field) for field in msgspec.structs.fields(struct)}
        actual = {
            field_name: _REQUIRED if field.is_required() else field.get_default(call_default_factory=True)
            for field_name, field in model.model_fields.items()
            if field_name != tag_field
        }
        if expected != actual:
            sys.exit(f"{name}Model differs from canonical.{name}:\n  canonical: {expected}\n  pydantic:  {actual}")


def _struct_default(field: msgspec.structs.FieldInfo) -> Any:
    if field.default is not msgspec.NODEFAULT:
        return field.default
    if field.default_factory is not msgspec.NODEFAULT:
        return field.default_factory()
    return _REQUIRED


def check_equivalent(data: bytes) -> None:
    """Both sides must read and write the same document, or the timing compares different work."""
    original = json.loads(data)
    by_msgspec = json.loads(msgspec_round_trip(data))
    by_pydantic = json.loads(pydantic_round_trip(data))
    if not original == by_msgspec == by_pydantic:
        sys.exit(
            "the two models disagree on the message:\n"
            f"  input:    {json.dumps(original, sort_keys=True)}\n"
            f"  msgspec:  {json.dumps(by_msgspec, sort_keys=True)}\n"
            f"  pydantic: {json.dumps(by_pydantic, sort_keys=True)}"
        )


# ------------------------------------------------------------------------------------- measuring

RoundTrip = Callable[[bytes], object]


def iterations_for(round_trip: RoundTrip, data: bytes, round_seconds: float) -> int:
    """How many operations fill one round: double until a batch takes a measurable time, then scale."""
    count = 1
    while True:
        elapsed = time_batch(round_trip, data, count)
        if elapsed >= 0.02:
            return max(1, int(count * round_seconds / elapsed))
        count *= 2


def time_batch(round_trip: RoundTrip, data: bytes, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        round_trip(data)
    return time.perf_counter() - start


def best_ops_per_second(contestants: dict[str, RoundTrip], data: bytes, seconds: float) -> dict[str, float]:
    """Rounds alternate between contestants so that a noisy moment on the machine hits both alike."""
    round_seconds = seconds / (len(contestants) * (ROUNDS + 1))  # +1: calibration doubles as warm-up
    iterations = {name: iterations_for(fn, data, round_seconds) for name, fn in contestants.items()}
    best = dict.fromkeys(contestants, float("inf"))
    for _ in range(ROUNDS):
        for name, fn in contestants.items():
            best[name] = min(best[name], time_batch(fn, data, iterations[name]))
    return {name: iterations[name] / best[name] for name in contestants}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=5.0, help="approximate total run time (default 5)")
    args = parser.parse_args(argv)

    data = c.encode(realistic_message())
    check_same_shape()
    check_equivalent(data)
    msgspec_label, pydantic_label = "msgspec (babelhub.canonical)", f"pydantic {pydantic.VERSION}"
    results = best_ops_per_second(
        {msgspec_label: msgspec_round_trip, pydantic_label: pydantic_round_trip}, data, args.seconds
    )
    ratio = results[msgspec_label] / results[pydantic_label]

    print(f"message: {len(data)} bytes of JSON (text + image + buttons, full header); op = decode + encode")
    for label, ops in results.items():
        print(f"{label:<30} {ops:>12,.0f} ops/s")
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    print(f"{'ratio':<30} {ratio:>12.1f}x   (target >= {TARGET_RATIO:g}x: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
