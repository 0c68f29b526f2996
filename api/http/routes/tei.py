"""Text Embeddings Inference routes: `POST /rerank`, `POST /embed`, `GET /info`.

What TEI clients post (RAGFlow's and Haystack's TEI rerankers, `huggingface_hub`'s
`InferenceClient.feature_extraction`, LangChain's TEI embeddings), answered with the same
models, batchers and limits as the other routes, plus the `instruction` extension they share.
TEI serves one model; this server serves an embedder and a reranker, so `/info` describes the
embedder in TEI's fields and the reranker under `reranker`.
"""

import math
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from twostage.api.http.deps import SearchAccess, ServiceDep
from twostage.api.http.routes.compat import (
    best_window_scores,
    calibrated,
    check_batch,
    jina_answer,
    rerank_documents,
)
from twostage.api.http.schemas import JinaRerankRequest, TeiEmbedRequest, TeiRerankRequest
from twostage.retrieval.core.errors import InputError
from twostage.retrieval.models.source import shown_model
from twostage.retrieval.models.truncation import fit_texts

router = APIRouter(tags=["text-embeddings-inference"])

# the largest probability below 1 in float64: logits saturate at about +36.7 rather than overflow
_BELOW_ONE = math.nextafter(1.0, 0.0)


def logit(p: float) -> float:
    """log(p / (1 - p)): the model's raw score back from a float64 sigmoid probability."""
    p = min(max(p, math.ulp(0.0)), _BELOW_ONE)
    return math.log(p) - math.log1p(-p)


@router.post("/rerank", dependencies=[SearchAccess])
async def tei_rerank(body: TeiRerankRequest, service: ServiceDep) -> list[dict[str, Any]] | dict[str, Any]:
    """Texts scored against the query, best first: `[{index, score, text?}]`.

    A Cohere/Jina body (`documents`) is answered as `/v1/rerank` answers it.
    """
    if body.documents is not None:
        given = body.model_dump(exclude={"texts", "truncate"}, exclude_none=True)
        jina = JinaRerankRequest.model_validate({**given, "truncation": body.truncate})
        return jina_answer(service, jina, *(await rerank_documents(service, jina)))
    assert body.texts is not None
    check_batch(service, len(body.texts), "texts")
    reranker = service.reranker
    assert reranker is not None
    if body.truncate:
        lengths = partial(reranker.input_lengths, body.query, instruction=body.instruction)
        texts = await run_in_threadpool(
            fit_texts, body.texts, lengths, reranker.max_length,
            truncate=True, side=body.truncation_direction, what="texts",
        )  # fmt: skip
        scores = await service.score_documents(body.query, texts, body.instruction)
    else:
        scores = await best_window_scores(service, body.query, list(body.texts), body.instruction)
    raw = body.raw_scores and reranker.probabilities
    served = scores if body.raw_scores else calibrated(service, scores)
    results: list[dict[str, Any]] = []
    for i in sorted(range(len(scores)), key=lambda i: (-scores[i], i)):
        result: dict[str, Any] = {"index": i, "score": logit(scores[i]) if raw else served[i]}
        if body.return_text:
            result["text"] = body.texts[i]
        results.append(result)
    return results


@router.post("/embed", dependencies=[SearchAccess])
async def tei_embed(body: TeiEmbedRequest, service: ServiceDep) -> list[list[float]]:
    """One vector per input, in input order: `[[float]]`."""
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    if not texts or any(not t.strip() for t in texts):
        raise InputError("inputs must be a non-empty string or a non-empty list of non-empty strings")
    check_batch(service, len(texts), "inputs")
    embedder = service.embedder
    assert embedder is not None
    if body.dimensions is not None and body.dimensions > embedder.dim:
        raise InputError(f"dimensions must be at most {embedder.dim}, got {body.dimensions}")
    as_query = body.instruction is not None or body.prompt_name == "query"
    query_lengths = partial(embedder.query_lengths, instruction=body.instruction)
    lengths = query_lengths if as_query else embedder.document_lengths
    texts = await run_in_threadpool(
        fit_texts, texts, lengths, embedder.max_length,
        truncate=body.truncate is not False, side=body.truncation_direction, what="inputs",
    )  # fmt: skip
    vectors = await service.embed_texts(texts, body.instruction, as_query, normalize=body.normalize)
    out = []
    for vector in vectors:
        if body.dimensions is not None:  # Matryoshka: truncate, then normalise again if asked
            vector = vector[: body.dimensions]
            if body.normalize:
                vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        out.append(np.asarray(vector, dtype=np.float32).tolist())
    return out


@router.get("/info", dependencies=[SearchAccess])
async def tei_info(service: ServiceDep) -> dict[str, Any]:
    """TEI's `/info` for the embedder, with the reranker beside it."""
    embedder, reranker, settings = service.embedder, service.reranker, service.settings
    assert embedder is not None and reranker is not None
    try:
        package = version("twostage")
    except PackageNotFoundError:  # run from a checkout without installing
        package = "unknown"
    return {
        "model_id": shown_model(embedder.model_id, service.settings.data_dir),
        "model_sha": None,
        "model_dtype": embedder.numerics,
        "model_type": {"embedding": {"pooling": embedder.pooling}},
        "max_concurrent_requests": settings.api.max_pending,
        "max_input_length": embedder.max_length,
        "max_batch_tokens": settings.embedder.batch_tokens,
        "max_batch_requests": None,
        "max_client_batch_size": settings.api.max_client_batch,
        "auto_truncate": True,
        "tokenization_workers": 1,
        "version": package,
        "sha": None,
        "docker_label": None,
        "reranker": {
            "model_id": shown_model(reranker.model_id, service.settings.data_dir),
            "family": reranker.family,
            "dtype": reranker.numerics,
            "max_input_length": reranker.max_length,
        },
        "embedding_dimensions": embedder.dim,
    }
