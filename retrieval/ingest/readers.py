"""Corpus readers: JSONL files (plain or .gz), stdin JSONL and directories of .txt/.md/.html files.

Readers stream: they yield one `Document` (or one `BadRecord` with file:line and the reason)
at a time, so a corpus larger than memory flows through. Text is NFC-normalised here, once,
so chunk offsets and hashes refer to the text that is stored.
"""

import gzip
import json
import sys
import unicodedata
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import IO, Any, ClassVar

from twostage.retrieval.errors import InputError
from twostage.retrieval.ingest.documents import BadRecord, Document

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm"}
Record = Document | BadRecord


def _gzip_size(path: Path) -> int:
    """Uncompressed size of a gzip file (its trailer, mod 2**32), for progress against bytes read."""
    with path.open("rb") as handle:
        if path.stat().st_size < 18 or handle.read(2) != b"\x1f\x8b":
            raise InputError(f"corpus path {str(path)!r} ends in .gz but is not gzip-compressed")
        handle.seek(-4, 2)
        return int.from_bytes(handle.read(4), "little")


class CorpusReader:
    """Iterates a corpus path ('-' is stdin JSONL); `bytes_read`/`bytes_total` drive progress."""

    def __init__(self, path: str, max_document_chars: int) -> None:
        self.path = path
        self.max_document_chars = max_document_chars
        self.bytes_read = 0
        if path == "-":
            self.bytes_total: int | None = None
        else:
            p = Path(path)
            if not p.exists():
                raise InputError(f"corpus path {path!r} does not exist")
            if p.is_dir():
                self.bytes_total = sum(f.stat().st_size for f in self._files(p))
            elif p.suffix == ".gz":
                self.bytes_total = _gzip_size(p)
            else:
                self.bytes_total = p.stat().st_size

    def __iter__(self) -> Iterator[Record]:
        if self.path == "-":
            yield from self._jsonl(sys.stdin, "<stdin>")
            return
        p = Path(self.path)
        if p.is_dir():
            for file in self._files(p):
                yield self._file_document(file, file.relative_to(p).as_posix())
        elif p.suffix == ".gz":
            with gzip.open(p, "rt", encoding="utf-8", errors="strict", newline="") as handle:
                yield from self._jsonl(handle, str(p))
        else:
            with p.open(encoding="utf-8", errors="strict", newline="") as handle:
                yield from self._jsonl(handle, str(p))

    @staticmethod
    def _files(root: Path) -> list[Path]:
        suffixes = TEXT_SUFFIXES | HTML_SUFFIXES
        return sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)

    def _jsonl(self, handle: IO[str], name: str) -> Iterator[Record]:
        line_no = 0
        while True:
            location = f"{name}:{line_no + 1}"
            try:
                line = handle.readline()
            except UnicodeDecodeError as exc:
                yield BadRecord(location, f"not UTF-8 text ({exc.reason}); stopped reading this file")
                return
            if not line:
                return
            line_no += 1
            self.bytes_read += len(line.encode("utf-8", errors="replace"))
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield BadRecord(location, f"invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            yield self._json_document(record, location, source=name)

    def _json_document(self, record: Any, location: str, source: str) -> Record:
        if not isinstance(record, dict):
            return BadRecord(location, "a line must be a JSON object")
        doc_id = record.get("_id", record.get("id"))
        if isinstance(doc_id, bool) or not isinstance(doc_id, str | int) or str(doc_id).strip() == "":
            return BadRecord(location, "missing '_id' or 'id' (a non-empty string or integer)")
        text = record.get("text")
        if not isinstance(text, str):
            return BadRecord(location, "missing 'text' (a string)")
        title = record.get("title") or ""
        if not isinstance(title, str):
            return BadRecord(location, "'title' must be a string")
        metadata = record.get("metadata") or {}
        if not isinstance(metadata, dict):
            return BadRecord(location, "'metadata' must be a JSON object")
        extra = {k: v for k, v in record.items() if k not in {"_id", "id", "text", "title", "metadata"}}
        return self._document(str(doc_id), text, title, source, {**extra, **metadata}, location)

    def _file_document(self, file: Path, doc_id: str) -> Record:
        raw = file.read_bytes()
        self.bytes_read += len(raw)
        if b"\x00" in raw[:8192]:
            return BadRecord(str(file), "binary file (NUL bytes), skipped")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return BadRecord(str(file), f"not UTF-8 text ({exc.reason} at byte {exc.start})")
        title = file.stem
        if file.suffix.lower() in HTML_SUFFIXES:
            page = _HtmlText()
            page.feed(text)
            page.close()
            text, title = page.text(), page.title.strip() or title
        else:
            first = text.lstrip().split("\n", 1)[0]
            if first.startswith("#"):
                title = first.lstrip("#").strip() or title
        return self._document(doc_id, text, title, str(file), {}, str(file))

    def _document(
        self, doc_id: str, text: str, title: str, source: str, metadata: dict[str, Any], location: str
    ) -> Record:
        return make_document(doc_id, text, title, source, metadata, location, self.max_document_chars)


def make_document(
    doc_id: str,
    text: str,
    title: str,
    source: str,
    metadata: dict[str, Any],
    location: str,
    max_chars: int,
) -> Record:
    """A validated, NFC-normalised `Document`, or the `BadRecord` saying what is wrong with it.

    Every way into the index (files, stdin, the HTTP API) goes through here.
    """
    if not text.strip():
        return BadRecord(location, f"document {doc_id!r} has no text (empty or whitespace only)")
    if len(text) > max_chars:
        return BadRecord(
            location,
            f"document {doc_id!r} has {len(text):,} characters; the limit is "
            f"{max_chars:,} (TWOSTAGE_INGEST__MAX_DOCUMENT_CHARS)",
        )
    nfc = unicodedata.normalize
    return Document(doc_id, nfc("NFC", text), nfc("NFC", title), source, metadata)


class _HtmlText(HTMLParser):
    """Visible text of an HTML page (script/style dropped, block elements become line breaks)."""

    BLOCKS: ClassVar[set[str]] = {
        "p",
        "div",
        "br",
        "li",
        "tr",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "section",
        "article",
        "pre",
    }

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in {"script", "style", "noscript", "template"}:
            self._skip += 1
        elif tag == "title":
            self._in_title = True
        elif tag in self.BLOCKS:
            self.parts.append("\n\n" if tag not in {"br", "li", "tr"} else "\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in {"script", "style", "noscript", "template"}:
            self._skip = max(0, self._skip - 1)
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif not self._skip:
            self.parts.append(data)

    def text(self) -> str:
        lines = [" ".join(line.split()) for line in "".join(self.parts).split("\n")]
        out: list[str] = []
        for line in lines:
            if line or (out and out[-1]):
                out.append(line)
        return "\n".join(out).strip()
