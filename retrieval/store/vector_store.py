"""The `VectorStore` protocol, in the service's own types, and what both adapters share.

Adapters: `EdgeStore` (embedded Qdrant Edge, the default) and `QdrantStore` (qdrant-client:
a server/cluster, or its local mode). Both pass `tests/test_store_contract.py`.

A store holds physical collections `NAME__vN`, each with a manifest saying what built it,
and aliases `NAME -> NAME__vN`; versioning policy lives in `retrieval.store.collections`.
Filters are a small algebra (`Equals`, `AnyOf`, `Range`, all combined with AND, plus a
`must_not` list) that each adapter translates to its engine's filter.
"""

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, Field

from twostage.retrieval.core.errors import InputError, TwostageError
from twostage.retrieval.models.fingerprint import Fingerprint
from twostage.retrieval.store.sparse import Rrf, SparseManifest, SparseVec

FieldType = Literal["keyword", "integer", "float", "bool"]

# Payload fields every collection indexes (filters on them are fast in both engines).
CORE_INDEXES: dict[str, FieldType] = {
    "doc_id": "keyword",
    "chunk_index": "integer",
    "doc_hash": "keyword",
    "source": "keyword",
    "acl": "keyword",  # who may see the chunk (retrieval/access/principals.py)
}

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")  # fullmatch: "$" would let a trailing newline in


class StoreError(TwostageError):
    """The store refused an operation; the message says what to do instead."""


class StoreUnavailable(StoreError):
    """The store could not be reached (server down, network, timeout); retrying later may work."""


class StoreLockedError(StoreError):
    """Another process owns an embedded shard."""


class CollectionNotFound(StoreError):
    """The collection (alias or version) does not exist."""


class InvalidCollectionName(StoreError, InputError):
    """A collection name that is not path- and URL-safe."""


def check_collection_name(name: str) -> str:
    """Collection names are path- and URL-safe and never contain the `__v` version marker."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or "__" in name:
        raise InvalidCollectionName(
            f"invalid collection name {name!r}: use 1-63 letters, digits, '-' or '_' "
            "(starting with a letter or digit, no '__')"
        )
    return name


@dataclass(frozen=True)
class Equals:
    key: str
    value: str | int | bool


@dataclass(frozen=True)
class AnyOf:
    key: str
    values: tuple[str, ...] | tuple[int, ...]


@dataclass(frozen=True)
class Range:
    key: str
    gte: float | None = None
    gt: float | None = None
    lte: float | None = None
    lt: float | None = None


Condition = Equals | AnyOf | Range


@dataclass(frozen=True)
class Filter:
    """All of `must` and none of `must_not`."""

    must: tuple[Condition, ...] = ()
    must_not: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class Point:
    id: str
    vector: np.ndarray
    payload: dict[str, Any]
    sparse: SparseVec | None = None


@dataclass(frozen=True)
class Record:
    id: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    payload: dict[str, Any] = field(default_factory=dict)


class CollectionManifest(BaseModel):
    """What built a collection version; a query must use the same embedder."""

    name: str
    version: int
    embedder: str = Field(description="model identity name@content-hash")
    embedder_model: str = Field(description="as configured: hub id, path or pypi:NAME")
    embedder_revision: str | None = None
    embedder_fingerprint: Fingerprint | None = Field(
        None, description="the embedder's vectors of fixed probes (None: built before they were recorded)"
    )
    embedder_numerics: str | None = Field(
        None,
        description="the numeric path that embedded it: float32, bfloat16, int8-dynamic, int8-fused, remote",
    )
    dim: int
    distance: Literal["cosine"] = "cosine"
    chunker: dict[str, Any]
    sparse: SparseManifest | None = Field(None, description="BM25 sparse vectors (None: dense only)")
    payload_indexes: dict[str, FieldType] = Field(default_factory=lambda: dict(CORE_INDEXES))
    documents: int = 0
    chunks: int = 0
    unoptimized: int = Field(0, description="points written since the index was last optimised")
    status: Literal["building", "ready"] = "building"
    created_at: str = Field(default_factory=lambda: now_iso())
    updated_at: str = Field(default_factory=lambda: now_iso())

    @property
    def collection(self) -> str:
        return versioned_name(self.name, self.version)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def versioned_name(name: str, version: int) -> str:
    return f"{name}__v{version}"


def parse_versioned_name(collection: str) -> tuple[str, int] | None:
    """(`NAME`, N) of `NAME__vN`, or None for anything else."""
    name, sep, version = collection.rpartition("__v")
    return (name, int(version)) if sep and version.isdigit() else None


def recall_mode(vector: np.ndarray | None, sparse: SparseVec | None, fusion: Rrf | None) -> str:
    """Which branches a `VectorStore.search` call runs; a clear error for a call that makes no sense."""
    if vector is not None and sparse is not None:
        if fusion is None:
            raise StoreError("a dense and a sparse query need a fusion (Rrf) to be combined")
        return "hybrid"
    if vector is None and sparse is None:
        raise StoreError("a search needs a dense vector, a sparse vector or both")
    return "dense" if vector is not None else "sparse"


def fixed_order(hits: list[Hit], limit: int) -> list[Hit]:
    """Best first, equal scores by id, the first `limit`: the engines return ties (frequent under
    RRF, whose scores are sums of 1 / (k + rank)) in no fixed order, which would make the same
    query return different hits from one call to the next."""
    return sorted(hits, key=lambda h: (-h.score, h.id))[:limit]


class VectorStore(Protocol):
    """A Qdrant engine seen through the service's types. Methods take physical collection names."""

    def create_collection(self, manifest: CollectionManifest) -> None:
        """Create `manifest.collection` with its payload indexes; fails if it exists."""
        ...

    def delete_collection(self, collection: str) -> None: ...

    def list_collections(self) -> list[str]: ...

    def read_manifest(self, collection: str) -> CollectionManifest: ...

    def write_manifest(self, manifest: CollectionManifest) -> None: ...

    def set_alias(self, alias: str, collection: str) -> None:
        """Point `alias` at `collection` in one atomic step (readers see old or new, never neither)."""
        ...

    def resolve_alias(self, alias: str) -> str | None: ...

    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        """Insert or replace points by id (idempotent)."""
        ...

    def delete(self, collection: str, flt: Filter) -> None:
        """Delete every point matching `flt`."""
        ...

    def set_payload(self, collection: str, flt: Filter, payload: dict[str, Any]) -> None:
        """Set `payload`'s fields on every point matching `flt`, vectors untouched (a document's
        permissions changed, its text did not)."""
        ...

    def search(
        self,
        collection: str,
        vector: np.ndarray | None,
        limit: int,
        flt: Filter | None = None,
        hnsw_ef: int | None = None,
        exact: bool = False,
        sparse: SparseVec | None = None,
        fusion: Rrf | None = None,
    ) -> list[Hit]:
        """Top-`limit` points, best first, with payloads: by cosine similarity to `vector`, by
        BM25 (IDF-weighted dot product) with `sparse`, or, given both, the two branches (each
        its top `limit`, both filtered) fused by `fusion` in one engine query."""
        ...

    def scroll(
        self, collection: str, flt: Filter | None = None, fields: Sequence[str] | None = None
    ) -> Iterator[Record]:
        """Every point matching `flt` with the payload `fields` (None: all), in id order."""
        ...

    def count(self, collection: str, flt: Filter | None = None) -> int: ...

    def optimize(self, collection: str) -> None:
        """Build indexes after a bulk load (a no-op where the engine does it in the background)."""
        ...

    def close(self) -> None: ...
