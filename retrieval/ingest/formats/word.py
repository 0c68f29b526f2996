"""Word .docx (python-docx): paragraphs and tables in body order, headings from paragraph styles.

A table becomes one line per row, cells joined by " | ", so a row stays together in a chunk.
Password-protected .docx files are OLE containers rather than zip packages: reported as
encrypted. Legacy .doc is not read (reported as unsupported).
"""

import zipfile
from pathlib import Path

from twostage.retrieval.ingest.formats import Extracted, Part, Unreadable

_OLE = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # compound file: an encrypted .docx (or a renamed .doc)


def read_docx(path: Path) -> Extracted:
    import docx
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    with path.open("rb") as handle:
        if handle.read(8) == _OLE:
            raise Unreadable(
                "encrypted", "encrypted (password-protected) Word file, or a legacy .doc renamed"
            )
    try:
        document = docx.Document(str(path))
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise Unreadable("unreadable", f"corrupt or unreadable docx: {exc}") from None
    parts: list[Part] = []
    title = (document.core_properties.title or "").strip()
    path_now: tuple[str, ...] = ()
    lines: list[str] = []

    def flush() -> None:
        if lines:
            parts.append(Part("\n\n".join(lines), path_now))
            lines.clear()

    for child in document.element.body.iterchildren():
        tag = child.tag.rsplit("}", 1)[-1]
        if tag == "p":
            paragraph = Paragraph(child, document)
            text = paragraph.text.strip()
            style = paragraph.style.name if paragraph.style is not None else ""
            level = _heading_level(style)
            if style == "Title" and text and not title:
                title = text
            if level is not None and text:
                flush()
                path_now = (*path_now[: level - 1], text)
                lines.append(text)
            elif text:
                lines.append(text)
        elif tag == "tbl":
            rows = [" | ".join(_cells(row)) for row in Table(child, document).rows]
            lines.append("\n".join(r for r in rows if r.strip(" |")))
    flush()
    return Extracted(title or (parts[0].headings[0] if parts and parts[0].headings else ""), parts)


def _heading_level(style: str) -> int | None:
    """Outline level of a heading style ('Heading 2' is 2); None for body text and 'Title'."""
    if style.startswith("Heading "):
        number = style.removeprefix("Heading ").strip()
        return int(number) if number.isdigit() else None
    return None


def _cells(row: object) -> list[str]:
    """A row's cell texts, a merged cell once (python-docx repeats it per grid column)."""
    seen: list[object] = []
    texts: list[str] = []
    for cell in row.cells:  # type: ignore[attr-defined]
        if any(cell._tc is other for other in seen):
            continue
        seen.append(cell._tc)
        texts.append(" ".join(cell.text.split()))
    return texts
