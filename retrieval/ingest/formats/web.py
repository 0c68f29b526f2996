"""HTML: the page's main content with its headings, without navigation, footers and banners.

Parsed by lxml (libxml2's HTML parser, forgiving of broken markup). Boilerplate is removed by
what the markup says it is: nav/header/footer/aside/form elements, ARIA landmarks other than
main, and elements whose class or id names navigation, menus, breadcrumbs, cookie or consent
banners, sidebars or footers. The content is `<main>` (or role=main, or the only `<article>`)
when the page marks one, else the body. trafilatura was measured first and not taken: on the
Debian HTML manuals it dropped the section headings (DocBook `<h2><a name>` titles, texinfo
`<h3>`), which citations need (docs/ingestion.md, "Documents").

Nothing is fetched: links, images, frames and `<base>` are ignored; scripts are dropped unread.
"""

import re
from pathlib import Path

from twostage.retrieval.ingest.formats import Extracted, Part, decode_text

_DROP = {"script", "style", "noscript", "template", "nav", "header", "footer", "aside", "form", "button",
         "iframe", "svg", "canvas", "select", "dialog", "head"}  # fmt: skip
_LANDMARKS = {"navigation", "banner", "contentinfo", "complementary", "search", "dialog", "alertdialog"}
_NOISE = re.compile(
    r"(^|\s)(nav[-_\w]*|[-_\w]*navbar|navigation|menu|[-_\w]*menu|breadcrumbs?|cookies?[-_\w]*|consent|gdpr|"
    r"banner|[-_\w]*sidebar|header|footer|site-header|site-footer|page-footer|masthead|skip-link|share|social|"
    r"related)(\s|$)",
    re.IGNORECASE,
)
_HEADINGS = {f"h{i}": i for i in range(1, 7)}
_BLOCKS = {
    "p", "div", "section", "article", "main", "li", "ul", "ol", "dl", "dt", "dd", "pre", "blockquote",
    "table", "tr", "figure", "figcaption", "address", "details", "summary", "hr", "br", "body",
}  # fmt: skip


def read_html(path: Path) -> Extracted:
    import lxml.html

    raw = path.read_bytes()
    text = decode_text(raw)
    root = lxml.html.document_fromstring(text.encode("utf-8"), parser=lxml.html.HTMLParser(encoding="utf-8"))
    title = " ".join((root.findtext(".//title") or "").split())
    _strip_boilerplate(root)
    main = _main(root)
    walker = _Walker()
    walker.walk(main)
    return Extracted(title, walker.finish())


def _strip_boilerplate(root: object) -> None:
    doomed = []
    for element in root.iter():  # type: ignore[attr-defined]
        if not isinstance(element.tag, str):  # comments, processing instructions
            doomed.append(element)
            continue
        tag = element.tag.lower()
        role = (element.get("role") or "").lower()
        names = f"{element.get('class') or ''} {element.get('id') or ''}"
        if (
            tag in _DROP
            or role in _LANDMARKS
            or (tag not in {"body", "main", "html"} and _NOISE.search(names))
        ):
            doomed.append(element)
    for element in doomed:
        if element.getparent() is not None:
            element.drop_tree()


def _main(root: object) -> object:
    for query in ("//main", "//*[@role='main']"):
        found = root.xpath(query)  # type: ignore[attr-defined]
        if found:
            return found[0]
    articles = root.xpath("//article")  # type: ignore[attr-defined]
    if len(articles) == 1:
        return articles[0]
    body = root.find("body")  # type: ignore[attr-defined]
    return body if body is not None else root


class _Walker:
    """Collects block texts in document order, starting a new part at each heading."""

    def __init__(self) -> None:
        self.parts: list[Part] = []
        self.path: tuple[str, ...] = ()
        self.levels: tuple[int, ...] = ()
        self.blocks: list[str] = []
        self.line: list[str] = []

    def walk(self, element: object) -> None:
        tag = element.tag.lower() if isinstance(element.tag, str) else ""  # type: ignore[attr-defined]
        if tag in _HEADINGS:
            self._heading(_HEADINGS[tag], " ".join(element.text_content().split()))  # type: ignore[attr-defined]
        elif tag == "pre":
            self._break()
            self.blocks.append(element.text_content().strip("\n"))  # type: ignore[attr-defined]
        else:
            block = tag in _BLOCKS or tag in {"td", "th"}
            if tag in _BLOCKS:
                self._break()
            if element.text:  # type: ignore[attr-defined]
                self.line.append(element.text)  # type: ignore[attr-defined]
            for child in element:  # type: ignore[attr-defined]
                self.walk(child)
                if child.tail:
                    self.line.append(child.tail)
            if tag in {"td", "th"}:
                self.line.append(" | ")
            elif block:
                self._break()

    def _heading(self, level: int, text: str) -> None:
        self._break()
        if not text:
            return
        self._flush()
        keep = [i for i, lvl in enumerate(self.levels) if lvl < level]
        self.path = (*(self.path[i] for i in keep), text)
        self.levels = (*(self.levels[i] for i in keep), level)
        self.blocks.append(text)

    def _break(self) -> None:
        line = " ".join("".join(self.line).split()).strip(" |")
        if line:
            self.blocks.append(line)
        self.line = []

    def _flush(self) -> None:
        if self.blocks:
            self.parts.append(Part("\n\n".join(self.blocks), self.path))
        self.blocks = []

    def finish(self) -> list[Part]:
        self._break()
        self._flush()
        return self.parts
