"""Markup conversion: exact output per dialect, escaping edge cases, and round trips."""

from __future__ import annotations

import html
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from babelhub.codecs.markup import convert

ZWSP = "\u200b"
MARKDOWNV2_RESERVED = "_*[]()~`>#+-=|{}.!\\"

# ------------------------------------------------------------------------------- markdown → dialects


def test_markdown_to_slack_styles_links_and_control_characters() -> None:
    source = "**Hi** _there_ ~~old~~ `x<y` [site](https://e.com/?a=1&b=2) & <tag>"
    assert convert(source, "markdown", "slack") == (
        "*Hi* _there_ ~old~ `x&lt;y` <https://e.com/?a=1&amp;b=2|site> &amp; &lt;tag&gt;"
    )


def test_markdown_to_slack_autolink_and_code_block() -> None:
    assert convert("<https://a.b>\n\n```\nif a < b\n```", "markdown", "slack") == "<https://a.b>\n\n```if a &lt; b```"


def test_markdown_to_whatsapp() -> None:
    source = "**Hi** *there* ~~old~~ `code` [site](https://e.com)\n\n```\nblock\n```"
    assert convert(source, "markdown", "whatsapp") == "*Hi* _there_ ~old~ `code` site (https://e.com)\n\n```block```"


def test_markdown_to_telegram_html() -> None:
    source = "**a** *b* ~~c~~ `d<e` [f](https://x.y/?a=1&b=2) 1 < 2 & 3 > 2\n\n```python\nif a < b:\n```"
    assert convert(source, "markdown", "telegram_html") == (
        '<b>a</b> <i>b</i> <s>c</s> <code>d&lt;e</code> <a href="https://x.y/?a=1&amp;b=2">f</a>'
        " 1 &lt; 2 &amp; 3 &gt; 2\n\n"
        '<pre><code class="language-python">if a &lt; b:</code></pre>'
    )


def test_markdown_to_telegram_markdownv2_escapes_text_code_and_link_urls() -> None:
    source = "**Total:** 10.50 (incl. tax) - see [terms](https://x.y/t_(1)) or ``a`b\\``"
    assert convert(source, "markdown", "telegram_markdownv2") == (
        r"*Total:* 10\.50 \(incl\. tax\) \- see [terms](https://x.y/t_(1\)) or `a\`b\\`"
    )


def test_markdown_to_telegram_markdownv2_code_block_with_language() -> None:
    assert convert("```py\nprint('a_b')  # \\ `x`\n```", "markdown", "telegram_markdownv2") == (
        "```py\nprint('a_b')  # \\\\ \\`x\\`\n```"
    )


def test_telegram_markdownv2_keeps_two_italics_apart_from_underline() -> None:
    # "_a__b_" would read as underline; the Bot API's own remedy is an empty bold entity between.
    assert convert("*a*_b_", "markdown", "telegram_markdownv2") == "_a_**_b_"


def test_telegram_does_not_nest_block_quotes() -> None:
    source = "> a\n>\n> > b"
    assert convert(source, "markdown", "telegram_markdownv2") == ">a\n>\n>b"
    assert convert(source, "markdown", "telegram_html") == "<blockquote>a\n\nb</blockquote>"


def test_markdown_to_plain_renders_structure_as_text() -> None:
    source = (
        "# Title\n\nSee [docs](https://d.io) and <https://a.b>.\n\n- one\n- two\n  - nested\n\n"
        "3. third\n4. fourth\n\n> quoted\n\n---\n\n**bold** `code`"
    )
    assert convert(source, "markdown", "plain") == (
        "Title\n\nSee docs (https://d.io) and https://a.b.\n\n- one\n- two\n  - nested\n\n"
        "3. third\n4. fourth\n\n> quoted\n\n---\n\nbold code"
    )


def test_markdown_lists_in_chat_dialects_use_bullets_and_escaped_numbers() -> None:
    source = "- a\n- b\n\n1. c"
    assert convert(source, "markdown", "whatsapp") == "• a\n• b\n\n1. c"
    assert convert(source, "markdown", "telegram_markdownv2") == "• a\n• b\n\n1\\. c"


def test_markdown_to_html() -> None:
    source = "# T\n\na\nb **c** [d](https://e.f)\n\n- x\n- y\n\n> q"
    assert convert(source, "markdown", "html") == (
        "<h1>T</h1>\n"
        '<p>a<br>b <strong>c</strong> <a href="https://e.f">d</a></p>\n'
        "<ul><li>x</li><li>y</li></ul>\n"
        "<blockquote><p>q</p></blockquote>"
    )


def test_raw_html_in_markdown_is_shown_as_text() -> None:
    assert convert("<b>hi</b>", "markdown", "telegram_html") == "&lt;b&gt;hi&lt;/b&gt;"


def test_markdown_image_becomes_a_link() -> None:
    assert convert("![a cat](https://c.at/1.png)", "markdown", "slack") == "<https://c.at/1.png|a cat>"


# ----------------------------------------------------------------------------------- html → dialects


def test_html_to_telegram_markdownv2() -> None:
    source = '<p>Hello <b>bold</b> &amp; <a href="https://x.y">link</a></p><ul><li>a.</li></ul>'
    assert convert(source, "html", "telegram_markdownv2") == "Hello *bold* & [link](https://x.y)\n\n• a\\."


def test_html_to_whatsapp() -> None:
    source = "<strong>a</strong><br><em>b</em> <del>c</del> <u>d</u><pre>x</pre>"
    assert convert(source, "html", "whatsapp") == "*a*\n_b_ ~c~ d\n\n```x```"


def test_html_to_markdown_escapes_text() -> None:
    source = '<div><p>1. <i>x</i> * y</p><ol start="3"><li>z</li></ol></div>'
    assert convert(source, "html", "markdown") == "1\\. *x* \\* y\n\n3. z"


def test_html_to_plain_with_entities_and_stray_tags() -> None:
    assert convert('a &lt;b&gt; &amp; <span>c</span></i> <img src="https://p/i.png" alt="pic">', "html", "plain") == (
        "a <b> & c pic (https://p/i.png)"
    )


def test_html_pre_with_language_to_telegram_html() -> None:
    source = '<pre><code class="language-go">x := 1 < 2</code></pre>'
    assert convert(source, "html", "telegram_html") == '<pre><code class="language-go">x := 1 &lt; 2</code></pre>'


# ---------------------------------------------------------------------------- plain → every dialect


def test_plain_to_telegram_markdownv2_escapes_every_special_character() -> None:
    assert convert("_*[]()~`>#+-=|{}.!\\", "plain", "telegram_markdownv2") == (
        r"\_\*\[\]\(\)\~\`\>\#\+\-\=\|\{\}\.\!\\"
    )


def test_plain_to_telegram_html_escapes_only_what_telegram_reads() -> None:
    assert convert('<b>x</b> & "y"', "plain", "telegram_html") == '&lt;b&gt;x&lt;/b&gt; &amp; "y"'


def test_plain_to_slack_escapes_control_characters_and_markers() -> None:
    assert convert("a < b && c > d", "plain", "slack") == "a &lt; b &amp;&amp; c &gt; d"
    assert convert("*not bold* 2*3", "plain", "slack") == f"{ZWSP}*not bold* 2*3"


def test_plain_to_whatsapp_keeps_markers_literal() -> None:
    assert convert("snake_case and _this_ 2*3 ~x~", "plain", "whatsapp") == (
        f"snake_case and {ZWSP}_this_ 2*3 {ZWSP}~x~"
    )


def test_plain_to_markdown_escapes_inline_and_line_start_markup() -> None:
    assert convert("# not a heading\n1. not a list\n- nor this\n*x* [y](z) a_b", "plain", "markdown") == (
        "\\# not a heading\n1\\. not a list\n\\- nor this\n\\*x\\* \\[y\\](z) a\\_b"
    )


def test_plain_to_html_keeps_line_breaks() -> None:
    assert convert("a<b\nc", "plain", "html") == "a&lt;b<br>c"


def test_same_format_is_unchanged_and_dialects_cannot_be_read() -> None:
    assert convert("*x*", "slack", "slack") == "*x*"
    assert convert("**x**", "markdown", "markdown") == "**x**"
    with pytest.raises(ValueError, match="cannot read 'slack'"):
        convert("*x*", "slack", "plain")


# ------------------------------------------------------------------------------------------ properties

any_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=200)
# Lines without leading/trailing blanks: markdown trims those, which is not a loss of meaning.
lines = (
    st.text(
        st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp", "Zs")) | st.just(" "),
        min_size=1,
        max_size=40,
    )
    .map(str.strip)
    .filter(bool)
)
line_text = st.lists(lines, min_size=1, max_size=5).map("\n".join)


@given(any_text)
def test_plain_to_markdownv2_leaves_no_reserved_character_unescaped(text: str) -> None:
    converted = convert(text, "plain", "telegram_markdownv2")
    assert not any(ch in MARKDOWNV2_RESERVED for ch in re.sub(r"\\.", "", converted, flags=re.DOTALL))
    assert re.sub(r"\\(.)", r"\1", converted, flags=re.DOTALL) == text


@given(any_text)
def test_plain_to_telegram_html_shows_the_text_literally(text: str) -> None:
    converted = convert(text, "plain", "telegram_html")
    assert "<" not in converted and ">" not in converted
    assert html.unescape(converted) == text


@given(any_text)
def test_plain_to_slack_shows_the_text_literally(text: str) -> None:
    converted = convert(text, "plain", "slack")
    assert "<" not in converted and ">" not in converted
    unescaped = converted.replace(ZWSP, "").replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    assert unescaped == text.replace(ZWSP, "")


@given(line_text)
def test_plain_survives_a_round_trip_through_markdown(text: str) -> None:
    assert convert(convert(text, "plain", "markdown"), "markdown", "plain") == text


@given(st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")) | st.just("\n"), max_size=100))
def test_plain_survives_a_round_trip_through_html(text: str) -> None:
    assert convert(convert(text, "plain", "html"), "html", "plain") == (text if text.strip() else "")
