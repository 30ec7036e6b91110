"""Degradation: rewrite a message until a channel can show it, and say what was changed.

`degrade(message, caps)` returns a message whose parts only use what `caps` allows. It is pure and
deterministic: the same message and capabilities always give the same result. Each rule turns a part
into parts a channel is more likely to show, and the result is fitted again until it fits (a card
becomes media + text + buttons, the buttons may then become numbered text, that text may be split):

* text      markdown/html converted to `caps.markup`; longer than `caps.text_limit` → split on
            paragraphs, then lines, then words (a word is cut only when it alone is too long).
* buttons   too many, an action the channel lacks → numbered text ("1. Yes"); url/call buttons the
            channel cannot show → "Title: url" lines; titles too long → shortened with "…".
* list      too many rows/sections → numbered text; not shown at all → buttons if they fit, else
            numbered text; row titles too long → shortened with "…".
* card      media + text + buttons. carousel → at most `caps.max_cards`, the rest as single cards.
* location  → text with a maps link.        contact → text, plus a vCard where documents can be sent.
* template  → its fallback text with {{params}} filled in.   poll → numbered options.
* media     a kind or size the channel does not take → a link; a long caption → a text after it.
* form, product → text.     reaction, edit, delete the channel cannot do → dropped.
* action, unsupported → dropped (they describe what came in and are never sent).

Every change is listed, in order, in `meta["babelhub.degraded"]`. Numbered options share one
numbering per message, kept in `meta["babelhub.choices"]` ({"2": {"id", "title", "source"}}), so
that a later reply "2" — or the option's title — is turned back into an `Action` by `resolve_choice`.

A limit of 0 in `Capabilities` means the channel documents no limit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import msgspec

from babelhub import canonical as c
from babelhub.codecs import markup
from babelhub.codecs.base import Capabilities

__all__ = ["CHOICES_KEY", "DEGRADED_KEY", "degrade", "resolve_choice"]

DEGRADED_KEY: Final = "babelhub.degraded"
"""meta key: the list of changes, each {"part": index in the original, "from", "to": [types], "why"}."""
CHOICES_KEY: Final = "babelhub.choices"
"""meta key: the numbered options shown as text, {"1": {"id", "title", "source"}, …}."""

ELLIPSIS: Final = "…"
MAPS_URL: Final = "https://maps.google.com/?q={lat},{lon}"

_LINK_ACTIONS: Final = frozenset({"url", "call"})
_CHOICE_ACTIONS: Final = ("reply", "postback")


def degrade(message: c.Message, caps: Capabilities) -> c.Message:
    """`message` rewritten to what a channel with `caps` can show, every change listed in `meta`."""
    degradation = _Degradation(message, caps)
    parts = [fitted for index, part in enumerate(message.parts) for fitted in degradation.fit(part, index)]
    reply_to = message.reply_to
    if reply_to and not caps.reply:
        degradation.record(None, "reply_to", [], "the channel cannot reply to a specific message")
        reply_to = ""
    if parts == message.parts and reply_to == message.reply_to:
        return message
    meta = dict(message.meta)
    if degradation.changes:
        meta[DEGRADED_KEY] = degradation.changes
    if degradation.choices:
        meta[CHOICES_KEY] = degradation.choices
    return msgspec.structs.replace(message, parts=parts, reply_to=reply_to, meta=meta)


# "2", "2.", "2)", " 2 " — the ways people answer a numbered menu.
_CHOICE_NUMBER: Final = re.compile(r"(\d+)\s*[.)]?")


def resolve_choice(text: str, choices: Mapping[str, Any]) -> c.Action | None:
    """The option a reply picks from a numbered menu — by its number or by its title (case and spacing
    ignored) — as the `Action` a button press would have given; None when the reply picks none."""
    wanted = _normalized(text)
    if not wanted:
        return None
    number = _CHOICE_NUMBER.fullmatch(wanted)
    if number is not None:
        action = _choice_action(choices.get(str(int(number.group(1)))))
        if action is not None:
            return action
    for key in sorted((key for key in choices if key.isdigit()), key=int):
        action = _choice_action(choices[key])
        if action is not None and _normalized(action.title) == wanted:
            return action
    return None


def _normalized(text: str) -> str:
    return " ".join(text.split()).casefold()


def _choice_action(entry: Any) -> c.Action | None:
    """A choice map entry as an Action; the map comes back from storage, so anything malformed is None."""
    if not isinstance(entry, Mapping):
        return None
    choice_id, title, source = entry.get("id"), entry.get("title", ""), entry.get("source", "")
    if not isinstance(choice_id, str) or not isinstance(title, str) or not isinstance(source, str):
        return None
    return c.Action(id=choice_id, title=title, source=source)


# ------------------------------------------------------------------------------------------ the rules


def _type(part: c.Part) -> str:
    """The part's `type` tag ("text", "buttons", …)."""
    return str(part.__struct_config__.tag)


def _reachable(media: c.Media, caps: Capabilities) -> bool:
    """Whether the channel can get at the file: by url or its own file id, or by upload if it takes bytes."""
    return bool(media.url or media.file_id) or caps.media_upload


def _within(length: int, limit: int) -> bool:
    return limit <= 0 or length <= limit


def _shorten(title: str, limit: int) -> str:
    """`title` cut to `limit` characters, the last one an ellipsis to show that it was cut."""
    if _within(len(title), limit):
        return title
    return title[: limit - 1] + ELLIPSIS


def _lines(*lines: str) -> str:
    return "\n".join(line for line in lines if line)


class _Degradation:
    """The state of one message's degradation: its changes so far and its numbered options."""

    def __init__(self, message: c.Message, caps: Capabilities) -> None:
        self.message = message
        self.caps = caps
        self.changes: list[dict[str, Any]] = []
        self.choices: dict[str, dict[str, str]] = {}

    def record(self, index: int | None, was: str, became: Iterable[c.Part] | list[str], why: str) -> None:
        to = [item if isinstance(item, str) else _type(item) for item in became]
        self.changes.append({"part": index, "from": was, "to": to, "why": why})

    def number(self, choice_id: str, title: str) -> int:
        """The next number of this message's menu, remembered so that a reply can be resolved."""
        n = len(self.choices) + 1
        self.choices[str(n)] = {"id": choice_id, "title": title, "source": self.message.id}
        return n

    # -- dispatch

    def fit(self, part: c.Part, index: int, generated: bool = False) -> list[c.Part]:
        """`part` (or what it becomes) in a form the channel shows. `generated` parts were written by an
        earlier rule, whose change is already recorded."""
        match part:
            case c.Text():
                return self.fit_text(part, index, generated)
            case c.Media():
                return self.fit_media(part, index)
            case c.Buttons() | c.List() if self.choice_text_too_long(part):
                return self.move_choice_text(part, index)
            case c.Buttons():
                return self.fit_buttons(part, index)
            case c.List():
                return self.fit_list(part, index)
            case c.Card():
                return self.fit_card(part, index)
            case c.Carousel():
                return self.fit_carousel(part, index)
            case c.Location():
                return self.fit_location(part, index)
            case c.Contact():
                return self.fit_contact(part, index)
            case c.Template():
                return self.fit_template(part, index)
            case c.Poll():
                return self.fit_poll(part, index)
            case c.Form() | c.Product():
                return self.fit_form_or_product(part, index)
            case c.Reaction() | c.Edit() | c.Delete():
                return self.fit_marker(part, index)
            case c.Action() | c.Unsupported():
                return self.drop(part, index, f"{_type(part)} parts describe what came in and are never sent")

    def replace(self, part: c.Part, index: int, parts: list[c.Part], why: str) -> list[c.Part]:
        """Record that `part` became `parts`, then fit those in turn."""
        self.record(index, _type(part), parts, why)
        return [fitted for new in parts for fitted in self.fit(new, index, generated=True)]

    def drop(self, part: c.Part, index: int, why: str) -> list[c.Part]:
        self.record(index, _type(part), [], why)
        return []

    def allows(self, part_type: str) -> bool:
        return part_type in self.caps.parts

    # -- text

    def fit_text(self, part: c.Text, index: int, generated: bool) -> list[c.Part]:
        if not self.allows("text"):
            return self.drop(part, index, "the channel shows no text")
        target = self.caps.markup
        source: c.TextFormat = part.format if part.format in markup.READABLE or part.format == target else "plain"

        rendered_texts: dict[str, str] = {}  # fitting and sending render the same chunks: do it once

        def render(text: str) -> str:
            if text not in rendered_texts:
                rendered_texts[text] = markup.convert(text, source, target)
            return rendered_texts[text]

        def fits(text: str) -> bool:
            return _within(len(render(text)), self.caps.text_limit)

        chunks = _split_to_fit(part.text, fits)
        rendered = [render(chunk) for chunk in chunks]
        if rendered == [part.text]:  # the same characters: at most the format's name changes
            return [part if part.format == target else msgspec.structs.replace(part, format=target)]
        # Mention offsets count characters of the original text, which is no longer what is sent.
        texts: list[c.Part] = [c.Text(text=text, format=target) for text in rendered]
        reasons = []
        if source != part.format:
            reasons.append(f"{part.format} text cannot be converted to {target}, sent as plain text")
        if rendered != chunks:
            reasons.append(f"{source} converted to {target}")
        split = chunks != [part.text]
        if split:
            reasons.append(f"longer than {self.caps.text_limit} characters, split into {len(chunks)}")
        if part.mentions:
            reasons.append("mentions dropped")
        if not generated or split:
            self.record(index, "text", texts, "; ".join(reasons))
        return texts

    # -- choices: buttons, lists, polls

    def choice_text_too_long(self, part: c.Buttons | c.List) -> bool:
        limit = self.caps.choice_text_limit
        return self.allows(_type(part)) and limit > 0 and len(part.text) > limit

    def move_choice_text(self, part: c.Buttons | c.List, index: int) -> list[c.Part]:
        """Text too long to go with the choices: all but its last piece go first, as text of their own."""
        limit = self.caps.choice_text_limit
        *before, last = _split_to_fit(part.text, lambda chunk: len(chunk) <= limit)
        pieces: list[c.Part] = [c.Text(text=chunk) for chunk in before]
        why = f"text longer than the {limit} characters shown with choices: the start sent before them"
        return self.replace(part, index, [*pieces, msgspec.structs.replace(part, text=last)], why)

    def fit_buttons(self, part: c.Buttons, index: int) -> list[c.Part]:
        caps = self.caps
        if not self.allows("buttons"):
            return self.replace(part, index, [self.numbered_buttons(part)], "the channel shows no buttons")
        links = [b for b in part.buttons if b.action in _LINK_ACTIONS and b.action not in caps.button_actions]
        kept = [b for b in part.buttons if b not in links]
        lacking = sorted({b.action for b in kept if b.action not in caps.button_actions})
        if lacking:
            why = f"the channel has no {', '.join(lacking)} buttons"
            return self.replace(part, index, [self.numbered_buttons(part)], why)
        if not _within(len(kept), caps.max_buttons):
            why = f"{len(kept)} buttons, the channel shows at most {caps.max_buttons}"
            return self.replace(part, index, [self.numbered_buttons(part)], why)
        text = _lines(part.text, *(f"{b.title}: {b.value}" for b in links))
        if not kept:
            return self.replace(part, index, [c.Text(text=text)], "the channel has no url/call buttons")
        shortened = [msgspec.structs.replace(b, title=_shorten(b.title, caps.max_button_title)) for b in kept]
        if links or shortened != kept:
            fitted = c.Buttons(text=text, buttons=shortened)
            reasons = [f"{len(links)} url/call buttons as text lines"] if links else []
            if shortened != kept:
                reasons.append(f"titles shortened to {caps.max_button_title} characters")
            self.record(index, "buttons", [fitted], "; ".join(reasons))
            # The link lines may have made the text too long to go with the buttons.
            return self.move_choice_text(fitted, index) if self.choice_text_too_long(fitted) else [fitted]
        return [part]

    def numbered_buttons(self, part: c.Buttons) -> c.Text:
        """The buttons as text: choice buttons numbered, url/call buttons with their address."""
        lines = [part.text]
        for button in part.buttons:
            if button.action in _LINK_ACTIONS:
                lines.append(f"{button.title}: {button.value}")
            else:
                lines.append(f"{self.number(button.id, button.title)}. {button.title}")
        return c.Text(text=_lines(*lines))

    def fit_list(self, part: c.List, index: int) -> list[c.Part]:
        caps = self.caps
        rows = [row for section in part.sections for row in section.rows]
        if self.allows("list"):
            if not _within(len(rows), caps.max_list_rows):
                why = f"{len(rows)} rows, the channel shows at most {caps.max_list_rows}"
                return self.replace(part, index, [self.numbered_list(part)], why)
            if not _within(len(part.sections), caps.max_list_sections):
                why = f"{len(part.sections)} sections, the channel shows at most {caps.max_list_sections}"
                return self.replace(part, index, [self.numbered_list(part)], why)
            return self.shorten_rows(part, index)
        action = next((action for action in _CHOICE_ACTIONS if action in caps.button_actions), None)
        if self.allows("buttons") and action is not None and _within(len(rows), caps.max_buttons):
            buttons = c.Buttons(
                text=_lines(part.header, part.text, part.footer),
                buttons=[_row_button(row, action) for row in rows],
            )
            return self.replace(part, index, [buttons], "the channel shows no lists; rows as buttons")
        return self.replace(part, index, [self.numbered_list(part)], "the channel shows no lists")

    def shorten_rows(self, part: c.List, index: int) -> list[c.Part]:
        limit = self.caps.max_row_title
        sections = [
            msgspec.structs.replace(
                section, rows=[msgspec.structs.replace(row, title=_shorten(row.title, limit)) for row in section.rows]
            )
            for section in part.sections
        ]
        if sections == part.sections:
            return [part]
        fitted = msgspec.structs.replace(part, sections=sections)
        self.record(index, "list", [fitted], f"row titles shortened to {limit} characters")
        return [fitted]

    def numbered_list(self, part: c.List) -> c.Text:
        lines = [part.header, part.text]
        for section in part.sections:
            lines.append(section.title)
            for row in section.rows:
                n = self.number(row.id, row.title)
                lines.append(f"{n}. {row.title} - {row.description}" if row.description else f"{n}. {row.title}")
        lines.append(part.footer)
        return c.Text(text=_lines(*lines))

    def fit_poll(self, part: c.Poll, index: int) -> list[c.Part]:
        if self.allows("poll"):
            return [part]
        lines = [part.question]
        for position, option in enumerate(part.options):
            lines.append(f"{self.number(f'option:{position}', option)}. {option}")
        return self.replace(part, index, [c.Text(text=_lines(*lines))], "the channel shows no polls")

    # -- cards

    def fit_card(self, part: c.Card, index: int) -> list[c.Part]:
        if self.allows("card"):
            fitted = self.card_as_shown(part)
            if fitted == part:
                return [part]
            if fitted is not None:
                why = f"button titles shortened to {self.caps.max_button_title} characters"
                self.record(index, "card", [fitted], why)
                return [fitted]
            return self.replace(part, index, _card_pieces(part), "the card's media or buttons do not fit")
        return self.replace(part, index, _card_pieces(part), "the channel shows no cards")

    def card_as_shown(self, card: c.Card) -> c.Card | None:
        """The card with its button titles shortened, or None when its media or buttons cannot be shown."""
        caps = self.caps
        if card.media is not None and not self.media_fits(card.media):
            return None
        if not _within(len(card.buttons), caps.max_buttons):
            return None
        if any(button.action not in caps.button_actions for button in card.buttons):
            return None
        buttons = [msgspec.structs.replace(b, title=_shorten(b.title, caps.max_button_title)) for b in card.buttons]
        return card if buttons == card.buttons else msgspec.structs.replace(card, buttons=buttons)

    def fit_carousel(self, part: c.Carousel, index: int) -> list[c.Part]:
        caps = self.caps
        if not self.allows("carousel"):
            return self.replace(part, index, list(part.cards), "the channel shows no carousels")
        limit = caps.max_cards or len(part.cards)
        shown, rest = part.cards[:limit], part.cards[limit:]
        fitted = [self.card_as_shown(card) for card in shown]
        if any(card is None for card in fitted):
            return self.replace(part, index, list(part.cards), "a card's media or buttons do not fit")
        carousel = c.Carousel(cards=[card for card in fitted if card is not None])
        if carousel == part:
            return [part]
        reasons = [f"{len(rest)} cards after the first {caps.max_cards} sent one by one"] if rest else []
        if carousel.cards != shown:
            reasons.append(f"button titles shortened to {caps.max_button_title} characters")
        return self.replace(part, index, [carousel, *rest], "; ".join(reasons))

    # -- media

    def media_fits(self, media: c.Media) -> bool:
        size = len(media.data) if media.data else media.size
        return (
            media.media in self.caps.media
            and _within(size, self.caps.media_limit(media.media))
            and _reachable(media, self.caps)
        )

    def fit_media(self, part: c.Media, index: int) -> list[c.Part]:
        caps = self.caps
        if not self.allows("media") or not self.media_fits(part):
            why = self.media_refusal(part)
            if not part.url:
                return self.drop(part, index, f"{why}, and it has no url to link to")
            link = c.Text(text=f"{part.caption} {part.url}".strip())
            return self.replace(part, index, [link], f"{why}: sent as a link")
        if not _within(len(part.caption), caps.caption_limit):
            pieces: list[c.Part] = [msgspec.structs.replace(part, caption=""), c.Text(text=part.caption)]
            why = f"caption longer than {caps.caption_limit} characters moved to a text"
            self.record(index, "media", pieces, why)
            return [pieces[0], *self.fit(pieces[1], index, generated=True)]
        return [part]

    def media_refusal(self, part: c.Media) -> str:
        if not self.allows("media"):
            return "the channel shows no media"
        if part.media not in self.caps.media:
            return f"the channel takes no {part.media}"
        if not _reachable(part, self.caps):
            return "the channel takes no uploaded bytes"
        return f"larger than the channel's {self.caps.media_limit(part.media)} bytes"

    # -- things shown as text

    def fit_location(self, part: c.Location, index: int) -> list[c.Part]:
        if self.allows("location"):
            return [part]
        url = part.url or MAPS_URL.format(lat=_coordinate(part.lat), lon=_coordinate(part.lon))
        text = c.Text(text=_lines(part.name, part.address, url))
        return self.replace(part, index, [text], "the channel shows no locations: sent as a maps link")

    def fit_contact(self, part: c.Contact, index: int) -> list[c.Part]:
        if self.allows("contact"):
            return [part]
        pieces: list[c.Part] = [c.Text(text=_lines(part.name, *part.phones, *part.emails, part.org, *part.urls))]
        vcard = c.Media(
            media="document",
            data=_vcard(part).encode(),
            mime="text/vcard",
            filename=f"{_file_name(part.name)}.vcf",
        )
        if self.allows("media") and self.media_fits(vcard):
            pieces.append(vcard)
        return self.replace(part, index, pieces, "the channel shows no contacts: sent as text")

    def fit_template(self, part: c.Template, index: int) -> list[c.Part]:
        if self.allows("template"):
            return [part]
        if part.fallback_text:
            text = _PLACEHOLDER.sub(lambda found: part.params.get(found.group(1), found.group(0)), part.fallback_text)
        else:
            text = _lines(part.name, *(f"{key}: {value}" for key, value in part.params.items()))
        return self.replace(part, index, [c.Text(text=text)], "the channel has no templates: sent as its text")

    def fit_form_or_product(self, part: c.Form | c.Product, index: int) -> list[c.Part]:
        if self.allows(_type(part)):
            return [part]
        text = _form_text(part) if isinstance(part, c.Form) else _product_text(part)
        return self.replace(part, index, [c.Text(text=text)], f"the channel shows no {_type(part)}s: sent as text")

    def fit_marker(self, part: c.Reaction | c.Edit | c.Delete, index: int) -> list[c.Part]:
        able = {"reaction": self.caps.reaction, "edit": self.caps.edit, "delete": self.caps.delete}
        kind = _type(part)
        if able[kind] and self.allows(kind):
            return [part]
        verb = "react to" if kind == "reaction" else kind
        return self.drop(part, index, f"the channel cannot {verb} messages")


# ------------------------------------------------------------------------------------------ helpers

_PLACEHOLDER: Final = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")


def _row_button(row: c.ListRow, action: str) -> c.Button:
    """A list row as a button; a postback button carries the row id as its payload."""
    if action == "postback":
        return c.Button(id=row.id, title=row.title, action="postback", value=row.id)
    return c.Button(id=row.id, title=row.title, action="reply")


def _card_pieces(card: c.Card) -> list[c.Part]:
    """A card as separate parts: its media, its title (bold) and subtitle, its buttons."""
    pieces: list[c.Part] = [card.media] if card.media is not None else []
    # CommonMark only reads "**" as bold when it touches the title, hence the strip.
    title = f"**{markup.convert(card.title.strip(), 'plain', 'markdown')}**" if card.title.strip() else ""
    text = _lines(title, markup.convert(card.subtitle, "plain", "markdown"))
    if text:
        pieces.append(c.Text(text=text, format="markdown"))
    if card.buttons:
        pieces.append(c.Buttons(buttons=card.buttons))
    return pieces


def _coordinate(value: float) -> str:
    """Degrees with six decimals (about 10 cm), trailing zeros dropped: "52.52", never "5.2e1"."""
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _vcard_value(value: str) -> str:
    """RFC 2426 text value: backslash, comma, semicolon and newline escaped."""
    escaped = value.replace("\\", "\\\\").replace(",", "\\,").replace(";", "\\;")
    return _one_line(escaped, "\\n")


def _one_line(value: str, newline: str = " ") -> str:
    """`value` with its line breaks replaced: a raw line break would end the vCard property."""
    return value.replace("\r\n", newline).replace("\r", newline).replace("\n", newline)


def _vcard(contact: c.Contact) -> str:
    """The contact as a vCard 3.0 (RFC 2426): FN and N are required; the name is not split into parts."""
    name = _vcard_value(contact.name)
    lines = ["BEGIN:VCARD", "VERSION:3.0", f"FN:{name}", f"N:{name};;;;"]
    lines.extend(f"TEL:{_one_line(phone)}" for phone in contact.phones)
    lines.extend(f"EMAIL;TYPE=INTERNET:{_vcard_value(email)}" for email in contact.emails)
    if contact.org:
        lines.append(f"ORG:{_vcard_value(contact.org)}")
    lines.extend(f"URL:{_one_line(url)}" for url in contact.urls)  # a URI, not text: nothing to escape
    lines.append("END:VCARD")
    return "\r\n".join(lines) + "\r\n"


def _file_name(name: str) -> str:
    """`name` safe as a file name on any system."""
    safe = re.sub(r'[\\/:*?"<>|\x00-\x1f]+', "_", name).strip(" ._")
    return safe or "contact"


def _form_text(form: c.Form) -> str:
    lines = [form.title]
    for field in form.fields:
        line = field.label or field.id
        if field.options:
            line += f" ({', '.join(field.options)})"
        if field.value is not None:
            line += f": {_value_text(field.value)}"
        lines.append(line)
    return _lines(*lines)


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()


def _product_text(product: c.Product) -> str:
    lines = [f"- {product_id}" for product_id in product.product_ids]
    for item in product.items:
        price = f" {item.price:g} {item.currency}".rstrip() if item.price is not None else ""
        lines.append(f"- {item.quantity} x {item.product_id}{price}")
    return _lines(*lines) or product.catalog_id


def _split_to_fit(text: str, fits: Callable[[str], bool]) -> list[str]:
    """`text` in pieces that each fit: split on paragraphs, then lines, then words; a word is cut only
    when it alone does not fit. Whitespace at the cuts is dropped (it would start or end a message)."""
    if fits(text):
        return [text]
    return [chunk for chunk in _split(text, fits, ("\n\n", "\n", " ")) if chunk.strip()]


def _split(text: str, fits: Callable[[str], bool], separators: tuple[str, ...]) -> list[str]:
    if not separators:
        return _cut(text, fits)
    separator, finer = separators[0], separators[1:]
    pieces = text.split(separator)
    chunks: list[str] = []
    start = 0
    while start < len(pieces):
        count = _most_that_fit(pieces, start, separator, fits)
        if count == 0:  # this piece alone is too long: split it more finely
            chunks.extend(_split(pieces[start], fits, finer))
            count = 1
        else:
            chunks.append(separator.join(pieces[start : start + count]))
        start += count
    return chunks


def _most_that_fit(pieces: list[str], start: int, separator: str, fits: Callable[[str], bool]) -> int:
    """How many pieces from `start` fit together (0 if not even one)."""
    return _largest(len(pieces) - start, lambda count: fits(separator.join(pieces[start : start + count])))


def _cut(word: str, fits: Callable[[str], bool]) -> list[str]:
    """A word too long for one message, in the longest pieces that fit (at least one character each)."""
    chunks: list[str] = []
    rest = word
    while rest:
        size = max(_longest_prefix(rest, fits), 1)
        chunks.append(rest[:size])
        rest = rest[size:]
    return chunks


def _longest_prefix(text: str, fits: Callable[[str], bool]) -> int:
    return _largest(len(text), lambda length: fits(text[:length]))


def _largest(most: int, fits: Callable[[int], bool]) -> int:
    """The largest n in 1..`most` for which `fits(n)` holds, or 0. The probe doubles until it fails,
    then bisects, so a long text is measured a few times per chunk, on pieces about a chunk long,
    rather than once per word or on the whole text."""
    fitting, probe = 0, 1
    while probe <= most and fits(probe):
        fitting, probe = probe, probe * 2
    too_many = min(probe, most + 1)
    while too_many - fitting > 1:
        middle = (fitting + too_many) // 2
        if fits(middle):
            fitting = middle
        else:
            too_many = middle
    return fitting
