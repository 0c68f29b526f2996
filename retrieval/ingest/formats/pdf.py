"""PDF: the text layer page by page (PDFium, through pypdfium2), headings from the outline.

PDFium was chosen by measurement (docs/ingestion.md, "Documents"): on five Debian manuals it extracted
the same text as pypdf (within 2% of characters) at 10-30x the pages per second. A PDF's
bookmarks name its sections and the page each starts on; where the title is also a line of
that page's text, the section starts at that line, else at the top of the page.
"""

from pathlib import Path

from twostage.retrieval.ingest.formats import Extracted, Part, Unreadable

OCR_HINT = (
    "no text layer (scanned pages?): OCR is not enabled; run it through OCR first "
    "(e.g. `ocrmypdf in.pdf out.pdf`) and ingest the result"
)


def read_pdf(path: Path) -> Extracted:
    import pypdfium2 as pdfium
    import pypdfium2.raw as raw

    try:
        pdf = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as exc:
        if "password" in str(exc).lower():
            raise Unreadable("encrypted", "encrypted PDF: it needs a password to open") from None
        raise Unreadable("unreadable", f"corrupt or unreadable pdf: {exc}") from None
    try:
        texts: list[str] = []
        images = 0
        for index in range(len(pdf)):
            page = pdf[index]
            text = page.get_textpage().get_text_bounded()
            texts.append(text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", ""))
            if not text.strip():
                images += sum(1 for _ in page.get_objects(filter=[raw.FPDF_PAGEOBJ_IMAGE], max_depth=1))
        if not any(t.strip() for t in texts):
            raise Unreadable("no-text-layer", OCR_HINT) if images else Unreadable("empty", "empty: no text")
        outline = [(b.level, b.get_title().strip(), _page_of(b)) for b in pdf.get_toc()]
        title = (pdf.get_metadata_value("Title") or "").strip()
    finally:
        pdf.close()
    return Extracted(
        title, _parts(texts, [(lvl, t, p) for lvl, t, p in outline if t and p is not None]), len(texts)
    )


def _page_of(bookmark: object) -> int | None:
    dest = bookmark.get_dest()  # type: ignore[attr-defined]
    return None if dest is None else int(dest.get_index())


def _parts(pages: list[str], outline: list[tuple[int, str, int]]) -> list[Part]:
    """Each page's text cut where outline entries start, under the heading path open there."""
    starts: dict[int, list[tuple[int, str]]] = {}
    for level, title, page in outline:
        starts.setdefault(page, []).append((level, title))
    parts: list[Part] = []
    path: tuple[str, ...] = ()
    for index, text in enumerate(pages):
        cut, lines = 0, text.split("\n")
        offsets = [0]
        for line in lines:
            offsets.append(offsets[-1] + len(line) + 1)
        line_no = 0
        for level, title in starts.get(index, []):
            found = next((i for i in range(line_no, len(lines)) if _is_title(lines[i], title)), None)
            at = offsets[found] if found is not None else cut
            if at > cut:
                parts.append(Part(text[cut:at], path, index + 1))
                cut = at
            line_no = found + 1 if found is not None else line_no
            path = (*path[: max(level, 0)], title)
        parts.append(Part(text[cut:], path, index + 1))
    return parts


def _is_title(line: str, title: str) -> bool:
    """A line that is the bookmark's title, possibly after its number ('2.2 Naming')."""
    line = " ".join(line.split())
    title = " ".join(title.split())
    return line == title or (line.endswith(" " + title) and len(line) <= len(title) + 12)
