"""Documents and chunks: the domain records of the ingest path, with their ids and hashes.

Point ids and hashes are pure functions of the content, so re-running an ingest writes the
same ids (upserts replace, never duplicate) and can tell an unchanged document from a
changed one without re-embedding it.
"""

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from twostage.retrieval.access.principals import ACL_FIELD, stored_acl

# Fixed namespace for chunk point ids: uuid5(namespace, f"{doc_id}\x1f{chunk_index}").
CHUNK_NAMESPACE = uuid.UUID("6f2a4f0e-8d1c-5b7a-9e43-2c61d0b8a915")


@dataclass(frozen=True)
class Section:
    """A span of a document's text under one heading path (outermost heading first).

    Readers of structured formats (Markdown, HTML, Word, PDF outlines) cut the text into
    sections; the chunker never lets a chunk cross from one section into the next.
    """

    start: int
    end: int
    headings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Document:
    """One source document. `text` is NFC-normalised by the readers; offsets index into it.

    `sections` (empty: the whole text, no headings) and `pages` (the offsets where pages 1, 2,
    ... start; empty for formats without pages) are what citations are made of. `format` and
    `size` (bytes of the source) feed the ingest report and its progress.
    """

    id: str
    text: str
    title: str = ""
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    sections: tuple[Section, ...] = ()
    pages: tuple[int, ...] = ()
    format: str = "jsonl"
    size: int = 0
    acl: tuple[str, ...] | None = None  # who may see it (None: `access.default` decides)

    @property
    def content_hash(self) -> str:
        """sha256 over everything that ends up in the index: a change of any field re-ingests.

        Not the ACL: a change of permissions alone re-writes the stored payloads, never the
        vectors (`pipeline.py`).

        Structure is hashed only where a document has some, so documents read before readers
        knew about structure keep their hash (a reindex is not forced on every JSONL corpus).
        """
        fields: list[Any] = [self.id, self.text, self.title, self.source, self.metadata]
        if self.sections or self.pages:
            fields.append([[[s.start, s.end, list(s.headings)] for s in self.sections], list(self.pages)])
        body = json.dumps(fields, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(body.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class BadRecord:
    """A record or file a reader could not turn into a document: where it is and why.

    `kind` sorts the reasons for the report (unsupported, empty, no-text-layer, encrypted,
    unreadable, invalid); `doc_id` is set for a file that still exists, so `--sync` keeps
    what was indexed from it before instead of deleting it as vanished.
    """

    location: str
    reason: str
    kind: str = "invalid"
    doc_id: str | None = None

    def __str__(self) -> str:
        return f"{self.location}: {self.reason}"


@dataclass(frozen=True)
class Chunk:
    """A token window of a document, with character offsets into the document's text.

    `headings` and `page`/`page_end` (1-based, None without pages) are its citation;
    `context` is the heading line embedded in front of the text when contextual headers are
    on (`ChunkerSettings.heading_context`), empty otherwise.
    """

    doc_id: str
    index: int
    text: str
    start: int
    end: int
    headings: tuple[str, ...] = ()
    page: int | None = None
    page_end: int | None = None
    context: str = ""

    @property
    def point_id(self) -> str:
        return chunk_point_id(self.doc_id, self.index)

    @property
    def embed_text(self) -> str:
        """What the embedder (and BM25) read: the contextual header, if any, then the text."""
        return f"{self.context}\n\n{self.text}" if self.context else self.text

    @property
    def text_hash(self) -> str:
        return hashlib.sha256(self.embed_text.encode("utf-8")).hexdigest()


def chunk_point_id(doc_id: str, index: int) -> str:
    """Deterministic point id of chunk `index` of document `doc_id` (a UUID string)."""
    return str(uuid.uuid5(CHUNK_NAMESPACE, f"{doc_id}\x1f{index}"))


def chunk_payload(doc: Document, chunk: Chunk, doc_hash: str, n_chunks: int) -> dict[str, Any]:
    """The payload stored with a chunk's vector: everything search needs to show and filter it.

    `n_chunks` and `doc_hash` let a rerun check that a document is complete and current.
    """
    return {
        "doc_id": doc.id,
        "chunk_index": chunk.index,
        "n_chunks": n_chunks,
        "text": chunk.text,
        "start": chunk.start,
        "end": chunk.end,
        "title": doc.title,
        "source": doc.source,
        "headings": list(chunk.headings),
        "page": chunk.page,
        "page_end": chunk.page_end,
        "context": chunk.context,
        "metadata": doc.metadata,
        "doc_hash": doc_hash,
        "chunk_hash": chunk.text_hash,
        ACL_FIELD: stored_acl(doc.acl),
    }


def embedded_text(payload: dict[str, Any]) -> str:
    """The text a stored chunk was embedded from (its contextual header, if any, then its text),
    so a reindex with a new embedder embeds exactly what the ingest did."""
    text, context = str(payload.get("text", "")), str(payload.get("context") or "")
    return f"{context}\n\n{text}" if context else text
