"""Markdown, reStructuredText and plain text: the file's own text, cut at its headings.

Markdown headings come from markdown-it-py's parse (ATX and setext; a `#` inside a code
block is not a heading). reStructuredText titles are the underlined (optionally overlined)
lines, levels in order of first appearance as docutils assigns them; docutils itself is not
run, because its directives (include, raw) would read files named by the document.
"""

import re
from pathlib import Path

from twostage.retrieval.ingest.formats import Extracted, Part, decode_text

_RST_ADORNMENT = re.compile(r"^([!-/:-@\[-`{-~])\1{2,}\s*$")  # a line of one repeated punctuation mark


def read_plain(path: Path) -> Extracted:
    return Extracted("", [Part(decode_text(path.read_bytes()))])


def read_markdown(path: Path) -> Extracted:
    from markdown_it import MarkdownIt

    text = decode_text(path.read_bytes())
    lines = text.splitlines(keepends=True)
    tokens = MarkdownIt("commonmark").parse(text)
    headings: list[tuple[int, int, str]] = []  # first line, level, title
    for i, token in enumerate(tokens):
        if token.type == "heading_open" and token.map:
            headings.append((token.map[0], int(token.tag[1]), " ".join(tokens[i + 1].content.split())))
    return Extracted(headings[0][2] if headings else "", _cut(lines, headings))


def read_rst(path: Path) -> Extracted:
    text = decode_text(path.read_bytes())
    lines = text.splitlines(keepends=True)
    styles: list[tuple[str, bool]] = []
    headings: list[tuple[int, int, str]] = []
    i = 0
    while i < len(lines) - 1:
        over = bool(_RST_ADORNMENT.match(lines[i])) and i + 2 < len(lines)
        title_at = i + 1 if over else i
        title = lines[title_at].strip()
        under = lines[title_at + 1] if title_at + 1 < len(lines) else ""
        match = _RST_ADORNMENT.match(under)
        if (
            title
            and not _RST_ADORNMENT.match(lines[title_at])
            and match
            and len(under.rstrip()) >= len(title)
        ):
            style = (match.group(1), over)
            if style not in styles:
                styles.append(style)
            headings.append((i, styles.index(style) + 1, title))
            i = title_at + 2
            continue
        i += 1
    return Extracted(headings[0][2] if headings else "", _cut(lines, headings))


def _cut(lines: list[str], headings: list[tuple[int, int, str]]) -> list[Part]:
    """The lines cut into parts at each heading's first line, each under its heading path."""
    parts: list[Part] = []
    path: tuple[str, ...] = ()
    levels: tuple[int, ...] = ()
    start = 0
    for first, level, title in headings:
        if first > start:
            parts.append(Part("".join(lines[start:first]), path))
        keep = [i for i, lvl in enumerate(levels) if lvl < level]
        path = (*(path[i] for i in keep), title)
        levels = (*(levels[i] for i in keep), level)
        start = first
    parts.append(Part("".join(lines[start:]), path))
    return [p for p in parts if p.text.strip()]
