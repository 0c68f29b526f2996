"""Endpoints clients already speak, as thin adapters over the service's rerank/embed calls.

Cohere `POST /v2/rerank`, Jina/vLLM `POST /v1/rerank`, OpenAI `POST /v1/embeddings`.
Each accepts an optional `instruction` (the Qwen3 task) on top of its usual fields. Where the
default deployment has a calibration, `relevance_score` is its calibrated relevance (0-1,
`retrieval.search.calibration`), else the reranker's probability; `raw_scores: true` asks for
the latter either way. A document
longer than the reranker reads is scored in overlapping windows, its best window counting, as
Cohere documents; `truncation: true` cuts it to its beginning instead.
"""

import base64
import uuid
from functools import partial
from typing import Any

import numpy as np
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from twostage.api.http.deps import SearchAccess, ServiceDep
from twostage.api.http.schemas import CohereRerankRequest, EmbeddingsRequest, JinaRerankRequest, RerankRequest
from twostage.api.runtime.service import Service
from twostage.retrieval.core.errors import InputError, TooLarge
from twostage.retrieval.models.source import shown_model
from twostage.retrieval.models.truncation import windows

router = APIRouter(tags=["compatible"])
_WINDOWS_PER_DOCUMENT = 8  # on average, over a request: bounds the work one request can ask for


def _texts(documents: list[str | dict[str, Any]]) -> list[str]:
    texts = []
    for i, doc in enumerate(documents):
        text = doc.get("text") if isinstance(doc, dict) else doc
        if not isinstance(text, str):
            raise InputError(f"documents[{i}] must be a string or an object with a 'text' string")
        texts.append(text)
    return texts


def check_batch(service: Service, count: int, what: str) -> None:
    """413 for a request with more items than `api.max_client_batch`, naming the limit."""
    limit = service.settings.api.max_client_batch
    if count > limit:
        raise TooLarge(
            f"at most {limit} {what} per request (api.max_client_batch), got {count}: split the request"
        )


async def rerank_documents(service: Service, body: RerankRequest) -> tuple[list[dict[str, Any]], int]:
    """Results best first (cut to top_n, with documents if asked) and the Qwen3 tokens scored."""
    check_batch(service, len(body.documents), "documents")
    originals = _texts(body.documents)
    ids = service.tokens.encode_batch(originals)  # tokenised once: for clipping and for usage
    documents = originals
    if body.max_tokens_per_doc is not None:
        ids = [d[: body.max_tokens_per_doc] for d in ids]
        documents = [service.tokens.decode(d) for d in ids]
    if body.truncation:
        scores = await service.score_documents(body.query, documents, body.instruction)
    else:
        scores = await best_window_scores(service, body.query, documents, body.instruction)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[: body.top_n]
    served = scores if body.raw_scores else calibrated(service, scores)
    results: list[dict[str, Any]] = [{"index": i, "relevance_score": served[i]} for i in order]
    if body.return_documents:
        for r in results:
            r["document"] = {"text": originals[r["index"]]}
    used = service.tokens.count(body.query) * len(documents) + sum(len(d) for d in ids)
    return results, used


def calibrated(service: Service, scores: list[float]) -> list[float]:
    """The reranker's scores as the default deployment's calibrated relevance, where it has one
    fitted on reranked searches; else as they are. Order is decided on the raw scores (the map is
    monotone, but flat in places)."""
    calibration = service.calibration
    if calibration is None or calibration.reranker is None:
        return scores
    return [calibration.rerank_relevance(s) or 0.0 for s in scores]


async def best_window_scores(
    service: Service, query: str, documents: list[str], instruction: str | None
) -> list[float]:
    """Each document's score: its own, or the best of its overlapping windows when it is longer
    than the reranker reads. All windows of all documents are scored in one call."""
    reranker = service.reranker
    assert reranker is not None
    lengths = partial(reranker.input_lengths, query, instruction=instruction)
    split = await run_in_threadpool(
        lambda: [windows(d, lengths, reranker.max_length, service.tokens) for d in documents]
    )
    total = sum(len(w) for w in split)
    limit = _WINDOWS_PER_DOCUMENT * service.settings.api.max_client_batch
    if total > limit:
        raise TooLarge(
            f"the documents make {total} windows of {reranker.max_length} tokens, more than {limit}: send "
            "fewer or shorter documents, or max_tokens_per_doc / truncation=true"
        )
    flat = await service.score_documents(query, [w for ws in split for w in ws], instruction)
    scores, at = [], 0
    for ws in split:
        scores.append(max(flat[at : at + len(ws)]))
        at += len(ws)
    return scores


@router.post("/v2/rerank", dependencies=[SearchAccess])
async def cohere_rerank(body: CohereRerankRequest, service: ServiceDep) -> dict[str, Any]:
    results, _ = await rerank_documents(service, body)
    return {
        "id": str(uuid.uuid4()),
        "results": results,
        "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}},
    }


@router.post("/v1/rerank", dependencies=[SearchAccess])
async def jina_rerank(body: JinaRerankRequest, service: ServiceDep) -> dict[str, Any]:
    return jina_answer(service, body, *(await rerank_documents(service, body)))


def jina_answer(
    service: Service, body: RerankRequest, results: list[dict[str, Any]], used: int
) -> dict[str, Any]:
    """The Jina/vLLM response body."""
    assert service.reranker is not None
    return {
        "id": str(uuid.uuid4()),
        "model": body.model or shown_model(service.reranker.model_id, service.settings.data_dir),
        "usage": {"total_tokens": used},
        "results": results,
    }


@router.post("/v1/embeddings", dependencies=[SearchAccess])
async def openai_embeddings(body: EmbeddingsRequest, service: ServiceDep) -> dict[str, Any]:
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or any(not t.strip() for t in texts):
        raise InputError("input must be a non-empty string or a non-empty list of non-empty strings")
    check_batch(service, len(texts), "inputs")
    assert service.embedder is not None
    if body.dimensions is not None and body.dimensions > service.embedder.dim:
        raise InputError(f"dimensions must be at most {service.embedder.dim}, got {body.dimensions}")
    as_query = body.instruction is not None or body.input_type == "query"
    vectors = await service.embed_texts(texts, body.instruction, as_query)
    data = []
    for i, vector in enumerate(vectors):
        if body.dimensions is not None:  # Matryoshka: truncate, then re-normalise
            vector = vector[: body.dimensions]
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        vector = np.asarray(vector, dtype="<f4")
        encoded: Any = (
            base64.b64encode(vector.tobytes()).decode()
            if body.encoding_format == "base64"
            else vector.tolist()
        )
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    used = sum(service.tokens.count(t) for t in texts)
    return {
        "object": "list",
        "data": data,
        "model": body.model or shown_model(service.embedder.model_id, service.settings.data_dir),
        "usage": {"prompt_tokens": used, "total_tokens": used},
    }
