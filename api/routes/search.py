"""`POST /v1/search`: the two-stage search chatbots call."""

from dataclasses import asdict

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from twostage.api.deps import ReadAccess, ServiceDep
from twostage.api.schemas import SearchRequest, SearchResponse
from twostage.retrieval.search.two_stage import search as run_search

router = APIRouter(tags=["search"])


@router.post("/v1/search", response_model=SearchResponse, dependencies=[ReadAccess])
async def search(body: SearchRequest, service: ServiceDep, response: Response) -> SearchResponse:
    """Embed the query (with the instruction), recall top_k chunks, rerank, return top_n."""
    # off the event loop: the first request for a collection resolves it in the registry and the store
    deployment = await run_in_threadpool(service.deployment, body.collection or service.settings.collection)
    assert service.store is not None
    # in a worker thread, whose model calls go straight to the micro-batchers (`Service.embed_query`)
    result = await run_in_threadpool(
        run_search, deployment, service.store, body.search_query(deployment), service.settings, service
    )
    for stage, ms in result.timings_ms.items():
        service.metrics.stage.labels(stage).observe(ms / 1000)
    response.headers["Server-Timing"] = ", ".join(f"{k};dur={v:.2f}" for k, v in result.timings_ms.items())
    return SearchResponse.model_validate(asdict(result))
