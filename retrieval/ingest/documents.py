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

# Fixed namespace for chunk point ids: uuid5(namespace, f"{doc_id}\x1f{chunk_index}").
CHUNK_NAMESPACE = uuid.UUID("6f2a4f0e-8d1c-5b7a-9e43-2c61d0b8a915")


@dataclass(frozen=True)
class Document:
    """One source document. `text` is NFC-normalised by the readers; offsets index into it."""

    id: str
    text: str
    title: str = ""
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def content_hash(self) -> str:
        """sha256 over everything that ends up in the index: a change of any field re-ingests."""
        body = json.dumps(
            [self.id, self.text, self.title, self.source, self.metadata], sort_keys=True, ensure_ascii=False
        )
        return hashlib.sha256(body.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class BadRecord:
    """A record a reader could not turn into a document: where it is and why."""

    location: str
    reason: str

    def __str__(self) -> str:
        return f"{self.location}: {self.reason}"


@dataclass(frozen=True)
class Chunk:
    """A token window of a document, with character offsets into the document's text."""

    doc_id: str
    index: int
    text: str
    start: int
    end: int

    @property
    def point_id(self) -> str:
        return chunk_point_id(self.doc_id, self.index)

    @property
    def text_hash(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


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
        "metadata": doc.metadata,
        "doc_hash": doc_hash,
        "chunk_hash": chunk.text_hash,
    }
