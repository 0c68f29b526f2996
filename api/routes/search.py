"""`POST /v1/search`: the two-stage search chatbots call."""

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from functools import partial
from typing import Any, TypeVar

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from twostage.api.deps import ReadAccess, ServiceDep
from twostage.api.filters import parse_filter
from twostage.api.schemas import SearchRequest, SearchResponse
from twostage.retrieval.search import plan_search, two_stage_search

router = APIRouter(tags=["search"])
T = TypeVar("T")


def _blocking(loop: asyncio.AbstractEventLoop, fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    """A sync view of an async batcher call, for the search running in a worker thread."""

    def call(*args: Any) -> T:
        return asyncio.run_coroutine_threadsafe(fn(*args), loop).result()

    return call


@router.post("/v1/search", response_model=SearchResponse, dependencies=[ReadAccess])
async def search(body: SearchRequest, service: ServiceDep, response: Response) -> SearchResponse:
    """Embed the query (with the instruction), recall top_k chunks, rerank, return top_n."""
    # off the event loop: the first request for a collection resolves it in the registry and the store
    deployment = await run_in_threadpool(service.deployment, body.collection or service.settings.collection)
    flt = parse_filter(body.filter, deployment.manifest.payload_indexes)
    loop = asyncio.get_running_loop()
    assert service.store is not None
    plan = plan_search(deployment, service.settings, body.recall, body.rerank, body.rerank_fusion)
    result = await run_in_threadpool(
        two_stage_search,
        deployment,
        service.store,
        body.query,
        instruction=body.instruction,
        top_k=body.top_k,
        top_n=body.top_n,
        flt=flt,
        rerank=plan.rerank,
        recall=plan.recall,
        rrf=plan.rrf,
        group_by_doc=body.group_by_doc,
        rerank_k=body.rerank_k or service.settings.api.rerank_k,
        fusion=plan.fusion,
        embed_query=_blocking(loop, partial(service.embed_query, embedder=deployment.embedder)),
        score_documents=_blocking(loop, partial(service.score, reranker=deployment.reranker)),
    )
    result.notes += plan.notes
    for stage, ms in result.timings_ms.items():
        service.metrics.stage.labels(stage).observe(ms / 1000)
    response.headers["Server-Timing"] = ", ".join(f"{k};dur={v:.2f}" for k, v in result.timings_ms.items())
    return SearchResponse.model_validate(asdict(result))
