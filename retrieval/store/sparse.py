"""BM25 sparse vectors, computed client-side with Qdrant Edge's `Bm25` for both stores.

Why Edge's `Bm25` and not fastembed's `Qdrant/bm25`: its token ids are the server's, it needs
no files (fastembed downloads its stop words and stemmer from the hub at run time, so it
cannot be the offline path), and it is the same code in the embedded and the server store.
Documents get term-frequency weights with BM25's (k, b, avg_len) saturation; a query gets
weight 1 per distinct token. The collection's sparse vector carries the IDF modifier, so the
engine supplies the corpus statistics and keeps them current as chunks come and go.

A collection records the encoder that built it (`SparseManifest`); queries and later writes
use that record, not the settings of the day, so a setting change never mixes two encoders.
"""

from dataclasses import dataclass
from typing import Literal

import qdrant_edge as qe
from pydantic import BaseModel, Field

SPARSE_VECTOR = "bm25"
RecallMode = Literal["dense", "sparse", "hybrid"]


@dataclass(frozen=True)
class SparseVec:
    """Non-zero dimensions of a sparse vector (token ids) and their weights."""

    indices: tuple[int, ...]
    values: tuple[float, ...]


class Bm25Params(BaseModel):
    """Qdrant's `Bm25Config` fields that change the vectors (defaults are Qdrant's)."""

    k: float = Field(1.2, ge=0, description="term-frequency saturation")
    b: float = Field(0.75, ge=0, le=1, description="length normalisation")
    avg_len: float = Field(256.0, gt=0, description="average document length in tokens")
    language: str = Field("english", description="stop words and stemmer")


class SparseManifest(BaseModel):
    """What built a collection's sparse vectors; queries must be encoded the same way."""

    model: Literal["qdrant-edge-bm25"] = "qdrant-edge-bm25"
    engine: str = Field(default_factory=lambda: f"qdrant-edge-py {_edge_version()}")
    vector: str = SPARSE_VECTOR
    modifier: Literal["idf"] = "idf"
    params: Bm25Params = Field(default_factory=Bm25Params)


class Bm25Encoder:
    """Text to BM25 sparse vectors, as the collection's `SparseManifest` says."""

    def __init__(self, manifest: SparseManifest) -> None:
        p = manifest.params
        self.manifest = manifest
        self._model = qe.Bm25(qe.Bm25Config(k=p.k, b=p.b, avg_len=p.avg_len, language=p.language))

    def embed_documents(self, texts: list[str]) -> list[SparseVec]:
        return [_vec(self._model.embed_document(t)) for t in texts]

    def embed_query(self, text: str) -> SparseVec:
        return _vec(self._model.embed_query(text))


def _vec(v: qe.SparseVector) -> SparseVec:
    return SparseVec(tuple(v.indices), tuple(v.values))


def _edge_version() -> str:
    from importlib.metadata import version

    return version("qdrant-edge-py")


@dataclass(frozen=True)
class Rrf:
    """Reciprocal rank fusion as Qdrant computes it: score = sum over branches of
    1 / (k - 1 + rank / weight), rank from 1 (with weight 1: the paper's 1 / (k + rank - 1)).

    `k` is always explicit (Qdrant's default is 2, the paper's 60); weights are (dense, sparse).
    """

    k: int
    weights: tuple[float, float] = (1.0, 1.0)


def sparse_encoder(sparse: SparseManifest | None) -> Bm25Encoder | None:
    """The encoder that built (and must query) a collection, from its manifest's `sparse` record;
    None when it is dense only."""
    return Bm25Encoder(sparse) if sparse is not None else None
