"""Text markup conversion: what applications write (plain, markdown, html) into what a channel renders.

`convert(text, source, target)` reads the source into a small document model — blocks (paragraphs,
headings, quotes, lists, code blocks, rules) holding spans (text, bold, italic, strike, code, links,
line breaks) — and renders that model in the target dialect:

* `plain`               no markup; links as "text (url)".
* `markdown`            CommonMark (+ ~~strike~~); plain text is backslash-escaped.
* `html`                HTML elements; plain text is entity-escaped, newlines become <br>.
* `slack`               mrkdwn: *bold* _italic_ ~strike~ `code` ```pre``` <url|text>; & < > escaped.
* `whatsapp`            *bold* _italic_ ~strike~ `code` ```pre```; links as "text (url)".
* `telegram_html`       Bot API HTML: <b> <i> <s> <code> <pre> <a href> <blockquote>; & < > escaped.
* `telegram_markdownv2` Bot API MarkdownV2, with its escaping of _*[]()~`>#+-=|{}.! and backslash.

Markdown is parsed with markdown-it-py (CommonMark + strikethrough, raw HTML shown as text); HTML with
the standard library's `html.parser`. Text converted from `plain` always shows literally: whatever the
target dialect would interpret is escaped.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Final, Literal, TypeAlias

from markdown_it import MarkdownIt
from markdown_it.tree import SyntaxTreeNode

from babelhub import canonical as c

__all__ = ["READABLE", "convert"]

#: The formats `convert` can read. The channel dialects only appear as targets.
READABLE: Final[frozenset[c.TextFormat]] = frozenset({"plain", "markdown", "html"})


def convert(text: str, source: c.TextFormat, target: c.TextFormat) -> str:
    """`text` written in `source` (plain, markdown or html) as the `target` dialect renders it."""
    if source == target:
        return text
    if source not in READABLE:
        raise ValueError(f"cannot read {source!r} text; readable formats are plain, markdown and html")
    return _DIALECTS[target].document(_read(text, source))


# ------------------------------------------------------------------------------------ document model

SpanKind: TypeAlias = Literal["text", "bold", "italic", "strike", "code", "link", "break"]
BlockKind: TypeAlias = Literal["inline", "paragraph", "heading", "quote", "bullets", "numbers", "code", "rule"]


@dataclass(frozen=True)
class Span:
    """Inline content. `text` holds the characters of text and code spans; `href` the target of a link."""

    kind: SpanKind
    text: str = ""
    children: tuple[Span, ...] = ()
    href: str = ""


@dataclass(frozen=True)
class Block:
    """Block content. An `inline` block is loose inline content outside any paragraph (plain text, or
    text at the top of an HTML fragment): it is rendered without paragraph markup."""

    kind: BlockKind
    spans: tuple[Span, ...] = ()
    children: tuple[Block, ...] = ()
    """A quote's content."""
    items: tuple[tuple[Block, ...], ...] = ()
    """A list's items, each a sequence of blocks."""
    text: str = ""
    """A code block's content."""
    language: str = ""
    level: int = 1
    """A heading's level."""
    start: int = 1
    """The number of a numbered list's first item."""


Document: TypeAlias = tuple[Block, ...]


def _read(text: str, source: c.TextFormat) -> Document:
    if source == "markdown":
        return _read_markdown(text)
    if source == "html":
        return _read_html(text)
    return (Block("inline", spans=(Span("text", text),)),)


# ------------------------------------------------------------------------------------ markdown reader

# CommonMark as the spec defines it, plus GFM strikethrough. Raw HTML is off so that "<b>" written in
# markdown shows as those characters, like everything else the author typed.
_MARKDOWN: Final = MarkdownIt("commonmark", {"html": False}).enable("strikethrough")


def _read_markdown(text: str) -> Document:
    return _markdown_blocks(SyntaxTreeNode(_MARKDOWN.parse(text)).children)


def _markdown_blocks(nodes: list[SyntaxTreeNode]) -> Document:
    return tuple(_markdown_block(node) for node in nodes)


def _markdown_block(node: SyntaxTreeNode) -> Block:
    match node.type:
        case "paragraph":
            return Block("paragraph", spans=_markdown_inline(node))
        case "heading":
            return Block("heading", spans=_markdown_inline(node), level=int(node.tag[1:]))
        case "blockquote":
            return Block("quote", children=_markdown_blocks(node.children))
        case "bullet_list":
            return Block("bullets", items=tuple(_markdown_blocks(item.children) for item in node.children))
        case "ordered_list":
            start = node.attrs.get("start", 1)
            return Block(
                "numbers",
                items=tuple(_markdown_blocks(item.children) for item in node.children),
                start=start if isinstance(start, int) else 1,
            )
        case "fence" | "code_block":
            language = node.info.split()[0] if node.info.strip() else ""
            return Block("code", text=node.content.removesuffix("\n"), language=language)
        case "hr":
            return Block("rule")
        case _:  # anything else markdown-it may grow is kept as its source text
            return Block("paragraph", spans=(Span("text", node.content),))


def _markdown_inline(block: SyntaxTreeNode) -> tuple[Span, ...]:
    """The spans of a paragraph or heading, whose only child is the `inline` node."""
    return tuple(span for inline in block.children for span in _markdown_spans(inline.children))


def _markdown_spans(nodes: list[SyntaxTreeNode]) -> tuple[Span, ...]:
    return tuple(_markdown_span(node) for node in nodes)


def _markdown_span(node: SyntaxTreeNode) -> Span:
    match node.type:
        case "strong":
            return Span("bold", children=_markdown_spans(node.children))
        case "em":
            return Span("italic", children=_markdown_spans(node.children))
        case "s":
            return Span("strike", children=_markdown_spans(node.children))
        case "code_inline":
            return Span("code", text=node.content)
        case "link":
            return Span("link", href=str(node.attrs.get("href", "")), children=_markdown_spans(node.children))
        case "image":  # chat text cannot embed an image: link to it, labelled with its description
            return Span("link", href=str(node.attrs.get("src", "")), children=_markdown_spans(node.children))
        case "softbreak" | "hardbreak":
            return Span("break")
        case _:  # text, text_special, and anything unknown: its characters
            return Span("text", node.content)


# ---------------------------------------------------------------------------------------- html reader

_BLOCK_TAGS: Final = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "blockquote", "pre", "hr"})
#: Elements that only group blocks: their content is read block by block, as if they were not there.
_CONTAINER_TAGS: Final = frozenset(
    {"div", "section", "article", "header", "footer", "main", "li", "table", "tbody", "thead", "tr", "td", "th"}
)
_VOID_TAGS: Final = frozenset({"br", "hr", "img", "wbr", "input", "meta", "link", "source", "col", "area"})
_SPAN_KINDS: Final[dict[str, SpanKind]] = {
    "b": "bold",
    "strong": "bold",
    "i": "italic",
    "em": "italic",
    "s": "strike",
    "strike": "strike",
    "del": "strike",
}


@dataclass
class _Element:
    """An HTML element as parsed: its tag, attributes and children (elements or text)."""

    tag: str
    attrs: dict[str, str]
    children: list[_Element | str]

    def text(self) -> str:
        return "".join(child if isinstance(child, str) else child.text() for child in self.children)


class _HtmlTreeBuilder(HTMLParser):
    """Builds an element tree, forgiving like a browser: unclosed elements end with their parent,
    stray end tags are ignored."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = _Element("", {}, [])
        self._open = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = _Element(tag, {name: value or "" for name, value in attrs}, [])
        self._open[-1].children.append(element)
        if tag not in _VOID_TAGS:
            self._open.append(element)

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self._open) - 1, 0, -1):
            if self._open[depth].tag == tag:
                del self._open[depth:]
                return

    def handle_data(self, data: str) -> None:
        self._open[-1].children.append(data)


def _read_html(text: str) -> Document:
    builder = _HtmlTreeBuilder()
    builder.feed(text)
    builder.close()
    return _html_blocks(builder.root.children)


def _html_blocks(children: list[_Element | str]) -> Document:
    """Block elements become blocks; runs of inline content between them become `inline` blocks."""
    blocks: list[Block] = []
    run: list[_Element | str] = []

    def end_run() -> None:
        spans = _html_spans(run)
        if "".join(_span_text(span) for span in spans).strip():
            blocks.append(Block("inline", spans=spans))
        run.clear()

    for child in children:
        if isinstance(child, _Element) and child.tag in _CONTAINER_TAGS:
            end_run()
            blocks.extend(_html_blocks(child.children))
        elif isinstance(child, _Element) and child.tag in _BLOCK_TAGS:
            end_run()
            blocks.append(_html_block(child))
        else:
            run.append(child)
    end_run()
    return tuple(blocks)


def _html_block(element: _Element) -> Block:
    tag = element.tag
    if tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
        return Block("heading", spans=_html_spans(element.children), level=int(tag[1]))
    if tag == "blockquote":
        return Block("quote", children=_html_blocks(element.children))
    if tag in ("ul", "ol"):
        items = tuple(
            _html_blocks(child.children if child.tag == "li" else [child])
            for child in element.children
            if isinstance(child, _Element)
        )
        if tag == "ul":
            return Block("bullets", items=items)
        start = element.attrs.get("start", "1")
        return Block("numbers", items=items, start=int(start) if start.isdigit() else 1)
    if tag == "pre":
        return Block("code", text=element.text(), language=_code_language(element))
    if tag == "hr":
        return Block("rule")
    return Block("paragraph", spans=_html_spans(element.children))


def _code_language(pre: _Element) -> str:
    """`<pre><code class="language-python">` names the language the way Telegram and highlight.js do."""
    for child in pre.children:
        if isinstance(child, _Element) and child.tag == "code":
            for name in child.attrs.get("class", "").split():
                if name.startswith("language-"):
                    return name.removeprefix("language-")
    return ""


def _html_spans(children: list[_Element | str]) -> tuple[Span, ...]:
    spans: list[Span] = []
    for child in children:
        if isinstance(child, str):
            spans.append(Span("text", child))
        elif child.tag == "br":
            spans.append(Span("break"))
        elif child.tag in _SPAN_KINDS:
            spans.append(Span(_SPAN_KINDS[child.tag], children=_html_spans(child.children)))
        elif child.tag == "code":
            spans.append(Span("code", text=child.text()))
        elif child.tag == "a":
            spans.append(Span("link", href=child.attrs.get("href", ""), children=_html_spans(child.children)))
        elif child.tag == "img":
            label = child.attrs.get("alt", "")
            spans.append(Span("link", href=child.attrs.get("src", ""), children=(Span("text", label),)))
        else:  # u, span, font, …: no meaning a chat dialect shares, keep the content
            spans.extend(_html_spans(child.children))
    return tuple(spans)


def _span_text(span: Span) -> str:
    """The characters a span shows, without any markup."""
    if span.kind in ("text", "code"):
        return span.text
    if span.kind == "break":
        return "\n"
    return "".join(_span_text(child) for child in span.children)


# ------------------------------------------------------------------------------------------ renderers


class _Dialect:
    """Renders a document as one dialect. This base renders chat-style text (line breaks are newlines,
    lists are marker lines, quotes are "> " lines); each dialect overrides what it writes differently."""

    block_separator = "\n\n"
    line_break = "\n"
    bullet = "•"
    quote_prefix = "> "

    # -- what each dialect defines

    def escape(self, text: str) -> str:
        """Text that must show literally, with whatever the dialect would interpret neutralised."""
        return text

    def bold(self, inner: str) -> str:
        return inner

    def italic(self, inner: str) -> str:
        return inner

    def strike(self, inner: str) -> str:
        return inner

    def code(self, raw: str) -> str:
        return raw

    def pre(self, raw: str, language: str) -> str:
        return raw

    def link(self, label: str, href: str) -> str:
        """`label` is already rendered; the default shows the address after it, like "text (url)"."""
        return f"{label} ({self.escape(href)})"

    def heading(self, inner: str, level: int) -> str:
        return self.bold(inner)

    def paragraph(self, inner: str) -> str:
        return inner

    def quote(self, inner: str) -> str:
        return "\n".join(self.quote_prefix + line for line in inner.split("\n"))

    def rule(self) -> str:
        return self.escape("---")

    def number(self, n: int) -> str:
        return self.escape(f"{n}.")

    # -- shared structure

    def document(self, blocks: Document) -> str:
        return self.blocks(blocks, self.block_separator)

    def blocks(self, blocks: Document, separator: str) -> str:
        return separator.join(rendered for rendered in map(self.block, blocks) if rendered)

    def block(self, block: Block) -> str:
        match block.kind:
            case "inline":
                return self.spans(block.spans)
            case "paragraph":
                return self.paragraph(self.spans(block.spans))
            case "heading":
                return self.heading(self.spans(block.spans), block.level)
            case "quote":
                return self.quote(self.blocks(block.children, self.block_separator))
            case "bullets":
                return self.list_items(block.items, [self.bullet] * len(block.items))
            case "numbers":
                return self.list_items(block.items, [self.number(block.start + n) for n in range(len(block.items))])
            case "code":
                return self.pre(block.text, block.language)
            case "rule":
                return self.rule()

    def list_items(self, items: tuple[Document, ...], markers: list[str]) -> str:
        """One line per item, its marker first; an item's further lines are indented under it."""
        lines: list[str] = []
        for marker, item in zip(markers, items, strict=True):
            first, *rest = self.blocks(item, "\n").split("\n")
            lines.append(f"{marker} {first}".rstrip())
            lines.extend("  " + line for line in rest)
        return "\n".join(lines)

    def spans(self, spans: tuple[Span, ...]) -> str:
        return "".join(self.span(span) for span in spans)

    def span(self, span: Span) -> str:
        match span.kind:
            case "text":
                return self.escape(span.text)
            case "code":
                return self.code(span.text)
            case "break":
                return self.line_break
            case "link":
                return self._link(span)
            case _:
                return self._style(span)

    def _style(self, span: Span) -> str:
        # Bold inside bold (or italic inside italic) adds nothing, and several dialects would read
        # the doubled markers as something else ("__" is underline in Telegram MarkdownV2).
        inner = self.spans(_flatten(span))
        if not inner:
            return ""
        if span.kind == "bold":
            return self.bold(inner)
        if span.kind == "italic":
            return self.italic(inner)
        return self.strike(inner)

    def _link(self, span: Span) -> str:
        label_text = "".join(_span_text(child) for child in span.children)
        if not span.href:
            return self.spans(span.children)
        if not label_text.strip():
            return self.escape(span.href)
        if _same_address(label_text, span.href):
            return self.bare_link(span.href)
        return self.link(self.spans(span.children), span.href)

    def bare_link(self, href: str) -> str:
        """A link whose text is its address (an autolink)."""
        return self.escape(href)


def _flatten(span: Span) -> tuple[Span, ...]:
    """The children of a styled span, with nested spans of the same style replaced by their content."""
    flat: list[Span] = []
    for child in span.children:
        flat.extend(_flatten(child) if child.kind == span.kind else (child,))
    return tuple(flat)


def _same_address(label: str, href: str) -> bool:
    return href in (label, f"mailto:{label}", f"tel:{label}")


def _fence(raw: str, minimum: int) -> str:
    """A run of backticks longer than any inside `raw` (CommonMark code spans and fences)."""
    longest = max((len(run) for run in re.findall(r"`+", raw)), default=0)
    return "`" * max(minimum, longest + 1)


class _Plain(_Dialect):
    bullet = "-"  # ASCII, so that an SMS stays in the GSM 7-bit alphabet

    def heading(self, inner: str, level: int) -> str:
        return inner


# CommonMark: any ASCII punctuation can be backslash-escaped. These are the ones that start markup
# anywhere in a line; the second set only at the start of a line (headings, lists, setext rules).
_MARKDOWN_INLINE = re.compile(r"[\\`*_\[\]<>~|&]")
_MARKDOWN_LINE_START = re.compile(r"^( {0,3})([#+\-=])", re.MULTILINE)
_MARKDOWN_ORDERED = re.compile(r"^( {0,3}\d+)([.)])", re.MULTILINE)


class _Markdown(_Dialect):
    bullet = "-"

    def escape(self, text: str) -> str:
        text = _MARKDOWN_INLINE.sub(r"\\\g<0>", text)
        text = _MARKDOWN_LINE_START.sub(r"\1\\\2", text)
        return _MARKDOWN_ORDERED.sub(r"\1\\\2", text)

    def bold(self, inner: str) -> str:
        return f"**{inner}**"

    def italic(self, inner: str) -> str:
        return f"*{inner}*"

    def strike(self, inner: str) -> str:
        return f"~~{inner}~~"

    def code(self, raw: str) -> str:
        fence = _fence(raw, 1)
        padding = " " if raw.startswith("`") or raw.endswith("`") else ""
        return f"{fence}{padding}{raw}{padding}{fence}"

    def pre(self, raw: str, language: str) -> str:
        fence = _fence(raw, 3)
        return f"{fence}{language}\n{raw}\n{fence}"

    def link(self, label: str, href: str) -> str:
        destination = re.sub(r"[\\()]", r"\\\g<0>", href).replace(" ", "%20").replace("<", "%3C").replace(">", "%3E")
        return f"[{label}]({destination})"

    def bare_link(self, href: str) -> str:
        if re.search(r"[\s<>]", href):
            return self.link(self.escape(href), href)
        return f"<{href}>"

    def heading(self, inner: str, level: int) -> str:
        return f"{'#' * level} {inner}"

    def rule(self) -> str:
        return "---"

    def number(self, n: int) -> str:
        return f"{n}."


class _Html(_Dialect):
    block_separator = "\n"
    line_break = "<br>"

    def escape(self, text: str) -> str:
        return html.escape(text, quote=False).replace("\n", "<br>")

    def bold(self, inner: str) -> str:
        return f"<strong>{inner}</strong>"

    def italic(self, inner: str) -> str:
        return f"<em>{inner}</em>"

    def strike(self, inner: str) -> str:
        return f"<s>{inner}</s>"

    def code(self, raw: str) -> str:
        return f"<code>{html.escape(raw, quote=False)}</code>"

    def pre(self, raw: str, language: str) -> str:
        attribute = f' class="language-{html.escape(language)}"' if language else ""
        return f"<pre><code{attribute}>{html.escape(raw, quote=False)}</code></pre>"

    def link(self, label: str, href: str) -> str:
        return f'<a href="{html.escape(href)}">{label}</a>'

    def bare_link(self, href: str) -> str:
        return self.link(self.escape(href), href)

    def heading(self, inner: str, level: int) -> str:
        return f"<h{level}>{inner}</h{level}>"

    def paragraph(self, inner: str) -> str:
        return f"<p>{inner}</p>"

    def quote(self, inner: str) -> str:
        return f"<blockquote>{inner}</blockquote>"

    def rule(self) -> str:
        return "<hr>"

    def block(self, block: Block) -> str:
        if block.kind in ("bullets", "numbers"):
            items = "".join(f"<li>{self._item(item)}</li>" for item in block.items)
            if block.kind == "bullets":
                return f"<ul>{items}</ul>"
            start = f' start="{block.start}"' if block.start != 1 else ""
            return f"<ol{start}>{items}</ol>"
        return super().block(block)

    def _item(self, item: Document) -> str:
        # A tight list item's paragraph is shown without <p>, as browsers and markdown-it do.
        return "\n".join(self.spans(block.spans) if block.kind == "paragraph" else self.block(block) for block in item)


# Slack and WhatsApp have no escape character. Their markers only open a style at the start of a word
# and before a non-space, so a zero-width space put before such a marker keeps it literal.
_OPENING_MARKER = re.compile(r"(?<![^\W_])[*_~`](?=\S)")
_ZERO_WIDTH_SPACE = "\u200b"


def _keep_markers_literal(text: str) -> str:
    return _OPENING_MARKER.sub(_ZERO_WIDTH_SPACE + r"\g<0>", text)


def _slack_entities(text: str) -> str:
    """Slack's control characters, the only ones its mrkdwn escapes."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class _WhatsApp(_Dialect):
    def escape(self, text: str) -> str:
        return _keep_markers_literal(text)

    def bold(self, inner: str) -> str:
        return f"*{inner}*"

    def italic(self, inner: str) -> str:
        return f"_{inner}_"

    def strike(self, inner: str) -> str:
        return f"~{inner}~"

    def code(self, raw: str) -> str:
        return f"`{raw}`"

    def pre(self, raw: str, language: str) -> str:
        return f"```{raw}```"

    def link(self, label: str, href: str) -> str:
        return f"{label} ({href})"

    def bare_link(self, href: str) -> str:
        return href


class _Slack(_WhatsApp):
    """Slack mrkdwn: WhatsApp's emphasis markers, plus `&<>` as entities and `<url|label>` links."""

    def escape(self, text: str) -> str:
        return _keep_markers_literal(_slack_entities(text))

    def code(self, raw: str) -> str:
        return f"`{_slack_entities(raw)}`"

    def pre(self, raw: str, language: str) -> str:
        return f"```{_slack_entities(raw)}```"

    def link(self, label: str, href: str) -> str:
        return f"<{_slack_entities(href)}|{label}>"

    def bare_link(self, href: str) -> str:
        return f"<{_slack_entities(href)}>"


class _TelegramHtml(_Dialect):
    """Bot API "HTML style": only its tags; <, > and & outside them as entities; newlines are kept."""

    def escape(self, text: str) -> str:
        return html.escape(text, quote=False)

    def bold(self, inner: str) -> str:
        return f"<b>{inner}</b>"

    def italic(self, inner: str) -> str:
        return f"<i>{inner}</i>"

    def strike(self, inner: str) -> str:
        return f"<s>{inner}</s>"

    def code(self, raw: str) -> str:
        return f"<code>{html.escape(raw, quote=False)}</code>"

    def pre(self, raw: str, language: str) -> str:
        if language:
            return f'<pre><code class="language-{html.escape(language)}">{html.escape(raw, quote=False)}</code></pre>'
        return f"<pre>{html.escape(raw, quote=False)}</pre>"

    def link(self, label: str, href: str) -> str:
        return f'<a href="{html.escape(href)}">{label}</a>'

    def block(self, block: Block) -> str:
        if block.kind == "quote":  # Telegram does not nest block quotations
            return f"<blockquote>{self.blocks(_without_quotes(block.children), self.block_separator)}</blockquote>"
        return super().block(block)


# Bot API "MarkdownV2 style": outside entities these characters must be escaped with a backslash, as
# must the backslash itself; inside code only ` and \; inside a link's (...) only ) and \.
_MARKDOWNV2_SPECIAL = re.compile(r"[\\_*\[\]()~`>#+\-=|{}.!]")
_MARKDOWNV2_CODE = re.compile(r"[\\`]")
_MARKDOWNV2_URL = re.compile(r"[\\)]")


def _backslash(characters: re.Pattern[str], text: str) -> str:
    """`text` with a backslash before each of `characters`."""
    return characters.sub(r"\\\g<0>", text)


class _TelegramMarkdownV2(_Dialect):
    quote_prefix = ">"

    def escape(self, text: str) -> str:
        return _backslash(_MARKDOWNV2_SPECIAL, text)

    def bold(self, inner: str) -> str:
        return f"*{inner}*"

    def italic(self, inner: str) -> str:
        return f"_{inner}_"

    def strike(self, inner: str) -> str:
        return f"~{inner}~"

    def code(self, raw: str) -> str:
        return f"`{_backslash(_MARKDOWNV2_CODE, raw)}`"

    def pre(self, raw: str, language: str) -> str:
        return f"```{language}\n{_backslash(_MARKDOWNV2_CODE, raw)}\n```"

    def link(self, label: str, href: str) -> str:
        return f"[{label}]({_backslash(_MARKDOWNV2_URL, href)})"

    def spans(self, spans: tuple[Span, ...]) -> str:
        # "__" always means underline, so two italic spans in a row are kept apart by an empty bold
        # entity — the separator the Bot API documentation itself recommends.
        rendered: list[str] = []
        for previous, span in zip((None, *spans), spans, strict=False):
            if previous is not None and previous.kind == span.kind == "italic":
                rendered.append("**")
            rendered.append(self.span(span))
        return "".join(rendered)

    def block(self, block: Block) -> str:
        if block.kind == "quote":  # Telegram does not nest block quotations
            return self.quote(self.blocks(_without_quotes(block.children), self.block_separator))
        return super().block(block)


def _without_quotes(blocks: Document) -> Document:
    """Blocks with nested quotes replaced by their content."""
    flat: list[Block] = []
    for block in blocks:
        flat.extend(_without_quotes(block.children) if block.kind == "quote" else (block,))
    return tuple(flat)


_DIALECTS: Final[dict[c.TextFormat, _Dialect]] = {
    "plain": _Plain(),
    "markdown": _Markdown(),
    "html": _Html(),
    "slack": _Slack(),
    "whatsapp": _WhatsApp(),
    "telegram_html": _TelegramHtml(),
    "telegram_markdownv2": _TelegramMarkdownV2(),
}
