"""Hypothesis strategies for canonical envelopes, shared by the property tests."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, get_args

from hypothesis import strategies as st

from babelhub import canonical as c

ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz234567", min_size=1, max_size=24)
words = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
short = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=30)
urls = st.builds(lambda path: f"https://example.com/{path}", ids)

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | words,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(words, inner, max_size=3),
    max_leaves=8,
)

buttons = st.builds(c.Button, id=ids, title=short, action=st.sampled_from(get_args(c.ButtonAction)), value=words)
media = st.builds(
    c.Media,
    media=st.sampled_from(get_args(c.MediaKind)),
    url=urls,
    file_id=st.just("") | ids,
    data=st.binary(max_size=16),
    mime=st.sampled_from(["", "image/jpeg", "audio/ogg", "application/pdf"]),
    size=st.integers(0, 10**9),
    caption=words,
    duration_ms=st.integers(0, 10**7),
)
cards = st.builds(c.Card, title=short, subtitle=words, media=st.none() | media, buttons=st.lists(buttons, max_size=4))

parts: st.SearchStrategy[c.Part] = st.one_of(
    st.builds(c.Text, text=st.text(max_size=300), format=st.sampled_from(["plain", "markdown", "html"])),
    media,
    st.builds(c.Location, lat=st.floats(-90, 90), lon=st.floats(-180, 180), name=words, address=words),
    st.builds(c.Contact, name=short, phones=st.lists(st.from_regex(r"\+[1-9][0-9]{6,12}", fullmatch=True), max_size=2),
              emails=st.lists(st.emails(), max_size=2), org=words),
    st.builds(c.Buttons, text=words, buttons=st.lists(buttons, min_size=1, max_size=6)),
    st.builds(
        c.List, text=words, button=short, header=words, footer=words,
        sections=st.lists(st.builds(c.ListSection, title=words,
                                    rows=st.lists(st.builds(c.ListRow, id=ids, title=short, description=words),
                                                  min_size=1, max_size=6)), min_size=1, max_size=3),
    ),
    cards,
    st.builds(c.Carousel, cards=st.lists(cards, min_size=1, max_size=5)),
    st.builds(c.Template, name=ids, language=st.just("en"),
              params=st.dictionaries(st.sampled_from(["1", "2", "name"]), short, max_size=3),
              fallback_text=st.just("Hello {{1}}, your order {{name}} is {{2}}.")),
    st.builds(c.Reaction, emoji=st.sampled_from(["👍", "❤️", "😂"]), target=ids, removed=st.booleans()),
    st.builds(c.Poll, question=short, options=st.lists(short, min_size=2, max_size=5), multiple=st.booleans()),
    st.builds(c.Form, id=ids, title=words, fields=st.lists(st.builds(c.FormField, id=ids, label=words,
                                                                      value=json_values), max_size=3)),
    st.builds(c.Product, catalog_id=ids, product_ids=st.lists(ids, max_size=3),
              items=st.lists(st.builds(c.ProductItem, product_id=ids, quantity=st.integers(1, 9)), max_size=2)),
    st.builds(c.Action, id=ids, title=words, source=ids),
    st.builds(c.Edit, target=ids),
    st.builds(c.Delete, target=ids),
    st.builds(c.Unsupported, reason=words, native=json_values),
)

timestamps = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC))
conversations = st.builds(c.Conversation, id=ids, channel=ids, connection=ids, native_id=words,
                          type=st.sampled_from(get_args(c.ConversationType)))
senders = st.builds(c.Sender, id=ids, native_id=words, name=words, role=st.sampled_from(get_args(c.Role)),
                    handle=words)
header = {
    "id": ids,
    "tenant": ids,
    "conversation": conversations,
    "ts": timestamps,
    "direction": st.sampled_from(["inbound", "outbound"]),
    "sender": st.none() | senders,
    "native": st.none() | st.builds(c.Native, id=words, seq=st.integers(0, 2**40)),
    "reply_to": st.just("") | ids,
    "meta": st.dictionaries(st.sampled_from(["telegram.raw", "babelhub.trace", "x.y"]), json_values, max_size=2),
}
messages = st.builds(c.Message, parts=st.lists(parts, max_size=6),
                     targets=st.lists(st.builds(c.Target, connection=ids, to=words), max_size=2), **header)
statuses = st.builds(
    c.Status, message_id=ids, native_id=words, state=st.sampled_from(get_args(c.State)),
    error=st.none() | st.builds(c.Error, code=ids, message=words, retryable=st.booleans(), native=json_values),
    **header,
)
activities = st.builds(c.Activity, activity=st.sampled_from(get_args(c.ActivityType)),
                       detail=st.dictionaries(words, json_values, max_size=2), **header)
envelopes: st.SearchStrategy[c.Envelope] = st.one_of(messages, statuses, activities)
