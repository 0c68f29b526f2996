"""Endpoints clients already speak, as thin adapters over the service's rerank/embed calls.

Cohere `POST /v2/rerank`, Jina/vLLM `POST /v1/rerank`, OpenAI `POST /v1/embeddings`.
Each accepts an optional `instruction` (the Qwen3 task) on top of its usual fields.
"""

import base64
import uuid
from typing import Any

import numpy as np
from fastapi import APIRouter

from twostage.api.deps import ReadAccess, ServiceDep
from twostage.api.schemas import CohereRerankRequest, EmbeddingsRequest, JinaRerankRequest, RerankRequest
from twostage.api.service import Service
from twostage.retrieval.errors import InputError, TooLarge

router = APIRouter(tags=["compatible"])


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


async def _rerank(service: Service, body: RerankRequest) -> tuple[list[dict[str, Any]], int]:
    """Results best first (cut to top_n, with documents if asked) and the Qwen3 tokens scored."""
    check_batch(service, len(body.documents), "documents")
    originals = _texts(body.documents)
    ids = service.tokens.encode_batch(originals)  # tokenised once: for clipping and for usage
    documents = originals
    if body.max_tokens_per_doc is not None:
        ids = [d[: body.max_tokens_per_doc] for d in ids]
        documents = [service.tokens.decode(d) for d in ids]
    scores = await service.score_documents(body.query, documents, body.instruction)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[: body.top_n]
    results: list[dict[str, Any]] = [{"index": i, "relevance_score": scores[i]} for i in order]
    if body.return_documents:
        for r in results:
            r["document"] = {"text": originals[r["index"]]}
    used = service.tokens.count(body.query) * len(documents) + sum(len(d) for d in ids)
    return results, used


@router.post("/v2/rerank", dependencies=[ReadAccess])
async def cohere_rerank(body: CohereRerankRequest, service: ServiceDep) -> dict[str, Any]:
    results, _ = await _rerank(service, body)
    return {
        "id": str(uuid.uuid4()),
        "results": results,
        "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}},
    }


@router.post("/v1/rerank", dependencies=[ReadAccess])
async def jina_rerank(body: JinaRerankRequest, service: ServiceDep) -> dict[str, Any]:
    results, used = await _rerank(service, body)
    assert service.reranker is not None
    return {
        "id": str(uuid.uuid4()),
        "model": body.model or service.reranker.model_id,
        "usage": {"total_tokens": used},
        "results": results,
    }


@router.post("/v1/embeddings", dependencies=[ReadAccess])
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
        "model": body.model or service.embedder.model_id,
        "usage": {"prompt_tokens": used, "total_tokens": used},
    }
