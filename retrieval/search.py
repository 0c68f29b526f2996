"""Two-stage search: embed the query, recall top-K chunks by ANN, rerank, return top-N.

`Deployment` is the unit that must never be mixed: a collection version, the embedder that
built it and the reranker served with it. A search takes one deployment object and uses
only it, so swapping the service's deployment (a retrain, a rollback) can never make a
query be embedded by one model and searched in an index built by another.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from twostage.retrieval.embedder import Embedder
from twostage.retrieval.errors import InputError
from twostage.retrieval.reranker import Reranker
from twostage.retrieval.store import CollectionManifest, Filter, Hit, VectorStore

EmbedQuery = Callable[[str, str | None], np.ndarray]
ScoreDocuments = Callable[[str, Sequence[str], str | None], list[float]]


@dataclass(frozen=True)
class Deployment:
    """A collection version with its embedder (the one that built it) and the reranker."""

    manifest: CollectionManifest
    embedder: Embedder
    reranker: Reranker | None

    @property
    def collection(self) -> str:
        return self.manifest.collection


@dataclass(frozen=True)
class SearchHit:
    id: str
    doc_id: str
    chunk_index: int
    text: str
    title: str
    source: str
    metadata: dict[str, Any]
    start: int
    end: int
    recall_score: float
    rerank_score: float | None
    rank: int


@dataclass
class SearchResult:
    hits: list[SearchHit]
    collection: str
    embedder: str
    reranker: str | None
    timings_ms: dict[str, float] = field(default_factory=dict)
    stages: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def best_chunk_per_document(hits: list[Hit]) -> list[Hit]:
    """Keep each document's best-scoring chunk (hits arrive best first)."""
    seen: set[str] = set()
    kept = []
    for hit in hits:
        doc_id = str(hit.payload.get("doc_id"))
        if doc_id not in seen:
            seen.add(doc_id)
            kept.append(hit)
    return kept


def two_stage_search(
    deployment: Deployment,
    store: VectorStore,
    query: str,
    *,
    instruction: str | None,
    top_k: int,
    top_n: int,
    flt: Filter | None = None,
    rerank: bool = True,
    group_by_doc: bool = False,
    embed_query: EmbedQuery | None = None,
    score_documents: ScoreDocuments | None = None,
    hnsw_ef: int | None = None,
) -> SearchResult:
    """The whole search path with per-stage timings (ms).

    `embed_query` / `score_documents` default to the deployment's models; the service passes
    its micro-batchers instead, which call the same models.
    """
    if not isinstance(query, str) or not query.strip():
        raise InputError("query must be a non-empty string")
    if top_n > top_k:
        raise InputError(f"top_n ({top_n}) cannot exceed top_k ({top_k})")
    timings: dict[str, float] = {}
    started = time.perf_counter()

    embed = embed_query or (lambda q, i: deployment.embedder.embed_queries([q], i)[0])
    vector = embed(query, instruction)
    timings["embed"] = _ms(started)

    mark = time.perf_counter()
    hits = store.search(deployment.collection, vector, top_k, flt, hnsw_ef=hnsw_ef)
    if group_by_doc:
        hits = best_chunk_per_document(hits)
    timings["recall"] = _ms(mark)

    rerank_scores: list[float | None] = [None] * len(hits)
    reranker = deployment.reranker if rerank else None
    mark = time.perf_counter()
    if reranker is not None and hits:
        score = score_documents or reranker.score
        scores = score(query, [str(h.payload.get("text", "")) for h in hits], instruction)
        rerank_scores = list(scores)
        order = sorted(range(len(hits)), key=lambda i: (-scores[i], i))
    else:
        order = list(range(len(hits)))
    timings["rerank"] = _ms(mark)
    timings["total"] = _ms(started)

    result_hits = []
    for rank, i in enumerate(order[:top_n], start=1):
        p = hits[i].payload
        result_hits.append(
            SearchHit(
                id=hits[i].id,
                doc_id=str(p.get("doc_id", "")),
                chunk_index=int(p.get("chunk_index", 0)),
                text=str(p.get("text", "")),
                title=str(p.get("title", "")),
                source=str(p.get("source", "")),
                metadata=dict(p.get("metadata") or {}),
                start=int(p.get("start", 0)),
                end=int(p.get("end", 0)),
                recall_score=hits[i].score,
                rerank_score=rerank_scores[i],
                rank=rank,
            )
        )
    return SearchResult(
        hits=result_hits,
        collection=deployment.collection,
        embedder=deployment.embedder.model_id,
        reranker=reranker.model_id if reranker is not None else None,
        timings_ms=timings,
        stages=["embed", "recall", "rerank"] if reranker is not None else ["embed", "recall"],
    )


def rerank_off_note(requested: bool | None) -> str:
    """Why the hits are in first-stage order, and how to get them reranked."""
    if requested is False:
        return "not reranked: the request said rerank=false"
    return (
        "not reranked: this service reranks only on request (TWOSTAGE_API__RERANK=false), because its "
        "reranker is not trained to rank; send rerank=true to force it, or train one with twostage retrain"
    )


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 3)
