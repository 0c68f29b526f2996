"""Corpus readers: JSONL (plain or .gz, a file or stdin), single documents, and folders of documents.

Readers stream: they yield one `Document` (or one `BadRecord` with its location, kind and
reason) at a time, so a corpus larger than memory flows through. Text is NFC-normalised
here, once, so chunk offsets and hashes refer to the text that is stored.

A folder is read file by file in sorted path order; each file's id and `source` is its path
relative to the folder (the server's own paths never reach the index). Extraction is CPU-bound
(PDF, HTML parsing), so with `workers` > 1 files are extracted in a pool of processes, a
bounded window ahead, and yielded in order. With a shard (`--shard I/N`) only the documents
whose id hashes to shard I are read, so N machines can split one corpus.
"""

import gzip
import hashlib
import json
import multiprocessing
import sys
import unicodedata
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from twostage.retrieval.access.principals import ACL_FIELD, parse_acl
from twostage.retrieval.core.errors import InputError
from twostage.retrieval.ingest.acl_files import ACL_FILE, FolderAcls
from twostage.retrieval.ingest.documents import BadRecord, Document, Section
from twostage.retrieval.ingest.formats import (
    JSONL_SUFFIXES,
    Extracted,
    Part,
    Unreadable,
    format_of,
    read_document,
)

Record = Document | BadRecord
# Starting worker processes costs a second or two (each imports the readers' libraries): below
# this many bytes of documents one process extracts faster than a pool (bench/documents.py).
POOL_MIN_BYTES = 16 * 2**20
_MIN_WORDS = 3  # a part with fewer words (a page number, a lone heading line) joins its neighbour


def _gzip_size(path: Path) -> int:
    """Uncompressed size of a gzip file (its trailer, mod 2**32), for progress against bytes read."""
    with path.open("rb") as handle:
        if path.stat().st_size < 18 or handle.read(2) != b"\x1f\x8b":
            raise InputError(f"corpus path {str(path)!r} ends in .gz but is not gzip-compressed")
        handle.seek(-4, 2)
        return int.from_bytes(handle.read(4), "little")


def is_jsonl(path: Path) -> bool:
    return path.name.lower().endswith(JSONL_SUFFIXES)


def in_shard(doc_id: str, shard: tuple[int, int] | None) -> bool:
    """Whether `doc_id` belongs to shard (index, count): a stable hash, the same on every machine."""
    if shard is None:
        return True
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % shard[1] == shard[0]


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' (1-based I) as (I - 1, N), or a one-line InputError."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError(f"--shard {text!r}: expected I/N, e.g. 2/4 (shard 2 of 4)") from None
    if not 1 <= index <= count:
        raise InputError(f"--shard {text!r}: I must be between 1 and N")
    return index - 1, count


class CorpusReader:
    """Iterates a corpus path ('-' is stdin JSONL).

    `bytes_total` is what progress is measured against; `bytes_passed` counts input that will
    never become a document to write (bad records, other shards), so progress can count it done.
    """

    def __init__(
        self,
        path: str,
        max_document_chars: int,
        *,
        workers: int = 1,
        shard: tuple[int, int] | None = None,
        pool_min_bytes: int = POOL_MIN_BYTES,
        acl: tuple[str, ...] | None = None,
    ) -> None:
        self.path = path
        self.acl = acl  # `--acl`: documents no record and no ACL file gives one
        self.folder_acls: FolderAcls | None = None
        self.max_document_chars = max_document_chars
        self.workers = max(1, workers)
        self.pool_min_bytes = pool_min_bytes
        self.shard = shard
        self.bytes_passed = 0
        self.hidden = 0  # files under a hidden name (.git, .DS_Store) in a folder: not read, counted
        if path == "-":
            self.bytes_total: int | None = None
            return
        p = Path(path)
        if not p.exists():
            raise InputError(f"corpus path {path!r} does not exist")
        if p.is_dir():
            self.folder_acls = FolderAcls(p)  # a bad ACL file fails here, before anything is read
            self.bytes_total = sum(self._size(f) for f in self._files(p) if self._readable(f))
        else:
            self.bytes_total = self._size(p)

    @staticmethod
    def _size(path: Path) -> int:
        return _gzip_size(path) if path.name.lower().endswith(".gz") else path.stat().st_size

    @staticmethod
    def _readable(path: Path) -> bool:
        return is_jsonl(path) or format_of(path) is not None

    def _files(self, root: Path) -> list[Path]:
        files, hidden = [], 0
        for f in sorted(root.rglob("*")):
            if f.name == ACL_FILE:
                continue  # read by FolderAcls
            if any(part.startswith(".") for part in f.relative_to(root).parts):
                hidden += f.is_file()
            elif f.is_file():
                files.append(f)
        self.hidden = hidden
        return files

    def __iter__(self) -> Iterator[Record]:
        if self.path == "-":
            yield from self._jsonl(sys.stdin, "<stdin>", "stdin")
            return
        p = Path(self.path)
        if p.is_dir():
            yield from self._folder(p)
        elif format_of(p) is None:  # a file given by name and not a document format: JSONL, as always
            yield from self._jsonl_file(p, p.name)
        else:
            record = self._permitted(extract_file(str(p), p.name, self.max_document_chars), p.name)
            self.bytes_passed += 0 if isinstance(record, Document) else self._size(p)
            if in_shard(record.id if isinstance(record, Document) else p.name, self.shard):
                yield record

    def _file_acl(self, rel: str) -> tuple[str, ...] | None:
        """The ACL of a file of the corpus: its folder's ACL file's, else `--acl`."""
        found = self.folder_acls.acl_for(rel) if self.folder_acls is not None else None
        return found if found is not None else self.acl

    def _permitted(self, record: Record, rel: str) -> Record:
        acl = self._file_acl(rel)
        return replace(record, acl=acl) if isinstance(record, Document) and acl is not None else record

    def _jsonl_file(self, path: Path, source: str) -> Iterator[Record]:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="strict", newline="") as handle:
            yield from self._jsonl(handle, str(path), source)

    def _folder(self, root: Path) -> Iterator[Record]:
        files = self._files(root)
        documents: list[tuple[Path, str]] = []
        for file in files:
            rel = file.relative_to(root).as_posix()
            if is_jsonl(file):
                yield from self._flush(documents)
                documents = []
                yield from self._jsonl_file(file, rel)
            elif not in_shard(rel, self.shard):
                self.bytes_passed += self._size(file) if self._readable(file) else 0
            elif format_of(file) is None:
                yield BadRecord(rel, str(_unsupported(file)), "unsupported", rel)
            else:
                documents.append((file, rel))
        yield from self._flush(documents)

    def _flush(self, documents: list[tuple[Path, str]]) -> Iterator[Record]:
        """Extract the files, in a process pool when there are several workers, in order."""
        limit = self.max_document_chars
        small = sum(file.stat().st_size for file, _ in documents) < self.pool_min_bytes
        if self.workers == 1 or len(documents) < 2 or small:
            for file, rel in documents:
                record = self._permitted(extract_file(str(file), rel, limit), rel)
                self.bytes_passed += self._size(file) if isinstance(record, BadRecord) else 0
                yield record
            return
        # spawn, not fork: this process has model and store threads a fork would copy mid-lock
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(self.workers, len(documents)), mp_context=context) as pool:
            window: deque[tuple[Future[Record], Path, str]] = deque()
            for file, rel in documents:
                window.append((pool.submit(extract_file, str(file), rel, limit), file, rel))
                if len(window) >= 4 * self.workers:
                    yield self._counted(*window.popleft())
            while window:
                yield self._counted(*window.popleft())

    def _counted(self, future: "Future[Record]", file: Path, rel: str) -> Record:
        try:
            record = future.result()
        except Exception as exc:  # the worker died (a crash inside a parser): this file is reported
            record = BadRecord(rel, f"extraction failed: {type(exc).__name__}: {exc}", "unreadable", rel)
        if isinstance(record, BadRecord):
            self.bytes_passed += self._size(file)
        return self._permitted(record, rel)

    def _jsonl(self, handle: IO[str], name: str, source: str) -> Iterator[Record]:
        line_no = 0
        while True:
            location = f"{name}:{line_no + 1}"
            try:
                line = handle.readline()
            except UnicodeDecodeError as exc:
                yield BadRecord(
                    location, f"not UTF-8 text ({exc.reason}); stopped reading this file", "unreadable"
                )
                return
            if not line:
                return
            line_no += 1
            size = len(line.encode("utf-8", errors="replace"))
            if not line.strip():
                self.bytes_passed += size
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                self.bytes_passed += size
                if self.shard is None or self.shard[0] == 0:  # an id-less record: reported by shard 1 only
                    yield BadRecord(location, f"invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            result = self._json_document(record, location, source, size)
            doc_id = result.id if isinstance(result, Document) else result.doc_id
            # a record without a usable id is reported by shard 1 only
            mine = (
                in_shard(doc_id, self.shard)
                if doc_id is not None
                else self.shard is None or self.shard[0] == 0
            )
            if not mine:
                self.bytes_passed += size
                continue
            if isinstance(result, BadRecord):
                self.bytes_passed += size
            yield result

    def _json_document(self, record: Any, location: str, source: str, size: int) -> Record:
        if not isinstance(record, dict):
            return BadRecord(location, "a line must be a JSON object")
        doc_id = record.get("_id", record.get("id"))
        if isinstance(doc_id, bool) or not isinstance(doc_id, str | int) or str(doc_id).strip() == "":
            return BadRecord(location, "missing '_id' or 'id' (a non-empty string or integer)")
        text = record.get("text")
        if not isinstance(text, str):
            return BadRecord(location, "missing 'text' (a string)", doc_id=str(doc_id))
        title = record.get("title") or ""
        if not isinstance(title, str):
            return BadRecord(location, "'title' must be a string", doc_id=str(doc_id))
        metadata = record.get("metadata") or {}
        if not isinstance(metadata, dict):
            return BadRecord(location, "'metadata' must be a JSON object", doc_id=str(doc_id))
        own = record.get("source")
        if own is not None and not isinstance(own, str):
            return BadRecord(location, "'source' must be a string", doc_id=str(doc_id))
        try:  # the record's own ACL, else its file's (an ACL file, --acl)
            acl = parse_acl(record[ACL_FIELD]) if ACL_FIELD in record else self._file_acl(source)
        except InputError as exc:
            return BadRecord(location, str(exc), doc_id=str(doc_id))
        # other top-level fields (`source` too) are kept as metadata, as they always were; never the ACL
        extra = {
            k: v for k, v in record.items() if k not in {"_id", "id", "text", "title", "metadata", ACL_FIELD}
        }
        if ACL_FIELD in metadata:
            return BadRecord(location, f"'metadata.{ACL_FIELD}' is reserved: give permissions as a top-level "
                             f"'{ACL_FIELD}'", doc_id=str(doc_id))  # fmt: skip
        document = make_document(
            str(doc_id), text, title, own or source, {**extra, **metadata}, location, self.max_document_chars,
            size=size,
        )  # fmt: skip
        return replace(document, acl=acl) if isinstance(document, Document) and acl is not None else document


def _unsupported(file: Path) -> Unreadable:
    try:
        read_document(file)
    except Unreadable as exc:
        return exc
    raise AssertionError(f"{file} has no reader but was read")  # pragma: no cover


def extract_file(path: str, rel: str, max_chars: int) -> Record:
    """One file as a `Document` with sections and pages, or the `BadRecord` saying why not.

    A top-level function of plain arguments: it runs in worker processes.
    """
    file = Path(path)
    try:
        size = file.stat().st_size
        extracted = read_document(file)
    except Unreadable as exc:
        return BadRecord(rel, str(exc), exc.kind, rel)
    except OSError as exc:
        return BadRecord(rel, f"cannot read: {exc.strerror}", "unreadable", rel)
    fmt = format_of(file) or "text"
    try:
        return assemble(rel, extracted, rel, fmt, size, max_chars)
    except Exception as exc:  # never one file's surprise for the whole run: reported, the rest goes on
        return BadRecord(rel, f"extraction failed: {type(exc).__name__}: {exc}", "unreadable", rel)


def assemble(doc_id: str, extracted: Extracted, source: str, fmt: str, size: int, max_chars: int) -> Record:
    """Join a reader's parts into one document text with its sections and page offsets.

    Parts are NFC-normalised before their offsets are taken. No chunk is made of a stray line:
    a heading line directly followed by its first subsection joins that subsection, and a
    part of fewer than three words (a page number) the text before it.
    """
    nfc = unicodedata.normalize
    parts = [Part(nfc("NFC", p.text).strip(), p.headings, p.page) for p in extracted.parts]
    parts = [p for p in parts if p.text]
    merged: list[Part] = []
    for i, part in enumerate(parts):
        following = parts[i + 1] if i + 1 < len(parts) else None
        heading_only = (
            "\n" not in part.text
            and following is not None
            and following.page == part.page
            and (following.headings[: len(part.headings)] == part.headings)
        )
        if heading_only and following is not None:  # a heading line right before its first subsection
            parts[i + 1] = Part(f"{part.text}\n\n{following.text}", following.headings, following.page)
        elif len(part.text.split()) >= _MIN_WORDS:
            merged.append(part)
        elif merged:  # a page number or a stray line: it stays with the text before it
            merged[-1] = Part(f"{merged[-1].text}\n\n{part.text}", merged[-1].headings, merged[-1].page)
        else:
            merged.append(part)
    text, sections, pages = _join(merged, extracted.pages)
    if not pages and all(not s.headings for s in sections):
        sections = ()  # no structure: stored (and hashed) exactly as a plain document always was
    title = nfc("NFC", extracted.title) or Path(source).stem
    return make_document(doc_id, text, title, source, {}, source, max_chars, sections=sections, pages=pages,
                         fmt=fmt, size=size)  # fmt: skip


def _join(parts: list[Part], page_count: int) -> tuple[str, tuple[Section, ...], tuple[int, ...]]:
    """The parts' text joined by blank lines; a section per run of parts under one heading path;
    for paged documents the offset where each page starts (an empty page starts where the next does)."""
    chunks: list[str] = []
    sections: list[Section] = []
    page_starts: dict[int, int] = {}
    offset = 0
    for part in parts:
        if not part.text:
            continue
        if chunks:
            offset += 2
        if sections and sections[-1].headings == part.headings:
            sections[-1] = Section(sections[-1].start, offset + len(part.text), part.headings)
        else:
            sections.append(Section(offset, offset + len(part.text), part.headings))
        if part.page is not None:
            page_starts.setdefault(part.page, offset)
        chunks.append(part.text)
        offset += len(part.text)
    pages: list[int] = []
    for page in range(page_count, 0, -1):  # backwards: an empty page starts where the next one does
        pages.append(page_starts.get(page, pages[-1] if pages else offset))
    pages.reverse()
    return "\n\n".join(chunks), tuple(sections), tuple(pages)


def make_document(
    doc_id: str,
    text: str,
    title: str,
    source: str,
    metadata: dict[str, Any],
    location: str,
    max_chars: int,
    *,
    sections: tuple[Section, ...] = (),
    pages: tuple[int, ...] = (),
    fmt: str = "jsonl",
    size: int = 0,
) -> Record:
    """A validated, NFC-normalised `Document`, or the `BadRecord` saying what is wrong with it.

    Every way into the index (files, stdin, the HTTP API) goes through here.
    """
    if not text.strip():
        return BadRecord(
            location, f"document {doc_id!r} has no text (empty or whitespace only)", "empty", doc_id
        )
    if len(text) > max_chars:
        return BadRecord(
            location,
            f"document {doc_id!r} has {len(text):,} characters; the limit is "
            f"{max_chars:,} (TWOSTAGE_INGEST__MAX_DOCUMENT_CHARS)",
            "too-large",
            doc_id,
        )
    nfc = unicodedata.normalize
    if not sections:  # offsets of a structured document were taken on text already normalised
        text = nfc("NFC", text)
    return Document(doc_id, text, nfc("NFC", title), source, metadata, sections, pages, fmt, size)
