"""Document formats: each reader turns one file into `Part`s (text, heading path, page).

Readers run in worker processes (`readers.extract_file`), so they are plain functions of a
path that import only their own library. What cannot be read raises `Unreadable` with a kind
the ingest report counts (unsupported, empty, no-text-layer, encrypted, unreadable) and one
line of reason; nothing a document contains is ever executed, fetched or opened as a path.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Part:
    """A run of text under one heading path (outermost first), on one page where the format has pages."""

    text: str
    headings: tuple[str, ...] = ()
    page: int | None = None


@dataclass(frozen=True)
class Extracted:
    """What a reader found in a file: a title (may be empty), the parts in reading order, and
    for paged formats the page count (pages without text still count)."""

    title: str
    parts: list[Part]
    pages: int = 0


class Unreadable(Exception):
    """A file that yields no document: `kind` for the report's counts, the message for its line."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


Reader = Callable[[Path], Extracted]

# suffix -> (format name in the report, module, function); a reader's library is imported only
# when a file of its format is read
FORMATS: dict[str, tuple[str, str, str]] = {
    ".pdf": ("pdf", "pdf", "read_pdf"),
    ".docx": ("docx", "word", "read_docx"),
    ".html": ("html", "web", "read_html"),
    ".htm": ("html", "web", "read_html"),
    ".xhtml": ("html", "web", "read_html"),
    ".md": ("markdown", "text", "read_markdown"),
    ".markdown": ("markdown", "text", "read_markdown"),
    ".rst": ("rst", "text", "read_rst"),
    ".txt": ("text", "text", "read_plain"),
    ".text": ("text", "text", "read_plain"),
}
# JSONL inside a folder (a file given by name is JSONL unless its suffix names a document format;
# a folder's .json files are usually something else: configs, package manifests)
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
# formats people keep beside their documents that we do not read: named in the skip reason
KNOWN_ELSEWHERE = {
    ".doc": "legacy Word .doc (save it as .docx)", ".odt": "OpenDocument text (save it as .docx)",
    ".pptx": "PowerPoint", ".xlsx": "Excel", ".epub": "EPUB", ".rtf": "RTF",
}  # fmt: skip


def format_of(path: Path) -> str | None:
    """The format a file is read as, by its suffix (None: not a document format we read)."""
    entry = FORMATS.get(path.suffix.lower())
    return entry[0] if entry else None


def read_document(path: Path) -> Extracted:
    """Extract one file; any failure is an `Unreadable` with the library's reason."""
    entry = FORMATS.get(path.suffix.lower())
    if entry is None:
        what = KNOWN_ELSEWHERE.get(path.suffix.lower(), f"'{path.suffix or path.name}' files")
        raise Unreadable("unsupported", f"unsupported type: {what} are not read")
    reader: Reader = getattr(importlib.import_module(f"{__name__}.{entry[1]}"), entry[2])
    try:
        extracted = reader(path)
    except Unreadable:
        raise
    except MemoryError:
        raise Unreadable("unreadable", "too large to extract in memory") from None
    except Exception as exc:  # a library's parse error on a damaged file: its reason, one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Unreadable("unreadable", f"corrupt or unreadable {entry[0]}: {reason}") from None
    if not any(part.text.strip() for part in extracted.parts):
        raise Unreadable("empty", "empty: no text")
    return extracted


def decode_text(raw: bytes) -> str:
    """UTF-8 (with or without BOM) text; anything else is reported, not guessed at."""
    if b"\x00" in raw[:8192]:
        raise Unreadable("unreadable", "binary file (NUL bytes)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise Unreadable("unreadable", f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
