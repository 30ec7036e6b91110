"""Degradation: every rule on exact examples, and properties over any message and any capabilities."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, get_args

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from babelhub import canonical as c
from babelhub.codecs.base import Capabilities, PartType
from babelhub.codecs.degrade import CHOICES_KEY, DEGRADED_KEY, degrade, resolve_choice
from tests import strategies

# ------------------------------------------------------------------------------------------ helpers

EVERYTHING = Capabilities(
    parts=frozenset(get_args(PartType)) - {"action", "unsupported"},
    media=frozenset(get_args(c.MediaKind)),
    text_limit=100_000,
    caption_limit=100_000,
    markup="plain",
    max_buttons=0,
    max_button_title=0,
    button_actions=frozenset(get_args(c.ButtonAction)),
    max_row_title=0,
    reply=True,
    edit=True,
    delete=True,
    reaction=True,
)
SMS = Capabilities(parts=frozenset({"text"}), text_limit=160, markup="plain")


def message(*parts: c.Part, **header: Any) -> c.Message:
    return c.Message(
        id="msg1",
        tenant="t1",
        conversation=c.Conversation(id="conv1", channel="test", connection="k1", native_id="chat"),
        ts=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        direction="outbound",
        parts=list(parts),
        **header,
    )


def caps(**changes: Any) -> Capabilities:
    return msgspec.structs.replace(SMS, **changes)


def changes(result: c.Message) -> list[tuple[Any, str, list[str]]]:
    """The recorded changes without their explanations: (part index, from, to)."""
    return [(change["part"], change["from"], change["to"]) for change in result.meta.get(DEGRADED_KEY, [])]


def choice(n: int, choice_id: str, title: str) -> tuple[str, dict[str, str]]:
    return str(n), {"id": choice_id, "title": title, "source": "msg1"}


# --------------------------------------------------------------------------------------------- text


def test_markdown_is_converted_to_the_channel_dialect() -> None:
    result = degrade(message(c.Text(text="**Sale** ends _today_", format="markdown")), caps(markup="slack"))
    assert result.parts == [c.Text(text="*Sale* ends _today_", format="slack")]
    assert result.meta[DEGRADED_KEY] == [
        {"part": 0, "from": "text", "to": ["text"], "why": "markdown converted to slack"}
    ]


def test_long_text_is_split_on_paragraphs_then_lines_then_words() -> None:
    text = "First paragraph is here.\n\nline one\nline two is longer\n\n" + "word " * 6 + "end"
    result = degrade(message(c.Text(text=text)), caps(text_limit=24))
    assert [part.text for part in result.parts if isinstance(part, c.Text)] == [
        "First paragraph is here.",
        "line one",
        "line two is longer",
        "word word word word word",
        "word end",
    ]
    assert changes(result) == [(0, "text", ["text"] * 5)]
    assert "split into 5" in result.meta[DEGRADED_KEY][0]["why"]


def test_a_word_longer_than_the_limit_is_cut() -> None:
    result = degrade(message(c.Text(text="ab " + "x" * 25)), caps(text_limit=10))
    assert [part.text for part in result.parts if isinstance(part, c.Text)] == [
        "ab",
        "xxxxxxxxxx",
        "xxxxxxxxxx",
        "xxxxx",
    ]


def test_split_text_fits_after_conversion() -> None:
    # Every "." costs two characters in MarkdownV2, so the split counts what is sent, not the source.
    result = degrade(message(c.Text(text="a.b.c. d.e.f.")), caps(text_limit=10, markup="telegram_markdownv2"))
    assert result.parts == [
        c.Text(text=r"a\.b\.c\.", format="telegram_markdownv2"),
        c.Text(text=r"d\.e\.f\.", format="telegram_markdownv2"),
    ]


def test_text_in_another_dialect_is_sent_as_plain_text() -> None:
    result = degrade(message(c.Text(text="*hi*", format="slack")), caps(markup="telegram_markdownv2"))
    assert result.parts == [c.Text(text=r"\*hi\*", format="telegram_markdownv2")]
    assert "slack text cannot be converted" in result.meta[DEGRADED_KEY][0]["why"]


def test_mentions_are_kept_while_the_text_is_unchanged() -> None:
    mention = c.Mention(id="u1", name="Ann", offset=3, length=3)
    text = c.Text(text="Hi Ann", mentions=[mention])
    assert degrade(message(text), SMS).parts == [text]
    result = degrade(message(c.Text(text="Hi **Ann**", format="markdown", mentions=[mention])), SMS)
    assert result.parts == [c.Text(text="Hi Ann")]
    assert "mentions dropped" in result.meta[DEGRADED_KEY][0]["why"]


# ------------------------------------------------------------------------------------------ buttons


def test_buttons_become_numbered_text_with_links_listed() -> None:
    part = c.Buttons(
        text="How was it?",
        buttons=[
            c.Button(id="good", title="Good"),
            c.Button(id="site", title="Website", action="url", value="https://e.com"),
            c.Button(id="bad", title="Bad", action="postback", value="BAD"),
            c.Button(id="phone", title="Call us", action="call", value="+4930123"),
        ],
    )
    result = degrade(message(part), SMS)
    assert result.parts == [c.Text(text="How was it?\n1. Good\nWebsite: https://e.com\n2. Bad\nCall us: +4930123")]
    assert result.meta[CHOICES_KEY] == dict([choice(1, "good", "Good"), choice(2, "bad", "Bad")])
    assert result.meta[DEGRADED_KEY] == [
        {"part": 0, "from": "buttons", "to": ["text"], "why": "the channel shows no buttons"}
    ]


def test_url_buttons_the_channel_cannot_show_become_lines_and_the_rest_stay() -> None:
    part = c.Buttons(
        text="Order 42",
        buttons=[
            c.Button(id="track", title="Track", action="url", value="https://t.co/42"),
            c.Button(id="ok", title="OK"),
        ],
    )
    result = degrade(message(part), caps(parts=frozenset({"text", "buttons"}), max_buttons=3))
    assert result.parts == [c.Buttons(text="Order 42\nTrack: https://t.co/42", buttons=[c.Button(id="ok", title="OK")])]
    assert changes(result) == [(0, "buttons", ["buttons"])]
    assert CHOICES_KEY not in result.meta


def test_too_many_buttons_become_numbered_text() -> None:
    part = c.Buttons(text="Pick", buttons=[c.Button(id=f"b{n}", title=f"B{n}") for n in range(4)])
    result = degrade(message(part), caps(parts=frozenset({"text", "buttons"}), max_buttons=3))
    assert result.parts == [c.Text(text="Pick\n1. B0\n2. B1\n3. B2\n4. B3")]
    assert result.meta[DEGRADED_KEY][0]["why"] == "4 buttons, the channel shows at most 3"


def test_a_button_action_the_channel_lacks_turns_all_into_numbered_text() -> None:
    part = c.Buttons(buttons=[c.Button(id="a", title="A"), c.Button(id="b", title="B", action="postback", value="B")])
    result = degrade(message(part), caps(parts=frozenset({"text", "buttons"}), max_buttons=3))
    assert result.parts == [c.Text(text="1. A\n2. B")]
    assert result.meta[DEGRADED_KEY][0]["why"] == "the channel has no postback buttons"


def test_long_button_titles_are_shortened_with_an_ellipsis() -> None:
    part = c.Buttons(text="?", buttons=[c.Button(id="a", title="Absolutely yes"), c.Button(id="b", title="No")])
    result = degrade(message(part), caps(parts=frozenset({"text", "buttons"}), max_buttons=3, max_button_title=8))
    assert result.parts == [
        c.Buttons(text="?", buttons=[c.Button(id="a", title="Absolut…"), c.Button(id="b", title="No")])
    ]
    assert result.meta[DEGRADED_KEY] == [
        {"part": 0, "from": "buttons", "to": ["buttons"], "why": "titles shortened to 8 characters"}
    ]


# -------------------------------------------------------------------------------------------- lists

LIST = c.List(
    header="Menu",
    text="Choose a dish",
    button="Open",
    footer="Thanks",
    sections=[
        c.ListSection(title="Mains", rows=[c.ListRow(id="pizza", title="Pizza", description="with basil")]),
        c.ListSection(title="Desserts", rows=[c.ListRow(id="cake", title="Cake")]),
    ],
)


def test_list_becomes_numbered_text() -> None:
    result = degrade(message(LIST), SMS)
    assert result.parts == [c.Text(text="Menu\nChoose a dish\nMains\n1. Pizza - with basil\nDesserts\n2. Cake\nThanks")]
    assert result.meta[CHOICES_KEY] == dict([choice(1, "pizza", "Pizza"), choice(2, "cake", "Cake")])


def test_list_becomes_buttons_where_they_fit() -> None:
    channel = caps(parts=frozenset({"text", "buttons"}), max_buttons=3, button_actions=frozenset({"postback"}))
    result = degrade(message(LIST), channel)
    assert result.parts == [
        c.Buttons(
            text="Menu\nChoose a dish\nThanks",
            buttons=[
                c.Button(id="pizza", title="Pizza", action="postback", value="pizza"),
                c.Button(id="cake", title="Cake", action="postback", value="cake"),
            ],
        )
    ]
    assert changes(result) == [(0, "list", ["buttons"])]


def test_list_with_too_many_rows_becomes_numbered_text() -> None:
    channel = caps(parts=frozenset({"text", "list"}), max_list_rows=1, max_list_sections=10)
    result = degrade(message(LIST), channel)
    assert changes(result) == [(0, "list", ["text"])]
    assert result.meta[DEGRADED_KEY][0]["why"] == "2 rows, the channel shows at most 1"


def test_list_with_too_many_sections_becomes_numbered_text() -> None:
    channel = caps(parts=frozenset({"text", "list"}), max_list_rows=10, max_list_sections=1)
    assert changes(degrade(message(LIST), channel)) == [(0, "list", ["text"])]


def test_list_row_titles_are_shortened() -> None:
    channel = caps(parts=frozenset({"text", "list"}), max_list_rows=10, max_list_sections=2, max_row_title=4)
    result = degrade(message(LIST), channel)
    [shown] = result.parts
    assert isinstance(shown, c.List)
    assert [row.title for section in shown.sections for row in section.rows] == ["Piz…", "Cake"]
    assert changes(result) == [(0, "list", ["list"])]


# ---------------------------------------------------------------------------------- cards, carousels

CARD = c.Card(
    title="Red_shoe",
    subtitle="Size 42",
    media=c.Media(media="image", url="https://shop/red.jpg"),
    buttons=[c.Button(id="buy", title="Buy")],
)


def test_card_becomes_media_text_and_numbered_options() -> None:
    channel = caps(parts=frozenset({"text", "media"}), media=frozenset({"image"}), markup="whatsapp")
    result = degrade(message(CARD), channel)
    assert result.parts == [
        c.Media(media="image", url="https://shop/red.jpg"),
        c.Text(text="*Red_shoe*\nSize 42", format="whatsapp"),
        c.Text(text="1. Buy", format="whatsapp"),
    ]
    assert changes(result) == [(0, "card", ["media", "text", "buttons"]), (0, "buttons", ["text"])]
    assert result.meta[CHOICES_KEY] == dict([choice(1, "buy", "Buy")])


def test_card_becomes_buttons_where_buttons_are_shown() -> None:
    channel = caps(parts=frozenset({"text", "media", "buttons"}), media=frozenset({"image"}), max_buttons=3)
    result = degrade(message(CARD), channel)
    assert result.parts == [
        c.Media(media="image", url="https://shop/red.jpg"),
        c.Text(text="Red_shoe\nSize 42"),
        c.Buttons(buttons=[c.Button(id="buy", title="Buy")]),
    ]


def test_carousel_is_capped_and_the_rest_sent_as_cards() -> None:
    cards = [msgspec.structs.replace(CARD, title=f"Shoe {n}") for n in range(3)]
    channel = msgspec.structs.replace(EVERYTHING, max_cards=2)
    result = degrade(message(c.Carousel(cards=cards)), channel)
    assert result.parts == [c.Carousel(cards=cards[:2]), cards[2]]
    assert changes(result) == [(0, "carousel", ["carousel", "card"])]


def test_carousel_without_carousels_is_cards_in_sequence_and_numbering_continues() -> None:
    cards = [
        c.Card(title="A", buttons=[c.Button(id="a", title="Take A")]),
        c.Card(title="B", buttons=[c.Button(id="b", title="Take B")]),
    ]
    result = degrade(message(c.Carousel(cards=cards)), SMS)
    assert [part.text for part in result.parts if isinstance(part, c.Text)] == ["A", "1. Take A", "B", "2. Take B"]
    assert result.meta[CHOICES_KEY] == dict([choice(1, "a", "Take A"), choice(2, "b", "Take B")])


# ------------------------------------------------------------------------------ location and contact


def test_location_becomes_a_maps_link() -> None:
    part = c.Location(lat=52.520008, lon=13.4, name="TV tower", address="Panoramastr. 1A")
    result = degrade(message(part), SMS)
    assert result.parts == [c.Text(text="TV tower\nPanoramastr. 1A\nhttps://maps.google.com/?q=52.520008,13.4")]
    assert changes(result) == [(0, "location", ["text"])]


def test_location_uses_its_own_url() -> None:
    result = degrade(message(c.Location(lat=1.0, lon=2.0, url="https://osm.org/x")), SMS)
    assert result.parts == [c.Text(text="https://osm.org/x")]


CONTACT = c.Contact(name="Ann Lee", phones=["+4930123"], emails=["ann@e.com"], org="ACME, Inc.")


def test_contact_becomes_text() -> None:
    result = degrade(message(CONTACT), SMS)
    assert result.parts == [c.Text(text="Ann Lee\n+4930123\nann@e.com\nACME, Inc.")]


def test_contact_also_sent_as_a_vcard_where_documents_are_allowed() -> None:
    channel = caps(parts=frozenset({"text", "media"}), media=frozenset({"document"}), media_upload=True)
    result = degrade(message(CONTACT), channel)
    vcard = (
        "BEGIN:VCARD\r\nVERSION:3.0\r\nFN:Ann Lee\r\nN:Ann Lee;;;;\r\nTEL:+4930123\r\n"
        "EMAIL;TYPE=INTERNET:ann@e.com\r\nORG:ACME\\, Inc.\r\nEND:VCARD\r\n"
    )
    assert result.parts == [
        c.Text(text="Ann Lee\n+4930123\nann@e.com\nACME, Inc."),
        c.Media(media="document", data=vcard.encode(), mime="text/vcard", filename="Ann Lee.vcf"),
    ]
    assert changes(result) == [(0, "contact", ["text", "media"])]


def test_no_vcard_when_it_is_larger_than_the_channel_takes() -> None:
    channel = caps(parts=frozenset({"text", "media"}), media=frozenset({"document"}), media_max_bytes=10,
                   media_upload=True)
    assert [type(part) for part in degrade(message(CONTACT), channel).parts] == [c.Text]


def test_no_vcard_where_the_channel_takes_no_uploaded_bytes() -> None:
    channel = caps(parts=frozenset({"text", "media"}), media=frozenset({"document"}))
    assert [type(part) for part in degrade(message(CONTACT), channel).parts] == [c.Text]


def test_per_kind_media_limits_and_bytes_only_media() -> None:
    channel = caps(parts=frozenset({"text", "media"}), media=frozenset({"image", "video"}),
                   media_max_bytes=100, media_limits={"image": 10})
    big_image = c.Media(media="image", url="https://e.com/i.jpg", size=50)
    video = c.Media(media="video", url="https://e.com/v.mp4", size=50)
    bytes_only = c.Media(media="image", data=b"12345")
    result = degrade(message(big_image, video, bytes_only), channel)
    assert result.parts == [c.Text(text="https://e.com/i.jpg"), video]
    assert [change["why"] for change in result.meta["babelhub.degraded"]] == [
        "larger than the channel's 10 bytes: sent as a link",
        "the channel takes no uploaded bytes, and it has no url to link to",
    ]


# -------------------------------------------------------------------------------- template and poll


def test_template_becomes_its_fallback_text() -> None:
    part = c.Template(
        name="order_ready", params={"1": "Ann", "order": "#42"}, fallback_text="Hi {{1}}, order {{ order }} is {{2}}."
    )
    result = degrade(message(part), SMS)
    assert result.parts == [c.Text(text="Hi Ann, order #42 is {{2}}.")]
    assert changes(result) == [(0, "template", ["text"])]


def test_template_without_fallback_lists_name_and_params() -> None:
    result = degrade(message(c.Template(name="order_ready", params={"1": "Ann"})), SMS)
    assert result.parts == [c.Text(text="order_ready\n1: Ann")]


def test_poll_becomes_numbered_options() -> None:
    result = degrade(message(c.Poll(question="Lunch?", options=["Pizza", "Sushi"])), SMS)
    assert result.parts == [c.Text(text="Lunch?\n1. Pizza\n2. Sushi")]
    assert result.meta[CHOICES_KEY] == dict([choice(1, "option:0", "Pizza"), choice(2, "option:1", "Sushi")])


# -------------------------------------------------------------------------------------------- media

PHOTO = c.Media(media="image", url="https://cdn/p.jpg", caption="Our shop", data=b"x" * 100)


def test_media_kind_the_channel_cannot_show_becomes_a_link() -> None:
    result = degrade(message(PHOTO), SMS)
    assert result.parts == [c.Text(text="Our shop https://cdn/p.jpg")]
    assert result.meta[DEGRADED_KEY][0]["why"] == "the channel shows no media: sent as a link"


def test_media_larger_than_the_channel_takes_becomes_a_link() -> None:
    channel = caps(parts=frozenset({"text", "media"}), media=frozenset({"image"}), media_max_bytes=50)
    result = degrade(message(PHOTO), channel)
    assert result.parts == [c.Text(text="Our shop https://cdn/p.jpg")]
    assert result.meta[DEGRADED_KEY][0]["why"] == "larger than the channel's 50 bytes: sent as a link"


def test_media_without_url_is_dropped_and_recorded() -> None:
    result = degrade(message(c.Media(media="voice", file_id="f1")), SMS)
    assert result.parts == []
    assert changes(result) == [(0, "media", [])]


def test_long_caption_moves_to_a_following_text() -> None:
    channel = caps(parts=frozenset({"text", "media"}), media=frozenset({"image"}), caption_limit=5)
    result = degrade(message(PHOTO), channel)
    assert result.parts == [msgspec.structs.replace(PHOTO, caption=""), c.Text(text="Our shop")]
    assert changes(result) == [(0, "media", ["media", "text"])]


# ------------------------------------------------------------------------------- forms and products


def test_form_becomes_text() -> None:
    part = c.Form(
        id="f1",
        title="Booking",
        fields=[
            c.FormField(id="date", label="Date", value="2024-05-01"),
            c.FormField(id="size", label="Size", options=["S", "M"]),
            c.FormField(id="n", value=2),
        ],
    )
    result = degrade(message(part), SMS)
    assert result.parts == [c.Text(text="Booking\nDate: 2024-05-01\nSize (S, M)\nn: 2")]
    assert changes(result) == [(0, "form", ["text"])]


def test_product_becomes_text() -> None:
    part = c.Product(
        catalog_id="cat",
        product_ids=["sku1"],
        items=[c.ProductItem(product_id="sku2", quantity=2, price=9.5, currency="EUR")],
    )
    assert degrade(message(part), SMS).parts == [c.Text(text="- sku1\n- 2 x sku2 9.5 EUR")]


# ---------------------------------------------------------------------- markers, actions, reply_to


@pytest.mark.parametrize(
    ("part", "flag"),
    [
        (c.Reaction(emoji="👍", target="m0"), "reaction"),
        (c.Edit(target="m0"), "edit"),
        (c.Delete(target="m0"), "delete"),
    ],
)
def test_markers_the_channel_cannot_do_are_dropped(part: c.Part, flag: str) -> None:
    allowed = caps(parts=frozenset({"text", flag}), **{flag: True})
    assert degrade(message(part), allowed).parts == [part]
    for refused in (caps(parts=frozenset({"text", flag})), caps(**{flag: True})):
        result = degrade(message(part), refused)
        assert result.parts == []
        assert changes(result) == [(0, flag, [])]


def test_action_and_unsupported_parts_are_never_sent() -> None:
    result = degrade(message(c.Action(id="a"), c.Unsupported(reason="x", native={"k": 1})), EVERYTHING)
    assert result.parts == []
    assert changes(result) == [(0, "action", []), (1, "unsupported", [])]


def test_reply_to_is_dropped_where_the_channel_cannot_reply() -> None:
    original = message(c.Text(text="ok"), reply_to="m0")
    assert degrade(original, caps(reply=True)) is original
    result = degrade(original, SMS)
    assert result.reply_to == ""
    assert changes(result) == [(None, "reply_to", [])]


def test_existing_meta_is_kept() -> None:
    result = degrade(message(c.Poll(question="?", options=["a", "b"]), meta={"x.y": 1}), SMS)
    assert result.meta["x.y"] == 1


# ---------------------------------------------------------------------------------- resolve_choice

CHOICES = dict([choice(1, "yes", "Yes please"), choice(2, "no", "No"), choice(3, "y1990", "1990")])


@pytest.mark.parametrize("reply", ["2", " 2 ", "2.", "2)", "02", "no", "NO", "  No  "])
def test_resolve_choice_by_number_or_title(reply: str) -> None:
    assert resolve_choice(reply, CHOICES) == c.Action(id="no", title="No", source="msg1")


def test_resolve_choice_title_ignores_case_and_spacing() -> None:
    assert resolve_choice("yes   PLEASE", CHOICES) == c.Action(id="yes", title="Yes please", source="msg1")


def test_resolve_choice_number_not_in_menu_may_still_be_a_title() -> None:
    assert resolve_choice("1990", CHOICES) == c.Action(id="y1990", title="1990", source="msg1")


@pytest.mark.parametrize("reply", ["", "4", "maybe", "2 or 3", "yes"])
def test_resolve_choice_anything_else_is_none(reply: str) -> None:
    assert resolve_choice(reply, CHOICES) is None


def test_resolve_choice_ignores_malformed_entries() -> None:
    assert resolve_choice("1", {"1": "oops", "2": {"title": "x"}}) is None
    assert resolve_choice("x", {"1": "oops", "2": {"title": "x"}}) is None


# -------------------------------------------------------------------------------------- properties


def violations(message: c.Message, caps: Capabilities) -> list[str]:
    """What in `message` a channel with `caps` could not show — written independently of degrade."""
    found: list[str] = []

    def limit(value: int, most: int) -> bool:
        return most > 0 and value > most

    def check_buttons(where: str, buttons: list[c.Button]) -> None:
        if limit(len(buttons), caps.max_buttons):
            found.append(f"{where}: {len(buttons)} buttons > {caps.max_buttons}")
        for button in buttons:
            if button.action not in caps.button_actions:
                found.append(f"{where}: {button.action} button")
            if limit(len(button.title), caps.max_button_title):
                found.append(f"{where}: button title {button.title!r} too long")

    def check_media(where: str, media: c.Media) -> None:
        if media.media not in caps.media:
            found.append(f"{where}: {media.media} not shown")
        if limit(len(media.data) or media.size, caps.media_limits.get(media.media, caps.media_max_bytes)):
            found.append(f"{where}: media too large")
        if not (media.url or media.file_id or caps.media_upload):
            found.append(f"{where}: bytes-only media on a channel that takes no uploads")

    def check_choice_text(where: str, text: str) -> None:
        if limit(len(text), caps.choice_text_limit):
            found.append(f"{where}: text with choices longer than {caps.choice_text_limit}")

    def check_card(where: str, card: c.Card) -> None:
        if card.media is not None:
            check_media(where, card.media)
        check_buttons(where, card.buttons)

    if message.reply_to and not caps.reply:
        found.append("reply_to set")
    for n, part in enumerate(message.parts):
        where = f"part {n} ({part.__struct_config__.tag})"
        if part.__struct_config__.tag not in caps.parts or isinstance(part, c.Action | c.Unsupported):
            found.append(f"{where}: type not allowed")
        match part:
            case c.Text():
                if part.format != caps.markup:
                    found.append(f"{where}: format {part.format}")
                if limit(len(part.text), caps.text_limit):
                    found.append(f"{where}: {len(part.text)} characters")
            case c.Media():
                check_media(where, part)
                if limit(len(part.caption), caps.caption_limit):
                    found.append(f"{where}: caption too long")
            case c.Buttons():
                check_buttons(where, part.buttons)
                check_choice_text(where, part.text)
            case c.List():
                check_choice_text(where, part.text)
                rows = [row for section in part.sections for row in section.rows]
                if limit(len(rows), caps.max_list_rows) or limit(len(part.sections), caps.max_list_sections):
                    found.append(f"{where}: too many rows or sections")
                found.extend(
                    f"{where}: row title too long" for row in rows if limit(len(row.title), caps.max_row_title)
                )
            case c.Card():
                check_card(where, part)
            case c.Carousel():
                if limit(len(part.cards), caps.max_cards):
                    found.append(f"{where}: too many cards")
                for card in part.cards:
                    check_card(where, card)
            case c.Reaction() if not caps.reaction:
                found.append(f"{where}: reactions not supported")
            case c.Edit() if not caps.edit:
                found.append(f"{where}: edits not supported")
            case c.Delete() if not caps.delete:
                found.append(f"{where}: deletes not supported")
    return found


def choice_ids(message: c.Message) -> set[str]:
    """The ids of every option a user could pick in `message`, shown natively."""
    ids: set[str] = set()

    def from_buttons(buttons: list[c.Button]) -> None:
        ids.update(button.id for button in buttons if button.action in ("reply", "postback"))

    for part in message.parts:
        match part:
            case c.Buttons():
                from_buttons(part.buttons)
            case c.Card():
                from_buttons(part.buttons)
            case c.Carousel():
                for card in part.cards:
                    from_buttons(card.buttons)
            case c.List():
                ids.update(row.id for section in part.sections for row in section.rows)
            case c.Poll():
                ids.update(f"option:{n}" for n in range(len(part.options)))
    return ids


capabilities = st.builds(
    Capabilities,
    parts=st.frozensets(st.sampled_from(get_args(PartType))),
    media=st.frozensets(st.sampled_from(get_args(c.MediaKind))),
    media_max_bytes=st.sampled_from([0, 8, 10**6]),
    media_limits=st.dictionaries(st.sampled_from(get_args(c.MediaKind)), st.sampled_from([4, 10**6]), max_size=2),
    media_upload=st.booleans(),
    choice_text_limit=st.sampled_from([0, 30, 1024]),
    text_limit=st.integers(20, 400),
    caption_limit=st.sampled_from([0, 10, 1024]),
    markup=st.sampled_from(get_args(c.TextFormat)),
    max_buttons=st.integers(0, 5),
    max_button_title=st.integers(0, 25),
    button_actions=st.frozensets(st.sampled_from(get_args(c.ButtonAction))),
    max_list_rows=st.integers(0, 12),
    max_list_sections=st.integers(0, 4),
    max_row_title=st.integers(0, 30),
    max_cards=st.integers(0, 4),
    reply=st.booleans(),
    edit=st.booleans(),
    delete=st.booleans(),
    reaction=st.booleans(),
)
any_capabilities = st.one_of(st.just(SMS), capabilities)
slow = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@slow
@given(strategies.messages, any_capabilities)
def test_degraded_messages_only_use_what_the_channel_allows(original: c.Message, channel: Capabilities) -> None:
    result = degrade(original, channel)
    assert violations(result, channel) == []
    for key, value in original.meta.items():
        if not key.startswith("babelhub."):
            assert result.meta[key] == value


@slow
@given(strategies.messages)
def test_sms_gets_short_plain_texts_only(original: c.Message) -> None:
    result = degrade(original, SMS)
    assert all(isinstance(part, c.Text) and part.format == "plain" and len(part.text) <= 160 for part in result.parts)


@slow
@given(strategies.messages, any_capabilities)
def test_every_choice_survives_as_a_button_or_a_number(original: c.Message, channel: Capabilities) -> None:
    result = degrade(original, channel)
    menu: dict[str, dict[str, str]] = result.meta.get(CHOICES_KEY, {})
    assert choice_ids(original) <= choice_ids(result) | {entry["id"] for entry in menu.values()}
    titles = [" ".join(entry["title"].split()).casefold() for entry in menu.values()]
    for number, entry in menu.items():
        assert resolve_choice(number, menu) == c.Action(id=entry["id"], title=entry["title"], source=original.id)
        title = " ".join(entry["title"].split()).casefold()
        is_number_like = title.rstrip(".)").strip().isdigit()
        if title and titles.count(title) == 1 and not is_number_like:
            resolved = resolve_choice(f" {entry['title'].casefold()} ", menu)
            assert resolved is not None and resolved.id == entry["id"]


@slow
@given(strategies.messages, any_capabilities)
def test_degradation_is_deterministic_and_a_fitting_message_comes_back_unchanged(
    original: c.Message, channel: Capabilities
) -> None:
    once = degrade(original, channel)
    assert degrade(original, channel) == once
    assert degrade(once, channel) is once


fitting_parts = strategies.parts.filter(lambda part: not isinstance(part, c.Action | c.Unsupported))


@slow
@given(st.lists(fitting_parts, max_size=6), strategies.messages)
def test_a_message_within_everything_is_returned_as_it_is(parts: list[c.Part], template: c.Message) -> None:
    plain = [msgspec.structs.replace(part, format="plain") if isinstance(part, c.Text) else part for part in parts]
    original = msgspec.structs.replace(template, parts=plain)
    assert degrade(original, EVERYTHING) is original


def test_text_too_long_for_the_choices_goes_before_them() -> None:
    channel = caps(parts=frozenset({"text", "buttons"}), max_buttons=3, choice_text_limit=20)
    part = c.Buttons(text="A rather long introduction. Then the question?", buttons=[c.Button(id="y", title="Yes")])
    result = degrade(message(part), channel)
    assert result.parts == [c.Text(text="A rather long"),
                            c.Text(text="introduction. Then"),
                            c.Buttons(text="the question?", buttons=[c.Button(id="y", title="Yes")])]
    assert changes(result) == [(0, "buttons", ["text", "text", "buttons"])]
