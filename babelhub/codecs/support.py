"""What each installed channel does with each part type: shown natively, degraded into something it
can show, or not possible. Worked out by running a sample of every part through `degrade` with each
codec's declared capabilities, so the table cannot drift from what the hub really sends. Beside it, the
settings each channel's connections take, from the codecs' declared `secret_settings` and
`option_settings`."""

from __future__ import annotations

from typing import Literal, TypeAlias

import msgspec

from babelhub import canonical as c
from babelhub.codecs import available, load
from babelhub.codecs.degrade import degrade
from babelhub.codecs.settings import ConnectionOptions, SettingRow, settings_rows

__all__ = ["SAMPLES", "Support", "capabilities_table", "markdown_table", "settings_table", "support"]

Support: TypeAlias = Literal["native", "degraded", "impossible"]

_BUTTONS = [c.Button(id="a", title="Yes"), c.Button(id="b", title="No")]
_IMAGE = c.Media(media="image", url="https://example.com/a.jpg", mime="image/jpeg", size=1000)

#: One outbound sample per part type an application can send (`action` and `unsupported` only come in).
SAMPLES: dict[str, list[c.Part]] = {
    "text": [c.Text(text="Hello")],
    "image": [_IMAGE],
    "audio": [c.Media(media="audio", url="https://example.com/a.mp3", mime="audio/mpeg", size=1000)],
    "video": [c.Media(media="video", url="https://example.com/a.mp4", mime="video/mp4", size=1000)],
    "document": [c.Media(media="document", url="https://example.com/a.pdf", mime="application/pdf", size=1000,
                         filename="a.pdf")],
    "location": [c.Location(lat=52.52, lon=13.40, name="Office")],
    "contact": [c.Contact(name="Ann Lee", phones=["+4930123456"])],
    "buttons": [c.Buttons(text="Continue?", buttons=_BUTTONS)],
    "list": [c.List(text="Pick one", button="Options",
                    sections=[c.ListSection(title="All", rows=[c.ListRow(id="r1", title="First")])])],
    "card": [c.Card(title="Shoes", subtitle="Red", media=_IMAGE, buttons=_BUTTONS)],
    "carousel": [c.Carousel(cards=[c.Card(title="One", media=_IMAGE), c.Card(title="Two", media=_IMAGE)])],
    "template": [c.Template(name="order_update", language="en", params={"1": "42"},
                            fallback_text="Order {{1}} shipped")],
    "poll": [c.Poll(question="Lunch?", options=["Pizza", "Salad"])],
    "reaction": [c.Reaction(emoji="👍", target="m1")],
    "edit": [c.Edit(target="m1"), c.Text(text="Hello again")],
    "delete": [c.Delete(target="m1")],
}


def support(channel: str, sample: str) -> Support:
    codec = load(channel)
    parts = SAMPLES[sample]
    message = c.Message(id="m2", tenant="t", conversation=c.Conversation(id="c"), ts=c.now(),
                        direction="outbound", parts=parts)
    shown = degrade(message, codec.capabilities).parts
    if _plain(shown) == _plain(parts):
        return "native"
    marker = parts[0]
    if isinstance(marker, (c.Reaction, c.Edit, c.Delete)) and marker not in shown:
        return "impossible"
    return "degraded" if shown else "impossible"


def _plain(parts: list[c.Part]) -> list[c.Part]:
    """Parts with text formats forgotten: plain text rendered in a channel's dialect is still native."""
    return [c.Text(text=part.text) if isinstance(part, c.Text) else part for part in parts]


_SYMBOL: dict[Support, str] = {"native": "✅", "degraded": "↘", "impossible": "—"}


def markdown_table() -> str:
    """What `babelhub channels` prints: the README's two channel tables, capabilities then settings."""
    return capabilities_table() + "\n\n" + settings_table()


def capabilities_table() -> str:
    """The channel by part-type table for the README: ✅ native, ↘ degraded, — not possible; then the
    calls per second each connection is paced to by default (— where the docs give no rate)."""
    channels = available()
    lines = ["| channel | " + " | ".join(SAMPLES) + " | calls/s |", "|---" * (len(SAMPLES) + 2) + "|"]
    for channel in channels:
        cells = [_SYMBOL[support(channel, sample)] for sample in SAMPLES]
        rate = load(channel).send_rate
        cells.append(f"{rate:g}" if rate else "—")
        lines.append(f"| {channel} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def settings_table() -> str:
    """The settings table for the README: one row per secret and option of each channel, required ones
    plain, optional ones in parentheses with their default where it is a plain value; the options of
    every connection (`ConnectionOptions`) come first, once."""
    lines = ["| channel | setting | meaning |", "|---|---|---|"]
    lines += _setting_lines("every channel", settings_rows(ConnectionOptions, "options"))
    for channel in available():
        codec = load(channel)
        rows = settings_rows(codec.secret_settings, "secrets") + settings_rows(codec.option_settings, "options",
                                                                                 inherited=False)
        lines += _setting_lines(channel, rows)
    return "\n".join(lines)


def _setting_lines(channel: str, rows: list[SettingRow]) -> list[str]:
    lines = []
    for index, row in enumerate(rows):
        name = f"`{row.path}`" if row.required else f"(`{row.path}`)"
        meaning = row.meaning.replace("|", "\\|")
        if isinstance(row.default, (bool, int, float)) or (isinstance(row.default, str) and row.default):
            meaning += f" Default `{msgspec.json.encode(row.default).decode()}`."
        lines.append(f"| {channel if index == 0 else ''} | {name} | {meaning} |")
    return lines
