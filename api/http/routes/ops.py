"""Operations: liveness, readiness, Prometheus metrics."""

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from twostage.api.http.deps import ServiceDep
from twostage.retrieval.core.errors import ModelLoading, TwostageError

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (models may still be loading)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(service: ServiceDep) -> Response:
    """200 when the models are loaded and the collection is searchable; 503 with the reason otherwise."""
    if not service.ready:
        return JSONResponse({"status": "loading"}, status_code=503)

    def searchable() -> str:
        assert service.embedder is not None
        if service.embedder.dim < 1:  # a remote embedder's server must answer (its identity is probed once)
            raise ModelLoading("the embedder reports no dimensions")
        deployment = service.deployment(service.settings.collection)
        assert service.store is not None
        service.store.count(deployment.collection)
        return deployment.collection

    try:
        collection = await run_in_threadpool(searchable)  # the store may be slow: not on the event loop
    except TwostageError as exc:
        return JSONResponse({"status": "unavailable", "detail": str(exc)}, status_code=503)
    return JSONResponse({"status": "ready", "collection": collection})


@router.get("/metrics")
async def metrics(service: ServiceDep) -> Response:
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
