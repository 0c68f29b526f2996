"""`POST /v1/search`: the two-stage search chatbots call."""

import logging
from dataclasses import asdict
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from twostage.api.http.deps import SearchAccess, ServiceDep
from twostage.api.http.schemas import SearchRequest, SearchResponse
from twostage.api.runtime.service import Service
from twostage.retrieval.access.caller import Caller
from twostage.retrieval.core.errors import DatabaseUnavailable
from twostage.retrieval.deployments.canary import answer
from twostage.retrieval.models.source import shown_model
from twostage.retrieval.search.two_stage import Deployment, SearchResult
from twostage.retrieval.search.two_stage import search as run_search
from twostage.retrieval.traffic.log import new_search_id

log = logging.getLogger(__name__)
router = APIRouter(tags=["search"])


@router.post("/v1/search", response_model=SearchResponse)
async def search(
    body: SearchRequest, service: ServiceDep, response: Response, caller: Annotated[Caller, SearchAccess]
) -> SearchResponse:
    """Embed the query (with the instruction), recall top_k chunks the caller may see, rerank,
    return top_n."""
    caller = body.caller(caller)  # on_behalf_of: narrowed to the end user's principals
    collection = body.collection or service.settings.collection
    caller.require_collection(collection)
    # off the event loop: the first request for a collection resolves it in the registry and the store
    deployment = await run_in_threadpool(service.deployment, collection)
    assert service.store is not None
    # in a worker thread, whose model calls go straight to the micro-batchers (`Service.embed_query`)
    search_id, result, notes = await run_in_threadpool(_search_and_log, service, deployment, body, caller)
    for stage, ms in result.timings_ms.items():
        service.metrics.stage.labels(stage).observe(ms / 1000)
    response.headers["Server-Timing"] = ", ".join(f"{k};dur={v:.2f}" for k, v in result.timings_ms.items())
    data_dir = service.settings.data_dir
    shown = {"embedder": shown_model(result.embedder, data_dir),
             "reranker": shown_model(result.reranker, data_dir) if result.reranker else None}  # fmt: skip
    return SearchResponse.model_validate(
        {**asdict(result), **shown, "search_id": search_id, "notes": [*result.notes, *notes]}
    )


def _search_and_log(
    service: Service, deployment: Deployment, body: SearchRequest, caller: Caller
) -> tuple[str | None, SearchResult, list[str]]:
    """The search (by the canary's candidate, or both interleaved, where a canary runs and the
    session is in its share), then its entry in the search log (a failed search is not logged).
    With the log's database unreachable the hits are still answered, without a search id (no
    feedback can name a search the log does not hold), and a note says why."""
    assert service.store is not None and service.traffic is not None and service.served is not None
    store, settings = service.store, service.settings
    search_id = new_search_id()
    held = service.served.canary(body.collection or settings.collection)
    canary = None if held is None else (held[0].share, held[0].interleave, held[1])

    def run(on: Deployment) -> SearchResult:
        query = body.search_query(on, partial(service.visible, caller))
        return run_search(on, store, query, settings, service)

    answered = answer(deployment, canary, body.session or search_id, search_id, body.top_n, run)
    logged = body.logged(
        search_id, answered.result, answered.deployment, caller, answered.arm, answered.teams
    )
    try:
        service.traffic.log_search(logged)
    except DatabaseUnavailable as exc:
        log.warning("search not logged: %s", exc)
        return None, answered.result, [f"not logged: {exc}; feedback cannot name this search"]
    return search_id, answered.result, []
