"""`GET /quality` (a page) and `GET /v1/quality` (its data): how good the deployments are.

For each deployment of a collection: its gate decisions with the paired evidence (gain, 95%
interval, p), its calibration's held-out reliability (the diagram's bins, ECE, Brier), and the
per-query wins and losses against its parent on the dev set; and the search log's last week
(click-through by rank, zero-hit and low-score queries). Served by the app itself, with no
script or style from elsewhere (production clusters have no network either).

Model locations are shown as they mean something to the reader without naming the server's
disk: a model the registry stored is `registry/NAME/models/dN/ROLE`, relative to the data
directory; any other local path by its last folder's name; hub ids and `pypi:` names as they are.
"""

from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from twostage.api.http.deps import CallerDep, ServiceDep
from twostage.api.settings import Settings
from twostage.retrieval.deployments.registry import Registry
from twostage.retrieval.models.source import shown_model
from twostage.retrieval.store.vector_store import check_collection_name
from twostage.retrieval.traffic.log import TrafficLog
from twostage.retrieval.traffic.stats import traffic_stats

router = APIRouter(tags=["quality"])
STATIC = Path(__file__).resolve().parent.parent / "static"
SHOWN_QUERIES = 10  # wins and losses listed each way
TRAFFIC_DAYS = 7.0


def wins_and_losses(comparison: dict[str, Any]) -> dict[str, Any]:
    """The dev queries this deployment answers better and worse than its parent, largest first."""
    rows = [{**q, "delta": round(q["this"] - q["parent"], 4)} for q in comparison.get("queries", [])]
    wins = sorted((r for r in rows if r["delta"] > 0), key=lambda r: -r["delta"])
    losses = sorted((r for r in rows if r["delta"] < 0), key=lambda r: r["delta"])
    summary = {key: comparison.get(key) for key in ("metric", "mode", "parent")}
    tied = len(rows) - len(wins) - len(losses)
    return {**summary, "queries": len(rows), "won": len(wins), "lost": len(losses), "tied": tied,
            "wins": wins[:SHOWN_QUERIES], "losses": losses[:SHOWN_QUERIES]}  # fmt: skip


def quality(
    settings: Settings, store: Any, collection: str, traffic: TrafficLog | None, owner: str | None = None
) -> dict[str, Any]:
    """The page's data. `owner`: a non-admin key's name: only its own searches, and no dev-set
    queries (they may be other users' searches, when the pairs came from feedback)."""
    registry = Registry(settings, collection, store)
    current = registry.current()
    deployments = []
    for record in reversed(registry.records()):  # newest first
        deployments.append({
            "id": record.id, "current": current is not None and record.id == current.id,
            "collection": record.collection, "parent": record.parent, "run": record.run,
            "created_at": record.created_at, "embedder": shown_model(record.embedder, settings.data_dir),
            "reranker": shown_model(record.reranker, settings.data_dir), "metrics": record.metrics,
            "gate": record.gate,
            "calibration": None if record.calibration is None else {
                "recall": record.calibration.recall, "rerank": record.calibration.rerank,
                "fusion": record.calibration.fusion, "source": record.calibration.source,
                "fitted_at": record.calibration.fitted_at,
                "reliability": record.calibration.reliability.model_dump(),
            },
            "comparison": wins_and_losses(record.comparison) if record.comparison and owner is None else None,
        })  # fmt: skip
    return {
        "collection": collection,
        "deployments": deployments,
        # the search log of every collection this service answers (one log per data directory)
        "feedback": asdict(traffic_stats(traffic, days=TRAFFIC_DAYS, key=owner))
        if traffic is not None
        else None,
    }


@router.get("/v1/quality")
async def quality_data(
    service: ServiceDep, caller: CallerDep, collection: str | None = Query(None)
) -> dict[str, Any]:
    """The deployments of `collection` with their gate evidence, calibration and dev-set wins/losses
    (admin), and the traffic of the caller's own searches (all of them for an admin)."""
    owner = caller.log_owner()
    name = check_collection_name(collection or service.settings.collection)
    caller.require_collection(name)
    return await run_in_threadpool(quality, service.settings, service.store, name, service.traffic, owner)


@router.get("/quality", include_in_schema=False)
async def quality_page() -> FileResponse:
    return FileResponse(STATIC / "quality.html", media_type="text/html")
