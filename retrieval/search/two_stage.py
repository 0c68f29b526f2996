"""Two-stage search: embed the query, recall top-K chunks by ANN, rerank, return top-N.

One component for every caller (`/v1/search`, `twostage search`, evaluation): a `SearchQuery`
(the request, in the service's own types) is planned against the settings and the deployment
(`plan_search`: which recall, whether to rerank, and why not), run (`run_plan`), and answered
with the plan's notes (`search`). Model calls go through `ModelCalls`: the service's are its
micro-batchers, called from the request's worker thread; elsewhere the models are called here.

`Deployment` is the unit that must never be mixed: a collection version, the embedder that
built it and the reranker served with it. A search takes one deployment object and uses
only it, so swapping the service's deployment (a retrain, a rollback) can never make a
query be embedded by one model and searched in an index built by another.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Literal, Protocol

import numpy as np

from twostage.retrieval.core.errors import InputError
from twostage.retrieval.models.embedder import Embedder
from twostage.retrieval.models.reranker import Reranker
from twostage.retrieval.search.calibration import Calibration
from twostage.retrieval.search.fusion import FusionName, RerankFusion, choose_fusion, rerank_order
from twostage.retrieval.search.settings import QuerySettings
from twostage.retrieval.search.trust import RerankTrust, judge_reranker
from twostage.retrieval.store.sparse import Bm25Encoder, RecallMode, Rrf, sparse_encoder
from twostage.retrieval.store.vector_store import CollectionManifest, Filter, Hit, VectorStore

RerankChoice = bool | Literal["auto"]


class ModelCalls(Protocol):
    """How a search reaches its deployment's models."""

    def embed_query(self, embedder: Embedder, query: str, instruction: str | None) -> np.ndarray: ...

    def score(
        self, reranker: Reranker, query: str, documents: Sequence[str], instruction: str | None
    ) -> list[float]: ...


class DirectCalls:
    """`ModelCalls` in the calling thread, one model call per search (the CLI, evaluation)."""

    def embed_query(self, embedder: Embedder, query: str, instruction: str | None) -> np.ndarray:
        vector: np.ndarray = embedder.embed_queries([query], instruction)[0]
        return vector

    def score(
        self, reranker: Reranker, query: str, documents: Sequence[str], instruction: str | None
    ) -> list[float]:
        return reranker.score(query, documents, instruction)


@dataclass(frozen=True)
class SearchQuery:
    """One search as its caller asks for it. `recall`, `rerank`, `rerank_k` and `rerank_fusion`:
    None takes the settings' choice (`plan_search`)."""

    query: str
    top_k: int = 50
    top_n: int = 10
    instruction: str | None = None
    filter: Filter | None = None
    recall: RecallMode | None = None
    rerank: RerankChoice | None = None
    rerank_k: int | None = None
    rerank_fusion: FusionName | None = None
    group_by_doc: bool = False
    hnsw_ef: int | None = None
    exact: bool = False
    min_relevance: float | None = None  # drop hits whose calibrated relevance is below it


@dataclass(frozen=True)
class Deployment:
    """A collection version with its embedder (the one that built it) and the reranker."""

    manifest: CollectionManifest
    embedder: Embedder
    reranker: Reranker | None
    trust: RerankTrust | None = None  # from the deployment record; None: judged by the model alone
    calibration: Calibration | None = None  # from the deployment record; None: uncalibrated
    record: int | None = None  # the registry deployment (dN); None: not recorded (before a first retrain)

    @property
    def collection(self) -> str:
        return self.manifest.collection

    @property
    def rerank_trust(self) -> RerankTrust:
        return self.trust or judge_reranker(self.reranker)

    @cached_property
    def sparse(self) -> Bm25Encoder | None:
        """The BM25 encoder that built the collection (None: it has dense vectors only)."""
        return sparse_encoder(self.manifest.sparse)


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
    page: int | None
    page_end: int | None
    headings: list[str]
    recall_score: float
    rerank_score: float | None
    rank: int
    relevance: float | None = None  # calibrated P(relevant); None: the deployment has no calibration


@dataclass
class SearchResult:
    hits: list[SearchHit]
    collection: str
    embedder: str
    reranker: str | None
    recall: str = "dense"
    rerank_fusion: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    stages: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _page(value: Any) -> int | None:
    """A stored page number (chunks written before pages were recorded have none)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


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


def search(
    deployment: Deployment,
    store: VectorStore,
    request: SearchQuery,
    settings: QuerySettings,
    calls: ModelCalls | None = None,
) -> SearchResult:
    """The search `request` asks for on `deployment`: planned, run, and its notes said."""
    plan = plan_search(deployment, settings, request)
    result = run_plan(deployment, store, request, plan, calls)
    result.notes += plan.notes
    return result


def run_plan(
    deployment: Deployment,
    store: VectorStore,
    request: SearchQuery,
    plan: "SearchPlan",
    calls: ModelCalls | None = None,
) -> SearchResult:
    """The whole search path with per-stage timings (ms).

    `plan.rerank_k` bounds what the reranker sees: the first `rerank_k` of the recalled chunks
    are reranked and come first, the rest follow in recall order (None: all of them).
    `plan.fusion` orders the reranked ones by the reranker's rank fused with their recall rank
    (`fusion` module); None orders them by the reranker alone. `plan.recall` is the first stage
    (dense ANN, BM25, or both fused by `plan.rrf`). `calls`: `DirectCalls` by default.
    """
    query, instruction, top_k, top_n = request.query, request.instruction, request.top_k, request.top_n
    calls = calls or DirectCalls()
    recall = plan.recall
    if not isinstance(query, str) or not query.strip():
        raise InputError("query must be a non-empty string")
    if top_n > top_k:
        raise InputError(f"top_n ({top_n}) cannot exceed top_k ({top_k})")
    timings: dict[str, float] = {}
    started = time.perf_counter()

    vector = None
    if recall != "sparse":
        vector = calls.embed_query(deployment.embedder, query, instruction)
    sparse = None
    if recall != "dense":
        if deployment.sparse is None:
            raise InputError(no_sparse_message(deployment.manifest, recall))
        sparse = deployment.sparse.embed_query(query)
    timings["embed"] = _ms(started)

    mark = time.perf_counter()
    hits = store.search(
        deployment.collection, vector, top_k, request.filter, hnsw_ef=request.hnsw_ef, exact=request.exact,
        sparse=sparse, fusion=plan.rrf if recall == "hybrid" else None,
    )  # fmt: skip
    if request.group_by_doc:
        hits = best_chunk_per_document(hits)
    timings["recall"] = _ms(mark)

    rerank_scores: list[float | None] = [None] * len(hits)
    reranker = deployment.reranker if plan.rerank else None
    mark = time.perf_counter()
    if reranker is not None and hits:
        depth = len(hits) if plan.rerank_k is None else min(plan.rerank_k, len(hits))
        texts = [str(h.payload.get("text", "")) for h in hits[:depth]]
        scores = calls.score(reranker, query, texts, instruction)
        rerank_scores = [*scores, *([None] * (len(hits) - depth))]
        order = rerank_order(scores, plan.fusion) + list(range(depth, len(hits)))
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
                page=_page(p.get("page")),
                page_end=_page(p.get("page_end")),
                headings=[str(h) for h in p.get("headings") or []],
                recall_score=hits[i].score,
                rerank_score=rerank_scores[i],
                rank=rank,
            )
        )
    notes = _calibrate(result_hits, deployment.calibration, plan, reranker is not None)
    if request.min_relevance is not None:
        result_hits, dropped = _at_least(result_hits, request.min_relevance, notes)
        notes += dropped
    return SearchResult(
        hits=result_hits,
        notes=notes,
        collection=deployment.collection,
        embedder=deployment.embedder.model_id,
        reranker=reranker.model_id if reranker is not None else None,
        recall=recall,
        rerank_fusion=(("rrf" if plan.fusion else "none") if reranker is not None else None),
        timings_ms=timings,
        stages=["embed", "recall", "rerank"] if reranker is not None else ["embed", "recall"],
    )


def _calibrate(
    hits: list[SearchHit], calibration: Calibration | None, plan: "SearchPlan", reranked: bool
) -> list[str]:
    """Fill each hit's `relevance` from the deployment's calibration; the reason when it cannot
    (a calibration fitted on a differently planned search)."""
    if calibration is None:
        return []
    fusion = ("rrf" if plan.fusion else "none") if reranked else None
    why = calibration.mismatch(plan.recall, reranked, fusion)
    if why is not None:
        return [f"relevance: null, {why}"]
    for i, hit in enumerate(hits):
        hits[i] = replace(hit, relevance=calibration.relevance(hit.rank, hit.recall_score, hit.rerank_score))
    return []


def _at_least(hits: list[SearchHit], minimum: float, notes: list[str]) -> tuple[list[SearchHit], list[str]]:
    """The hits whose relevance reaches `minimum` (one whose relevance is unknown does not), and
    what the caller should know about the rest. Without relevance at all, nothing is dropped."""
    if hits and all(hit.relevance is None for hit in hits):
        why = "relevance is unknown for this search" if notes else "the deployment has no calibration"
        return hits, [f"min_relevance {minimum} not applied: {why} (`twostage calibrate --pairs DEV`)"]
    kept = [hit for hit in hits if hit.relevance is not None and hit.relevance >= minimum]
    if kept or not hits:
        below = len(hits) - len(kept)
        return kept, [f"min_relevance {minimum}: {below} of {len(hits)} hits were below it"] if below else []
    best = max(hit.relevance or 0.0 for hit in hits)
    return [], [f"nothing relevant: no hit reaches min_relevance {minimum} (the best has {best:.3f})"]


@dataclass(frozen=True)
class SearchPlan:
    """What a request runs once its choices meet the settings and the deployment."""

    recall: RecallMode
    rerank: bool
    rrf: Rrf
    notes: list[str] = field(default_factory=list)
    fusion: RerankFusion | None = None
    rerank_k: int | None = None


def plan_search(deployment: Deployment, settings: QuerySettings, request: SearchQuery) -> SearchPlan:
    """The one way from a request's `recall` / `rerank` / `rerank_k` / `rerank_fusion` to what runs."""
    mode, recall_notes = choose_recall(request.recall, settings.recall.mode, deployment.manifest)
    apply, rerank_notes = choose_rerank(request.rerank, settings.search.rerank, deployment)
    return SearchPlan(
        mode,
        apply,
        Rrf(settings.recall.rrf_k, settings.recall.rrf_weights),
        recall_notes + rerank_notes,
        served_fusion(settings, request.rerank_fusion),
        request.rerank_k or settings.search.rerank_k,
    )


def needs_reranker(settings: QuerySettings, requested: RerankChoice | None) -> bool:
    """Whether a search may rerank, so that a caller loading models for it needs the reranker:
    not when the request (`requested`) or the settings say rerank=false."""
    return (settings.search.rerank if requested is None else requested) is not False


def served_fusion(settings: QuerySettings, requested: FusionName | None = None) -> RerankFusion | None:
    """The rerank fusion a search (or the gate measuring one) uses: the request's, else the settings'."""
    r = settings.reranker
    return choose_fusion(requested, r.fusion, r.fusion_k, r.fusion_weight)


def no_sparse_message(manifest: CollectionManifest, mode: str) -> str:
    return (
        f"collection {manifest.collection} has no BM25 sparse vectors, so it cannot run {mode} recall: "
        "send recall=dense, or rebuild it with sparse vectors (`twostage ingest PATH --new-version`)"
    )


def choose_recall(
    requested: RecallMode | None, default: RecallMode, manifest: CollectionManifest
) -> tuple[RecallMode, list[str]]:
    """The first stage a search runs, and a note when it is not the one the settings prefer.

    A collection built before sparse vectors existed keeps working with dense recall (and says
    so); asking it for sparse or hybrid explicitly is the caller's mistake (`InputError`).
    """
    if manifest.sparse is not None:
        return requested or default, []
    if requested in ("sparse", "hybrid"):
        raise InputError(no_sparse_message(manifest, requested))
    if requested is None and default != "dense":
        return "dense", [
            f"recall: dense only, because collection {manifest.collection} was built without BM25 "
            f"sparse vectors; `twostage ingest PATH --new-version` rebuilds it for {default} recall"
        ]
    return "dense", []


def choose_rerank(
    requested: RerankChoice | None, default: RerankChoice, deployment: Deployment
) -> tuple[bool, list[str]]:
    """Whether to rerank, and why not when it does not.

    `true` forces the reranker, `false` skips it, `"auto"` applies it only where it is trusted
    (`retrieval.search.trust`): a stage that measured worse than the one before it is not served by
    default.
    """
    choice = default if requested is None else requested
    if choice is True:
        if deployment.reranker is None:
            raise InputError("rerank=true, but no reranker is configured (TWOSTAGE_RERANKER__MODEL)")
        return True, []
    if choice is False:
        said = "the request said rerank=false" if requested is False else "TWOSTAGE_SEARCH__RERANK=false"
        return False, [f"not reranked: {said}"]
    trust = deployment.rerank_trust
    if trust.trusted:
        return True, []
    return False, [
        f"not reranked (rerank=auto): {trust.why}; send rerank=true to force it, or train a reranker "
        "that measures better with `twostage retrain`"
    ]


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 3)
