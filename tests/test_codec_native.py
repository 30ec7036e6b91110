"""The helpers codecs share (babelhub/codecs/native.py and meta_graph.py): one rule for every channel
that uses them, so a channel's own exceptions stay visible in its codec."""

from __future__ import annotations

import contextlib
import gc
from typing import Any
from urllib.parse import parse_qsl, urlencode

import aiohttp
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from babelhub.canonical import Conversation, Location, MediaKind, Sender, Text, Unsupported, conversation_id, sender_id
from babelhub.codecs import load, meta_graph, native
from babelhub.codecs.base import DecodeContext, EncodeContext, HttpRequest
from babelhub.errors import DecodeError, EncodeError, SignatureError
from babelhub.services import config as cfg
from babelhub.services.connections import ConnectionService
from babelhub.services.delivery import RetryPolicy
from babelhub.services.telemetry import Metrics
from tests.codeckit import meta_signed


@pytest.mark.parametrize(
    ("mime", "filename", "kind"),
    [
        ("image/png", "", "image"),
        ("image/*", "", "image"),
        ("IMAGE/JPEG", "", "image"),
        ("video/mp4", "", "video"),
        ("audio/ogg", "", "audio"),  # a voice note is the codec's to mark
        ("application/pdf", "", "document"),
        ("text/vcard", "", "document"),
        ("", "", "document"),
        ("", "holiday.jpg", "image"),
        ("", "minutes.pdf", "document"),
        ("audio/mpeg", "cover.jpg", "audio"),  # the MIME type wins over the file name
    ],
)
def test_media_kind_follows_the_mime_types_major_part(mime: str, filename: str, kind: MediaKind) -> None:
    assert native.media_kind(mime, filename) == kind


def test_clip_cuts_with_an_ellipsis_only_when_needed() -> None:
    assert native.clip("Red shoes", 9) == "Red shoes"
    assert native.clip("Red shoes", 5) == "Red \u2026"


def test_native_id_names_what_pointed_at_an_unknown_message() -> None:
    ctx = EncodeContext(tenant="acme", connection="c", to="x", native_ids={"known": "n-1", "blank": ""})
    assert native.native_id(ctx, "known", "reply_to", "Slack") == "n-1"
    for canonical_id in ("never-sent", "blank"):
        with pytest.raises(EncodeError, match=f"Slack message id of reaction target '{canonical_id}'"):
            native.native_id(ctx, canonical_id, "reaction target", "Slack")


def test_a_missing_setting_is_named_with_its_kind() -> None:
    assert native.required_secret({"bot_token": "t"}, "bot_token", "Slack") == "t"
    with pytest.raises(EncodeError, match=r"Teams connection has no 'bot_token' secret \(a token\)"):
        native.required_secret({"bot_token": ""}, "bot_token", "Teams", "a token")
    with pytest.raises(EncodeError, match="WhatsApp connection has no 'phone_number_id' option"):
        native.required_option({}, "phone_number_id", "WhatsApp")


def _meta_signed(body: bytes, secret: str, upper: bool = False) -> HttpRequest:
    return meta_signed(body, secret, upper=upper)


def test_meta_signatures_in_either_hex_case_verify() -> None:
    meta_graph.verify_signature(_meta_signed(b"{}", "app-secret"), "app-secret", "whatsapp")
    meta_graph.verify_signature(_meta_signed(b"{}", "app-secret", upper=True), "app-secret", "whatsapp")
    with pytest.raises(SignatureError, match="whatsapp: X-Hub-Signature-256 does not match"):
        meta_graph.verify_signature(_meta_signed(b"{}", "other"), "app-secret", "whatsapp")


@pytest.mark.parametrize("method", ["GET", "get"])
def test_meta_handshake_answers_every_hub_mode_request(method: str) -> None:
    def check(mode: str, token: str) -> int | None:
        query = {"hub.mode": mode, "hub.verify_token": token, "hub.challenge": "42"}
        answer = meta_graph.handshake(HttpRequest(method=method, query=query), "s3cret")
        return answer.status if answer else None

    assert check("subscribe", "s3cret") == 200
    assert check("subscribe", "guess") == 403
    assert check("unsubscribe", "s3cret") == 403
    assert meta_graph.handshake(HttpRequest(method="POST", query={"hub.mode": "subscribe"}), "s3cret") is None


# ------------------------------------------------------------------------------ lenient decoding


class _Place(msgspec.Struct):
    latitude: float


class _Note(msgspec.Struct, rename={"from_": "from"}):
    id: str
    from_: str = ""
    location: _Place | None = None
    text: str = ""


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: native.convert({"latitude": "north"}, _Place, "$.location"), "Expected `float`, got `str`"),
        (lambda: native.finite(float("nan"), "$.location.latitude"), "not a finite number"),
        (lambda: {}["url"], "KeyError"),
        (lambda: float(10**400), "OverflowError"),
        (lambda: None.url, "AttributeError"),
    ],
)
def test_lenient_parts_turns_an_unreadable_fragment_into_an_unsupported_part(build: Any, expected: str) -> None:
    fragment = {"location": {"latitude": "north"}}
    (part,) = native.lenient_parts(build, fragment, "test location")
    assert isinstance(part, Unsupported) and part.reason.startswith("test location unreadable: ")
    assert expected in part.reason and part.native == fragment


def test_lenient_parts_passes_readable_parts_through() -> None:
    text = Text(text="hi")
    assert native.lenient_parts(lambda: text, {}, "x") == [text]
    assert native.lenient_parts(lambda: [text, text], {}, "x") == [text, text]


def test_lenient_parts_refuses_a_part_canonical_json_cannot_carry() -> None:
    (part,) = native.lenient_parts(lambda: Location(lat=float("nan"), lon=0.0), {"lat": "nan"}, "test location")
    assert isinstance(part, Unsupported) and "cannot carry" in part.reason
    (part,) = native.lenient_parts(lambda: Text(text="a\ud800"), {"text": "a"}, "test text")
    assert isinstance(part, Unsupported) and part.native == {"text": "a"}


def test_an_unsupported_fragment_always_reads_back_from_canonical_json() -> None:
    assert native.unsupported("r", {"a": float("nan"), "b": (1, 2)}).native == {"a": None, "b": [1, 2]}
    kept = native.unsupported("lone \ud800", {"a": "\ud800"})
    assert kept.reason == "lone \ufffd" and isinstance(kept.native, str) and "ud800" in kept.native
    assert msgspec.json.decode(msgspec.json.encode(kept), type=Unsupported) == kept


def test_convert_parts_leaves_out_an_unreadable_content_field_and_keeps_the_rest() -> None:
    raw = {"id": "m1", "from": "ann", "location": {"latitude": "north"}, "text": "hi"}
    note, readable, parts = native.convert_parts(raw, _Note, "$.note", {"location", "text"}, "test")
    assert note == _Note(id="m1", from_="ann", text="hi")
    assert readable == {"id": "m1", "from": "ann", "text": "hi"}
    (part,) = parts
    assert isinstance(part, Unsupported) and part.native == {"location": {"latitude": "north"}}
    assert "$.note.location.latitude" in part.reason


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ({"from": "ann", "text": "hi"}, "$.note"),  # the header is the message: no id, no message
        ({"id": 5, "text": "hi"}, "$.note.id"),
        ({"id": "m1", "from": ["ann"]}, "$.note.from"),  # a header field, not a content field
        ("not an object", "$.note"),
    ],
)
def test_convert_parts_is_strict_about_the_header(raw: Any, path: str) -> None:
    with pytest.raises(DecodeError) as caught:
        native.convert_parts(raw, _Note, "$.note", {"location", "text"}, "test")
    assert caught.value.path == path


def test_well_formed_replaces_lone_surrogates_only() -> None:
    assert native.well_formed("a\ud800b\udfff💬") == "a\ufffdb\ufffd💬"


# ---------------------------------------------------------------------------------------- forms

#: Pieces of form text where percent-decoding has edge cases: stray and short escapes, escapes of bytes
#: that are no UTF-8 (a lone surrogate's, a cut emoji's), and backslashes, which the fast path escapes.
_FORM_PIECES = st.sampled_from(
    ["a", "é", "💬", "+", "=", "&", "%", "%4", "%41", "%zz", "%e9", "%C3%A9", "%ed%a0%80", "%F0%9F", "%25",
     "%5C", "%5cx41", "\\", "\\x41", "%00", "\n"]
)


@given(st.lists(_FORM_PIECES, max_size=16).map("".join), st.booleans())
def test_a_form_reads_as_parse_qsl_reads_it(text: str, strict: bool) -> None:
    try:
        expected = parse_qsl(text, keep_blank_values=True, strict_parsing=strict)
    except ValueError:
        with pytest.raises(DecodeError) as refused:
            native.parse_form(text.encode(), strict=strict)
        assert refused.value.path == "$"
        return
    assert list(native.parse_form(text.encode(), strict=strict)) == expected


def test_a_form_field_of_hundreds_of_kb_of_percent_escapes_is_read_whole() -> None:
    # what a fuzzer mutant posts: JSON nested 80,000 deep in a form field, 480 KB of `%5B`/`%5D`
    nested = "[" * 80_000 + "]" * 80_000
    body = urlencode({"token": "t", "payload": nested}).encode()
    assert len(body) > 480_000
    assert native.parse_form(body) == (("token", "t"), ("payload", nested))


def test_a_form_of_more_fields_than_the_limit_is_refused_naming_it() -> None:
    just_under = "&".join(f"f{index}=x" for index in range(native.MAX_FORM_FIELDS)).encode()
    assert len(native.parse_form(just_under)) == native.MAX_FORM_FIELDS
    with pytest.raises(DecodeError) as refused:
        native.parse_form(just_under + b"&one=more")
    assert refused.value.path == "$"
    assert str(native.MAX_FORM_FIELDS) in refused.value.reason


def test_a_form_that_is_no_utf8_is_refused() -> None:
    with pytest.raises(DecodeError) as refused:
        native.parse_form(b"Body=caf\xe9")
    assert refused.value.path == "$" and "UTF-8" in refused.value.reason


@pytest.mark.parametrize("depth", [100_000, 1_000])
def test_json_nested_beyond_reading_is_a_decode_error_at_its_path(depth: int) -> None:
    with pytest.raises(DecodeError) as refused:
        native.json_value("[" * depth + "]" * depth, path="payload", what="form field `payload`")
    assert refused.value.path == "payload"
    assert refused.value.reason == "form field `payload` is nested too deeply to read"


def test_json_nested_within_reach_is_read() -> None:
    nested: list[Any] = []
    for _ in range(99):
        nested = [nested]
    assert native.json_value(b"[" * 100 + b"]" * 100, path="payload") == nested



async def test_a_body_of_many_tiny_containers_is_decoded_without_a_collection(nats_client) -> None:  # type: ignore[no-untyped-def]
    """20,000 `{}` would start a young collection every 700 of them, now and then a full one that walks
    every object of the process, and afterwards collections that walk the tree again: while a codec reads
    a body (as the hub calls it) the collector is held off, and the tree is gone before it runs again."""
    body = b'{"update_id": 1, "message": {"message_id": 1, "junk": [' + b"{}," * 20_000 + b"[]]}}"
    collections: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    metrics = Metrics()
    async with aiohttp.ClientSession() as http:
        connection = ConnectionService(cfg.Connection(id="tg", tenant="acme", channel="telegram"), load("telegram"),
                                       http, metrics, RetryPolicy())
        gc.collect()
        gc.callbacks.append(count)
        try:
            connection.dedup_key(HttpRequest(body=body))
            with contextlib.suppress(DecodeError):
                connection.decode(HttpRequest(body=body), seq=1)
            young_after = gc.get_count()[0]
        finally:
            gc.callbacks.remove(count)
    assert collections == []
    assert young_after < 700  # nothing left over for the collector to walk


@pytest.mark.parametrize("body", [b'{"entry": [' + b"{}," * 5_000 + b"[]]}", b"{not json"])
@pytest.mark.parametrize("collector_on", [True, False])
def test_a_read_leaves_the_garbage_collector_as_it_found_it(body: bytes, collector_on: bool) -> None:
    """The collector is on again after a body is read, also when the body is refused; one that was off
    stays off."""
    was_on = gc.isenabled()
    (gc.enable if collector_on else gc.disable)()
    try:
        with contextlib.suppress(DecodeError):
            native.without_collector(lambda: native.json_value(body))
        assert gc.isenabled() is collector_on
    finally:
        (gc.enable if was_on else gc.disable)()


def test_unmapped_keeps_only_members_no_canonical_field_took() -> None:
    raw = {"id": "m1", "text": "hi", "speak": "hello", "importance": "high"}
    assert native.unmapped(raw, {"id", "text"}) == {"speak": "hello", "importance": "high"}
    assert native.unmapped(["not", "an", "object"], {"id"}) == {}


def test_extras_are_namespaced_one_meta_key_each() -> None:
    assert native.extras("twilio", {"To": "+1", "ApiVersion": "2010-04-01"}, {"To"}) == {
        "twilio.ApiVersion": "2010-04-01"
    }


def test_keep_unmapped_adds_a_meta_key_only_when_something_was_left() -> None:
    meta: dict[str, Any] = {}
    native.keep_unmapped(meta, "whatsapp.location", {"latitude": 1.0, "longitude": 2.0}, {"latitude", "longitude"})
    assert meta == {}
    native.keep_unmapped(meta, "whatsapp.location", {"latitude": 1.0, "place_id": "p"}, {"latitude", "longitude"})
    assert meta == {"whatsapp.location": {"place_id": "p"}}
    native.keep_unmapped(meta, "evolution.key", None, {"id"})  # a field that is no object adds nothing
    assert meta == {"whatsapp.location": {"place_id": "p"}}


def test_without_drops_the_named_credentials_and_leaves_other_values_alone() -> None:
    payload = {"token": "verification-secret", "type": "view_submission", "team": {"id": "T1"}}
    assert native.without(payload, {"token"}) == {"type": "view_submission", "team": {"id": "T1"}}
    assert native.without("a string", {"token"}) == "a string"


def test_a_conversation_is_one_id_per_tenant_connection_and_chat() -> None:
    ctx = DecodeContext(tenant="acme", connection="support", seq=7)
    group = native.conversation(ctx, "whatsapp", "120363", "group")
    assert group == Conversation(
        id=conversation_id("acme", "support", "120363"),
        channel="whatsapp",
        connection="support",
        native_id="120363",
        type="group",
    )
    assert native.conversation(ctx, "whatsapp", "120364").type == "direct"
    other = DecodeContext(tenant="acme", connection="sales")
    assert native.conversation(other, "whatsapp", "120363").id != group.id


def test_a_sender_is_one_id_per_person_on_a_connection() -> None:
    ctx = DecodeContext(tenant="acme", connection="support")
    ann = native.sender(ctx, "4915112345678", name="Ann", handle="+4915112345678")
    assert ann == Sender(
        id=sender_id("acme", "support", "4915112345678"),
        native_id="4915112345678",
        name="Ann",
        role="user",
        handle="+4915112345678",
    )
    assert native.sender(ctx, "4915112345678", role="agent").id == ann.id
