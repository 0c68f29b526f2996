"""`POST /v1/search`: the two-stage search chatbots call."""

from dataclasses import asdict

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from twostage.api.deps import ReadAccess, ServiceDep
from twostage.api.schemas import SearchRequest, SearchResponse
from twostage.api.service import Service
from twostage.retrieval.search.two_stage import Deployment, SearchResult
from twostage.retrieval.search.two_stage import search as run_search
from twostage.retrieval.traffic.log import new_search_id

router = APIRouter(tags=["search"])


@router.post("/v1/search", response_model=SearchResponse, dependencies=[ReadAccess])
async def search(body: SearchRequest, service: ServiceDep, response: Response) -> SearchResponse:
    """Embed the query (with the instruction), recall top_k chunks, rerank, return top_n."""
    # off the event loop: the first request for a collection resolves it in the registry and the store
    deployment = await run_in_threadpool(service.deployment, body.collection or service.settings.collection)
    assert service.store is not None
    # in a worker thread, whose model calls go straight to the micro-batchers (`Service.embed_query`)
    search_id, result = await run_in_threadpool(_search_and_log, service, deployment, body)
    for stage, ms in result.timings_ms.items():
        service.metrics.stage.labels(stage).observe(ms / 1000)
    response.headers["Server-Timing"] = ", ".join(f"{k};dur={v:.2f}" for k, v in result.timings_ms.items())
    return SearchResponse.model_validate({**asdict(result), "search_id": search_id})


def _search_and_log(
    service: Service, deployment: Deployment, body: SearchRequest
) -> tuple[str, SearchResult]:
    """The search, then its entry in the search log (a search that failed is not logged)."""
    assert service.store is not None and service.traffic is not None
    result = run_search(deployment, service.store, body.search_query(deployment), service.settings, service)
    search_id = new_search_id()
    service.traffic.log_search(body.logged(search_id, result, deployment))
    return search_id, result
